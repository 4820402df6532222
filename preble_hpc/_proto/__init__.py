"""Python stubs of ``proto/preble.proto`` (package ``preble.v1``), generated and checked in.

Why checked in: users get working stubs from a plain ``pip install`` with no code generation
step, and the generated import path is fixed (``preble_hpc._proto.preble_pb2``). The proto is
compiled under the virtual path ``preble_hpc/_proto/preble.proto`` (``-Ipreble_hpc/_proto=proto``)
so that the generated ``_grpc`` module imports its ``_pb2`` sibling by its package path.
``proto/preble.proto`` stays the one source; ``make proto`` (``python -m preble_hpc._proto``)
regenerates, and ``tests/unit/test_proto.py`` fails when these files are stale.

The stubs pin a minimum runtime: grpcio >= the grpcio-tools that generated them, protobuf >= its
protoc (see the headers of ``preble_pb2*.py``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: Files written by ``generate``, relative to the output root.
GENERATED = (
    "preble_hpc/_proto/preble_pb2.py",
    "preble_hpc/_proto/preble_pb2.pyi",
    "preble_hpc/_proto/preble_pb2_grpc.py",
)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def generate(out_root: Path, proto_dir: Path | None = None) -> list[Path]:
    """Compile ``proto/preble.proto`` into ``out_root/preble_hpc/_proto/``; returns the files."""
    proto_dir = proto_dir or repo_root() / "proto"
    out_root.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-Ipreble_hpc/_proto={proto_dir}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--pyi_out={out_root}",
        "preble_hpc/_proto/preble.proto",
    ]
    subprocess.run(cmd, check=True)
    return [out_root / name for name in GENERATED]
