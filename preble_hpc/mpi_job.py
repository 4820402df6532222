"""One MPI job, two roles: ``run_job`` branches on the rank for `batch` and `serve` alike.

::

    rank 0       GlobalScheduler + Rank0Runtime, handshake, then rank0_main(runtime, stop)
    rank 1..N    worker loop around a vLLM engine (worker_rank.main.run_worker)

Rank 0 owns the job's exit code and its end: whatever ``rank0_main`` does (returns, raises, or
the job gets SIGTERM from Slurm's time limit), the workers get ``Shutdown`` and confirm it; a
worker that cannot be stopped in ``shutdown_timeout_s`` makes rank 0 abort the MPI job rather than
hang. Workers ignore SIGTERM/SIGINT (rank 0 gets them too and stops them in order).
"""

from __future__ import annotations

import logging
import random
import signal
import sys
import threading
import time
from collections.abc import Callable

from preble_hpc.cli_args import JobConfig
from preble_hpc.messages import Shutdown, WorkerStopped
from preble_hpc.rank0_scheduler.main import Rank0Runtime, StartupError, tune_gc
from preble_hpc.transport import MpiTransport, Transport, TransportError

log = logging.getLogger("preble_hpc.job")

#: Exit codes of rank 0 (the job's): usage/config errors, and a job that could not run.
EXIT_USAGE = 2
EXIT_JOB_FAILED = 3
EXIT_INTERRUPTED = 130

Rank0Main = Callable[[Rank0Runtime, threading.Event], int]


def run_job(
    job: JobConfig,
    rank0_main: Rank0Main,
    *,
    command: str = "batch",
    transport: Transport | None = None,
) -> int:
    """Run this process's part of the job and return its exit code.

    ``rank0_main(runtime, stop)`` runs on rank 0 after every worker reported ready; ``stop`` is
    set by SIGTERM/SIGINT. It may call ``runtime.shutdown`` itself (e.g. to drain); otherwise
    the workers are stopped without draining when it returns.
    """
    if transport is None:
        try:
            transport = MpiTransport(idle_sleep_s=job.runtime.idle_sleep_s)
        except TransportError as exc:
            print(f"preble-hpc {command}: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if transport.size < 2:
        print(
            f"preble-hpc {command}: error: this is an MPI job of N+1 ranks (rank 0 schedules, "
            f"ranks 1..N each run a vLLM engine), but it was started as a single process.\n"
            f"Launch it with, e.g. for 2 workers:\n"
            f"  mpiexec -n 3 preble-hpc {command} ...        (.venv/bin/mpiexec on a laptop)\n"
            f"  srun -n 3 --mpi=pmi2 preble-hpc {command} ...  (under Slurm)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    stop = threading.Event()
    if transport.rank != 0:
        _ignore_stop_signals(transport.rank)
        from preble_hpc.worker_rank.main import run_worker

        return run_worker(transport, job.engine, job.local, job.runtime)
    _stop_on_signals(stop)
    return _run_rank0(job, rank0_main, transport, stop, command)


def _run_rank0(
    job: JobConfig, rank0_main: Rank0Main, transport: Transport, stop: threading.Event, command: str
) -> int:
    try:
        from preble_hpc.rank0_scheduler.scheduler import GlobalScheduler

        scheduler = GlobalScheduler(
            job.scheduler,
            list(range(1, transport.size)),
            clock=time.monotonic,
            rng=random.Random(job.engine.seed),
        )
    except Exception as exc:
        print(f"preble-hpc {command}: error: {exc}", file=sys.stderr)
        return _stop_workers_or_abort(transport, job, EXIT_USAGE)
    runtime = Rank0Runtime(transport, scheduler, job.runtime)
    try:
        runtime.wait_ready(job.startup_timeout_s, stop=stop)
    except StartupError as exc:
        print(f"preble-hpc {command}: error: {exc}", file=sys.stderr)
        code = EXIT_INTERRUPTED if stop.is_set() else EXIT_JOB_FAILED
        return _shutdown(runtime, transport, job, code)
    tune_gc(job.runtime.gc_gen0_threshold)
    try:
        code = rank0_main(runtime, stop)
    except Exception as exc:
        log.exception("rank 0 failed")
        print(f"preble-hpc {command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    return _shutdown(runtime, transport, job, code)


def _shutdown(runtime: Rank0Runtime, transport: Transport, job: JobConfig, code: int) -> int:
    if not runtime.shutdown(drain=False, timeout_s=job.shutdown_timeout_s):
        return _abort(transport, code)
    transport.close()
    return code


def _stop_workers_or_abort(transport: Transport, job: JobConfig, code: int) -> int:
    """Stop workers that rank 0 never ran a runtime for (they may still be starting engines)."""
    workers = set(range(1, transport.size))
    for rank in workers:
        transport.send(rank, Shutdown(drain=False))
    transport.flush()
    deadline = time.monotonic() + job.startup_timeout_s + job.shutdown_timeout_s
    while workers and time.monotonic() < deadline:
        for source, msg in transport.poll(0.05):
            if isinstance(msg, WorkerStopped):
                workers.discard(source)
    if workers:
        return _abort(transport, code)
    transport.close()
    return code


def _abort(transport: Transport, code: int) -> int:
    print(
        f"preble-hpc: worker rank(s) did not stop in time; aborting the MPI job "
        f"(exit code {code or 1})",
        file=sys.stderr,
    )
    sys.stderr.flush()
    sys.stdout.flush()
    abort = getattr(transport, "abort", None)
    if abort is not None:
        abort(code or 1)
    return code or 1


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: object) -> None:
        log.warning(
            "rank 0: %s received; stopping (outputs so far are kept)", signal.Signals(signum).name
        )
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def _ignore_stop_signals(rank: int) -> None:
    def handler(signum: int, frame: object) -> None:
        log.info(
            "rank %d: %s received; waiting for rank 0 to stop this worker",
            rank,
            signal.Signals(signum).name,
        )

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
