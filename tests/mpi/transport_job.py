"""Run under mpiexec by test_transport_mpi.py: batching, ordering and idle CPU over real MPI.

Rank 0 sends each worker 200 Submit messages in batches of 20, workers echo each back as a
TokenDelta; then rank 0 goes quiet for 1 s while the workers poll, and each worker reports the
CPU time it used meanwhile. Rank 0 prints one JSON line with what it saw (and the node peers
its transport found)."""

from __future__ import annotations

import json
import time

from preble_hpc.messages import Abort, SamplingSpec, Shutdown, Submit, TokenDelta
from preble_hpc.transport import MpiTransport

N, BATCH, IDLE_S = 200, 20, 1.0


def rank0(t: MpiTransport) -> None:
    workers = range(1, t.size)
    t0 = time.monotonic()
    for start in range(0, N, BATCH):
        for w in workers:
            for i in range(start, start + BATCH):
                t.send(w, Submit(f"{w}-{i}", [i], SamplingSpec()))
        t.flush()
    got: dict[int, list[str]] = {w: [] for w in workers}
    while sum(map(len, got.values())) < N * len(workers):
        for source, msg in t.poll(1.0):
            got[source].append(msg.request_id)
    round_trip_s = time.monotonic() - t0
    time.sleep(IDLE_S)  # the workers idle-poll meanwhile
    for w in workers:
        t.send(w, Shutdown())
    t.flush()
    idle_cpu = {}
    while len(idle_cpu) < len(got):
        for source, msg in t.poll(1.0):
            idle_cpu[source] = float(msg.request_id)
    ordered = all(got[w] == [f"{w}-{i}" for i in range(N)] for w in workers)
    print(
        json.dumps(
            {
                "size": t.size,
                "ordered": ordered,
                "round_trip_s": round_trip_s,
                "idle_cpu_s": idle_cpu,
                "idle_s": IDLE_S,
                "node_peers": [[p.rank, sorted(p.cpus)] for p in t.node_peers],
            }
        ),
        flush=True,
    )


def worker(t: MpiTransport) -> None:
    seen = 0
    while seen < N:
        for _, msg in t.poll(1.0):
            t.send(0, TokenDelta(msg.request_id, [0], ""))
            seen += 1
        t.flush()
    cpu0 = time.process_time()
    while not any(isinstance(m, Shutdown) for _, m in t.poll(0.05)):
        pass
    t.send(0, Abort(str(time.process_time() - cpu0)))


def main() -> None:
    t = MpiTransport()
    rank0(t) if t.rank == 0 else worker(t)
    t.close()


if __name__ == "__main__":
    main()
