"""One worker rank's request handling: Preble's local scheduler in front of one vLLM engine.

::

    submit(Submit) --validate--> LocalScheduler (group by estimated hit ratio)
                                     | admission, paced: what vLLM starts in its next step
                                     | (token budget, free slots), plus at most
                                     | max_engine_waiting requests waiting inside vLLM;
                                     v hits first while vLLM is evicting (KV events)
    step():                      EngineAdapter.step() -> TokenDelta*, Finished (timings)
                                 KV events            -> CacheReport (+ our prefix mirror)
                                 every stats_interval -> LoadStats

Timings of one request, as reported in ``Finished``::

    received      admitted        vLLM scheduled    first token         last token
       |-- local queue --|-- vLLM queue --|--- prefill ---|--- decode (n-1 tokens) ---|
       \\__________ queue_s ______________/ \\_ prefill_s _/  decode_s_per_token = span/(n-1)

The vLLM parts use vLLM's own per-request timestamps when it reports them (engine-core clock,
durations only), else the worker's clock at step boundaries.

The cached-token estimate that picks a request's priority group is the larger of rank 0's hint
and this worker's mirror of what vLLM reported stored (per block, chained hashes of the prefix);
vLLM itself decides what is really reused and ``Finished.cached_tokens`` says what it was.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from preble_hpc.config import EngineConfig, LocalSchedulerConfig
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
from preble_hpc.worker_rank.local_scheduler import LocalScheduler

log = logging.getLogger("preble_hpc.worker")


class PrefixMirror:
    """The prefixes the engine reported stored, as chained per-block keys::

        key(block 0) = hash((None, tokens[0:B]))
        key(block i) = hash((key(block i-1), tokens[iB:(i+1)B]))

    ``cached_tokens(prompt)`` walks the prompt's blocks until a key is missing: O(prompt)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._keys: set[int] = set()

    def __len__(self) -> int:
        return len(self._keys)

    def _chain(self, token_ids: Sequence[int]):
        key: int | None = None
        b = self.block_size
        for start in range(0, len(token_ids) - b + 1, b):
            key = hash((key, tuple(token_ids[start : start + b])))
            yield key

    def apply(self, event: CacheEvent) -> None:
        if event.kind is CacheEventKind.STORED:
            self._keys.update(self._chain(event.token_ids))
        elif event.kind is CacheEventKind.EVICTED:
            keys = list(self._chain(event.token_ids))
            if keys:  # the evicted block is the last one; its children become unreachable
                self._keys.discard(keys[-1])
        elif event.kind is CacheEventKind.CLEARED:
            self._keys.clear()

    def cached_tokens(self, token_ids: Sequence[int]) -> int:
        n = 0
        for key in self._chain(token_ids):
            if key not in self._keys:
                break
            n += self.block_size
        return n


@dataclass(slots=True)
class _Request:
    msg: Submit
    received: float
    admitted: float = 0.0
    first_output: float = 0.0
    #: Cached prompt tokens expected at submission (priority group, admission budget).
    cached_estimate: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


class Worker:
    """Contract C (see docs/interfaces.md). ``engine``: an already built engine adapter (tests, the
    benchmark); by default the worker builds ``EngineAdapter(engine_config)`` (seconds)."""

    def __init__(
        self,
        engine_config: EngineConfig,
        local_config: LocalSchedulerConfig,
        rank: int,
        clock: Callable[[], float] = time.monotonic,
        stats_interval_s: float = 0.5,
        *,
        engine: Any = None,
    ) -> None:
        if engine is None:
            from preble_hpc.worker_rank.engine import EngineAdapter

            engine = EngineAdapter(engine_config)
        self.engine = engine
        self.engine_config = engine_config
        self.local_config = local_config
        self.rank = rank
        self.clock = clock
        self.stats_interval_s = stats_interval_s
        self.local = LocalScheduler(local_config)
        self.mirror = PrefixMirror(engine.block_size)
        self._queued: dict[str, _Request] = {}
        self._running: dict[str, _Request] = {}
        #: Admitted ids without output yet (waiting or prefilling inside vLLM) -> the prompt
        #: tokens they still have to compute, for admission pacing.
        self._unstarted: dict[str, int] = {}
        self._unstarted_tokens = 0
        self._next_stats = clock()
        #: When vLLM last reported an eviction: the local scheduler's cache-pressure signal.
        self._evicted_at = -math.inf

    # ------------------------------------------------------------------ contract C

    def ready_message(self) -> WorkerReady:
        return WorkerReady(
            rank=self.rank,
            kv_capacity_tokens=self.engine.kv_capacity_tokens,
            block_size=self.engine.block_size,
            max_model_len=self.engine.max_model_len,
            model=self.engine_config.model,
            host_kv_tokens=self.engine.host_kv_tokens,
        )

    def submit(self, msg: Submit) -> list[object]:
        """Queue ``msg``; ``[RequestError]`` instead if it is invalid (never raises for it)."""
        rid = str(getattr(msg, "request_id", ""))
        try:
            if not isinstance(msg, Submit):
                raise ValueError(f"expected a Submit, got {type(msg).__name__}")
            if rid in self._queued or rid in self._running:
                raise ValueError(f"request {rid!r} is already on rank {self.rank}")
            self.engine.validate(msg.request_id, msg.prompt_token_ids, msg.sampling)
        except ValueError as exc:
            return [RequestError(rid, self.rank, str(exc))]
        cached = max(self.mirror.cached_tokens(msg.prompt_token_ids), max(0, msg.cached_hint))
        cached = min(cached, len(msg.prompt_token_ids))
        req = _Request(msg, received=self.clock(), cached_estimate=cached)
        self._queued[rid] = req
        self.local.add(rid, len(msg.prompt_token_ids), cached, req)
        return []

    def abort(self, request_id: str) -> list[object]:
        """Stop ``request_id`` wherever it is; ``[Finished("abort")]`` if it was known."""
        req = self._queued.pop(request_id, None)
        if req is not None:
            self.local.remove(request_id)
        else:
            req = self._running.pop(request_id, None)
            if req is None:
                return []
            self._unstarted_tokens -= self._unstarted.pop(request_id, 0)
            self.engine.abort(request_id)
        return [self._finished(req, "abort", 0.0, 0.0, 0.0)]

    def step(self) -> list[object]:
        """Admit, run one engine step, and collect what it produced (see the module docstring)."""
        out: list[object] = []
        self._admit(out)
        for update in self.engine.step():
            self._on_update(update, out)
        events = self.engine.cache_events()
        now = self.clock()
        if events:
            for event in events:
                self.mirror.apply(event)
                if event.kind is CacheEventKind.EVICTED:
                    self._evicted_at = now
            out.append(CacheReport(self.rank, events))
        if now >= self._next_stats:
            self._next_stats = now + self.stats_interval_s
            out.append(self.load_stats(now))
        return out

    def has_work(self) -> bool:
        return bool(self._queued) or bool(self._running) or self.engine.has_unfinished()

    def shutdown(self) -> None:
        self.engine.shutdown()

    # ------------------------------------------------------------------ internals

    def load_stats(self, now: float | None = None) -> LoadStats:
        load = self.engine.load()
        return LoadStats(
            rank=self.rank,
            time=self.clock() if now is None else now,
            running=load.running,
            waiting=load.waiting,
            kv_usage=load.kv_usage,
            local_queue=len(self.local),
            prefix_cache_hit_rate=load.prefix_cache_hit_rate,
        )

    def can_admit(self) -> bool:
        """Pacing: let a request into vLLM only if vLLM will start it in its next step (its
        prefill token budget and sequence slots still have room), or if fewer than
        ``max_engine_waiting`` admitted requests are still waiting inside it (0 behaves as 1, so
        the engine never idles). Either way vLLM's own queue stays short, so a hot request that
        arrives later still overtakes a cold one that is queued here."""
        if len(self._unstarted) < max(1, self.local_config.max_engine_waiting):
            return True
        budget = getattr(self.engine, "max_num_batched_tokens", None)
        slots = getattr(self.engine, "max_num_seqs", None)
        return (
            budget is not None
            and slots is not None
            and self._unstarted_tokens < budget
            and len(self._running) < slots
        )

    def under_cache_pressure(self) -> bool:
        """Whether vLLM evicted cached KV within ``eviction_window_s``: queued hits then go before
        a lower group's turn (see ``LocalScheduler``)."""
        return self.clock() - self._evicted_at < self.local_config.eviction_window_s

    def _admit(self, out: list[object]) -> None:
        pressure = self.under_cache_pressure()
        while self._queued and self.can_admit():
            popped = self.local.pop_round(1, pressure)
            if not popped:
                return
            req = popped[0]
            rid = req.msg.request_id
            del self._queued[rid]
            # KV events of requests admitted since this one was submitted may have stored its
            # prefix: budget what vLLM will really compute, not the estimate at submission.
            prompt = req.msg.prompt_token_ids
            req.cached_estimate = min(
                len(prompt), max(req.cached_estimate, self.mirror.cached_tokens(prompt))
            )
            try:
                self.engine.add_request(rid, req.msg.prompt_token_ids, req.msg.sampling)
            except ValueError as exc:
                out.append(RequestError(rid, self.rank, str(exc)))
                continue
            except Exception as exc:  # the engine refused in an unexpected way: report it
                log.exception("rank %d: engine rejected %s", self.rank, rid)
                out.append(
                    RequestError(
                        rid,
                        self.rank,
                        f"{type(exc).__name__}: {exc}",
                        kind="internal",
                        traceback=traceback.format_exc(),
                    )
                )
                continue
            req.admitted = self.clock()
            self._running[rid] = req
            self._unstarted[rid] = max(1, len(req.msg.prompt_token_ids) - req.cached_estimate)
            self._unstarted_tokens += self._unstarted[rid]

    def _on_update(self, update: Any, out: list[object]) -> None:
        rid = update.request_id
        req = self._running.get(rid)
        if req is None:  # aborted meanwhile
            return
        now = self.clock()
        if not req.first_output:
            req.first_output = now
            self._unstarted_tokens -= self._unstarted.pop(rid, 0)
        req.cached_tokens = max(req.cached_tokens, update.cached_tokens)
        req.completion_tokens = update.completion_tokens
        if update.token_ids or update.text:
            out.append(TokenDelta(rid, list(update.token_ids), update.text))
        if not update.finished:
            return
        del self._running[rid]
        queue_s, prefill_s, decode_s = self._timings(req, update, now)
        out.append(
            self._finished(req, update.finish_reason or "stop", queue_s, prefill_s, decode_s)
        )

    def _timings(self, req: _Request, update: Any, now: float) -> tuple[float, float, float]:
        local_wait = req.admitted - req.received
        n = update.completion_tokens
        if update.scheduled_ts and update.first_token_ts:
            queue_s = local_wait + max(0.0, update.scheduled_ts - update.queued_ts)
            prefill_s = max(0.0, update.first_token_ts - update.scheduled_ts)
            span = max(0.0, update.last_token_ts - update.first_token_ts)
        else:
            queue_s = local_wait
            prefill_s = max(0.0, req.first_output - req.admitted)
            span = max(0.0, now - req.first_output)
        return queue_s, prefill_s, span / (n - 1) if n > 1 else 0.0

    def _finished(
        self, req: _Request, reason: str, queue_s: float, prefill_s: float, decode_s: float
    ) -> Finished:
        return Finished(
            request_id=req.msg.request_id,
            rank=self.rank,
            finish_reason=reason,
            prompt_tokens=len(req.msg.prompt_token_ids),
            cached_tokens=req.cached_tokens,
            completion_tokens=req.completion_tokens,
            queue_s=queue_s,
            prefill_s=prefill_s,
            decode_s_per_token=decode_s,
        )
