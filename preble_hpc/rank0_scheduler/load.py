"""Per-rank load over the sliding window H, on an injected clock.

A rank's load ``L`` is the GPU time (prefill + decode share, from the cost model) of the requests
it received in the last H seconds. A request enters the window with its estimate when it is
scheduled; its ``Finished`` timings replace the estimate; it leaves the window H seconds after it
arrived. The same window gives each rank's own cache-hit ratio (cached / prompt tokens of its
requests): Preble's code keeps one global miss rate, which cannot tell a rank that keeps hitting
from one that keeps missing.

TTFT samples (first token time minus schedule time) per rank feed the replication trigger: the
mean TTFT of the newer half of the window against the older half.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

__all__ = ["LoadTracker", "RankWindow"]


class _Entry:
    __slots__ = ("t", "rank", "cost", "prompt", "cached", "alive")

    def __init__(self, t: float, rank: int, cost: float, prompt: int, cached: int) -> None:
        self.t = t
        self.rank = rank
        self.cost = cost
        self.prompt = prompt
        self.cached = cached
        self.alive = True


class RankWindow:
    """Running sums of one rank's requests in the window."""

    __slots__ = ("entries", "cost", "prompt", "cached", "ttft")

    def __init__(self) -> None:
        self.entries: deque[_Entry] = deque()
        self.cost = 0.0
        self.prompt = 0
        self.cached = 0
        self.ttft: deque[tuple[float, float]] = deque()


class LoadTracker:
    """Windowed per-rank load, hit ratio and TTFT trend."""

    def __init__(self, window_s: float, clock: Callable[[], float]) -> None:
        self.window_s = window_s
        self.clock = clock
        self._ranks: dict[int, RankWindow] = {}
        self._by_request: dict[str, _Entry] = {}

    def add_rank(self, rank: int) -> None:
        self._ranks.setdefault(rank, RankWindow())

    def remove_rank(self, rank: int) -> None:
        if self._ranks.pop(rank, None) is not None:
            self._by_request = {k: e for k, e in self._by_request.items() if e.rank != rank}

    # ------------------------------------------------------------------ updates

    def add(
        self, request_id: str, rank: int, cost_s: float, prompt_tokens: int, cached_tokens: int
    ) -> None:
        """A request was placed on ``rank`` with estimated GPU time ``cost_s``."""
        w = self._ranks.get(rank)
        if w is None:
            w = self._ranks[rank] = RankWindow()
        e = _Entry(self.clock(), rank, cost_s, prompt_tokens, cached_tokens)
        w.entries.append(e)
        w.cost += cost_s
        w.prompt += prompt_tokens
        w.cached += cached_tokens
        old = self._by_request.get(request_id)
        if old is not None:
            self._kill(old)
        self._by_request[request_id] = e

    def finish(
        self, request_id: str, cost_s: float, prompt_tokens: int, cached_tokens: int
    ) -> None:
        """Replace a request's estimate with what the worker measured."""
        e = self._by_request.pop(request_id, None)
        if e is None or not e.alive:
            return
        w = self._ranks.get(e.rank)
        if w is None:
            return
        w.cost += cost_s - e.cost
        w.prompt += prompt_tokens - e.prompt
        w.cached += cached_tokens - e.cached
        e.cost, e.prompt, e.cached = cost_s, prompt_tokens, cached_tokens

    def drop(self, request_id: str) -> None:
        """A request ended without timings: take its estimate out of the window."""
        e = self._by_request.pop(request_id, None)
        if e is not None:
            self._kill(e)

    def record_ttft(self, rank: int, ttft_s: float) -> None:
        w = self._ranks.get(rank)
        if w is not None:
            w.ttft.append((self.clock(), ttft_s))

    def _kill(self, e: _Entry) -> None:
        if not e.alive:
            return
        e.alive = False
        w = self._ranks.get(e.rank)
        if w is not None:
            w.cost -= e.cost
            w.prompt -= e.prompt
            w.cached -= e.cached

    def _expire(self, w: RankWindow, now: float) -> None:
        horizon = now - self.window_s
        entries = w.entries
        while entries and entries[0].t <= horizon:
            e = entries.popleft()
            if e.alive:
                e.alive = False
                w.cost -= e.cost
                w.prompt -= e.prompt
                w.cached -= e.cached
        if not entries:
            # Reset float drift once the window is empty.
            w.cost, w.prompt, w.cached = 0.0, 0, 0
        ttft = w.ttft
        while ttft and ttft[0][0] <= horizon:
            ttft.popleft()

    # ------------------------------------------------------------------ queries

    def load(self, rank: int, now: float | None = None) -> float:
        """GPU seconds of ``rank``'s requests in the window (L)."""
        w = self._ranks.get(rank)
        if w is None:
            return 0.0
        self._expire(w, self.clock() if now is None else now)
        return w.cost if w.cost > 0.0 else 0.0

    def loads(self, ranks, now: float | None = None) -> dict[int, float]:
        t = self.clock() if now is None else now
        return {r: self.load(r, t) for r in ranks}

    def hit_ratio(self, rank: int, now: float | None = None) -> float:
        """Cached / prompt tokens of ``rank``'s requests in the window (0 with no requests)."""
        w = self._ranks.get(rank)
        if w is None:
            return 0.0
        self._expire(w, self.clock() if now is None else now)
        return w.cached / w.prompt if w.prompt > 0 else 0.0

    def miss_rate(self, rank: int, now: float | None = None) -> float:
        """1 - hit ratio of this rank alone (Preble keeps one global miss rate)."""
        w = self._ranks.get(rank)
        if w is None or w.prompt <= 0:
            return 1.0
        return 1.0 - self.hit_ratio(rank, now)

    def requests_in_window(self, rank: int, now: float | None = None) -> int:
        w = self._ranks.get(rank)
        if w is None:
            return 0
        self._expire(w, self.clock() if now is None else now)
        return sum(1 for e in w.entries if e.alive)

    def ttft_growth(self, rank: int, min_samples: int, now: float | None = None) -> float:
        """Mean TTFT of the newer half of the window over the older half (1.0 when either half has
        fewer than ``min_samples`` samples, i.e. no evidence of growth)."""
        w = self._ranks.get(rank)
        if w is None:
            return 1.0
        t = self.clock() if now is None else now
        self._expire(w, t)
        middle = t - self.window_s / 2
        old_sum = new_sum = 0.0
        old_n = new_n = 0
        for at, ttft in w.ttft:
            if at <= middle:
                old_sum += ttft
                old_n += 1
            else:
                new_sum += ttft
                new_n += 1
        if old_n < min_samples or new_n < min_samples or old_sum <= 0.0:
            return 1.0
        return (new_sum / new_n) / (old_sum / old_n)
