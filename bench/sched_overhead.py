"""Rank-0 scheduling overhead: decisions per second and decision latency on one core.

    python bench/sched_overhead.py                  # 16/128 ranks x 2k/8k-token prompts
    python bench/sched_overhead.py --json out.json  # also write the rows

Each row drives one ``GlobalScheduler`` (policy e2, virtual clock) with a workload of realistic
sharing, the way rank 0 sees it live:

- prompts = one of ``--prefixes`` shared documents/system prompts (Zipf popularity, 60% of the
  prompt) + a unique tail; ``--multi-turn`` of the requests continue an earlier conversation
  (its prompt minus the last tenth, plus a new tail), as in Preble's chat/tool workloads;
- every rank is an emulated engine: a block-level LRU prefix cache of ``--kv-tokens`` tokens that
  sends the scheduler CacheReports (STORED for the blocks a request added; EVICTED for the blocks
  it pushed out), so the tree mirrors real caches and stays under its cap;
- requests finish (``Finished`` with timings, first token) ``--in-flight`` decisions later, and
  every rank reports LoadStats now and then.

The tree is first filled past ``--warmup-tokens``; then ``--decisions`` requests are timed.
Prompts reach the scheduler as rank 0 gets them: lists of fresh int objects (from the tokenizer or
the gRPC message), which ``Rank0Runtime.submit`` converts to the tree's token array on the
submitting thread (``as_tokens``). Columns: ``decisions_per_s`` and ``p50_ms``/``p99_ms`` time
``schedule()`` alone on that array (the decision; throughput is the median over ``--chunks``
consecutive chunks, robust to other tenants of the machine); ``with_intake_per_s`` adds the
conversion (``intake_us`` per request); ``with_reports_per_s`` divides the decisions by all
scheduler time spent (conversion, schedule, cache reports, Finished, first tokens, load stats).
``rss_mb`` is the whole process (the emulated engines' caches included); ``tree_mb`` estimates the
tree alone. Python's cyclic GC runs as on rank 0 of a job (``--gc rank0``: ``tune_gc`` with
``RuntimeConfig``'s generation-0 threshold); ``--gc default`` keeps Python's thresholds and
``--gc off`` disables it, to show its share.
``events_per_decision`` counts cache events; by default an engine reports one EVICTED per evicted
chain (its topmost block: "that block and everything below it"), ``--per-block-events`` sends one
per block as a naive KV-event relay would.
"""

from __future__ import annotations

import argparse
import gc
import json
import pickle
import random
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator

from preble_hpc.config import RuntimeConfig, SchedulerConfig
from preble_hpc.messages import (
    CacheEvent,
    CacheEventKind,
    CacheReport,
    Finished,
    LoadStats,
    WorkerReady,
)
from preble_hpc.rank0_scheduler.main import tune_gc
from preble_hpc.rank0_scheduler.radix_tree import as_tokens
from preble_hpc.rank0_scheduler.scheduler import GlobalScheduler

BLOCK = 16
VOCAB = 128_000


def tree_mb(sched: GlobalScheduler) -> float:
    """Rough size of the tree itself: nodes, their token arrays, child dicts, holder maps and
    per-rank child counts."""
    total = 0
    stack = [sched.tree.root]
    while stack:
        node = stack.pop()
        total += sys.getsizeof(node) + sys.getsizeof(node.seg) + sys.getsizeof(node.children)
        total += sys.getsizeof(node.ranks)
        if node.rank_children is not None:
            total += sys.getsizeof(node.rank_children)
        stack.extend(node.children.values())
    return total / 2**20


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Engine:
    """One rank's prefix cache: blocks keyed by a chained hash, LRU eviction, KV events.

    Block entries are tuples of ints (prompt number, end, parent key), which the garbage collector
    does not track, so the emulator does not inflate rank 0's GC work beyond what it really has.
    """

    def __init__(self, capacity_tokens: int, per_block_events: bool) -> None:
        self.capacity_blocks = capacity_tokens // BLOCK
        self.per_block = per_block_events
        self.blocks: OrderedDict[int, tuple[int, int, int]] = OrderedDict()
        # prompt number -> tokens (a tuple: untracked by the GC), while blocks use it
        self.prompts: dict[int, tuple[int, ...]] = {}
        self.refs: dict[int, int] = {}
        self.next_id = 0

    def run(self, prompt: tuple[int, ...]) -> list[CacheEvent]:
        keys = []
        parent = 0
        full = len(prompt) - len(prompt) % BLOCK
        for end in range(BLOCK, full + 1, BLOCK):
            parent = hash((parent, *prompt[end - BLOCK : end]))
            keys.append(parent)
        pid = self.next_id
        self.next_id += 1
        blocks = self.blocks
        new_end = 0
        added = 0
        # Touch tail first so the prefix is the most recent: LRU evicts tails before prefixes,
        # as vLLM frees a request's blocks in reverse order.
        for i in range(len(keys) - 1, -1, -1):
            key = keys[i]
            if key in blocks:
                blocks.move_to_end(key)
            else:
                blocks[key] = (pid, (i + 1) * BLOCK, keys[i - 1] if i else 0)
                added += 1
                if not new_end:
                    new_end = (i + 1) * BLOCK
        if added:
            self.prompts[pid] = prompt
            self.refs[pid] = added
        events = []
        if new_end:
            events.append(CacheEvent(CacheEventKind.STORED, prompt[:new_end], BLOCK))
        if len(blocks) > self.capacity_blocks:
            evicted = {}
            while len(blocks) > self.capacity_blocks:
                key, value = blocks.popitem(last=False)
                evicted[key] = value
            for src, end, parent_key in evicted.values():
                if self.per_block or parent_key not in evicted:
                    tokens = self.prompts[src]
                    events.append(CacheEvent(CacheEventKind.EVICTED, tokens[:end], BLOCK))
            for src, _end, _parent in evicted.values():
                left = self.refs[src] - 1
                if left:
                    self.refs[src] = left
                else:
                    del self.refs[src], self.prompts[src]
        return events


class Workload:
    """Prompts with shared prefixes (Zipf) and multi-turn continuations."""

    def __init__(self, prompt_tokens: int, prefixes: int, multi_turn: float, seed: int) -> None:
        self.rng = random.Random(seed)
        self.n = prompt_tokens
        self.prefix_len = prompt_tokens * 6 // 10
        self.docs = [self._tokens(self.prefix_len) for _ in range(prefixes)]
        weights = [1.0 / (i + 1) ** 1.1 for i in range(prefixes)]
        total = sum(weights)
        self.cum = []
        acc = 0.0
        for w in weights:
            acc += w / total
            self.cum.append(acc)
        self.multi_turn = multi_turn
        self.history: list[tuple[int, ...]] = []  # tuples of ints: untracked by the GC

    def _tokens(self, k: int) -> tuple[int, ...]:
        r = self.rng.getrandbits
        return tuple(r(17) % VOCAB for _ in range(k))

    def _doc(self) -> tuple[int, ...]:
        x = self.rng.random()
        lo, hi = 0, len(self.cum) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self.cum[mid] < x:
                lo = mid + 1
            else:
                hi = mid
        return self.docs[lo]

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        n = self.n
        while True:
            if self.history and self.rng.random() < self.multi_turn:
                prev = self.history[self.rng.randrange(len(self.history))]
                keep = n * 9 // 10
                prompt = prev[:keep] + self._tokens(n - keep)
            else:
                prompt = self._doc() + self._tokens(n - self.prefix_len)
            self.history.append(prompt)
            if len(self.history) > 512:
                self.history.pop(0)
            yield prompt


def run_row(ranks: int, prompt_tokens: int, args) -> dict:
    clock_t = [0.0]
    cfg = SchedulerConfig(
        policy=args.policy,
        tree_capacity_tokens=args.tree_cap,
        window_s=args.window,
        profile=args.profile,
    )
    sched = GlobalScheduler(
        cfg, list(range(1, ranks + 1)), clock=lambda: clock_t[0], rng=random.Random(0)
    )
    engines = {}
    for r in range(1, ranks + 1):
        sched.on_worker_ready(WorkerReady(r, args.kv_tokens, BLOCK, 32768, "bench"))
        engines[r] = Engine(args.kv_tokens, args.per_block_events)
    # Arrivals: enough to keep every rank busy (ranks x rate per rank per second).
    dt = 1.0 / (ranks * args.rate_per_rank)
    work = iter(Workload(prompt_tokens, args.prefixes, args.multi_turn, seed=ranks))
    pending: list[tuple[str, int, int, int]] = []  # (id, rank, prompt tokens, cached)
    lat: list[float] = []
    others: list[float] = []
    intake: list[float] = []
    events = 0
    perf = time.perf_counter
    i = 0

    def step(timed: bool) -> None:
        nonlocal i, events
        i += 1
        clock_t[0] += dt
        prompt = next(work)
        # What rank 0 gets: a list of fresh int objects from the tokenizer or the gRPC message,
        # never the objects of an earlier prompt (which would make every comparison an identity
        # check and flatter a tree of Python ints ~20x).
        tokens = pickle.loads(pickle.dumps(list(prompt)))
        rid = f"r{i}"
        t_in = perf()
        key = as_tokens(tokens)
        t0 = perf()
        d = sched.schedule(rid, key, args.max_tokens)
        t1 = perf()
        del tokens, key
        report = engines[d.rank].run(prompt)
        msg = CacheReport(d.rank, report)
        t2 = perf()
        sched.on_cache_report(msg)
        sched.on_first_token(rid)
        t3 = perf()
        pending.append((rid, d.rank, len(prompt), d.cached_tokens))
        if len(pending) > args.in_flight * ranks:
            old, rank, n, cached = pending.pop(0)
            fin = Finished(old, rank, "stop", n, cached, args.max_tokens, 0.0, 0.05, 0.01)
            stats = LoadStats(rank, clock_t[0], args.in_flight, 0, 0.5) if i % 50 == 0 else None
            t4 = perf()
            sched.on_finished(fin)
            if stats is not None:
                sched.on_load_stats(stats)
            t3 += perf() - t4
        if timed:
            lat.append(t1 - t0)
            intake.append(t0 - t_in)
            others.append(t3 - t2 + t0 - t_in)
            events += len(report)

    while sched.tree.total_tokens < args.warmup_tokens:
        step(False)
    warm_decisions = i
    gc.collect()
    for _ in range(args.decisions):
        step(True)
    return {
        "ranks": ranks,
        "prompt_tokens": prompt_tokens,
        **_rates(lat, others, intake, args.chunks),
        "tree_tokens": sched.tree.total_tokens,
        "rss_mb": round(rss_mb(), 1),
        "tree_mb": round(tree_mb(sched), 1),
        "forgotten_tokens": sched.tree.forgotten_tokens,
        "gc": args.gc,
        "events_per_decision": round(events / len(lat), 2),
        "tree_cap_tokens": args.tree_cap,
        "tree_nodes": sched.tree.num_nodes,
        "warmup_decisions": warm_decisions,
        "decisions": sched.stats()["decisions"],
    }


def _rates(lat: list[float], others: list[float], intake: list[float], n_chunks: int) -> dict:
    """Decisions per second (median and best chunk, alone and with intake / reports) and the
    decision latency percentiles, from per-decision timings in seconds."""
    # Throughput per chunk of consecutive decisions; the median chunk resists other tenants of
    # the machine (they only ever slow a chunk down).
    size = max(1, len(lat) // n_chunks)
    chunks = [
        (lat[k : k + size], others[k : k + size], intake[k : k + size])
        for k in range(0, len(lat), size)
    ]
    chunks = [c for c in chunks if len(c[0]) == size]
    rates = sorted(size / sum(d) for d, _, _ in chunks)
    rates_intake = sorted(size / (sum(d) + sum(c)) for d, _, c in chunks)
    rates_all = sorted(size / (sum(d) + sum(o)) for d, o, _ in chunks)
    lat = sorted(lat)
    n = len(lat)
    return {
        "decisions_per_s": round(statistics.median(rates), 1),
        "best_decisions_per_s": round(rates[-1], 1),
        "p50_ms": round(lat[n // 2] * 1e3, 4),
        "p99_ms": round(lat[min(n - 1, int(n * 0.99))] * 1e3, 4),
        "with_intake_per_s": round(statistics.median(rates_intake), 1),
        "intake_us": round(statistics.mean(intake) * 1e6, 2),
        "with_reports_per_s": round(statistics.median(rates_all), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 128])
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--decisions", type=int, default=20_000, help="timed decisions per row")
    p.add_argument("--chunks", type=int, default=5, help="throughput = median over chunks")
    p.add_argument("--warmup-tokens", type=int, default=1_200_000, help="fill the tree first")
    p.add_argument("--tree-cap", type=int, default=4_000_000, help="tree_capacity_tokens")
    p.add_argument(
        "--kv-tokens",
        type=int,
        default=200_000,
        help="each engine's KV cache (an 8B bf16 engine on an 80 GB GPU holds ~400k; half keeps "
        "the engines evicting within a run)",
    )
    p.add_argument("--prefixes", type=int, default=400, help="shared prefixes (Zipf 1.1)")
    p.add_argument("--multi-turn", type=float, default=0.3, help="share of follow-up turns")
    p.add_argument("--in-flight", type=int, default=8, help="requests in flight per rank")
    p.add_argument("--rate-per-rank", type=float, default=2.0, help="arrivals per rank per s")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--window", type=float, default=180.0)
    p.add_argument("--policy", default="e2")
    p.add_argument("--profile", default="llama3-8b-h100")
    p.add_argument("--per-block-events", action="store_true", help="one EVICTED per block")
    p.add_argument(
        "--gc",
        choices=("rank0", "default", "off"),
        default="rank0",
        help="rank0: the thresholds rank 0 sets (tune_gc); default: Python's; off: GC disabled",
    )
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    args = p.parse_args(argv)

    if args.gc == "off":
        gc.disable()
    elif args.gc == "rank0":
        tune_gc(RuntimeConfig().gc_gen0_threshold)
    rows = []
    header = (
        f"{'ranks':>5} {'prompt':>6} {'dec/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'tree tok':>9} {'rss MB':>7} {'w/ intake/s':>11} {'w/ reports/s':>12} {'ev/dec':>6}"
    )
    print(header)
    for ranks in args.ranks:
        for n in args.prompt_tokens:
            row = run_row(ranks, n, args)
            rows.append(row)
            print(
                f"{row['ranks']:>5} {row['prompt_tokens']:>6} {row['decisions_per_s']:>9.0f} "
                f"{row['p50_ms']:>7.3f} {row['p99_ms']:>7.3f} {row['tree_tokens']:>9} "
                f"{row['rss_mb']:>7.0f} {row['with_intake_per_s']:>11.0f} "
                f"{row['with_reports_per_s']:>12.0f} "
                f"{row['events_per_decision']:>6.2f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
