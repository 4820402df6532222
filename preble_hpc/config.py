"""Every knob of preble-hpc, as frozen dataclasses: one source of defaults.

Each field carries a docstring. ``__post_init__`` validates and raises ``ConfigError`` naming the
bad value and how to fix it, so a typo on the command line fails before any engine starts.
"""

from __future__ import annotations

from dataclasses import dataclass


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and the fix."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(
            value is None or value > 0,
            f"{type(obj).__name__}.{name} must be > 0, got {value!r}",
        )


@dataclass(frozen=True)
class EngineConfig:
    """Arguments of the vLLM engine on each worker rank."""

    model: str
    """Path of an HF model folder (or a name vLLM can resolve offline)."""
    tokenizer: str | None = None
    """Tokenizer path; defaults to ``model``."""
    dtype: str = "auto"
    """Weights/activation dtype passed to vLLM (``auto``, ``bfloat16``, ``float16``, ``float32``)."""
    max_model_len: int | None = None
    """Longest prompt + output in tokens; ``None`` takes the model's own limit."""
    kv_cache_gib: float | None = None
    """KV-cache size per engine in GiB. On CPU it sets ``VLLM_CPU_KVCACHE_SPACE``; on GPU it
    caps the KV cache instead of ``gpu_memory_utilization`` when given."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory vLLM may use (GPU only)."""
    max_num_seqs: int = 256
    """Most sequences vLLM runs in one batch."""
    max_num_batched_tokens: int | None = None
    """Token budget of one engine step (chunked prefill); ``None`` keeps vLLM's default."""
    tensor_parallel_size: int = 1
    """GPUs per engine (vLLM's own tensor parallelism inside one worker rank)."""
    enforce_eager: bool = False
    """Skip CUDA graphs / compilation; set on CPU (engine start 14 s instead of 36 s)."""
    seed: int = 0
    """Engine seed, for reproducible sampling."""
    block_size: int | None = None
    """KV block size in tokens; ``None`` keeps vLLM's default for the platform."""
    enable_prefix_caching: bool = True
    """vLLM automatic prefix caching; the point of the whole system, on by default."""
    kv_events: bool = True
    """Publish vLLM KV-cache events so rank 0's tree mirrors what the engine really holds."""

    def __post_init__(self) -> None:
        _require(bool(self.model), "EngineConfig.model is empty: pass --model PATH")
        _positive(self, "max_model_len", "kv_cache_gib", "max_num_seqs", "max_num_batched_tokens")
        _positive(self, "tensor_parallel_size", "block_size")
        _require(
            0 < self.gpu_memory_utilization <= 1,
            f"EngineConfig.gpu_memory_utilization must be in (0, 1], "
            f"got {self.gpu_memory_utilization!r}",
        )


@dataclass(frozen=True)
class LocalSchedulerConfig:
    """Preble's per-worker priority scheduler in front of vLLM."""

    num_groups: int = 10
    """Priority groups by cache-hit ratio: group ``ceil(hit * P) - 1`` (P = num_groups)."""
    quota: int = 10
    """Base quota k: one admission round takes up to ``(g + 1) * k`` requests of group g."""
    max_engine_waiting: int = 4
    """Admission pacing: most requests we let wait inside vLLM's own queue, so that our order is
    the order vLLM runs."""

    def __post_init__(self) -> None:
        _positive(self, "num_groups", "quota")
        _require(
            self.max_engine_waiting >= 0,
            f"LocalSchedulerConfig.max_engine_waiting must be >= 0, got {self.max_engine_waiting}",
        )


@dataclass(frozen=True)
class SchedulerConfig:
    """Rank 0's global scheduler (E2 and the baselines)."""

    policy: str = "e2"
    """Placement policy; validated against the registry in ``rank0_scheduler.policy``."""
    window_s: float = 180.0
    """Load window H in seconds (Preble: 3 minutes)."""
    profile: str = "llama3-8b-h100"
    """Cost-model profile name (``preble_hpc/profiles/NAME.json``) or a path to a profile file."""
    rebalance_ratio: float = 1.5
    """Rebalance when the heaviest rank's load exceeds the lightest's by this factor."""
    replicate_load_ratio: float = 2.0
    """Replicate a hot prefix when its holders' load exceeds the mean by this factor."""
    decode_heavy_hit_ratio: float = 0.7
    """A rank whose windowed hit ratio is at least this is decode-heavy and takes prefill-heavy
    new prompts when exploring."""
    tree_capacity_tokens: int = 4_000_000
    """Cap of the global radix tree in tokens; least-recently-used nodes no rank holds go first."""
    online_fit: bool = True
    """Re-fit cost-model coefficients from the timings that workers report."""
    replicate_ttft_growth: float = 2.0
    """Replicate a hot prefix when the mean TTFT of every holder in the newer half of the window is
    this many times the older half (Preble: 2x)."""
    ttft_min_samples: int = 4
    """TTFT samples each half-window needs before its growth counts as evidence."""
    cost_fit_forgetting: float = 0.995
    """Forgetting factor of the online cost fit (recursive least squares): each new timing
    discounts older ones by this factor; 1.0 never forgets."""
    cost_fit_noise: float = 0.2
    """Relative noise assumed on worker timings (0.2: +-20%); larger trusts the profile longer."""

    def __post_init__(self) -> None:
        _positive(self, "window_s", "tree_capacity_tokens", "ttft_min_samples", "cost_fit_noise")
        _require(
            self.replicate_ttft_growth > 1,
            f"SchedulerConfig.replicate_ttft_growth must be > 1, got {self.replicate_ttft_growth}",
        )
        _require(
            0 < self.cost_fit_forgetting <= 1,
            f"SchedulerConfig.cost_fit_forgetting must be in (0, 1], "
            f"got {self.cost_fit_forgetting}",
        )
        _require(
            self.rebalance_ratio > 1,
            f"SchedulerConfig.rebalance_ratio must be > 1, got {self.rebalance_ratio}",
        )
        _require(
            self.replicate_load_ratio > 1,
            f"SchedulerConfig.replicate_load_ratio must be > 1, got {self.replicate_load_ratio}",
        )
        _require(
            0 <= self.decode_heavy_hit_ratio <= 1,
            f"SchedulerConfig.decode_heavy_hit_ratio must be in [0, 1], "
            f"got {self.decode_heavy_hit_ratio}",
        )


@dataclass(frozen=True)
class RuntimeConfig:
    """The MPI runtime shared by serve and batch."""

    max_inflight: int = 256
    """Requests rank 0 keeps in flight across all workers (admission control / backpressure)."""
    stats_interval_s: float = 0.5
    """How often each worker sends ``LoadStats``."""
    idle_sleep_s: float = 0.001
    """Longest sleep of an idle poll loop (an MPI rank blocked in recv spins a whole core)."""
    worker_silence_timeout_s: float = 600.0
    """A worker that holds requests and sends nothing (not even ``LoadStats``) for this long is
    treated as failed: its requests are re-routed, and rank 0 never waits on it forever."""

    def __post_init__(self) -> None:
        _positive(
            self, "max_inflight", "stats_interval_s", "idle_sleep_s", "worker_silence_timeout_s"
        )
