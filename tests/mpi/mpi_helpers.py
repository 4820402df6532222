"""Helpers for tests that launch real MPI jobs (the mpich wheel's mpiexec from this venv)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
PREBLE = BIN / "preble-hpc"

#: Engine flags of every CPU test job: small KV cache, no compilation, exact float32 maths.
CPU_ENGINE_FLAGS = [
    "--enforce-eager",
    "--dtype",
    "float32",
    "--kv-cache-gib",
    "1",
    "--seed",
    "0",
    "--max-model-len",
    "4096",
]


def mpi_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.update(extra)
    return env


def batch_cmd(n_ranks: int, model: Path, input_path: Path, output: Path, *flags: str) -> list[str]:
    return [
        str(MPIEXEC),
        "-n",
        str(n_ranks),
        str(PREBLE),
        "batch",
        "--model",
        str(model),
        "--input",
        str(input_path),
        "--output",
        str(output),
        "--no-progress",
        *CPU_ENGINE_FLAGS,
        *flags,
    ]


def run(cmd: list[str], timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
    """Run a job to its end; a hang fails the test instead of the whole session."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=mpi_env(**env))
