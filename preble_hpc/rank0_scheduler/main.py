"""Rank 0's event loop: requests in, scheduling decisions out, results relayed back.

One thread (the loop) owns the scheduler, the transport and every request's state; other threads
(gRPC handlers) only put commands on a queue with ``submit`` / ``abort``. Each loop ``step``::

    commands (submit/abort)  ->  scheduler.schedule  ->  Submit to the chosen rank
    transport.poll           ->  handler per message type (table below)
                                   TokenDelta        -> sink, scheduler.on_first_token
                                   Finished/RequestError -> FinalEvent to sink, scheduler
                                   CacheReport/LoadStats -> scheduler
                                   WorkerFailed      -> drop the rank, re-route/fail its requests
    deadlines                ->  Abort + RequestError(deadline_exceeded)
    transport.flush

A sink sees, on the loop thread, ``TokenDelta``* then exactly one ``FinalEvent``. Errors are data
(``RequestError.kind``): ``invalid_argument``, ``resource_exhausted`` (in-flight limit full),
``deadline_exceeded``, ``cancelled`` (``abort``), ``unavailable`` (no live worker, shutdown, or the
worker died after streaming part of the answer), ``internal``.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import logging
import queue
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from preble_hpc.config import RuntimeConfig
from preble_hpc.messages import (
    Abort,
    CacheReport,
    Finished,
    LoadStats,
    RequestError,
    SamplingSpec,
    Shutdown,
    Submit,
    TokenDelta,
    WorkerFailed,
    WorkerReady,
    WorkerStopped,
)
from preble_hpc.rank0_scheduler.radix_tree import as_tokens

if TYPE_CHECKING:
    from preble_hpc.rank0_scheduler.policy import Decision
    from preble_hpc.rank0_scheduler.scheduler import GlobalScheduler
    from preble_hpc.transport import Transport

log = logging.getLogger("preble_hpc.rank0")

Sink = Callable[[object], None]


class StartupError(RuntimeError):
    """A worker failed to start, or did not report ready in time."""


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """One request as rank 0 receives it (already tokenized)."""

    request_id: str
    token_ids: list[int]
    sampling: SamplingSpec
    #: Absolute time on the runtime's clock after which the request is aborted with
    #: ``deadline_exceeded``; None: no deadline.
    deadline: float | None = None


@dataclass(frozen=True, slots=True)
class FinalEvent:
    """The last event a sink receives for a request: the worker's ``Finished`` or a
    ``RequestError`` (from a worker or from rank 0), with what rank 0 knows about it."""

    request_id: str
    result: Finished | RequestError
    #: Rank that ran (or last ran) the request; None if it was never placed.
    rank: int | None
    #: The scheduler's decision kind ("exploit", "explore", ...); None if never placed.
    decision: str | None
    #: The scheduler's reason for the decision ("" if never placed).
    reason: str
    #: Seconds from ``submit`` to this event, on the runtime's clock.
    latency_s: float
    #: Seconds from ``submit`` to the first token; None if no token came.
    ttft_s: float | None
    #: All output so far, concatenated from the deltas (complete for a ``Finished``).
    text: str
    token_ids: list[int]
    #: Ranks that failed while holding this request before it was re-routed.
    rerouted_from: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        return isinstance(self.result, Finished)

    @property
    def finished(self) -> Finished | None:
        return self.result if isinstance(self.result, Finished) else None

    @property
    def error(self) -> RequestError | None:
        return self.result if isinstance(self.result, RequestError) else None


@dataclass(slots=True)
class _Live:
    """Rank 0's state of one request between submit and its final event."""

    req: ClientRequest
    sink: Sink
    arrival: float
    stream: bool
    rank: int | None = None
    decision: Decision | None = None
    first_token_at: float | None = None
    streamed: bool = False  # a delta reached the sink: re-running elsewhere would repeat output
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    rerouted_from: list[int] = field(default_factory=list)
    #: The prompt in the radix tree's token type, converted on the submitting thread so the loop
    #: thread's decision does not pay for it; None: not convertible (the scheduler says why).
    tokens: array | None = None


@dataclass(slots=True)
class _RankCounters:
    submitted: int = 0
    finished: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


class Rank0Runtime:
    """Rank 0 side of the job: see the module docstring. Use from one loop thread, except
    ``submit``, ``abort``, ``has_room`` and ``inflight``, which any thread may call."""

    def __init__(
        self,
        transport: Transport,
        scheduler: GlobalScheduler,
        runtime_config: RuntimeConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._transport = transport
        self._scheduler = scheduler
        self._config = runtime_config
        self._clock = clock
        self._worker_ranks = list(range(1, transport.size))
        self._ready: dict[int, WorkerReady] = {}
        self._dead: dict[int, str] = {}  # rank -> why
        self._stopped: set[int] = set()
        self._last_heard: dict[int, float] = {}
        self._next_silence_check = 0.0
        self._live: dict[str, _Live] = {}
        self._by_rank: dict[int, set[str]] = {r: set() for r in self._worker_ranks}
        self._deadlines: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._slots_lock = threading.Lock()
        self._admitted = 0  # requests holding an in-flight slot (queued or live)
        self._closed = False
        self._stop_deadline = 0.0  # set by the first shutdown call
        self._counts: dict[str, int] = {
            "submitted": 0,
            "finished": 0,
            "rejected": 0,
            "rerouted": 0,
            "late_messages": 0,
            "sink_errors": 0,
        }
        self._errors_by_kind: dict[str, int] = {}
        self._per_rank = {r: _RankCounters() for r in self._worker_ranks}
        self._handlers: dict[type, Callable[[int, Any], None]] = {
            TokenDelta: self._on_token_delta,
            Finished: self._on_finished,
            RequestError: self._on_request_error,
            CacheReport: self._on_cache_report,
            LoadStats: self._on_load_stats,
            WorkerReady: self._on_worker_ready,
            WorkerFailed: self._on_worker_failed,
            WorkerStopped: self._on_worker_stopped,
        }

    # ------------------------------------------------------------------ any thread

    def submit(self, req: ClientRequest, sink: Sink, *, stream: bool = True) -> None:
        """Queue ``req``; ``sink`` later gets ``TokenDelta``* (only if ``stream``) and one
        ``FinalEvent``, on the loop thread. When the in-flight limit is full the final event is
        ``RequestError(kind="resource_exhausted")``; callers that prefer to wait (batch) check
        ``has_room()`` first. Thread-safe."""
        arrival = self._clock()
        try:
            tokens: array | None = as_tokens(req.token_ids)
        except ValueError:
            tokens = None  # schedule() rejects the raw ids with the reason (invalid_argument)
        with self._slots_lock:  # against shutdown: a command is queued before it closes or never
            closed = self._closed
            if not closed:
                admitted = self._admitted < self._config.max_inflight
                if admitted:
                    self._admitted += 1
                command = "submit" if admitted else "reject"
                self._commands.put((command, req, sink, arrival, stream, tokens))
        if closed:  # no loop left to deliver on: answer on the caller's thread
            sink(
                self._event(
                    _Live(req, sink, arrival, stream),
                    _error(req.request_id, "unavailable", "the runtime is shut down"),
                )
            )

    def abort(self, request_id: str) -> None:
        """Stop a request; its sink gets ``RequestError(kind="cancelled")``. Thread-safe."""
        self._commands.put(("abort", request_id))

    def has_room(self) -> bool:
        """Whether a ``submit`` now would be admitted (not ``resource_exhausted``)."""
        return self._admitted < self._config.max_inflight

    @property
    def inflight(self) -> int:
        """Requests submitted and not yet given their final event."""
        return self._admitted

    # ------------------------------------------------------------------ loop thread

    @property
    def max_model_len(self) -> int:
        """Longest prompt + output every worker accepts (the smallest of their limits)."""
        if not self._ready:
            raise StartupError("no worker is ready: call wait_ready() first")
        return min(m.max_model_len for m in self._ready.values())

    @property
    def live_ranks(self) -> list[int]:
        return [r for r in self._worker_ranks if r not in self._dead and r not in self._stopped]

    @property
    def failed_ranks(self) -> dict[int, str]:
        """Ranks that failed, with the reason each reported."""
        return dict(self._dead)

    def wait_ready(
        self, timeout_s: float, stop: threading.Event | None = None
    ) -> dict[int, WorkerReady]:
        """Startup handshake: wait for ``WorkerReady`` from every worker rank. Raises
        ``StartupError`` naming the rank and its traceback if one fails, the missing ranks on
        timeout, or that ``stop`` was set meanwhile."""
        if not self._worker_ranks:
            raise StartupError("no worker ranks: launch N+1 MPI ranks (rank 0 schedules)")
        deadline = self._clock() + timeout_s
        while len(self._ready) < len(self._worker_ranks):
            for source, msg in self._transport.poll(self._config.idle_sleep_s):
                self._dispatch(source, msg)
            if self._dead:
                rank, why = next(iter(self._dead.items()))
                raise StartupError(f"worker rank {rank} failed to start: {why}")
            if stop is not None and stop.is_set():
                raise StartupError("interrupted while the engines were starting")
            if self._clock() > deadline:
                missing = [r for r in self._worker_ranks if r not in self._ready]
                raise StartupError(
                    f"worker rank(s) {missing} did not report ready within {timeout_s:.0f} s "
                    f"(engine start hung or slow; raise --startup-timeout-s if it is just slow)"
                )
        log.info("all %d workers ready", len(self._ready))
        return dict(self._ready)

    def run(self, stop: threading.Event) -> None:
        """The event loop: ``step`` until ``stop`` is set."""
        while not stop.is_set():
            self.step()

    def step(self, timeout_s: float | None = None) -> None:
        """One loop iteration. Waits up to ``timeout_s`` (default ``idle_sleep_s``) for worker
        messages only when no command was pending."""
        busy = self._drain_commands()
        wait = 0.0 if busy else (self._config.idle_sleep_s if timeout_s is None else timeout_s)
        for source, msg in self._transport.poll(wait):
            self._dispatch(source, msg)
        self._expire_deadlines()
        self._check_silent_workers()
        self._transport.flush()

    def shutdown(self, drain: bool, timeout_s: float = 60.0) -> bool:
        """Stop every live worker. ``drain``: let in-flight requests finish first (their sinks
        get their results); otherwise fail them with ``unavailable`` right away and have the
        workers abort them. Returns False if some worker did not confirm in ``timeout_s``. A
        later call sends nothing more and waits no longer than the first call's deadline: the
        batch loop and then the MPI job both call it, and the job must see a stuck rank to abort
        the job rather than wait for it in MPI_Finalize forever."""
        first = not self._closed
        if first:
            self._close_and_stop_workers(drain)
            self._stop_deadline = self._clock() + timeout_s
        deadline = self._stop_deadline
        while self._running_ranks() and self._clock() < deadline:
            for source, msg in self._transport.poll(self._config.idle_sleep_s):
                self._dispatch(source, msg)
            self._expire_deadlines()
            self._transport.flush()
        if self._running_ranks():
            if first:  # a later call's timeout_s is not what was waited: logged once, here
                log.error(
                    "worker rank(s) %s did not stop within %.0f s", self._running_ranks(), timeout_s
                )
            return False
        return True

    def _close_and_stop_workers(self, drain: bool) -> None:
        with self._slots_lock:
            self._closed = True
        self._drain_commands()  # every submit queued before closing: failed as unavailable
        if not drain:
            for live in list(self._live.values()):
                self._fail(
                    live, "unavailable", "the runtime shut down before this request finished"
                )
        # Failed ranks too: their loop waits for this Shutdown so the MPI job can end in order.
        for rank in self._running_ranks():
            self._transport.send(rank, Shutdown(drain=drain))
        self._transport.flush()

    def _running_ranks(self) -> list[int]:
        """Worker processes that have not confirmed their stop (failed ones included)."""
        return [r for r in self._worker_ranks if r not in self._stopped]

    def stats(self) -> dict:
        """``scheduler.stats()`` plus the runtime's counters under ``"runtime"``."""
        out = dict(self._scheduler.stats())
        out["runtime"] = {
            **self._counts,
            "inflight": self._admitted,
            "errors_by_kind": dict(self._errors_by_kind),
            "live_ranks": self.live_ranks,
            "failed_ranks": {str(r): why for r, why in self._dead.items()},
            "per_rank": {
                str(r): {
                    "submitted": c.submitted,
                    "finished": c.finished,
                    "errors": c.errors,
                    "prompt_tokens": c.prompt_tokens,
                    "cached_tokens": c.cached_tokens,
                    "completion_tokens": c.completion_tokens,
                    "cache_hit_rate": c.cached_tokens / c.prompt_tokens if c.prompt_tokens else 0.0,
                }
                for r, c in self._per_rank.items()
            },
        }
        return out

    # ------------------------------------------------------------------ commands

    def _drain_commands(self) -> int:
        n = 0
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return n
            n += 1
            kind = command[0]
            if kind == "submit":
                req, sink, arrival, stream, tokens = command[1:]
                self._start(_Live(req, sink, arrival, stream, tokens=tokens))
            elif kind == "reject":
                req, sink, arrival, stream, _ = command[1:]
                self._counts["rejected"] += 1
                self._count_error("resource_exhausted")
                self._deliver(
                    sink,
                    self._event(
                        _Live(req, sink, arrival, stream),
                        _error(
                            req.request_id,
                            "resource_exhausted",
                            f"{self._config.max_inflight} requests already in flight "
                            f"(max_inflight); retry later",
                        ),
                    ),
                )
            else:
                self._abort(command[1])

    def _start(self, live: _Live) -> None:
        req = live.req
        self._counts["submitted"] += 1
        if req.request_id in self._live:
            self._count_error("invalid_argument")
            self._finalize(
                live,
                _error(
                    req.request_id,
                    "invalid_argument",
                    f"request id {req.request_id!r} is already in flight",
                ),
                own_slot=True,
                register=False,
            )
            return
        self._live[req.request_id] = live
        problem = self._validate(req)
        if problem is not None:
            self._fail(live, *problem)
            return
        if req.deadline is not None:
            heapq.heappush(self._deadlines, (req.deadline, next(self._seq), req.request_id))
        self._place(live)

    def _validate(self, req: ClientRequest) -> tuple[str, str] | None:
        if self._closed:
            return "unavailable", "the runtime is shutting down"
        if not req.token_ids:
            return "invalid_argument", "the prompt is empty (zero tokens)"
        try:
            req.sampling.validate()
        except ValueError as exc:
            return "invalid_argument", str(exc)
        if self._ready and len(req.token_ids) >= self.max_model_len:
            return "invalid_argument", (
                f"the prompt has {len(req.token_ids)} tokens; the model's limit is "
                f"{self.max_model_len} tokens (max_model_len) including at least one output token"
            )
        if req.deadline is not None and req.deadline <= self._clock():
            return "deadline_exceeded", "the deadline passed before the request was scheduled"
        return None

    def _place(self, live: _Live) -> None:
        """Ask the scheduler for a rank and send the request there (or fail it)."""
        rid = live.req.request_id
        if not self.live_ranks:
            self._fail(live, "unavailable", self._no_worker_message())
            return
        try:
            tokens = live.tokens if live.tokens is not None else live.req.token_ids
            decision = self._scheduler.schedule(rid, tokens, live.req.sampling.max_tokens)
        except ValueError as exc:  # the request itself (token ids out of range, a reused id)
            self._fail(live, "invalid_argument", str(exc), scheduled=False)
            return
        except Exception as exc:
            log.exception("scheduler failed on request %s", rid)
            self._fail(
                live, "internal", f"scheduler error: {type(exc).__name__}: {exc}", scheduled=False
            )
            return
        if decision.rank not in self.live_ranks:
            self._scheduler.on_request_dropped(rid)
            self._fail(
                live,
                "internal",
                f"scheduler chose rank {decision.rank}, which is not a "
                f"live worker (live: {self.live_ranks})",
                scheduled=False,
            )
            return
        live.rank, live.decision = decision.rank, decision
        if not self._by_rank[decision.rank]:  # silence counts from when a rank gets work
            self._last_heard[decision.rank] = self._clock()
        self._by_rank[decision.rank].add(rid)
        self._per_rank[decision.rank].submitted += 1
        self._transport.send(
            decision.rank,
            Submit(
                request_id=rid,
                prompt_token_ids=tokens,
                sampling=live.req.sampling,
                cached_hint=decision.cached_tokens,
                arrival_time=live.arrival,
            ),
        )

    def _abort(self, request_id: str) -> None:
        live = self._live.get(request_id)
        if live is not None:
            self._fail(live, "cancelled", "aborted by the client")

    def _expire_deadlines(self) -> None:
        now = self._clock()
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, _, rid = heapq.heappop(self._deadlines)
            live = self._live.get(rid)
            if live is not None and live.req.deadline == deadline:
                self._fail(
                    live,
                    "deadline_exceeded",
                    f"the deadline passed after {now - live.arrival:.3f} s",
                )

    def _check_silent_workers(self) -> None:
        """A worker stuck inside its engine sends nothing, not even LoadStats: after
        ``worker_silence_timeout_s`` with requests on it, fail it like one that raised."""
        now = self._clock()
        if now < self._next_silence_check:
            return
        self._next_silence_check = now + 1.0
        limit = self._config.worker_silence_timeout_s
        for rank in self.live_ranks:
            silent_s = now - self._last_heard.get(rank, now)
            if self._by_rank[rank] and silent_s > limit:
                self._on_worker_failed(
                    rank,
                    WorkerFailed(
                        rank,
                        f"no message for {silent_s:.0f} s while holding "
                        f"{len(self._by_rank[rank])} request(s) (worker_silence_timeout_s="
                        f"{limit:g}); treated as failed",
                    ),
                )

    # ------------------------------------------------------------------ messages

    def _dispatch(self, source: int, msg: object) -> None:
        self._last_heard[source] = self._clock()
        handler = self._handlers.get(type(msg))
        if handler is None:
            log.warning("rank %d sent an unknown message %r; ignored", source, type(msg).__name__)
            return
        handler(source, msg)

    def _live_on(self, source: int, request_id: str) -> _Live | None:
        """The live request ``request_id`` if ``source`` runs it; None for late messages (after
        an abort, a deadline or a re-route)."""
        live = self._live.get(request_id)
        if live is None or live.rank != source:
            self._counts["late_messages"] += 1
            return None
        return live

    def _on_token_delta(self, source: int, msg: TokenDelta) -> None:
        live = self._live_on(source, msg.request_id)
        if live is None:
            return
        if live.first_token_at is None and msg.token_ids:
            live.first_token_at = self._clock()
            self._scheduler.on_first_token(msg.request_id)
        live.text_parts.append(msg.text)
        live.token_ids.extend(msg.token_ids)
        if live.stream:
            live.streamed = True
            self._deliver(live.sink, msg)

    def _on_finished(self, source: int, msg: Finished) -> None:
        live = self._live_on(source, msg.request_id)
        if live is None:
            return
        self._scheduler.on_finished(msg)
        counters = self._per_rank[source]
        counters.finished += 1
        counters.prompt_tokens += msg.prompt_tokens
        counters.cached_tokens += msg.cached_tokens
        counters.completion_tokens += msg.completion_tokens
        self._counts["finished"] += 1
        if not live.token_ids and msg.token_ids:  # nothing streamed: the result rides here
            live.token_ids.extend(msg.token_ids)
            live.text_parts.append(msg.text)
        self._finalize(live, msg)

    def _on_request_error(self, source: int, msg: RequestError) -> None:
        live = self._live_on(source, msg.request_id)
        if live is None:
            return
        self._scheduler.on_request_dropped(msg.request_id)
        self._per_rank[source].errors += 1
        self._count_error(msg.kind)
        self._finalize(live, msg)

    def _on_cache_report(self, source: int, msg: CacheReport) -> None:
        if source not in self._dead:
            self._scheduler.on_cache_report(msg)

    def _on_load_stats(self, source: int, msg: LoadStats) -> None:
        if source not in self._dead:
            self._scheduler.on_load_stats(msg)

    def _on_worker_ready(self, source: int, msg: WorkerReady) -> None:
        self._ready[source] = msg
        self._scheduler.on_worker_ready(msg)

    def _on_worker_stopped(self, source: int, msg: WorkerStopped) -> None:
        self._stopped.add(source)
        if not self._closed:  # a worker leaving on its own is a failure
            self._on_worker_failed(source, WorkerFailed(source, "the worker stopped unexpectedly"))

    def _on_worker_failed(self, source: int, msg: WorkerFailed) -> None:
        if source in self._dead:
            return
        why = msg.message + (
            f"\n--- remote traceback (rank {source}) ---\n{msg.traceback}" if msg.traceback else ""
        )
        self._dead[source] = why
        log.error("worker rank %d failed: %s", source, why)
        if source not in self._ready:  # failed during startup: the scheduler never knew it
            return
        ids = (
            set(self._scheduler.remove_rank(source)) | self._by_rank[source] | set(msg.request_ids)
        )
        for rid in sorted(ids):
            live = self._live.get(rid)
            if live is not None and live.rank == source:
                self._reroute(live, source, msg.message)

    def _reroute(self, live: _Live, failed_rank: int, why: str) -> None:
        """Run a request of a failed rank elsewhere, unless its sink already saw output."""
        self._by_rank[failed_rank].discard(live.req.request_id)
        if live.streamed or not self.live_ranks:
            self._fail(
                live,
                "unavailable",
                f"worker rank {failed_rank} failed while running this request: {why}"
                + ("" if self.live_ranks else f"; {self._no_worker_message()}"),
                scheduled=False,
            )
            return
        self._counts["rerouted"] += 1
        live.rerouted_from.append(failed_rank)
        live.rank = live.decision = live.first_token_at = None
        live.text_parts.clear()
        live.token_ids.clear()
        self._place(live)

    # ------------------------------------------------------------------ endings

    def _fail(self, live: _Live, kind: str, message: str, *, scheduled: bool = True) -> None:
        """End a request from rank 0's side: abort it on its worker, tell the scheduler."""
        rid = live.req.request_id
        if live.rank is not None and scheduled:
            if live.rank in self.live_ranks:
                self._transport.send(live.rank, Abort(rid))
            self._scheduler.on_request_dropped(rid)
        self._count_error(kind)
        self._finalize(live, _error(rid, kind, message, rank=live.rank))

    def _finalize(
        self,
        live: _Live,
        result: Finished | RequestError,
        *,
        own_slot: bool = True,
        register: bool = True,
    ) -> None:
        rid = live.req.request_id
        if register:
            self._live.pop(rid, None)
            if live.rank is not None:
                self._by_rank[live.rank].discard(rid)
        if own_slot:
            with self._slots_lock:
                self._admitted -= 1
        self._deliver(live.sink, self._event(live, result))

    def _event(self, live: _Live, result: Finished | RequestError) -> FinalEvent:
        now = self._clock()
        return FinalEvent(
            request_id=live.req.request_id,
            result=result,
            rank=live.rank,
            decision=live.decision.kind.value if live.decision is not None else None,
            reason=live.decision.reason if live.decision is not None else "",
            latency_s=now - live.arrival,
            ttft_s=None if live.first_token_at is None else live.first_token_at - live.arrival,
            text="".join(live.text_parts),
            token_ids=list(live.token_ids),
            rerouted_from=tuple(live.rerouted_from),
        )

    def _deliver(self, sink: Sink, event: object) -> None:
        try:
            sink(event)
        except Exception:  # one bad sink must not stop the loop that serves everyone
            self._counts["sink_errors"] += 1
            log.exception("a request sink raised; the event was dropped")

    def _count_error(self, kind: str) -> None:
        self._errors_by_kind[kind] = self._errors_by_kind.get(kind, 0) + 1

    def _no_worker_message(self) -> str:
        failed = ", ".join(f"rank {r}: {why.splitlines()[0]}" for r, why in self._dead.items())
        return "no live worker rank left" + (f" (failed: {failed})" if failed else "")


def tune_gc(gen0_threshold: int) -> None:
    """Rank 0's garbage-collector settings, applied once the workers are ready (process-wide, so
    the entry point calls it, never the runtime itself).

    ``gc.freeze()`` moves the startup heap (gRPC, tokenizer, imports) out of every later
    collection. A generation-0 threshold of ``gen0_threshold`` instead of 700 makes young
    collections rare: each one walks the radix tree's newest nodes, and at 700 they cost ~3% of
    the decision rate and ~15% of its p99 (``bench/sched_overhead.py --gc default``). The tree's
    nodes are freed by reference counting when dropped, so fewer collections hold no memory back.
    ``0`` keeps Python's defaults.
    """
    if gen0_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)


def _error(request_id: str, kind: str, message: str, rank: int | None = None) -> RequestError:
    return RequestError(
        request_id=request_id, rank=-1 if rank is None else rank, message=message, kind=kind
    )
