"""Exact admission orders of Preble's local scheduler."""

import pytest

from preble_hpc.config import LocalSchedulerConfig
from preble_hpc.worker_rank.local_scheduler import LocalScheduler, priority_group


@pytest.mark.parametrize(
    ("prompt", "cached", "group"),
    [
        (100, 0, 0),
        (100, 1, 0),
        (100, 10, 0),
        (100, 11, 1),
        (100, 50, 4),
        (100, 91, 9),
        (100, 100, 9),
        (100, 150, 9),
        (0, 0, 0),
    ],
)
def test_priority_group_is_ceil_of_hit_ratio(prompt, cached, group):
    assert priority_group(prompt, cached, 10) == group


def _sched(num_groups=3, quota=1):
    return LocalScheduler(LocalSchedulerConfig(num_groups=num_groups, quota=quota))


def test_round_serves_groups_highest_first_with_quota_g_plus_1_times_k():
    ls = _sched(num_groups=3, quota=1)  # quotas: g2 -> 3, g1 -> 2, g0 -> 1
    for i in range(5):
        ls.add(f"hot{i}", 100, 100, f"hot{i}")
        ls.add(f"mid{i}", 100, 50, f"mid{i}")
        ls.add(f"cold{i}", 100, 0, f"cold{i}")
    assert ls.group_sizes() == [5, 5, 5]
    order = ls.pop_round(100)
    assert order == [
        "hot0",
        "hot1",
        "hot2",
        "mid0",
        "mid1",
        "cold0",
        "hot3",
        "hot4",
        "mid2",
        "mid3",
        "cold1",
        "mid4",
        "cold2",
        "cold3",
        "cold4",
    ]
    assert len(ls) == 0


def test_small_limit_continues_the_round_instead_of_restarting_it():
    ls = _sched(num_groups=2, quota=1)  # quotas: g1 -> 2, g0 -> 1
    for i in range(4):
        ls.add(f"hot{i}", 10, 10, f"hot{i}")
    ls.add("cold", 10, 0, "cold")
    got = [ls.pop_round(1)[0] for _ in range(3)]
    assert got == ["hot0", "hot1", "cold"]


def test_cold_request_is_not_starved_by_a_stream_of_hot_ones():
    ls = _sched(num_groups=10, quota=10)
    ls.add("cold", 1000, 0, "cold")
    admitted = []
    for step in range(20):
        for j in range(50):  # more hot arrivals per step than a round admits
            ls.add(f"hot{step}-{j}", 1000, 1000, f"hot{step}-{j}")
        admitted += ls.pop_round(8)
        if "cold" in admitted:
            break
    # One round admits 100 of group 9 before group 0's turn: cold is in the first 101.
    assert "cold" in admitted
    assert admitted.index("cold") == 100


def test_remove_before_admission_and_duplicates():
    ls = _sched()
    ls.add("a", 10, 0, "A")
    ls.add("b", 10, 0, "B")
    assert ls.remove("a") == "A"
    assert ls.remove("a") is None
    assert "a" not in ls and "b" in ls
    with pytest.raises(ValueError, match="already queued"):
        ls.add("b", 10, 0, "B")
    assert ls.pop_round(5) == ["B"]


def _cold_turn(ls, colds=4):
    """Queue ``colds`` cold prompts and one hit, take the hit: the round moves on to group 0."""
    for i in range(colds):
        ls.add(f"cold{i}", 100, 0, f"cold{i}")
    ls.add("hot-early", 100, 100, "hot-early")
    assert ls.pop_round(1) == ["hot-early"]


def test_without_cache_pressure_a_hit_waits_for_the_rest_of_the_cold_turn():
    ls = _sched(num_groups=2, quota=2)  # quotas: g1 -> 4, g0 -> 2
    _cold_turn(ls)
    assert ls.pop_round(1) == ["cold0"]
    ls.add("hot", 100, 100, "hot")
    assert ls.pop_round(2) == ["cold1", "hot"]


def test_under_cache_pressure_a_hit_goes_before_the_rest_of_the_cold_turn():
    ls = _sched(num_groups=2, quota=2)
    _cold_turn(ls)
    assert ls.pop_round(1, cache_pressure=True) == ["cold0"]  # nothing hotter is queued
    ls.add("hot", 100, 100, "hot")
    # The hit is charged to group 1 (3 of its 4 left); group 0's turn then goes on where it was.
    assert ls.pop_round(2, cache_pressure=True) == ["hot", "cold1"]
    assert ls.pop_round(1, cache_pressure=False) == ["cold2"]  # a new round: group 1 is empty


def test_under_cache_pressure_quotas_still_bound_every_group():
    ls = _sched(num_groups=2, quota=1)  # quotas: g1 -> 2, g0 -> 1
    for i in range(5):
        ls.add(f"hot{i}", 100, 100, f"hot{i}")
    ls.add("cold", 100, 0, "cold")
    # Group 1 has spent its quota after two: cold gets its turn before the next round's hits.
    assert ls.pop_round(4, cache_pressure=True) == ["hot0", "hot1", "cold", "hot2"]


def test_cold_request_is_not_starved_under_cache_pressure_either():
    ls = _sched(num_groups=10, quota=10)
    ls.add("cold", 1000, 0, "cold")
    admitted = []
    for step in range(20):
        for j in range(50):
            ls.add(f"hot{step}-{j}", 1000, 1000, f"hot{step}-{j}")
        admitted += ls.pop_round(8, cache_pressure=True)
        if "cold" in admitted:
            break
    assert admitted.index("cold") == 100
