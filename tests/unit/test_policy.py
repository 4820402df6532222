"""E2 branches and every baseline, on hand-built inputs with exact expectations."""

from __future__ import annotations

import random

import pytest
from sched_helpers import make_input

from preble_hpc.config import ConfigError, SchedulerConfig
from preble_hpc.rank0_scheduler.policy import (
    POLICY_NAMES,
    DecisionKind,
    DynamoKv,
    LlmdScorer,
    SglangCacheAware,
    cheapest,
    check_policy_name,
    e2,
    explore_cost,
    make_policy,
)

CFG = SchedulerConfig()


# ---------------------------------------------------------------------- registry


def test_policy_names_are_the_contract():
    assert POLICY_NAMES == (
        "e2",
        "round_robin",
        "least_load",
        "prefix_affinity",
        "sglang_cache_aware",
        "dynamo_kv",
        "llmd_scorer",
    )
    for name in POLICY_NAMES:
        assert make_policy(name, CFG, random.Random(0)).name == name


def test_unknown_policy_is_rejected_with_the_valid_names():
    with pytest.raises(ConfigError) as err:
        check_policy_name("e3")
    assert "'e3'" in str(err.value)
    for name in POLICY_NAMES:
        assert name in str(err.value)
    with pytest.raises(ConfigError):
        make_policy("random", CFG, random.Random(0))


def test_decision_kind_values():
    assert [k.value for k in DecisionKind] == [
        "exploit",
        "explore",
        "replicate",
        "rebalance",
        "baseline",
    ]


# ---------------------------------------------------------------------- E2


def test_e2_exploits_the_cheapest_holder_when_cached_exceeds_missing():
    inp = make_input(cached={1: 600, 2: 600, 3: 100}, load={1: 5.0, 2: 1.0, 3: 0.0})
    d = e2(inp, CFG)
    assert (d.rank, d.kind, d.cached_tokens) == (2, DecisionKind.EXPLOIT, 600)
    assert "cached 600 > missing 400" in d.reason


def test_e2_exploits_a_lone_holder_without_pricing_any_rank():
    def unpriced(*_args):
        raise AssertionError("a lone holder needs no cost")

    inp = make_input(cached={3: 700, 1: 200}, load={1: 0.0, 2: 0.0, 3: 9.0})
    inp.prefill_cost = inp.eviction_cost = inp.eviction_cost_above = unpriced
    d = e2(inp, CFG)
    assert (d.rank, d.kind, d.cached_tokens) == (3, DecisionKind.EXPLOIT, 700)
    assert d.reason == "cached 700 > missing 300"


def test_e2_exploit_counts_eviction_cost_among_holders():
    inp = make_input(cached={1: 900, 2: 900}, load={1: 1.0, 2: 0.5}, evict={2: 1.0})
    assert e2(inp, CFG).rank == 1  # 1.0 + 0 + 0.1 < 0.5 + 1.0 + 0.1


def test_e2_explores_when_cached_equals_missing():
    # 500 cached on rank 1 = 500 missing: explore; rank 1 still wins on P (0.5 s vs 1.0 s).
    inp = make_input(cached={1: 500}, load={1: 0.0, 2: 0.0, 3: 0.0})
    d = e2(inp, CFG)
    assert (d.rank, d.kind, d.cached_tokens) == (1, DecisionKind.EXPLORE, 500)


def test_e2_explore_minimises_load_plus_eviction_plus_prefill():
    # L+M+P: rank1 = 0.2 + 0 + 0.7 = 0.9; rank2 = 0 + 0.5 + 1.0 = 1.5; rank3 = 0.1 + 0 + 1.0 = 1.1
    inp = make_input(cached={1: 300}, load={1: 0.2, 2: 0.0, 3: 0.1}, evict={2: 0.5})
    d = e2(inp, CFG)
    assert (d.rank, d.kind) == (1, DecisionKind.EXPLORE)
    assert "min L+M+P=0.9000s" in d.reason


def test_cheapest_bounds_the_eviction_walk_by_the_best_cost_so_far():
    # L+P: rank1 = 0.5 + 0.7 = 1.2 (no eviction); ranks 2 and 3 = 0 + 1.0. Rank 2 (least L+P,
    # lowest rank) is walked first, unbounded: 1.5. Then rank 1 may spend 0.3 s on M (it needs
    # none: 1.2), and rank 3 at most 0.2 s: its 0.05 wins.
    calls = []
    evict = {2: 0.5, 3: 0.05}

    def above(rank, bound):
        calls.append((rank, bound))
        return evict.get(rank, 0.0)

    inp = make_input(
        cached={1: 300}, load={1: 0.5, 2: 0.0, 3: 0.0}, evict=evict, eviction_cost_above=above
    )
    d = e2(inp, CFG)
    assert (d.rank, d.kind) == (3, DecisionKind.EXPLORE)
    assert [r for r, _ in calls] == [2, 1, 3] and calls[0][1] == float("inf")
    assert calls[1][1] == pytest.approx(0.3) and calls[2][1] == pytest.approx(0.2)


def test_cheapest_walks_no_rank_whose_rest_already_loses():
    # Rank 2's L+P (0.1 s) and its M (0.0) settle it; ranks 1 and 3 cost more before any M.
    calls = []

    def above(rank, bound):
        calls.append(rank)
        return 0.0

    inp = make_input(load={1: 0.5, 2: 0.0, 3: 0.3}, cached={2: 900}, eviction_cost_above=above)
    assert cheapest(inp, [1, 2, 3]) == (2, pytest.approx(0.1))
    assert calls == [2]


def test_e2_explore_new_request_term_prefers_the_rank_missing_fewer_tokens():
    # Without P (Preble's code) all three cost the same load; P sends it where 400 are cached.
    inp = make_input(cached={3: 400}, load={1: 0.3, 2: 0.3, 3: 0.3})
    assert e2(inp, CFG).rank == 3


def test_e2_decode_heavy_rank_takes_the_prefill_heavy_prompt_at_equal_cost():
    # Ranks 1 and 2 both cost 1.0 s; the tie would go to rank 1, the decode-heavy rank 2 wins.
    inp = make_input(load={1: 0.0, 2: 0.0, 3: 0.5}, hit_ratio={2: 0.8, 3: 0.9})
    d = e2(inp, CFG)
    assert (d.rank, d.kind) == (2, DecisionKind.EXPLORE)
    assert "decode-heavy" in d.reason


def test_e2_decode_heavy_rank_that_costs_more_is_skipped():
    # The cost already prices prefill/decode balance (backlog vs stalled decodes): a decode-heavy
    # rank that costs more (1.2 s vs 1.0 s) does not take the prompt.
    inp = make_input(load={1: 0.0, 2: 0.2, 3: 0.0}, hit_ratio={2: 0.8})
    assert e2(inp, CFG).rank == 1


def test_e2_ties_go_to_fewest_in_flight_then_lowest_rank():
    inp = make_input(in_flight={1: 3, 2: 1, 3: 1})
    assert e2(inp, CFG).rank == 2


def test_e2_load_is_the_prefill_backlog_not_the_windowed_load():
    # The windowed load (5 s on rank 2) is history; the backlog is what a new request waits for.
    inp = make_input(load={2: 5.0}, backlog={1: 0.3, 2: 0.0, 3: 0.1}, decoding={1: 0, 2: 0, 3: 0})
    d = e2(inp, CFG)
    assert (d.rank, d.kind) == (2, DecisionKind.EXPLORE)
    assert "min L+M+P=1.0000s" in d.reason


def test_e2_prefill_beside_running_sequences_costs_their_stall():
    # P = 1.0 s everywhere; rank 1 has no backlog but 10 decoding sequences that the prefill
    # would stall: 0 + 1.0 + 10 x 1.0 = 11 s. Rank 3 waits 0.1 s behind its backlog: 1.1 s.
    inp = make_input(backlog={1: 0.0, 2: 0.5, 3: 0.1}, decoding={1: 10, 2: 0, 3: 0})
    assert e2(inp, CFG).rank == 3


def test_e2_stall_counts_the_prefill_without_its_fixed_overhead():
    # Holders 1 and 2 (P = 0.1 s). Rank 2 stalls 10 sequences by P - 0.05 s = 0.5 s: 0.6 s,
    # against rank 1's 0.55 s backlog + 0.1 s = 0.65 s. Without the overhead rank 2 costs 1.1 s.
    over = dict(
        cached={1: 900, 2: 900}, backlog={1: 0.55, 2: 0.0, 3: 0.0}, decoding={1: 0, 2: 10, 3: 0}
    )
    assert e2(make_input(prefill_overhead=0.05, **over), CFG).rank == 2
    assert e2(make_input(**over), CFG).rank == 1


def test_e2_prefill_delays_the_requests_expected_to_queue_behind_it():
    # P = 1.0 s everywhere, overhead 0.1 s. Rank 1 has the shortest backlog, but 3 requests are
    # expected to arrive there while it drains, each delayed by P - overhead: 0.2 + 1.0 + 3 x 0.9
    # = 3.9 s. Rank 2: 0.5 + 1.0 + 0.5 x 0.9 = 1.95 s. Rank 3: 0.4 + 1.0 + (1 + 1) x 0.9 = 3.2 s
    # (one decoding sequence and one request behind).
    over = dict(backlog={1: 0.2, 2: 0.5, 3: 0.4}, decoding={1: 0, 2: 0, 3: 1}, prefill_overhead=0.1)
    inp = make_input(queued_behind={1: 3.0, 2: 0.5, 3: 1.0}, **over)
    assert [explore_cost(inp, r) for r in (1, 2, 3)] == pytest.approx([3.9, 1.95, 3.2])
    assert e2(inp, CFG).rank == 2
    assert e2(make_input(**over), CFG).rank == 1  # without the term: 1.2, 1.5, 2.3 s


def test_e2_counts_the_decode_cost_of_the_rank():
    inp = make_input(decode_cost=lambda r: {1: 2.0, 2: 0.5}.get(r, 1.0))
    assert e2(inp, CFG).rank == 2  # P = 1.0 s everywhere: 3.0, 1.5, 2.0


def test_e2_explore_prices_decode_with_the_explore_term_and_exploit_does_not():
    plain = {1: 0.5, 2: 1.0, 3: 1.0}
    slowed = {1: 5.0, 2: 1.0, 3: 1.0}  # rank 1 takes prefill without pause: decode there is slow
    over = dict(decode_cost=plain.__getitem__, explore_decode_cost=slowed.__getitem__)
    # An explore (P = 1.0 s everywhere): 6.0, 2.0, 2.0 s with the explore term; rank 2 (ties:
    # lowest rank).
    assert e2(make_input(**over), CFG).rank == 2
    assert e2(make_input(decode_cost=plain.__getitem__), CFG).rank == 1
    # An exploit between holders 1 and 2 keeps the plain term: 0.4 + 0.5 against 0.4 + 1.0 s.
    holders = dict(cached={1: 600, 2: 600}, **over)
    assert (e2(make_input(**holders), CFG).rank, e2(make_input(**holders), CFG).kind) == (
        1,
        DecisionKind.EXPLOIT,
    )


#: Ranks whose windowed hit ratio says prompts are mostly reused (below decode-heavy's 0.7).
REUSING = {1: 0.6, 2: 0.6, 3: 0.6}


def test_e2_puts_a_new_prefix_on_the_smallest_cache_within_the_slack():
    # Costs 1.0, 1.1, 1.5 s; bound 1.2 s: rank 2 holds less than the cheapest rank 1, and rank
    # 3 (holding nothing) costs too much.
    over = dict(load={1: 0.0, 2: 0.1, 3: 0.5}, tree_tokens={1: 500, 2: 100, 3: 0})
    d = e2(make_input(hit_ratio=REUSING, **over), CFG)
    assert (d.rank, d.kind) == (2, DecisionKind.EXPLORE)
    assert d.reason.startswith("new prefix: rank 2 holds 100 tokens (cheapest rank 1: 500)")
    off = SchedulerConfig(new_prefix_slack=0.0)
    assert e2(make_input(hit_ratio=REUSING, **over), off).rank == 1
    wide = SchedulerConfig(new_prefix_slack=0.6)
    assert e2(make_input(hit_ratio=REUSING, **over), wide).rank == 3


def test_e2_places_a_new_prefix_by_cost_alone_where_prompts_are_mostly_misses():
    # The same ranks with a mean hit ratio of 0.4 (or a cold start, 0): the cheapest rank.
    over = dict(load={1: 0.0, 2: 0.1, 3: 0.5}, tree_tokens={1: 500, 2: 100, 3: 0})
    assert e2(make_input(hit_ratio={1: 0.6, 2: 0.6, 3: 0.0}, **over), CFG).rank == 1
    assert e2(make_input(**over), CFG).rank == 1
    low = SchedulerConfig(new_prefix_min_hit_ratio=0.3)
    assert e2(make_input(hit_ratio={1: 0.6, 2: 0.6, 3: 0.0}, **over), low).rank == 2


def test_e2_new_prefix_spread_ties_go_to_the_cheaper_rank():
    over = dict(load={1: 0.0, 2: 0.15, 3: 0.1}, tree_tokens={1: 500, 2: 100, 3: 100})
    assert e2(make_input(hit_ratio=REUSING, **over), CFG).rank == 3


def test_e2_a_prompt_a_rank_already_holds_part_of_is_not_a_new_prefix():
    # 300 of 1000 tokens cached on rank 1: an explore, but its prefix has a home already.
    over = dict(load={1: 0.0, 2: 0.0, 3: 0.0}, tree_tokens={1: 500, 2: 100, 3: 0})
    assert e2(make_input(cached={1: 300}, hit_ratio=REUSING, **over), CFG).rank == 1


def test_e2_a_prefix_every_rank_holds_does_not_count_as_a_home():
    # A system prompt of 100 tokens on every rank says nothing about where the rest should go.
    over = dict(load={1: 0.0, 2: 0.1, 3: 0.0}, tree_tokens={1: 500, 2: 100, 3: 900})
    d = e2(make_input(cached={1: 100, 2: 100, 3: 100}, hit_ratio=REUSING, **over), CFG)
    assert d.rank == 2 and d.cached_tokens == 100


def test_explore_prefill_window_is_validated():
    with pytest.raises(ConfigError, match=r"explore_prefill_window_s must be >= 0 \(0 turns it"):
        SchedulerConfig(explore_prefill_window_s=-1.0)


def test_new_prefix_knobs_are_validated():
    with pytest.raises(ConfigError, match="new_prefix_slack must be >= 0, got -0.1"):
        SchedulerConfig(new_prefix_slack=-0.1)
    with pytest.raises(ConfigError, match=r"new_prefix_min_hit_ratio must be in \[0, 1\], got 1.5"):
        SchedulerConfig(new_prefix_min_hit_ratio=1.5)


# ---------------------------------------------------------------------- baselines


def decide(name, inp, rng=None):
    return make_policy(name, CFG, rng or random.Random(0)).decide(inp)


def test_round_robin_cycles_over_live_ranks():
    pol = make_policy("round_robin", CFG, random.Random(0))
    inp = make_input(ranks=(2, 5, 7))
    assert [pol.decide(inp).rank for _ in range(4)] == [2, 5, 7, 2]
    d = pol.decide(make_input(ranks=(2, 5, 7), cached={5: 10}))
    assert (d.rank, d.kind, d.cached_tokens) == (5, DecisionKind.BASELINE, 10)


def test_least_load_ignores_the_cache():
    inp = make_input(cached={1: 999}, load={1: 2.0, 2: 1.0, 3: 1.5})
    assert decide("least_load", inp).rank == 2


def test_prefix_affinity_always_exploits():
    inp = make_input(cached={1: 10, 3: 20}, load={1: 0.0, 2: 0.0, 3: 9.0})
    assert decide("prefix_affinity", inp).rank == 3  # longest, however loaded
    assert decide("prefix_affinity", make_input(load={1: 1.0, 2: 0.5, 3: 1.0})).rank == 2


def test_sglang_imbalanced_goes_to_shortest_queue():
    # max - min = 70 > 64 and 80 > 10 * 1.5: imbalanced.
    inp = make_input(cached={1: 900}, in_flight={1: 80, 2: 10, 3: 30})
    d = SglangCacheAware().decide(inp)
    assert d.rank == 2 and "imbalanced" in d.reason


def test_sglang_needs_both_thresholds_to_call_it_imbalanced():
    # max - min = 70 > 64 but 80 <= 60 * 1.5: balanced, so cache affinity decides.
    inp = make_input(cached={1: 900}, in_flight={1: 80, 2: 60, 3: 60})
    assert SglangCacheAware().decide(inp).rank == 1


def test_sglang_match_rate_threshold_then_smallest_tree():
    inp = make_input(cached={3: 301}, tree_tokens={1: 50, 2: 10, 3: 99})
    assert SglangCacheAware().decide(inp).rank == 3  # 0.301 > 0.3
    inp = make_input(cached={3: 300}, tree_tokens={1: 50, 2: 10, 3: 99})
    d = SglangCacheAware().decide(inp)
    assert d.rank == 2 and "smallest tree" in d.reason  # 0.3 is not > 0.3


def test_dynamo_logit_is_weighted_prefill_blocks_plus_decode_blocks():
    # 160-token prompt, 16-token blocks (10 blocks).
    # rank1: 128 cached, 100 active prefill tokens, 50 active blocks:
    #   prefill = (32 + 100) / 16 = 8.25; decode = (10 - 8) + 50 = 52 -> 60.25
    # rank2: nothing cached, idle: prefill = 10, decode = 10 -> 20
    # rank3: 160 cached, 300 active prefill tokens, 5 active blocks:
    #   prefill = 300 / 16 = 18.75; decode = 0 + 5 = 5 -> 23.75
    inp = make_input(
        prompt=160,
        cached={1: 128, 3: 160},
        active_prefill_tokens={1: 100, 2: 0, 3: 300},
        active_blocks={1: 50, 2: 0, 3: 5},
    )
    d = DynamoKv().decide(inp)
    assert d.rank == 2 and "20.00" in d.reason
    d = DynamoKv(overlap_score_weight=0.0).decide(inp)  # pure load: decode blocks only
    assert d.rank == 3 and "5.00" in d.reason


def test_llmd_weighted_scorers():
    # 160-token prompt = 10 blocks. rank1: 10/10 cached, kv 0.9, waiting 4 (the max) ->
    # 3*1 + 2*0.1 + 2*0 = 3.2; rank2: 0 cached, kv 0, waiting 0 (min) -> 0 + 2 + 2 = 4.0;
    # rank3: 5 blocks cached, kv 0.5, waiting 2 -> 1.5 + 1.0 + 1.0 = 3.5
    inp = make_input(
        prompt=160,
        cached={1: 160, 3: 80},
        kv_usage={1: 0.9, 2: 0.0, 3: 0.5},
        waiting={1: 4, 2: 0, 3: 2},
    )
    d = LlmdScorer(rng=random.Random(0)).decide(inp)
    assert d.rank == 2 and "4.000" in d.reason
    # Equal waiting everywhere: queue scores are all 1; rank1 now wins on prefix.
    inp = make_input(prompt=160, cached={1: 160}, kv_usage={1: 0.5, 2: 0.0, 3: 0.0})
    assert LlmdScorer(rng=random.Random(0)).decide(inp).rank == 1


def test_llmd_ties_are_broken_at_random():
    seen = {LlmdScorer(rng=random.Random(seed)).decide(make_input()).rank for seed in range(40)}
    assert seen == {1, 2, 3}
