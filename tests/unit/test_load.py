"""LoadTracker: windowed load and hit ratio per rank, and the TTFT trend, on an injected clock."""

from __future__ import annotations

import pytest

from preble_hpc.rank0_scheduler.load import LoadTracker


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


def test_load_and_hit_ratio_cover_the_window_and_expire_after_it(clock):
    loads = LoadTracker(window_s=10.0, clock=clock)
    loads.add("a", 1, 0.5, prompt_tokens=100, cached_tokens=60)
    clock.t = 4.0
    loads.add("b", 1, 0.25, prompt_tokens=100, cached_tokens=0)
    assert loads.load(1) == 0.75
    assert loads.hit_ratio(1) == 0.3 and loads.requests_in_window(1) == 2
    clock.t = 10.0  # "a" arrived exactly H ago: out
    assert loads.load(1) == 0.25 and loads.hit_ratio(1) == 0.0
    assert loads.miss_rate(2) == 1.0  # a rank with no requests misses everything


def test_finish_replaces_the_estimate_and_drop_removes_it(clock):
    loads = LoadTracker(window_s=10.0, clock=clock)
    loads.add("a", 1, 0.5, 100, 0)
    loads.add("b", 1, 0.5, 100, 0)
    loads.finish("a", 0.125, 100, 80)
    loads.drop("b")
    assert loads.load(1) == 0.125 and loads.hit_ratio(1) == 0.8


def test_ttft_growth_is_new_half_mean_over_old_half_mean_with_enough_samples(clock):
    loads = LoadTracker(window_s=10.0, clock=clock)
    loads.add_rank(1)
    for t, ttft in ((0.0, 0.1), (1.0, 0.1), (6.0, 0.3), (7.0, 0.5)):
        clock.t = t
        loads.record_ttft(1, ttft)
    clock.t = 8.0  # halves split at 3.0: old {0.1, 0.1}, new {0.3, 0.5}
    assert loads.ttft_growth(1, min_samples=2) == pytest.approx(4.0)
    assert loads.ttft_growth(1, min_samples=3) == 1.0  # too few samples: no evidence
    assert loads.ttft_growth(2, min_samples=1) == 1.0  # unknown rank


def test_ttft_growth_follows_new_samples_and_the_moving_halves(clock):
    loads = LoadTracker(window_s=10.0, clock=clock)
    loads.add_rank(1)
    for t, ttft in ((0.0, 0.2), (6.0, 0.2)):
        clock.t = t
        loads.record_ttft(1, ttft)
    clock.t = 6.5
    assert loads.ttft_growth(1, 1) == 1.0  # old {0.2} new {0.2}
    loads.record_ttft(1, 0.8)  # a sample arrives: asked again at the same time, it counts
    assert loads.ttft_growth(1, 1) == pytest.approx(2.5)  # new {0.2, 0.8}
    assert loads.ttft_growth(1, 1, now=9.5) == pytest.approx(2.5)  # nothing crossed yet
    # At 11.0 the sample of 6.0 moves into the older half and the one of 0.0 leaves the window.
    assert loads.ttft_growth(1, 1, now=11.0) == pytest.approx(4.0)  # old {0.2} new {0.8}
    assert loads.ttft_growth(1, 1, now=16.0) == 1.0  # 0.8 moved to the older half: new empty
    assert loads.ttft_growth(1, 1, now=16.5) == 1.0  # and now out of the window


def test_ttft_halves_move_by_buckets_of_a_32nd_of_the_window(clock):
    loads = LoadTracker(window_s=32.0, clock=clock)  # buckets of 1 s
    loads.add_rank(1)
    clock.t = 0.5
    loads.record_ttft(1, 0.1)  # bucket 0
    clock.t = 15.0
    loads.record_ttft(1, 0.4)  # bucket 15
    # The halves split between buckets: at now in bucket 15 both samples are newer.
    assert loads.ttft_growth(1, 1, now=15.9) == 1.0  # older half empty
    # Once now enters bucket 16, bucket 0 is half a window old (the sample itself, 15.5 s).
    assert loads.ttft_growth(1, 1, now=16.0) == pytest.approx(4.0)
    assert loads.ttft_growth(1, 1, now=30.9) == pytest.approx(4.0)
    assert loads.ttft_growth(1, 1, now=31.0) == 1.0  # bucket 15 is older now: newer half empty
    clock.t = 31.5
    loads.record_ttft(1, 0.5)
    assert loads.ttft_growth(1, 1) == pytest.approx(0.5 / 0.25)  # old {0.1, 0.4} new {0.5}
    assert loads.ttft_growth(1, 1, now=32.0) == pytest.approx(0.5 / 0.4)  # bucket 0 left
