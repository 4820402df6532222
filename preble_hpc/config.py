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
    """Weights/activation dtype for vLLM: ``auto``, ``bfloat16``, ``float16`` or ``float32``."""
    max_model_len: int | None = None
    """Longest prompt + output in tokens; ``None`` takes the model's own limit."""
    kv_cache_gib: float | None = None
    """KV-cache size per engine in GiB (fractions allowed), passed as vLLM's
    ``kv_cache_memory_bytes`` on CPU and GPU alike; it then replaces ``gpu_memory_utilization``
    for sizing the cache, and the engine drops ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB only),
    which would override it. ``None``: that variable on CPU, ``gpu_memory_utilization`` on GPU."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory vLLM may use (GPU only)."""
    kv_offload_gib: float | None = None
    """Host-memory KV tier per engine in GiB: vLLM's native CPU offloading
    (``kv_offloading_size``; CUDA and XPU builds only, the CPU build refuses it). The engine keeps
    a copy of the KV it computes there and loads a prefix the GPU has dropped instead of
    recomputing it; rank 0 counts the tier in what the rank holds (``WorkerReady.host_kv_tokens``)
    and learns from the KV events when a block has left both. ``None``: no host tier."""
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
    cpu_cores: tuple[int, ...] | None = None
    """CPU build only: the cores this engine's OpenMP threads are pinned to (vLLM's
    ``VLLM_CPU_OMP_THREADS_BIND``, which wins when set). ``None``: vLLM's own choice. The worker
    fills it in when several workers share a node (``worker_rank/cpu_binding.py``)."""

    def __post_init__(self) -> None:
        _require(bool(self.model), "EngineConfig.model is empty: pass --model PATH")
        cores = self.cpu_cores
        _require(
            cores is None or (bool(cores) and all(isinstance(c, int) and c >= 0 for c in cores)),
            f"EngineConfig.cpu_cores must be None or core ids >= 0, got {cores!r}",
        )
        _positive(self, "max_model_len", "kv_cache_gib", "max_num_seqs", "max_num_batched_tokens")
        _positive(self, "kv_offload_gib")
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
    eviction_window_s: float = 5.0
    """For this long after the engine last evicted cached KV, a queued request of a higher group
    (a hit) goes before the rest of a lower group's turn, if its group has quota left in the
    round: under eviction the cold prompts of that turn would evict the prefix it waits to reuse.
    0: Preble's plain rounds."""

    def __post_init__(self) -> None:
        _positive(self, "num_groups", "quota")
        _require(
            self.eviction_window_s >= 0,
            f"LocalSchedulerConfig.eviction_window_s must be >= 0 (0 turns it off), "
            f"got {self.eviction_window_s}",
        )
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
    """E2 rebalances an exploit to a rank whose prefill backlog is below the chosen holder's by
    this factor (and only if the request's latency cost is lower there)."""
    replicate_load_ratio: float = 2.0
    """Replicate a hot prefix when its holders' prefill backlog exceeds the mean by this factor."""
    decode_heavy_hit_ratio: float = 0.7
    """A rank whose windowed hit ratio is at least this is decode-heavy and takes prefill-heavy
    new prompts when exploring, if it costs no more than the cheapest rank."""
    new_prefix_slack: float = 0.2
    """E2 places a prompt that no rank holds (beyond what every rank holds) on the rank holding
    the fewest tokens among those within this fraction of the cheapest cost: that choice decides
    where the prefix's future hits go, which the one request's cost cannot see. 0: off."""
    new_prefix_min_hit_ratio: float = 0.5
    """...only while the ranks' mean windowed hit ratio is at least this: below it most prompt
    tokens are never reused (the Mooncake trace: 0.3, most prompts short and unique), and moving
    a prompt off the cheapest rank buys nothing later. It also keeps the cold start, before any
    hit, to the plain cost."""
    explore_prefill_window_s: float = 30.0
    """When E2 explores, it prices the request's decode on a rank as slowed by the prefill it
    placed there in the last this-many seconds, D / (1 - rho) with rho the placed prefill seconds
    per second (capped at 0.9): a request that decodes where long prompts keep going decodes
    beside their chunks (the Mooncake trace's slowest requests). Exploits keep the plain D: a
    holder's placed prefill is mostly its own hits' suffixes. 0 turns it off."""
    tree_capacity_tokens: int = 0
    """Cap of the global radix tree in tokens: past it, nodes no rank holds go first (oldest
    first), then the least recently used copies the engines still hold (``forgotten_tokens``:
    rank 0 no longer sees those hits). 0 (default): twice the KV capacity the workers report, and
    at least 4M tokens, so that the cap grows with the cluster. A fixed 4M on 64 simulated H100s
    (27.6M tokens of KV) forgot 40M tokens of live copies on the Mooncake trace and cut E2's hit
    rate from 0.55 to 0.31; the tree's view runs ahead of the engines' (a prompt counts as held
    when it is placed), so a cap of exactly the engines' total still forgets some."""
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
    arrival_window: int = 256
    """E2's queue term measures each rank's arrival rate over this many latest placements
    (cluster-wide): enough for a rate, recent enough to follow a burst."""

    def __post_init__(self) -> None:
        _positive(self, "window_s", "ttft_min_samples", "cost_fit_noise")
        _require(
            self.tree_capacity_tokens >= 0,
            f"SchedulerConfig.tree_capacity_tokens must be >= 0 (0: sized from the workers' KV "
            f"capacity), got {self.tree_capacity_tokens}",
        )
        _require(
            self.arrival_window >= 2,
            f"SchedulerConfig.arrival_window must be >= 2 placements, got {self.arrival_window}",
        )
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
        _require(
            self.new_prefix_slack >= 0,
            f"SchedulerConfig.new_prefix_slack must be >= 0, got {self.new_prefix_slack}",
        )
        _require(
            self.explore_prefill_window_s >= 0,
            f"SchedulerConfig.explore_prefill_window_s must be >= 0 (0 turns it off), "
            f"got {self.explore_prefill_window_s}",
        )
        _require(
            0 <= self.new_prefix_min_hit_ratio <= 1,
            f"SchedulerConfig.new_prefix_min_hit_ratio must be in [0, 1], "
            f"got {self.new_prefix_min_hit_ratio}",
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

    gc_gen0_threshold: int = 50_000
    """Rank 0 only: Python's generation-0 GC threshold, set once the workers are ready (after
    ``gc.freeze()`` of the startup heap). Every decision allocates a few short-lived objects,
    and at the default 700 young collections also walk the tree's newest nodes: ~3% of the
    decision rate and ~15% of its p99 in ``bench/sched_overhead.py`` (``--gc default``). 0 keeps
    Python's defaults."""

    def __post_init__(self) -> None:
        _positive(
            self, "max_inflight", "stats_interval_s", "idle_sleep_s", "worker_silence_timeout_s"
        )
        _require(
            self.gc_gen0_threshold >= 0,
            f"RuntimeConfig.gc_gen0_threshold must be >= 0 (0: Python's default), "
            f"got {self.gc_gen0_threshold!r}",
        )


@dataclass(frozen=True)
class SimConfig:
    """The cluster simulator (``preble_hpc.sim``): simulated engines that are the ground truth the
    schedulers are graded by. Timing defaults model Llama-3-8B (bf16) under vLLM on one H100 80GB;
    see ``preble_hpc/sim/engine.py`` for where each figure comes from."""

    gpus: int = 8
    """Simulated GPUs (one engine each)."""
    kv_capacity_tokens: int = 432_000
    """KV-cache capacity of one engine in tokens (H100 80GB, 0.9 utilization, Llama-3-8B at
    128 KiB per token: ~53 GiB of KV)."""
    block_size: int = 16
    """KV block size in tokens (vLLM's default on GPU); reuse and eviction are per block."""
    max_num_seqs: int = 256
    """Most sequences one engine runs at once."""
    max_num_batched_tokens: int = 8192
    """Token budget of one engine step (decodes first, then chunked prefill)."""
    max_model_len: int = 131_072
    """Longest prompt + output an engine accepts."""
    step_base_s: float = 0.007
    """Fixed cost of one engine step (weights read once, launch, sampling)."""
    prefill_per_token_s: float = 2.2e-5
    """Per prefill token (the linear layers)."""
    prefill_attention_s: float = 2.4e-9
    """Per (new token x context token) pair of prefill attention."""
    decode_per_seq_s: float = 2.0e-5
    """Per decoding sequence in a step."""
    decode_per_kv_token_s: float = 4.5e-8
    """Per KV token read by decode attention (memory bound: 128 KiB per token)."""
    host_kv_tokens: int = 0
    """KV tokens of each engine's host-memory tier (vLLM's CPU offloading, ``kv_offloading_size``);
    0: none. Write-through, as vLLM's offloading connector stores what the GPU computes: a block
    enters it when it enters the GPU's cache, and it evicts LRU on its own. A prompt whose prefix
    the GPU has lost but the host still holds loads it instead of computing it. At least
    ``kv_capacity_tokens`` when set: a write-through tier smaller than the GPU's adds nothing.
    (6x the default KV, 2.59M tokens, is ~340 GB per GPU at 128 KiB per token.)"""
    host_load_per_token_s: float = 3.3e-6
    """Host-to-GPU transfer time per KV token: 131,072 B per token over PCIe Gen5 x16 at ~40 GB/s
    (64 GB/s a direction at peak; H100 pinned-memory copies measure ~55 GB/s, block-sized DMA
    less), ~7x less than computing it (2.2e-5 s and up). Transfers are asynchronous, as
    vLLM's are: the request waits for its own load, FIFO on the engine's one link, while the
    GPU runs other steps; the copy into host memory is not charged (the other direction)."""
    stats_interval_s: float = 0.5
    """How often each engine sends ``LoadStats`` to the scheduler."""
    drain_s: float | None = None
    """Virtual seconds after the last arrival before the run stops; requests not finished by then
    count as unfinished. ``None``: 10% of the arrival span, at least 30 s."""
    seed: int = 0
    """Seed of the scheduler's RNG."""

    def __post_init__(self) -> None:
        _positive(self, "gpus", "kv_capacity_tokens", "block_size", "max_num_seqs")
        _positive(self, "max_num_batched_tokens", "max_model_len", "stats_interval_s", "drain_s")
        _positive(self, "step_base_s", "prefill_per_token_s")
        for name in (
            "prefill_attention_s",
            "decode_per_seq_s",
            "decode_per_kv_token_s",
            "host_load_per_token_s",
        ):
            value = getattr(self, name)
            _require(value >= 0, f"SimConfig.{name} must be >= 0, got {value}")
        _require(
            self.kv_capacity_tokens >= self.block_size,
            f"SimConfig.kv_capacity_tokens ({self.kv_capacity_tokens}) must hold one block "
            f"({self.block_size} tokens)",
        )
        _require(
            self.host_kv_tokens == 0 or self.host_kv_tokens >= self.kv_capacity_tokens,
            f"SimConfig.host_kv_tokens must be 0 (no host tier) or at least kv_capacity_tokens "
            f"({self.kv_capacity_tokens}): the tier is write-through, got {self.host_kv_tokens}",
        )
