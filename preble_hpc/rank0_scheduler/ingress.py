"""The gRPC ingress on rank 0: a thin translator between protobuf and ``Rank0Runtime``.

Two threads, one queue each way; the scheduler loop never waits on the network::

    gRPC thread (asyncio, grpc.aio)                 loop thread (Rank0Runtime.step + pump)
    ─────────────────────────────────               ──────────────────────────────────────
    Generate: validate, tokenize   ── submit ──▶    schedule, Submit to a worker
              await events         ◀── sink ────    TokenDelta*, FinalEvent (call_soon_threadsafe)
    client cancel / deadline       ── abort ──▶     Abort to the worker (frees its KV)
    GetStats                       ── call ───▶     runtime.stats() (pump runs loop calls)

Health (``grpc.health.v1``): SERVING while accepting requests, NOT_SERVING once draining; the
server starts only after every worker reported ready. Server reflection lists ``preble.v1.Preble``.
Prometheus metrics live in one ``IngressMetrics`` registry, served on ``--metrics-port``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import itertools
import json
import logging
import math
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import unknown_fields
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from preble_hpc._proto import preble_pb2 as pb
from preble_hpc._proto import preble_pb2_grpc as pb_grpc
from preble_hpc.messages import SamplingSpec, TokenDelta
from preble_hpc.rank0_scheduler.main import ClientRequest, FinalEvent, Rank0Runtime

log = logging.getLogger("preble_hpc.ingress")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Preble"].full_name  # "preble.v1.Preble"

#: RequestError.kind -> gRPC status code.
STATUS_OF_KIND: dict[str, grpc.StatusCode] = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "cancelled": grpc.StatusCode.CANCELLED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "internal": grpc.StatusCode.INTERNAL,
}

#: Prompts at least this long (characters) are tokenized on a helper thread, so that one huge
#: prompt does not stall every other stream on the asyncio thread.
_INLINE_TOKENIZE_CHARS = 8192
_MAX_REQUEST_ID_CHARS = 256
#: Seconds between refreshes of the stats snapshot behind the per-rank Prometheus gauges.
_SNAPSHOT_INTERVAL_S = 1.0


class BadRequest(ValueError):
    """The request cannot be served as sent (-> INVALID_ARGUMENT)."""


# ---------------------------------------------------------------------------- request -> runtime


def check_unknown_fields(msg: Any, path: str = "request") -> None:
    """Raise ``BadRequest`` if ``msg`` or a message inside it carries fields this server's proto
    does not define (a client built from a newer proto): proto3 would otherwise drop them."""
    unknown = sorted({f.field_number for f in unknown_fields.UnknownFieldSet(msg)})
    if unknown:
        raise BadRequest(
            f"{path} ({msg.DESCRIPTOR.full_name}) has field number(s) {unknown} that this server "
            f"does not know: the client's preble.proto is newer than the server's"
        )
    for field, value in msg.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        if field.is_repeated:
            for i, item in enumerate(value):
                check_unknown_fields(item, f"{path}.{field.name}[{i}]")
        else:
            check_unknown_fields(value, f"{path}.{field.name}")


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise BadRequest(f"sampling.{name} must be a finite number, got {value!r}")
    # float32 on the wire: 0.7 arrives as 0.699999988...; give the engine the number typed.
    return float(f"{value:.7g}")


def sampling_from_proto(sp: pb.SamplingParams) -> SamplingSpec:
    """``SamplingSpec`` from the set fields of ``sp`` (unset -> the spec's defaults)."""
    given: dict[str, Any] = {}
    for name in ("max_tokens", "top_k", "seed", "ignore_eos"):
        if sp.HasField(name):
            given[name] = getattr(sp, name)
    for name in ("temperature", "top_p"):
        if sp.HasField(name):
            given[name] = _finite(name, getattr(sp, name))
    if sp.stop:
        given["stop"] = tuple(sp.stop)
    try:
        return SamplingSpec.from_dict(given)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"sampling: {exc}") from exc


class RequestBuilder:
    """Validates a ``GenerateRequest`` and turns it into a ``ClientRequest`` (token ids)."""

    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        from preble_hpc.tokenization import encode_prompt

        self._tok = tokenizer
        self._encode = encode_prompt
        self.max_model_len = max_model_len
        vocab = tokenizer.get_vocab()
        self.max_token_id = max(max(vocab.values()), len(tokenizer) - 1)

    def needs_thread(self, req: pb.GenerateRequest) -> bool:
        """Whether tokenizing ``req`` may take long enough to block other streams."""
        which = req.WhichOneof("input")
        if which == "prompt":
            return len(req.prompt) >= _INLINE_TOKENIZE_CHARS
        if which == "messages":
            return sum(len(m.content) for m in req.messages.messages) >= _INLINE_TOKENIZE_CHARS
        return False

    def token_ids(self, req: pb.GenerateRequest) -> list[int]:
        from preble_hpc.tokenization import TokenizationError

        which = req.WhichOneof("input")
        if which is None:
            raise BadRequest("the request has no input: set one of prompt, token_ids, messages")
        if which == "token_ids":
            ids = list(req.token_ids.ids)
            if not ids:
                raise BadRequest("token_ids is empty")
            top = max(ids)
            if top > self.max_token_id:
                raise BadRequest(
                    f"token id {top} is out of the vocabulary (largest id: {self.max_token_id})"
                )
            return ids
        if which == "prompt" and not req.prompt:
            raise BadRequest("the prompt is empty")
        try:
            if which == "prompt":
                return self._encode(self._tok, prompt=req.prompt)
            messages = [{"role": m.role, "content": m.content} for m in req.messages.messages]
            if not messages:
                raise BadRequest("messages is empty: send at least one chat message")
            return self._encode(self._tok, messages=messages)
        except TokenizationError as exc:
            raise BadRequest(str(exc)) from exc

    def build(
        self, req: pb.GenerateRequest, ids: list[int], deadline: float | None
    ) -> ClientRequest:
        """Check lengths and sampling; ``max_tokens`` is capped by the room left in the model's
        context (as vLLM does: the output then ends with finish_reason "length")."""
        rid = req.request_id or uuid.uuid4().hex
        if len(rid) > _MAX_REQUEST_ID_CHARS:
            raise BadRequest(f"request_id is longer than {_MAX_REQUEST_ID_CHARS} characters")
        if len(ids) >= self.max_model_len:
            raise BadRequest(
                f"the prompt has {len(ids)} tokens; the model's limit is {self.max_model_len} "
                f"tokens (max_model_len) including at least one output token"
            )
        sampling = sampling_from_proto(req.sampling)
        room = self.max_model_len - len(ids)
        if sampling.max_tokens > room:
            sampling = SamplingSpec(**{**_spec_dict(sampling), "max_tokens": room})
        return ClientRequest(request_id=rid, token_ids=ids, sampling=sampling, deadline=deadline)


def _spec_dict(spec: SamplingSpec) -> dict[str, Any]:
    return {name: getattr(spec, name) for name in SamplingSpec.__slots__}


# ---------------------------------------------------------------------------- metrics


class IngressMetrics:
    """Prometheus metrics of rank 0 in their own registry (so tests can build several)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "preble_requests", "Generate requests by final status", ["status"], registry=r
        )
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        self.latency = Histogram(
            "preble_request_latency_seconds",
            "Seconds from request received to final message (successes)",
            buckets=buckets,
            registry=r,
        )
        self.ttft = Histogram(
            "preble_ttft_seconds",
            "Seconds from request received to the first streamed token",
            buckets=buckets,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "preble_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.cached_tokens = Counter(
            "preble_cached_tokens", "Prompt tokens served from an engine's prefix cache", registry=r
        )
        self.completion_tokens = Counter("preble_completion_tokens", "Generated tokens", registry=r)
        self.decisions = Counter(
            "preble_decisions",
            "Scheduler decisions of finished requests by kind (exploit, explore, replicate, ...)",
            ["kind"],
            registry=r,
        )
        self.ingress = Histogram(
            "preble_ingress_seconds",
            "Seconds the ingress spends on a request before handing it to "
            "the scheduler (validation, tokenization)",
            buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1),
            registry=r,
        )
        self.active = Gauge(
            "preble_active_streams", "Generate calls open on the ingress", registry=r
        )
        self.serving = Gauge(
            "preble_serving", "1 while accepting requests, 0 while draining", registry=r
        )
        hit = Gauge(
            "preble_cache_hit_rate",
            "Cached / prompt tokens over every finished request",
            registry=r,
        )
        hit.set_function(self.cache_hit_rate)
        self.snapshot: dict[str, Any] = {}
        r.register(_RankCollector(self))

    def cache_hit_rate(self) -> float:
        prompt = self.prompt_tokens._value.get()
        return self.cached_tokens._value.get() / prompt if prompt else 0.0

    def on_final(self, event: FinalEvent, latency_s: float) -> None:
        done = event.finished
        if done is None:
            return
        self.requests.labels("ok").inc()
        self.latency.observe(latency_s)
        self.prompt_tokens.inc(done.prompt_tokens)
        self.cached_tokens.inc(done.cached_tokens)
        self.completion_tokens.inc(done.completion_tokens)
        self.decisions.labels(event.decision or "none").inc()

    def serve_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0: any free port); returns the port."""
        from prometheus_client import start_http_server

        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {_bind_address(host, port)}: {exc}") from exc
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()


class _RankCollector:
    """Per-rank gauges read from the latest stats snapshot (taken on the loop thread)."""

    _GAUGES = (
        ("preble_rank_in_flight", "Requests placed on the rank and not yet finished", "in_flight"),
        ("preble_rank_running", "Requests running in the rank's vLLM engine", "running"),
        ("preble_rank_waiting", "Requests waiting in the rank's vLLM queue", "waiting"),
        ("preble_rank_local_queue", "Requests held by the rank's local scheduler", "local_queue"),
        ("preble_rank_kv_usage", "Fraction of the rank's KV blocks in use", "kv_usage"),
        ("preble_rank_load", "The scheduler's load estimate of the rank", "load"),
        (
            "preble_rank_cache_hit_rate",
            "Cached / prompt tokens of the rank's finished requests",
            "cache_hit_rate",
        ),
        ("preble_rank_live", "1 while the rank serves, 0 once it failed or stopped", "live"),
    )

    def __init__(self, metrics: IngressMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list:
        return []

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        rows = rank_rows(self._metrics.snapshot)
        for name, doc, key in self._GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["rank"])
            for row in rows:
                family.add_metric([str(row["rank"])], float(row.get(key, 0.0)))
            yield family
        tree = tree_size(self._metrics.snapshot)
        family = GaugeMetricFamily("preble_tree_tokens", "Tokens in rank 0's global radix tree")
        family.add_metric([], float(tree[0]))
        yield family


# ---------------------------------------------------------------------------- stats


def _num(d: Any, *keys: str, default: float = 0.0) -> float:
    """First numeric value among ``keys`` of ``d`` (stats dicts differ by policy and version)."""
    if isinstance(d, dict):
        for key in keys:
            value = d.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return default


def _per_rank_maps(stats: dict) -> list[dict]:
    """Every ``{rank: {...}}`` mapping in the scheduler part of ``stats``."""
    found = []
    for key in ("ranks", "per_rank", "load", "loads"):
        value = stats.get(key)
        if isinstance(value, dict):
            found.append(value)
        elif isinstance(value, list):
            found.append({str(row.get("rank")): row for row in value if isinstance(row, dict)})
    return found


def rank_rows(stats: dict) -> list[dict]:
    """One flat dict per worker rank from ``Rank0Runtime.stats()``."""
    runtime = stats.get("runtime", {}) if isinstance(stats, dict) else {}
    per_rank = runtime.get("per_rank", {})
    live = set(runtime.get("live_ranks", []))
    sched_maps = _per_rank_maps(stats) if isinstance(stats, dict) else []
    ranks = set(per_rank) | {k for m in sched_maps for k in m}
    rows = []
    for key in sorted(ranks, key=lambda k: int(k) if str(k).isdigit() else 1 << 30):
        if not str(key).isdigit():
            continue
        counters = per_rank.get(str(key), {})
        sched = {}
        for m in sched_maps:
            entry = m.get(key, m.get(str(key), m.get(int(key)) if str(key).isdigit() else None))
            if isinstance(entry, dict):
                sched.update(entry)
            elif isinstance(entry, (int, float)):
                sched.setdefault("load", entry)
        rows.append(
            {
                "rank": int(key),
                "live": 1.0 if int(key) in live else 0.0,
                "in_flight": _num(sched, "in_flight", "inflight"),
                "running": _num(sched, "running"),
                "waiting": _num(sched, "waiting"),
                "local_queue": _num(sched, "local_queue"),
                "kv_usage": _num(sched, "kv_usage"),
                "load": _num(sched, "load", "load_s", "cost", "window_load"),
                "cache_hit_rate": _num(counters, "cache_hit_rate"),
                "finished": _num(counters, "finished"),
                "prompt_tokens": _num(counters, "prompt_tokens"),
                "cached_tokens": _num(counters, "cached_tokens"),
                "completion_tokens": _num(counters, "completion_tokens"),
            }
        )
    return rows


def tree_size(stats: dict) -> tuple[int, int]:
    """(tokens, nodes) of the global tree from the stats dict."""
    tree = stats.get("tree", {}) if isinstance(stats, dict) else {}
    tokens = _num(tree, "tokens", "total_tokens") or _num(stats, "tree_tokens")
    nodes = _num(tree, "nodes", "num_nodes") or _num(stats, "tree_nodes")
    return int(tokens), int(nodes)


def decision_counts(stats: dict) -> dict[str, int]:
    for key in ("decisions", "decision_counts", "decisions_by_kind"):
        value = stats.get(key)
        if isinstance(value, dict):
            return {str(k): int(v) for k, v in value.items() if isinstance(v, (int, float))}
    return {}


def stats_to_proto(stats: dict, policy: str, extra: dict | None = None) -> pb.GetStatsResponse:
    rows = rank_rows(stats)
    prompt = sum(r["prompt_tokens"] for r in rows)
    cached = sum(r["cached_tokens"] for r in rows)
    tokens, nodes = tree_size(stats)
    out = pb.GetStatsResponse(
        in_flight=int(_num(stats.get("runtime", {}), "inflight")),
        tree_tokens=tokens,
        tree_nodes=nodes,
        cache_hit_rate=cached / prompt if prompt else 0.0,
        policy=policy,
        stats_json=json.dumps({**stats, **(extra or {})}, default=str, sort_keys=True),
    )
    for kind, count in decision_counts(stats).items():
        out.decisions[kind] = count
    for r in rows:
        out.ranks.add(
            rank=r["rank"],
            live=bool(r["live"]),
            in_flight=int(r["in_flight"]),
            running=int(r["running"]),
            waiting=int(r["waiting"]),
            local_queue=int(r["local_queue"]),
            kv_usage=r["kv_usage"],
            cache_hit_rate=r["cache_hit_rate"],
            load=r["load"],
            finished=int(r["finished"]),
            prompt_tokens=int(r["prompt_tokens"]),
            cached_tokens=int(r["cached_tokens"]),
            completion_tokens=int(r["completion_tokens"]),
        )
    return out


# ---------------------------------------------------------------------------- servicer


class _LoopCalls:
    """Functions to run on the loop thread (the runtime is single-threaded); ``pump`` runs them."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future]] = (
            queue.SimpleQueue()
        )

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, fut))
        return fut

    def run_pending(self) -> None:
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except Exception as exc:
                fut.set_exception(exc)


class _Mailbox:
    """Events of one stream, from the loop thread to the asyncio thread, with one wake-up per
    batch: while the consumer has not yet run, further events only queue (no extra wake-up), and
    it then takes them all at once.

    Lock-free by ordering: ``take`` clears ``_scheduled`` *before* draining, so an event put after
    the drain sees the flag clear and schedules a new wake-up.
    """

    __slots__ = ("_loop", "_pending", "_wake", "_scheduled", "ended")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: collections.deque[object] = collections.deque()
        self._wake = asyncio.Event()
        self._scheduled = False
        self.ended = False  # the final event was taken (set by the handler)

    def put(self, event: object) -> None:
        """Any thread (the runtime's sink)."""
        self._pending.append(event)
        if not self._scheduled:
            self._scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the asyncio loop is gone (server stopped): nobody listens
                pass

    async def take(self) -> list[object]:
        """Asyncio thread: wait for events, return every one queued so far."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._scheduled = False
            batch = []
            while self._pending:
                batch.append(self._pending.popleft())
            if batch:
                return batch


def _fold(batch: list[object]) -> tuple[str, list[int], object]:
    """A batch of stream events as (text, token ids) of its deltas and the event that ends the
    stream, if the batch holds one (nothing follows it)."""
    text: list[str] = []
    ids: list[int] = []
    for event in batch:
        if not isinstance(event, TokenDelta):
            return "".join(text), ids, event
        text.append(event.text)
        ids.extend(event.token_ids)
    return "".join(text), ids, None


class _ServerStop:
    """Put on a stream's queue to end it with UNAVAILABLE (drain timed out)."""

    def __init__(self, message: str) -> None:
        self.message = message


class PrebleServicer(pb_grpc.PrebleServicer):
    """``preble.v1.Preble`` over a ``Rank0Runtime``; every method runs on the asyncio thread."""

    def __init__(
        self,
        runtime: Rank0Runtime,
        builder: RequestBuilder,
        metrics: IngressMetrics,
        loop_calls: _LoopCalls,
        *,
        policy: str = "",
        clock: Callable[[], float] = time.monotonic,
        stats_extra: Callable[[], dict] | None = None,
    ) -> None:
        self._rt = runtime
        self._builder = builder
        self._metrics = metrics
        self._loop_calls = loop_calls
        self._policy = policy
        self._clock = clock
        self._stats_extra = stats_extra or dict
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="tokenize")
        self.draining = False
        self.active = 0
        self.served = 0
        self._open: dict[int, _Mailbox] = {}  # stream number -> its mailbox
        self._open_ids: set[str] = set()  # request ids of the open streams
        self._numbers = itertools.count()

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        client_req = await self._admit(request, context)
        if client_req is None:
            return
        stream, rid = self._open_stream(client_req, context)
        self._metrics.ingress.observe(time.perf_counter() - start)
        first = True
        while True:
            text, ids, final = _fold(await stream.take())
            if final is None or isinstance(final, FinalEvent) and final.ok:
                if first and final is not None and not ids and final.token_ids:
                    text, ids = final.text, list(final.token_ids)  # nothing streamed
                if first and ids:
                    first = False
                    self._metrics.ttft.observe(time.perf_counter() - start)
            if final is None:
                # Deltas that queued up while the client read slower: one message.
                yield pb.GenerateResponse(delta=pb.Delta(text=text, token_ids=ids))
                continue
            stream.ended = True
            responses, status = self._end(final, text, ids, rid, client_req.request_id, start)
            for response in responses:
                yield response
            if status is not None:
                await context.abort(*status)
            return

    async def _admit(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> ClientRequest | None:
        """The request as the runtime takes it, or None once the RPC is aborted (the server is
        draining, or the request is invalid)."""
        if self.draining:
            self._metrics.requests.labels("unavailable").inc()
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the server is draining (shutting down); send to another server",
            )
            return None
        try:
            check_unknown_fields(request)
            if self._builder.needs_thread(request):
                ids = await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._builder.token_ids, request
                )
            else:
                ids = self._builder.token_ids(request)
            remaining = context.time_remaining()
            deadline = None if remaining is None else self._clock() + remaining
            return self._builder.build(request, ids, deadline)
        except BadRequest as exc:
            self._metrics.requests.labels("invalid_argument").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return None

    def _open_stream(
        self, client_req: ClientRequest, context: grpc.aio.ServicerContext
    ) -> tuple[_Mailbox, str]:
        """Submit the request with a mailbox for its events; returns the mailbox and the request
        id the runtime knows it by (the client's, made unique among the open streams)."""
        stream = _Mailbox(asyncio.get_running_loop())
        number = next(self._numbers)
        client_rid = client_req.request_id
        if client_rid in self._open_ids:  # independent clients may reuse ids: keep ours unique
            client_req = dataclasses.replace(client_req, request_id=f"{client_rid}~{number}")
        rid = client_req.request_id
        self._open_ids.add(rid)

        def on_rpc_done(ctx: Any) -> None:
            # Fires however the RPC ends; a stream that ends before its final event was cancelled
            # by the client or ran out of deadline: abort it so the worker frees its KV.
            self._open.pop(number, None)
            self._open_ids.discard(rid)
            self.active -= 1
            self._metrics.active.dec()
            if not stream.ended:
                self._rt.abort(rid)
                remaining = ctx.time_remaining()
                expired = remaining is not None and remaining <= 0
                self._metrics.requests.labels("deadline_exceeded" if expired else "cancelled").inc()

        self.active += 1
        self._metrics.active.inc()
        context.add_done_callback(on_rpc_done)
        self._open[number] = stream
        self._rt.submit(client_req, stream.put)
        return stream, rid

    def _end(
        self, final: object, text: str, ids: list[int], rid: str, client_rid: str, start: float
    ) -> tuple[list[pb.GenerateResponse], tuple[grpc.StatusCode, str] | None]:
        """The stream's last messages and the status to abort it with (None: it succeeded)."""
        if isinstance(final, _ServerStop):
            self._rt.abort(rid)
            self._metrics.requests.labels("unavailable").inc()
            return [], (grpc.StatusCode.UNAVAILABLE, final.message)
        assert isinstance(final, FinalEvent)
        delta = pb.Delta(text=text, token_ids=ids) if text or ids else None
        if final.error is not None:
            # Output streamed before a failure still reaches the client.
            err = final.error
            self._metrics.requests.labels(err.kind).inc()
            code = STATUS_OF_KIND.get(err.kind, grpc.StatusCode.INTERNAL)
            return [pb.GenerateResponse(delta=delta)] if delta else [], (code, err.message)
        self._metrics.on_final(final, time.perf_counter() - start)
        self.served += 1
        return [pb.GenerateResponse(final=self._final(final, client_rid), delta=delta)], None

    def fail_open_streams(self, message: str) -> None:
        """End every open stream with UNAVAILABLE ``message`` (asyncio thread)."""
        for stream in list(self._open.values()):
            stream.put(_ServerStop(message))

    @staticmethod
    def _final(event: FinalEvent, request_id: str) -> pb.Final:
        done = event.finished
        assert done is not None
        return pb.Final(
            request_id=request_id,
            finish_reason=done.finish_reason,
            usage=pb.Usage(
                prompt_tokens=done.prompt_tokens,
                cached_tokens=done.cached_tokens,
                completion_tokens=done.completion_tokens,
            ),
            rank=event.rank if event.rank is not None else done.rank,
            decision=event.decision or "",
            decision_reason=event.reason,
            latency_s=event.latency_s,
            ttft_s=event.ttft_s or 0.0,
        )

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext):
        try:
            check_unknown_fields(request)
        except BadRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        fut = self._loop_calls.call(self._rt.stats)
        try:
            stats = await asyncio.wait_for(asyncio.wrap_future(fut), timeout=10.0)
        except TimeoutError:
            fut.cancel()
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "rank 0's event loop did not answer within 10 s"
            )
        extra = {
            "ingress": {
                "active_streams": self.active,
                "served": self.served,
                "draining": self.draining,
                **self._stats_extra(),
            }
        }
        return stats_to_proto(stats, self._policy, extra)


# ---------------------------------------------------------------------------- server


def advertised_host(host: str) -> str:
    """The name clients should use for a server bound to ``host``."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        return socket.gethostname()
    return host


def _bind_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class IngressServer:
    """A grpc.aio server on its own thread, in front of a ``Rank0Runtime`` whose loop the caller
    drives: call ``pump()`` after every ``runtime.step()``.

    ::

        server = IngressServer(runtime, tokenizer, max_model_len, policy="e2")
        port = server.start("0.0.0.0", 0)         # SERVING
        while not stop.is_set(): runtime.step(); server.pump()
        server.begin_drain()                      # NOT_SERVING, new calls -> UNAVAILABLE
        ...step/pump until server.active == 0 ...
        server.stop()
    """

    def __init__(
        self,
        runtime: Rank0Runtime,
        tokenizer: Any,
        max_model_len: int,
        *,
        policy: str = "",
        metrics: IngressMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_concurrent_streams: int | None = None,
    ) -> None:
        self.runtime = runtime
        self.metrics = metrics or IngressMetrics()
        self._loop_calls = _LoopCalls()
        self.metrics_port: int | None = None
        self.servicer = PrebleServicer(
            runtime,
            RequestBuilder(tokenizer, max_model_len),
            self.metrics,
            self._loop_calls,
            policy=policy,
            clock=clock,
            stats_extra=lambda: {
                "metrics_port": self.metrics_port,
                "pid": os.getpid(),
                "host": socket.gethostname(),
            },
        )
        self._max_streams = max_concurrent_streams
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._health: HealthServicer | None = None
        self._stopped: asyncio.Event | None = None
        self._next_snapshot = 0.0
        self.port: int | None = None

    # -------------------------------------------------------------- caller's (loop) thread

    def start(self, host: str = "0.0.0.0", port: int = 0, timeout_s: float = 30.0) -> int:
        """Bind and start serving (health SERVING); returns the bound port."""
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(host, port, started), name="grpc-ingress", daemon=True
        )
        self._thread.start()
        self.port = started.result(timeout=timeout_s)
        log.info("gRPC ingress listening on %s (%s)", _bind_address(host, self.port), SERVICE_NAME)
        return self.port

    def serve_metrics(self, host: str, port: int) -> int:
        self.metrics_port = self.metrics.serve_http(host, port)
        log.info(
            "Prometheus metrics on http://%s/metrics",
            _bind_address(advertised_host(host), self.metrics_port),
        )
        return self.metrics_port

    def pump(self) -> None:
        """Run queued loop-thread calls and refresh the metrics snapshot. Loop thread only."""
        self._loop_calls.run_pending()
        now = time.monotonic()
        if now >= self._next_snapshot:
            self._next_snapshot = now + _SNAPSHOT_INTERVAL_S
            try:
                self.metrics.snapshot = self.runtime.stats()
            except Exception:
                log.exception("runtime.stats() failed; per-rank metrics are stale")

    @property
    def active(self) -> int:
        """Generate calls still open (streams not yet answered)."""
        return self.servicer.active

    def begin_drain(self) -> None:
        """Health NOT_SERVING; new Generate calls get UNAVAILABLE; open streams continue."""
        self.servicer.draining = True
        self.metrics.serving.set(0)
        self._run_coro(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))

    def fail_open_streams(self, message: str) -> None:
        """End every open Generate stream with UNAVAILABLE ``message``; their requests are
        aborted on the workers."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.servicer.fail_open_streams, message)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the gRPC server (open streams get ``grace_s`` to end) and the metrics server."""
        if self._loop is not None and self._stopped is not None and self._thread is not None:
            try:
                self._run_coro(self._stop(grace_s), timeout_s=grace_s + 10)
            except Exception:
                log.exception("gRPC server stop failed")
            self._thread.join(timeout=grace_s + 10)
        self.metrics.close()
        self.servicer._pool.shutdown(wait=False, cancel_futures=True)

    # -------------------------------------------------------------- asyncio thread

    def _thread_main(self, host: str, port: int, started: concurrent.futures.Future) -> None:
        try:
            asyncio.run(self._serve(host, port, started))
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            else:
                log.exception("gRPC ingress thread failed")

    async def _serve(self, host: str, port: int, started: concurrent.futures.Future) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        options = [("grpc.so_reuseport", 0)]  # two servers on one port must fail, not share
        if self._max_streams:
            options.append(("grpc.max_concurrent_streams", self._max_streams))
        server = grpc.aio.server(options=options)
        pb_grpc.add_PrebleServicer_to_server(self.servicer, server)
        self._health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, "grpc.health.v1.Health", reflection.SERVICE_NAME), server
        )
        try:
            bound = server.add_insecure_port(_bind_address(host, port))
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {_bind_address(host, port)}: {exc}") from exc
        if not bound:
            raise OSError(f"cannot listen on {_bind_address(host, port)} (port in use?)")
        await server.start()
        self._server = server
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.metrics.serving.set(1)
        started.set_result(bound)
        await self._stopped.wait()

    async def _set_health(self, status: int) -> None:
        assert self._health is not None
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    async def _stop(self, grace_s: float) -> None:
        assert self._server is not None and self._stopped is not None
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        await self._server.stop(grace_s)
        self._stopped.set()

    def _run_coro(self, coro: Any, timeout_s: float = 10.0) -> Any:
        if self._loop is None:
            coro.close()
            return None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout_s)
