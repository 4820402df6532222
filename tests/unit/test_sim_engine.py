"""Simulated engine: block cache (reuse, LRU eviction at block granularity, events) and the exact
step-time formulas of batching and chunked prefill."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from preble_hpc.config import ConfigError, LocalSchedulerConfig, SimConfig
from preble_hpc.messages import CacheEventKind
from preble_hpc.sim.engine import BlockCache, SimEngine, SimSeq
from preble_hpc.sim.workloads import Piece, SimRequest

CFG = SimConfig(
    gpus=1,
    kv_capacity_tokens=16 * 4000,
    block_size=16,
    max_num_batched_tokens=8192,
    step_base_s=0.01,
    prefill_per_token_s=1e-5,
    prefill_attention_s=1e-9,
    decode_per_seq_s=1e-4,
    decode_per_kv_token_s=1e-7,
)


def req(rid: str, pieces, out: int, arrival: float = 0.0, output_piece=None) -> SimRequest:
    return SimRequest(rid, arrival, tuple(pieces), out, out, output_piece=output_piece)


def run(engine: SimEngine, arrivals: list[SimRequest]):
    """Drive one engine like the cluster does: arrivals, step ends, cuts. Returns
    {request_id: (t_first, t_finish, Finished)} and every cache event."""
    pending = sorted(arrivals, key=lambda r: r.arrival)
    out: dict = {}
    events: list = []
    now = 0.0
    end = None
    while pending or engine.has_work():
        t_arr = pending[0].arrival if pending else math.inf
        if end is None and not pending:
            end = engine.plan(now, events)
            assert end is not None, "engine has work but plans nothing"
        if end is not None and end < t_arr:
            now = end
            res = engine.complete(now)
            events += res.events
            for s, fin in res.finished:
                out[s.req.request_id] = (s.t_first, now, fin)
            end = engine.plan(now, events)
            continue
        now = t_arr
        while pending and pending[0].arrival == now:  # simultaneous arrivals join one step
            r = pending.pop(0)
            engine.add(SimSeq(r, r.token_ids(), now))
        if end is None:
            end = engine.plan(now, events)
        else:
            cut = engine.cut(now)
            if cut is not None:
                end = cut
    return out, events


def prefill_s(n: int, ctx: int = 0, b: int = 0, kv: int = 0) -> float:
    t = CFG.step_base_s + CFG.prefill_per_token_s * n + CFG.prefill_attention_s * n * (ctx + n / 2)
    if b:
        t += CFG.decode_per_seq_s * b + CFG.decode_per_kv_token_s * kv
    return t


def decode_s(b: int, kv: int) -> float:
    return CFG.step_base_s + CFG.decode_per_seq_s * b + CFG.decode_per_kv_token_s * kv


# ---------------------------------------------------------------- block cache


def test_blocks_belong_to_the_piece_holding_their_last_token():
    cache = BlockCache(100, 16)
    a, b = Piece(1, 40), Piece(2, 30)  # tokens 0..40 | 40..70 -> blocks 0,1 | 2,3 (4 partial)
    path, added = cache.insert((a, b), now=1.0)
    assert added == 4 and [n.count for n in path] == [2, 2] and cache.blocks == 4
    assert cache.match((a, b)) == (path, 4)
    _, hit = cache.match((a, Piece(3, 30)))
    assert hit == 2  # block 2 straddles a|b: it is b's, so another suffix cannot reuse it


def test_lru_eviction_takes_tail_blocks_of_the_oldest_leaf_and_reports_them():
    cache = BlockCache(100, 16)
    shared, x, y = Piece(1, 32), Piece(2, 64), Piece(3, 64)
    cache.insert((shared, x), now=1.0)
    cache.insert((shared, y), now=2.0)
    events: list = []
    assert cache.evict(3, now=3.0, events=events) == 3
    # x is older: its last 3 of 4 blocks go; y and the shared prefix stay.
    assert cache.match((shared, x))[1] == 2 + 1
    assert cache.match((shared, y))[1] == 2 + 4
    (ev,) = events
    assert ev.kind is CacheEventKind.EVICTED and ev.block_tokens == 16
    prompt = shared.tokens() + x.tokens()
    assert list(ev.token_ids) == list(prompt[: 4 * 16])  # through block 3, the first one evicted
    # Evicting x's last block removes the node; then the shared node is a leaf older than y.
    events.clear()
    assert cache.evict(1, 4.0, events) == 1
    assert cache.match((shared, x))[1] == 2
    assert cache.evict(4, 5.0, events) == 4  # y (its leaf) goes before its parent
    assert cache.match((shared, y))[1] == 2
    assert cache.blocks == 2


def test_evicting_a_whole_chain_reports_one_event_at_its_first_block():
    cache = BlockCache(100, 16)
    shared, x, y = Piece(1, 32), Piece(2, 64), Piece(3, 64)
    cache.insert((shared, x), now=1.0)
    cache.insert((Piece(4, 32), y), now=2.0)
    events: list = []
    assert cache.evict(5, now=3.0, events=events) == 5  # x (4 blocks), then block 1 of shared
    assert cache.match((shared, x))[1] == 1
    (ev,) = events  # x's own event is covered by its parent's
    assert list(ev.token_ids) == list(shared.tokens()[:32]) and ev.block_tokens == 16
    events.clear()
    assert cache.evict(1, now=4.0, events=events) == 1
    (ev,) = events
    assert list(ev.token_ids) == list(shared.tokens()[:16])
    assert cache.match((Piece(4, 32), y))[1] == 6  # the other chain is untouched


def test_pinned_nodes_are_never_evicted():
    cache = BlockCache(100, 16)
    p = Piece(1, 64)
    path, _ = cache.insert((p,), 1.0)
    cache.pin(path, 2.0)
    assert cache.evict(4, 3.0, []) == 0
    cache.unpin(path)
    assert cache.evict(4, 3.0, []) == 4


# ---------------------------------------------------------------- timing


def test_single_request_prefill_then_decode_timings_are_exact():
    eng = SimEngine(0, CFG, LocalSchedulerConfig())
    r = req("a", [Piece(1, 1000)], out=5)
    out, events = run(eng, [r])
    t_first, t_end, fin = out["a"]
    assert t_first == pytest.approx(prefill_s(1000))
    # 4 more tokens, one sequence, its context 1001, 1002, ...
    dec = sum(decode_s(1, 1001 + i) for i in range(4))
    assert t_end == pytest.approx(t_first + dec)
    assert fin.prompt_tokens == 1000 and fin.cached_tokens == 0 and fin.completion_tokens == 5
    assert fin.queue_s == 0 and fin.prefill_s == pytest.approx(prefill_s(1000))
    assert fin.decode_s_per_token == pytest.approx(dec / 4)
    stored = [e for e in events if e.kind is CacheEventKind.STORED]
    assert len(stored) == 1 and len(stored[0].token_ids) == 992  # 62 whole blocks


def test_chunked_prefill_splits_a_long_prompt_by_the_token_budget():
    eng = SimEngine(0, CFG, LocalSchedulerConfig())
    out, _ = run(eng, [req("a", [Piece(1, 20000)], out=1)])
    t_first, t_end, _ = out["a"]
    expect = prefill_s(8192, 0) + prefill_s(8192, 8192) + prefill_s(3616, 16384)
    assert t_first == pytest.approx(expect) and t_end == t_first


def test_prefix_reuse_skips_cached_blocks_and_attends_to_them():
    eng = SimEngine(0, CFG, LocalSchedulerConfig())
    doc = Piece(1, 1000)
    a = req("a", [doc, Piece(2, 100, keep=False)], out=1)
    b = req("b", [doc, Piece(3, 100, keep=False)], out=1, arrival=10.0)
    out, _ = run(eng, [a, b])
    fin = out["b"][2]
    assert fin.cached_tokens == 992  # the doc's 62 whole blocks
    assert fin.prefill_s == pytest.approx(prefill_s(1100 - 992, 992))
    assert eng.hit_tokens == 992 and eng.prompt_tokens == 2200


def test_a_prefill_in_progress_shares_its_computed_blocks():
    # vLLM caches a prompt's blocks as its chunks are scheduled, so a request with the same
    # prefix admitted mid-prefill reuses what is computed instead of computing a second copy.
    eng = SimEngine(0, CFG, LocalSchedulerConfig())
    doc = Piece(1, 20000)
    a = req("a", [doc], out=1)
    b = req("b", [doc, Piece(2, 100, keep=False)], out=1, arrival=0.001)
    out, events = run(eng, [a, b])
    # b waits while a's backlog fills the budget; it is admitted for the third step, after a has
    # computed two chunks (16384 tokens = 1024 blocks), and computes only the rest (3716).
    fin = out["b"][2]
    assert fin.cached_tokens == 16384
    third = (
        CFG.step_base_s
        + CFG.prefill_per_token_s * (3616 + 3716)
        + CFG.prefill_attention_s * (3616 * (16384 + 1808) + 3716 * (16384 + 1858))
    )
    t_first = prefill_s(8192, 0) + prefill_s(8192, 8192) + third
    assert out["a"][0] == pytest.approx(t_first) and out["b"][0] == pytest.approx(t_first)
    # One copy of the document: a's 1250 blocks plus b's 6 of its own, nothing left reserved.
    assert eng.cache.blocks == 1256 and eng.private == 0
    stored = [len(e.token_ids) for e in events if e.kind is CacheEventKind.STORED]
    assert stored == [20000, 20096]


def test_continuous_batching_decodes_running_sequences_in_one_step():
    eng = SimEngine(0, CFG, LocalSchedulerConfig())
    a = req("a", [Piece(1, 100)], out=3)
    b = req("b", [Piece(2, 100)], out=3)
    out, _ = run(eng, [a, b])
    # Both are admitted into the first step: one prefill step of 200 tokens (two chunks).
    pairs = 100 * 50 + 100 * 50
    first = CFG.step_base_s + CFG.prefill_per_token_s * 200 + CFG.prefill_attention_s * pairs
    assert out["a"][0] == pytest.approx(first) and out["b"][0] == pytest.approx(first)
    dec = decode_s(2, 202) + decode_s(2, 204)
    assert out["a"][1] == pytest.approx(first + dec) and out["b"][1] == out["a"][1]


def test_an_arrival_cuts_a_decode_run_at_the_next_step_boundary():
    eng = SimEngine(0, CFG, LocalSchedulerConfig())
    a = req("a", [Piece(1, 100)], out=50)
    t_first = prefill_s(100)
    # b arrives in the middle of a's 3rd decode step; it joins the 4th step.
    t3 = t_first + sum(decode_s(1, 101 + i) for i in range(3))
    b = req("b", [Piece(2, 16)], out=1, arrival=t3 - 0.001)
    out, _ = run(eng, [a, b])
    assert out["b"][0] == pytest.approx(t3 + prefill_s(16, 0, 1, 104))
    # a still finishes exactly after its 49 decode steps (one of them mixed with b's prefill).
    steps = [decode_s(1, 101 + i) for i in range(49)]
    steps[3] = prefill_s(16, 0, 1, 104)
    assert out["a"][1] == pytest.approx(t_first + sum(steps))


def test_requests_wait_for_kv_memory_and_evict_lru_prefixes():
    cfg = SimConfig(gpus=1, kv_capacity_tokens=16 * 100, block_size=16)
    eng = SimEngine(0, cfg, LocalSchedulerConfig())
    big = [req(f"r{i}", [Piece(i + 1, 16 * 60)], out=16 * 20, arrival=0.0) for i in range(2)]
    out, events = run(eng, big)
    assert set(out) == {"r0", "r1"}
    # r1 (80 blocks) cannot run beside r0 (80 blocks) in 100: it starts when r0 ends...
    assert out["r1"][2].queue_s == pytest.approx(out["r0"][1])
    # ...after evicting 40 of the 60 blocks of r0's cached prompt (r1 needs 80 of 100).
    ev = [e for e in events if e.kind is CacheEventKind.EVICTED]
    assert len(ev) == 1 and eng.cache.evicted_blocks == 40
    assert eng.cache.blocks == 20 + 60 and eng.private == 0


def test_a_request_larger_than_the_cache_is_rejected():
    cfg = SimConfig(gpus=1, kv_capacity_tokens=160, block_size=16)
    eng = SimEngine(0, cfg, LocalSchedulerConfig())
    with pytest.raises(ValueError, match="kv_capacity_tokens"):
        eng.add(SimSeq(req("a", [Piece(1, 200)], out=1), None, 0.0))


def test_multi_turn_output_is_cached_for_the_next_turn():
    eng = SimEngine(0, CFG, LocalSchedulerConfig())
    ctx, out1 = Piece(1, 100), Piece(2, 40)
    t1 = req("t1", [ctx], out=40, output_piece=out1)
    t2 = req("t2", [ctx, out1, Piece(3, 30)], out=1, arrival=100.0)
    out, _ = run(eng, [t1, t2])
    assert out["t2"][2].cached_tokens == 128  # (100 + 40) // 16 whole blocks


# ---------------------------------------------------------------- host-memory tier

HOST = replace(
    CFG, kv_capacity_tokens=16 * 100, host_kv_tokens=16 * 300, host_load_per_token_s=1e-3
)


def _evict_doc_from_the_gpu(cfg: SimConfig = HOST) -> tuple[Piece, list[SimRequest]]:
    """r0 caches a 60-block document; r1 then reserves 81 blocks (its prompt's 80 and one for its
    output token) and pushes 41 of them off the 100-block GPU."""
    doc = Piece(1, 960)
    return doc, [req("r0", [doc], out=1), req("r1", [Piece(2, 1280)], out=1, arrival=10.0)]


def test_a_prefix_the_gpu_evicted_loads_from_the_host_tier():
    eng = SimEngine(0, HOST, LocalSchedulerConfig())
    doc, first = _evict_doc_from_the_gpu()
    r2 = req("r2", [doc, Piece(3, 160, keep=False)], out=1, arrival=20.0)
    out, events = run(eng, [*first, r2])
    # The GPU kept the document's first 19 blocks (304 tokens); the host has all 60 and loads
    # the other 656 tokens over the link before the 160 new ones are computed.
    fin = out["r2"][2]
    assert fin.cached_tokens == 960 and eng.host_hit_tokens == 656
    ready = 20.0 + 656 * 1e-3
    assert out["r2"][0] == pytest.approx(ready + prefill_s(160, 960))
    assert fin.prefill_s == pytest.approx(ready - 20.0 + prefill_s(160, 960))
    # The GPU's evictions are not the rank's: the host tier still holds those blocks.
    assert eng.cache.evicted_blocks > 0
    assert not [e for e in events if e.kind is CacheEventKind.EVICTED]


def test_an_arrival_is_computed_while_another_request_loads():
    eng = SimEngine(0, HOST, LocalSchedulerConfig())
    doc, first = _evict_doc_from_the_gpu()
    r2 = req("r2", [doc, Piece(3, 160, keep=False)], out=1, arrival=20.0)
    r3 = req("r3", [Piece(9, 160)], out=1, arrival=20.1)  # mid-load: the GPU is free
    out, _ = run(eng, [*first, r2, r3])
    assert out["r3"][0] == pytest.approx(20.1 + prefill_s(160))
    assert out["r2"][0] == pytest.approx(20.0 + 656 * 1e-3 + prefill_s(160, 960))


def test_a_decode_run_ends_at_the_step_where_a_load_ends():
    eng = SimEngine(0, HOST, LocalSchedulerConfig())
    doc, first = _evict_doc_from_the_gpu()
    r2 = req("r2", [doc, Piece(3, 160, keep=False)], out=1, arrival=20.0)
    long = req("long", [Piece(4, 16)], out=400, arrival=20.001)
    out, _ = run(eng, [*first, long, r2])
    # r2 joins the first step after its load, not the end of long's 400-step decode run.
    ready = 20.0 + 656 * 1e-3
    assert ready < out["r2"][0] < ready + decode_s(1, 500) + prefill_s(160, 960, 1, 500)
    assert out["long"][1] > out["r2"][0] + 3.0


def test_the_host_tiers_own_evictions_leave_the_rank():
    cfg = replace(HOST, host_kv_tokens=16 * 100)  # as large as the GPU: it evicts as often
    eng = SimEngine(0, cfg, LocalSchedulerConfig())
    _, first = _evict_doc_from_the_gpu(cfg)
    _, events = run(eng, first)
    # r1's 80 cached blocks push 40 of the document's 60 out of the host too: blocks 20.. go.
    ev = [e for e in events if e.kind is CacheEventKind.EVICTED]
    assert [len(e.token_ids) for e in ev] == [21 * 16]
    assert eng.host is not None and eng.host.blocks == 100 and eng.host.evicted_blocks == 40


def test_a_host_tier_smaller_than_the_gpu_is_refused():
    with pytest.raises(ConfigError, match="host_kv_tokens must be 0"):
        replace(CFG, host_kv_tokens=16)
    with pytest.raises(ConfigError, match="host_load_per_token_s must be >= 0"):
        replace(HOST, host_load_per_token_s=-1.0)
