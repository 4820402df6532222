"""Workload generators: Preble's statistics within tolerance, seeded reproducibility, arrivals,
and Mooncake trace replay."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from preble_hpc.sim.workloads import (
    WORKLOADS,
    Piece,
    SimRequest,
    gamma_arrivals,
    ideal_hit_rate,
    load_trace,
    make_workload,
    piece_tokens,
    poisson_arrivals,
    pooled_lru_hit_rate,
    pooled_oracle_hit_rate,
    prompt_stats,
    spread_ticks,
    workload_names,
)


@pytest.mark.parametrize("name", ["toolbench", "apps", "videoqa", "loogle"])
def test_single_turn_workloads_match_prebles_statistics(name):
    spec = WORKLOADS[name]
    reqs = make_workload(name, 4000, 10.0, seed=1)
    st = prompt_stats(reqs)
    # Few distinct prefixes (24 documents for LooGLE) make the sample mean noisy: 15%.
    assert st["prompt_mean"] == pytest.approx(spec.prompt_mean, rel=0.15)
    assert st["prompt_std"] == pytest.approx(spec.prompt_std, rel=0.35)
    assert st["shared_mean"] == pytest.approx(spec.shared_mean, abs=0.08)
    assert st["distinct_first"] == spec.prefixes
    assert all(spec.output_lo <= r.output_tokens <= spec.output_hi for r in reqs)


def test_alfworld_is_multi_turn_with_growing_shared_history():
    reqs = make_workload("alfworld", 3000, 15.0, seed=1)
    st = prompt_stats(reqs)
    assert st["prompt_mean"] == pytest.approx(WORKLOADS["alfworld"].prompt_mean, rel=0.15)
    assert st["shared_mean"] > 0.9
    # A later turn's prompt is an earlier turn's prompt + its output + a new observation.
    by_out = {r.output_piece.pid: r for r in reqs if r.output_piece is not None}
    follow = [r for r in reqs if len(r.pieces) >= 2 and r.pieces[-2].pid in by_out]
    assert len(follow) > 1000
    r = follow[0]
    prev = by_out[r.pieces[-2].pid]
    assert r.pieces[: len(prev.pieces)] == prev.pieces and prev.arrival < r.arrival
    assert 16 <= statistics.mean(x.output_tokens for x in reqs) <= 36


def test_zipf_variant_concentrates_requests_on_few_prefixes():
    flat = make_workload("loogle", 3000, 6.0, seed=2)
    skew = make_workload("loogle_zipf1.5", 3000, 6.0, seed=2)

    def top_share(reqs):
        c: dict[int, int] = {}
        for r in reqs:
            c[r.pieces[0].pid] = c.get(r.pieces[0].pid, 0) + 1
        return max(c.values()) / len(reqs)

    assert top_share(skew) > 0.3 > top_share(flat)
    assert "mix" in workload_names() and "videoqa_zipf" in workload_names()


@pytest.mark.parametrize("name", ["toolbench", "apps", "videoqa", "loogle"])
def test_zipf_variants_keep_prebles_statistics_on_every_seed(name):
    # The hottest few prefixes take about half the requests; drawn in generation order they set
    # the statistics (videoqa_zipf seed 3 had a hottest "video" sharing 1 token: shared 0.63).
    spec = WORKLOADS[name]
    for seed in range(10):
        st = prompt_stats(make_workload(f"{name}_zipf", 3000, 10.0, seed=seed))
        assert st["prompt_mean"] == pytest.approx(spec.prompt_mean, rel=0.15), seed
        assert st["shared_mean"] == pytest.approx(spec.shared_mean, abs=0.08), seed


def test_generation_is_seeded_and_reproducible():
    a = make_workload("mix", 500, 20.0, seed=3)
    b = make_workload("mix", 500, 20.0, seed=3)
    c = make_workload("mix", 500, 20.0, seed=4)
    assert [r.arrival for r in a] == [r.arrival for r in b]
    assert [r.token_ids() for r in a[:50]] == [r.token_ids() for r in b[:50]]
    assert [r.arrival for r in a] != [r.arrival for r in c]


def test_shared_pieces_are_shared_objects_and_tokens_are_deterministic():
    reqs = make_workload("toolbench", 2000, 12.0, seed=0)
    by_pid: dict[int, Piece] = {}
    for r in reqs:
        assert by_pid.setdefault(r.pieces[0].pid, r.pieces[0]) is r.pieces[0]
    assert piece_tokens(7, 100) == piece_tokens(7, 100)
    assert piece_tokens(7, 70000)[:100] == piece_tokens(7, 100)
    assert piece_tokens(7, 100) != piece_tokens(8, 100)
    assert all(0 <= t < 128_000 for t in piece_tokens(9, 1000))


def test_poisson_and_gamma_arrivals_have_the_requested_rate_and_burstiness():
    rng = random.Random(0)
    t = poisson_arrivals(50.0, 20000, rng)
    assert len(t) / t[-1] == pytest.approx(50.0, rel=0.03)
    gaps = [b - a for a, b in zip(t, t[1:], strict=False)]
    assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.05)
    g = gamma_arrivals(50.0, 20000, rng, cv=3.0)
    assert len(g) / g[-1] == pytest.approx(50.0, rel=0.1)
    gg = [b - a for a, b in zip(g, g[1:], strict=False)]
    assert statistics.pstdev(gg) / statistics.mean(gg) == pytest.approx(3.0, rel=0.15)


def _three_prompts() -> list[SimRequest]:
    """a = p + 10 new; b = p + q (50); c = p + q + 40 new; p is 100 tokens: 110 + 150 + 190."""
    p, q = Piece(1, 100), Piece(2, 50)
    return [
        SimRequest("a", 0.0, (p, Piece(3, 10)), 1, 1),
        SimRequest("b", 1.0, (p, q), 1, 1),
        SimRequest("c", 2.0, (p, q, Piece(4, 40)), 1, 1),
    ]


def test_ideal_hit_rate_counts_every_repeated_token():
    reqs = _three_prompts()
    assert ideal_hit_rate(reqs) == pytest.approx((100 + 150) / (110 + 150 + 190))


def test_trace_replay_blocks_rate_and_quantized_ticks(tmp_path):
    lines = [
        {"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [1, 2, 3]},
        {"timestamp": 0, "input_length": 1024, "output_length": 7, "hash_ids": [1, 2]},
        {"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [1, 4]},
        {"timestamp": 1000, "input_length": 512, "output_length": 2, "hash_ids": [1]},
        {"timestamp": 3000, "input_length": 700, "output_length": 2, "hash_ids": [5, 6]},
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    reqs = load_trace(path)
    assert [r.prompt_tokens for r in reqs] == [1100, 1024, 600, 512, 700]
    assert [r.output_tokens for r in reqs] == [5, 7, 3, 2, 2]
    # Equal hash ids are the same piece; the cut last block is a prefix of no other block.
    assert reqs[0].pieces[0] is reqs[1].pieces[0] is reqs[3].pieces[0]
    assert reqs[0].pieces[1] is reqs[1].pieces[1]
    assert [p.n for p in reqs[0].pieces] == [512, 512, 76]
    assert reqs[0].token_ids()[:1024] == reqs[1].token_ids()
    # Three requests on tick 0 are spread within the tick (1 s), in order; replay starts at 0.
    t = [r.arrival for r in reqs]
    assert t[0] == 0 < t[1] < t[2] < 1.0 and t == sorted(t) and len(set(t)) == 5
    # Rescaled to 10 rps: 5 requests over 0.5 s.
    fast = load_trace(path, rate=10.0)
    assert len(fast) / (fast[-1].arrival - fast[0].arrival) == pytest.approx(10.0)
    assert len(load_trace(path, n=2)) == 2


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"timestamp": 0, "input_length": 9}', "line 2: missing hash_ids"),
        ('{"timestamp": 0, "input_length": 9, "hash_ids": [1]', "line 2: not JSON"),
        ('{"timestamp": "x", "input_length": 9, "hash_ids": [1]}', "line 2: timestamp must be"),
        ('{"timestamp": 0, "input_length": -1, "hash_ids": [1]}', "line 2: input_length must be"),
        ('{"timestamp": 0, "input_length": 9, "hash_ids": ["a"]}', "line 2: hash_ids must be"),
        ("[1, 2]", "line 2: not a JSON object"),
        ('{"timestamp": 0, "input_length": 0, "hash_ids": []}', "line 2: input_length must be >="),
        ('{"timestamp": 0, "input_length": 600, "hash_ids": [1]}', "line 2: 1 hash_ids for"),
        ('{"timestamp": NaN, "input_length": 9, "hash_ids": [1]}', "line 2: timestamp must be"),
        ('{"timestamp": 0, "input_length": 9, "hash_ids": [1]}\udcff', "line 2: not UTF-8"),
    ],
)
def test_trace_lines_that_are_not_requests_are_named_by_line(tmp_path, bad, message):
    good = '{"timestamp": 0, "input_length": 9, "output_length": 1, "hash_ids": [1]}'
    path = tmp_path / "t.jsonl"
    path.write_bytes(f"{good}\n{bad}\n".encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=f"{path} {message}"):
        load_trace(path)
    assert len(load_trace(path, n=1)) == 1  # the first n lines are all that is read


def test_spread_ticks_keeps_distinct_timestamps():
    assert spread_ticks([0.0, 1.0, 2.0], random.Random(0)) == [0.0, 1.0, 2.0]
    s = spread_ticks([0.0, 0.0, 2.0, 2.0], random.Random(0))
    assert 0 <= s[0] <= s[1] < 2.0 <= s[2] <= s[3] < 4.0


def test_pooled_lru_hit_rate_reuses_only_what_still_fits():
    reqs = _three_prompts()
    total = 110 + 150 + 190
    # Room for everything: the ideal.
    assert pooled_lru_hit_rate(reqs, 10_000) == pytest.approx(ideal_hit_rate(reqs))
    # 160 tokens: a and b fit (110 + 50), so c reuses p and q.
    assert pooled_lru_hit_rate(reqs, 160) == pytest.approx((100 + 150) / total)
    # 120 tokens: after b the cache drops a's piece 3, then b's own deepest piece q (the LRU
    # end holds a path's leaves before its root), so c reuses p only.
    assert pooled_lru_hit_rate(reqs, 120) == pytest.approx((100 + 100) / total)
    # Less than one prefix: nothing survives to the next request.
    assert pooled_lru_hit_rate(reqs, 90) == 0.0


def test_the_oracle_keeps_what_is_used_next_where_lru_keeps_what_was_used_last():
    x, y, z = Piece(1, 100), Piece(2, 100), Piece(3, 100)
    cycle = [SimRequest(f"r{i}", float(i), (piece,), 1, 1) for i, piece in enumerate([x, y, z] * 2)]
    # Room for two of three prompts cycling: LRU always drops the one needed next.
    assert pooled_lru_hit_rate(cycle, 200) == 0.0
    # Belady drops z (used furthest ahead) and reuses x and y.
    assert pooled_oracle_hit_rate(cycle, 200) == pytest.approx(200 / 600)
    assert pooled_oracle_hit_rate(cycle, 10_000) == pytest.approx(ideal_hit_rate(cycle))


def test_the_oracle_drops_the_deeper_of_two_pieces_next_used_together():
    reqs = _three_prompts()
    # After b (160 tokens > 120): a's piece 3 is never used again, then p and q are both next
    # used by c; dropping p would leave q unreachable, so q goes and c reuses p.
    assert pooled_oracle_hit_rate(reqs, 120) == pytest.approx((100 + 100) / (110 + 150 + 190))
    assert pooled_oracle_hit_rate(reqs, 150) == pytest.approx(ideal_hit_rate(reqs))
    assert pooled_oracle_hit_rate(reqs, 90) == 0.0


@pytest.mark.parametrize("hit_rate", [pooled_lru_hit_rate, pooled_oracle_hit_rate])
def test_pooled_hit_rates_count_cached_outputs_of_earlier_turns(hit_rate):
    p, out = Piece(1, 100), Piece(9, 20)
    turn1 = SimRequest("t1", 0.0, (p,), 20, 20, output_piece=out)
    turn2 = SimRequest("t2", 1.0, (p, out, Piece(5, 30)), 1, 1)
    assert hit_rate([turn1, turn2], 1000) == pytest.approx(120 / 250)
    # Room for the prompt but not its output: the second turn reuses the prompt only.
    assert hit_rate([turn1, turn2], 110) == pytest.approx(100 / 250)
