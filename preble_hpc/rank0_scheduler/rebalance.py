"""What E2 does after its first choice: replicate hot prefixes, rebalance heavy ranks, scale back.

``Rebalancer.adjust`` takes E2's decision and the same ``PolicyInput`` and may redirect an EXPLOIT
decision (explore already took the global minimum of ``L + M + P``):

1. **Replicate** (paper Sec. 4.3): the prefix is hot when *every* rank holding it is overloaded,
   either by load (its windowed load exceeds ``replicate_load_ratio`` x the cluster mean) or by
   latency (its mean TTFT in the newer half of the window is ``replicate_ttft_growth`` x the older
   half). Both are measured on the injected clock, so they trigger in the simulator too (Preble's
   wall-clock TTFT check never fires in replay). The request then goes to the cheapest non-holder
   by ``L + M + P`` (REPLICATE), which thereby caches the prefix; the rank is remembered as a
   replica of that prefix. "Every holder" makes the trigger self-limiting: the new replica has
   neither the load nor the TTFT history, so the next request uses it instead of replicating again.
   Either trigger makes a replica only when it is cheaper than the holder. (A TTFT-triggered
   replica used to be made regardless, taking growing TTFT as evidence that the cost model
   underestimates the holders; but the mean TTFT also doubles when a half-window merely holds
   longer prompts, and on the Mooncake trace those replicas recomputed long prefixes on dearer
   ranks: the hit rate halved and E2 fell behind llm-d, see the README.)
2. **Scale back**: when the prefix is no longer hot, requests for it go to an original holder
   instead of a replica (while the original costs at most ``rebalance_ratio`` x the replica), so
   the replica copies age out of those engines' caches.
3. **Rebalance** (paper Sec. 4.3, ``rebalance_ratio``): when the chosen rank's load exceeds the
   lightest rank's by the ratio, the request moves to the lightest rank, if it costs less there
   even after recomputing the prefix (REBALANCE): load flows from heavy to light, never at a loss.
"""

from __future__ import annotations

from collections.abc import Callable

from preble_hpc.config import SchedulerConfig
from preble_hpc.rank0_scheduler.policy import (
    Decision,
    DecisionKind,
    PolicyInput,
    cheapest,
    e2_loads,
    explore_cost,
)
from preble_hpc.rank0_scheduler.radix_tree import Match, Node

__all__ = ["Rebalancer", "prefix_node"]


def prefix_node(m: Match, holders: list[int]) -> Node | None:
    """The deepest matched node the holders of the longest prefix hold (the "hot prefix")."""
    if not holders:
        return None
    first = holders[0]
    for node in reversed(m.path):
        if first in node.ranks:
            return node
    return None


class Rebalancer:
    """Replication, scale-back and rebalancing on top of E2 (see module docstring)."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config

    def hot_trigger(
        self, inp: PolicyInput, holders: list[int], ttft_growth: Callable[[int], float]
    ) -> str | None:
        """Why every holder is overloaded (by load or by TTFT growth), or None when one is not."""
        cfg = self.config
        ranks = inp.ranks
        load = e2_loads(inp)
        # Plain loops that stop at the first holder that is not overloaded: this runs on every
        # exploit decision, and an idle holder (the usual case) ends the load check at once.
        for h in holders:
            if load[h] <= 0.0:
                break
        else:
            mean = sum(load[r] for r in ranks) / len(ranks)
            if mean > 0.0 and all(load[h] > cfg.replicate_load_ratio * mean for h in holders):
                return f"holders' load > {cfg.replicate_load_ratio} x mean {mean:.3f}s"
        growth = cfg.replicate_ttft_growth
        for h in holders:
            if ttft_growth(h) < growth:
                return None
        return f"holders' TTFT grew >= {growth}x over the window"

    def adjust(
        self,
        d: Decision,
        inp: PolicyInput,
        m: Match,
        ttft_growth: Callable[[int], float],
    ) -> Decision:
        if d.kind is not DecisionKind.EXPLOIT or len(inp.ranks) < 2:
            return d
        holders = inp.holders()
        node = prefix_node(m, holders)
        hot = self.hot_trigger(inp, holders, ttft_growth)
        if hot is None and not (node is not None and node.replicas and d.rank in node.replicas):
            load = e2_loads(inp)
            if load[d.rank] <= 0.0:
                return d  # no rank is lighter than an idle one: the usual exploit, priced once
        chosen_cost = explore_cost(inp, d.rank)
        if hot is not None:
            held = set(holders)
            alt, alt_cost = cheapest(inp, (r for r in inp.ranks if r not in held))
            if alt is not None and alt_cost < chosen_cost:
                if node is not None:
                    if node.replicas is None:
                        node.replicas = set()
                    node.replicas.add(alt)
                return Decision(
                    alt,
                    DecisionKind.REPLICATE,
                    f"hot prefix ({hot}): replicate on rank {alt}, L+M+P={alt_cost:.4f}s vs "
                    f"holder {d.rank} {chosen_cost:.4f}s",
                    inp.per_rank_cached.get(alt, 0),
                )
        elif node is not None and node.replicas and d.rank in node.replicas:
            originals = [h for h in holders if h not in node.replicas]
            rank, cost = cheapest(inp, originals)
            # Concentrate on the originals only while that keeps within the rebalance ratio;
            # beyond it the rebalance rule would move the request right back.
            if rank is not None and cost <= self.config.rebalance_ratio * chosen_cost:
                d = Decision(
                    rank,
                    DecisionKind.EXPLOIT,
                    f"prefix cooled: scale back to original holder, L+M+P={cost:.4f}s",
                    d.cached_tokens,
                )
                chosen_cost = cost
        return self._rebalance(d, inp, chosen_cost)

    def _rebalance(self, d: Decision, inp: PolicyInput, chosen_cost: float) -> Decision:
        ratio = self.config.rebalance_ratio
        chosen = d.rank
        load = e2_loads(inp)
        heavy = load[chosen]
        # Only ranks lighter than heavy / ratio may take the request: usually none (the chosen
        # holder has no backlog), so most decisions never price another rank.
        bound = heavy / ratio
        light, alt_cost = cheapest(inp, (r for r in inp.ranks if load[r] < bound))
        if light is None or alt_cost >= chosen_cost:
            return d
        lightest = load[light]
        return Decision(
            light,
            DecisionKind.REBALANCE,
            f"rank {d.rank} load {heavy:.3f}s > {ratio} x lightest {lightest:.3f}s: move to "
            f"rank {light}, L+M+P={alt_cost:.4f}s vs {chosen_cost:.4f}s",
            inp.per_rank_cached.get(light, 0),
        )
