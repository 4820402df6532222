"""Rank0Runtime + the worker loop over InProcessTransport, with fake workers (no MPI, no vLLM)."""

from __future__ import annotations

import gc
import threading
import time

import pytest
from fakes_runtime import MAX_MODEL_LEN, Collector, FakeBehaviour, FakeCluster

from preble_hpc.config import ConfigError, RuntimeConfig
from preble_hpc.messages import Finished, RequestError, SamplingSpec, TokenDelta
from preble_hpc.rank0_scheduler.main import ClientRequest, FinalEvent, StartupError, tune_gc
from preble_hpc.worker_rank.main import FAULT_ENV, InjectedFault, _FaultPlan


def req(
    rid: str, n_prompt: int = 8, max_tokens: int = 3, deadline: float | None = None, first: int = 10
) -> ClientRequest:
    return ClientRequest(
        rid, list(range(first, first + n_prompt)), SamplingSpec(max_tokens=max_tokens), deadline
    )


@pytest.fixture
def cluster():
    c = FakeCluster(2)
    c.rt.wait_ready(5)
    yield c
    c.close()


def test_handshake_reports_every_worker_and_the_smallest_max_model_len():
    c = FakeCluster(3, behaviour=FakeBehaviour(max_model_len={2: 100}))
    try:
        ready = c.rt.wait_ready(5)
        assert sorted(ready) == [1, 2, 3]
        assert c.rt.max_model_len == 100
        assert c.rt.live_ranks == [1, 2, 3]
    finally:
        c.close()
    assert c.exit_codes == {1: 0, 2: 0, 3: 0}


def test_a_request_streams_deltas_then_one_final_event_with_rank_decision_latency(cluster):
    sink = Collector()
    cluster.rt.submit(req("a", max_tokens=3, first=10), sink)
    cluster.drive(lambda: "a" in sink.finals)
    events = sink.events["a"]
    assert [type(e) for e in events] == [TokenDelta, TokenDelta, TokenDelta, FinalEvent]
    final = events[-1]
    assert final.ok and isinstance(final.finished, Finished) and final.error is None
    assert final.rank in (1, 2)
    assert final.decision == "baseline"  # round robin is a baseline policy
    assert final.latency_s > 0 and final.ttft_s is not None and final.ttft_s <= final.latency_s
    assert final.token_ids == [18, 19, 20]
    assert final.text == "<18><19><20>"
    assert final.result.completion_tokens == 3
    assert sink.threads == {threading.current_thread().name}  # sinks run on the loop thread
    assert cluster.rt.inflight == 0


def test_stream_false_gives_only_the_final_event_with_the_whole_output(cluster):
    sink = Collector()
    cluster.rt.submit(req("a", max_tokens=4), sink, stream=False)
    cluster.drive(lambda: "a" in sink.finals)
    assert len(sink.events["a"]) == 1
    assert len(sink.finals["a"].token_ids) == 4


def test_round_robin_spreads_requests_and_stats_count_them(cluster):
    sink = Collector()
    for i in range(6):
        cluster.rt.submit(req(f"r{i}"), sink)
    cluster.drive(lambda: len(sink.finals) == 6)
    ranks = sorted(sink.finals[f"r{i}"].rank for i in range(6))
    assert ranks == [1, 1, 1, 2, 2, 2]
    stats = cluster.rt.stats()
    assert stats["runtime"]["finished"] == 6
    assert stats["runtime"]["per_rank"]["1"]["finished"] == 3
    assert stats["runtime"]["per_rank"]["2"]["completion_tokens"] == 9
    assert stats["policy"] == "round_robin"  # the scheduler's own stats are merged in


def test_full_inflight_limit_answers_resource_exhausted_and_has_room_tells_batch_to_wait():
    c = FakeCluster(2, max_inflight=2, behaviour=FakeBehaviour(step_delay_s=0.001))
    try:
        c.rt.wait_ready(5)
        sink = Collector()
        c.rt.submit(req("a", max_tokens=50), sink)
        c.rt.submit(req("b", max_tokens=50), sink)
        assert not c.rt.has_room()
        c.rt.submit(req("c"), sink)
        c.drive(lambda: "c" in sink.finals)
        err = sink.finals["c"].error
        assert err is not None and err.kind == "resource_exhausted"
        assert "max_inflight" in err.message
        c.drive(lambda: len(sink.finals) == 3)
        assert c.rt.has_room() and c.rt.inflight == 0
    finally:
        c.close()


def test_abort_cancels_and_tells_the_worker():
    behaviour = FakeBehaviour(step_delay_s=0.002)
    c = FakeCluster(2, behaviour=behaviour)
    try:
        c.rt.wait_ready(5)
        sink = Collector()
        c.rt.submit(req("slow", max_tokens=10_000), sink)
        c.drive(lambda: len(sink.events.get("slow", [])) >= 2)
        c.rt.abort("slow")
        c.drive(lambda: "slow" in sink.finals)
        err = sink.finals["slow"].error
        assert err.kind == "cancelled"
        c.drive(lambda: any(rid == "slow" for _, rid in behaviour.aborts))
        c.rt.abort("unknown-id")  # harmless
        c.rt.step()
        assert c.rt.inflight == 0
    finally:
        c.close()


def test_deadline_aborts_with_deadline_exceeded():
    behaviour = FakeBehaviour(step_delay_s=0.002)
    c = FakeCluster(2, behaviour=behaviour)
    try:
        c.rt.wait_ready(5)
        sink = Collector()
        c.rt.submit(req("late", max_tokens=10_000, deadline=c.clock() + 0.1), sink)
        c.rt.submit(req("already", deadline=c.clock() - 1), sink)
        c.drive(lambda: len(sink.finals) == 2)
        assert sink.finals["late"].error.kind == "deadline_exceeded"
        assert sink.finals["late"].latency_s >= 0.1
        assert sink.finals["already"].error.kind == "deadline_exceeded"
        assert sink.finals["already"].rank is None  # never placed
        c.drive(lambda: any(rid == "late" for _, rid in behaviour.aborts))
    finally:
        c.close()


def test_bad_requests_fail_alone(cluster):
    sink = Collector()
    cluster.rt.submit(req("long", n_prompt=MAX_MODEL_LEN), sink)
    cluster.rt.submit(ClientRequest("empty", [], SamplingSpec()), sink)
    cluster.rt.submit(req("unlucky", max_tokens=13), sink)  # the worker rejects it
    cluster.rt.submit(ClientRequest("negative", [5, -1], SamplingSpec()), sink)
    cluster.rt.submit(req("fine"), sink)
    cluster.drive(lambda: len(sink.finals) == 5)
    assert sink.finals["long"].error.kind == "invalid_argument"
    assert "max_model_len" in sink.finals["long"].error.message
    assert sink.finals["empty"].error.kind == "invalid_argument"
    unlucky = sink.finals["unlucky"]
    assert unlucky.error.message == "13 is unlucky" and unlucky.rank in (1, 2)
    negative = sink.finals["negative"].error
    assert negative.kind == "invalid_argument" and "token ids must be ints" in negative.message
    assert sink.finals["fine"].ok
    assert cluster.rt.stats()["runtime"]["errors_by_kind"]["invalid_argument"] == 4


def test_duplicate_live_id_is_rejected_and_the_first_runs_on(cluster):
    first, second = Collector(), Collector()
    cluster.rt.submit(req("dup", max_tokens=20), first)
    cluster.rt.submit(req("dup"), second)
    cluster.drive(lambda: "dup" in first.finals and "dup" in second.finals)
    assert second.finals["dup"].error.kind == "invalid_argument"
    assert first.finals["dup"].ok


def test_a_raising_sink_does_not_stop_the_loop(cluster):
    def bad_sink(event):
        raise ValueError("boom")

    good = Collector()
    cluster.rt.submit(req("x"), bad_sink)
    cluster.rt.submit(req("y"), good)
    cluster.drive(lambda: "y" in good.finals and cluster.rt.inflight == 0)
    assert cluster.rt.stats()["runtime"]["sink_errors"] >= 1


def test_submit_is_thread_safe():
    cluster = FakeCluster(2, max_inflight=100)
    cluster.rt.wait_ready(5)
    sink = Collector()
    lock = threading.Lock()

    def safe_sink(event):
        with lock:
            sink(event)

    def client(k: int) -> None:
        for i in range(20):
            cluster.rt.submit(req(f"t{k}-{i}", max_tokens=2), safe_sink)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    cluster.drive(lambda: len(sink.finals) == 80 and all(not t.is_alive() for t in threads))
    assert all(f.ok for f in sink.finals.values())
    cluster.close()


def test_worker_exception_becomes_worker_failed_and_its_requests_are_rerouted():
    behaviour = FakeBehaviour()
    c = FakeCluster(2, behaviour=behaviour)
    try:
        c.rt.wait_ready(5)
        behaviour.fail_step_ranks.add(2)
        sink = Collector()
        for i in range(4):
            c.rt.submit(req(f"r{i}"), sink, stream=False)
        c.drive(lambda: len(sink.finals) == 4)
        assert all(f.ok for f in sink.finals.values())
        assert {f.rank for f in sink.finals.values()} == {1}
        moved = [f for f in sink.finals.values() if f.rerouted_from]
        assert moved and all(f.rerouted_from == (2,) for f in moved)
        assert c.rt.live_ranks == [1]
        why = c.rt.failed_ranks[2]
        assert "fake engine on rank 2 crashed" in why and "Traceback" in why
        stats = c.rt.stats()
        assert stats["runtime"]["rerouted"] == len(moved)
        assert stats["removed_ranks"] == [2]
        # new work goes to the survivor only
        c.rt.submit(req("after"), sink)
        c.drive(lambda: "after" in sink.finals)
        assert sink.finals["after"].rank == 1
    finally:
        c.close()
    assert c.exit_codes == {1: 0, 2: 0}  # the failed worker still stopped in order


def test_a_streamed_request_on_a_failed_worker_fails_with_unavailable():
    behaviour = FakeBehaviour(step_delay_s=0.002)
    c = FakeCluster(1, behaviour=behaviour)
    try:
        c.rt.wait_ready(5)
        sink = Collector()
        c.rt.submit(req("s", max_tokens=10_000), sink)
        c.drive(lambda: len(sink.events.get("s", [])) >= 1)
        behaviour.fail_step_ranks.add(1)
        c.drive(lambda: "s" in sink.finals)
        err = sink.finals["s"].error
        assert err.kind == "unavailable"
        assert "worker rank 1 failed" in err.message and "no live worker rank left" in err.message
        c.rt.submit(req("t"), sink)
        c.drive(lambda: "t" in sink.finals)
        assert sink.finals["t"].error.kind == "unavailable"
    finally:
        c.close()


def test_a_silent_busy_worker_is_treated_as_failed_and_rank0_does_not_hang():
    behaviour = FakeBehaviour(hang_ranks={2})
    c = FakeCluster(2, behaviour=behaviour, silence_timeout_s=0.3)
    try:
        c.rt.wait_ready(5)
        sink = Collector()
        for i in range(4):
            c.rt.submit(req(f"h{i}"), sink, stream=False)
        c.drive(lambda: len(sink.finals) == 4)
        assert all(f.ok and f.rank == 1 for f in sink.finals.values())
        assert "no message for" in c.rt.failed_ranks[2]
        assert not c.rt.shutdown(drain=False, timeout_s=0.3)  # the stuck rank never confirms
        # The job's own shutdown follows the batch loop's: it must still see the stuck rank, or
        # rank 0 would finalize MPI and wait for it forever instead of aborting the job.
        t0 = time.monotonic()
        assert not c.rt.shutdown(drain=False, timeout_s=30)
        assert time.monotonic() - t0 < 1  # past the first call's deadline: no second wait
    finally:
        behaviour.release.set()
        for t in c.threads:
            t.join(5)


def test_startup_failure_is_a_clear_error_and_workers_still_stop():
    c = FakeCluster(2, behaviour=FakeBehaviour(fail_start_ranks={2}))
    with pytest.raises(StartupError, match=r"worker rank 2 failed to start: .*refuses to start"):
        c.rt.wait_ready(5)
    assert c.rt.shutdown(drain=False, timeout_s=5)
    for t in c.threads:
        t.join(5)
    assert c.exit_codes == {1: 0, 2: 0}


def test_stop_during_startup_interrupts_the_handshake():
    c = FakeCluster(2, start_workers=False)
    stop = threading.Event()
    stop.set()
    with pytest.raises(StartupError, match="interrupted"):
        c.rt.wait_ready(60, stop=stop)


def test_startup_timeout_names_the_missing_ranks():
    c = FakeCluster(2, start_workers=False)
    t0 = time.monotonic()
    with pytest.raises(StartupError, match=r"rank\(s\) \[1, 2\] did not report ready within"):
        c.rt.wait_ready(0.2)
    assert time.monotonic() - t0 < 2
    assert not c.rt.shutdown(drain=False, timeout_s=0.1)  # nobody answers: reported, no hang


def test_drain_shutdown_finishes_inflight_requests():
    c = FakeCluster(2, behaviour=FakeBehaviour(step_delay_s=0.001))
    c.rt.wait_ready(5)
    sink = Collector()
    for i in range(4):
        c.rt.submit(req(f"d{i}", max_tokens=30), sink)
    c.rt.step()
    assert c.rt.shutdown(drain=True, timeout_s=10)
    assert len(sink.finals) == 4 and all(f.ok for f in sink.finals.values())
    for t in c.threads:
        t.join(5)
    assert c.exit_codes == {1: 0, 2: 0}
    late = Collector()
    c.rt.submit(req("late"), late)  # after shutdown: answered at once
    assert late.finals["late"].error.kind == "unavailable"


def test_non_drain_shutdown_fails_inflight_requests_with_unavailable():
    c = FakeCluster(2, behaviour=FakeBehaviour(step_delay_s=0.001))
    c.rt.wait_ready(5)
    sink = Collector()
    c.rt.submit(req("x", max_tokens=10_000), sink)
    c.drive(lambda: len(sink.events.get("x", [])) >= 1)
    assert c.rt.shutdown(drain=False, timeout_s=5)
    assert sink.finals["x"].error.kind == "unavailable"


def test_e2_exploits_a_shared_prefix():
    c = FakeCluster(2, policy="e2")
    try:
        c.rt.wait_ready(5)
        sink = Collector()
        shared = list(range(3, 150))
        for i in range(6):
            c.rt.submit(
                ClientRequest(f"p{i}", shared + [200 + i], SamplingSpec(max_tokens=2)), sink
            )
        c.drive(lambda: len(sink.finals) == 6)
        decisions = [sink.finals[f"p{i}"].decision for i in range(6)]
        assert decisions[0] == "explore"  # nobody held the prefix yet
        assert decisions.count("exploit") >= 4  # the rest reuse it (E2 may rebalance one)
    finally:
        c.close()


def test_fault_plan_parsing(monkeypatch):
    assert not _FaultPlan(1, "").at_startup
    assert _FaultPlan(2, "2:startup").at_startup
    assert not _FaultPlan(1, "2:startup").at_startup
    plan = _FaultPlan(3, "3:submit:2")
    plan.check_submit()
    with pytest.raises(InjectedFault, match=FAULT_ENV):
        plan.check_submit()
    assert _FaultPlan(2, "2:shutdown").at_shutdown and not _FaultPlan(1, "2:shutdown").at_shutdown
    _FaultPlan(1, "2:shutdown").check_shutdown()  # not this rank: returns
    with pytest.raises(ValueError, match="RANK:startup, RANK:submit:N or RANK:shutdown"):
        _FaultPlan(1, "1:bogus")


def test_injected_startup_fault_via_env(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "1:startup")
    c = FakeCluster(1)
    with pytest.raises(StartupError, match="injected fault at engine start"):
        c.rt.wait_ready(5)
    assert c.rt.shutdown(drain=False, timeout_s=5)


def test_request_error_message_types_are_data():
    e = RequestError("x", 1, "m")
    assert e.kind == "invalid_argument" and e.traceback == ""


def test_tune_gc_freezes_the_startup_heap_and_raises_the_young_threshold():
    before = gc.get_threshold()
    try:
        tune_gc(0)
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0
        tune_gc(12_345)
        assert gc.get_threshold() == (12_345, *before[1:])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_a_negative_gc_threshold_is_a_config_error():
    with pytest.raises(ConfigError, match="gc_gen0_threshold must be >= 0"):
        RuntimeConfig(gc_gen0_threshold=-1)
