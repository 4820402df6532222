"""Discrete-event cluster simulation in virtual time around the REAL rank-0 scheduler.

The ``GlobalScheduler`` runs unchanged with an injected virtual clock and receives exactly what
the MPI runtime gives it from real workers: ``WorkerReady`` at start, ``on_first_token`` when a
prefill ends, ``CacheReport`` with STORED / EVICTED ``CacheEvent``s as the engine's prefix cache
changes, ``Finished`` with the measured queue/prefill/decode timings, and ``LoadStats`` every
``stats_interval_s``. Nothing runs in real time; an event heap orders arrivals, engine step ends
and stats ticks::

    arrival(t) -> scheduler.schedule() -> engine[rank].add() -> plan/cut the engine's step
    step end   -> CacheReport, on_first_token, Finished -> metrics -> plan the next step
    stats tick -> LoadStats per engine
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from preble_hpc.config import LocalSchedulerConfig, SchedulerConfig, SimConfig
from preble_hpc.messages import CacheReport, WorkerReady
from preble_hpc.rank0_scheduler.scheduler import GlobalScheduler
from preble_hpc.sim.engine import SimEngine, SimSeq
from preble_hpc.sim.workloads import SimRequest, ideal_hit_rate

__all__ = ["SimResult", "simulate"]

_STEP, _STATS = 0, 1


@dataclass
class SimResult:
    policy: str
    gpus: int
    requests: int
    finished: int
    mean_latency_s: float
    p99_latency_s: float
    mean_ttft_s: float
    p99_ttft_s: float
    throughput_rps: float
    hit_rate: float
    ideal_hit_rate: float
    imbalance: float
    sim_time_s: float
    wall_s: float
    decisions: dict = field(default_factory=dict)
    busy_s: list[float] = field(default_factory=list)
    scheduler_stats: dict = field(default_factory=dict)
    """``GlobalScheduler.stats()`` at the end of the run (decisions, cache events, tree)."""

    def row(self, workload: str, rate: float) -> dict:
        """The ``--json`` row (exactly the issue's keys)."""
        return {
            "workload": workload,
            "rate": rate,
            "policy": self.policy,
            "gpus": self.gpus,
            "requests": self.requests,
            "finished": self.finished,
            "mean_latency_s": _r(self.mean_latency_s),
            "p99_latency_s": _r(self.p99_latency_s),
            "mean_ttft_s": _r(self.mean_ttft_s),
            "p99_ttft_s": _r(self.p99_ttft_s),
            "throughput_rps": _r(self.throughput_rps),
            "hit_rate": _r(self.hit_rate),
            "ideal_hit_rate": _r(self.ideal_hit_rate),
            "imbalance": _r(self.imbalance),
        }


def _r(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(x, 6)


def _pct(sorted_v: list[float], q: float) -> float:
    if not sorted_v:
        return math.nan
    i = min(len(sorted_v) - 1, max(0, math.ceil(q * len(sorted_v)) - 1))
    return sorted_v[i]


def simulate(
    requests: Sequence[SimRequest],
    policy: str,
    sim: SimConfig | None = None,
    sched: SchedulerConfig | None = None,
    local: LocalSchedulerConfig | None = None,
    ideal: float | None = None,
) -> SimResult:
    """Run ``requests`` (sorted by arrival) through ``policy`` on ``sim.gpus`` engines."""
    sim = sim or SimConfig()
    sched_cfg = replace(sched or SchedulerConfig(), policy=policy)
    local = local or LocalSchedulerConfig()
    wall0 = time.perf_counter()
    now = 0.0

    def clock() -> float:
        return now

    ranks = list(range(sim.gpus))
    scheduler = GlobalScheduler(sched_cfg, ranks, clock=clock, rng=random.Random(sim.seed))
    engines = [SimEngine(r, sim, local) for r in ranks]
    for r in ranks:
        scheduler.on_worker_ready(
            WorkerReady(r, sim.kv_capacity_tokens, sim.block_size, sim.max_model_len, "sim")
        )
    reqs = sorted(requests, key=lambda q: q.arrival)
    n = len(reqs)
    if n == 0:
        raise ValueError("no requests to simulate")
    t_first_arrival = reqs[0].arrival
    span = reqs[-1].arrival - t_first_arrival
    drain = sim.drain_s if sim.drain_s is not None else max(30.0, 0.1 * span)
    horizon = reqs[-1].arrival + drain

    heap: list[tuple[float, int, int, int, int]] = []  # (time, seq, kind, rank, version)
    version = [0] * sim.gpus
    seqno = 0
    latencies: list[float] = []
    ttfts: list[float] = []
    prompt_total = 0
    cached_total = 0
    last_finish = t_first_arrival
    in_flight = 0

    def push(t: float, kind: int, rank: int, ver: int) -> None:
        nonlocal seqno
        seqno += 1
        heapq.heappush(heap, (t, seqno, kind, rank, ver))

    def kick(eng: SimEngine) -> None:
        """Plan the engine's next step if it is idle."""
        if eng.step_end is not None:
            return
        events: list = []
        end = eng.plan(now, events)
        if events:
            scheduler.on_cache_report(CacheReport(eng.rank, events))
        if end is not None:
            version[eng.rank] += 1
            push(end, _STEP, eng.rank, version[eng.rank])

    push(t_first_arrival + sim.stats_interval_s, _STATS, -1, 0)
    i = 0
    inf = math.inf
    while True:
        t_arr = reqs[i].arrival if i < n else inf
        t_ev = heap[0][0] if heap else inf
        if t_arr == inf and (in_flight == 0 or t_ev == inf):
            break
        if t_arr <= t_ev:
            now = t_arr
            if now > horizon:
                break
            req = reqs[i]
            i += 1
            tokens = req.token_ids()
            d = scheduler.schedule(req.request_id, tokens, req.max_tokens)
            eng = engines[d.rank]
            eng.add(SimSeq(req, tokens, now, cached_hint=d.cached_tokens))
            in_flight += 1
            prompt_total += req.prompt_tokens
            if eng.step_end is None:
                kick(eng)
            else:
                end = eng.cut(now)
                if end is not None:
                    version[eng.rank] += 1
                    push(end, _STEP, eng.rank, version[eng.rank])
            continue
        t, _, kind, rank, ver = heapq.heappop(heap)
        now = t
        if now > horizon:
            break
        if kind == _STATS:
            if in_flight or i < n:
                for eng in engines:
                    scheduler.on_load_stats(eng.load_stats(now))
                push(now + sim.stats_interval_s, _STATS, -1, 0)
            continue
        if ver != version[rank]:
            continue
        eng = engines[rank]
        res = eng.complete(now)
        if res.events:
            scheduler.on_cache_report(CacheReport(rank, res.events))
        for s in res.first_token:
            scheduler.on_first_token(s.req.request_id)
        for s, fin in res.finished:
            scheduler.on_finished(fin)
            in_flight -= 1
            latencies.append(now - s.req.arrival)
            ttfts.append(s.t_first - s.req.arrival)
            cached_total += s.cached_tokens
            last_finish = now
        kick(eng)

    finished = len(latencies)
    done_prompt = sum(e.prompt_tokens for e in engines)
    busy = [e.busy_s for e in engines]
    mean_busy = sum(busy) / len(busy)
    latencies.sort()
    ttfts.sort()
    dur = last_finish - t_first_arrival
    return SimResult(
        policy=policy,
        gpus=sim.gpus,
        requests=n,
        finished=finished,
        mean_latency_s=sum(latencies) / finished if finished else math.nan,
        p99_latency_s=_pct(latencies, 0.99),
        mean_ttft_s=sum(ttfts) / finished if finished else math.nan,
        p99_ttft_s=_pct(ttfts, 0.99),
        throughput_rps=finished / dur if dur > 0 else math.nan,
        hit_rate=(sum(e.hit_tokens for e in engines) / done_prompt) if done_prompt else 0.0,
        ideal_hit_rate=ideal if ideal is not None else ideal_hit_rate(reqs),
        imbalance=max(busy) / mean_busy if mean_busy > 0 else 1.0,
        sim_time_s=now,
        wall_s=time.perf_counter() - wall0,
        decisions=dict(scheduler.decisions),
        busy_s=busy,
        scheduler_stats=scheduler.stats(),
    )
