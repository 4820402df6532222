"""Which CPU cores a worker's engine may use when several workers share a CPU-only node.

vLLM's CPU build pins each engine's OpenMP threads itself (``VLLM_CPU_OMP_THREADS_BIND=auto``),
but every engine picks the same cores: it sees one local rank of its own. Two worker ranks on
one node then compute on the same core while another sits idle (on the 2-core CI machine: both
on core 0, core 1 "reserved"). Measured there, two 12000-token requests, one per engine: 90 s
with vLLM's choice, 76 s with a core each.

So when the node's worker ranks share one CPU set (no launcher binding), each takes its own
contiguous slice of it; when the launcher already gave each task its own CPUs (Slurm's
``--cpu-bind``, ``mpiexec --bind-to``), or one worker has the node, vLLM keeps its own choice.
A ``VLLM_CPU_OMP_THREADS_BIND`` set by the user always wins (see ``engine.py``). GPU builds of
vLLM ignore all of this.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from preble_hpc.transport import NodePeer

__all__ = ["worker_cores", "format_cpu_list"]


def worker_cores(rank: int, peers: Sequence[NodePeer]) -> tuple[int, ...] | None:
    """Cores for worker ``rank``'s engine, or ``None`` to leave vLLM's own choice.

    ``peers``: every rank on this node (rank 0, which only schedules, is left out of the split).
    With fewer cores than workers, worker ``i`` gets core ``i mod n``.
    """
    workers = sorted((p for p in peers if p.rank != 0), key=lambda p: p.rank)
    mine = next((p for p in workers if p.rank == rank), None)
    if mine is None or len(workers) < 2 or not mine.cpus:
        return None
    if any(p.cpus != mine.cpus for p in workers):
        return None  # the launcher bound each task already
    cores = sorted(mine.cpus)
    i, n = workers.index(mine), len(workers)
    if len(cores) < n:
        return (cores[i % len(cores)],)
    # Spread the remainder over the first workers: 5 cores, 2 workers -> 3 + 2.
    per, extra = divmod(len(cores), n)
    start = i * per + min(i, extra)
    return tuple(cores[start : start + per + (1 if i < extra else 0)])


def format_cpu_list(cores: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (the syntax of ``VLLM_CPU_OMP_THREADS_BIND``)."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(set(cores)):
        if run and c != run[-1] + 1:
            out.append(_run_text(run))
            run = []
        run.append(c)
    if run:
        out.append(_run_text(run))
    return ",".join(out)


def _run_text(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"
