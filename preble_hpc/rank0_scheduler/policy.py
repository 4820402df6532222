"""Placement policies: Preble's E2 and the baselines, under one interface.

Every policy is a function of a ``PolicyInput`` (the tree match seen per rank, per-rank loads, the
cost model's estimates for this request) and returns a ``Decision``. E2 is a pure function of its
input and the config; baselines that keep a cursor (round robin) are small objects. The scheduler
(``scheduler.py``) builds the input; this module never touches the tree, the clock or the network.

Units: every cost E2 compares is seconds of request latency (see ``e2``): the wait behind a
rank's prefill backlog ``L``, eviction ``M``, prefill ``P``, plus the stall and decode terms.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from preble_hpc.config import ConfigError, SchedulerConfig

__all__ = [
    "Decision",
    "DecisionKind",
    "POLICY_NAMES",
    "PolicyInput",
    "Policy",
    "check_policy_name",
    "make_policy",
    "e2",
    "e2_loads",
    "explore_cost",
    "cheapest",
]


class DecisionKind(enum.Enum):
    """Which branch placed a request; ``.value`` is the name used in outputs."""

    EXPLOIT = "exploit"
    EXPLORE = "explore"
    REPLICATE = "replicate"
    REBALANCE = "rebalance"
    BASELINE = "baseline"


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one request goes, why, and how much of its prompt the tree believes is cached there."""

    rank: int
    kind: DecisionKind
    reason: str
    cached_tokens: int


POLICY_NAMES = (
    "e2",
    "round_robin",
    "least_load",
    "prefix_affinity",
    "sglang_cache_aware",
    "dynamo_kv",
    "llmd_scorer",
)


def check_policy_name(name: str) -> None:
    """Raise ``ConfigError`` naming the valid policies when ``name`` is not one of them (Preble's
    code silently fell back to random on a typo)."""
    if name not in POLICY_NAMES:
        raise ConfigError(
            f"unknown scheduling policy {name!r}; valid policies: {', '.join(POLICY_NAMES)}"
        )


@dataclass(slots=True)
class PolicyInput:
    """What a policy sees for one request. Per-rank maps cover every rank in ``ranks``."""

    ranks: Sequence[int]
    """Live ranks that may take the request, ascending."""
    prompt_tokens: int
    max_tokens: int
    per_rank_cached: Mapping[int, int]
    """Prompt tokens each rank holds (absent: 0), from the global tree."""
    cached: int
    """Longest prefix any rank holds."""
    load: Mapping[int, float]
    """L: GPU seconds of the rank's requests in the window H."""
    in_flight: Mapping[int, int]
    """Requests placed on the rank that have not ended."""
    waiting: Mapping[int, int]
    """Requests queued on the rank, not yet running (worker LoadStats; in-flight before any)."""
    kv_usage: Mapping[int, float]
    """Fraction of the rank's KV cache in use, 0..1."""
    hit_ratio: Mapping[int, float]
    """The rank's own cached/prompt token ratio over the window."""
    tree_tokens: Mapping[int, int]
    """Tokens the global tree believes the rank holds."""
    block_size: Mapping[int, int]
    active_prefill_tokens: Mapping[int, int]
    """Prompt tokens still to prefill on the rank (placed, no first token yet)."""
    active_blocks: Mapping[int, int]
    """KV blocks of the rank's in-flight requests."""
    prefill_cost: Callable[[int], float]
    """P_i: prefill time of this request's missing tokens on rank i."""
    eviction_cost: Callable[[int], float]
    """M_i: cost of the KV rank i must evict to fit this request."""
    backlog: Mapping[int, float] | None = None
    """E2's load: seconds of prefill placed on the rank that has not produced a first token yet
    (the wait a new request queues behind). ``None``: the windowed ``load`` stands in."""
    decoding: Mapping[int, int] | None = None
    """Requests on the rank past their first token (the batch a new prefill stalls). ``None``: 0."""
    queued_behind: Mapping[int, float] | None = None
    """Requests expected to arrive on the rank while its backlog drains (its recent arrival rate x
    ``backlog``): each waits behind this request's prefill too. ``None``: 0."""
    prefill_overhead: float = 0.0
    """The fixed per-prefill part of ``P`` (launch, sampling): a prefill chunk that rides in a
    running batch's step adds only the rest to that step, so the stall counts ``P - overhead``."""
    decode_cost: Callable[[int], float] | None = None
    """D_i: this request's decode time on rank i plus what its decoding adds to the sequences
    already there. ``None``: 0."""
    explore_decode_cost: Callable[[int], float] | None = None
    """D_i as E2 prices it when exploring, where that differs from ``decode_cost`` (see
    ``SchedulerConfig.explore_prefill_window_s``). ``None``: ``decode_cost``."""
    eviction_cost_above: Callable[[int, float], float] | None = None
    """``(rank, bound) -> M_i``, allowed to stop early and return any value above ``bound`` once
    ``M_i`` exceeds it (``cheapest`` passes what would already lose). ``None``: the full
    ``eviction_cost``."""

    deepest_holders: list[int] | None = None
    """The ranks holding the longest prefix, ascending, when the caller knows them already (the
    tree's match does); ``None``: ``holders()`` finds them in ``per_rank_cached``."""

    def holders(self) -> list[int]:
        """Ranks holding the longest cached prefix, ascending (computed once)."""
        if self.deepest_holders is None:
            c = self.cached
            self.deepest_holders = (
                sorted(r for r, n in self.per_rank_cached.items() if n == c) if c > 0 else []
            )
        return self.deepest_holders


class Policy:
    """A placement policy: ``decide(input) -> Decision``."""

    name = ""

    def decide(self, inp: PolicyInput) -> Decision:  # pragma: no cover - interface
        raise NotImplementedError


# ---------------------------------------------------------------------- E2


def e2_loads(inp: PolicyInput) -> Mapping[int, float]:
    """E2's load ``L`` per rank: the prefill backlog a new request waits behind (seconds), or the
    windowed load when the caller supplies no backlog."""
    return inp.backlog if inp.backlog is not None else inp.load


def _stalled(inp: PolicyInput, rank: int) -> float:
    """``B_i + Q_i``: the requests a prefill on ``rank`` delays (see ``e2``)."""
    decoding, behind = inp.decoding, inp.queued_behind
    stalled = decoding[rank] if decoding is not None else 0
    return stalled + behind[rank] if behind is not None else stalled


def explore_cost(inp: PolicyInput, rank: int) -> float:
    """``L + M + P`` of placing the request on ``rank``, in seconds of latency (see ``e2``)."""
    return _cost_but_eviction(inp, rank) + inp.eviction_cost(rank)


def _cost_but_eviction(inp: PolicyInput, rank: int) -> float:
    """``explore_cost`` without ``M`` (the one term that may walk the tree)."""
    decode = inp.decode_cost
    p = inp.prefill_cost(rank)
    cost = e2_loads(inp)[rank] + p + (p - inp.prefill_overhead) * _stalled(inp, rank)
    return cost + decode(rank) if decode is not None else cost


def cheapest(inp: PolicyInput, candidates: Iterable[int]) -> tuple[int | None, float]:
    """The candidate with the lowest ``L + M + P`` (``explore_cost``) and that cost (ties: fewest
    in flight, then lowest rank); ``(None, inf)`` for no candidates. ``M`` (the only term that may
    walk the tree) is computed first for the rank with the least rest, then only for ranks whose
    rest alone does not already lose, so the bound handed to each eviction walk is tight."""
    load = e2_loads(inp)
    decoding, behind, decode = inp.decoding, inp.queued_behind, inp.decode_cost
    evict, prefill, in_flight = inp.eviction_cost, inp.prefill_cost, inp.in_flight
    evict_above = inp.eviction_cost_above
    overhead = inp.prefill_overhead
    scored = []
    for r in candidates:  # _stalled inlined: this loop runs over every rank on each explore
        stalled: float = decoding[r] if decoding is not None else 0
        if behind is not None:
            stalled += behind[r]
        p = prefill(r)
        base = load[r] + p + (p - overhead) * stalled
        if decode is not None:
            base += decode(r)
        scored.append((base, r))
    if not scored:
        return None, math.inf
    # The rank with the least L + P goes first: its full cost bounds every other rank's walk.
    first = min(scored)
    best: int | None = None
    best_cost = math.inf
    for base, r in (first, *scored):
        if base > best_cost or (r == first[1] and best is not None):
            continue  # M >= 0: it loses already (or it is the first rank, seen)
        c = base + (evict(r) if evict_above is None else evict_above(r, best_cost - base))
        if c < best_cost or (
            c == best_cost
            and best is not None
            and (in_flight.get(r, 0), r) < (in_flight.get(best, 0), best)
        ):
            best, best_cost = r, c
    return best, best_cost


def e2(inp: PolicyInput, config: SchedulerConfig) -> Decision:
    """Preble's E2 (Srivatsa et al., "Preble: Efficient Distributed Prompt Scheduling for LLM
    Serving", ICLR 2025, Sec. 4 / Algorithm 1), with every cost in seconds of request latency::

        L + M + P  =  W_i                      wait behind the rank's queued/running prefill
                    + M_i                      hit-weighted recompute of what it must evict
                    + P_i                      prefill of the tokens rank i lacks
                    + (P_i - overhead) * B_i   the stall that prefill causes to the B_i
                                               sequences decoding there (chunked prefill)
                    + (P_i - overhead) * Q_i   and to the Q_i requests expected to arrive there
                                               while its backlog drains (rate_i x W_i)
                    + D_i                      its own decode there + the step time it adds

    The paper's ``L`` (GPU seconds in a 3-minute window, decode at its marginal cost) sees neither
    a rank's backlog nor the stall; in the simulator it made E2 spread prefixes and lose to llm-d /
    SGLang by 2-3x on long prompts. ``W`` replaces it when the scheduler supplies ``backlog``.
    ``Q`` (ours) is the queueing cost of a backlog: work added to a rank whose prefill queue
    takes W_i to drain delays every request placed there meanwhile. Without it a rank busy
    prefilling (few decoders, so a small stall) kept taking prefills in a cold-start burst,
    and its backlog and tail latency grew (ToolBench p99 7% behind SGLang's; 1% with it).

    - EXPLOIT when ``cached > missing``: the holder of the longest prefix with the lowest cost.
      (The rebalancer moves it to a non-holder only when that is cheaper by the same measure,
      i.e. when the holder's backlog exceeds the prefill of the missing tokens elsewhere.)
    - EXPLORE otherwise: the rank with the lowest cost over all ranks; for a prompt new to
      every rank where prompts are mostly hits, the one holding the fewest tokens within
      ``config.new_prefix_slack`` of that cost (``_spread_new_prefix``): where a prefix starts is
      where its hits will go.
    - Prefill/decode balance (paper Sec. 4.2): the cost already prices it (a decode-heavy rank has
      no prefill backlog; a prefill beside many decodes stalls them), so a decode-heavy rank
      (windowed hit ratio >= ``config.decode_heavy_hit_ratio``) takes the prefill-heavy prompt
      when it costs no more than the cheapest rank (a tie-break; a 1.5x allowance measured worse).
    """
    prompt = inp.prompt_tokens
    cached = inp.cached
    missing = prompt - cached
    if cached > missing:
        holders = inp.holders()
        if len(holders) == 1:  # nothing to compare: pricing it would only fill the reason
            return Decision(
                holders[0], DecisionKind.EXPLOIT, f"cached {cached} > missing {missing}", cached
            )
        rank, cost = cheapest(inp, holders)
        assert rank is not None
        return Decision(
            rank,
            DecisionKind.EXPLOIT,
            f"cached {cached} > missing {missing}: cheapest of {len(holders)} holder(s), "
            f"L+M+P={cost:.4f}s",
            cached,
        )
    if inp.explore_decode_cost is not None:
        inp = replace(inp, decode_cost=inp.explore_decode_cost)
    rank, cost = cheapest(inp, inp.ranks)
    assert rank is not None
    if _spreads_new_prefix(inp, config):
        spread = _spread_new_prefix(inp, rank, cost * (1 + config.new_prefix_slack))
        if spread is not None:
            return spread
    threshold = config.decode_heavy_hit_ratio
    decode_heavy = [r for r in inp.ranks if inp.hit_ratio.get(r, 0.0) >= threshold and r != rank]
    if decode_heavy and inp.hit_ratio.get(rank, 0.0) < threshold:
        alt, alt_cost = cheapest(inp, decode_heavy)
        if alt is not None and alt_cost <= cost:
            return Decision(
                alt,
                DecisionKind.EXPLORE,
                f"cached {cached} <= missing {missing}: decode-heavy rank (hit ratio "
                f"{inp.hit_ratio.get(alt, 0.0):.2f} >= {threshold}) takes the prefill-heavy "
                f"prompt, L+M+P={alt_cost:.4f}s vs best {cost:.4f}s",
                inp.per_rank_cached.get(alt, 0),
            )
    return Decision(
        rank,
        DecisionKind.EXPLORE,
        f"cached {cached} <= missing {missing}: min L+M+P={cost:.4f}s over {len(inp.ranks)} ranks",
        inp.per_rank_cached.get(rank, 0),
    )


def _spreads_new_prefix(inp: PolicyInput, config: SchedulerConfig) -> bool:
    """Whether the request starts a prefix (no rank holds any of it beyond what every rank holds)
    on a cluster where prompts are mostly reused (``config.new_prefix_min_hit_ratio``)."""
    holders = inp.holders()  # the tree holds prompts for live ranks only
    if config.new_prefix_slack <= 0 or 0 < len(holders) < len(inp.ranks):
        return False
    hit = inp.hit_ratio
    mean_hit = sum(hit.get(r, 0.0) for r in inp.ranks) / len(inp.ranks)
    return mean_hit >= config.new_prefix_min_hit_ratio


def _spread_new_prefix(inp: PolicyInput, cheapest_rank: int, bound: float) -> Decision | None:
    """A prompt new to every rank: the rank holding the fewest tokens among those costing at most
    ``bound``, when it holds fewer than the cheapest rank (ties: cost, then rank); else None.

    Its hits will follow it to that rank (moving them later costs a full prefill each), so the
    cached tokens stand in for the traffic a rank's prefixes will bring, as in SGLang's rule for
    misses. On APPS at 108/s the cheapest-rank choice left one rank with 20% more decode work for
    the whole run (its prefixes were the longest) and a p99 5% above SGLang's (see the README)."""
    tree = inp.tree_tokens
    least = tree.get(cheapest_rank, 0)
    # Smallest caches first: the first one within the bound wins (ties: cost), so usually only a
    # rank or two is priced.
    smaller = sorted((held, r) for r in inp.ranks if (held := tree.get(r, 0)) < least)
    evict_above = inp.eviction_cost_above
    best: tuple[int, float, int] | None = None
    for held, r in smaller:
        if best is not None and held > best[0]:
            break
        c = _cost_but_eviction(inp, r)
        if c > bound:
            continue
        c += inp.eviction_cost(r) if evict_above is None else evict_above(r, bound - c)
        if c <= bound and (best is None or c < best[1]):
            best = (held, c, r)
    if best is None:
        return None
    held, c, r = best
    return Decision(
        r,
        DecisionKind.EXPLORE,
        f"new prefix: rank {r} holds {held} tokens (cheapest rank {cheapest_rank}: {least}), "
        f"L+M+P={c:.4f}s <= {bound:.4f}s",
        inp.per_rank_cached.get(r, 0),
    )


class E2Policy(Policy):
    name = "e2"

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config

    def decide(self, inp: PolicyInput) -> Decision:
        return e2(inp, self.config)


# ---------------------------------------------------------------------- baselines


def _baseline(rank: int, reason: str, inp: PolicyInput) -> Decision:
    return Decision(rank, DecisionKind.BASELINE, reason, inp.per_rank_cached.get(rank, 0))


class RoundRobin(Policy):
    """Next live rank in turn, ignoring cache and load."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def decide(self, inp: PolicyInput) -> Decision:
        ranks = inp.ranks
        rank = ranks[self._next % len(ranks)]
        self._next = (self._next + 1) % len(ranks)
        return _baseline(rank, "round robin", inp)


class LeastLoad(Policy):
    """Lowest windowed load ``L`` (ties: fewest in flight, then lowest rank); ignores the cache."""

    name = "least_load"

    def decide(self, inp: PolicyInput) -> Decision:
        rank = min(inp.ranks, key=lambda r: (inp.load[r], inp.in_flight.get(r, 0), r))
        return _baseline(rank, f"least load L={inp.load[rank]:.4f}s", inp)


class PrefixAffinity(Policy):
    """Always exploit: a rank holding the longest prefix (least loaded among them); with nothing
    cached anywhere, the least-loaded rank."""

    name = "prefix_affinity"

    def decide(self, inp: PolicyInput) -> Decision:
        holders = inp.holders() or list(inp.ranks)
        rank = min(holders, key=lambda r: (inp.load[r], inp.in_flight.get(r, 0), r))
        return _baseline(rank, f"longest prefix {inp.cached} tokens", inp)


@dataclass
class SglangCacheAware(Policy):
    """SGLang router ``cache_aware`` policy (sgl-project/sglang, sgl-router
    ``src/policies/cache_aware.rs``; defaults from the router's CLI: ``cache_threshold=0.3``,
    ``balance_abs_threshold=64``, ``balance_rel_threshold=1.5``).

    Load is the number of requests the router has in flight on each worker. If the system is
    imbalanced, ``max - min > balance_abs_threshold`` AND ``max > min * balance_rel_threshold``,
    take the worker with the fewest in flight (shortest queue). Otherwise match the prompt in the
    router's tree: if ``matched / prompt > cache_threshold`` take the worker with the longest
    match, else the worker whose tree is smallest (most room for new cache).
    The router's tree is approximate (its own routing history, over characters); ours is the
    engines' real cache over tokens, the same for every policy, so only the rule is compared.
    """

    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    name = "sglang_cache_aware"

    def decide(self, inp: PolicyInput) -> Decision:
        counts = inp.in_flight
        loads = [counts.get(r, 0) for r in inp.ranks]
        hi, lo = max(loads), min(loads)
        if hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold:
            rank = min(inp.ranks, key=lambda r: (counts.get(r, 0), r))
            return _baseline(rank, f"imbalanced ({hi} vs {lo} in flight): shortest queue", inp)
        rate = inp.cached / inp.prompt_tokens if inp.prompt_tokens else 0.0
        if rate > self.cache_threshold:
            rank = min(inp.holders(), key=lambda r: (counts.get(r, 0), r))
            return _baseline(rank, f"match rate {rate:.2f} > {self.cache_threshold}", inp)
        rank = min(inp.ranks, key=lambda r: (inp.tree_tokens.get(r, 0), r))
        return _baseline(
            rank, f"match rate {rate:.2f} <= {self.cache_threshold}: smallest tree", inp
        )


@dataclass
class DynamoKv(Policy):
    """NVIDIA Dynamo KV router, default worker selector (ai-dynamo/dynamo,
    ``lib/llm/src/kv_router/scheduler.rs`` ``DefaultWorkerSelector``; defaults
    ``overlap_score_weight=1.0`` (``--kv-overlap-score-weight``), ``router_temperature=0``).

    For each worker::

        logit = overlap_score_weight * prefill_blocks + decode_blocks
        prefill_blocks = (request tokens not cached there + its active prefill tokens) / block
        decode_blocks  = request blocks not cached there + its active KV blocks

    Temperature 0 picks the lowest logit; ties go to the worker with the smaller tree, then the
    lowest rank.
    """

    overlap_score_weight: float = 1.0
    name = "dynamo_kv"

    def decide(self, inp: PolicyInput) -> Decision:
        best: tuple[float, int, int] | None = None
        for r in inp.ranks:
            block = inp.block_size.get(r, 16) or 16
            cached = inp.per_rank_cached.get(r, 0)
            new_tokens = inp.prompt_tokens - cached
            prefill_blocks = (new_tokens + inp.active_prefill_tokens.get(r, 0)) / block
            request_blocks = -(-inp.prompt_tokens // block)
            new_blocks = request_blocks - cached // block
            decode_blocks = new_blocks + inp.active_blocks.get(r, 0)
            logit = self.overlap_score_weight * prefill_blocks + decode_blocks
            key = (logit, inp.tree_tokens.get(r, 0), r)
            if best is None or key < best:
                best = key
        assert best is not None
        return _baseline(best[2], f"lowest KV-router logit {best[0]:.2f}", inp)


@dataclass
class LlmdScorer(Policy):
    """llm-d inference scheduler (llm-d/llm-d-inference-scheduler, on the Gateway API Inference
    Extension's EPP) with its default scheduling profile: ``prefix-cache-scorer`` weight 3,
    ``kv-cache-utilization-scorer`` weight 2, ``queue-scorer`` weight 2, ``max-score-picker``.

    Scores are in [0, 1]: prefix = cached blocks / request blocks; kv = 1 - KV usage;
    queue = (max_waiting - waiting) / (max_waiting - min_waiting) (1 for all when equal).
    The highest weighted sum wins; ties are broken at random (the picker shuffles).
    """

    rng: random.Random = field(default_factory=random.Random)
    prefix_weight: float = 3.0
    kv_weight: float = 2.0
    queue_weight: float = 2.0
    name = "llmd_scorer"

    def decide(self, inp: PolicyInput) -> Decision:
        waiting = [inp.waiting.get(r, 0) for r in inp.ranks]
        hi, lo = max(waiting), min(waiting)
        best_score = None
        best: list[int] = []
        for r, q in zip(inp.ranks, waiting, strict=True):
            block = inp.block_size.get(r, 16) or 16
            request_blocks = -(-inp.prompt_tokens // block) or 1
            prefix = (inp.per_rank_cached.get(r, 0) // block) / request_blocks
            kv = 1.0 - inp.kv_usage.get(r, 0.0)
            queue = 1.0 if hi == lo else (hi - q) / (hi - lo)
            score = self.prefix_weight * prefix + self.kv_weight * kv + self.queue_weight * queue
            if best_score is None or score > best_score:
                best_score, best = score, [r]
            elif score == best_score:
                best.append(r)
        rank = best[0] if len(best) == 1 else self.rng.choice(best)
        return _baseline(rank, f"highest weighted score {best_score:.3f}", inp)


def make_policy(name: str, config: SchedulerConfig, rng: random.Random) -> Policy:
    """The policy registered as ``name``; ``ConfigError`` lists the valid names otherwise."""
    check_policy_name(name)
    factories: dict[str, Callable[[], Policy]] = {
        "e2": lambda: E2Policy(config),
        "round_robin": RoundRobin,
        "least_load": LeastLoad,
        "prefix_affinity": PrefixAffinity,
        "sglang_cache_aware": SglangCacheAware,
        "dynamo_kv": DynamoKv,
        "llmd_scorer": lambda: LlmdScorer(rng=rng),
    }
    return factories[name]()
