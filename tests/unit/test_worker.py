"""Worker logic (contract C) over a small fake engine: validation, paced admission in Preble's
order, cached-token estimates, timings, abort, LoadStats, CacheReport.

The fake only stands in for speed; the same behaviours run against real vLLM in
tests/e2e/test_engine.py (test_worker_*)."""

from __future__ import annotations

from preble_hpc.config import EngineConfig, LocalSchedulerConfig
from preble_hpc.messages import (
    CacheEvent,
    CacheEventKind,
    CacheReport,
    Finished,
    LoadStats,
    RequestError,
    SamplingSpec,
    Submit,
    TokenDelta,
)
from preble_hpc.worker_rank.engine import EngineLoad, RequestUpdate
from preble_hpc.worker_rank.worker import Worker

BLOCK = 4


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """Runs at most ``max_running`` requests; one output token per step, the first in the step
    that starts a request. Optional vLLM-style timestamps (``ts``: step -> engine time)."""

    block_size = BLOCK
    max_model_len = 64
    kv_capacity_tokens = 1024
    host_kv_tokens = 4096

    def __init__(self, max_running: int = 100, with_timestamps: bool = False) -> None:
        self.max_running = max_running
        self.with_timestamps = with_timestamps
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.waiting: list[tuple[str, list[int], SamplingSpec]] = []
        self.running: dict[str, list] = {}
        self.events: list[CacheEvent] = []
        self.reject: dict[str, Exception] = {}
        self.steps = 0
        self.shut = False

    def validate(self, request_id, prompt_token_ids, spec) -> None:
        if not isinstance(spec, SamplingSpec):
            raise ValueError("sampling must be a SamplingSpec")
        spec.validate()
        if not prompt_token_ids:
            raise ValueError("prompt is empty")
        if len(prompt_token_ids) + spec.max_tokens > self.max_model_len:
            raise ValueError("exceeds max_model_len")

    def add_request(self, request_id, prompt_token_ids, spec) -> None:
        if request_id in self.reject:
            raise self.reject[request_id]
        self.added.append(request_id)
        self.waiting.append((request_id, prompt_token_ids, spec))

    def abort(self, request_id) -> bool:
        self.aborted.append(request_id)
        self.waiting = [w for w in self.waiting if w[0] != request_id]
        return self.running.pop(request_id, None) is not None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[RequestUpdate]:
        self.steps += 1
        while self.waiting and len(self.running) < self.max_running:
            rid, prompt, spec = self.waiting.pop(0)
            self.running[rid] = [prompt, spec, 0, float(self.steps)]
        out = []
        for rid, state in list(self.running.items()):
            prompt, spec, n, started = state
            state[2] = n = n + 1
            done = n >= spec.max_tokens
            update = RequestUpdate(
                rid,
                [n],
                f"t{n}",
                done,
                "length" if done else None,
                len(prompt),
                cached_tokens=len(prompt) // 2,
                completion_tokens=n,
            )
            if self.with_timestamps:
                update.queued_ts, update.scheduled_ts = 0.5, started
                update.first_token_ts = started + 0.25
                update.last_token_ts = float(self.steps) + 0.25
            if done:
                del self.running[rid]
            out.append(update)
        return out

    def load(self) -> EngineLoad:
        return EngineLoad(len(self.running), len(self.waiting), 0.5, 0.25)

    def cache_events(self) -> list[CacheEvent]:
        events, self.events = self.events, []
        return events

    def shutdown(self) -> None:
        self.shut = True


def make_worker(
    engine=None,
    clock=None,
    max_engine_waiting=4,
    num_groups=2,
    quota=1,
    stats_interval_s=1000.0,
    eviction_window_s=5.0,
):
    engine = engine or FakeEngine()
    return Worker(
        EngineConfig(model="fake"),
        LocalSchedulerConfig(
            num_groups=num_groups,
            quota=quota,
            max_engine_waiting=max_engine_waiting,
            eviction_window_s=eviction_window_s,
        ),
        rank=3,
        clock=clock or FakeClock(),
        stats_interval_s=stats_interval_s,
        engine=engine,
    )


def submit(rid, prompt=(1, 2, 3, 4, 5, 6, 7, 8), max_tokens=2, hint=0):
    return Submit(rid, list(prompt), SamplingSpec(max_tokens=max_tokens), cached_hint=hint)


def of(kind, msgs):
    return [m for m in msgs if isinstance(m, kind)]


def run_until_idle(w, limit=100):
    out = []
    for _ in range(limit):
        if not w.has_work():
            return out
        out += w.step()
    raise AssertionError("worker did not finish")


def test_ready_message_reports_engine_limits():
    r = make_worker().ready_message()
    assert (r.rank, r.kv_capacity_tokens, r.block_size, r.max_model_len, r.model) == (
        3,
        1024,
        BLOCK,
        64,
        "fake",
    )
    assert r.host_kv_tokens == 4096


def test_bad_requests_get_request_errors_and_the_worker_keeps_serving():
    w = make_worker()
    bad = [
        Submit("empty", [], SamplingSpec()),
        Submit("long", [1] * 60, SamplingSpec(max_tokens=10)),
        Submit("neg", [1, 2], SamplingSpec(max_tokens=-1)),
        Submit("notspec", [1, 2], {"max_tokens": 2}),  # type: ignore[arg-type]
        "not a submit",
    ]
    for msg in bad:
        [err] = w.submit(msg)  # type: ignore[arg-type]
        assert isinstance(err, RequestError) and err.kind == "invalid_argument" and err.rank == 3
    assert "max_tokens" in w.submit(bad[2])[0].message
    assert not w.has_work()
    assert w.submit(submit("ok")) == []
    assert w.submit(submit("ok"))[0].message == "request 'ok' is already on rank 3"
    done = of(Finished, run_until_idle(w))
    assert [f.request_id for f in done] == ["ok"]


def test_deltas_then_finished_with_token_accounting():
    w = make_worker()
    w.submit(submit("a", max_tokens=3))
    out = run_until_idle(w)
    deltas = of(TokenDelta, out)
    assert [(d.token_ids, d.text) for d in deltas] == [([1], "t1"), ([2], "t2"), ([3], "t3")]
    [f] = of(Finished, out)
    assert (f.finish_reason, f.prompt_tokens, f.cached_tokens, f.completion_tokens) == (
        "length",
        8,
        4,
        3,
    )
    assert out.index(f) > out.index(deltas[-1])


def test_admission_is_paced_by_requests_not_started_in_the_engine():
    engine = FakeEngine(max_running=1)
    w = make_worker(engine, max_engine_waiting=2)
    for i in range(6):
        w.submit(submit(f"r{i}", max_tokens=2))
    w.step()
    assert engine.added == ["r0", "r1"]  # r0 runs, r1 waits inside the engine
    w.step()
    assert engine.added == ["r0", "r1", "r2"]  # one waiting: room for one more
    w.step()
    assert engine.added == ["r0", "r1", "r2"]  # r1 and r2 both waited: no room
    w.step()
    assert engine.added == ["r0", "r1", "r2", "r3"]  # r1 started in the last step
    run_until_idle(w)
    assert engine.added == [f"r{i}" for i in range(6)]


def test_admission_fills_the_engines_next_step_within_its_token_budget_and_slots():
    engine = FakeEngine(max_running=100)
    engine.max_num_batched_tokens = 20  # prompts of 8 tokens: 3 fit (8, 16 < 20, then 24)
    engine.max_num_seqs = 100
    w = make_worker(engine, max_engine_waiting=1)
    for i in range(8):
        w.submit(submit(f"r{i}", max_tokens=5))
    w.step()
    assert engine.added == ["r0", "r1", "r2"]
    w.step()  # all three started: a new step's budget
    assert engine.added == [f"r{i}" for i in range(6)]
    engine.max_num_seqs = 6  # six running: no free slot, only the max_engine_waiting one
    w.step()
    assert engine.added == [f"r{i}" for i in range(7)]


def test_cached_prefix_counts_only_its_uncached_tokens_against_the_budget():
    engine = FakeEngine(max_running=100)
    engine.max_num_batched_tokens = 20
    engine.max_num_seqs = 100
    w = make_worker(engine, max_engine_waiting=1)
    for i in range(8):
        w.submit(submit(f"r{i}", max_tokens=5, hint=6))  # 2 tokens to compute each
    w.step()
    assert len(engine.added) == 8


def test_budget_uses_prefixes_stored_after_submission():
    engine = FakeEngine(max_running=100)
    engine.max_num_batched_tokens = 20
    engine.max_num_seqs = 100
    w = make_worker(engine, max_engine_waiting=1)
    for i in range(8):  # submitted before anything is cached: 8 tokens to compute each
        w.submit(submit(f"r{i}", max_tokens=5))
    # The first step's prefill stores the shared 8-token prompt (its KV event arrives then).
    engine.events = [CacheEvent(CacheEventKind.STORED, (1, 2, 3, 4, 5, 6, 7, 8), block_tokens=8)]
    w.step()
    assert engine.added == ["r0", "r1", "r2"]  # 8 + 8 + 8 tokens: the budget of 20 is full
    w.step()  # the rest cost ~nothing each now, not the 8 estimated when they were submitted
    assert engine.added == [f"r{i}" for i in range(8)]


def test_zero_max_engine_waiting_still_admits_one_at_a_time():
    engine = FakeEngine(max_running=1)
    w = make_worker(engine, max_engine_waiting=0)
    for i in range(3):
        w.submit(submit(f"r{i}"))
    w.step()
    assert engine.added == ["r0"]
    assert len(of(Finished, run_until_idle(w))) == 3


def test_cached_hint_puts_hot_requests_first():
    engine = FakeEngine(max_running=1)
    w = make_worker(engine, max_engine_waiting=1, num_groups=2, quota=1)
    w.submit(submit("cold0"))
    w.submit(submit("cold1"))
    w.submit(submit("hot0", hint=8))
    w.submit(submit("hot1", hint=8))
    run_until_idle(w)
    # rounds: group 1 (quota 2) then group 0 (quota 1)
    assert engine.added == ["hot0", "hot1", "cold0", "cold1"]


def test_mirror_of_stored_prefixes_raises_the_estimate_without_a_hint():
    engine = FakeEngine(max_running=1)
    w = make_worker(engine, max_engine_waiting=1)
    prefix = (9, 9, 9, 9, 8, 8, 8, 8)
    engine.events = [CacheEvent(CacheEventKind.STORED, prefix, block_tokens=8)]
    [report] = of(CacheReport, w.step())
    assert report.rank == 3 and report.events[0].token_ids == prefix
    assert w.mirror.cached_tokens(prefix + (1, 2)) == 8
    w.submit(submit("cold"))
    w.submit(submit("warm", prompt=prefix + (1, 2)))
    run_until_idle(w)
    assert engine.added == ["warm", "cold"]
    engine.events = [CacheEvent(CacheEventKind.EVICTED, prefix[:4], block_tokens=4)]
    w.step()
    assert w.mirror.cached_tokens(prefix) == 0


def _hit_during_a_cold_turn(evict: bool, clock=None) -> list[str]:
    """A hit and four cold prompts; once the cold turn has begun another hit arrives, with or
    without vLLM reporting an eviction just before. Returns the order vLLM got them."""
    engine = FakeEngine(max_running=1)
    # Quotas per round: group 1 (hits) 6, group 0 (cold) 3.
    w = make_worker(engine, clock=clock, max_engine_waiting=1, num_groups=2, quota=3)
    w.submit(submit("hot-early", hint=8, max_tokens=1))
    for i in range(4):
        w.submit(submit(f"cold{i}", max_tokens=1))
    w.step()
    w.step()
    assert engine.added == ["hot-early", "cold0"]
    w.submit(submit("hot", hint=8, max_tokens=1))
    if evict:
        engine.events = [CacheEvent(CacheEventKind.EVICTED, (9, 9, 9, 9), block_tokens=4)]
    run_until_idle(w)
    return engine.added


def test_a_hit_waits_for_the_cold_turn_while_vllm_evicts_nothing():
    order = _hit_during_a_cold_turn(evict=False)
    assert order == ["hot-early", "cold0", "cold1", "cold2", "hot", "cold3"]


def test_after_an_eviction_a_queued_hit_goes_before_the_rest_of_the_cold_turn():
    # The eviction is seen in the step that admits cold1; the next admission takes the hit.
    order = _hit_during_a_cold_turn(evict=True)
    assert order == ["hot-early", "cold0", "cold1", "hot", "cold2", "cold3"]


def test_cache_pressure_lasts_eviction_window_s_after_the_last_eviction():
    clock = FakeClock()
    engine = FakeEngine()
    w = make_worker(engine, clock=clock, eviction_window_s=5.0)
    assert not w.under_cache_pressure()
    engine.events = [CacheEvent(CacheEventKind.STORED, (1, 2, 3, 4), block_tokens=4)]
    w.step()
    assert not w.under_cache_pressure()
    engine.events = [CacheEvent(CacheEventKind.EVICTED, (1, 2, 3, 4), block_tokens=4)]
    w.step()
    clock.now += 4.9
    assert w.under_cache_pressure()
    clock.now += 0.1
    assert not w.under_cache_pressure()
    off = make_worker(FakeEngine(), eviction_window_s=0.0)
    off.engine.events = [CacheEvent(CacheEventKind.EVICTED, (1, 2, 3, 4), block_tokens=4)]
    off.step()
    assert not off.under_cache_pressure()


def test_timings_from_engine_timestamps_and_local_queue():
    clock = FakeClock()
    engine = FakeEngine(max_running=1, with_timestamps=True)
    w = make_worker(engine, clock=clock, max_engine_waiting=1)
    w.submit(submit("a", max_tokens=3))
    w.submit(submit("b", max_tokens=3))
    clock.now = 101.0
    out = []
    while w.has_work():
        out += w.step()
        clock.now += 1.0
    fa, fb = of(Finished, out)
    # a: admitted at 101 (1 s local), engine queued 0.5 -> scheduled at step 1: 0.5 s
    assert fa.queue_s == 1.0 + 0.5
    assert fa.prefill_s == 0.25  # first token 0.25 after scheduling
    assert fa.decode_s_per_token == 1.0  # steps 1 -> 3 for tokens 1 -> 3
    # b: admitted at t=102 once a had started, then queued in the engine until step 4
    assert fb.queue_s == (102.0 - 100.0) + (4.0 - 0.5)
    assert fb.prefill_s == 0.25 and fb.decode_s_per_token == 1.0


def test_timings_fall_back_to_the_worker_clock():
    clock = FakeClock()
    w = make_worker(FakeEngine(), clock=clock)
    w.submit(submit("a", max_tokens=3))
    clock.now = 102.0
    out = []
    while w.has_work():
        out += w.step()
        clock.now += 0.5
    [f] = of(Finished, out)
    assert f.queue_s == 2.0
    assert f.prefill_s == 0.0  # first output in the admitting step (same clock reading)
    assert f.decode_s_per_token == 0.5


def test_abort_queued_running_and_unknown():
    engine = FakeEngine(max_running=1)
    w = make_worker(engine, max_engine_waiting=1)
    w.submit(submit("run", max_tokens=5))
    w.submit(submit("queued"))
    w.step()
    assert engine.added == ["run"]
    [f] = w.abort("queued")
    assert (f.request_id, f.finish_reason, f.completion_tokens) == ("queued", "abort", 0)
    [f] = w.abort("run")
    assert (f.finish_reason, f.completion_tokens) == ("abort", 1)
    assert engine.aborted == ["run"]
    assert w.abort("run") == [] and w.abort("never") == []
    assert not w.has_work()
    assert of(Finished, w.step()) == []
    assert engine.added == ["run"]  # the aborted queued request never entered the engine


def test_engine_rejection_at_admission_becomes_a_request_error():
    engine = FakeEngine()
    engine.reject = {"v": ValueError("vLLM says no"), "x": RuntimeError("boom")}
    w = make_worker(engine)
    for rid in ("v", "x", "ok"):
        w.submit(submit(rid))
    out = run_until_idle(w)
    errors = {e.request_id: e for e in of(RequestError, out)}
    assert errors["v"].kind == "invalid_argument" and "vLLM says no" in errors["v"].message
    assert errors["x"].kind == "internal" and "boom" in errors["x"].traceback
    assert [f.request_id for f in of(Finished, out)] == ["ok"]


def test_load_stats_every_interval():
    clock = FakeClock()
    w = make_worker(
        FakeEngine(max_running=1), clock=clock, stats_interval_s=0.5, max_engine_waiting=1
    )
    for i in range(3):
        w.submit(submit(f"r{i}", max_tokens=4))
    [s] = of(LoadStats, w.step())
    assert (s.rank, s.time, s.running, s.waiting, s.kv_usage, s.local_queue) == (
        3,
        100.0,
        1,
        0,
        0.5,
        2,
    )
    assert s.prefix_cache_hit_rate == 0.25
    clock.now = 100.4
    assert of(LoadStats, w.step()) == []
    clock.now = 100.5
    assert len(of(LoadStats, w.step())) == 1


def test_idle_step_emits_only_due_stats_and_shutdown_reaches_the_engine():
    engine = FakeEngine()
    w = make_worker(engine)
    assert [type(m) for m in w.step()] == [LoadStats]
    assert w.step() == []
    w.shutdown()
    assert engine.shut
