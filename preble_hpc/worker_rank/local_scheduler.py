"""Preble's local scheduler: priority groups by cache-hit ratio, with quotas so nothing starves.

A request whose prompt is mostly cached costs little prefill, so running it first frees its slot
soon and keeps the prefix it shares hot; but always preferring them would starve cold prompts.
Preble's answer (its SGLang fork): P groups by hit ratio, served in weighted rounds::

    group g = ceil(hit * P) - 1   (hit = cached / prompt tokens; hit 0 -> group 0)

    round:  group P-1 -> up to P*k items, group P-2 -> up to (P-1)*k, ..., group 0 -> up to k
            (highest group first, FCFS inside a group; empty groups are skipped)

Every non-empty group gets at least ``k`` admissions per round, so a request in group 0 waits at
most ``ceil(position / k)`` rounds. The round's state survives between calls: ``pop_round(limit)``
with a small ``limit`` (admission pacing) continues the round where the last call stopped instead
of restarting at the top group, which would starve the lower groups.

**Under cache pressure** (``pop_round(..., cache_pressure=True)``: the engine has just evicted
cached KV) a queued hit is perishable: the cold prompts of a lower group's turn evict the very
prefix it waits to reuse, and it then recomputes it. So the next item comes from the highest
non-empty group that still has quota left in this round, before the lower group's turn goes on::

    cursor at group 0 (turn: up to k cold prompts), a hit arrives in group P-1:
        no pressure:  cold, cold, ..., cold (the turn), then the hit (next round)
        pressure:     the hit (charged to group P-1's quota this round), then the turn goes on

Quotas still bound every group per round, and a round ends only when no non-empty group has
quota left, so the starvation bound above holds in both modes.

Pure Python, no vLLM: the simulator runs the same object in front of its simulated engines.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

from preble_hpc.config import LocalSchedulerConfig


def priority_group(prompt_tokens: int, cached_tokens: int, num_groups: int) -> int:
    """The group of a request: ``ceil(hit * P) - 1``, clamped to ``[0, P - 1]``."""
    if prompt_tokens <= 0 or cached_tokens <= 0:
        return 0
    hit = min(cached_tokens, prompt_tokens) / prompt_tokens
    return min(num_groups - 1, max(0, math.ceil(hit * num_groups) - 1))


class LocalScheduler:
    """Queue of requests not yet admitted into the engine, in Preble's priority/quota order."""

    def __init__(self, config: LocalSchedulerConfig) -> None:
        self.config = config
        self._groups: list[OrderedDict[str, Any]] = [
            OrderedDict() for _ in range(config.num_groups)
        ]
        self._group_of: dict[str, int] = {}
        # The current round: the group whose turn it is, and what each group may still take.
        self._cursor = config.num_groups - 1
        self._left = [self.quota(g) for g in range(config.num_groups)]

    def quota(self, group: int) -> int:
        """Admissions group ``group`` may take per round: ``(g + 1) * k``."""
        return (group + 1) * self.config.quota

    def __len__(self) -> int:
        return len(self._group_of)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._group_of

    def group_sizes(self) -> list[int]:
        """Queued requests per group, group 0 first."""
        return [len(g) for g in self._groups]

    def add(self, item_id: str, prompt_tokens: int, cached_tokens: int, item: Any) -> None:
        """Queue ``item``; a duplicate id is a caller bug and raises ``ValueError``."""
        if item_id in self._group_of:
            raise ValueError(f"request {item_id!r} is already queued")
        group = priority_group(prompt_tokens, cached_tokens, self.config.num_groups)
        self._groups[group][item_id] = item
        self._group_of[item_id] = group

    def remove(self, item_id: str) -> Any | None:
        """Take a queued request out (abort before admission); ``None`` if it is not queued."""
        group = self._group_of.pop(item_id, None)
        if group is None:
            return None
        return self._groups[group].pop(item_id)

    def pop_round(self, limit: int, cache_pressure: bool = False) -> list[Any]:
        """Up to ``limit`` items in round order, continuing the current round; with
        ``cache_pressure``, higher groups with quota left go before the current turn."""
        out: list[Any] = []
        while len(out) < limit and self._group_of:
            group = self._next_group(cache_pressure)
            item_id, item = self._groups[group].popitem(last=False)
            del self._group_of[item_id]
            self._left[group] -= 1
            out.append(item)
        return out

    def _next_group(self, cache_pressure: bool) -> int:
        """The group the next item comes from (something is queued)."""
        if cache_pressure:
            group = self._highest_with_quota()
            if group is None:
                self._new_round()
                group = self._highest_with_quota()
            assert group is not None  # after a new round every non-empty group has quota
            return group
        while not (self._groups[self._cursor] and self._left[self._cursor] > 0):
            if self._cursor > 0:
                self._cursor -= 1
            else:
                self._new_round()
        return self._cursor

    def _highest_with_quota(self) -> int | None:
        for g in range(self.config.num_groups - 1, -1, -1):
            if self._groups[g] and self._left[g] > 0:
                return g
        return None

    def _new_round(self) -> None:
        self._cursor = self.config.num_groups - 1
        self._left = [self.quota(g) for g in range(self.config.num_groups)]
