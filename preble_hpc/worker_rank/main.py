"""The worker ranks' loop around ``Worker``: receive, step, send results.

::

    start Worker (vLLM) -> WorkerReady to rank 0   (or WorkerFailed with the traceback)
    loop: poll rank 0     Submit -> worker.submit, Abort -> worker.abort, Shutdown -> stop
          worker.step()   TokenDelta / Finished / RequestError / CacheReport / LoadStats -> rank 0
          flush           (one batched MPI message per step)
    Shutdown: drain (or abort) what runs, worker.shutdown(), WorkerStopped to rank 0

Any exception becomes ``WorkerFailed`` (message, traceback, the request ids it held); the rank
then waits for rank 0's ``Shutdown`` so the MPI job ends in order instead of aborting. A worker
always exits 0 once rank 0 has stopped it: rank 0 owns the job's exit code, and a rank exiting
non-zero makes mpiexec kill the others before rank 0 has written its results.

Fault injection for tests: ``PREBLE_INJECT_FAULT=RANK:startup`` fails that rank's engine start,
``PREBLE_INJECT_FAULT=RANK:submit:N`` raises when that rank receives its N-th request.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from preble_hpc.config import EngineConfig, LocalSchedulerConfig, RuntimeConfig
from preble_hpc.messages import (
    Abort,
    Finished,
    RequestError,
    Shutdown,
    Submit,
    WorkerFailed,
    WorkerStopped,
)
from preble_hpc.worker_rank.cpu_binding import worker_cores

if TYPE_CHECKING:
    from preble_hpc.transport import Transport

log = logging.getLogger("preble_hpc.worker")

FAULT_ENV = "PREBLE_INJECT_FAULT"
#: Longest wait in one idle poll; LoadStats still leave every stats_interval_s (step() sends them).
_IDLE_POLL_S = 0.05

WorkerFactory = Callable[..., Any]


class InjectedFault(RuntimeError):
    """Raised on purpose by ``PREBLE_INJECT_FAULT`` (tests of failure handling)."""


class _FaultPlan:
    def __init__(self, rank: int, spec: str) -> None:
        self.at_startup = False
        self.at_submit: int | None = None
        self.at_shutdown = False
        self._submits = 0
        parts = spec.split(":") if spec else []
        if not parts or parts[0] != str(rank):
            return
        if parts[1:] == ["startup"]:
            self.at_startup = True
        elif len(parts) == 3 and parts[1] == "submit" and parts[2].isdigit():
            self.at_submit = int(parts[2])
        elif parts[1:] == ["shutdown"]:
            self.at_shutdown = True
        else:
            raise ValueError(
                f"{FAULT_ENV}={spec!r}: use RANK:startup, RANK:submit:N or RANK:shutdown"
            )

    def check_startup(self) -> None:
        if self.at_startup:
            raise InjectedFault(f"injected fault at engine start ({FAULT_ENV})")

    def check_shutdown(self) -> None:
        """Never return: a rank stuck in its engine's shutdown (seen with vLLM on a loaded CPU)."""
        if self.at_shutdown:
            log.warning("rank stuck at shutdown on purpose (%s)", FAULT_ENV)
            threading.Event().wait()

    def check_submit(self) -> None:
        self._submits += 1
        if self.at_submit is not None and self._submits >= self.at_submit:
            raise InjectedFault(f"injected fault at request #{self._submits} ({FAULT_ENV})")


def _default_factory() -> WorkerFactory:
    from preble_hpc.worker_rank.worker import Worker

    return Worker


def run_worker(
    transport: Transport,
    engine_config: EngineConfig,
    local_config: LocalSchedulerConfig,
    runtime_config: RuntimeConfig,
    *,
    worker_factory: WorkerFactory | None = None,
) -> int:
    """Serve rank 0 until it sends ``Shutdown``; returns the process exit code (0)."""
    rank = transport.rank
    try:
        faults = _FaultPlan(rank, os.environ.get(FAULT_ENV, ""))
        faults.check_startup()
        factory = worker_factory or _default_factory()
        cores = worker_cores(rank, transport.node_peers)
        if cores is not None and engine_config.cpu_cores is None:
            engine_config = dataclasses.replace(engine_config, cpu_cores=cores)
        worker = factory(
            engine_config, local_config, rank, stats_interval_s=runtime_config.stats_interval_s
        )
    except Exception as exc:
        log.exception("rank %d: engine failed to start", rank)
        transport.send(
            0,
            WorkerFailed(
                rank, f"engine failed to start: {type(exc).__name__}: {exc}", traceback.format_exc()
            ),
        )
        transport.flush()
        return _wait_for_shutdown(transport)
    transport.send(0, worker.ready_message())
    transport.flush()
    return _WorkerLoop(transport, worker, faults).run()


class _WorkerLoop:
    def __init__(self, transport: Transport, worker: Any, faults: _FaultPlan) -> None:
        self.transport = transport
        self.worker = worker
        self.faults = faults
        self.rank = transport.rank
        self.inflight: set[str] = set()  # ids received and not yet finished
        self.shutdown: Shutdown | None = None
        self._handlers: dict[type, Callable[[Any], list[object]]] = {
            Submit: self._on_submit,
            Abort: self._on_abort,
            Shutdown: self._on_shutdown,
        }

    def run(self) -> int:
        try:
            while not self._done():
                busy = self.worker.has_work()
                for _, msg in self.transport.poll(0.0 if busy else _IDLE_POLL_S):
                    handler = self._handlers.get(type(msg))
                    if handler is None:
                        log.warning("rank %d: unexpected %s ignored", self.rank, type(msg).__name__)
                        continue
                    self._emit(handler(msg))
                self._emit(self.worker.step())
                self.transport.flush()
            self.worker.shutdown()
        except Exception as exc:
            log.exception("rank %d: worker failed", self.rank)
            self.transport.send(
                0,
                WorkerFailed(
                    self.rank,
                    f"{type(exc).__name__}: {exc}",
                    traceback.format_exc(),
                    request_ids=sorted(self.inflight),
                ),
            )
            self.transport.flush()
            self._close_worker()
            if self.shutdown is None:
                return _wait_for_shutdown(self.transport, self.faults)
        self.transport.send(0, WorkerStopped(self.rank))
        self.transport.close()
        return 0

    def _done(self) -> bool:
        if self.shutdown is None:
            return False
        return not self.shutdown.drain or not self.worker.has_work()

    def _on_submit(self, msg: Submit) -> list[object]:
        self.inflight.add(msg.request_id)
        self.faults.check_submit()
        return self.worker.submit(msg)

    def _on_abort(self, msg: Abort) -> list[object]:
        return self.worker.abort(msg.request_id)

    def _on_shutdown(self, msg: Shutdown) -> list[object]:
        self.faults.check_shutdown()
        self.shutdown = msg
        if msg.drain:
            return []
        out: list[object] = []
        for rid in sorted(self.inflight):
            out.extend(self.worker.abort(rid))
        return out

    def _emit(self, messages: list[object]) -> None:
        for m in messages:
            if isinstance(m, (Finished, RequestError)):
                self.inflight.discard(m.request_id)
            self.transport.send(0, m)

    def _close_worker(self) -> None:
        try:
            self.worker.shutdown()
        except Exception:
            log.exception("rank %d: engine shutdown after a failure also failed", self.rank)


def _wait_for_shutdown(transport: Transport, faults: _FaultPlan | None = None) -> int:
    """After a failure: ignore everything until rank 0 says ``Shutdown``, then confirm it."""
    while not any(isinstance(msg, Shutdown) for _, msg in transport.poll(_IDLE_POLL_S)):
        pass
    if faults is not None:
        faults.check_shutdown()
    transport.send(0, WorkerStopped(transport.rank))
    transport.close()
    return 0
