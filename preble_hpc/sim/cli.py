"""``preble-hpc sim``: simulate a cluster and compare scheduling policies on the same requests.

    preble-hpc sim --workload toolbench --gpus 8 --rate 24,48,72 --policies e2,round_robin \\
        --json out.json --plot out.png
    preble-hpc sim --trace ../shared/traces/mooncake_synthetic_trace.jsonl --gpus 8 --rate 4

One table per workload and rate; ``--json`` writes ``{"rows": [...]}``, one row per
(workload, rate, policy); ``--plot`` draws mean latency against rate per policy.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from preble_hpc.config import ConfigError, SchedulerConfig, SimConfig
from preble_hpc.rank0_scheduler.policy import POLICY_NAMES
from preble_hpc.sim.cluster import accept, simulate
from preble_hpc.sim.workloads import (
    SimRequest,
    default_rate,
    default_requests,
    ideal_hit_rate,
    load_trace,
    make_workload,
    workload_names,
)

COLUMNS = (
    ("policy", "{:<18}"),
    ("finished", "{:>9}"),
    ("mean_latency_s", "{:>9.3f}"),
    ("p99_latency_s", "{:>9.3f}"),
    ("mean_ttft_s", "{:>9.3f}"),
    ("p99_ttft_s", "{:>9.3f}"),
    ("throughput_rps", "{:>8.2f}"),
    ("hit_rate", "{:>6.3f}"),
    ("ideal_hit_rate", "{:>6.3f}"),
    ("imbalance", "{:>6.2f}"),
)
HEADER = (
    f"{'policy':<18} {'finished':>9} {'mean_s':>9} {'p99_s':>9} {'ttft_s':>9} {'p99ttft':>9} "
    f"{'rps':>8} {'hit':>6} {'ideal':>6} {'imbal':>6}"
)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="preble-hpc sim", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--workload",
        help=f"comma-separated workloads: {', '.join(workload_names())} (NAME_zipfS: Zipf skew S)",
    )
    src.add_argument("--trace", help="Mooncake-format JSONL trace to replay")
    p.add_argument("--gpus", type=int, default=8, help="simulated GPUs (default 8)")
    p.add_argument(
        "--rate",
        help="comma-separated request rates per second (default: Preble's rate scaled to --gpus; "
        "for a trace, its own rate)",
    )
    p.add_argument("--policies", default="e2,round_robin", help=f"of {', '.join(POLICY_NAMES)}")
    p.add_argument("--json", help='write {"rows": [...]} here')
    p.add_argument("--plot", help="write a latency-vs-rate PNG here")
    p.add_argument(
        "--requests", type=int, help="requests per run (default: 300 s at Preble's rate)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arrival", default="poisson", help="poisson, gamma or gamma:CV (default 2)")
    p.add_argument("--kv-capacity", type=int, help="KV tokens per GPU (default 432000)")
    p.add_argument(
        "--host-kv-tokens",
        type=int,
        default=0,
        help="KV tokens of each GPU's host-memory tier (CPU offloading; default 0: none)",
    )
    p.add_argument("--drain", type=float, help="seconds after the last arrival before stopping")
    return p.parse_args(list(argv))


def run(args: argparse.Namespace, out=None) -> list[dict]:
    out = out or sys.stdout
    policies = [x for x in args.policies.split(",") if x]
    bad = [x for x in policies if x not in POLICY_NAMES]
    if bad:
        raise ConfigError(f"unknown policy {bad}: valid policies are {list(POLICY_NAMES)}")
    sim = SimConfig(gpus=args.gpus, seed=args.seed, drain_s=args.drain)
    if args.kv_capacity:
        sim = replace(sim, kv_capacity_tokens=args.kv_capacity)
    sim = replace(sim, host_kv_tokens=args.host_kv_tokens)
    rates = [float(r) for r in args.rate.split(",")] if args.rate else [None]
    rows: list[dict] = []
    sources = [args.trace] if args.trace else [w for w in args.workload.split(",") if w]
    for name in sources:
        label = Path(name).stem if args.trace else name
        for rate in rates:
            reqs, rate_used = _requests(args, name, rate)
            accepted, refused = accept(reqs, sim.max_model_len)
            ideal = ideal_hit_rate(accepted)
            print(
                f"\n== {label}  rate {rate_used:g}/s  {len(reqs)} requests  {args.gpus} GPUs"
                + refused_note(refused, sim.max_model_len),
                file=out,
            )
            print(HEADER, file=out)
            for pol in policies:
                res = simulate(reqs, pol, sim, SchedulerConfig(), ideal=ideal)
                row = res.row(label, rate_used)
                host = ""
                if sim.host_kv_tokens:
                    row["host_hit_rate"] = round(res.host_hit_rate, 6)
                    host = f" host {res.host_hit_rate:.3f}"
                rows.append(row)
                print(format_row(row) + host, f" ({res.wall_s:.1f}s)", file=out, flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    if args.plot:
        plot(rows, args.plot)
    return rows


def refused_note(refused: int, max_model_len: int) -> str:
    """What a table's header says of the requests rank 0 refuses (``accept``)."""
    if not refused:
        return ""
    return f"  ({refused} refused: prompt >= max_model_len {max_model_len}, as rank 0 does)"


def _requests(args, name: str, rate: float | None) -> tuple[list[SimRequest], float]:
    if args.trace:
        reqs = load_trace(name, rate=rate, n=args.requests, seed=args.seed)
        span = reqs[-1].arrival - reqs[0].arrival
        return reqs, rate if rate is not None else round(len(reqs) / span, 3)
    r = rate if rate is not None else default_rate(name, args.gpus)
    n = args.requests or default_requests(name, args.gpus)
    return make_workload(name, n, r, seed=args.seed, arrival=args.arrival), r


def format_row(row: dict) -> str:
    parts = []
    for key, fmt in COLUMNS:
        v = row[key]
        if key == "finished":
            v = f"{row['finished']}/{row['requests']}"
        parts.append(fmt.format(float("nan") if v is None else v))
    return " ".join(parts)


def plot(rows: list[dict], path: str) -> None:
    """Mean latency against rate, one panel per workload, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    cols = min(3, len(workloads))
    nrows = -(-len(workloads) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, wl in zip(axes.flat, workloads, strict=False):
        for pol in dict.fromkeys(r["policy"] for r in rows if r["workload"] == wl):
            pts = sorted(
                (r["rate"], r["mean_latency_s"])
                for r in rows
                if r["workload"] == wl and r["policy"] == pol and r["mean_latency_s"] is not None
            )
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=pol)
        ax.set_title(wl)
        ax.set_xlabel("request rate (1/s)")
        ax.set_ylabel("mean latency (s)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(workloads) :]:
        ax.axis("off")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"preble-hpc sim: {exc}", file=sys.stderr)
        return 2
    return 0
