"""A simulated GPU engine: the ground truth the schedulers are graded by.

It is deliberately separate from the scheduler's cost model (``rank0_scheduler/cost_model.py``):
E2 must not be graded by its own estimates. What it models, vLLM-style:

- **Continuous batching** with a token budget per step (``max_num_batched_tokens``): every running
  sequence decodes one token, the rest of the budget goes to **chunked prefill** of admitted
  requests in admission order; new requests are admitted from Preble's **local scheduler**
  (``worker_rank.local_scheduler.LocalScheduler``, the real one) while the step has budget left.
- **Step time** (seconds), one formula for prefill, decode and mixed steps::

      step = base + per_token * P + attention * sum_chunks(c * (ctx + c / 2))
                  + per_seq * B + per_kv_token * KV

  P prefill tokens in the step, each chunk of c tokens attending to its ctx earlier tokens and
  half of its own; B decoding sequences reading KV tokens of context (memory bound).
- **KV cache** of fixed capacity in blocks, with **prefix reuse** and **LRU eviction at block
  granularity**. Reuse is by piece identity (see ``workloads.Piece``): a block belongs to the piece
  holding its last token, so a trie of pieces with a cached-block count per node is exactly a
  block-level prefix cache::

      pieces:   [ A: 0..1560 )[ B: 1560..1835 )
      blocks:   |0|1|...|96|97|...|113|(114 partial: not cacheable)
                 \\_ A owns 0..96 _/\\_ B owns 97..113 (97 straddles A|B: it is B's) _/

  A node holds a prefix of its blocks; eviction takes the tail blocks of the least recently used
  unpinned leaf first, so a cached path is always a prefix (as in vLLM and SGLang). A prompt's
  blocks enter the cache chunk by chunk as its prefill computes them (vLLM's ``allocate_slots``
  caches a chunk's full blocks when it schedules them), so a request with the same prefix
  admitted while the first is still prefilling reuses what is computed so far.
- Memory is reserved at admission for the whole prompt and output (no preemption); a request that
  does not fit waits in the local scheduler until running requests free blocks.
- An optional **host-memory tier** (``SimConfig.host_kv_tokens``, vLLM's CPU offloading): a second
  block cache, written through as blocks enter the GPU's and evicted LRU on its own. A request
  whose prefix the host holds beyond the GPU's hit loads those blocks over the engine's one PCIe
  link (FIFO, ``host_load_per_token_s``) while the GPU runs other steps, then prefills the rest.
  Rank 0 then hears of evictions from the host tier only: a block the GPU drops is still the
  rank's, one load away.

Calibration (defaults of ``config.SimConfig``): Llama-3-8B bf16 under vLLM on one H100 80GB.
This project's bench/results/gpu_profile_llama3-8b-h100.json (plain PyTorch on a real H100, bf16
GEMMs, flash SDPA, CUDA graphs: a floor for a real engine) fits decode as
5.95 ms + 7.4e-6 s/seq + 4.19e-8 s/KV token and prefill as 7.6 ms + 1.33e-5 s/token +
2.36e-9 s/token pair. The engine figures add serving overhead on top of that floor: base 7 ms (vLLM
bf16 8B ITL at batch 1 is ~6.5-7.5 ms), 2.2e-5 s per prefill token (8k-token prefill 267 ms,
~31k tok/s, vs 200 ms floor; vLLM/SGLang report 25-35k prefill tok/s for 8B on H100),
2.4e-9 s per token pair, 2e-5 s per decoding sequence (sampling and scheduling), 4.5e-8 s per KV
token (131,072 B/token at ~2.9 TB/s effective of the 3.35 TB/s peak). KV capacity: 0.9 x 80 GB
minus 16 GB of weights and ~3 GB of activations ~ 53 GiB / 128 KiB per token = 432k tokens.
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

from preble_hpc.config import LocalSchedulerConfig, SimConfig
from preble_hpc.messages import CacheEvent, CacheEventKind, Finished, LoadStats
from preble_hpc.sim.workloads import Piece, SimRequest
from preble_hpc.worker_rank.local_scheduler import LocalScheduler

__all__ = ["BlockCache", "SimEngine", "SimSeq", "StepResult"]


# ---------------------------------------------------------------- block cache


class _Node:
    __slots__ = ("piece", "parent", "children", "start", "count", "cached", "refs", "last", "alive")

    def __init__(self, piece: Piece | None, parent: _Node | None, start: int, count: int) -> None:
        self.piece = piece
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.start = start  # first block this node owns (global block index)
        self.count = count  # blocks it owns when whole
        self.cached = 0  # blocks of it cached now (a prefix of its blocks)
        self.refs = 0  # running requests pinning it
        self.last = 0.0
        self.alive = True


class BlockCache:
    """Prefix cache of one engine, in blocks of ``block_size`` tokens, keyed by piece identity."""

    def __init__(self, capacity_blocks: int, block_size: int) -> None:
        self.capacity = capacity_blocks
        self.bs = block_size
        self.root = _Node(None, None, 0, 0)
        self.blocks = 0  # cached blocks (pinned or not)
        self._lru: list[tuple[float, int, _Node]] = []
        self._tick = 0
        self.evicted_blocks = 0

    def match(self, pieces: tuple[Piece, ...]) -> tuple[list[_Node], int]:
        """Nodes of the cached prefix (the last may be partly cached) and its length in blocks."""
        node = self.root
        path: list[_Node] = []
        hit = 0
        for p in pieces:
            child = node.children.get(p.pid)
            if child is None:
                break
            path.append(child)
            hit += child.cached
            if child.cached < child.count:
                break
            node = child
        return path, hit

    def pin(self, path: list[_Node], now: float) -> None:
        for nd in path:
            nd.refs += 1
            nd.last = now

    def unpin(self, path: list[_Node]) -> None:
        for nd in path:
            nd.refs -= 1
            if nd.refs == 0 and not nd.children and nd.alive:
                self._push(nd)

    def _push(self, nd: _Node) -> None:
        self._tick += 1
        heapq.heappush(self._lru, (nd.last, self._tick, nd))

    def insert(
        self, pieces: tuple[Piece, ...], now: float, upto: int | None = None
    ) -> tuple[list[_Node], int]:
        """Cache every whole block of ``pieces`` (only blocks before global block ``upto`` when
        given: a prefill in progress); returns the path and the blocks newly cached.
        New unpinned leaves become evictable (the caller pins what it keeps using)."""
        bs = self.bs
        node = self.root
        end = 0
        added = 0
        path: list[_Node] = []
        for p in pieces:
            start = end // bs
            end += p.n
            count = end // bs - start
            want = count if upto is None else min(count, upto - start)
            if want <= 0 and upto is not None:
                break
            child = node.children.get(p.pid)
            if child is None:
                child = _Node(p, node, start, count)
                node.children[p.pid] = child
            if child.cached < want:
                added += want - child.cached
                child.cached = want
            child.last = now
            path.append(child)
            if want < count:
                break
            node = child
        self.blocks += added
        if path and path[-1].refs == 0 and not path[-1].children:
            self._push(path[-1])
        return path, added

    def evict(self, need: int, now: float, events: list[CacheEvent] | None) -> int:
        """Free up to ``need`` blocks, least recently used unpinned leaves first, tail blocks of a
        node first. Returns the blocks freed.

        Appends one EVICTED event per evicted chain, as the worker's KV-event relay sends them: a
        node's event is left out when an ancestor of it also lost blocks in this call, because
        the ancestor's event (its first evicted block and everything below) covers it."""
        freed = 0
        lru = self._lru
        touched: dict[_Node, int] = {}  # node -> its first evicted block
        while freed < need and lru:
            last, _, nd = heapq.heappop(lru)
            if not nd.alive or nd.refs or nd.children or nd.last != last:
                continue
            take = min(nd.cached, need - freed)
            if take:
                nd.cached -= take
                freed += take
                touched[nd] = nd.start + nd.cached
            if nd.cached == 0:
                nd.alive = False
                parent = nd.parent
                assert parent is not None
                del parent.children[nd.piece.pid]  # type: ignore[union-attr]
                if parent is not self.root and not parent.children and parent.refs == 0:
                    self._push(parent)
            else:
                heapq.heappush(lru, (last, _, nd))
        self.blocks -= freed
        self.evicted_blocks += freed
        if events is not None:
            for nd, block in touched.items():
                if not self._has_touched_ancestor(nd, touched):
                    events.append(self._evicted_event(nd, block))
        return freed

    @staticmethod
    def _has_touched_ancestor(nd: _Node, touched: dict[_Node, int]) -> bool:
        x = nd.parent
        while x is not None:
            if x in touched:
                return True
            x = x.parent
        return False

    def _evicted_event(self, nd: _Node, block: int) -> CacheEvent:
        """EVICTED for global block ``block`` (and, per the contract, everything below it)."""
        chain: list[Piece] = []
        x: _Node | None = nd
        while x is not None and x.piece is not None:
            chain.append(x.piece)
            x = x.parent
        tokens = array("I")
        end = (block + 1) * self.bs
        for p in reversed(chain):
            tokens += p.tokens()
            if len(tokens) >= end:
                break
        return CacheEvent(CacheEventKind.EVICTED, _ids(tokens[:end]), self.bs)


def _ids(tokens: Sequence[int]) -> tuple[int, ...]:
    """Event tokens as they are: the tree reads any int sequence and takes its own token array
    without a copy, where a tuple of a 10k-token prefix would cost 10k int objects per event."""
    return cast(tuple[int, ...], tokens)


# ---------------------------------------------------------------- engine


@dataclass(slots=True, eq=False)
class SimSeq:
    """One request on one engine."""

    req: SimRequest
    tokens: array | None
    """Prompt token ids (kept until the request ends, for STORED events)."""
    t_arrive: float
    cached_hint: int = 0
    prompt: int = 0
    total_blocks: int = 0
    hit_blocks: int = 0
    """Prompt blocks in the cache path it pins: its hit at admission, then what it has computed."""
    added_blocks: int = 0
    """Blocks its prefill has cached so far that no one had cached before (STORED at the end)."""
    cached_tokens: int = 0
    """Prompt tokens it does not compute: its GPU hit and what it loads from the host tier."""
    computed: int = 0
    ready_at: float = 0.0
    """When its load from the host tier ends (it waits in ``SimEngine.loading`` until then)."""
    path: list[_Node] = field(default_factory=list)
    t_admit: float = 0.0
    t_first: float = 0.0
    k0: int = 0
    end_step: int = 0


@dataclass(slots=True)
class StepResult:
    first_token: list[SimSeq] = field(default_factory=list)
    finished: list[tuple[SimSeq, Finished]] = field(default_factory=list)
    events: list[CacheEvent] = field(default_factory=list)


class SimEngine:
    """One simulated GPU. The cluster calls ``add`` on arrival, ``plan(now)`` when the engine is
    idle (returns when the planned step ends, or None), ``complete(now)`` at that time."""

    def __init__(self, rank: int, cfg: SimConfig, local: LocalSchedulerConfig) -> None:
        self.rank = rank
        self.cfg = cfg
        self.bs = cfg.block_size
        self.cache = BlockCache(cfg.kv_capacity_tokens // cfg.block_size, cfg.block_size)
        self.host = (
            BlockCache(cfg.host_kv_tokens // self.bs, self.bs) if cfg.host_kv_tokens else None
        )
        self.loading: deque[SimSeq] = deque()  # admitted, loading from the host tier (FIFO)
        self.link_free = 0.0  # when the host-to-GPU link finishes the loads queued on it
        self._idle = False  # the planned "step" only waits for a load to end
        self.ls = LocalScheduler(local)
        # When the cache last evicted blocks: the local scheduler's cache-pressure signal, as the
        # worker takes it from vLLM's KV events.
        self.eviction_window_s = local.eviction_window_s
        self.evicted_at = -math.inf
        self.pending: SimSeq | None = None  # taken from the local scheduler, waiting for memory
        self.prefilling: deque[SimSeq] = deque()
        self.decoding: list[tuple[int, int, SimSeq]] = []  # heap by end_step
        self.nseq = 0
        self.private = 0  # blocks reserved by running requests beyond the cached ones
        self.k = 0  # decode steps so far
        self.kv_a = 0  # sum over decoding seqs of (prompt + 1 - k0): KV tokens = kv_a + B * k
        self.busy_s = 0.0
        self.steps = 0
        # The step in progress.
        self.step_start = 0.0
        self.step_end: float | None = None
        self._chunks: list[tuple[SimSeq, int]] = []
        self._macro = 0  # >0: a run of this many pure decode steps
        self._macro_b = 0
        self._macro_kv0 = 0
        self.prompt_tokens = 0
        self.hit_tokens = 0
        self.host_hit_tokens = 0
        self._order = 0  # tie-break of the decode heap (deterministic, unlike id())

    # ---------------------------------------------------------------- requests

    def add(self, seq: SimSeq) -> None:
        seq.prompt = seq.req.prompt_tokens
        need = -(-(seq.prompt + seq.req.output_tokens) // self.bs)
        if need > self.cache.capacity:
            raise ValueError(
                f"request {seq.req.request_id} needs {need} KV blocks, the engine has "
                f"{self.cache.capacity}: raise SimConfig.kv_capacity_tokens"
            )
        seq.total_blocks = need
        self.ls.add(seq.req.request_id, seq.prompt, seq.cached_hint, seq)

    def has_work(self) -> bool:
        return bool(
            self.decoding or self.prefilling or self.loading or self.pending or len(self.ls)
        )

    def waiting(self) -> int:
        return len(self.ls) + (self.pending is not None)

    def _admit(self, seq: SimSeq, now: float, events: list[CacheEvent]) -> bool:
        cache = self.cache
        path, hit = cache.match(seq.req.pieces)
        cache.pin(path, now)
        need = seq.total_blocks - hit
        free = cache.capacity - cache.blocks - self.private
        if need > free:
            # With a host tier the GPU's evictions are not the rank's: the host keeps the blocks.
            if cache.evict(need - free, now, None if self.host else events):
                self.evicted_at = now
            if need > cache.capacity - cache.blocks - self.private:
                cache.unpin(path)
                return False
        self.private += need
        seq.path = path
        seq.hit_blocks = hit
        # A whole-prompt hit still computes the last token (its logits start the output).
        seq.cached_tokens = min(hit * self.bs, seq.prompt - 1)
        seq.computed = seq.cached_tokens
        seq.t_admit = now
        self.nseq += 1
        self.prompt_tokens += seq.prompt
        loaded = self._host_hit(seq, hit, now, events)
        if loaded:
            # The link is FIFO: this load starts when the ones queued before it end.
            seq.ready_at = self.link_free = (
                max(now, self.link_free) + loaded * self.cfg.host_load_per_token_s
            )
            seq.cached_tokens += loaded
            self.host_hit_tokens += loaded
            self.loading.append(seq)
        else:
            self.prefilling.append(seq)
        self.hit_tokens += seq.cached_tokens
        return True

    def _host_hit(self, seq: SimSeq, hit: int, now: float, events: list[CacheEvent]) -> int:
        """Prompt tokens the host tier holds beyond the GPU's ``hit`` blocks (it loads them);
        the tier's copy of the prefix counts as used now."""
        host = self.host
        if host is None:
            return 0
        pieces = seq.req.pieces
        held = host.match(pieces)[1]
        self._write_host(pieces, now, max(held, hit), events)
        return max(0, min(held * self.bs, seq.prompt - 1) - seq.cached_tokens)

    def _write_host(
        self, pieces: tuple[Piece, ...], now: float, upto: int | None, events: list[CacheEvent]
    ) -> None:
        """Store (or touch) ``pieces`` up to block ``upto`` in the host tier, evicting its least
        recently used blocks past its capacity; those leave the rank (EVICTED)."""
        host = self.host
        if host is None:
            return
        host.insert(pieces, now, upto)
        over = host.blocks - host.capacity
        if over > 0:
            host.evict(over, now, events)

    def _loads_done(self, now: float, events: list[CacheEvent]) -> None:
        """Requests whose load from the host tier has ended join the prefill queue, their loaded
        blocks cached on the GPU (a request admitted later reuses them there)."""
        while self.loading and self.loading[0].ready_at <= now:
            s = self.loading.popleft()
            s.computed = s.cached_tokens
            self._cache_progress(s, now, events)
            self.prefilling.append(s)

    def _admit_some(self, now: float, budget: int, events: list[CacheEvent]) -> None:
        backlog = sum(s.prompt - s.computed for s in self.prefilling)
        while backlog < budget and self.nseq < self.cfg.max_num_seqs:
            seq = self.pending
            if seq is None:
                got = self.ls.pop_round(1, now - self.evicted_at < self.eviction_window_s)
                if not got:
                    return
                seq = got[0]
            if not self._admit(seq, now, events):
                self.pending = seq
                return
            self.pending = None
            backlog += seq.prompt - seq.computed

    # ---------------------------------------------------------------- steps

    def plan(self, now: float, events: list[CacheEvent]) -> float | None:
        """Start the next step at ``now``; returns its end time (None: nothing to run)."""
        cfg = self.cfg
        b = len(self.decoding)
        self._loads_done(now, events)
        self._admit_some(now, cfg.max_num_batched_tokens - b, events)
        kv = self.kv_a + b * self.k
        self.step_start = now
        if not self.prefilling:
            if b == 0:
                # Nothing to compute: wake when the next load ends (an arrival cuts the wait).
                self._idle = bool(self.loading)
                self.step_end = self.loading[0].ready_at if self.loading else None
                return self.step_end
            # Pure decode: batch is fixed until the next sequence ends (or an arrival cuts it).
            steps = self.decoding[0][0] - self.k
            self._macro = steps
            self._macro_b = b
            self._macro_kv0 = kv
            dur = self._decode_run_s(steps, b, kv)
        else:
            budget = cfg.max_num_batched_tokens - b
            chunks = []
            tokens = 0
            pairs = 0.0
            for s in self.prefilling:
                if budget <= 0:
                    break
                c = min(s.prompt - s.computed, budget)
                chunks.append((s, c))
                budget -= c
                tokens += c
                pairs += c * (s.computed + c / 2)
            self._chunks = chunks
            self._macro = 0
            dur = (
                cfg.step_base_s
                + cfg.prefill_per_token_s * tokens
                + cfg.prefill_attention_s * pairs
                + (cfg.decode_per_seq_s * b + cfg.decode_per_kv_token_s * kv if b else 0.0)
            )
        self.step_end = now + dur
        if self._macro and self.loading:
            # End the run at the step where the next load has ended, for it to join.
            self.cut(self.loading[0].ready_at)
        return self.step_end

    def _decode_run_s(self, steps: int, b: int, kv0: int) -> float:
        cfg = self.cfg
        per = cfg.step_base_s + cfg.decode_per_seq_s * b + cfg.decode_per_kv_token_s * kv0
        return steps * per + cfg.decode_per_kv_token_s * b * steps * (steps - 1) / 2

    def cut(self, now: float) -> float | None:
        """An arrival at ``now`` during a run of decode steps: end the run at the first step
        boundary at or after ``now`` (the new request joins the next step); during a wait for a
        load, end the wait now. Returns the new end time if it changed."""
        if self.step_end is None or now >= self.step_end:
            return None
        if self._idle:
            self.step_end = now
            return now
        if self._macro <= 1:
            return None
        cfg = self.cfg
        b, kv0 = self._macro_b, self._macro_kv0
        per = cfg.step_base_s + cfg.decode_per_seq_s * b + cfg.decode_per_kv_token_s * kv0
        a = cfg.decode_per_kv_token_s * b / 2
        lin = per - a
        dt = now - self.step_start
        if a > 0:
            j = math.ceil((-lin + math.sqrt(lin * lin + 4 * a * dt)) / (2 * a) - 1e-9)
        else:
            j = math.ceil(dt / per - 1e-9)
        j = max(1, j)
        while j < self._macro and self._decode_run_s(j, b, kv0) < dt:
            j += 1
        if j >= self._macro:
            return None
        self._macro = j
        self.step_end = self.step_start + self._decode_run_s(j, b, kv0)
        return self.step_end

    def complete(self, now: float) -> StepResult:
        """The planned step ends at ``now``: advance prefill and decode, finish what is done."""
        res = StepResult()
        self.step_end = None
        if self._idle:
            self._idle = False
            return res
        self.busy_s += now - self.step_start
        self.steps += 1
        if self._macro:
            self.k += self._macro
            self._macro = 0
        else:
            if self.decoding:
                self.k += 1
            for s, c in self._chunks:
                s.computed += c
                if s.computed < s.prompt:
                    self._cache_progress(s, now, res.events)
            self._chunks = []
            while self.prefilling and self.prefilling[0].computed >= self.prefilling[0].prompt:
                self._prefill_done(self.prefilling.popleft(), now, res)
            if any(s.computed >= s.prompt for s in self.prefilling):
                keep: deque[SimSeq] = deque()
                for s in self.prefilling:
                    if s.computed >= s.prompt:
                        self._prefill_done(s, now, res)
                    else:
                        keep.append(s)
                self.prefilling = keep
        dec = self.decoding
        while dec and dec[0][0] <= self.k:
            _, _, s = heapq.heappop(dec)
            self.kv_a -= s.prompt + 1 - s.k0
            self._finish(s, now, res)
        return res

    def _cache_progress(self, s: SimSeq, now: float, events: list[CacheEvent]) -> None:
        """Cache the whole blocks of the prompt computed so far, as vLLM does once a chunk is
        scheduled: a request sharing the prefix and admitted meanwhile reuses them instead of
        computing a second copy. Their blocks leave the request's private reservation."""
        done = s.computed // self.bs
        if done <= s.hit_blocks:
            return
        cache = self.cache
        path, added = cache.insert(s.req.pieces, now, done)
        self._write_host(s.req.pieces, now, done, events)
        cache.pin(path, now)
        cache.unpin(s.path)
        s.path = path
        self.private -= done - s.hit_blocks
        s.hit_blocks = done
        s.added_blocks += added

    def _prefill_done(self, s: SimSeq, now: float, res: StepResult) -> None:
        s.t_first = now
        res.first_token.append(s)
        cache = self.cache
        path, added = cache.insert(s.req.pieces, now)
        self._write_host(s.req.pieces, now, None, res.events)
        full = s.prompt // self.bs
        self.private -= full - s.hit_blocks
        cache.pin(path, now)
        cache.unpin(s.path)
        s.path = path
        if (added or s.added_blocks) and s.tokens is not None:
            res.events.append(
                CacheEvent(CacheEventKind.STORED, _ids(s.tokens[: full * self.bs]), self.bs)
            )
        if s.req.output_tokens <= 1:
            self._finish(s, now, res)
            return
        s.k0 = self.k
        s.end_step = self.k + s.req.output_tokens - 1
        self.kv_a += s.prompt + 1 - s.k0
        self._order += 1
        heapq.heappush(self.decoding, (s.end_step, self._order, s))

    def _finish(self, s: SimSeq, now: float, res: StepResult) -> None:
        cache = self.cache
        req = s.req
        full = s.prompt // self.bs
        self.private -= s.total_blocks - full
        self.nseq -= 1
        if req.output_piece is not None:
            pieces = req.pieces + (req.output_piece,)
            path, added = cache.insert(pieces, now)
            self._write_host(pieces, now, None, res.events)
            if added and s.tokens is not None:
                end = (s.prompt + req.output_piece.n) // self.bs * self.bs
                toks = s.tokens + req.output_piece.tokens()
                res.events.append(CacheEvent(CacheEventKind.STORED, _ids(toks[:end]), self.bs))
        cache.unpin(s.path)
        s.path = []
        out = req.output_tokens
        fin = Finished(
            request_id=req.request_id,
            rank=self.rank,
            finish_reason="length",
            prompt_tokens=s.prompt,
            cached_tokens=s.cached_tokens,
            completion_tokens=out,
            queue_s=s.t_admit - s.t_arrive,
            prefill_s=s.t_first - s.t_admit,
            decode_s_per_token=(now - s.t_first) / (out - 1) if out > 1 else 0.0,
        )
        s.tokens = None
        res.finished.append((s, fin))

    # ---------------------------------------------------------------- reports

    def load_stats(self, now: float) -> LoadStats:
        used = self.cache.blocks + self.private
        hit = self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        return LoadStats(
            rank=self.rank,
            time=now,
            running=self.nseq,
            waiting=0,
            kv_usage=min(1.0, used / self.cache.capacity),
            local_queue=self.waiting(),
            prefix_cache_hit_rate=hit,
        )
