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

__all__ = ["SimResult", "accept", "simulate"]

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
    host_hit_rate: float = 0.0
    """The part of ``hit_rate`` loaded from the engines' host tiers (``SimConfig.host_kv_tokens``)
    rather than found on the GPU."""
    rejected: int = 0
    """Requests rank 0 refused (prompt of max_model_len tokens or more); ``requests`` counts the
    rest."""
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


def accept(requests: Sequence[SimRequest], max_model_len: int) -> tuple[list[SimRequest], int]:
    """What rank 0 lets into the cluster, as the live runtime validates a request: a prompt of
    ``max_model_len`` tokens or more is refused (invalid_argument), and an output is cut to the
    room left in the context (vLLM ends it with "length"). Returns the accepted requests and how
    many were refused. (The Mooncake trace holds ten 134k-191k-token prompts that a 128k-context
    engine refuses.)"""
    accepted = []
    for req in requests:
        room = max_model_len - req.prompt_tokens
        if room <= 0:
            continue
        if req.max_tokens > room or req.output_tokens > room:
            req = replace(
                req,
                output_tokens=min(req.output_tokens, room),
                max_tokens=min(req.max_tokens, room),
            )
        accepted.append(req)
    return accepted, len(requests) - len(accepted)


def simulate(
    requests: Sequence[SimRequest],
    policy: str,
    sim: SimConfig | None = None,
    sched: SchedulerConfig | None = None,
    local: LocalSchedulerConfig | None = None,
    ideal: float | None = None,
) -> SimResult:
    """Run the ``requests`` rank 0 accepts (``accept``) through ``policy`` on ``sim.gpus``
    engines, in arrival order."""
    sim = sim or SimConfig()
    sched_cfg = replace(sched or SchedulerConfig(), policy=policy)
    wall0 = time.perf_counter()
    accepted, rejected = accept(requests, sim.max_model_len)
    reqs = sorted(accepted, key=lambda q: q.arrival)
    if not reqs:
        refused = f" ({rejected} refused: prompt >= max_model_len)" if rejected else ""
        raise ValueError("no requests to simulate" + refused)
    run = _Run(reqs, sim, sched_cfg, local or LocalSchedulerConfig())
    run.run()
    return replace(run.result(policy, ideal, wall0), rejected=rejected)


class _Run:
    """One simulation: the scheduler, the engines, the event heap and the running totals."""

    def __init__(
        self,
        reqs: list[SimRequest],
        sim: SimConfig,
        sched_cfg: SchedulerConfig,
        local: LocalSchedulerConfig,
    ) -> None:
        self.now = 0.0
        self.sim = sim
        self.reqs = reqs
        ranks = list(range(sim.gpus))
        self.scheduler = GlobalScheduler(
            sched_cfg, ranks, clock=self.clock, rng=random.Random(sim.seed)
        )
        self.engines = [SimEngine(r, sim, local) for r in ranks]
        for r in ranks:
            self.scheduler.on_worker_ready(
                WorkerReady(
                    r,
                    sim.kv_capacity_tokens,
                    sim.block_size,
                    sim.max_model_len,
                    "sim",
                    host_kv_tokens=sim.host_kv_tokens,
                )
            )
        self.t_first_arrival = reqs[0].arrival
        span = reqs[-1].arrival - self.t_first_arrival
        drain = sim.drain_s if sim.drain_s is not None else max(30.0, 0.1 * span)
        self.horizon = reqs[-1].arrival + drain
        self.heap: list[tuple[float, int, int, int, int]] = []  # (time, seq, kind, rank, version)
        # An engine's step end is superseded when a new arrival cuts the step short: the heap
        # keeps the stale entry, and its version no longer matches.
        self.version = [0] * sim.gpus
        self.seqno = 0
        self.arrived = 0
        self.in_flight = 0
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.last_finish = self.t_first_arrival

    def clock(self) -> float:
        return self.now

    def push(self, t: float, kind: int, rank: int = -1) -> None:
        """Queue an event; a step end carries its engine's new version (stats ticks: rank -1)."""
        self.seqno += 1
        ver = 0
        if kind == _STEP:
            ver = self.version[rank] = self.version[rank] + 1
        heapq.heappush(self.heap, (t, self.seqno, kind, rank, ver))

    def kick(self, eng: SimEngine) -> None:
        """Plan the engine's next step if it is idle."""
        if eng.step_end is not None:
            return
        events: list = []
        end = eng.plan(self.now, events)
        if events:
            self.scheduler.on_cache_report(CacheReport(eng.rank, events))
        if end is not None:
            self.push(end, _STEP, eng.rank)

    def run(self) -> None:
        """Process arrivals and events in time order until every request ends or the horizon."""
        reqs, heap, n, inf, horizon = self.reqs, self.heap, len(self.reqs), math.inf, self.horizon
        engines, version = self.engines, self.version
        arrive, step_done, pop = self.arrive, self.step_done, heapq.heappop  # the hot loop
        self.push(self.t_first_arrival + self.sim.stats_interval_s, _STATS)
        i = 0
        while True:
            t_arr = reqs[i].arrival if i < n else inf
            t_ev = heap[0][0] if heap else inf
            if t_arr == inf and (self.in_flight == 0 or t_ev == inf):
                return
            if t_arr <= t_ev:
                self.now = t_arr
                if t_arr > horizon:
                    return
                arrive(reqs[i])
                i = self.arrived = i + 1
                continue
            t, _, kind, rank, ver = pop(heap)
            self.now = t
            if t > horizon:
                return
            if kind == _STATS:
                self.stats_tick()
            elif ver == version[rank]:
                step_done(engines[rank])

    def arrive(self, req: SimRequest) -> None:
        """Schedule the request and hand it to its engine (which may cut its running step)."""
        now = self.now
        tokens = req.token_ids()
        d = self.scheduler.schedule(req.request_id, tokens, req.max_tokens)
        eng = self.engines[d.rank]
        eng.add(SimSeq(req, tokens, now, cached_hint=d.cached_tokens))
        self.in_flight += 1
        if eng.step_end is None:
            self.kick(eng)
        else:
            end = eng.cut(now)
            if end is not None:
                self.push(end, _STEP, eng.rank)

    def stats_tick(self) -> None:
        """Every engine's ``LoadStats``, while anything is left to run."""
        if self.in_flight or self.arrived < len(self.reqs):
            for eng in self.engines:
                self.scheduler.on_load_stats(eng.load_stats(self.now))
            self.push(self.now + self.sim.stats_interval_s, _STATS)

    def step_done(self, eng: SimEngine) -> None:
        """Report what the engine's step did to the scheduler, record finished requests, and
        plan the next step."""
        now, scheduler = self.now, self.scheduler
        res = eng.complete(now)
        if res.events:
            scheduler.on_cache_report(CacheReport(eng.rank, res.events))
        for s in res.first_token:
            scheduler.on_first_token(s.req.request_id)
        for s, fin in res.finished:
            scheduler.on_finished(fin)
            self.in_flight -= 1
            self.latencies.append(now - s.req.arrival)
            self.ttfts.append(s.t_first - s.req.arrival)
            self.last_finish = now
        self.kick(eng)

    def result(self, policy: str, ideal: float | None, wall0: float) -> SimResult:
        engines = self.engines
        latencies, ttfts = sorted(self.latencies), sorted(self.ttfts)
        finished = len(latencies)
        done_prompt = sum(e.prompt_tokens for e in engines)
        busy = [e.busy_s for e in engines]
        mean_busy = sum(busy) / len(busy)
        dur = self.last_finish - self.t_first_arrival
        return SimResult(
            policy=policy,
            gpus=self.sim.gpus,
            requests=len(self.reqs),
            finished=finished,
            mean_latency_s=sum(latencies) / finished if finished else math.nan,
            p99_latency_s=_pct(latencies, 0.99),
            mean_ttft_s=sum(ttfts) / finished if finished else math.nan,
            p99_ttft_s=_pct(ttfts, 0.99),
            throughput_rps=finished / dur if dur > 0 else math.nan,
            hit_rate=(sum(e.hit_tokens for e in engines) / done_prompt) if done_prompt else 0.0,
            host_hit_rate=(
                (sum(e.host_hit_tokens for e in engines) / done_prompt) if done_prompt else 0.0
            ),
            ideal_hit_rate=ideal if ideal is not None else ideal_hit_rate(self.reqs),
            imbalance=max(busy) / mean_busy if mean_busy > 0 else 1.0,
            sim_time_s=self.now,
            wall_s=time.perf_counter() - wall0,
            decisions=dict(self.scheduler.decisions),
            busy_s=busy,
            scheduler_stats=self.scheduler.stats(),
        )
