"""GlobalScheduler (contract A) end to end, on a virtual clock."""

from __future__ import annotations

import json
import random

import pytest

from preble_hpc.config import ConfigError, SchedulerConfig
from preble_hpc.messages import (
    CacheEvent,
    CacheEventKind,
    CacheReport,
    Finished,
    LoadStats,
    WorkerReady,
)
from preble_hpc.rank0_scheduler.policy import POLICY_NAMES, DecisionKind
from preble_hpc.rank0_scheduler.scheduler import GlobalScheduler


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(ranks=(1, 2, 3), clock=None, **cfg) -> tuple[GlobalScheduler, Clock]:
    clock = clock or Clock()
    sched = GlobalScheduler(SchedulerConfig(**cfg), list(ranks), clock=clock, rng=random.Random(0))
    return sched, clock


SYSTEM = list(range(10_000, 11_000))  # a 1000-token shared prefix


def prompt(i: int, tail: int = 50) -> list[int]:
    return SYSTEM + [20_000 + i] * tail


def finished(rid, rank, prompt_tokens=1050, cached=0, completion=16, prefill=0.05, tpot=0.01):
    return Finished(rid, rank, "stop", prompt_tokens, cached, completion, 0.0, prefill, tpot)


def test_unknown_policy_is_a_config_error_listing_valid_names():
    with pytest.raises(ConfigError) as err:
        make(policy="fastest")
    for name in POLICY_NAMES:
        assert name in str(err.value)


def test_first_request_explores_then_shared_prefix_is_exploited():
    s, clock = make(ranks=(1, 2))
    d0 = s.schedule("a", prompt(0), 16)
    assert (d0.rank, d0.kind, d0.cached_tokens) == (1, DecisionKind.EXPLORE, 0)
    d = s.schedule("other", list(range(1050)), 16)  # unrelated, same size: rank 2
    assert (d.rank, d.kind) == (2, DecisionKind.EXPLORE)
    clock.t = 1.0
    d1 = s.schedule("b", prompt(1), 16)
    assert (d1.rank, d1.kind, d1.cached_tokens) == (1, DecisionKind.EXPLOIT, 1000)
    st = s.stats()
    assert st["decisions"]["explore"] == 2 and st["decisions"]["exploit"] == 1
    assert st["ranks"]["1"]["in_flight"] == 2 and st["in_flight"] == 3
    # Whole 16-token blocks only: 1040 of each 1050-token prompt, the SYSTEM prefix once.
    assert st["tree"]["tokens"] == 1040 + 1040 + 40
    json.dumps(st)


def test_schedule_holds_whole_blocks_only_so_a_partial_tail_is_never_stranded():
    # An engine caches full blocks only and reports evicting only those: a partial last block
    # marked here would stay "held" for ever.
    s, _ = make(ranks=(1,))
    s.schedule("a", SYSTEM + [7] * 20, 16)  # 1020 tokens: 63 blocks + 12
    assert s.tree.held_tokens(1) == 1008
    assert s.tree.match(SYSTEM + [7] * 20).per_rank == {1: 1008}
    s.schedule("b", list(range(5)), 16)  # under one block: nothing to hold
    assert s.tree.held_tokens(1) == 1008
    s.schedule("c", SYSTEM[:992], 16)  # block-aligned: held whole
    assert s.tree.held_tokens(1) == 1008
    # The engine's eviction of the last full block now releases everything the rank held there.
    s.on_cache_report(CacheReport(1, [CacheEvent(CacheEventKind.EVICTED, tuple(SYSTEM[:16]), 16)]))
    assert s.tree.held_tokens(1) == 0


def test_low_load_spreads_a_shared_prefix():
    # The holder is still prefilling the first request: waiting behind that prefill and then
    # prefilling the tail costs more than recomputing the short prompt on the idle rank.
    s, clock = make(ranks=(1, 2))
    s.schedule("a", prompt(0), 16)
    d = s.schedule("b", prompt(1), 16)
    assert d.rank == 2 and d.kind in (DecisionKind.REPLICATE, DecisionKind.REBALANCE)


def test_backlog_and_decoding_follow_the_request():
    s, _ = make(ranks=(1, 2))
    s.schedule("a", prompt(0), 16)
    ranks = s.stats()["ranks"]
    assert ranks["1"]["prefill_backlog_s"] == pytest.approx(s.cost.prefill_s(1050, 0), abs=1e-6)
    assert ranks["1"]["decoding"] == 0 and ranks["2"]["prefill_backlog_s"] == 0.0
    s.on_first_token("a")
    ranks = s.stats()["ranks"]
    assert (ranks["1"]["prefill_backlog_s"], ranks["1"]["decoding"]) == (0.0, 1)
    s.on_finished(finished("a", 1))
    assert s.stats()["ranks"]["1"]["decoding"] == 0
    s.schedule("b", prompt(1), 16)
    s.on_request_dropped("b")  # dropped while prefilling: its backlog leaves too
    assert all(r["prefill_backlog_s"] == 0.0 for r in s.stats()["ranks"].values())


def test_hits_stay_on_the_holder_until_its_backlog_outweighs_a_recompute():
    s, _ = make(ranks=(1, 2))
    s.schedule("a", prompt(0), 16)
    s.on_first_token("a")
    kinds = [s.schedule(f"h{i}", prompt(i + 1), 16) for i in range(6)]
    # Each queued hit adds its short tail prefill to rank 1's backlog; once waiting behind them
    # costs more than the whole prompt on idle rank 2, the next hit goes there instead.
    moved = next(i for i, d in enumerate(kinds) if d.rank == 2)
    assert moved >= 2
    assert all(d.kind is DecisionKind.EXPLOIT and d.rank == 1 for d in kinds[:moved])
    assert kinds[moved].kind in (DecisionKind.REBALANCE, DecisionKind.REPLICATE)
    assert s.stats()["ranks"]["1"]["prefill_backlog_s"] >= s.cost.prefill_s(50, 1000) * moved


def test_schedule_does_not_touch_the_callers_tokens():
    s, _ = make()
    tokens = prompt(0)
    before = list(tokens)
    s.schedule("a", tokens, 16)
    assert tokens == before


def test_duplicate_id_and_no_rank_are_errors():
    s, _ = make(ranks=(1,))
    s.schedule("a", [1, 2, 3], 4)
    with pytest.raises(ValueError, match="already in flight"):
        s.schedule("a", [1, 2, 3], 4)
    assert s.remove_rank(1) == ["a"]
    with pytest.raises(RuntimeError, match="no live worker rank"):
        s.schedule("b", [1], 4)


def test_finished_timings_replace_the_estimate_and_fit_the_model():
    s, _ = make(ranks=(1,))
    s.schedule("a", prompt(0), 100)
    estimate = s.loads.load(1)
    s.on_load_stats(LoadStats(1, 0.0, running=4, waiting=0, kv_usage=0.1))
    s.on_finished(finished("a", 1, completion=101, prefill=0.2, tpot=0.02))
    # Measured prefill 0.2 s + 100 decoded tokens at the fitted marginal cost per sequence.
    expected = 0.2 + 100 * s.cost.decode_step_per_seq_s
    assert s.loads.load(1) == pytest.approx(expected)
    assert estimate != pytest.approx(expected)
    coeffs = s.stats()["cost_model"]
    assert coeffs["prefill_samples"] == 1 and coeffs["decode_samples"] == 1
    assert s.stats()["ranks"]["1"]["in_flight"] == 0
    s.on_finished(finished("a", 1))  # a second Finished for the same id is ignored
    assert s.loads.load(1) == pytest.approx(expected)


def test_dropped_request_leaves_the_window():
    s, _ = make(ranks=(1,))
    s.schedule("a", prompt(0), 16)
    assert s.loads.load(1) > 0
    s.on_request_dropped("a")
    assert s.loads.load(1) == 0.0 and s.stats()["in_flight"] == 0
    s.on_request_dropped("a")  # unknown now: no error


def test_load_window_runs_on_the_injected_clock():
    s, clock = make(ranks=(1,), window_s=10.0)
    s.schedule("a", prompt(0), 16)
    clock.t = 9.9
    assert s.loads.load(1) > 0
    clock.t = 10.0
    assert s.loads.load(1) == 0.0


def test_evicted_report_corrects_the_optimistic_mark():
    s, clock = make(ranks=(1, 2))
    s.schedule("a", prompt(0), 16)  # rank 1 now believed to hold the prompt
    s.on_finished(finished("a", 1))
    # Rank 1's engine evicted the block [992, 1008): everything from token 992 down is gone.
    report = CacheReport(1, [CacheEvent(CacheEventKind.EVICTED, tuple(prompt(0)[:1008]), 16)])
    s.on_cache_report(report)
    m = s.tree.match(prompt(1))
    assert m.per_rank == {1: 992}
    st = s.stats()["cache_events"]
    assert st["evicted"] == 1 and st["not_in_tree"] == 0


def test_stored_unmapped_cleared_and_bad_events():
    s, _ = make(ranks=(1, 2))
    s.on_cache_report(
        CacheReport(
            2,
            [
                CacheEvent(CacheEventKind.STORED, tuple(SYSTEM), 16),
                CacheEvent(CacheEventKind.UNMAPPED, detail="block 0xabc without parent"),
                CacheEvent(CacheEventKind.EVICTED, (1, 2, 3), 0),  # malformed
                CacheEvent(CacheEventKind.EVICTED, (7, 7, 7, 7), 2),  # not in the tree
            ],
        )
    )
    assert s.tree.match(prompt(0)).per_rank == {2: 1000}
    d = s.schedule("a", prompt(0), 16)
    assert (d.rank, d.kind, d.cached_tokens) == (2, DecisionKind.EXPLOIT, 1000)
    s.on_cache_report(CacheReport(2, [CacheEvent(CacheEventKind.CLEARED)]))
    assert s.tree.held_tokens(2) == 0
    s.on_cache_report(CacheReport(9, [CacheEvent(CacheEventKind.CLEARED)]))  # unknown rank
    ev = s.stats()["cache_events"]
    assert (ev["stored"], ev["unmapped"], ev["cleared"]) == (1, 1, 1)
    assert (ev["ignored"], ev["not_in_tree"]) == (2, 1)


def test_remove_rank_returns_its_requests_and_stops_routing():
    s, _ = make(ranks=(1, 2))
    s.schedule("a", prompt(0), 16)
    s.schedule("b", [5, 6, 7], 16)
    lost = s.remove_rank(1)
    assert lost == ["a"]
    assert s.remove_rank(1) == []
    for i in range(5):
        assert s.schedule(f"x{i}", prompt(0), 16).rank == 2
    assert s.stats()["removed_ranks"] == [1]
    s.on_finished(finished("a", 1))  # late Finished from the dead rank: ignored
    s.on_worker_ready(WorkerReady(1, 50_000, 16, 4096, "m"))  # restarted: live again
    assert "1" in s.stats()["ranks"]


def test_explore_avoids_evicting_hot_kv():
    s, clock = make(ranks=(1, 2))
    for r in (1, 2):
        s.on_worker_ready(WorkerReady(r, 1100, 16, 4096, "m"))
    # Rank 1 holds a hot 1000-token prefix and is full; rank 2 holds a cold one, also full.
    hot = list(range(50_000, 51_000))
    cold = list(range(60_000, 61_000))
    s.on_cache_report(CacheReport(1, [CacheEvent(CacheEventKind.STORED, tuple(hot), 16)]))
    s.on_cache_report(CacheReport(2, [CacheEvent(CacheEventKind.STORED, tuple(cold), 16)]))
    for _ in range(20):
        s.tree.record_hit(s.tree.match(hot), clock.t)
    d = s.schedule("new", list(range(70_000, 70_500)), 16)
    assert d.rank == 2 and d.kind is DecisionKind.EXPLORE


def test_replication_triggers_on_ttft_growth_in_virtual_time():
    s, clock = make(
        ranks=(1, 2),
        window_s=100.0,
        rebalance_ratio=1000.0,
        replicate_load_ratio=1000.0,
        ttft_min_samples=4,
    )
    # An unrelated long request keeps rank 1 busy, so the shared prefix settles on rank 2.
    assert s.schedule("other", list(range(8000)), 16).rank == 1
    for i in range(5):  # first half of the window: fast first tokens
        clock.t = float(i)
        assert s.schedule(f"early{i}", prompt(i), 16).rank == 2
        clock.t += 0.1
        s.on_first_token(f"early{i}")
    for i in range(5, 9):  # second half: 5x slower
        clock.t = 60.0 + i
        assert s.schedule(f"late{i}", prompt(i), 16).rank == 2
        clock.t += 0.5
        s.on_first_token(f"late{i}")
    clock.t = 80.0
    for i in range(9):
        s.on_finished(finished(f"early{i}" if i < 5 else f"late{i}", 2))
    # A long unrelated prefill queues on the holder (rank 1 still prefills "other"), then rank 1
    # is free: copying the 1000-token prefix there is now cheaper than waiting on rank 2.
    assert s.schedule("big", list(range(30_000, 38_000)), 16).rank == 2
    s.on_first_token("other")
    d = s.schedule("hot", prompt(100), 16)
    assert (d.rank, d.kind) == (1, DecisionKind.REPLICATE)
    assert "TTFT" in d.reason
    # The new replica has no TTFT history: the next request exploits a holder, no new replica.
    d = s.schedule("next", prompt(101), 16)
    assert d.kind is DecisionKind.EXPLOIT


def test_tree_stays_under_its_cap():
    s, _ = make(ranks=(1, 2), tree_capacity_tokens=5000)
    rng = random.Random(0)
    for i in range(200):
        s.schedule(f"r{i}", [rng.randrange(1000) for _ in range(300)], 4)
        assert s.tree.total_tokens <= 5000
    s.tree.check_invariants()


def test_tree_cap_follows_the_kv_the_workers_report_unless_set():
    s, _ = make(ranks=(1, 2))
    assert s.tree.capacity_tokens == 4_000_000  # before any WorkerReady: the floor
    s.on_worker_ready(WorkerReady(1, 1_500_000, 16, 4096, "m"))
    assert s.tree.capacity_tokens == 4_000_000  # 2 x 1.5M is below the floor
    s.on_worker_ready(WorkerReady(2, 3_000_000, 16, 4096, "m"))
    assert s.tree.capacity_tokens == 9_000_000  # 2 x (1.5M + 3M)
    s.remove_rank(2)  # a failed rank may come back: the cap does not shrink
    assert s.tree.capacity_tokens == 9_000_000
    fixed, _ = make(ranks=(1,), tree_capacity_tokens=5000)
    fixed.on_worker_ready(WorkerReady(1, 3_000_000, 16, 4096, "m"))
    assert fixed.tree.capacity_tokens == 5000
    with pytest.raises(ConfigError, match="tree_capacity_tokens must be >= 0"):
        make(tree_capacity_tokens=-1)


@pytest.mark.parametrize(("cap", "forgotten"), [(0, 0), (4_000_000, 1_000_000)])
def test_the_auto_tree_cap_keeps_every_copy_large_engines_hold(cap, forgotten):
    # Two ranks of 3M tokens each hold five distinct 1M-token prompts: a fixed 4M cap forgets
    # the least recently used one (rank 0 would then route its hits as misses); the auto cap
    # (2 x 6M) keeps all five.
    s, clock = make(ranks=(1, 2), tree_capacity_tokens=cap)
    for r in (1, 2):
        s.on_worker_ready(WorkerReady(r, 3_000_000, 16, 4096, "m"))
    for i in range(5):
        clock.t = float(i)
        s.schedule(f"p{i}", range(i * 1_000_000, (i + 1) * 1_000_000), 1)
    assert s.stats()["tree"]["forgotten_tokens"] == forgotten
    assert s.tree.total_tokens == 5_000_000 - forgotten


@pytest.mark.parametrize("policy", [p for p in POLICY_NAMES if p != "e2"])
def test_baselines_run_through_the_scheduler(policy):
    s, clock = make(ranks=(1, 2, 3), policy=policy)
    for i in range(12):
        clock.t = float(i)
        d = s.schedule(f"r{i}", prompt(i), 16)
        assert d.kind is DecisionKind.BASELINE and d.rank in (1, 2, 3)
    assert s.stats()["decisions"]["baseline"] == 12


def test_decode_cost_weighs_the_context_a_rank_decodes():
    # One decoding request on each rank: 8,000 tokens of context on rank 1, 500 on rank 2. A new
    # unrelated prompt costs the same prefill and stall on both; decoding beside the long context
    # is slower, so it goes to rank 2.
    s, _ = make(ranks=(1, 2))
    assert s.schedule("long", list(range(8000)), 64).rank == 1
    assert s.schedule("short", list(range(100_000, 100_500)), 64).rank == 2
    s.on_first_token("long")
    s.on_first_token("short")
    d = s.schedule("new", list(range(200_000, 201_000)), 64)
    assert (d.rank, d.kind) == (2, DecisionKind.EXPLORE)


def test_arrival_rate_counts_each_ranks_share_of_the_latest_placements():
    s, clock = make(ranks=(1, 2), policy="round_robin", arrival_window=3)
    assert s.stats()["ranks"]["1"]["arrival_rate_per_s"] == 0.0  # nothing placed yet
    for i in range(4):  # ranks 1, 2, 1, 2 at t = 0, 1, 2, 3; the window keeps the last three
        clock.t = float(i)
        s.schedule(f"r{i}", prompt(i), 16)
    clock.t = 4.0
    ranks = s.stats()["ranks"]
    # Placements at t = 1 (rank 2), 2 (rank 1), 3 (rank 2): span 4 - 1 = 3 s.
    assert ranks["1"]["arrival_rate_per_s"] == pytest.approx(1 / 3, abs=1e-6)
    assert ranks["2"]["arrival_rate_per_s"] == pytest.approx(2 / 3, abs=1e-6)


def test_arrival_window_must_hold_two_placements():
    with pytest.raises(ConfigError, match="arrival_window must be >= 2"):
        SchedulerConfig(arrival_window=1)


def test_explore_decode_term_is_slowed_by_the_prefill_placed_in_the_window():
    s, clock = make(ranks=(1, 2), explore_prefill_window_s=10.0)
    assert s.schedule("a", list(range(4000)), 64).rank == 1  # ties: lowest rank
    placed = s._requests["a"].prefill_s
    inp = s._policy_input(100, 64, 64, s.tree.match(list(range(300_000, 300_100))), clock.t)
    assert inp.explore_decode_cost is not None and inp.decode_cost is not None
    rho = placed / 10.0
    assert inp.explore_decode_cost(1) == pytest.approx(inp.decode_cost(1) / (1 - rho))
    assert inp.explore_decode_cost(2) == inp.decode_cost(2)  # nothing placed on rank 2
    clock.t = 10.0  # the placement leaves the window
    inp = s._policy_input(100, 64, 64, s.tree.match(list(range(300_000, 300_100))), clock.t)
    assert inp.explore_decode_cost(1) == inp.decode_cost(1)


def test_explore_decode_term_caps_rho_is_on_by_default_and_zero_turns_it_off():
    s, clock = make(ranks=(1, 2), explore_prefill_window_s=0.001)
    s.schedule("a", list(range(4000)), 64)  # far more than 0.001 s of prefill
    inp = s._policy_input(100, 64, 64, s.tree.match(list(range(300_000, 300_100))), clock.t)
    assert inp.explore_decode_cost(1) == pytest.approx(inp.decode_cost(1) / (1 - 0.9))
    assert SchedulerConfig().explore_prefill_window_s == 30.0
    off, _ = make(ranks=(1, 2), explore_prefill_window_s=0.0)
    off.schedule("a", list(range(4000)), 64)
    inp = off._policy_input(100, 64, 64, off.tree.match(list(range(300_000, 300_100))), 0.0)
    assert inp.explore_decode_cost is None
