"""Seeded token-level workloads for the simulator: Preble's five, their mix, Zipf-skewed variants,
and Mooncake-format trace replay.

A prompt is a tuple of ``Piece`` objects, each a run of tokens with an identity. Pieces that many
requests share (a tool description, a document, an agent's history) are the *same object* in every
request that uses them, so the simulated engine reuses KV by piece identity without comparing
tokens, and the tokens themselves are materialized only when the real scheduler needs them::

    request 17:  [ Piece 3: tool doc, 1,560 tokens ][ Piece 9001: question, 275 tokens ]
    request 42:  [ Piece 3: tool doc, 1,560 tokens ][ Piece 9044: question, 301 tokens ]
                   \\_ same object: the engine reuses it, the scheduler's tree sees equal tokens _/

The same piece id always yields the same tokens (a slice of a fixed random pool at a hashed
offset), so a piece need not be stored: shared pieces keep their tokens once built, unique ones
rebuild them. Tokens are ``array('I')``, the radix tree's own token type, so the scheduler takes a
prompt without converting it and building, slicing or dropping a prompt is one memory copy.

Statistics (prompt length mean+-std, shared fraction mean+-std, distinct prefixes, rate per 2 GPUs)
are the ones the Preble paper reports for its workloads (Srivatsa et al., "Preble: Efficient
Distributed Prompt Scheduling for LLM Serving", ICLR 2025, Table 1 / section 5 configs).
"""

from __future__ import annotations

import heapq
import json
import math
import random
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "Piece",
    "SimRequest",
    "WorkloadSpec",
    "WORKLOADS",
    "workload_names",
    "make_workload",
    "load_trace",
    "poisson_arrivals",
    "gamma_arrivals",
    "ideal_hit_rate",
    "pooled_lru_hit_rate",
    "pooled_oracle_hit_rate",
    "default_rate",
    "default_requests",
    "prompt_stats",
    "arrivals",
    "spread_ticks",
    "piece_tokens",
]

VOCAB = 128_000
_POOL_SIZE = 1 << 22
_PART = 1 << 16
_pool: array | None = None


def _token_pool() -> array:
    """A fixed random run of token ids that every piece slices its tokens from (16 MiB)."""
    global _pool
    if _pool is None:
        ids = np.random.default_rng(20250601).integers(0, VOCAB, _POOL_SIZE)
        _pool = array("I", ids.astype(np.uint32).tobytes())
    return _pool


def _mix(x: int) -> int:
    """splitmix64 finalizer: a well-spread 64-bit hash of ``x``."""
    x &= 0xFFFFFFFFFFFFFFFF
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def piece_tokens(src: int, n: int) -> array:
    """Tokens ``0..n-1`` of token source ``src``: 64k-token parts, each a slice of the shared
    random pool at an offset hashed from (src, part). A shorter run of the same source is a prefix
    of a longer one."""
    pool = _token_pool()
    out = array("I")
    part = 0
    while len(out) < n:
        take = min(_PART, n - len(out))
        off = _mix(src * 1_000_003 + part) % (_POOL_SIZE - _PART)
        out += pool[off : off + take]
        part += 1
    return out


class Piece:
    """A run of ``n`` tokens with an identity ``pid``; ``src`` names its token source (a cut block
    of a trace shares the source of the full block, so its tokens are a prefix of it)."""

    __slots__ = ("pid", "src", "n", "keep", "_tokens")

    def __init__(self, pid: int, n: int, *, keep: bool = True, src: int | None = None) -> None:
        self.pid = pid
        self.src = pid if src is None else src
        self.n = n
        #: Keep the token list once built (shared pieces); unique ones rebuild it when asked.
        self.keep = keep
        self._tokens: array | None = None

    def tokens(self) -> array:
        t = self._tokens
        if t is None:
            t = piece_tokens(self.src, self.n)
            if self.keep:
                self._tokens = t
        return t

    def __repr__(self) -> str:
        return f"Piece({self.pid}, n={self.n})"


@dataclass(slots=True)
class SimRequest:
    request_id: str
    arrival: float
    pieces: tuple[Piece, ...]
    output_tokens: int
    """Tokens the request really generates (the simulated engine stops there)."""
    max_tokens: int
    """What the client asked for (what the scheduler sees)."""
    output_piece: Piece | None = None
    """Multi-turn: the output as a piece that later turns include; the engine caches it."""
    prompt_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_tokens:
            self.prompt_tokens = sum(p.n for p in self.pieces)

    def token_ids(self) -> array:
        """The prompt as ``array('I')`` (what the scheduler's tree compares; no conversion)."""
        out = array("I")
        for p in self.pieces:
            out += p.tokens()
        return out


# ---------------------------------------------------------------- arrivals


def poisson_arrivals(rate: float, n: int, rng: random.Random, start: float = 0.0) -> list[float]:
    """``n`` arrival times of a Poisson process of ``rate`` per second."""
    t = start
    out = []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def gamma_arrivals(
    rate: float, n: int, rng: random.Random, cv: float = 2.0, start: float = 0.0
) -> list[float]:
    """Bursty arrivals: gamma inter-arrival times of mean ``1/rate`` and coefficient of variation
    ``cv`` (cv = 1 is Poisson; larger is burstier)."""
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    t = start
    out = []
    for _ in range(n):
        t += rng.gammavariate(shape, scale)
        out.append(t)
    return out


def arrivals(kind: str, rate: float, n: int, rng: random.Random) -> list[float]:
    """``poisson`` or ``gamma`` / ``gamma:CV``."""
    if kind == "poisson":
        return poisson_arrivals(rate, n, rng)
    if kind.startswith("gamma"):
        cv = float(kind.split(":", 1)[1]) if ":" in kind else 2.0
        return gamma_arrivals(rate, n, rng, cv)
    raise ValueError(f"unknown arrival process {kind!r}: use poisson, gamma or gamma:CV")


# ---------------------------------------------------------------- Preble's workloads


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    prompt_mean: float
    prompt_std: float
    shared_mean: float
    shared_std: float
    prefixes: int
    rate_per_2gpus: float
    """Preble's request rate for 2 GPUs."""
    output_lo: int
    output_hi: int
    multi_turn: bool = False
    description: str = ""


WORKLOADS: dict[str, WorkloadSpec] = {
    s.name: s
    for s in (
        WorkloadSpec("toolbench", 1835, 742, 0.85, 0.13, 300, 12.0, 8, 80,
                     description="tool use: a tool's instructions + a user query"),
        WorkloadSpec("alfworld", 2285, 471, 0.97, 0.14, 200, 15.0, 16, 36, multi_turn=True,
                     description="embodied agent: few-shot prompt + growing episode, multi-turn"),
        WorkloadSpec("apps", 3871, 1656, 0.97, 0.074, 160, 4.5, 32, 512,
                     description="programming: a problem with few-shot examples + a sample"),
        WorkloadSpec("videoqa", 9865, 5976, 0.88, 0.32, 100, 10.0, 8, 64,
                     description="video QA: a video's tokens + a question"),
        WorkloadSpec("loogle", 23474, 6105, 0.91, 0.24, 24, 6.0, 5, 45,
                     description="long-document QA: a document + a question"),
    )
}  # fmt: skip

#: Seconds of arrivals at Preble's rate that make up a workload's default request count
#: (ToolBench: 3600 requests at 12 rps on 2 GPUs).
DEFAULT_DURATION_S = 300.0
ZIPF_DEFAULT = 1.1


def workload_names() -> list[str]:
    base = list(WORKLOADS)
    return base + ["mix"] + [f"{n}_zipf" for n in base] + ["mix_zipf"]


def _parse_name(name: str) -> tuple[str, float | None]:
    base, _, tail = name.partition("_zipf")
    if base not in WORKLOADS and base != "mix":
        raise ValueError(f"unknown workload {name!r}: one of {workload_names()} (or NAME_zipfS)")
    if name == base:
        return base, None
    return base, float(tail) if tail else ZIPF_DEFAULT


def default_rate(name: str, gpus: int) -> float:
    """Preble's rate for the workload, scaled from 2 GPUs to ``gpus``."""
    base, _ = _parse_name(name)
    if base == "mix":
        specs = list(WORKLOADS.values())
        # Each request draws its workload in proportion to its rate; the mix's capacity is the
        # harmonic blend of the per-workload rates.
        r = len(specs) / sum(1.0 / s.rate_per_2gpus for s in specs)
    else:
        r = WORKLOADS[base].rate_per_2gpus
    return r * gpus / 2


def default_requests(name: str, gpus: int) -> int:
    return int(round(default_rate(name, gpus) * DEFAULT_DURATION_S))


def _gamma(rng: random.Random, mean: float, std: float) -> float:
    """A positive length of the given mean and std."""
    shape = (mean / std) ** 2
    return rng.gammavariate(shape, mean / shape)


def _beta(rng: random.Random, mean: float, std: float) -> float:
    """A fraction in (0, 1) of the given mean and std (beta distribution; the std is capped at
    what a distribution on (0, 1) with that mean allows)."""
    var = min(std * std, 0.999 * mean * (1 - mean))
    k = mean * (1 - mean) / var - 1
    return rng.betavariate(max(1e-3, mean * k), max(1e-3, (1 - mean) * k))


def _standardized(xs: list[float], mean: float, std: float) -> list[float]:
    if len(xs) < 2:
        return [mean] * len(xs)
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs)) or 1.0
    return [mean + (x - m) * std / s for x in xs]


def _clipped_normal(rng: random.Random, mean: float, std: float, lo: float, hi: float) -> float:
    for _ in range(32):
        v = rng.gauss(mean, std)
        if lo <= v <= hi:
            return v
    return min(hi, max(lo, mean))


class _Ids:
    def __init__(self, start: int) -> None:
        self.next = start

    def __call__(self) -> int:
        self.next += 1
        return self.next


def _zipf_weights(n: int, s: float | None) -> list[float] | None:
    if s is None:
        return None
    return [1.0 / (k + 1) ** s for k in range(n)]


#: How far a Zipf variant's request-level means (prompt tokens, relative; shared fraction,
#: absolute) may stray from its spec, and how many seeded popularity orders are tried to get there.
ZIPF_PROMPT_TOL = 0.10
ZIPF_SHARED_TOL = 0.05
ZIPF_ORDER_TRIES = 256


_Prefix = tuple[Piece, float]  # a shared prefix and the mean length of the suffixes after it


def _weighted_means(prefixes: list[_Prefix], weights: list[float]) -> tuple[float, float]:
    """Request-level prompt-length and shared-fraction means when prefix i is drawn with weight
    ``weights[i]`` (each at its mean suffix)."""
    total = sum(weights)
    prompt = sum(w * (p.n + s) for (p, s), w in zip(prefixes, weights, strict=True)) / total
    shared = sum(w * p.n / (p.n + s) for (p, s), w in zip(prefixes, weights, strict=True)) / total
    return prompt, shared


def _popularity_order(
    prefixes: list[_Prefix], weights: list[float], spec: WorkloadSpec, rng: random.Random
) -> list[_Prefix]:
    """The base workload's prefixes, hottest first, in an order that keeps the spec's
    request-level means. Under Zipf(1.1) the five hottest prefixes take half the requests, so
    their own draws would set the workload's statistics: with VideoQA's U-shaped shared fraction
    a hottest "video" can share 1 token, and that is no longer the hot-prefix case the variant
    exists for. The generation order is kept when it is within tolerance (no draw is taken);
    otherwise seeded shuffles are tried, and the closest is kept if none is."""

    def miss(order: list[_Prefix]) -> float:
        prompt, shared = _weighted_means(order, weights)
        return max(
            abs(prompt / spec.prompt_mean - 1) / ZIPF_PROMPT_TOL,
            abs(shared - spec.shared_mean) / ZIPF_SHARED_TOL,
        )

    best, best_miss = prefixes, miss(prefixes)
    if best_miss <= 1:
        return prefixes
    order_rng = random.Random(rng.getrandbits(64))
    for _ in range(ZIPF_ORDER_TRIES):
        order = order_rng.sample(prefixes, len(prefixes))
        m = miss(order)
        if m <= 1:
            return order
        if m < best_miss:
            best, best_miss = order, m
    return best


class _PrefixWorkload:
    """Single-turn: each request is one of ``prefixes`` shared prefixes + a unique suffix."""

    def __init__(self, spec: WorkloadSpec, rng: random.Random, ids: _Ids, zipf: float | None):
        self.spec = spec
        self.rng = rng
        self.ids = ids
        self.prefixes: list[_Prefix] = []
        # Prompt lengths per prefix, standardized to the paper's mean and std (a few dozen
        # draws from a skewed distribution otherwise miss the mean by 10-20%).
        totals = _standardized(
            [_gamma(rng, spec.prompt_mean, spec.prompt_std) for _ in range(spec.prefixes)],
            spec.prompt_mean,
            spec.prompt_std,
        )
        for total in totals:
            total = max(16.0, total)
            frac = _beta(rng, spec.shared_mean, spec.shared_std)
            shared = min(max(1, round(total * frac)), round(total) - 1)
            self.prefixes.append((Piece(ids(), shared), max(1.0, total - shared)))
        self.weights = _zipf_weights(spec.prefixes, zipf)
        if self.weights is not None:
            self.prefixes = _popularity_order(self.prefixes, self.weights, spec, rng)

    def next(self, request_id: str, arrival: float) -> SimRequest:
        rng = self.rng
        if self.weights is None:
            piece, suffix_mean = self.prefixes[rng.randrange(len(self.prefixes))]
        else:
            piece, suffix_mean = rng.choices(self.prefixes, self.weights)[0]
        suffix = max(1, round(suffix_mean * rng.uniform(0.5, 1.5)))
        out = rng.randint(self.spec.output_lo, self.spec.output_hi)
        return SimRequest(
            request_id, arrival, (piece, Piece(self.ids(), suffix, keep=False)), out, out
        )


class _AgentWorkload:
    """Multi-turn (ALFWorld): an episode is a task type's few-shot prompt + the environment's
    description + (action, observation) turns; turn k's prompt is turn k-1's prompt, its output
    and the new observation. About ``rate * think_s`` episodes run at once; each arrival is the
    next turn of a random running episode (open loop, so every policy sees the same requests)."""

    TASK_TYPES = 6
    THINK_S = 4.0

    def __init__(self, spec: WorkloadSpec, rng: random.Random, ids: _Ids, zipf: float | None,
                 rate: float) -> None:  # fmt: skip
        self.spec = spec
        self.rng = rng
        self.ids = ids
        # Few-shot prompt per task type and episode growth sized so that prompts average
        # ``prompt_mean`` over an episode of 10-25 turns (history ~ +70 tokens per turn).
        self.types = [
            Piece(ids(), round(_clipped_normal(rng, spec.prompt_mean - 700, 300, 600, 4000)))
            for _ in range(self.TASK_TYPES)
        ]
        self.env_weights = _zipf_weights(spec.prefixes, zipf)
        self.envs = list(range(spec.prefixes))
        self.concurrent = max(2, round(rate * self.THINK_S))
        self.running: list[list] = []
        self.started = 0

    def _start(self) -> list:
        rng = self.rng
        if self.env_weights is None:
            env = self.started % self.spec.prefixes
        else:
            env = rng.choices(self.envs, self.env_weights)[0]
        self.started += 1
        task = self.types[env % self.TASK_TYPES]
        desc = Piece(self.ids(), rng.randint(60, 160))
        # [history pieces, turns left]
        return [[task, desc], rng.randint(10, 25)]

    def next(self, request_id: str, arrival: float) -> SimRequest:
        rng = self.rng
        while len(self.running) < self.concurrent:
            self.running.append(self._start())
        i = rng.randrange(len(self.running))
        ep = self.running[i]
        hist: list[Piece] = ep[0]
        obs = Piece(self.ids(), rng.randint(20, 70))
        pieces = tuple(hist) + (obs,)
        out = rng.randint(self.spec.output_lo, self.spec.output_hi)
        out_piece = Piece(self.ids(), out)
        ep[0] = list(pieces) + [out_piece]
        ep[1] -= 1
        if ep[1] <= 0:
            self.running[i] = self._start()
        return SimRequest(request_id, arrival, pieces, out, out, output_piece=out_piece)


def make_workload(
    name: str,
    n: int,
    rate: float,
    seed: int = 0,
    arrival: str = "poisson",
) -> list[SimRequest]:
    """``n`` requests of workload ``name`` (see ``workload_names()``) arriving at ``rate`` per
    second. The same (name, n, rate, seed, arrival) always gives the same requests and tokens."""
    base, zipf = _parse_name(name)
    rng = random.Random(f"{name}/{seed}")
    times = arrivals(arrival, rate, n, random.Random(f"{name}/{seed}/arrivals"))
    ids = _Ids(0)
    if base == "mix":
        gens = [_make_gen(spec, rng, ids, zipf, rate) for spec in WORKLOADS.values()]
        weights = [spec.rate_per_2gpus for spec in WORKLOADS.values()]
        return [rng.choices(gens, weights)[0].next(f"{name}-{i}", t) for i, t in enumerate(times)]
    gen = _make_gen(WORKLOADS[base], rng, ids, zipf, rate)
    return [gen.next(f"{name}-{i}", t) for i, t in enumerate(times)]


def _make_gen(spec: WorkloadSpec, rng, ids, zipf, rate):
    if spec.multi_turn:
        return _AgentWorkload(spec, rng, ids, zipf, rate)
    return _PrefixWorkload(spec, rng, ids, zipf)


# ---------------------------------------------------------------- trace replay

MOONCAKE_BLOCK = 512


def _read_trace(path: str | Path, n: int | None) -> list[dict]:
    """The first ``n`` (all for None) requests of a Mooncake JSONL trace, each checked, so that a
    bad line is reported by file and line number instead of failing later without either."""
    rows: list[dict] = []
    # Bytes, decoded line by line: text mode would fail on a line that is not UTF-8 while
    # iterating, outside the try, and the message would name neither the file nor the line.
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(_trace_row(json.loads(line.decode("utf-8"))))
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"trace {path} line {lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})"
                ) from None
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"trace {path} line {lineno}: not JSON ({exc.msg} at column {exc.colno})"
                ) from None
            except ValueError as exc:
                raise ValueError(f"trace {path} line {lineno}: {exc}") from None
            if n is not None and len(rows) >= n:
                break
    if not rows:
        raise ValueError(f"trace {path} holds no requests")
    return rows


def _trace_row(row: object) -> dict:
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in ("timestamp", "input_length", "hash_ids") if k not in row]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    for key in ("timestamp", "input_length", "output_length"):
        v = row.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < math.inf:
            raise ValueError(f"{key} must be a number >= 0, got {v!r}")
    if row["input_length"] < 1:
        raise ValueError("input_length must be >= 1: a request needs a prompt")
    ids = row["hash_ids"]
    if not isinstance(ids, list) or not all(isinstance(h, int) for h in ids):
        raise ValueError(f"hash_ids must be a list of integers, got {ids!r}")
    need = math.ceil(row["input_length"] / MOONCAKE_BLOCK)
    if len(ids) < need:
        raise ValueError(
            f"{len(ids)} hash_ids for input_length {row['input_length']}, which needs {need}"
            f" blocks of {MOONCAKE_BLOCK} tokens"
        )
    return row


def load_trace(
    path: str | Path,
    rate: float | None = None,
    n: int | None = None,
    seed: int = 0,
    max_output: int | None = None,
) -> list[SimRequest]:
    """Replay a Mooncake-format JSONL trace (``timestamp`` ms, ``input_length``,
    ``output_length``, ``hash_ids``: one id per 512-token block, equal ids = equal blocks; the
    last block is cut to ``input_length``).

    Timestamps that are quantized (several requests on one tick) are spread uniformly within the
    tick; ``rate`` rescales arrivals to that mean rate; ``n`` keeps the first ``n`` requests.
    """
    rows = _read_trace(path, n)
    rows.sort(key=lambda r: r["timestamp"])
    times = spread_ticks([float(r["timestamp"]) / 1000.0 for r in rows], random.Random(seed))
    t0 = times[0]
    times = [t - t0 for t in times]
    if rate is not None:
        span = times[-1] if times[-1] > 0 else len(times)
        scale = (len(times) / span) / rate if times[-1] > 0 else 1.0 / rate
        times = [t * scale if times[-1] > 0 else i * scale for i, t in enumerate(times)]
    uses: dict[int, int] = {}
    for r in rows:
        for h in r["hash_ids"]:
            uses[h] = uses.get(h, 0) + 1
    full: dict[int, Piece] = {}
    cut: dict[tuple[int, int], Piece] = {}
    next_id = 1 << 32  # piece ids of cut blocks, apart from the trace's own hash ids
    out = []
    for i, (r, t) in enumerate(zip(rows, times, strict=True)):
        hashes = r["hash_ids"]
        length = int(r["input_length"])
        pieces = []
        for j, h in enumerate(hashes):
            size = min(MOONCAKE_BLOCK, length - j * MOONCAKE_BLOCK)
            if size <= 0:
                break
            if size == MOONCAKE_BLOCK:
                p = full.get(h)
                if p is None:
                    p = full[h] = Piece(h, size, keep=uses[h] > 1)
            else:
                p = cut.get((h, size))
                if p is None:
                    next_id += 1
                    p = cut[(h, size)] = Piece(next_id, size, keep=uses[h] > 1, src=h)
            pieces.append(p)
        o = max(1, int(r.get("output_length", 1)))
        if max_output is not None:
            o = min(o, max_output)
        out.append(SimRequest(f"trace-{i}", t, tuple(pieces), o, o))
    return out


def spread_ticks(times: Sequence[float], rng: random.Random) -> list[float]:
    """Spread requests that share a timestamp uniformly within the tick (the smallest gap between
    distinct timestamps), keeping their order."""
    distinct = sorted(set(times))
    if len(distinct) == len(times):
        return list(times)
    if len(distinct) > 1:
        tick = min(b - a for a, b in zip(distinct, distinct[1:], strict=False))
    else:
        tick = 1.0
    out: list[float] = []
    i = 0
    while i < len(times):
        j = i
        while j < len(times) and times[j] == times[i]:
            j += 1
        offsets = sorted(rng.random() * tick for _ in range(j - i))
        out.extend(times[i] + o for o in offsets)
        i = j
    return out


# ---------------------------------------------------------------- statistics


def ideal_hit_rate(requests: Iterable[SimRequest]) -> float:
    """Share of prompt tokens a prefix cache could reuse if nothing were ever evicted: tokens of
    pieces whose whole prefix (every piece up to and including them) appeared before, in an
    earlier prompt or a cached output, in arrival order. A block repeated after a different
    prefix (possible in traces) is not reusable by prefix caching and does not count. That is
    ``pooled_lru_hit_rate`` with unlimited room."""
    return pooled_lru_hit_rate(requests, math.inf)


def pooled_lru_hit_rate(requests: Iterable[SimRequest], capacity_tokens: float) -> float:
    """What ``ideal_hit_rate`` becomes when memory is finite: the share of prompt tokens reused by
    one LRU prefix cache of ``capacity_tokens`` (a cluster's KV capacity, pooled as if one GPU
    held it all and nothing were running), in arrival order, at piece granularity.

    A reference for what a placement policy can reach on this memory with LRU engines (vLLM's
    eviction), not a strict bound (``pooled_oracle_hit_rate`` evicts better; per-GPU caches,
    running requests and block rounding keep less). On a trace whose reuse distances exceed the
    cluster's memory (Mooncake at 8 GPUs) it is far below the ideal. Prompt and cached-output
    pieces both take room; a request's own path is touched deepest-first, so the LRU end holds
    leaves before their ancestors."""
    cache: OrderedDict[tuple[int, int], int] = OrderedDict()
    used = total = reused = 0
    for path, prompt_pieces in _piece_paths(requests):
        hit = True
        for i, (node, n) in enumerate(path):
            if i < prompt_pieces:
                total += n
                hit = hit and node in cache
                if hit:
                    reused += n
            if node not in cache:
                cache[node] = n
                used += n
        for node, _ in reversed(path):  # the root-most node ends up most recent
            cache.move_to_end(node)
        while used > capacity_tokens and cache:
            used -= cache.popitem(last=False)[1]
    return reused / total if total else 0.0


def pooled_oracle_hit_rate(requests: Iterable[SimRequest], capacity_tokens: float) -> float:
    """``pooled_lru_hit_rate`` with a clairvoyant eviction: when the pooled cache is over
    ``capacity_tokens``, drop the piece whose next use is furthest away (Belady's rule; among
    equals, the deepest, so a kept piece never waits on an evicted ancestor).

    What this memory could reuse if the engines knew the future: the gap to the LRU figure is the
    engines' eviction, the gap from the LRU figure down to a policy's hit rate is placement (and
    per-GPU memory). Belady is optimal for equal sizes; with pieces of unequal size it is a
    close estimate, not a strict bound."""
    paths = list(_piece_paths(requests))
    next_use: list[list[float]] = [[]] * len(paths)
    seen: dict[tuple[int, int], int] = {}
    for i in range(len(paths) - 1, -1, -1):
        next_use[i] = [seen.get(node, math.inf) for node, _ in paths[i][0]]
        for node, _ in paths[i][0]:
            seen[node] = i
    cache: dict[tuple[int, int], tuple[int, float]] = {}  # node -> (tokens, next use)
    heap: list[tuple[float, int, int, tuple[int, int]]] = []  # (-next use, -depth, order, node)
    used = total = reused = order = 0
    for (path, prompt_pieces), uses in zip(paths, next_use, strict=True):
        hit = True
        for depth, ((node, n), nxt) in enumerate(zip(path, uses, strict=True)):
            if depth < prompt_pieces:
                total += n
                hit = hit and node in cache
                if hit:
                    reused += n
            old = cache.get(node)
            used += n - (old[0] if old else 0)
            cache[node] = (n, nxt)
            order += 1
            heapq.heappush(heap, (-nxt, -depth, order, node))
        while used > capacity_tokens and heap:
            neg_next, _, _, node = heapq.heappop(heap)
            entry = cache.get(node)
            if entry is not None and entry[1] == -neg_next:  # else a stale heap entry
                used -= entry[0]
                del cache[node]
    return reused / total if total else 0.0


def _piece_paths(requests: Iterable[SimRequest]):
    """Per request in arrival order: its pieces as prefix-tree nodes ``((parent key, piece id),
    tokens)``, the cached output last, and how many of them are the prompt."""
    for r in sorted(requests, key=lambda r: r.arrival):
        key, path = 0, []
        pieces = (*r.pieces, r.output_piece) if r.output_piece is not None else r.pieces
        for p in pieces:
            node = (key, p.pid)
            path.append((node, p.n))
            key = hash(node)
        yield path, len(r.pieces)


def prompt_stats(requests: Sequence[SimRequest]) -> dict[str, float]:
    """Prompt length and shared fraction (tokens of pieces some other request also uses), each
    as mean and std, plus distinct first pieces."""
    count: dict[int, int] = {}
    for r in requests:
        for p in r.pieces:
            count[p.pid] = count.get(p.pid, 0) + 1
    lens = [float(r.prompt_tokens) for r in requests]
    fracs = [sum(p.n for p in r.pieces if count[p.pid] > 1) / r.prompt_tokens for r in requests]

    def ms(v: list[float]) -> tuple[float, float]:
        m = sum(v) / len(v)
        return m, math.sqrt(sum((x - m) ** 2 for x in v) / len(v))

    lm, ls = ms(lens)
    fm, fs = ms(fracs)
    return {
        "prompt_mean": lm,
        "prompt_std": ls,
        "shared_mean": fm,
        "shared_std": fs,
        "distinct_first": len({r.pieces[0].pid for r in requests}),
    }
