"""Throughput and latency through the gRPC ingress, and what the ingress adds per request.

    python bench/grpc_load.py                       # in-process: fake instant workers, no vLLM
    python bench/grpc_load.py --clients 128 --requests 4000 --json out.json
    python bench/grpc_load.py --mpi                 # + rank 0 as deployed (mpiexec, MPI ranks)
    python bench/grpc_load.py --addr HOST:PORT      # a live `preble-hpc serve` (load only)

In-process mode runs rank 0 for real (Rank0Runtime + GlobalScheduler + IngressServer, the same
threads as `preble-hpc serve`) over an in-memory transport to worker threads whose fake engine
answers every request at once (one token per step), so the numbers are rank 0's own cost:

- ``direct``: a client thread tokenizes, calls ``Rank0Runtime.submit`` and waits for the final
  event;
- ``grpc x1``: the same requests, one at a time, through the ingress over localhost (a client
  thread in this process, so it competes with rank 0 for the GIL: conservative; the three
  one-at-a-time modes are interleaved request by request so they see the same background load);
  ``ingress overhead`` = p50(grpc x1) - p50(direct): validation, tokenization, protobuf, the
  asyncio hop and HTTP/2 on localhost (target: under 1 ms);
- ``grpc floor x1``: the same client against a no-op servicer: Python gRPC's own cost per
  request on this machine, the part of the overhead no ingress code can remove;
- ``grpc xC``: C concurrent streaming clients (grpc.aio, in a separate process so they do not
  share rank 0's GIL): requests/s and TTFT/latency percentiles;
- ``mpi grpc xC`` (``--mpi``): the same load against `mpiexec -n W+1` serve whose workers answer
  at once: rank 0 as deployed (its own process, MpiTransport), without the fake workers' threads
  competing for its GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT_WORDS = ("system", "prompt", "shared", "prefix", "tool", "call", "answer", "question")


def prompts(n: int, seed: int = 0) -> list[str]:
    """Prompts with a few shared prefixes (so the tree and E2 have work) and unique tails."""
    rng = random.Random(seed)
    prefixes = [" ".join(rng.choice(PROMPT_WORDS) for _ in range(40)) for _ in range(8)]
    return [
        f"{rng.choice(prefixes)} #{i} " + " ".join(rng.choice(PROMPT_WORDS) for _ in range(8))
        for i in range(n)
    ]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def summarize(
    name: str, clients: int, wall_s: float, ttft: list[float], lat: list[float], errors: int = 0
) -> dict:
    return {
        "mode": name,
        "clients": clients,
        "requests": len(lat),
        "errors": errors,
        "req_per_s": len(lat) / wall_s if wall_s > 0 else 0.0,
        "ttft_p50_ms": pct(ttft, 50) * 1e3,
        "ttft_p99_ms": pct(ttft, 99) * 1e3,
        "latency_p50_ms": pct(lat, 50) * 1e3,
        "latency_p99_ms": pct(lat, 99) * 1e3,
        "latency_mean_ms": statistics.fmean(lat) * 1e3 if lat else float("nan"),
    }


# ---------------------------------------------------------------------------- in-process rank 0


class InstantWorker:
    """Contract C with no engine: one token per step, finished after max_tokens."""

    def __init__(self, engine_config, local_config, rank, *, stats_interval_s=0.5) -> None:
        from preble_hpc.messages import WorkerReady

        self.rank = rank
        self.reqs: dict = {}
        self._ready = WorkerReady(
            rank, kv_capacity_tokens=1_000_000, block_size=16, max_model_len=4096, model="instant"
        )
        self._stats_at = 0.0
        self._interval = stats_interval_s

    def ready_message(self):
        return self._ready

    def submit(self, msg) -> list:
        self.reqs[msg.request_id] = [msg, 0]
        return []

    def abort(self, request_id: str) -> list:
        from preble_hpc.messages import Finished

        item = self.reqs.pop(request_id, None)
        if item is None:
            return []
        return [Finished(request_id, self.rank, "abort", len(item[0].prompt_token_ids), 0, item[1])]

    def step(self) -> list:
        from preble_hpc.messages import Finished, LoadStats, TokenDelta

        out: list = []
        now = time.monotonic()
        if now - self._stats_at >= self._interval:
            self._stats_at = now
            out.append(LoadStats(self.rank, now, len(self.reqs), 0, 0.0))
        for rid, item in list(self.reqs.items()):
            msg, produced = item
            produced += 1
            out.append(TokenDelta(rid, [7], "x"))
            if produced >= msg.sampling.max_tokens:
                del self.reqs[rid]
                n = len(msg.prompt_token_ids)
                out.append(
                    Finished(
                        rid,
                        self.rank,
                        "length",
                        n,
                        min(msg.cached_hint, n),
                        produced,
                        prefill_s=1e-4,
                        decode_s_per_token=1e-4,
                    )
                )
            else:
                item[1] = produced
        return out

    def has_work(self) -> bool:
        return bool(self.reqs)

    def shutdown(self) -> None:
        pass


class InProcessRank0:
    """Rank 0 (runtime + scheduler + ingress) and ``n`` instant workers in this process."""

    def __init__(self, n_workers: int, policy: str, max_inflight: int) -> None:
        from preble_hpc.config import (
            EngineConfig,
            LocalSchedulerConfig,
            RuntimeConfig,
            SchedulerConfig,
        )
        from preble_hpc.rank0_scheduler.ingress import IngressServer
        from preble_hpc.rank0_scheduler.main import Rank0Runtime
        from preble_hpc.rank0_scheduler.scheduler import GlobalScheduler
        from preble_hpc.transport import InProcessTransport
        from preble_hpc.worker_rank.main import run_worker

        transports = InProcessTransport.create(n_workers + 1)
        runtime_config = RuntimeConfig(max_inflight=max_inflight)
        self.workers = [
            threading.Thread(
                target=run_worker,
                daemon=True,
                args=(
                    transports[r],
                    EngineConfig(model="instant"),
                    LocalSchedulerConfig(),
                    runtime_config,
                ),
                kwargs={"worker_factory": InstantWorker},
            )
            for r in range(1, n_workers + 1)
        ]
        for t in self.workers:
            t.start()
        scheduler = GlobalScheduler(
            SchedulerConfig(policy=policy),
            list(range(1, n_workers + 1)),
            clock=time.monotonic,
            rng=random.Random(0),
        )
        self.rt = Rank0Runtime(transports[0], scheduler, runtime_config)
        self.rt.wait_ready(30)
        self.tokenizer = _tokenizer()
        self.server = IngressServer(self.rt, self.tokenizer, self.rt.max_model_len, policy=policy)
        self.port = self.server.start("127.0.0.1", 0)
        self._stop = threading.Event()
        self._loop = threading.Thread(target=self._drive, name="rank0-loop", daemon=True)
        self._loop.start()

    def _drive(self) -> None:
        while not self._stop.is_set():
            self.rt.step()
            self.server.pump()

    def close(self) -> None:
        self.server.stop(grace_s=1)
        self._stop.set()
        self._loop.join(5)
        self.rt.shutdown(drain=False, timeout_s=5)


def _tokenizer():
    from transformers import PreTrainedTokenizerFast

    from preble_hpc.tiny_model import CHAT_TEMPLATE, _byte_level_tokenizer

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_tokenizer(),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


class FloorServer:
    """A servicer that does no work (one delta and the final per request, as the ingress sends
    when the output arrives at once), on its own asyncio thread like the ingress: what Python
    gRPC itself costs per request here, whoever implements the service."""

    def __init__(self, max_tokens: int) -> None:
        import grpc

        from preble_hpc._proto import preble_pb2 as pb
        from preble_hpc._proto import preble_pb2_grpc as pb_grpc

        class Echo(pb_grpc.PrebleServicer):
            async def Generate(self, request, context):
                ids = [7] * max_tokens
                yield pb.GenerateResponse(delta=pb.Delta(text="x" * max_tokens, token_ids=ids))
                yield pb.GenerateResponse(final=pb.Final(finish_reason="length"))

        ready = threading.Event()

        async def serve() -> None:
            server = grpc.aio.server()
            pb_grpc.add_PrebleServicer_to_server(Echo(), server)
            self.port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            self._stop = asyncio.Event()
            ready.set()
            await self._stop.wait()
            await server.stop(0)

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(serve(),), daemon=True
        )
        self._thread.start()
        ready.wait(30)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def run_sequential(
    r0: InProcessRank0, floor: FloorServer, texts: list[str], max_tokens: int
) -> list[dict]:
    """One request at a time, interleaving direct / through the ingress / against the no-op
    servicer, so all three see the same background load (this box is shared)."""
    import grpc

    from preble_hpc._proto import preble_pb2 as pb
    from preble_hpc._proto import preble_pb2_grpc as pb_grpc
    from preble_hpc.messages import SamplingSpec, TokenDelta
    from preble_hpc.rank0_scheduler.main import ClientRequest

    def direct(i: int, text: str) -> tuple[float, float]:
        done = threading.Event()
        first: list[float] = []

        def sink(event):
            if isinstance(event, TokenDelta):
                if not first:
                    first.append(time.perf_counter())
            else:
                done.set()

        t0 = time.perf_counter()
        ids = r0.tokenizer.encode(text)
        r0.rt.submit(ClientRequest(f"d{i}", ids, SamplingSpec(max_tokens=max_tokens)), sink)
        done.wait(10)
        t1 = time.perf_counter()
        return (first[0] if first else t1) - t0, t1 - t0

    def via(stub) -> object:
        def call(i: int, text: str) -> tuple[float, float]:
            req = pb.GenerateRequest(prompt=text, sampling=pb.SamplingParams(max_tokens=max_tokens))
            t0 = time.perf_counter()
            first = None
            for r in stub.Generate(req, timeout=30):
                if first is None and r.HasField("delta"):
                    first = time.perf_counter()
            t1 = time.perf_counter()
            return (first or t1) - t0, t1 - t0

        return call

    channels = [grpc.insecure_channel(f"127.0.0.1:{p}") for p in (r0.port, floor.port)]
    modes = {
        "direct": direct,
        "grpc x1": via(pb_grpc.PrebleStub(channels[0])),
        "grpc floor x1": via(pb_grpc.PrebleStub(channels[1])),
    }
    names = list(modes)
    samples: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    for i, text in enumerate(texts):
        for k in range(len(names)):
            name = names[(i + k) % len(names)]  # rotate the order: no mode always goes first
            ttft, lat = modes[name](i, text)
            samples[name][0].append(ttft)
            samples[name][1].append(lat)
    for ch in channels:
        ch.close()
    # each row's req/s is 1 / its own mean latency (the modes share one wall clock)
    return [summarize(n, 1, sum(samples[n][1]), *samples[n]) for n in names]


# ---------------------------------------------------------------------------- gRPC load client


async def _load(addr: str, texts: list[str], clients: int, max_tokens: int) -> dict:
    import grpc

    from preble_hpc._proto import preble_pb2 as pb
    from preble_hpc._proto import preble_pb2_grpc as pb_grpc

    ttft: list[float] = []
    lat: list[float] = []
    errors = 0
    queue = list(reversed(texts))
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.PrebleStub(channel)
        await stub.GetStats(pb.GetStatsRequest(), timeout=30)  # connect before timing

        async def client() -> None:
            nonlocal errors
            while queue:
                text = queue.pop()
                req = pb.GenerateRequest(
                    prompt=text, sampling=pb.SamplingParams(max_tokens=max_tokens)
                )
                t0 = time.perf_counter()
                first = None
                try:
                    async for r in stub.Generate(req, timeout=120):
                        if first is None and r.HasField("delta"):
                            first = time.perf_counter()
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                t1 = time.perf_counter()
                lat.append(t1 - t0)
                ttft.append((first or t1) - t0)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
    return summarize(f"grpc x{clients}", clients, wall, ttft, lat, errors)


def _load_in_subprocess(addr: str, texts: list[str], clients: int, max_tokens: int) -> dict:
    """Run the load client in its own process: it must not compete for rank 0's GIL."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_load_entry, (addr, texts, clients, max_tokens))


def _load_entry(addr: str, texts: list[str], clients: int, max_tokens: int) -> dict:
    return asyncio.run(_load(addr, texts, clients, max_tokens))


# ---------------------------------------------------------------------------- main


def _mean_handler_us(r0: InProcessRank0) -> float:
    """Mean seconds the ingress handler spent before handing a request to the runtime
    (validation + tokenization), from its own Prometheus histogram, in microseconds."""
    hist = r0.server.metrics.ingress
    count = sum(b.get() for b in hist._buckets)
    return hist._sum.get() / count * 1e6 if count else float("nan")


def print_table(rows: list[dict], overhead_ms: float | None) -> None:
    cols = (
        "mode",
        "clients",
        "requests",
        "errors",
        "req_per_s",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "latency_p50_ms",
        "latency_p99_ms",
    )
    print(" ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(
            " ".join(f"{r[c]:>14.2f}" if isinstance(r[c], float) else f"{r[c]:>14}" for c in cols)
        )
    if overhead_ms is not None:
        verdict = "ok" if overhead_ms < 1.0 else "OVER the 1 ms target"
        print(
            f"\ningress overhead per request (p50 grpc x1 - p50 direct): {overhead_ms:.3f} ms "
            f"({verdict})"
        )


def fake_serve_main(argv: list[str]) -> int:
    """`preble-hpc serve` whose workers are ``InstantWorker`` (run under mpiexec by --mpi)."""
    import preble_hpc.worker_rank.main as worker_main
    from preble_hpc.serve import main as serve_main

    worker_main._default_factory = lambda: InstantWorker  # type: ignore[assignment]
    return serve_main(argv)


def run_mpi(args: argparse.Namespace) -> dict:
    """Rank 0 as deployed: `mpiexec -n W+1` serve (MpiTransport, separate worker processes)."""
    import os
    import subprocess
    import tempfile

    mpiexec = Path(sys.executable).parent / "mpiexec"
    with tempfile.TemporaryDirectory() as tmp:
        addr_file = Path(tmp) / "addr"
        cmd = [
            str(mpiexec),
            "-n",
            str(args.workers + 1),
            sys.executable,
            __file__,
            "--fake-serve",
            "--model",
            str(_tokenizer_dir(Path(tmp))),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--addr-file",
            str(addr_file),
            "--policy",
            args.policy,
            "--max-inflight",
            str(args.max_inflight),
            "--log-level",
            "WARNING",
        ]
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + 120
            while not addr_file.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake serve job did not start (exit {proc.poll()})")
                time.sleep(0.1)
            addr = addr_file.read_text().strip()
            _load_in_subprocess(addr, prompts(50, seed=9), 8, args.max_tokens)
            row = _load_in_subprocess(
                addr, prompts(args.requests, seed=2), args.clients, args.max_tokens
            )
            row["mode"] = f"mpi grpc x{args.clients}"
            return row
        finally:
            proc.terminate()
            proc.wait(60)


def _tokenizer_dir(tmp: Path) -> Path:
    """A model folder holding only the tiny byte-level tokenizer (what rank 0 loads)."""
    out = tmp / "tok"
    _tokenizer().save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--fake-serve"]:
        return fake_serve_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--addr", help="load a live server at HOST:PORT instead of in-process")
    parser.add_argument(
        "--mpi",
        action="store_true",
        help="also load rank 0 as deployed: mpiexec serve with instant workers",
    )
    parser.add_argument("--workers", type=int, default=2, help="in-process fake workers")
    parser.add_argument("--policy", default="e2")
    parser.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    parser.add_argument("--requests", type=int, default=2000, help="requests of the load run")
    parser.add_argument(
        "--sequential",
        type=int,
        default=500,
        help="requests of each one-at-a-time run (direct, grpc x1)",
    )
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--max-inflight", type=int, default=1024)
    parser.add_argument("--json", help="also write the results here as JSON")
    args = parser.parse_args(argv)

    rows: list[dict] = []
    overhead = None
    handler_us = None
    if args.addr:
        rows.append(
            _load_in_subprocess(args.addr, prompts(args.requests), args.clients, args.max_tokens)
        )
    else:
        r0 = InProcessRank0(args.workers, args.policy, args.max_inflight)
        floor = FloorServer(args.max_tokens)
        try:
            addr = f"127.0.0.1:{r0.port}"
            run_sequential(r0, floor, prompts(50, seed=9), args.max_tokens)  # warm up
            seq = run_sequential(r0, floor, prompts(args.sequential, seed=1), args.max_tokens)
            handler_us = _mean_handler_us(r0)
            many = _load_in_subprocess(
                addr, prompts(args.requests, seed=2), args.clients, args.max_tokens
            )
            rows = [*seq, many]
            overhead = seq[1]["latency_p50_ms"] - seq[0]["latency_p50_ms"]
        finally:
            floor.close()
            r0.close()
        if args.mpi:
            rows.append(run_mpi(args))
    print_table(rows, overhead)
    if handler_us is not None:
        print(f"ingress handler before submit (validate + tokenize), mean: {handler_us:.0f} us")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "rows": rows,
                    "ingress_overhead_p50_ms": overhead,
                    "ingress_handler_mean_us": handler_us,
                    "args": vars(args),
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
