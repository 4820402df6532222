"""Global radix tree over token ids: which rank holds which prefix, and how hot each prefix is.

The tree mirrors the engines' prefix caches. A node is a run of tokens; ``node.ranks`` maps each
rank whose engine holds the path from the root into that node to how many of the node's tokens it
holds (all of them, or a first part: an engine evicts a block at a time from the end). Because an
engine can only hold a block if it holds the blocks before it, holders shrink going down a path,
and only a rank that holds a node whole can hold anything below it::

    root ── [system 0..900) {1:900, 2:900, 3:900} ──┬── [doc A 900..1800) {1:900, 2:320} ── ...
                                                    └── [doc B 900..1700) {3:800}

(kept by every mutation below). The longest prefix rank r holds for a prompt is the start of the
deepest matched node that has r plus what r holds of it, up to what the prompt matched there.

Nodes split only where prompts diverge, never where a rank's copy ends: with 64 engines each
evicting its own tails, splitting at every such end cut a 10k-token video prefix into ~100 nodes
(round robin at 64 GPUs), and every walk, mark and eviction paid for each.

Memory is bounded: the tree holds at most ``capacity_tokens`` tokens. Past it, nodes that no rank
holds go first (oldest first), then, if every node is held, the least recently used node of the
rank holding the most tokens (the tree then forgets a copy that still exists; counted in
``forgotten_tokens``).

Token runs are ``array('I')``: a prompt is converted once per request (one C loop; ``Match.tokens``
carries it on to ``hold``), then each node's segment is compared with the slice of the prompt at
the node's offset by a typed compare in C, whatever int objects the prompt was built from. Lists of
Python ints would be compared object by object, which is ~20x slower for prompts that arrive over
gRPC or MPI (fresh int objects, unlike a benchmark that reuses its own), cost a pointer plus an int
object per token instead of 4 bytes, and be walked by the garbage collector. Children are found by
a dict keyed by their first token.
"""

from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["Node", "Match", "RadixTree", "as_tokens"]

#: Token runs: unsigned 32-bit, room for any vocabulary (converting a list to "I" is also ~2.5x
#: faster than to a 64-bit type).
TOKEN_TYPECODE = "I"


class Node:
    """One run of tokens. ``depth`` is the number of tokens from the root through this node."""

    __slots__ = (
        "seg",
        "size",
        "children",
        "parent",
        "ranks",
        "depth",
        "last_access",
        "hit_epoch",
        "hit_cur",
        "hit_prev",
        "replicas",
        "rank_children",
    )

    def __init__(self, seg: array, parent: Node | None, depth: int, now: float) -> None:
        self.seg = seg
        #: ``len(seg)``, kept beside it: the eviction walk reads it for hundreds of nodes per
        #: call, and reading it here saves touching each array object.
        self.size = len(seg)
        self.children: dict[int, Node] = {}
        self.parent = parent
        #: rank -> tokens of this node it holds (1..size; size for every rank a child has).
        self.ranks: dict[int, int] = {}
        self.depth = depth
        self.last_access = now
        # Windowed hit counter: counts in the current and the previous window-long bucket.
        self.hit_epoch = -1
        self.hit_cur = 0
        self.hit_prev = 0
        #: Ranks that hold this prefix because the rebalancer replicated it here (rebalance.py).
        self.replicas: set[int] | None = None
        #: rank -> children holding it (None until a child is held). ``evict`` asks whether a rank
        #: holds another branch below a node; LooGLE's documents have hundreds of question
        #: branches each, and scanning them was 10% of a 64-GPU run.
        self.rank_children: dict[int, int] | None = None

    @property
    def start(self) -> int:
        """Depth of the first token of this node."""
        return self.depth - self.size

    def __repr__(self) -> str:
        return f"Node([{self.start}:{self.depth}) ranks={sorted(self.ranks)})"


@dataclass(slots=True)
class Match:
    """Result of matching a prompt against the tree (valid until the tree changes)."""

    path: list[Node]
    """Matched nodes from the root down; the last one may be matched only in part."""
    length: int
    """Prompt tokens found in the tree at all (held by some rank or not)."""
    tail: int
    """Tokens matched inside the last node of ``path`` (``len(seg)`` when matched whole)."""
    per_rank: dict[int, int]
    """rank -> prompt tokens that rank holds (only ranks holding at least one token)."""
    cached: int
    """Longest prefix of the prompt held by any rank (``max(per_rank.values())`` or 0)."""
    tokens: array
    """The prompt as the tree's token type (converted once; ``hold`` reuses it)."""
    holders: list[int]
    """The ranks holding the longest prefix (``per_rank[r] == cached``), ascending."""


def as_tokens(tokens: Sequence[int]) -> array:
    """``tokens`` as the tree's token type (no copy if it already is one)."""
    if type(tokens) is array and tokens.typecode == TOKEN_TYPECODE:
        return tokens
    try:
        return array(TOKEN_TYPECODE, tokens)
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"token ids must be ints in [0, 2**32): {exc}") from None


def _common_len(seg: array, tokens: array, offset: int, limit: int) -> int:
    """Length of the common prefix of ``seg`` and ``tokens[offset:]``, at most ``limit``.

    Bisection on slice equality: each step compares only the not-yet-known half, so the total work
    is about 2 * limit element comparisons, all in C.
    """
    lo, hi = 0, limit  # seg[:lo] == tokens[offset:offset+lo] is known; the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if seg[lo:mid] == tokens[offset + lo : offset + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _check_capacity(capacity_tokens: int) -> None:
    if capacity_tokens <= 0:
        raise ValueError(f"capacity_tokens must be > 0, got {capacity_tokens}")


def _truncate(path: list[Node], length: int, tail: int, upto: int) -> tuple[list[Node], int, int]:
    """A match's path, length and tail cut to its first ``upto`` tokens (what a walk of them
    would return)."""
    if upto >= length:
        return path, length, tail
    last = len(path) - 1
    while last >= 0 and path[last].start >= upto:
        last -= 1
    if last < 0:
        return [], 0, 0
    return path[: last + 1], upto, upto - path[last].start


def _count_child(node: Node, rank: int, delta: int) -> None:
    """``node`` gained (+1) or lost (-1) ``rank``: update its parent's ``rank_children``."""
    parent = node.parent
    assert parent is not None, "the root holds no rank"
    counts = parent.rank_children
    if counts is None:
        parent.rank_children = {rank: delta}
        return
    left = counts.get(rank, 0) + delta
    if left:
        counts[rank] = left
    else:
        del counts[rank]


class RadixTree:
    """Prefix tree of token ids with per-rank holders, windowed hits and a token cap."""

    def __init__(self, capacity_tokens: int, window_s: float) -> None:
        _check_capacity(capacity_tokens)
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.capacity_tokens = capacity_tokens
        self.window_s = window_s
        self.root = Node(array(TOKEN_TYPECODE), None, 0, 0.0)
        self.total_tokens = 0
        self.num_nodes = 0
        #: Tokens the cap made the tree forget while some rank still held them.
        self.forgotten_tokens = 0
        #: Per rank: held nodes, least recently used first (the engine's eviction order). Plain
        #: dicts (insertion-ordered; "move to end" is delete + insert), not OrderedDicts: the
        #: eviction walk iterates them, and a dict iterates its entry array in place where an
        #: OrderedDict looks each key up again (measured: the walk 1.75x faster on 64 full ranks).
        self._rank_lru: dict[int, dict[Node, None]] = {}
        self._held: dict[int, int] = {}
        self._held_view = MappingProxyType(self._held)
        #: Nodes no rank holds, in the order they became unheld (dropped first past the cap).
        self._unheld: OrderedDict[Node, None] = OrderedDict()

    # ------------------------------------------------------------------ queries

    def match(self, tokens: Sequence[int]) -> Match:
        """Longest match of ``tokens`` in the tree and, per rank, the prefix it holds."""
        tokens = as_tokens(tokens)
        path, length, tail = self._walk(tokens)
        per_rank, cached, holders = self._per_rank(path, tail)
        return Match(path, length, tail, per_rank, cached, tokens, holders)

    def _walk(self, tokens: array) -> tuple[list[Node], int, int]:
        """Matched path, matched length, tokens matched in the last node."""
        n = len(tokens)
        node = self.root
        path: list[Node] = []
        i = 0
        tail = 0
        while i < n:
            child = node.children.get(tokens[i])
            if child is None:
                break
            seg = child.seg
            size = len(seg)
            if i + size <= n and seg == tokens[i : i + size]:
                path.append(child)
                i += size
                tail = size
                node = child
                continue
            # Partial match inside this child (its first token matched via the dict key).
            k = _common_len(seg, tokens, i, min(size, n - i))
            path.append(child)
            i += k
            tail = k
            break
        return path, i, tail

    @staticmethod
    def _per_rank(path: list[Node], tail: int) -> tuple[dict[int, int], int, list[int]]:
        per_rank: dict[int, int] = {}
        if not path:
            return per_rank, 0, []
        everyone = len(path[0].ranks)  # holders shrink going down: path[0] has all of them
        last = len(path) - 1
        for idx in range(last, -1, -1):
            node = path[idx]
            ranks = node.ranks
            if not ranks:
                continue
            start = node.start
            matched = tail if idx == last else node.size
            for r, held in ranks.items():
                if r not in per_rank:
                    per_rank[r] = start + (held if held < matched else matched)
            if len(per_rank) == everyone:
                break
        if not per_rank:
            return per_rank, 0, []
        # Ranks found first (deepest node) end beyond every shallower node: the max is among them.
        cached = max(per_rank.values())
        holders = sorted(r for r, end in per_rank.items() if end == cached)
        return per_rank, cached, holders

    def held_tokens(self, rank: int) -> int:
        """Tokens the tree believes ``rank`` holds."""
        return self._held.get(rank, 0)

    @property
    def held_by_rank(self) -> Mapping[int, int]:
        """rank -> tokens held (a live read-only view; ranks holding nothing may be absent)."""
        return self._held_view

    def hits(self, node: Node, now: float) -> float:
        """Requests that matched ``node`` in the last window (sliding-window estimate)."""
        epoch, keep_prev = self._window_at(now)
        if node.hit_epoch == epoch:
            return node.hit_prev * keep_prev + node.hit_cur
        if node.hit_epoch == epoch - 1:
            return node.hit_cur * keep_prev
        return 0.0

    def _window_at(self, now: float) -> tuple[int, float]:
        """The hit window's bucket at ``now`` and the weight its previous bucket still has."""
        epoch = int(now // self.window_s)
        return epoch, 1.0 - (now / self.window_s - epoch)

    def eviction_cost(
        self,
        rank: int,
        need_tokens: int,
        recompute_s: Callable[[int, int], float],
        now: float,
        keep: Match | None = None,
        bound: float = math.inf,
    ) -> float:
        """Cost of the KV ``rank`` must evict to free ``need_tokens``: for each node it would
        evict (its LRU order), the time to recompute its part of the node times the node's
        windowed hits per holder.

        ``recompute_s(tokens, context)`` is the cost model's marginal prefill time. Nodes of
        ``keep`` (the request's own matched path) are in use and never evicted. The walk stops as
        soon as the cost exceeds ``bound`` (it then returns that partial cost, > ``bound``): a
        policy comparing ranks needs no more than "worse than the best so far", and a full cache
        can take hundreds of nodes to free a long prompt.
        """
        if need_tokens <= 0:
            return 0.0
        lru = self._rank_lru.get(rank)
        if not lru:
            return 0.0
        protect = set(keep.path) if keep is not None else ()
        # ``hits`` inlined: a full rank can walk hundreds of cold nodes per call (17M nodes in
        # a 100k-request mix run at 64 GPUs).
        epoch, keep_prev = self._window_at(now)
        freed = 0
        cost = 0.0
        for node in lru:
            if node in protect:
                continue
            size = node.ranks[rank]
            hit_epoch = node.hit_epoch
            if hit_epoch == epoch:
                h = node.hit_prev * keep_prev + node.hit_cur
            elif hit_epoch == epoch - 1:
                h = node.hit_cur * keep_prev
            else:
                h = 0.0
            if h > 0.0:
                cost += recompute_s(size, node.start) * h / len(node.ranks)
                if cost > bound:
                    return cost
            freed += size
            if freed >= need_tokens:
                break
        return cost

    # ------------------------------------------------------------------ mutations

    def record_hit(self, m: Match, now: float) -> None:
        """Count one request against every node it matched."""
        w = self.window_s
        epoch = int(now // w)
        for node in m.path:
            if node.hit_epoch == epoch:
                node.hit_cur += 1
            else:
                node.hit_prev = node.hit_cur if node.hit_epoch == epoch - 1 else 0
                node.hit_cur = 1
                node.hit_epoch = epoch
            node.last_access = now

    def hold(
        self,
        tokens: Sequence[int],
        rank: int,
        now: float,
        m: Match | None = None,
        upto: int | None = None,
    ) -> int:
        """``rank`` now holds all of ``tokens`` (STORED, or the scheduler's optimistic mark), or
        only their first ``upto`` tokens.

        ``m`` is a match of the same tokens made since the tree last changed (saves a walk).
        Returns the number of tokens newly marked as held by ``rank``.
        """
        if m is None:
            tokens = as_tokens(tokens)
            if upto is not None:
                tokens = tokens[:upto]
            path, length, tail = self._walk(tokens)
            n = len(tokens)
        else:
            tokens = m.tokens
            path, length, tail = m.path, m.length, m.tail
            n = len(tokens)
            if upto is not None and upto < n:
                path, length, tail = _truncate(path, length, tail, upto)
                n = upto
        last_held = tail
        if path and tail < path[-1].size and length < n:
            # The new suffix branches off inside the last node.
            path[-1] = self._split(path[-1], tail)
        if length < n:
            parent = path[-1] if path else self.root
            leaf = Node(tokens[length:n], parent, n, now)
            parent.children[tokens[length]] = leaf
            self.total_tokens += n - length
            self.num_nodes += 1
            self._unheld[leaf] = None  # held just below; keeps the bookkeeping in one place
            path.append(leaf)
            last_held = leaf.size
        gained = self._add_rank(path, rank, now, last_held)
        if self.total_tokens > self.capacity_tokens:
            self._enforce_cap()
        return gained

    def evict(self, tokens: Sequence[int], block_tokens: int, rank: int) -> int:
        """EVICTED: ``rank`` no longer holds the block ``tokens[-block_tokens:]`` nor anything below
        it on that path. Returns the tokens ``rank`` lost in the tree (0 if it held none of them,
        or if the block is not in the tree: tokens that differ from the tree's path are another
        block).

        Branches that leave the block's path inside the block are other blocks of the engine and
        keep the rank; so does the shared run of tokens above them::

            tokens:  [ ... prefix ... | e v i c t e d ]
            tree:    ... ─ [p r e f i x e v i] ┬─ [c t e d]   <- rank dropped from here down
                                               └─ [l ...]     <- another block: kept
        """
        tokens = as_tokens(tokens)
        n = len(tokens)
        if not 0 < block_tokens <= n:
            raise ValueError(f"block_tokens must be in [1, {n}], got {block_tokens}")
        start = n - block_tokens
        node = self.root
        i = 0
        block_path: list[Node] = []  # nodes whose held part holds tokens start..n-1, from the top
        while i < n:
            child = node.children.get(tokens[i])
            if child is None:
                break  # the tree knows only part of the block (the rest was never seen or capped)
            held = child.ranks.get(rank)
            size = child.size
            if held is None or (held < size and i + held <= start):
                break  # the rank holds nothing of the block from here down
            seg = child.seg
            if i + size <= n:
                if seg != tokens[i : i + size]:
                    return 0
            elif seg[: n - i] != tokens[i:]:
                return 0
            if child.depth > start:
                block_path.append(child)
            node = child
            i += size
        if not block_path:
            return 0
        # Drop from just below the last branch point inside the block where the rank holds
        # another branch (that branch still needs the tokens above it).
        top_idx = 0
        for idx in range(1, len(block_path)):
            held_below = block_path[idx - 1].rank_children
            assert held_below is not None  # block_path[idx] holds the rank
            if held_below[rank] > 1:
                top_idx = idx
        top = block_path[top_idx]
        if top_idx == 0 and top.start < start:
            return self._cut_rank(top, rank, start - top.start)
        return self._drop_rank(top, rank)

    def clear_rank(self, rank: int) -> int:
        """CLEARED or rank removed: forget everything ``rank`` holds. Returns tokens dropped."""
        lru = self._rank_lru.pop(rank, None)
        dropped = self._held.pop(rank, 0)
        if lru:
            # A child holds the rank only if its parent does: the rank's nodes and the root are
            # every node with a count for it.
            for node in (self.root, *lru):
                node.ranks.pop(rank, None)
                if node.replicas:
                    node.replicas.discard(rank)
                if node.rank_children:
                    node.rank_children.pop(rank, None)
                if not node.ranks and node is not self.root:
                    self._unheld[node] = None
        return dropped

    # ------------------------------------------------------------------ internals

    def _add_rank(self, path: list[Node], rank: int, now: float, last_held: int) -> int:
        """``rank`` holds every node of ``path`` whole but the last, of which it holds at least
        ``last_held`` tokens."""
        lru = self._rank_lru.get(rank)
        if lru is None:
            lru = self._rank_lru[rank] = {}
        gained = 0
        last = len(path) - 1
        # Leaf first, then towards the root: ancestors end up more recent than their descendants,
        # so an LRU walk meets a leaf before its parent, as an engine evicts.
        for idx in range(last, -1, -1):
            node = path[idx]
            node.last_access = now
            ranks = node.ranks
            held = ranks.get(rank)
            want = last_held if idx == last else node.size
            if held is not None:
                del lru[node]
                lru[node] = None
                if held < want:
                    ranks[rank] = want
                    gained += want - held
                continue
            if not ranks:
                self._unheld.pop(node, None)
            ranks[rank] = want
            _count_child(node, rank, 1)
            lru[node] = None
            gained += want
        self._held[rank] = self._held.get(rank, 0) + gained
        return gained

    def _split(self, node: Node, k: int) -> Node:
        """Cut ``node`` after its first ``k`` tokens (where a new prompt branches off); returns
        the new upper node. Ranks holding ``k`` tokens or fewer of it now hold only the upper."""
        seg = node.seg
        upper = Node(seg[:k], node.parent, node.start + k, node.last_access)
        held = node.ranks
        upper.ranks = {r: (h if h < k else k) for r, h in held.items()}
        lower = {r: h - k for r, h in held.items() if h > k}
        node.ranks = lower
        if lower:
            upper.rank_children = dict.fromkeys(lower, 1)
        upper.hit_epoch, upper.hit_cur, upper.hit_prev = node.hit_epoch, node.hit_cur, node.hit_prev
        if node.replicas:
            upper.replicas = set(node.replicas)
            node.replicas.intersection_update(lower)
        node.seg = seg[k:]
        node.size -= k
        node.parent = upper
        upper.children[node.seg[0]] = node
        assert upper.parent is not None
        upper.parent.children[seg[0]] = upper
        self.num_nodes += 1
        for r in upper.ranks:
            lru = self._rank_lru[r]
            lru[upper] = None
            if r not in lower:
                del lru[node]
        if not upper.ranks:
            self._unheld[upper] = None
        elif not lower:
            self._unheld[node] = None
        return upper

    def _drop_rank(self, top: Node, rank: int) -> int:
        """Remove ``rank`` from ``top`` and every node below it."""
        if rank not in top.ranks:
            return 0
        lru = self._rank_lru[rank]
        dropped = 0
        _count_child(top, rank, -1)
        stack = [top]
        while stack:
            node = stack.pop()
            held = node.ranks.pop(rank, None)
            if held is None:
                continue
            if node.replicas:
                node.replicas.discard(rank)
            del lru[node]
            dropped += held
            if not node.ranks:
                self._unheld[node] = None
            # Every child loses the rank too, so its count here goes; none held it: nothing below.
            below = node.rank_children
            if below and below.pop(rank, 0):
                stack.extend(node.children.values())
        self._held[rank] -= dropped
        return dropped

    def _cut_rank(self, node: Node, rank: int, keep: int) -> int:
        """``rank`` keeps only the first ``keep`` (>= 1) tokens of ``node`` and nothing below."""
        dropped = node.ranks[rank] - keep
        node.ranks[rank] = keep
        self._held[rank] -= dropped
        below = node.rank_children
        if below and below.get(rank):
            for child in list(node.children.values()):
                dropped += self._drop_rank(child, rank)
        return dropped

    def _remove_subtree(self, top: Node) -> None:
        parent = top.parent
        assert parent is not None, "the root is never removed"
        del parent.children[top.seg[0]]
        for r in top.ranks:
            _count_child(top, r, -1)
        stack = [top]
        while stack:
            node = stack.pop()
            self.total_tokens -= node.size
            self.num_nodes -= 1
            if node.ranks:
                self.forgotten_tokens += max(node.ranks.values())
                for r, held in node.ranks.items():
                    del self._rank_lru[r][node]
                    self._held[r] -= held
            else:
                self._unheld.pop(node, None)
            node.parent = None
            stack.extend(node.children.values())

    def set_capacity(self, capacity_tokens: int) -> None:
        """Change the cap; a lower one drops nodes at once, as a ``hold`` past the cap does."""
        _check_capacity(capacity_tokens)
        self.capacity_tokens = capacity_tokens
        self._enforce_cap()

    def _enforce_cap(self) -> None:
        while self.total_tokens > self.capacity_tokens:
            if self._unheld:
                node = next(iter(self._unheld))
            else:
                rank = max(self._held, key=self._held.__getitem__)
                node = next(iter(self._rank_lru[rank]))
            self._remove_subtree(node)

    # ------------------------------------------------------------------ checks (tests)

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (O(tree); for tests)."""
        total = 0
        count = 0
        held: dict[int, int] = {}
        stack = [self.root]
        while stack:
            node = stack.pop()
            counts: dict[int, int] = {}
            for c in node.children.values():
                for r in c.ranks:
                    counts[r] = counts.get(r, 0) + 1
            assert (node.rank_children or {}) == counts, (node, node.rank_children, counts)
            for key, child in node.children.items():
                assert child.parent is node
                assert child.seg and child.seg[0] == key
                assert child.size == len(child.seg), child
                assert child.depth == node.depth + len(child.seg)
                assert all(0 < h <= child.size for h in child.ranks.values()), child
                if node is not self.root:
                    assert all(node.ranks.get(r) == node.size for r in child.ranks), (node, child)
                assert (not child.ranks) == (child in self._unheld), child
                for r, h in child.ranks.items():
                    assert child in self._rank_lru[r]
                    held[r] = held.get(r, 0) + h
                total += len(child.seg)
                count += 1
                stack.append(child)
        assert total == self.total_tokens, (total, self.total_tokens)
        assert count == self.num_nodes, (count, self.num_nodes)
        assert len(self._unheld) == sum(1 for _ in self._unheld)
        for r, n in self._held.items():
            assert held.get(r, 0) == n, (r, held.get(r, 0), n)
            assert len(self._rank_lru[r]) == sum(1 for node in self._rank_lru[r] if r in node.ranks)
