"""GlobalScheduler: rank 0's placement logic; glue of tree, cost model, load, policy, rebalancer.

One thread (rank 0's event loop) calls every method; nothing here locks, sleeps, or does I/O. The
clock and RNG are injected, so the same object runs in real time under MPI and in virtual time in
the simulator.

Life of a request::

    schedule()  match the prompt in the tree -> PolicyInput -> policy (E2: + rebalancer) -> Decision
                count a hit on every matched node; mark the chosen rank as holding the prompt
                (optimistic; the engine's STORED/EVICTED reports correct it); add the estimated
                GPU time to the rank's load window
    on_first_token()  TTFT sample for the replication trigger
    on_finished()     measured timings replace the estimate; the cost model re-fits
    on_request_dropped()  ended without timings: its estimate leaves the window

How this closes the gaps of Preble's published scheduler: ``P`` (prefill of the tokens the rank
lacks) is part of E2's cost; hit/miss ratios are per rank; the tree has a token cap; evictions come
from the engines' own KV events instead of a simulated LRU; the cost model is a profile per
model/GPU, re-fitted online; every window runs on the injected clock, so replication triggers in
replay; an unknown policy name is a ConfigError listing the valid ones.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from preble_hpc.config import SchedulerConfig
from preble_hpc.messages import (
    CacheEventKind,
    CacheReport,
    Finished,
    LoadStats,
    WorkerReady,
)
from preble_hpc.rank0_scheduler.cost_model import CostModel
from preble_hpc.rank0_scheduler.load import LoadTracker
from preble_hpc.rank0_scheduler.policy import (
    Decision,
    DecisionKind,
    PolicyInput,
    check_policy_name,
    make_policy,
)
from preble_hpc.rank0_scheduler.radix_tree import Match, RadixTree
from preble_hpc.rank0_scheduler.rebalance import Rebalancer

__all__ = ["GlobalScheduler", "DEFAULT_BLOCK_SIZE"]

#: vLLM's KV block size on GPU, used for a rank until its WorkerReady gives the real one.
DEFAULT_BLOCK_SIZE = 16
#: Cap of rho in E2's explore decode term D / (1 - rho): a rank fed prefill without pause still
#: decodes (chunked prefill shares every step), at ~10x the cost, not at an infinite one.
MAX_PREFILL_SHARE = 0.9
#: The tree's cap when ``tree_capacity_tokens`` is 0 (auto): this many tokens per token of KV the
#: workers report, so the tree keeps every copy the engines hold although its view runs ahead of
#: theirs (the Mooncake trace on 8 GPUs forgot copies at 1.16x, none at 1.25x), plus history...
TREE_CAPACITY_PER_KV_TOKEN = 2
#: ...and at least this many (~5 bytes each on rank 0), before any worker has reported.
TREE_CAPACITY_FLOOR = 4_000_000


@dataclass(slots=True)
class _Request:
    rank: int
    t_scheduled: float
    prompt_tokens: int
    new_tokens: int
    blocks: int
    max_tokens: int
    prefill_s: float
    prefilling: bool = True


class _PerRank(Mapping[int, float]):
    """A read-only per-rank view computed on access (only the ranks a policy looks at cost time)."""

    __slots__ = ("_fn", "_ranks")

    def __init__(self, fn: Callable[[int], float], ranks: Sequence[int]) -> None:
        self._fn = fn
        self._ranks = ranks

    def __getitem__(self, rank: int) -> float:
        return self._fn(rank)

    def get(self, rank, default=None):  # type: ignore[override]
        return self._fn(rank)

    def __iter__(self) -> Iterator[int]:
        return iter(self._ranks)

    def __len__(self) -> int:
        return len(self._ranks)


class GlobalScheduler:
    """Contract A (see docs/interfaces.md)."""

    def __init__(
        self,
        config: SchedulerConfig,
        ranks: Sequence[int],
        *,
        clock: Callable[[], float],
        rng: random.Random,
        cost_model: CostModel | None = None,
    ) -> None:
        check_policy_name(config.policy)
        self.config = config
        self.clock = clock
        self.rng = rng
        self.cost = cost_model if cost_model is not None else CostModel.from_config(config)
        self.tree = RadixTree(config.tree_capacity_tokens or TREE_CAPACITY_FLOOR, config.window_s)
        self.loads = LoadTracker(config.window_s, clock)
        self.policy = make_policy(config.policy, config, rng)
        self.rebalancer = Rebalancer(config) if config.policy == "e2" else None
        self._live: list[int] = []
        self._removed: set[int] = set()
        self._requests: dict[str, _Request] = {}
        # Per-rank state kept incrementally, so a decision reads it without rebuilding anything.
        self._in_flight: dict[int, int] = {}
        self._waiting: dict[int, int] = {}
        self._running: dict[int, int] = {}
        self._kv_usage: dict[int, float] = {}
        self._capacity: dict[int, int] = {}
        self._block_size: dict[int, int] = {}
        self._active_prefill: dict[int, int] = {}
        self._active_blocks: dict[int, int] = {}
        # E2's latency measure: estimated prefill seconds queued or running on each rank (placed,
        # no first token yet), how many requests that is, and how many are decoding.
        self._backlog: dict[int, float] = {}
        self._prefilling: dict[int, int] = {}
        self._decoding: dict[int, int] = {}
        # Prompt tokens of each rank's in-flight requests (the KV its decode steps read), and the
        # cluster total, for the decode term.
        self._context: dict[int, int] = {}
        self._context_total = 0
        # The latest placements (time, rank), cluster-wide, and how many each rank got: its
        # arrival rate, for E2's queue term (see ``policy.e2``).
        self._placements: deque[tuple[float, int]] = deque()
        self._placed: dict[int, int] = {}
        # Per rank, the prefill seconds placed in the last explore_prefill_window_s (when on):
        # (time, seconds) in order, and their sum.
        self._placed_prefill: dict[int, deque[tuple[float, float]]] = {}
        self._placed_prefill_s: dict[int, float] = {}
        self._has_stats: set[int] = set()
        # Mean completion / max_tokens of finished requests (output length estimate), smoothed with
        # the cost fit's forgetting factor.
        self._out_ratio = 1.0
        self.decisions = {k.value: 0 for k in DecisionKind}
        self.cache_events = {k.value: 0 for k in CacheEventKind}
        self.cache_events["ignored"] = 0
        self.cache_events["not_in_tree"] = 0
        for r in ranks:
            self._add_rank(r)
        self._hit_view = _PerRank(self.loads.hit_ratio_now, self._live)
        self._behind_view = _PerRank(self._behind, self._live)
        self._per_placement_s = 0.0  # 1 / the span of the latest placements, set per decision

    # ------------------------------------------------------------------ ranks

    def _add_rank(self, rank: int) -> None:
        if rank in self._in_flight:
            return
        self._removed.discard(rank)
        self._live.append(rank)
        self._live.sort()
        self._in_flight[rank] = 0
        self._waiting[rank] = 0
        self._running[rank] = 0
        self._kv_usage[rank] = 0.0
        self._block_size.setdefault(rank, DEFAULT_BLOCK_SIZE)
        self._active_prefill[rank] = 0
        self._active_blocks[rank] = 0
        self._backlog[rank] = 0.0
        self._prefilling[rank] = 0
        self._decoding[rank] = 0
        self._context[rank] = 0
        self._placed_prefill[rank] = deque()
        self._placed_prefill_s[rank] = 0.0
        self.loads.add_rank(rank)

    def on_worker_ready(self, msg: WorkerReady) -> None:
        """Learn a rank's KV capacity and block size (a rank that restarts comes back live)."""
        self._add_rank(msg.rank)
        # What the rank holds before it must evict: its GPU's KV, or the host tier that keeps a
        # copy of it when larger (a prefix the GPU drops is one load away, not recomputed).
        self._capacity[msg.rank] = max(msg.kv_capacity_tokens, msg.host_kv_tokens)
        if msg.block_size > 0:
            self._block_size[msg.rank] = msg.block_size
        if not self.config.tree_capacity_tokens:
            # Every rank that ever reported counts (a removed rank may come back): the cap only
            # follows the cluster up, so a failure never makes the tree forget live copies.
            kv = sum(self._capacity.values())
            self.tree.set_capacity(max(TREE_CAPACITY_FLOOR, TREE_CAPACITY_PER_KV_TOKEN * kv))

    def remove_rank(self, rank: int) -> list[str]:
        """Stop routing to a failed rank; returns the ids of its in-flight requests (dropped)."""
        if rank not in self._in_flight:
            return []
        lost = [rid for rid, req in self._requests.items() if req.rank == rank]
        for rid in lost:
            del self._requests[rid]
        self._live.remove(rank)
        self._removed.add(rank)
        self._context_total -= self._context[rank]
        for table in (
            self._in_flight,
            self._waiting,
            self._running,
            self._kv_usage,
            self._active_prefill,
            self._active_blocks,
            self._backlog,
            self._prefilling,
            self._decoding,
            self._context,
            self._placed_prefill,
            self._placed_prefill_s,
        ):
            del table[rank]
        self._has_stats.discard(rank)
        self.loads.remove_rank(rank)
        self.tree.clear_rank(rank)
        return lost

    # ------------------------------------------------------------------ decisions

    def _policy_input(
        self, n: int, max_tokens: int, out_tokens: int, m: Match, now: float
    ) -> PolicyInput:
        per_rank = m.per_rank
        prefill_s = self.cost.prefill_s
        by_cached: dict[int, float] = {}  # P depends on the rank only through its cached tokens
        capacity = self._capacity
        held = self.tree.held_tokens
        tree_eviction_cost = self.tree.eviction_cost
        recompute_s = self.cost.recompute_s
        in_flight = self._in_flight
        step_base, per_seq = self.cost.decode_step_base_s, self.cost.decode_step_per_seq_s
        context = self._context
        # The fitted per-sequence step cost is for the cluster's mean context; a rank's
        # sequences count in units of it, so long-context ranks weigh more.
        seqs = len(self._requests)
        mean_context = self._context_total / seqs if seqs and self._context_total > 0 else n or 1
        per_token = per_seq / mean_context

        def prefill_cost(rank: int) -> float:
            c = per_rank.get(rank, 0)
            p = by_cached.get(c)
            if p is None:
                p = by_cached[c] = prefill_s(n - c, c)
            return p

        def eviction_cost(rank: int, bound: float = math.inf) -> float:
            cap = capacity.get(rank)
            if cap is None:
                return 0.0  # capacity unknown until WorkerReady
            need = held(rank) + n - per_rank.get(rank, 0) - cap
            if need <= 0:
                return 0.0
            return tree_eviction_cost(rank, need, recompute_s, now, m, bound)

        def decode_cost(rank: int) -> float:
            # Its own steps, reading the rank's context plus its own, and its own context read
            # in each of the steps of the in-flight requests it shares them with.
            return out_tokens * (step_base + per_token * (context[rank] + n + n * in_flight[rank]))

        def explore_decode_cost(rank: int) -> float:
            return decode_cost(rank) / (1.0 - self._placed_prefill_share(rank, now))

        explore = explore_decode_cost if self.config.explore_prefill_window_s else None

        return PolicyInput(
            queued_behind=self._queued_behind(now),
            ranks=self._live,
            prompt_tokens=n,
            max_tokens=max_tokens,
            per_rank_cached=per_rank,
            cached=m.cached,
            load=self.loads.cost,
            in_flight=self._in_flight,
            waiting=self._waiting,
            kv_usage=self._kv_usage,
            hit_ratio=self._hit_view,
            tree_tokens=self.tree.held_by_rank,
            block_size=self._block_size,
            active_prefill_tokens=self._active_prefill,
            active_blocks=self._active_blocks,
            prefill_cost=prefill_cost,
            eviction_cost=eviction_cost,
            eviction_cost_above=eviction_cost,
            backlog=self._backlog,
            decoding=self._decoding,
            decode_cost=decode_cost,
            explore_decode_cost=explore,
            prefill_overhead=self.cost.prefill_base_s,
            deepest_holders=m.holders,
        )

    def _placement_span(self, now: float) -> float:
        """Seconds since the oldest of the latest placements (0.0: none yet)."""
        placements = self._placements
        return now - placements[0][0] if placements else 0.0

    def _queued_behind(self, now: float) -> Mapping[int, float] | None:
        """Per rank, the requests expected to arrive while its prefill backlog drains (one view,
        kept: ``_behind``), or None before any time has passed between placements."""
        span = self._placement_span(now)
        if span <= 0.0:
            return None
        self._per_placement_s = 1.0 / span
        return self._behind_view

    def _behind(self, rank: int) -> float:
        """The rank's arrival rate (its share of the latest placements per second of their
        span) times its prefill backlog."""
        return self._placed.get(rank, 0) * self._per_placement_s * self._backlog[rank]

    def _record_placement(self, rank: int, now: float, prefill_s: float) -> None:
        placements, placed = self._placements, self._placed
        placements.append((now, rank))
        placed[rank] = placed.get(rank, 0) + 1
        if len(placements) > self.config.arrival_window:
            placed[placements.popleft()[1]] -= 1
        if self.config.explore_prefill_window_s:
            self._placed_prefill[rank].append((now, prefill_s))
            self._placed_prefill_s[rank] += prefill_s

    def _placed_prefill_share(self, rank: int, now: float) -> float:
        """rho: prefill seconds placed on ``rank`` per second over the last
        ``explore_prefill_window_s``, at most ``MAX_PREFILL_SHARE``."""
        window = self.config.explore_prefill_window_s
        recent = self._placed_prefill[rank]
        while recent and recent[0][0] <= now - window:
            self._placed_prefill_s[rank] -= recent.popleft()[1]
        if not recent:
            self._placed_prefill_s[rank] = 0.0  # no float residue once the window is empty
        return min(MAX_PREFILL_SHARE, self._placed_prefill_s[rank] / window)

    def schedule(self, request_id: str, token_ids: Sequence[int], max_tokens: int) -> Decision:
        """Place one request; records it in flight on the chosen rank and marks that rank as
        holding the prompt. O(prompt) work at most: the token ids are converted once to the
        tree's token array (one C loop), then compared node by node in C. Raises ``ValueError``
        for a request id already in flight or token ids outside [0, 2**32)."""
        if not self._live:
            raise RuntimeError("no live worker rank to schedule on")
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in flight")
        now = self.clock()
        self.loads.advance(now)
        n = len(token_ids)
        m = self.tree.match(token_ids)
        # Expected output length: max_tokens scaled by what finished requests really produced.
        out_tokens = max(1, round(max_tokens * self._out_ratio))
        inp = self._policy_input(n, max_tokens, out_tokens, m, now)
        d = self.policy.decide(inp)
        if self.rebalancer is not None:
            loads, min_samples = self.loads, self.config.ttft_min_samples
            d = self.rebalancer.adjust(d, inp, m, lambda r: loads.ttft_growth(r, min_samples, now))
        rank = d.rank
        cached = m.per_rank.get(rank, 0)
        new_tokens = n - cached
        prefill = inp.prefill_cost(rank)
        estimate = prefill + self.cost.decode_s(out_tokens)
        block_size = self._block_size[rank]
        if n:
            self.tree.record_hit(m, now)
            # Only whole blocks: an engine caches (and later reports evicting) full blocks only,
            # so a partial last block held here would never be released (at 64 full ranks
            # thousands of such stranded tails made every eviction walk crawl).
            full = n - n % block_size
            if full:
                self.tree.hold(token_ids, rank, now, m, upto=full)
        self.loads.add(request_id, rank, estimate, n, cached, now)
        blocks = -(-n // block_size)
        self._requests[request_id] = _Request(rank, now, n, new_tokens, blocks, max_tokens, prefill)
        self._in_flight[rank] += 1
        self._context[rank] += n
        self._context_total += n
        self._backlog[rank] += prefill
        self._prefilling[rank] += 1
        self._active_prefill[rank] += new_tokens
        self._active_blocks[rank] += blocks
        self._record_placement(rank, now, prefill)
        self.decisions[d.kind.value] += 1
        return d

    # ------------------------------------------------------------------ request events

    def _end_prefill(self, req: _Request) -> None:
        if req.prefilling:
            req.prefilling = False
            rank = req.rank
            if rank in self._active_prefill:
                self._active_prefill[rank] -= req.new_tokens
                left = self._prefilling[rank] - 1
                self._prefilling[rank] = left
                # Reset when empty, so float drift never accumulates.
                self._backlog[rank] = self._backlog[rank] - req.prefill_s if left else 0.0
                self._decoding[rank] += 1

    def _release(self, request_id: str) -> _Request | None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        self._end_prefill(req)
        if req.rank in self._in_flight:
            self._context[req.rank] -= req.prompt_tokens
            self._context_total -= req.prompt_tokens
            self._decoding[req.rank] -= 1
            self._in_flight[req.rank] -= 1
            self._active_blocks[req.rank] -= req.blocks
        return req

    def on_first_token(self, request_id: str) -> None:
        """First output token seen: a TTFT sample on the request's rank."""
        req = self._requests.get(request_id)
        if req is None or not req.prefilling:
            return
        self._end_prefill(req)
        self.loads.record_ttft(req.rank, self.clock() - req.t_scheduled)

    def on_finished(self, msg: Finished) -> None:
        """Measured timings replace the estimate in the window and re-fit the cost model."""
        req = self._release(msg.request_id)
        if req is None:
            return
        rank = req.rank
        # Sequences decoding beside this one: the worker's own count when it reported one.
        if rank in self._has_stats:
            batch = max(1, self._running[rank])
        else:
            batch = self._in_flight.get(rank, 0) + 1
        new_tokens = max(0, msg.prompt_tokens - msg.cached_tokens)
        decoded = max(0, msg.completion_tokens - 1)
        if msg.prefill_s > 0:
            self.cost.observe_prefill(new_tokens, msg.cached_tokens, msg.prefill_s)
        if decoded > 0 and msg.decode_s_per_token > 0:
            self.cost.observe_decode(batch, msg.decode_s_per_token)
        prefill = (
            msg.prefill_s
            if msg.prefill_s > 0
            else self.cost.prefill_s(new_tokens, msg.cached_tokens)
        )
        decode = self.cost.decode_s(decoded)
        self.loads.finish(msg.request_id, prefill + decode, msg.prompt_tokens, msg.cached_tokens)
        if req.max_tokens > 0 and msg.finish_reason != "abort":
            lam = self.config.cost_fit_forgetting
            ratio = min(1.0, msg.completion_tokens / req.max_tokens)
            self._out_ratio = lam * self._out_ratio + (1.0 - lam) * ratio

    def on_request_dropped(self, request_id: str) -> None:
        """The request ended without Finished (error, abort, failure): forget its estimate."""
        if self._release(request_id) is not None:
            self.loads.drop(request_id)

    # ------------------------------------------------------------------ worker reports

    def on_cache_report(self, msg: CacheReport) -> None:
        """Mirror one rank's cache changes into the tree."""
        rank = msg.rank
        if rank not in self._in_flight:
            self.cache_events["ignored"] += len(msg.events)
            return
        now = self.clock()
        tree = self.tree
        counts = self.cache_events
        for ev in msg.events:
            kind = ev.kind
            counts[kind.value] += 1
            if kind is CacheEventKind.STORED:
                if ev.token_ids:
                    tree.hold(ev.token_ids, rank, now)
            elif kind is CacheEventKind.EVICTED:
                if not 0 < ev.block_tokens <= len(ev.token_ids):
                    counts["ignored"] += 1
                elif tree.evict(ev.token_ids, ev.block_tokens, rank) == 0:
                    counts["not_in_tree"] += 1
            elif kind is CacheEventKind.CLEARED:
                tree.clear_rank(rank)

    def on_load_stats(self, msg: LoadStats) -> None:
        rank = msg.rank
        if rank not in self._in_flight:
            return
        self._has_stats.add(rank)
        self._waiting[rank] = msg.waiting + msg.local_queue
        self._running[rank] = msg.running
        self._kv_usage[rank] = msg.kv_usage

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict:
        """JSON-able snapshot: per-rank load/in-flight/hit rate, decisions by kind, tree size."""
        now = self.clock()
        span = self._placement_span(now)
        ranks = {}
        for r in self._live:
            ranks[str(r)] = {
                "load_s": round(self.loads.load(r, now), 6),
                "in_flight": self._in_flight[r],
                "prefill_backlog_s": round(self._backlog[r], 6),
                "arrival_rate_per_s": round(self._placed.get(r, 0) / span, 6) if span > 0 else 0.0,
                "decoding": self._decoding[r],
                "hit_ratio": round(self.loads.hit_ratio(r, now), 6),
                "miss_rate": round(self.loads.miss_rate(r, now), 6),
                "requests_in_window": self.loads.requests_in_window(r, now),
                "tree_tokens": self.tree.held_tokens(r),
                "kv_capacity_tokens": self._capacity.get(r),
                "waiting": self._waiting[r],
                "running": self._running[r],
                "kv_usage": self._kv_usage[r],
            }
        return {
            "policy": self.config.policy,
            "ranks": ranks,
            "removed_ranks": sorted(self._removed),
            "in_flight": len(self._requests),
            "decisions": dict(self.decisions),
            "tree": {
                "tokens": self.tree.total_tokens,
                "nodes": self.tree.num_nodes,
                "capacity_tokens": self.tree.capacity_tokens,
                "forgotten_tokens": self.tree.forgotten_tokens,
            },
            "cache_events": dict(self.cache_events),
            "cost_model": {"profile": self.cost.profile.name, **self.cost.coefficients()},
            "output_length_ratio": round(self._out_ratio, 6),
        }
