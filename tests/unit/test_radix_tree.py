"""Global radix tree: match, split, holders, eviction mirror, cap, windowed hits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preble_hpc.rank0_scheduler.radix_tree import RadixTree

W = 100.0  # window, seconds


def tree(cap: int = 10_000) -> RadixTree:
    return RadixTree(cap, W)


def segs(t: RadixTree) -> list[tuple[int, int, list[int]]]:
    """(start, depth, sorted ranks) of every node, depth-first by first token."""
    out = []

    def walk(node):
        for key in sorted(node.children):
            child = node.children[key]
            out.append((child.start, child.depth, sorted(child.ranks)))
            walk(child)

    walk(t.root)
    return out


def test_empty_tree_matches_nothing():
    m = tree().match([1, 2, 3])
    assert (m.length, m.cached, m.per_rank, m.path) == (0, 0, {}, [])


def test_hold_then_match_whole_and_partial():
    t = tree()
    assert t.hold([1, 2, 3, 4], rank=1, now=0.0) == 4
    m = t.match([1, 2, 3, 4, 5])
    assert (m.length, m.cached, m.per_rank, m.tail) == (4, 4, {1: 4}, 4)
    m = t.match([1, 2, 9])
    assert (m.length, m.cached, m.per_rank, m.tail) == (2, 2, {1: 2}, 2)
    m = t.match([1, 2])  # prompt ends inside the node
    assert (m.length, m.cached, m.per_rank) == (2, 2, {1: 2})
    t.check_invariants()


def test_split_on_branch_keeps_holders_and_counts():
    t = tree()
    t.hold([1, 2, 3, 4], 1, 0.0)
    t.hold([1, 2, 7, 8, 9], 2, 0.0)
    assert segs(t) == [(0, 2, [1, 2]), (2, 4, [1]), (2, 5, [2])]
    assert (t.total_tokens, t.num_nodes) == (7, 3)
    assert (t.held_tokens(1), t.held_tokens(2)) == (4, 5)
    m = t.match([1, 2, 3, 4])
    assert m.per_rank == {1: 4, 2: 2} and m.cached == 4 and m.holders == [1]
    t.hold([1, 2, 3, 4], 3, 0.0)
    assert t.match([1, 2, 3, 4, 5]).holders == [1, 3]  # the longest prefix's holders, ascending
    assert t.match([1, 2]).holders == [1, 2, 3] and t.match([9]).holders == []
    t.check_invariants()


def test_rank_gaining_upper_part_only_holds_part_of_the_node_without_a_split():
    t = tree()
    t.hold([1, 2, 3, 4], 1, 0.0)
    assert t.hold([1, 2], 2, 0.0) == 2
    assert segs(t) == [(0, 4, [1, 2])]
    assert t.root.children[1].ranks == {1: 4, 2: 2}
    assert t.match([1, 2, 3, 4]).per_rank == {1: 4, 2: 2}
    assert t.match([1, 2, 3, 9]).per_rank == {1: 3, 2: 2}
    assert t.hold([1, 2, 3, 4], 1, 0.0) == 0  # already held: no change
    assert t.hold([1], 2, 0.0) == 0  # holds more of it already
    assert t.hold([1, 2, 3], 2, 0.0) == 1
    assert t.held_by_rank == {1: 4, 2: 3}
    # A prompt branching off inside the node splits it where it branches.
    assert t.hold([1, 2, 9], 3, 0.0) == 3
    assert segs(t) == [(0, 2, [1, 2, 3]), (2, 4, [1, 2]), (2, 3, [3])]
    assert t.root.children[1].children[3].ranks == {1: 2, 2: 1}
    t.check_invariants()


def test_stored_tuple_and_list_prompts_compare_equal():
    t = tree()
    t.hold((5, 6, 7), 3, 0.0)
    assert t.match([5, 6, 7]).per_rank == {3: 3}


def test_evict_block_drops_rank_from_block_and_below():
    t = tree()
    t.hold(list(range(10)), 1, 0.0)
    t.hold(list(range(10)), 2, 0.0)
    # Rank 1 evicts block [6, 8): it loses tokens 6..9, keeps 0..5; rank 2 untouched.
    assert t.evict(list(range(8)), 2, 1) == 4
    assert segs(t) == [(0, 10, [1, 2])]
    assert t.root.children[0].ranks == {1: 6, 2: 10}
    assert t.match(list(range(10))).per_rank == {1: 6, 2: 10}
    assert t.held_tokens(1) == 6
    t.check_invariants()


def test_evict_keeps_other_branch_inside_the_block():
    t = tree()
    t.hold([1, 2, 3, 4, 5, 6], 1, 0.0)
    t.hold([1, 2, 3, 4, 8, 9], 1, 0.0)
    # Block [2, 6) of the first prompt; the second prompt's block [2, 6) differs (other block).
    assert t.evict([1, 2, 3, 4, 5, 6], 4, 1) == 2
    assert t.match([1, 2, 3, 4, 8, 9]).per_rank == {1: 6}
    assert t.match([1, 2, 3, 4, 5, 6]).per_rank == {1: 4}
    t.check_invariants()


def test_evict_unknown_or_different_block_changes_nothing():
    t = tree()
    t.hold([1, 2, 3, 4], 1, 0.0)
    assert t.evict([1, 2, 9, 9], 2, 1) == 0  # differs from the tree's path: another block
    assert t.evict([7, 8], 2, 1) == 0
    assert t.evict([1, 2, 3, 4], 2, 5) == 0  # rank 5 holds nothing
    assert t.match([1, 2, 3, 4]).per_rank == {1: 4}
    with pytest.raises(ValueError):
        t.evict([1, 2], 0, 1)
    t.check_invariants()


def test_clear_rank_drops_everything_of_that_rank_only():
    t = tree()
    t.hold([1, 2, 3], 1, 0.0)
    t.hold([1, 2, 4], 2, 0.0)
    assert t.clear_rank(1) == 3
    assert t.match([1, 2, 3]).per_rank == {2: 2}
    assert t.held_tokens(1) == 0 and t.total_tokens == 4  # nodes stay (unheld) until the cap
    t.check_invariants()


def test_cap_drops_unheld_nodes_oldest_first():
    t = tree(cap=10)
    t.hold([1, 1, 1, 1], 1, 0.0)
    t.hold([2, 2, 2, 2], 1, 1.0)
    t.evict([1, 1, 1, 1], 4, 1)  # first unheld
    t.evict([2, 2, 2, 2], 4, 1)  # then this
    t.hold([3, 3, 3, 3], 2, 2.0)  # 12 > 10: drop the oldest unheld (the [1]s)
    assert t.total_tokens == 8 and t.forgotten_tokens == 0
    assert t.match([1, 1]).length == 0 and t.match([2, 2]).length == 2
    t.check_invariants()


def test_cap_forgets_lru_node_of_the_biggest_holder_when_all_are_held():
    t = tree(cap=10)
    t.hold([1] * 4, 1, 0.0)
    t.hold([2] * 3, 2, 1.0)
    t.hold([3] * 4, 1, 2.0)  # 11 > 10, all held: rank 1 holds most; its LRU node is [1]*4
    assert t.total_tokens == 7 and t.forgotten_tokens == 4
    assert t.match([1]).length == 0
    assert t.held_tokens(1) == 4 and t.held_tokens(2) == 3
    t.check_invariants()


def test_set_capacity_lower_drops_at_once_higher_keeps_everything():
    t = tree(cap=20)
    t.hold([1] * 4, 1, 0.0)
    t.hold([2] * 4, 1, 1.0)
    t.evict([2] * 4, 4, 1)  # unheld: the first to go
    t.hold([3] * 4, 2, 2.0)
    t.set_capacity(100)
    assert t.total_tokens == 12 and t.forgotten_tokens == 0
    t.set_capacity(8)  # drops the unheld [2]s: nothing held is forgotten
    assert t.total_tokens == 8 and t.forgotten_tokens == 0
    assert t.match([2]).length == 0 and t.match([1]).length == 1
    t.set_capacity(4)  # all held: ranks 1 and 2 tie at 4 tokens; the first one's LRU node goes
    assert t.total_tokens == 4 and t.forgotten_tokens == 4
    assert t.match([1]).length == 0 and t.match([3]).length == 1
    with pytest.raises(ValueError, match="capacity_tokens must be > 0, got 0"):
        t.set_capacity(0)
    t.check_invariants()


def test_windowed_hits_slide_and_expire():
    t = tree()
    t.hold([1, 2], 1, 0.0)
    for now in (10.0, 20.0, 30.0):
        t.record_hit(t.match([1, 2]), now)
    node = t.match([1, 2]).path[0]
    assert t.hits(node, 50.0) == 3.0
    # Next window (bucket [100, 200)): at 150 half of the previous bucket still counts.
    assert t.hits(node, 150.0) == pytest.approx(1.5)
    t.record_hit(t.match([1, 2]), 150.0)
    assert t.hits(node, 150.0) == pytest.approx(2.5)
    assert t.hits(node, 350.0) == 0.0


def test_split_copies_hit_counts():
    t = tree()
    t.hold([1, 2, 3, 4], 1, 0.0)
    t.record_hit(t.match([1, 2, 3, 4]), 1.0)
    t.hold([1, 2, 9], 2, 1.0)
    upper, lower = t.match([1, 2, 3, 4]).path
    assert t.hits(upper, 1.0) == 1.0 and t.hits(lower, 1.0) == 1.0


def test_eviction_cost_walks_lru_weighted_by_hits_per_holder():
    t = tree()
    t.hold([1] * 10, 1, 0.0)  # oldest
    t.hold([2] * 10, 1, 1.0)
    t.hold([2] * 10, 2, 1.0)  # [2]s held by two ranks
    t.hold([3] * 10, 1, 2.0)
    for _ in range(4):
        t.record_hit(t.match([1] * 10), 3.0)
        t.record_hit(t.match([2] * 10), 3.0)

    def recompute(tokens, context):  # 1 s per token
        return float(tokens)

    # Need 5 tokens: the oldest node ([1]*10, 4 hits, 1 holder) -> 10 s * 4
    assert t.eviction_cost(1, 5, recompute, 3.0) == 40.0
    # Need 15: also [2]*10 (4 hits shared by 2 holders) -> + 10 * 4 / 2
    assert t.eviction_cost(1, 15, recompute, 3.0) == 60.0
    # The request's own path is in use and never evicted.
    keep = t.match([1] * 10)
    assert t.eviction_cost(1, 5, recompute, 3.0, keep=keep) == 20.0
    assert t.eviction_cost(1, 0, recompute, 3.0) == 0.0
    # A bound stops the walk once the cost exceeds it: the partial cost, never the full one.
    assert t.eviction_cost(1, 15, recompute, 3.0, bound=30.0) == 40.0
    assert t.eviction_cost(1, 15, recompute, 3.0, bound=60.0) == 60.0


def _lcp(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


prompts = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(prompts, st.lists(st.integers(0, 3), max_size=14), st.data())
def test_match_equals_brute_force_longest_common_prefix(stored, query, data):
    t = tree(cap=10_000)
    owners = {}
    for p in stored:
        rank = data.draw(st.integers(1, 3))
        t.hold(p, rank, 0.0)
        owners.setdefault(rank, []).append(p)
    m = t.match(query)
    assert m.length == max(_lcp(p, query) for p in stored)
    expected = {r: max(_lcp(p, query) for p in ps) for r, ps in owners.items()}
    assert m.per_rank == {r: n for r, n in expected.items() if n > 0}
    assert m.cached == max(expected.values())
    t.check_invariants()


@settings(max_examples=200, deadline=None)
@given(prompts, st.data())
def test_random_evictions_keep_invariants_and_drop_the_evicted_block(stored, data):
    t = tree(cap=data.draw(st.integers(4, 60)))
    for p in stored:
        t.hold(p, data.draw(st.integers(1, 3)), 0.0)
        t.check_invariants()
    for _ in range(data.draw(st.integers(0, 10))):
        p = data.draw(st.sampled_from(stored))
        rank = data.draw(st.integers(1, 3))
        if data.draw(st.integers(0, 9)) == 0:
            t.clear_rank(rank)
            t.check_invariants()
            assert t.held_tokens(rank) == 0
            t.hold(p, rank, 0.0)
            t.check_invariants()
            continue
        end = data.draw(st.integers(1, len(p)))
        block = data.draw(st.integers(1, end))
        t.evict(p[:end], block, rank)
        t.check_invariants()
        held = t.match(p).per_rank.get(rank, 0)
        # The rank keeps at most what precedes the block, plus the start of the block where it
        # still holds another block that branches off inside it.
        assert held <= end - block or any(
            held <= _lcp(q, p[:end]) < end and t.match(q).per_rank.get(rank, 0) >= held
            for q in stored
        )


@settings(max_examples=200, deadline=None)
@given(prompts, st.data())
def test_hold_upto_equals_holding_the_cut_prompt(stored, data):
    """``hold(p, upto=k)``, with the match of all of ``p`` or without, is ``hold(p[:k])``."""
    a, b = tree(), tree()
    for p in stored:
        rank = data.draw(st.integers(1, 3))
        upto = data.draw(st.integers(0, len(p)))
        m = a.match(p) if data.draw(st.booleans()) else None
        assert a.hold(p, rank, 0.0, m, upto=upto) == b.hold(p[:upto], rank, 0.0)
        assert segs(a) == segs(b)
        assert a.held_by_rank == b.held_by_rank
        a.check_invariants()


def test_evict_asks_the_per_rank_child_count_for_other_branches():
    t = tree()
    t.hold([1, 2, 3, 4, 5, 6], 1, 0.0)
    t.hold([1, 2, 3, 4, 8, 9], 1, 0.0)
    t.hold([1, 2, 3, 4, 7], 2, 0.0)
    upper = t.root.children[1]
    assert upper.rank_children == {1: 2, 2: 1}
    assert t.root.rank_children == {1: 1, 2: 1}
    # Rank 2's only branch below [1..4] goes, and with it rank 2's count there.
    assert t.evict([1, 2, 3, 4, 7], 1, 2) == 1
    assert upper.rank_children == {1: 2}
    # Rank 1 holds another branch inside the block [3, 6): it keeps [1..4].
    assert t.evict([1, 2, 3, 4, 5, 6], 3, 1) == 2
    assert upper.rank_children == {1: 1}
    t.clear_rank(1)
    assert upper.rank_children is not None and not upper.rank_children
    t.check_invariants()


def _held_prefix(held: set[tuple[int, ...]], query: list[int]) -> int:
    k = 0
    while k < len(query) and tuple(query[: k + 1]) in held:
        k += 1
    return k


@settings(max_examples=300, deadline=None)
@given(prompts, st.data())
def test_holds_and_evictions_match_a_token_level_model(stored, data):
    """Per rank, the tree holds exactly a prefix-closed set of token runs: a hold adds a prompt's
    prefixes; evicting a block drops every run through it, except the shared run above the last
    point inside the block where another run the rank holds branches off."""
    t = tree()
    model: dict[int, set[tuple[int, ...]]] = {r: set() for r in (1, 2, 3)}
    for _ in range(data.draw(st.integers(1, 25))):
        rank = data.draw(st.integers(1, 3))
        p = data.draw(st.sampled_from(stored))
        held = model[rank]
        if not held or data.draw(st.booleans()):
            upto = data.draw(st.integers(1, len(p)))
            new = {tuple(p[:k]) for k in range(1, upto + 1)} - held
            assert t.hold(p, rank, 0.0, upto=upto) == len(new)
            held |= new
        else:
            tokens = list(data.draw(st.sampled_from(sorted(held))))
            block = data.draw(st.integers(1, len(tokens)))
            start = len(tokens) - block
            branches = [
                d for q in held if start < (d := _lcp(q, tokens)) < len(tokens) and len(q) > d
            ]
            keep = max(branches, default=start)
            gone = {q for q in held if len(q) > keep and list(q[: keep + 1]) == tokens[: keep + 1]}
            assert t.evict(tokens, block, rank) == len(gone)
            held -= gone
        t.check_invariants()
        for r, h in model.items():
            assert t.held_tokens(r) == len(h)
            for q in stored:
                assert t.match(q).per_rank.get(r, 0) == _held_prefix(h, q)
