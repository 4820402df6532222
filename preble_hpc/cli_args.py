"""Command-line flags -> config dataclasses, shared by `batch` and `serve`.

Each flag maps to one config field. Flags default to "not given" so ``config.py`` stays the one
source of defaults: only what the user typed is passed to the dataclass, which validates it.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from preble_hpc.config import (
    ConfigError,
    EngineConfig,
    LocalSchedulerConfig,
    RuntimeConfig,
    SchedulerConfig,
)
from preble_hpc.rank0_scheduler.cost_model import load_profile
from preble_hpc.rank0_scheduler.policy import check_policy_name


@dataclass(frozen=True)
class JobConfig:
    """Everything an MPI job (batch or serve) needs, parsed once on every rank."""

    engine: EngineConfig
    scheduler: SchedulerConfig
    local: LocalSchedulerConfig
    runtime: RuntimeConfig
    startup_timeout_s: float = 900.0
    """Longest wait for every worker's engine to start (big models on slow disks take minutes)."""
    shutdown_timeout_s: float = 60.0
    """Longest wait for the workers to confirm a shutdown before the MPI job is aborted."""


@dataclass(frozen=True)
class _Flag:
    flag: str
    field: str
    help: str
    type: Callable[[str], Any] | None = None  # None: a switch (see ``action``)
    action: str = "store_true"


_ENGINE_FLAGS = (
    _Flag("--model", "model", "local HF model folder (required)", str),
    _Flag("--tokenizer", "tokenizer", "tokenizer folder (default: --model)", str),
    _Flag("--dtype", "dtype", "auto, bfloat16, float16 or float32", str),
    _Flag("--max-model-len", "max_model_len", "longest prompt + output in tokens", int),
    _Flag("--kv-cache-gib", "kv_cache_gib", "KV-cache size per engine in GiB", float),
    _Flag(
        "--kv-offload-gib",
        "kv_offload_gib",
        "host-memory KV tier per engine in GiB (vLLM CPU offloading; GPU builds only)",
        float,
    ),
    _Flag("--gpu-memory-utilization", "gpu_memory_utilization", "GPU memory fraction", float),
    _Flag("--max-num-seqs", "max_num_seqs", "most sequences in one engine batch", int),
    _Flag("--max-num-batched-tokens", "max_num_batched_tokens", "token budget of a step", int),
    _Flag("--tensor-parallel-size", "tensor_parallel_size", "GPUs per engine", int),
    _Flag("--enforce-eager", "enforce_eager", "no CUDA graphs / compilation (use on CPU)"),
    _Flag("--seed", "seed", "engine and scheduler seed", int),
    _Flag("--block-size", "block_size", "KV block size in tokens", int),
    _Flag(
        "--no-prefix-caching",
        "enable_prefix_caching",
        "disable vLLM prefix caching",
        action="store_false",
    ),
    _Flag(
        "--no-kv-events",
        "kv_events",
        "do not mirror engine KV events into the global tree",
        action="store_false",
    ),
)
_SCHEDULER_FLAGS = (
    _Flag("--policy", "policy", "placement policy (e2 or a baseline)", str),
    _Flag("--window-s", "window_s", "load window H in seconds", float),
    _Flag("--profile", "profile", "cost-model profile name or file", str),
    _Flag(
        "--rebalance-ratio", "rebalance_ratio", "heaviest/lightest load ratio to rebalance", float
    ),
    _Flag(
        "--replicate-load-ratio", "replicate_load_ratio", "load ratio to replicate a prefix", float
    ),
    _Flag(
        "--decode-heavy-hit-ratio",
        "decode_heavy_hit_ratio",
        "hit ratio of a decode-heavy rank",
        float,
    ),
    _Flag(
        "--new-prefix-slack",
        "new_prefix_slack",
        "cost slack within which a new prefix goes to the smallest cache (0: off)",
        float,
    ),
    _Flag(
        "--explore-prefill-window-s",
        "explore_prefill_window_s",
        "E2 explores price decode beside the prefill placed in this window (0: off)",
        float,
    ),
    _Flag(
        "--new-prefix-min-hit-ratio",
        "new_prefix_min_hit_ratio",
        "mean hit ratio of the ranks from which new prefixes are spread",
        float,
    ),
    _Flag(
        "--tree-capacity-tokens",
        "tree_capacity_tokens",
        "cap of the global radix tree (0: twice the workers' KV capacity, at least 4M)",
        int,
    ),
    _Flag(
        "--no-online-fit",
        "online_fit",
        "keep the profile's cost coefficients fixed",
        action="store_false",
    ),
)
_LOCAL_FLAGS = (
    _Flag("--local-groups", "num_groups", "priority groups of the local scheduler", int),
    _Flag("--local-quota", "quota", "base admission quota k of the local scheduler", int),
    _Flag("--max-engine-waiting", "max_engine_waiting", "most requests waiting inside vLLM", int),
    _Flag(
        "--eviction-window-s",
        "eviction_window_s",
        "seconds after a KV eviction during which queued cache hits go first (0: off)",
        float,
    ),
)
_RUNTIME_FLAGS = (
    _Flag("--max-inflight", "max_inflight", "requests in flight across all workers", int),
    _Flag("--stats-interval-s", "stats_interval_s", "how often workers report load", float),
    _Flag("--idle-sleep-s", "idle_sleep_s", "longest sleep of an idle poll loop", float),
    _Flag(
        "--worker-silence-timeout-s",
        "worker_silence_timeout_s",
        "a busy worker silent this long is treated as failed",
        float,
    ),
    _Flag(
        "--gc-gen0-threshold",
        "gc_gen0_threshold",
        "rank 0's generation-0 GC threshold (0: Python's default)",
        int,
    ),
)
_GROUPS: tuple[tuple[str, type, tuple[_Flag, ...]], ...] = (
    ("engine (vLLM on every worker rank)", EngineConfig, _ENGINE_FLAGS),
    ("global scheduler (rank 0)", SchedulerConfig, _SCHEDULER_FLAGS),
    ("local scheduler (every worker rank)", LocalSchedulerConfig, _LOCAL_FLAGS),
    ("MPI runtime", RuntimeConfig, _RUNTIME_FLAGS),
)


def _dest(cls: type, flag: _Flag) -> str:
    return f"{cls.__name__}.{flag.field}"


def _default_of(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


def add_job_args(parser: argparse.ArgumentParser) -> None:
    """Add every engine / scheduler / runtime flag to ``parser``."""
    for title, cls, flags in _GROUPS:
        group = parser.add_argument_group(title)
        for flag in flags:
            if flag.type is None:
                group.add_argument(
                    flag.flag,
                    dest=_dest(cls, flag),
                    action=flag.action,
                    default=None,
                    help=flag.help,
                )
            else:
                default = _default_of(cls, flag.field)
                text = flag.help
                if default is not dataclasses.MISSING:
                    text += f" (default: {default})"
                group.add_argument(
                    flag.flag,
                    dest=_dest(cls, flag),
                    type=flag.type,
                    default=None,
                    metavar=flag.field.upper(),
                    help=text,
                )
    job = parser.add_argument_group("job")
    job.add_argument(
        "--startup-timeout-s",
        type=float,
        default=JobConfig.startup_timeout_s,
        help="longest wait for every engine to start (default: %(default)s)",
    )
    job.add_argument(
        "--shutdown-timeout-s",
        type=float,
        default=JobConfig.shutdown_timeout_s,
        help="longest wait for the workers to stop (default: %(default)s)",
    )


def _build(cls: type, flags: tuple[_Flag, ...], args: argparse.Namespace) -> Any:
    given = {f.field: getattr(args, _dest(cls, f)) for f in flags}
    return cls(**{k: v for k, v in given.items() if v is not None})


def job_config_from_args(args: argparse.Namespace) -> JobConfig:
    """Build and validate every config from parsed flags; raises ``ConfigError``."""
    if getattr(args, _dest(EngineConfig, _ENGINE_FLAGS[0])) is None:
        raise ConfigError("--model PATH is required (a local HF model folder)")
    engine, scheduler, local, runtime = (_build(cls, flags, args) for _, cls, flags in _GROUPS)
    # Rank 0's scheduler would find these only after every engine started: check them now.
    check_policy_name(scheduler.policy)
    load_profile(scheduler.profile)
    if args.startup_timeout_s <= 0 or args.shutdown_timeout_s <= 0:
        raise ConfigError("--startup-timeout-s and --shutdown-timeout-s must be > 0")
    return JobConfig(
        engine, scheduler, local, runtime, args.startup_timeout_s, args.shutdown_timeout_s
    )
