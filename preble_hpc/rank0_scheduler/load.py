"""Per-rank load over the sliding window H, on an injected clock.

A rank's load ``L`` is the GPU time (prefill + marginal decode, from the cost model) of the
requests it received in the last H seconds. A request enters the window with its estimate when it
is scheduled; its ``Finished`` timings replace the estimate; it leaves the window H seconds after
it arrived. The same window gives each rank's own cache-hit ratio (cached / prompt tokens of its
requests): Preble's code keeps one global miss rate, which cannot tell a rank that keeps hitting
from one that keeps missing.

TTFT samples (first token time minus schedule time) per rank feed the replication trigger: the
mean TTFT of the newer half of the window against the older half.

Every per-rank figure is a plain dict kept up to date incrementally (``cost``, ``prompt``,
``cached``), so a decision reads them without recomputing anything; ``advance(now)`` expires old
entries, amortised O(1) per request.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

__all__ = ["LoadTracker"]


class _Entry:
    __slots__ = ("t", "rank", "cost", "prompt", "cached", "alive")

    def __init__(self, t: float, rank: int, cost: float, prompt: int, cached: int) -> None:
        self.t = t
        self.rank = rank
        self.cost = cost
        self.prompt = prompt
        self.cached = cached
        self.alive = True


#: TTFT samples are summed in buckets of H / _TTFT_BUCKETS: the halves' boundaries then move once
#: per bucket instead of once per sample (with a sample per decision, re-splitting at every one
#: was ~8% of a decision), at a boundary error of at most one bucket (H/32).
_TTFT_BUCKETS = 32


class _TtftHalves:
    """TTFT samples of one rank split at ``now - H/2`` into the older and newer half, each a
    deque of ``[bucket index, samples, sum]`` with running totals."""

    __slots__ = (
        "old",
        "new",
        "old_n",
        "new_n",
        "old_sum",
        "new_sum",
        "_value",
        "_bucket",
        "_min_samples",
        "_width",
    )

    def __init__(self, window_s: float) -> None:
        self.old: deque[list] = deque()
        self.new: deque[list] = deque()
        self.old_n = self.new_n = 0
        self.old_sum = self.new_sum = 0.0
        self._value: float | None = None
        self._bucket: int | None = None  # the bucket of ``now`` at the last split
        self._min_samples = 0
        self._width = window_s / _TTFT_BUCKETS

    def add(self, t: float, ttft_s: float) -> None:
        b = int(t // self._width)
        new = self.new
        if new and new[-1][0] >= b:  # the clock never goes back: same bucket as the last one
            last = new[-1]
            last[1] += 1
            last[2] += ttft_s
        else:
            new.append([b, 1, ttft_s])
        self.new_n += 1
        self.new_sum += ttft_s
        self._value = None

    def growth(self, now: float, min_samples: int) -> float:
        """Mean TTFT of the newer half over the older half (1.0 without enough samples).

        Asked for each holder on every exploit decision, so the ratio is kept until a sample is
        added or ``now`` enters another bucket."""
        b = int(now // self._width)
        if b != self._bucket or min_samples != self._min_samples:
            self._resplit(b)
            self._bucket, self._min_samples, self._value = b, min_samples, None
        value = self._value
        if value is None:
            old_n, new_n = self.old_n, self.new_n
            if old_n < min_samples or new_n < min_samples or self.old_sum <= 0.0:
                value = 1.0
            else:
                value = (self.new_sum / new_n) / (self.old_sum / old_n)
            self._value = value
        return value

    def _resplit(self, bucket: int) -> None:
        """Move the buckets at least half a window old to the older half; drop those a whole
        window old."""
        half = _TTFT_BUCKETS // 2
        new, old = self.new, self.old
        while new and new[0][0] <= bucket - half:
            entry = new.popleft()
            self.new_n -= entry[1]
            self.new_sum -= entry[2]
            self.old_n += entry[1]
            self.old_sum += entry[2]
            old.append(entry)
        while old and old[0][0] <= bucket - 2 * half:
            entry = old.popleft()
            self.old_n -= entry[1]
            self.old_sum -= entry[2]
        if not new:  # reset, so float drift never accumulates
            self.new_sum = 0.0
        if not old:
            self.old_sum = 0.0


class LoadTracker:
    """Windowed per-rank load, hit ratio and TTFT trend."""

    def __init__(self, window_s: float, clock: Callable[[], float]) -> None:
        self.window_s = window_s
        self.clock = clock
        #: rank -> GPU seconds of its requests in the window (L).
        self.cost: dict[int, float] = {}
        #: rank -> prompt tokens / cached prompt tokens of its requests in the window.
        self.prompt: dict[int, int] = {}
        self.cached: dict[int, int] = {}
        self._count: dict[int, int] = {}
        self._ttft: dict[int, _TtftHalves] = {}
        self._entries: deque[_Entry] = deque()
        self._by_request: dict[str, _Entry] = {}

    def add_rank(self, rank: int) -> None:
        if rank not in self.cost:
            self.cost[rank] = 0.0
            self.prompt[rank] = 0
            self.cached[rank] = 0
            self._count[rank] = 0
            self._ttft[rank] = _TtftHalves(self.window_s)

    def remove_rank(self, rank: int) -> None:
        if self.cost.pop(rank, None) is None:
            return
        del self.prompt[rank], self.cached[rank], self._count[rank], self._ttft[rank]
        for e in self._entries:
            if e.rank == rank:
                e.alive = False
        self._by_request = {k: e for k, e in self._by_request.items() if e.rank != rank}

    # ------------------------------------------------------------------ updates

    def add(
        self,
        request_id: str,
        rank: int,
        cost_s: float,
        prompt_tokens: int,
        cached_tokens: int,
        now: float | None = None,
    ) -> None:
        """A request was placed on ``rank`` at ``now`` (default: the clock) with estimated GPU
        time ``cost_s``."""
        self.add_rank(rank)
        e = _Entry(self.clock() if now is None else now, rank, cost_s, prompt_tokens, cached_tokens)
        self._entries.append(e)
        self.cost[rank] += cost_s
        self.prompt[rank] += prompt_tokens
        self.cached[rank] += cached_tokens
        self._count[rank] += 1
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
        rank = e.rank
        self.cost[rank] += cost_s - e.cost
        self.prompt[rank] += prompt_tokens - e.prompt
        self.cached[rank] += cached_tokens - e.cached
        e.cost, e.prompt, e.cached = cost_s, prompt_tokens, cached_tokens

    def drop(self, request_id: str) -> None:
        """A request ended without timings: take its estimate out of the window."""
        e = self._by_request.pop(request_id, None)
        if e is not None:
            self._kill(e)

    def record_ttft(self, rank: int, ttft_s: float) -> None:
        halves = self._ttft.get(rank)
        if halves is not None:
            halves.add(self.clock(), ttft_s)

    def _kill(self, e: _Entry) -> None:
        if not e.alive:
            return
        e.alive = False
        rank = e.rank
        if rank not in self.cost:
            return
        count = self._count[rank] - 1
        self._count[rank] = count
        if count == 0:  # reset, so float drift never accumulates
            self.cost[rank], self.prompt[rank], self.cached[rank] = 0.0, 0, 0
        else:
            self.cost[rank] -= e.cost
            self.prompt[rank] -= e.prompt
            self.cached[rank] -= e.cached

    def advance(self, now: float | None = None) -> None:
        """Expire requests that arrived more than H seconds before ``now``."""
        horizon = (self.clock() if now is None else now) - self.window_s
        entries = self._entries
        while entries and entries[0].t <= horizon:
            self._kill(entries.popleft())

    # ------------------------------------------------------------------ queries

    def load(self, rank: int, now: float | None = None) -> float:
        """GPU seconds of ``rank``'s requests in the window (L)."""
        self.advance(now)
        cost = self.cost.get(rank, 0.0)
        return cost if cost > 0.0 else 0.0

    def hit_ratio_now(self, rank: int) -> float:
        """Hit ratio as of the last ``advance`` (no expiry; for the hot path)."""
        prompt = self.prompt.get(rank, 0)
        return self.cached[rank] / prompt if prompt > 0 else 0.0

    def hit_ratio(self, rank: int, now: float | None = None) -> float:
        """Cached / prompt tokens of ``rank``'s requests in the window (0 with no requests)."""
        self.advance(now)
        return self.hit_ratio_now(rank)

    def miss_rate(self, rank: int, now: float | None = None) -> float:
        """1 - hit ratio of this rank alone (1.0 with no requests)."""
        self.advance(now)
        if self.prompt.get(rank, 0) <= 0:
            return 1.0
        return 1.0 - self.hit_ratio_now(rank)

    def requests_in_window(self, rank: int, now: float | None = None) -> int:
        self.advance(now)
        return self._count.get(rank, 0)

    def ttft_growth(self, rank: int, min_samples: int, now: float | None = None) -> float:
        """Mean TTFT of the newer half of the window over the older half (1.0 when either half has
        fewer than ``min_samples`` samples, i.e. no evidence of growth)."""
        halves = self._ttft.get(rank)
        if halves is None:
            return 1.0
        return halves.growth(self.clock() if now is None else now, min_samples)
