"""Simulator speed: N requests on G simulated GPUs on one core, and the share of the wall time
spent inside the real GlobalScheduler's methods.

    python bench/sim_scale.py --workload toolbench --policy e2 --requests 100000 --gpus 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from preble_hpc.config import SimConfig  # noqa: E402
from preble_hpc.rank0_scheduler.scheduler import GlobalScheduler  # noqa: E402
from preble_hpc.sim.cluster import simulate  # noqa: E402
from preble_hpc.sim.workloads import default_rate, make_workload  # noqa: E402

SCHEDULER_CALLS = ("schedule", "on_first_token", "on_finished", "on_cache_report", "on_load_stats")


def _timed(acc: list[float], fn):
    def wrapper(self, *a, **k):
        t = time.perf_counter()
        try:
            return fn(self, *a, **k)
        finally:
            acc[0] += time.perf_counter() - t

    return wrapper


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="toolbench")
    p.add_argument("--policy", default="e2")
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--gpus", type=int, default=64)
    p.add_argument("--json", help="append the result as one JSON line here")
    args = p.parse_args(argv)
    acc = [0.0]
    for name in SCHEDULER_CALLS:
        setattr(GlobalScheduler, name, _timed(acc, getattr(GlobalScheduler, name)))
    rate = default_rate(args.workload, args.gpus)
    t = time.perf_counter()
    reqs = make_workload(args.workload, args.requests, rate)
    gen = time.perf_counter() - t
    res = simulate(reqs, args.policy, SimConfig(gpus=args.gpus))
    out = {
        "workload": args.workload,
        "policy": args.policy,
        "requests": args.requests,
        "gpus": args.gpus,
        "rate": rate,
        "generate_s": round(gen, 2),
        "simulate_s": round(res.wall_s, 2),
        "scheduler_s": round(acc[0], 2),
        "scheduler_share": round(acc[0] / res.wall_s, 3),
        "finished": res.finished,
        "virtual_s": round(res.sim_time_s, 1),
        "hit_rate": round(res.hit_rate, 4),
    }
    print(json.dumps(out), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
