"""End-to-end batch benchmark: the same prefix-heavy prompt file under E2 and round robin.

    python bench/e2e_batch.py [--model models/tiny-llama] [--workers 2] [--json out.json]

Writes a prompt file of ``--groups`` long shared system prompts with ``--per-group`` questions
each, in a seeded random order, runs
``mpiexec -n W+1 preble-hpc batch`` once per policy on CPU, and prints each run's throughput and
prefix-cache hit rate from the batch summary (its clock starts after every engine is ready, so
engine start-up is not counted).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]

WORDS = (
    "cluster scheduler prefix cache token engine rank worker request batch latency "
    "throughput memory block eviction replica window policy tree prompt decode prefill "
    "gpu node job queue"
).split()


def make_workload(
    path: Path, groups: int, per_group: int, prefix_chars: int, max_tokens: int, seed: int
) -> int:
    """Write the prompt file; returns the number of requests."""
    rng = random.Random(seed)
    systems = []
    for g in range(groups):
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < prefix_chars:
            words.append(rng.choice(WORDS))
        systems.append(f"System prompt {g}: " + " ".join(words))
    rows = []
    for q in range(per_group):
        for g in range(groups):
            question = " ".join(rng.choice(WORDS) for _ in range(12))
            rows.append(
                {
                    "id": f"g{g}-q{q}",
                    "messages": [
                        {"role": "system", "content": systems[g]},
                        {"role": "user", "content": f"Question {q}: {question}?"},
                    ],
                    "max_tokens": max_tokens,
                    "ignore_eos": True,
                }
            )
    # Arrival order is random: a fixed interleaving (g0, g1, ... g7, g0, ...) would hand round
    # robin perfect locality whenever the number of groups is a multiple of the worker count.
    rng.shuffle(rows)
    with path.open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return groups * per_group


def run_policy(policy: str, args: argparse.Namespace, prompts: Path, workdir: Path) -> dict:
    out, summary = workdir / f"out-{policy}.jsonl", workdir / f"summary-{policy}.json"
    out.unlink(missing_ok=True)
    cmd = [
        str(BIN / "mpiexec"),
        "-n",
        str(args.workers + 1),
        str(BIN / "preble-hpc"),
        "batch",
        "--model",
        args.model,
        "--input",
        str(prompts),
        "--output",
        str(out),
        "--summary-json",
        str(summary),
        "--policy",
        policy,
        "--no-progress",
        "--enforce-eager",
        "--dtype",
        "float32",
        "--kv-cache-gib",
        str(args.kv_cache_gib),
        "--max-inflight",
        str(args.max_inflight),
        "--seed",
        "0",
        *args.extra,
    ]
    print(f"running {policy}: {' '.join(cmd)}", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"{policy}: batch exited {proc.returncode}")
    s = json.loads(summary.read_text())
    return {
        "policy": policy,
        "requests": s["completed"],
        "wall_s": s["wall_s"],
        "requests_per_s": s["requests_per_s"],
        "total_tokens_per_s": s["total_tokens_per_s"],
        "output_tokens_per_s": s["output_tokens_per_s"],
        "cache_hit_rate": s["cache_hit_rate"],
        "prompt_tokens": s["prompt_tokens"],
        "cached_tokens": s["cached_tokens"],
        "decisions": s["decisions"],
        "per_rank": {
            r: {"requests": c["requests"], "cache_hit_rate": c["cache_hit_rate"]}
            for r, c in s["per_rank"].items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny-llama"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--policies", default="e2,round_robin")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--per-group", type=int, default=12)
    parser.add_argument(
        "--prefix-chars",
        type=int,
        default=2500,
        help="length of each shared system prompt (the tiny model's tokenizer "
        "is one token per byte)",
    )
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-inflight", type=int, default=32)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input", help="use this prompt file instead of generating one")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("extra", nargs="*", help="more `preble-hpc batch` flags (after --)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="e2e-batch-") as tmp:
        workdir = Path(tmp)
        if args.input:
            prompts = Path(args.input)
        else:
            prompts = workdir / "prompts.jsonl"
            make_workload(
                prompts, args.groups, args.per_group, args.prefix_chars, args.max_tokens, args.seed
            )
        results = [run_policy(p, args, prompts, workdir) for p in args.policies.split(",")]

    print(
        f"\n{'policy':<14}{'requests':>9}{'wall s':>9}{'req/s':>8}{'tok/s':>10}{'hit rate':>10}"
        f"  per-rank requests"
    )
    for r in results:
        ranks = ", ".join(f"{k}:{v['requests']}" for k, v in r["per_rank"].items())
        print(
            f"{r['policy']:<14}{r['requests']:>9}{r['wall_s']:>9.2f}{r['requests_per_s']:>8.2f}"
            f"{r['total_tokens_per_s']:>10.0f}{r['cache_hit_rate']:>10.1%}  {ranks}"
        )
    if args.json:
        workload = (
            {"input": args.input}
            if args.input
            else {
                "groups": args.groups,
                "per_group": args.per_group,
                "prefix_chars": args.prefix_chars,
                "max_tokens": args.max_tokens,
            }
        )
        Path(args.json).write_text(
            json.dumps(
                {
                    "workers": args.workers,
                    "model": args.model,
                    "workload": workload,
                    "max_inflight": args.max_inflight,
                    "kv_cache_gib": args.kv_cache_gib,
                    "results": results,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
