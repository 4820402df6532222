"""Test doubles for the runtime tests: a fake Worker (contract C) and an in-process cluster of
worker threads running the real worker loop (worker_rank.main.run_worker)."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

from preble_hpc.config import EngineConfig, LocalSchedulerConfig, RuntimeConfig, SchedulerConfig
from preble_hpc.messages import (
    CacheEvent,
    CacheEventKind,
    CacheReport,
    Finished,
    LoadStats,
    RequestError,
    Submit,
    TokenDelta,
    WorkerReady,
)
from preble_hpc.rank0_scheduler.main import Rank0Runtime
from preble_hpc.rank0_scheduler.scheduler import GlobalScheduler
from preble_hpc.transport import InProcessTransport
from preble_hpc.worker_rank.main import run_worker

MAX_MODEL_LEN = 256


@dataclass
class FakeBehaviour:
    """What the fake workers do; shared by all fake workers of a cluster."""

    fail_start_ranks: set[int] = field(default_factory=set)
    fail_step_ranks: set[int] = field(default_factory=set)  # raise on the first busy step
    hang_ranks: set[int] = field(default_factory=set)  # block in a busy step until released
    release: threading.Event = field(default_factory=threading.Event)
    step_delay_s: float = 0.0
    max_model_len: dict[int, int] = field(default_factory=dict)
    submits: list[tuple[int, str]] = field(default_factory=list)
    aborts: list[tuple[int, str]] = field(default_factory=list)


class FakeWorker:
    """Emits one token per step per request: token i of a request is ``prompt[-1] + i + 1``."""

    def __init__(
        self, engine_config, local_config, rank, *, stats_interval_s=0.5, behaviour: FakeBehaviour
    ) -> None:
        if rank in behaviour.fail_start_ranks:
            raise RuntimeError(f"fake engine on rank {rank} refuses to start")
        self.rank = rank
        self.b = behaviour
        self.reqs: dict[str, tuple[Submit, int]] = {}
        self.stats_interval_s = stats_interval_s
        self._last_stats = 0.0
        self.closed = False

    def ready_message(self) -> WorkerReady:
        return WorkerReady(
            self.rank,
            kv_capacity_tokens=100_000,
            block_size=4,
            max_model_len=self.b.max_model_len.get(self.rank, MAX_MODEL_LEN),
            model="fake",
        )

    def submit(self, msg: Submit) -> list[object]:
        self.b.submits.append((self.rank, msg.request_id))
        if msg.sampling.max_tokens == 13:  # the "bad request" marker of the tests
            return [RequestError(msg.request_id, self.rank, "13 is unlucky")]
        self.reqs[msg.request_id] = (msg, 0)
        block = tuple(msg.prompt_token_ids[:4])
        return (
            [CacheReport(self.rank, [CacheEvent(CacheEventKind.STORED, block, 4)])]
            if len(block) == 4
            else []
        )

    def abort(self, request_id: str) -> list[object]:
        self.b.aborts.append((self.rank, request_id))
        item = self.reqs.pop(request_id, None)
        if item is None:
            return []
        msg, produced = item
        return [Finished(request_id, self.rank, "abort", len(msg.prompt_token_ids), 0, produced)]

    def step(self) -> list[object]:
        out: list[object] = []
        now = time.monotonic()
        if now - self._last_stats >= self.stats_interval_s:
            self._last_stats = now
            out.append(LoadStats(self.rank, now, len(self.reqs), 0, 0.1))
        if not self.reqs:
            return out
        if self.rank in self.b.fail_step_ranks:
            raise RuntimeError(f"fake engine on rank {self.rank} crashed")
        if self.rank in self.b.hang_ranks:
            self.b.release.wait()
        if self.b.step_delay_s:
            time.sleep(self.b.step_delay_s)
        for rid, (msg, produced) in list(self.reqs.items()):
            tok = msg.prompt_token_ids[-1] + produced + 1
            produced += 1
            out.append(TokenDelta(rid, [tok], f"<{tok}>"))
            if produced >= msg.sampling.max_tokens:
                del self.reqs[rid]
                out.append(
                    Finished(
                        rid,
                        self.rank,
                        "length",
                        len(msg.prompt_token_ids),
                        msg.cached_hint,
                        produced,
                        prefill_s=0.001,
                        decode_s_per_token=0.001,
                    )
                )
            else:
                self.reqs[rid] = (msg, produced)
        return out

    def has_work(self) -> bool:
        return bool(self.reqs)

    def shutdown(self) -> None:
        self.closed = True


class FakeCluster:
    """Rank 0 runtime + ``n`` fake worker threads over InProcessTransport."""

    def __init__(
        self,
        n: int = 2,
        *,
        policy: str = "round_robin",
        max_inflight: int = 64,
        behaviour: FakeBehaviour | None = None,
        start_workers: bool = True,
        silence_timeout_s: float = 600.0,
    ) -> None:
        self.behaviour = behaviour or FakeBehaviour()
        self.transports = InProcessTransport.create(n + 1)
        self.clock_offset = 0.0
        self.scheduler = GlobalScheduler(
            SchedulerConfig(policy=policy),
            list(range(1, n + 1)),
            clock=time.monotonic,
            rng=random.Random(0),
        )
        self.rt = Rank0Runtime(
            self.transports[0],
            self.scheduler,
            RuntimeConfig(
                max_inflight=max_inflight,
                stats_interval_s=0.05,
                worker_silence_timeout_s=silence_timeout_s,
            ),
            clock=self.clock,
        )
        self.exit_codes: dict[int, int] = {}
        self.threads = []
        if start_workers:
            for rank in range(1, n + 1):
                t = threading.Thread(target=self._worker_main, args=(rank,), daemon=True)
                t.start()
                self.threads.append(t)

    def clock(self) -> float:
        return time.monotonic() + self.clock_offset

    def _worker_main(self, rank: int) -> None:
        def factory(engine_config, local_config, rank, *, stats_interval_s):
            return FakeWorker(
                engine_config,
                local_config,
                rank,
                stats_interval_s=stats_interval_s,
                behaviour=self.behaviour,
            )

        self.exit_codes[rank] = run_worker(
            self.transports[rank],
            EngineConfig(model="fake"),
            LocalSchedulerConfig(),
            RuntimeConfig(stats_interval_s=0.05),
            worker_factory=factory,
        )

    def drive(self, until, timeout_s: float = 10.0) -> None:
        """Step the runtime until ``until()`` is true."""
        deadline = time.monotonic() + timeout_s
        while not until():
            if time.monotonic() > deadline:
                raise AssertionError("timed out driving the runtime")
            self.rt.step()

    def close(self) -> None:
        self.rt.shutdown(drain=False, timeout_s=5)
        for t in self.threads:
            t.join(timeout=5)


class Collector:
    """A sink that records what it gets, per request."""

    def __init__(self) -> None:
        self.events: dict[str, list[object]] = {}
        self.finals: dict[str, object] = {}
        self.threads: set[str] = set()

    def __call__(self, event: object) -> None:
        self.threads.add(threading.current_thread().name)
        rid = event.request_id
        self.events.setdefault(rid, []).append(event)
        if not isinstance(event, TokenDelta):
            assert rid not in self.finals, f"second final event for {rid}"
            self.finals[rid] = event
