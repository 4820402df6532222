"""Replication, scale-back and rebalancing on top of E2's decision."""

from __future__ import annotations

from sched_helpers import make_input

from preble_hpc.config import SchedulerConfig
from preble_hpc.rank0_scheduler.policy import Decision, DecisionKind, e2
from preble_hpc.rank0_scheduler.radix_tree import RadixTree
from preble_hpc.rank0_scheduler.rebalance import Rebalancer, prefix_node

CFG = SchedulerConfig()  # replicate_load_ratio 2.0, replicate_ttft_growth 2.0, rebalance 1.5
PROMPT = list(range(1000))


def no_growth(rank: int) -> float:
    return 1.0


def tree_with(holders: dict[int, int]):
    """A tree where each rank holds the first ``n`` tokens of PROMPT; returns (tree, match)."""
    t = RadixTree(100_000, 100.0)
    for rank, n in holders.items():
        t.hold(PROMPT[:n], rank, 0.0)
    return t, t.match(PROMPT)


def exploit_input(holders: dict[int, int], load: dict[int, float], **over):
    return make_input(ranks=(1, 2, 3, 4), cached=holders, load=load, **over)


def test_non_exploit_decisions_pass_through():
    inp = make_input()
    d = Decision(1, DecisionKind.EXPLORE, "x", 0)
    _, m = tree_with({})
    assert Rebalancer(CFG).adjust(d, inp, m, no_growth) is d


def test_load_hot_prefix_is_replicated_on_the_cheapest_non_holder():
    # Holder 1 carries all the load: 4.0 > 2 x mean 1.0. Rank 3 is idle: 0 + 1.0 s prefill.
    holders = {1: 900}
    inp = exploit_input(holders, {1: 4.0, 2: 0.5, 3: 0.0, 4: 0.2})
    t, m = tree_with(holders)
    d = e2(inp, CFG)
    assert (d.rank, d.kind) == (1, DecisionKind.EXPLOIT)
    r = Rebalancer(CFG).adjust(d, inp, m, no_growth)
    assert (r.rank, r.kind, r.cached_tokens) == (3, DecisionKind.REPLICATE, 0)
    assert "hot prefix" in r.reason
    assert prefix_node(m, [1]).replicas == {3}


def test_load_hot_but_replica_not_cheaper_stays():
    # 1.0 + 0.1 for the holder against 0 + 1.0 s of prefill elsewhere... make prefill dearer.
    holders = {1: 900}
    inp = exploit_input(holders, {1: 1.0, 2: 0.0, 3: 0.0, 4: 0.0}, prefill_per_token=0.01)
    _, m = tree_with(holders)
    d = e2(inp, CFG)  # holder: 1.0 + 1.0 = 2.0; others 0 + 10.0
    assert Rebalancer(CFG).adjust(d, inp, m, no_growth) == d


def test_ttft_growth_on_every_holder_replicates_on_a_cheaper_non_holder():
    # Holders' load 1.5 is not > 2 x mean 0.75 (no load trigger); 1.5 + 0.1 s against 0 + 1.0 s.
    holders = {1: 900, 2: 900}
    inp = exploit_input(holders, {1: 1.5, 2: 1.5, 3: 0.0, 4: 0.0})
    _, m = tree_with(holders)
    d = e2(inp, CFG)
    r = Rebalancer(CFG).adjust(d, inp, m, lambda rank: 2.5 if rank in (1, 2) else 1.0)
    assert (r.rank, r.kind) == (3, DecisionKind.REPLICATE)
    assert "TTFT" in r.reason
    assert prefix_node(m, [1, 2]).replicas == {3}


def test_ttft_growth_never_replicates_at_a_loss():
    # Holders 0.1 + 1.0 s against 0.1 + 10.0 s of prefill elsewhere: TTFT growth alone does not
    # pay for recomputing the prefix on a dearer rank.
    holders = {1: 900, 2: 900}
    inp = exploit_input(holders, {1: 0.1, 2: 0.1, 3: 0.1, 4: 0.1}, prefill_per_token=0.01)
    _, m = tree_with(holders)
    d = e2(inp, CFG)
    r = Rebalancer(CFG).adjust(d, inp, m, lambda rank: 2.5 if rank in (1, 2) else 1.0)
    assert r == d and r.kind is DecisionKind.EXPLOIT
    assert prefix_node(m, [1, 2]).replicas is None


def test_ttft_growth_on_one_holder_only_is_not_hot():
    holders = {1: 900, 2: 900}
    inp = exploit_input(holders, {1: 0.1, 2: 0.1, 3: 0.1, 4: 0.1})
    _, m = tree_with(holders)
    d = e2(inp, CFG)
    r = Rebalancer(CFG).adjust(d, inp, m, lambda rank: 3.0 if rank == 1 else 1.0)
    assert r.kind is DecisionKind.EXPLOIT


def test_cooled_prefix_scales_back_to_an_original_holder():
    holders = {1: 900, 3: 900}
    _, m = tree_with(holders)
    prefix_node(m, [1, 3]).replicas = {3}
    # Replica 3 is the cheapest holder (0.2 vs 0.25), but the original costs <= 1.5x: go back.
    inp = exploit_input(holders, {1: 0.25, 2: 0.3, 3: 0.2, 4: 0.3})
    d = e2(inp, CFG)
    assert d.rank == 3
    r = Rebalancer(CFG).adjust(d, inp, m, no_growth)
    assert (r.rank, r.kind) == (1, DecisionKind.EXPLOIT) and "scale back" in r.reason


def test_scale_back_never_breaks_the_rebalance_ratio():
    holders = {1: 900, 3: 900}
    _, m = tree_with(holders)
    prefix_node(m, [1, 3]).replicas = {3}
    inp = exploit_input(holders, {1: 1.0, 2: 0.9, 3: 0.1, 4: 0.9})
    d = e2(inp, CFG)
    assert Rebalancer(CFG).adjust(d, inp, m, no_growth).rank == 3  # 1.1 > 1.5 x 0.2


def test_heavy_rank_sheds_a_request_to_a_lighter_one():
    # Holder 1: load 1.0 > 1.5 x lightest 0.0 (not hot: mean is 0.5, 1.0 < 2 x 0.5 fails).
    holders = {1: 600, 2: 600}
    inp = exploit_input(holders, {1: 0.9, 2: 0.9, 3: 0.0, 4: 0.2})
    _, m = tree_with(holders)
    d = e2(inp, CFG)  # holders cost 0.9 + 0.4 = 1.3; rank 3: 0 + 1.0
    r = Rebalancer(CFG).adjust(d, inp, m, no_growth)
    assert (r.rank, r.kind, r.cached_tokens) == (3, DecisionKind.REBALANCE, 0)
    assert "> 1.5 x lightest" in r.reason


def test_no_rebalance_within_the_ratio_or_when_dearer():
    holders = {1: 600}
    inp = exploit_input(holders, {1: 0.3, 2: 0.25, 3: 0.25, 4: 0.25})  # 0.3 <= 1.5 x 0.25
    _, m = tree_with(holders)
    assert Rebalancer(CFG).adjust(e2(inp, CFG), inp, m, no_growth).rank == 1
    inp = exploit_input(holders, {1: 0.5, 2: 0.0, 3: 0.0, 4: 0.0})  # heavy, but 0.9 < 1.0
    assert Rebalancer(CFG).adjust(e2(inp, CFG), inp, m, no_growth).rank == 1


def test_holder_backlog_beyond_the_miss_prefill_moves_the_request():
    # Holder 1 waits 1.5 s behind its backlog (+0.1 s prefill); rank 2 recomputes the whole
    # prompt (1.0 s) after 0.3 s: cheaper. Not hot (1.5 < 2 x mean 0.95): REBALANCE.
    backlog = {1: 1.5, 2: 0.3, 3: 1.0, 4: 1.0}
    holders = {1: 900}
    inp = exploit_input(holders, {}, backlog=backlog, decoding={r: 0 for r in backlog})
    _, m = tree_with(holders)
    r = Rebalancer(CFG).adjust(e2(inp, CFG), inp, m, no_growth)
    assert (r.rank, r.kind) == (2, DecisionKind.REBALANCE)
    # One decoding sequence on rank 2 would be stalled by that 1.0 s prefill: 2.3 s, stay.
    inp = exploit_input(holders, {}, backlog=backlog, decoding={1: 0, 2: 1, 3: 0, 4: 0})
    assert Rebalancer(CFG).adjust(e2(inp, CFG), inp, m, no_growth).rank == 1


def test_hot_holder_by_backlog_replicates():
    holders = {1: 900}
    backlog = {1: 4.0, 2: 0.0, 3: 0.0, 4: 0.0}
    inp = exploit_input(holders, {}, backlog=backlog, decoding={r: 0 for r in backlog})
    _, m = tree_with(holders)
    r = Rebalancer(CFG).adjust(e2(inp, CFG), inp, m, no_growth)
    assert (r.rank, r.kind) == (2, DecisionKind.REPLICATE)
