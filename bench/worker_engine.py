"""One worker on vLLM: throughput with and without shared prefixes, and what the adapter and
Preble's local scheduler cost on top of bare vLLM.

    python bench/worker_engine.py --model models/tiny-llama            # table
    python bench/worker_engine.py --model PATH --json out.json         # also write the rows

One engine (``EngineAdapter``) serves every run, so bare and wrapped runs share its weights,
threads and warm state. Each workload (unique prompts / prompts sharing a prefix) runs in turn:

- ``bare``: the same requests straight into vLLM's ``LLMEngine`` (add all, ``step()`` until done)
- ``worker``: ``Worker.submit`` all, ``Worker.step()`` until done (validation, local scheduler,
  deltas, timings, LoadStats every 0.5 s, KV events), pacing ``max_engine_waiting`` = the
  config default; ``worker_unpaced`` lets every request in at once (pacing off), which isolates
  the code's cost from the pacing's effect on batch sizes

vLLM's prefix cache is reset before every run, and the runs alternate ``--reps`` times (median
reported), so other tenants of the machine hit all variants alike. ``overhead_pct`` compares wall
time with bare vLLM; ``host_ms_per_step`` is the time a step spends outside ``LLMEngine.step()``
(our code plus the loop), the direct measure of the adapter + scheduler cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace

from preble_hpc.config import EngineConfig, LocalSchedulerConfig
from preble_hpc.messages import Finished, SamplingSpec, Submit


def make_prompts(n: int, prompt_len: int, shared_len: int, seed: int) -> list[list[int]]:
    """``n`` prompts of ``prompt_len`` tokens; the first ``shared_len`` are common to all."""
    shared = [(seed * 13 + 7 * j) % 250 + 3 for j in range(shared_len)]
    return [
        shared + [(seed * 31 + i * 17 + 11 * j) % 250 + 3 for j in range(prompt_len - shared_len)]
        for i in range(n)
    ]


class StepTimer:
    """Wraps ``LLMEngine.step`` to sum the time spent inside vLLM."""

    def __init__(self, llm_engine) -> None:
        self.inner = llm_engine.step
        self.seconds = 0.0
        self.steps = 0
        llm_engine.step = self

    def __call__(self):
        t = time.perf_counter()
        try:
            return self.inner()
        finally:
            self.seconds += time.perf_counter() - t
            self.steps += 1


def run_bare(adapter, prompts, spec) -> tuple[float, int]:
    from vllm.inputs import TokensPrompt

    from preble_hpc.worker_rank.engine import _sampling_params

    llm = adapter._engine
    params = _sampling_params(spec)
    t = time.perf_counter()
    for i, p in enumerate(prompts):
        llm.add_request(f"bare-{i}", TokensPrompt(prompt_token_ids=p), params)
    tokens = 0
    while llm.has_unfinished_requests():
        for out in llm.step():
            tokens += len(out.outputs[0].token_ids)
    return time.perf_counter() - t, tokens


def run_worker(adapter, model, local_config, prompts, spec, tag) -> tuple[float, int]:
    from preble_hpc.worker_rank.worker import Worker

    w = Worker(EngineConfig(model=model), local_config, rank=1, engine=adapter)
    t = time.perf_counter()
    for i, p in enumerate(prompts):
        errors = w.submit(Submit(f"{tag}-{i}", p, spec))
        assert not errors, errors
    tokens = 0
    while w.has_work():
        for m in w.step():
            if isinstance(m, Finished):
                tokens += m.completion_tokens
    return time.perf_counter() - t, tokens


COLUMNS = [
    "workload",
    "variant",
    "wall_s",
    "requests_per_s",
    "output_tokens_per_s",
    "total_tokens_per_s",
    "steps",
    "host_ms_per_step",
    "host_ms_per_step_over_bare",
    "overhead_pct",
]

#: (wall s, output tokens, seconds inside LLMEngine.step, steps) of one run
Sample = tuple[float, int, float, int]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="models/tiny-llama")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=384)
    ap.add_argument("--shared-len", type=int, default=256, help="shared prefix (shared runs)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kv-cache-gib", type=float, default=0.25)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", metavar="PATH")
    return ap


def measure(adapter, args: argparse.Namespace, workloads: dict[str, int]) -> dict:
    """Every (workload, variant) ``--reps`` times on the one engine, the variants alternating;
    returns their samples by (workload, variant)."""
    timer = StepTimer(adapter._engine)
    spec = SamplingSpec(max_tokens=args.max_tokens, ignore_eos=True)
    paced = LocalSchedulerConfig()
    unpaced = replace(paced, max_engine_waiting=args.requests)
    variants = {
        "bare": lambda p, tag: run_bare(adapter, p, spec),
        "worker": lambda p, tag: run_worker(adapter, args.model, paced, p, spec, tag),
        "worker_unpaced": lambda p, tag: run_worker(adapter, args.model, unpaced, p, spec, tag),
    }
    samples: dict[tuple[str, str], list[Sample]] = {}
    # warm-up (first steps allocate), not measured
    run_bare(adapter, make_prompts(4, args.prompt_len, 0, 99), spec)
    for rep in range(args.reps):
        for wl, shared_len in workloads.items():
            prompts = make_prompts(args.requests, args.prompt_len, shared_len, seed=rep)
            for name, fn in variants.items():
                adapter._engine.reset_prefix_cache()
                adapter.cache_events()
                timer.seconds, timer.steps = 0.0, 0
                wall, tokens = fn(prompts, f"{wl}-{name}-{rep}")
                samples.setdefault((wl, name), []).append(
                    (wall, tokens, timer.seconds, timer.steps)
                )
    return samples


def summarize(samples: dict, args: argparse.Namespace, workloads: dict[str, int]) -> list[dict]:
    """One row per (workload, variant): medians over the reps, and the cost over bare vLLM."""
    rows = []
    for (wl, name), runs in samples.items():
        wall = statistics.median(r[0] for r in runs)
        tokens = runs[0][1]
        host_ms = statistics.median((r[0] - r[2]) / max(1, r[3]) * 1e3 for r in runs)
        rows.append(
            {
                "workload": wl,
                "variant": name,
                "requests": args.requests,
                "prompt_len": args.prompt_len,
                "shared_len": workloads[wl],
                "output_tokens": tokens,
                "wall_s": round(wall, 4),
                "requests_per_s": round(args.requests / wall, 2),
                "output_tokens_per_s": round(tokens / wall, 1),
                "total_tokens_per_s": round((tokens + args.requests * args.prompt_len) / wall, 1),
                "steps": statistics.median(r[3] for r in runs),
                "host_ms_per_step": round(host_ms, 3),
                "wall_samples_s": [round(r[0], 4) for r in runs],
            }
        )
    bare = {r["workload"]: r for r in rows if r["variant"] == "bare"}
    for r in rows:
        b = bare[r["workload"]]
        r["overhead_pct"] = round((r["wall_s"] / b["wall_s"] - 1) * 100, 2)
        r["host_ms_per_step_over_bare"] = round(r["host_ms_per_step"] - b["host_ms_per_step"], 3)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from preble_hpc.worker_rank.engine import EngineAdapter

    config = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache_gib=args.kv_cache_gib,
        enforce_eager=args.enforce_eager,
    )
    t0 = time.perf_counter()
    adapter = EngineAdapter(config)
    start_s = time.perf_counter() - t0
    workloads = {"unique": 0, "shared": args.shared_len}
    samples = measure(adapter, args, workloads)
    adapter.shutdown()
    rows = summarize(samples, args, workloads)
    print(
        f"engine start {start_s:.1f} s; {args.requests} requests x {args.prompt_len} prompt "
        f"tokens (+{args.max_tokens} out), shared prefix {args.shared_len}; median of "
        f"{args.reps}",
        file=sys.stderr,
    )
    print(" | ".join(COLUMNS))
    for r in rows:
        print(" | ".join(str(r[c]) for c in COLUMNS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "engine_start_s": round(start_s, 2), "rows": rows}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
