"""The engine adapter, KV events and the Worker against real vLLM on CPU (tiny model).

One engine serves the whole module (start ~20 s on 2 cores). Its KV cache is tiny (0.01 GiB:
40 blocks of 128 tokens) so that a few distinct prompts evict. The greedy reference comes from
vLLM's own ``LLM.generate`` in a subprocess started alongside the engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from array import array
from dataclasses import replace

import pytest

from preble_hpc.config import ConfigError, EngineConfig, LocalSchedulerConfig
from preble_hpc.messages import (
    CacheEventKind,
    CacheReport,
    Finished,
    LoadStats,
    RequestError,
    SamplingSpec,
    Submit,
    TokenDelta,
)

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 512
KV_GIB = 0.01
GREEDY_PROMPTS = [
    [(7 * j) % 250 + 3 for j in range(40)],
    [(11 * j + 5) % 250 + 3 for j in range(200)],
    [3, 4, 5],
]
GREEDY_MAX_TOKENS = 24

REFERENCE = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
model, max_len, prompts, max_tokens = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), \
    int(sys.argv[4])
llm = LLM(model=model, enforce_eager=True, dtype="float32", seed=0, max_model_len=max_len,
          enable_prefix_caching=True, kv_cache_memory_bytes=1 << 28)
outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                    SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
print("REFERENCE=" + json.dumps([[list(o.outputs[0].token_ids), o.outputs[0].text]
                                 for o in outs]))
"""


def _prompt(seed: int, n: int) -> list[int]:
    return [(seed * 31 + j * (seed % 7 + 2)) % 250 + 3 for j in range(n)]


@pytest.fixture(scope="module")
def reference_proc(tiny_model):
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            REFERENCE,
            str(tiny_model),
            str(MAX_MODEL_LEN),
            json.dumps(GREEDY_PROMPTS),
            str(GREEDY_MAX_TOKENS),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def engine(tiny_model, reference_proc):
    from preble_hpc.worker_rank.engine import EngineAdapter

    adapter = EngineAdapter(
        EngineConfig(
            model=str(tiny_model),
            dtype="float32",
            max_model_len=MAX_MODEL_LEN,
            kv_cache_gib=KV_GIB,
            enforce_eager=True,
            seed=0,
            max_num_seqs=16,
        )
    )
    yield adapter
    adapter.shutdown()


@pytest.fixture(scope="module")
def reference(reference_proc):
    out, _ = reference_proc.communicate(timeout=600)
    lines = [line for line in out.splitlines() if line.startswith("REFERENCE=")]
    assert reference_proc.returncode == 0 and lines, out[-3000:]
    return json.loads(lines[-1].removeprefix("REFERENCE="))


#: Every prompt this module sent: the engine's cache events may name any of them.
SENT: list[list[int]] = []


def run(engine, requests, timeout_s=120.0):
    """Add (id, prompt, spec) requests and step until all finish: id -> (ids, text, last)."""
    for rid, prompt, spec in requests:
        engine.add_request(rid, prompt, spec)
        SENT.append(list(prompt))
    got: dict[str, list] = {rid: [[], "", None] for rid, _, _ in requests}
    deadline = time.monotonic() + timeout_s
    while any(v[2] is None or not v[2].finished for v in got.values()):
        assert time.monotonic() < deadline, "engine did not finish in time"
        for u in engine.step():
            got[u.request_id][0] += u.token_ids
            got[u.request_id][1] += u.text
            got[u.request_id][2] = u
    return got


def drain_events(engine, until, timeout_s=5.0):
    """Cache events until ``until(events)`` holds (the publisher thread sends asynchronously)."""
    events = []
    deadline = time.monotonic() + timeout_s
    while True:
        events += engine.cache_events()
        if until(events) or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def test_engine_reports_its_limits(engine):
    assert engine.block_size > 0 and engine.max_model_len == MAX_MODEL_LEN
    blocks = engine.kv_capacity_tokens // engine.block_size
    assert engine.kv_capacity_tokens % engine.block_size == 0
    assert 4 <= blocks <= 200, f"{blocks} KV blocks for {KV_GIB} GiB"
    # The bytes per token that size a host tier are those vLLM sized this cache by.
    per_block = engine.block_size * engine.kv_bytes_per_token
    assert blocks * per_block <= KV_GIB * 2**30 < (blocks + 1) * per_block
    assert engine.host_kv_tokens == 0


def test_a_host_tier_is_vllms_offloading_connector_and_the_cpu_build_refuses_it(tiny_model):
    from preble_hpc.worker_rank.engine import EngineAdapter, engine_args
    from preble_hpc.worker_rank.kv_events import KVEventSubscriber

    cfg = EngineConfig(model=str(tiny_model), dtype="float32", max_model_len=MAX_MODEL_LEN)
    cfg = replace(cfg, kv_cache_gib=KV_GIB, enforce_eager=True, kv_offload_gib=1.5)
    events = KVEventSubscriber()
    try:
        transfer = engine_args(cfg, events).create_engine_config().kv_transfer_config
    finally:
        events.close()
    assert transfer.kv_connector == "OffloadingConnector" and transfer.kv_role == "kv_both"
    assert transfer.kv_connector_extra_config == {
        "self_describing_kv_events": True,
        "cpu_bytes_to_use": 1.5 * 2**30,
    }
    # vLLM's CPU build fails deep in its worker process; the adapter says why before it starts.
    with pytest.raises(ConfigError, match="KV offloading needs a CUDA or XPU GPU"):
        EngineAdapter(cfg)


def test_greedy_output_equals_vllm_llm_generate(engine, reference):
    spec = SamplingSpec(max_tokens=GREEDY_MAX_TOKENS)
    # Odd prompts as the array('I') rank 0 sends over MPI, even ones as lists: same outputs.
    prompts = [p if i % 2 == 0 else array("I", p) for i, p in enumerate(GREEDY_PROMPTS)]
    got = run(engine, [(f"g{i}", p, spec) for i, p in enumerate(prompts)])
    for i, (ref_ids, ref_text) in enumerate(reference):
        ids, text, last = got[f"g{i}"]
        assert ids == ref_ids, f"prompt {i}"
        assert text == ref_text, f"prompt {i}"
        assert last.finish_reason in ("stop", "length")
        assert last.completion_tokens == len(ids)
        assert last.prompt_tokens == len(GREEDY_PROMPTS[i])
    assert len(set(map(tuple, (r[0] for r in reference)))) == len(reference)  # not degenerate


def test_shared_prefix_reports_cached_tokens(engine):
    b = engine.block_size
    shared = _prompt(1, 2 * b + 10)
    spec = SamplingSpec(max_tokens=4, ignore_eos=True)
    first = run(engine, [("p0", shared, spec)])["p0"][2]
    second = run(engine, [("p1", shared[: 2 * b] + _prompt(2, 30), spec)])["p1"][2]
    assert first.cached_tokens == 0
    assert second.cached_tokens == 2 * b
    assert second.prompt_tokens == 2 * b + 30


def test_stored_and_evicted_prefixes_are_reported_as_tokens(engine):
    b = engine.block_size
    capacity_blocks = engine.kv_capacity_tokens // b
    n_blocks = (MAX_MODEL_LEN - 16) // b
    prompts = {
        f"e{i}": _prompt(100 + i, n_blocks * b + 5) for i in range(capacity_blocks // n_blocks + 4)
    }
    spec = SamplingSpec(max_tokens=2, ignore_eos=True)
    for rid, p in prompts.items():  # one by one: each fills the cache further
        run(engine, [(rid, p, spec)])
    events = drain_events(engine, lambda ev: any(e.kind is CacheEventKind.EVICTED for e in ev))
    kinds = {e.kind for e in events}
    assert CacheEventKind.UNMAPPED not in kinds, [e.detail for e in events if e.detail]
    stored = [e for e in events if e.kind is CacheEventKind.STORED]
    evicted = [e for e in events if e.kind is CacheEventKind.EVICTED]
    assert evicted, (
        f"a cache of {capacity_blocks} blocks did not evict after {len(prompts)} prompts "
        f"of {n_blocks} blocks"
    )

    def is_block_prefix_of_a_prompt(e, candidates):
        n = len(e.token_ids)
        return n % b == 0 and any(list(e.token_ids) == p[:n] for p in candidates)

    assert all(is_block_prefix_of_a_prompt(e, SENT) for e in stored + evicted)
    assert {
        len(e.token_ids) for e in stored if is_block_prefix_of_a_prompt(e, prompts.values())
    } == {n_blocks * b}
    assert all(e.block_tokens == b for e in evicted)
    # the first prompt's blocks were evicted to make room for the later ones
    first = prompts["e0"]
    assert any(list(e.token_ids) == first[: len(e.token_ids)] for e in evicted)


def test_abort_frees_the_request_and_its_kv(engine):
    b = engine.block_size
    engine.add_request("long", _prompt(7, 3 * b), SamplingSpec(max_tokens=100, ignore_eos=True))
    SENT.append(_prompt(7, 3 * b))
    for _ in range(3):
        engine.step()
    during = engine.load()
    assert during.running == 1 and during.kv_usage > 0
    assert engine.abort("long") is True
    assert engine.abort("long") is False
    assert not engine.has_unfinished() and engine.num_requests() == 0
    idle = engine.load()  # no step since the abort: vLLM's own snapshot still shows "long"
    assert (idle.running, idle.waiting, idle.kv_usage) == (0, 0, 0.0)
    engine.add_request("short", _prompt(8, 5), SamplingSpec(max_tokens=3, ignore_eos=True))
    SENT.append(_prompt(8, 5))
    for _ in range(1000):
        if any(u.request_id == "short" for u in engine.step()):
            break
    after = engine.load()
    assert after.running == 1  # only "short": the aborted one left vLLM
    assert after.kv_usage < during.kv_usage
    while engine.has_unfinished():
        assert all(u.request_id == "short" for u in engine.step())


@pytest.mark.parametrize(
    ("prompt", "spec", "message"),
    [
        ([], SamplingSpec(), "prompt is empty"),
        ([5] * MAX_MODEL_LEN, SamplingSpec(), "max_model_len is 512"),
        ([5] * 500, SamplingSpec(max_tokens=20), "lower max_tokens to at most 12"),
        ([5, 6], SamplingSpec(max_tokens=-1), "max_tokens must be an integer >= 1"),
        ([5, 6], SamplingSpec(temperature=-1.0), "temperature must be >= 0"),
        ([5, 6], SamplingSpec(top_p=0.0), "top_p must be in (0, 1]"),
        ([5, 100_000], SamplingSpec(), "prompt token 100000 is not a token id"),
        ([5, "x"], SamplingSpec(), "prompt token 'x' is not a token id"),
        ([5, 6], {"max_tokens": 4, "frobnicate": 1}, "sampling must be a SamplingSpec"),
        ("hello", SamplingSpec(), "prompt_token_ids must be a list"),
    ],
)
def test_bad_request_gets_a_clear_error_and_the_engine_keeps_serving(engine, prompt, spec, message):
    with pytest.raises(ValueError) as err:
        engine.add_request("bad", prompt, spec)
    assert message in str(err.value)
    assert engine.num_requests() == 0
    ok = run(engine, [("after-bad", GREEDY_PROMPTS[2], SamplingSpec(max_tokens=3))])
    assert len(ok["after-bad"][0]) >= 1


def test_unknown_sampling_field_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"unknown sampling field\(s\) \['frobnicate'\]"):
        SamplingSpec.from_dict({"max_tokens": 4, "frobnicate": 1})


def test_duplicate_running_id_is_rejected(engine):
    engine.add_request("dup", [5, 6, 7], SamplingSpec(max_tokens=2))
    with pytest.raises(ValueError, match="already running"):
        engine.add_request("dup", [5, 6, 7], SamplingSpec(max_tokens=2))
    while engine.has_unfinished():
        engine.step()


def test_worker_serves_requests_through_real_vllm(engine, tiny_model):
    from preble_hpc.worker_rank.worker import Worker

    b = engine.block_size
    w = Worker(
        EngineConfig(model=str(tiny_model)),
        LocalSchedulerConfig(max_engine_waiting=2),
        rank=1,
        stats_interval_s=0.0,
        engine=engine,
    )
    ready = w.ready_message()
    assert (ready.rank, ready.block_size, ready.max_model_len) == (1, b, MAX_MODEL_LEN)
    assert ready.kv_capacity_tokens == engine.kv_capacity_tokens
    shared = _prompt(300, 2 * b)
    spec = SamplingSpec(max_tokens=6, ignore_eos=True)
    prompts = {"w0": shared + _prompt(301, 20)}
    assert w.submit(Submit("w0", prompts["w0"], spec)) == []
    out = []
    while w.has_work():  # w0 first alone, so its prefix is cached for the others
        out += w.step()
    for i in range(1, 5):
        prompts[f"w{i}"] = shared + _prompt(301 + i, 20)
        assert w.submit(Submit(f"w{i}", prompts[f"w{i}"], spec)) == []
    [err] = w.submit(Submit("wbad", [5] * MAX_MODEL_LEN, spec))
    assert isinstance(err, RequestError) and "max_model_len" in err.message
    assert w.submit(Submit("wabort", _prompt(400, 50), SamplingSpec(max_tokens=200))) == []
    [aborted] = w.abort("wabort")
    assert aborted.finish_reason == "abort"
    deadline = time.monotonic() + 120
    while w.has_work():
        assert time.monotonic() < deadline
        out += w.step()
    out += drain_worker(
        w,
        lambda msgs: any(
            isinstance(m, CacheReport) and any(list(e.token_ids) == shared for e in m.events)
            for m in msgs
        ),
    )

    finished = {m.request_id: m for m in out if isinstance(m, Finished)}
    assert set(finished) == set(prompts)
    deltas: dict[str, list[int]] = {}
    for m in out:
        if isinstance(m, TokenDelta):
            deltas.setdefault(m.request_id, []).extend(m.token_ids)
    for rid, f in finished.items():
        assert f.rank == 1 and f.finish_reason == "length"
        assert f.prompt_tokens == len(prompts[rid]) and f.completion_tokens == 6
        assert len(deltas[rid]) == 6
        assert f.queue_s >= 0 and f.prefill_s > 0 and f.decode_s_per_token > 0
    assert finished["w0"].cached_tokens == 0
    assert all(finished[f"w{i}"].cached_tokens == 2 * b for i in range(1, 5))
    stats = [m for m in out if isinstance(m, LoadStats)]
    assert stats and all(s.rank == 1 and 0 <= s.kv_usage <= 1 for s in stats)
    assert max(s.running for s in stats) >= 1
    reports = [m for m in out if isinstance(m, CacheReport)]
    stored = [e for r in reports for e in r.events if e.kind is CacheEventKind.STORED]
    assert any(list(e.token_ids) == shared for e in stored)
    assert w.mirror.cached_tokens(shared + [9]) == 2 * b


def drain_worker(w, until, timeout_s=5.0):
    msgs: list[object] = []
    deadline = time.monotonic() + timeout_s
    while not until(msgs) and time.monotonic() < deadline:
        msgs += w.step()
        time.sleep(0.05)
    return msgs


class _OneAtATime:
    """The module's engine with no token budget for the worker's pacing, so that it admits one
    request at a time; records the order vLLM gets requests."""

    max_num_batched_tokens = None

    def __init__(self, engine) -> None:
        self._engine = engine
        self.added: list[str] = []

    def add_request(self, request_id, prompt_token_ids, spec) -> None:
        self.added.append(request_id)
        self._engine.add_request(request_id, prompt_token_ids, spec)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def _order_of_a_hit_during_a_cold_turn(engine, tiny_model, eviction_window_s, seed):
    """Make vLLM evict (distinct prompts, one by one), then queue a hit and four cold prompts
    and send another hit once the cold turn has begun: the order vLLM got the six."""
    from preble_hpc.worker_rank.local_scheduler import LocalScheduler
    from preble_hpc.worker_rank.worker import Worker

    paced = _OneAtATime(engine)
    w = Worker(
        EngineConfig(model=str(tiny_model)),
        LocalSchedulerConfig(
            num_groups=2, quota=3, max_engine_waiting=1, eviction_window_s=eviction_window_s
        ),
        rank=1,
        engine=paced,
    )
    spec = SamplingSpec(max_tokens=2, ignore_eos=True)
    n = (MAX_MODEL_LEN - 16) // engine.block_size * engine.block_size + 5
    evicted = False
    for i in range(engine.kv_capacity_tokens // n + 8):
        SENT.append(_prompt(seed + i, n))
        w.submit(Submit(f"fill{seed + i}", SENT[-1], spec))
        msgs = []
        while w.has_work():
            msgs += w.step()
        msgs += drain_worker(w, lambda m: False, timeout_s=0.3)
        if any(e.kind is CacheEventKind.EVICTED for r in of_reports(msgs) for e in r.events):
            evicted = True
            break
    assert evicted, "vLLM did not evict: the scenario needs a full cache"
    assert w.under_cache_pressure() == (eviction_window_s > 0)
    w.local = LocalScheduler(w.local_config)  # the scenario starts a round, whatever fill left

    def send(rid: str, k: int, hot: bool) -> None:
        SENT.append(_prompt(seed + 500 + k, 40))
        w.submit(Submit(rid, SENT[-1], spec, cached_hint=40 if hot else 0))

    send("hot-early", 0, True)
    for i in range(4):
        send(f"cold{i}", 1 + i, False)
    while "cold0" not in paced.added:
        w.step()
    send("hot", 9, True)
    while w.has_work():
        w.step()
    return [rid for rid in paced.added if not rid.startswith("fill")]


def of_reports(msgs):
    return [m for m in msgs if isinstance(m, CacheReport)]


def test_worker_puts_a_queued_hit_first_while_real_vllm_evicts(engine, tiny_model):
    # Quotas per round: group 1 (hits) 6, group 0 (cold) 3.
    calm = _order_of_a_hit_during_a_cold_turn(engine, tiny_model, 0.0, seed=600)
    assert calm == ["hot-early", "cold0", "cold1", "cold2", "hot", "cold3"]
    evicting = _order_of_a_hit_during_a_cold_turn(engine, tiny_model, 600.0, seed=700)
    assert evicting == ["hot-early", "cold0", "hot", "cold1", "cold2", "cold3"]


def test_subscriber_replays_batches_the_sub_socket_missed():
    """vLLM's own publisher and msgspec types; a batch dropped by PUB/SUB (as vLLM's very first
    one is) comes back through the replay socket, and a batch gone for good is reported."""
    import zmq
    from vllm.distributed.kv_events import (
        AllBlocksCleared,
        BlockRemoved,
        BlockStored,
        KVEventBatch,
        ZmqEventPublisher,
    )

    from preble_hpc.worker_rank.kv_events import KVEventSubscriber

    sub = KVEventSubscriber()
    pub = ZmqEventPublisher(0, endpoint=sub.endpoint, replay_endpoint=sub.replay_endpoint)

    def stored(hashes, parent, tokens):
        return BlockStored(
            block_hashes=hashes,
            parent_block_hash=parent,
            token_ids=tokens,
            block_size=2,
            lora_id=None,
            medium="GPU",
            lora_name=None,
        )

    def publish(*events):
        pub.publish(KVEventBatch(ts=time.time(), events=list(events)))

    def drain_until(n_events):
        got = []
        deadline = time.monotonic() + 10
        while len(got) < n_events and time.monotonic() < deadline:
            got += sub.drain()
            time.sleep(0.02)
        return got

    try:
        publish(stored([b"a"], None, [1, 2]))
        first = drain_until(1)
        # unsubscribe, so the publisher drops the next batch, then subscribe again
        sub._sock.setsockopt(zmq.UNSUBSCRIBE, b"")
        time.sleep(0.3)
        publish(stored([b"b", b"c"], b"a", [3, 4, 5, 6]))
        time.sleep(0.3)
        sub._sock.setsockopt(zmq.SUBSCRIBE, b"")
        time.sleep(0.3)
        publish(BlockRemoved(block_hashes=[b"c"], medium="GPU"))
        rest = drain_until(2)
        next(pub._seq_gen)  # a batch number that was never sent: lost for good
        publish(AllBlocksCleared())
        lost = drain_until(2)
    finally:
        pub.shutdown()
        sub.close()
    got = [(e.kind, e.token_ids) for e in first + rest]
    assert got[0] == (CacheEventKind.STORED, (1, 2))
    assert got[1:] == [
        (CacheEventKind.STORED, (1, 2, 3, 4, 5, 6)),
        (CacheEventKind.EVICTED, (1, 2, 3, 4, 5, 6)),
    ]
    assert sub.replayed >= 1
    assert [e.kind for e in lost] == [CacheEventKind.UNMAPPED, CacheEventKind.CLEARED]
    assert "lost KV event batches 3..3" in lost[0].detail
