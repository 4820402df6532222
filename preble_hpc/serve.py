"""`preble-hpc serve`: online serving over gRPC from rank 0 of an MPI job of N+1 ranks.

    mpiexec -n 3 preble-hpc serve --model PATH [--host H] [--port P] [--addr-file F]
                                  [--metrics-port M] [--policy e2] [engine flags]
    srun --mpi=pmi2 -n 3 preble-hpc serve ...          (see slurm/preble.sbatch)

Life of the job (rank 0)::

    workers start engines ─▶ all ready ─▶ gRPC up (health SERVING) ─▶ address to F (atomic)
    ... serve ...
    SIGTERM/SIGINT ─▶ health NOT_SERVING, F removed, new calls UNAVAILABLE
                   ─▶ open streams finish (up to --drain-timeout-s; then they get UNAVAILABLE)
                   ─▶ workers stopped ─▶ exit 0

Slurm sends SIGTERM to every rank; the workers ignore it and wait for rank 0 (``mpi_job``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import sys
import threading
import time
from pathlib import Path

from preble_hpc.cli_args import add_job_args, job_config_from_args
from preble_hpc.config import ConfigError
from preble_hpc.mpi_job import EXIT_USAGE, run_job

log = logging.getLogger("preble_hpc.serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preble-hpc serve",
        description="Serve a model over gRPC (preble.v1.Preble) from rank 0 of an MPI job of "
        "N+1 ranks: rank 0 schedules with E2, ranks 1..N each run a vLLM engine.",
        epilog="Run as: mpiexec -n 3 preble-hpc serve --model PATH --port 0 --addr-file F",
    )
    net = parser.add_argument_group("network (rank 0)")
    net.add_argument(
        "--host", default="0.0.0.0", help="interface to listen on (default: %(default)s, all)"
    )
    net.add_argument(
        "--port",
        type=int,
        default=50051,
        help="gRPC port; 0 picks a free one (default: %(default)s)",
    )
    net.add_argument(
        "--advertise-host",
        help="host name written to --addr-file (default: --host, or this node's "
        "host name when listening on all interfaces)",
    )
    net.add_argument(
        "--addr-file",
        help="write HOST:PORT here (atomically) once every worker is ready; removed "
        "when draining starts",
    )
    net.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on this port (0: a free one; default: off)",
    )
    net.add_argument("--metrics-host", help="interface of the metrics server (default: --host)")
    net.add_argument(
        "--drain-timeout-s",
        type=float,
        default=90.0,
        help="on SIGTERM, longest wait for open requests to finish before they are "
        "failed with UNAVAILABLE (default: %(default)s; keep it below Slurm's "
        "--signal lead time)",
    )
    net.add_argument(
        "--max-streams",
        type=int,
        help="most concurrent gRPC streams per client connection (default: gRPC's)",
    )
    net.add_argument("--log-level", default="INFO", help="python logging level (default: INFO)")
    add_job_args(parser)
    return parser


def write_addr_file(path: str | Path, address: str) -> None:
    """Write ``address`` + newline to ``path`` atomically: a reader never sees a partial line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(address + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_args(args: argparse.Namespace) -> None:
    """Checked on every rank before any engine starts."""
    for name in ("port", "metrics_port"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 65535:
            raise ConfigError(f"--{name.replace('_', '-')} must be in 0..65535, got {value}")
    if args.drain_timeout_s < 0:
        raise ConfigError(f"--drain-timeout-s must be >= 0, got {args.drain_timeout_s}")
    if args.addr_file and not Path(args.addr_file).resolve().parent.is_dir():
        raise ConfigError(f"the folder of --addr-file {args.addr_file!r} does not exist")


class ServeRun:
    """Rank 0's part of `serve`: ``run(runtime, stop)`` is ``mpi_job``'s rank-0 main."""

    def __init__(self, args: argparse.Namespace, tokenizer_path: str, policy: str) -> None:
        self.args = args
        self.tokenizer_path = tokenizer_path
        self.policy = policy
        self._tokenizer: concurrent.futures.Future = concurrent.futures.Future()
        self._prefetching = False

    def prefetch_tokenizer(self) -> None:
        """Load the tokenizer (~5 s with the transformers import) while the engines start."""
        self._prefetching = True

        def load() -> None:
            from preble_hpc.tokenization import load_tokenizer

            try:
                self._tokenizer.set_result(load_tokenizer(self.tokenizer_path))
            except BaseException as exc:
                self._tokenizer.set_exception(exc)

        threading.Thread(target=load, name="tokenizer-prefetch", daemon=True).start()

    def run(self, runtime, stop: threading.Event) -> int:
        from preble_hpc.rank0_scheduler.ingress import IngressServer, advertised_host

        args = self.args
        if not self._prefetching:
            self.prefetch_tokenizer()
        tokenizer = self._tokenizer.result()
        server = IngressServer(
            runtime,
            tokenizer,
            runtime.max_model_len,
            policy=self.policy,
            max_concurrent_streams=args.max_streams,
        )
        try:
            port = server.start(args.host, args.port)
            if args.metrics_port is not None:
                server.serve_metrics(args.metrics_host or args.host, args.metrics_port)
        except OSError as exc:
            server.stop(grace_s=0)
            print(f"preble-hpc serve: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        try:
            address = f"{args.advertise_host or advertised_host(args.host)}:{port}"
            if args.addr_file:
                write_addr_file(args.addr_file, address)
            log.info(
                "serving %s on %s with %d workers (policy %s, max_model_len %d, rank 0 "
                "pid %d: SIGTERM it to drain)%s",
                self.tokenizer_path,
                address,
                len(runtime.live_ranks),
                self.policy,
                runtime.max_model_len,
                os.getpid(),
                f"; address written to {args.addr_file}" if args.addr_file else "",
            )
            while not stop.is_set():
                runtime.step()
                server.pump()
            return self._drain(runtime, server)
        finally:
            server.stop(grace_s=5.0)

    def _drain(self, runtime, server) -> int:
        args = self.args
        if args.addr_file:
            Path(args.addr_file).unlink(missing_ok=True)
        server.begin_drain()
        open_streams = server.active
        # Both counts: the streams the ingress holds open and the requests the runtime still
        # owes a result (they should agree; if they ever do not, this line says which side lost
        # track of a request).
        log.warning(
            "draining: health NOT_SERVING, %d request(s) open (%d in flight to the workers), "
            "waiting up to %.0f s",
            open_streams,
            runtime.inflight,
            args.drain_timeout_s,
        )
        deadline = time.monotonic() + args.drain_timeout_s
        while (server.active or runtime.inflight) and time.monotonic() < deadline:
            runtime.step()
            server.pump()
        left = server.active
        if left:
            server.fail_open_streams(
                "the server stopped before this request finished "
                f"(drain timeout {args.drain_timeout_s:.0f} s)"
            )
            log.error("drain timed out: %d request(s) failed with UNAVAILABLE", left)
        else:
            log.warning(
                "drained: all %d open request(s) finished (%d served in total); "
                "stopping the workers",
                open_streams,
                server.servicer.served,
            )
        return 0


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rank = next(
        (
            os.environ[v]
            for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")
            if v in os.environ
        ),
        "?",
    )
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s rank{rank} %(name)s %(levelname)s: %(message)s",
    )
    try:
        job = job_config_from_args(args)
        _check_args(args)
    except ConfigError as exc:
        print(f"preble-hpc serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    run = ServeRun(args, job.engine.tokenizer or job.engine.model, job.scheduler.policy)
    if rank == "0":
        run.prefetch_tokenizer()
    code = run_job(job, run.run, command="serve")
    if rank in ("0", "?"):
        log.info("exit %d", code)
    return code
