"""Simulator speed: N requests on G simulated GPUs on one core, and the share of the wall time
spent inside the real GlobalScheduler's methods. ``simulate_cpu_s`` is the process CPU time of
the run (what one core spends; wall time also counts other jobs on a shared machine).

    python bench/sim_scale.py --workloads toolbench,videoqa,loogle,mix --policies e2,round_robin \
        --requests 100000 --gpus 64 --json bench/results/sim_scale.json

Prints a table (one row per workload and policy) and writes ``{"host": ..., "rows": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from preble_hpc.config import SimConfig  # noqa: E402
from preble_hpc.rank0_scheduler.scheduler import GlobalScheduler  # noqa: E402
from preble_hpc.sim.cluster import simulate  # noqa: E402
from preble_hpc.sim.workloads import default_rate, make_workload  # noqa: E402

SCHEDULER_CALLS = ("schedule", "on_first_token", "on_finished", "on_cache_report", "on_load_stats")
COLUMNS = (
    ("workload", 14, "s"),
    ("policy", 12, "s"),
    ("requests", 8, "d"),
    ("gpus", 4, "d"),
    ("rate", 7, ".1f"),
    ("generate_s", 10, ".2f"),
    ("simulate_s", 10, ".2f"),
    ("simulate_cpu_s", 14, ".2f"),
    ("scheduler_s", 11, ".2f"),
    ("scheduler_share", 15, ".3f"),
    ("finished", 8, "d"),
    ("hit_rate", 8, ".4f"),
)


def _timed(acc: list[float], fn):
    def wrapper(self, *a, **k):
        t = time.perf_counter()
        try:
            return fn(self, *a, **k)
        finally:
            acc[0] += time.perf_counter() - t

    return wrapper


def run_one(workload: str, policy: str, requests: int, gpus: int, acc: list[float]) -> dict:
    acc[0] = 0.0
    rate = default_rate(workload, gpus)
    t = time.perf_counter()
    reqs = make_workload(workload, requests, rate)
    gen = time.perf_counter() - t
    cpu = time.process_time()
    res = simulate(reqs, policy, SimConfig(gpus=gpus))
    cpu = time.process_time() - cpu
    return {
        "workload": workload,
        "policy": policy,
        "requests": requests,
        "gpus": gpus,
        "rate": rate,
        "generate_s": round(gen, 2),
        "simulate_s": round(res.wall_s, 2),
        "simulate_cpu_s": round(cpu, 2),
        "scheduler_s": round(acc[0], 2),
        "scheduler_share": round(acc[0] / res.wall_s, 3),
        "finished": res.finished,
        "virtual_s": round(res.sim_time_s, 1),
        "hit_rate": round(res.hit_rate, 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", "--workload", default="toolbench")
    p.add_argument("--policies", "--policy", default="e2")
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--gpus", type=int, default=64)
    p.add_argument("--json", help="write {host, rows} here")
    args = p.parse_args(argv)
    acc = [0.0]
    for name in SCHEDULER_CALLS:
        setattr(GlobalScheduler, name, _timed(acc, getattr(GlobalScheduler, name)))
    print(" ".join(f"{c:>{w}}" for c, w, _ in COLUMNS), flush=True)
    rows = []
    for wl in args.workloads.split(","):
        for pol in args.policies.split(","):
            row = run_one(wl, pol, args.requests, args.gpus, acc)
            rows.append(row)
            print(" ".join(f"{row[c]:>{w}{f}}" for c, w, f in COLUMNS), flush=True)
    if args.json:
        host = {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu": _cpu_name(),
            "cpus": os.cpu_count(),
        }
        Path(args.json).write_text(json.dumps({"host": host, "rows": rows}, indent=1) + "\n")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
