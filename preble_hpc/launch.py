"""`preble-hpc` / `python -m preble_hpc`: one command, subcommands dispatched lazily.

Each subcommand lives in the module that owns it and exposes ``main(argv) -> int``; importing a
module only when its subcommand runs keeps `preble-hpc sim` free of vLLM and MPI, and lets
`batch`/`serve` branch on the MPI rank inside their own module.
"""

from __future__ import annotations

import importlib
import sys

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny-model": ("preble_hpc.tiny_model", "write a small random Llama for tests/demo"),
    "batch": ("preble_hpc.offline", "offline batch inference over a prompt file (under mpirun)"),
    "serve": ("preble_hpc.serve", "serve over gRPC from rank 0 (under mpirun / srun)"),
    "client": ("preble_hpc.client", "send prompts to a running server and stream the output"),
    "sim": ("preble_hpc.sim.cli", "simulate a cluster and compare scheduling policies"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "usage: preble-hpc COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"preble-hpc: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
