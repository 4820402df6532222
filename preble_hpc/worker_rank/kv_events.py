"""vLLM's KV-cache events, turned into token prefixes for rank 0's global tree.

vLLM names cached blocks by hash; rank 0 thinks in tokens. Each ``BlockStored`` carries the
tokens of its blocks and the hash of the parent block, so a map ``hash -> (parent, tokens)``
rebuilds the whole prefix of any block it has seen::

    BlockStored(hashes=[h3, h4], parent=h2, tokens=[b3 | b4])
        map: h3 -> (h2, b3), h4 -> (h3, b4)
        prefix(h4) = tokens(h1) + tokens(h2) + b3 + b4      (walk parents to the root)

    STORED  event: prefix through the batch's last block, block_tokens = tokens of the batch
    EVICTED event: prefix through the removed block,     block_tokens = that block's tokens

A removed block stays in the map while a cached child still names it as parent (vLLM may evict a
parent before its child; the child's later removal must still map). A block the map cannot place
(its parent chain was never seen, a missed event batch) becomes ``UNMAPPED`` with a detail:
reported, never guessed.

With KV offloading (``EngineConfig.kv_offload_gib``) the same block is announced per storage
medium (``GPU``, ``CPU``, ...), and a medium may announce a block more than once: each block
counts its announcements per medium, and only the removal that leaves it in no medium is an
eviction. A block the GPU drops but host memory keeps is still the rank's: one load away. The
offloading connector's placeholder stores (no tokens) are taken for blocks the map knows.

Two parts: ``BlockPrefixMap`` (pure, fed decoded events; unit-tested without vLLM) and
``KVEventSubscriber`` (ZMQ SUB socket + msgspec decoding with vLLM's own types).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from preble_hpc.messages import CacheEvent, CacheEventKind

BlockHash = Any  # bytes or int, as vLLM's ExternalBlockHash


#: The medium of events that name none (vLLM's GPU block pool names "GPU").
GPU = "GPU"


@dataclass(slots=True)
class _Block:
    parent: BlockHash | None
    tokens: tuple[int, ...]
    children: int = 0
    media: dict[str, int] = field(default_factory=dict)
    """Medium -> announcements not yet removed; empty: removed from every medium."""

    @property
    def removed(self) -> bool:
        return not self.media

    def announce(self, medium: str) -> None:
        """One more copy in ``medium``: one more removal there before it is gone."""
        self.media[medium] = self.media.get(medium, 0) + 1


class BlockPrefixMap:
    """Block hash -> parent and tokens; turns vLLM KV events into ``CacheEvent``s."""

    def __init__(self) -> None:
        self._blocks: dict[BlockHash, _Block] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def apply(self, events: Iterable[Any]) -> list[CacheEvent]:
        """Map decoded vLLM events (``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``,
        by class name so tests can feed look-alikes) to cache events, in order."""
        out: list[CacheEvent] = []
        for event in events:
            kind = type(event).__name__
            medium = getattr(event, "medium", None) or GPU
            if kind == "BlockStored":
                out.append(
                    self.on_stored(
                        event.block_hashes,
                        event.parent_block_hash,
                        event.token_ids,
                        event.block_size,
                        medium,
                    )
                )
            elif kind == "BlockRemoved":
                out.extend(self.on_removed(event.block_hashes, medium))
            elif kind == "AllBlocksCleared":
                out.append(self.on_cleared())
            else:
                out.append(CacheEvent(CacheEventKind.UNMAPPED, detail=f"unknown event {kind}"))
        return out

    def on_stored(
        self,
        block_hashes: list[BlockHash],
        parent: BlockHash | None,
        token_ids: list[int],
        block_size: int,
        medium: str = GPU,
    ) -> CacheEvent:
        if not token_ids and block_hashes:
            return self._stored_placeholder(block_hashes, medium)
        if len(token_ids) != len(block_hashes) * block_size:
            return CacheEvent(
                CacheEventKind.UNMAPPED,
                detail=f"BlockStored with {len(block_hashes)} blocks of {block_size} tokens "
                f"carries {len(token_ids)} tokens",
            )
        if parent is not None and parent not in self._blocks:
            return CacheEvent(
                CacheEventKind.UNMAPPED,
                detail=f"BlockStored of {len(block_hashes)} block(s) under unknown parent "
                f"{_short(parent)}",
            )
        prev = parent
        for i, block_hash in enumerate(block_hashes):
            tokens = tuple(token_ids[i * block_size : (i + 1) * block_size])
            self._put(block_hash, prev, tokens, medium)
            prev = block_hash
        return CacheEvent(
            CacheEventKind.STORED, self.prefix(block_hashes[-1]), block_tokens=len(token_ids)
        )

    def _stored_placeholder(self, block_hashes: list[BlockHash], medium: str) -> CacheEvent:
        """A store that names blocks by hash only (vLLM's offloading connector without
        self-describing events): another medium of blocks the map knows, or unmapped."""
        unknown = [h for h in block_hashes if h not in self._blocks]
        if unknown:
            return CacheEvent(
                CacheEventKind.UNMAPPED,
                detail=f"BlockStored in {medium} without tokens of unknown block "
                f"{_short(unknown[0])}",
            )
        for block_hash in block_hashes:
            self._blocks[block_hash].announce(medium)
        last = self._blocks[block_hashes[-1]]
        return CacheEvent(
            CacheEventKind.STORED, self.prefix(block_hashes[-1]), block_tokens=len(last.tokens)
        )

    def on_removed(self, block_hashes: list[BlockHash], medium: str = GPU) -> list[CacheEvent]:
        out = []
        for block_hash in block_hashes:
            block = self._blocks.get(block_hash)
            left = block.media.get(medium, 0) if block is not None else 0
            if block is None or not left:
                where = "" if medium == GPU else f" in {medium}"
                out.append(
                    CacheEvent(
                        CacheEventKind.UNMAPPED,
                        detail=f"BlockRemoved{where} of unknown block {_short(block_hash)}",
                    )
                )
                continue
            if left > 1:
                block.media[medium] = left - 1
            else:
                del block.media[medium]
            if block.media:
                continue  # still held: another medium, or another copy in this one
            out.append(
                CacheEvent(
                    CacheEventKind.EVICTED, self.prefix(block_hash), block_tokens=len(block.tokens)
                )
            )
            self._forget_if_unused(block_hash)
        return out

    def on_cleared(self) -> CacheEvent:
        self._blocks.clear()
        return CacheEvent(CacheEventKind.CLEARED)

    def prefix(self, block_hash: BlockHash) -> tuple[int, ...]:
        """All tokens from the start of the prompt through ``block_hash``."""
        parts = []
        node: BlockHash | None = block_hash
        while node is not None:
            block = self._blocks[node]
            parts.append(block.tokens)
            node = block.parent
        return tuple(t for part in reversed(parts) for t in part)

    def _put(
        self, block_hash: BlockHash, parent: BlockHash | None, tokens: tuple[int, ...], medium: str
    ) -> None:
        block = self._blocks.get(block_hash)
        if block is None:
            block = self._blocks[block_hash] = _Block(parent, tokens)
            if parent is not None:
                self._blocks[parent].children += 1
        # Known already (recomputed after eviction, or stored in a second medium): same content
        # and parent, one more announcement to remove before it is gone.
        block.announce(medium)

    def _forget_if_unused(self, block_hash: BlockHash) -> None:
        """Drop removed blocks no cached child needs for its prefix, walking up the chain."""
        node: BlockHash | None = block_hash
        while node is not None:
            block = self._blocks[node]
            if not block.removed or block.children > 0:
                return
            del self._blocks[node]
            node = block.parent
            if node is not None:
                self._blocks[node].children -= 1


def _short(block_hash: BlockHash) -> str:
    text = block_hash.hex() if isinstance(block_hash, bytes) else str(block_hash)
    return text[:16]


class KVEventSubscriber:
    """Receives vLLM's KV event batches over ZMQ and maps them with a ``BlockPrefixMap``.

    The SUB socket binds first (``tcp://127.0.0.1:<free port>``) and vLLM's publisher connects to
    it, so there is no port race. ZMQ PUB/SUB still drops what is sent before the subscription
    reaches the publisher (vLLM's first batch, measured), so a gap in the sequence numbers asks
    vLLM's replay socket (ROUTER on an ipc path) for the missing batches; what even the replay
    buffer no longer holds becomes an ``UNMAPPED`` event saying how many batches were lost."""

    #: Longest wait for a replay answer; the publisher thread serves it between batches.
    REPLAY_TIMEOUT_S = 2.0

    def __init__(self, host: str = "127.0.0.1") -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        self._zmq = zmq
        self._ctx: Any = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.bind(f"tcp://{host}:0")
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay_endpoint = (
            f"ipc://{tempfile.gettempdir()}/preble-kv-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        self._replay: Any = None
        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self._next_seq = 0
        self.map = BlockPrefixMap()
        self.batches = 0
        self.replayed = 0
        self._probes_left = 0

    def drain(self) -> list[CacheEvent]:
        """Everything received so far, mapped; never blocks (except to replay a gap)."""
        out: list[CacheEvent] = []
        while True:
            try:
                frames = self._sock.recv_multipart(self._zmq.NOBLOCK)
            except self._zmq.Again:
                if self._probes_left > 0 and self.batches == 0:
                    self._probes_left -= 1
                    out.extend(self._replay_until(None))
                return out
            if len(frames) != 3:
                out.append(
                    CacheEvent(
                        CacheEventKind.UNMAPPED, detail=f"KV event message of {len(frames)} frames"
                    )
                )
                continue
            _, seq_bytes, payload = frames
            seq = int.from_bytes(seq_bytes, "big", signed=True)
            if seq < self._next_seq:
                continue  # already seen through a replay
            if seq > self._next_seq:
                out.extend(self._replay_until(seq))
            out.extend(self._apply(seq, payload))

    def expect_events(self) -> None:
        """A request finished: if no batch has arrived yet, the first one may have been sent
        before the subscription took; the next few drains ask the replay buffer for it."""
        if self.batches == 0:
            self._probes_left = 2

    def _apply(self, seq: int, payload: bytes) -> list[CacheEvent]:
        self._next_seq = seq + 1
        try:
            batch = self._decoder.decode(payload)
        except Exception as exc:  # a payload we cannot decode is reported, not fatal
            return [CacheEvent(CacheEventKind.UNMAPPED, detail=f"undecodable batch {seq}: {exc}")]
        self.batches += 1
        return self.map.apply(batch.events)

    def _replay_until(self, seq: int | None) -> list[CacheEvent]:
        """Fetch batches ``_next_seq .. seq - 1`` (``None``: all it has) from vLLM's replay
        buffer."""
        zmq = self._zmq
        out: list[CacheEvent] = []
        if self._replay is None:
            self._replay = self._ctx.socket(zmq.DEALER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.connect(self.replay_endpoint)
        self._replay.send_multipart((b"", self._next_seq.to_bytes(8, "big")))
        while self._replay.poll(int(self.REPLAY_TIMEOUT_S * 1000)):
            frames = self._replay.recv_multipart()
            if len(frames) != 4:
                continue
            _, _, seq_bytes, payload = frames
            got = int.from_bytes(seq_bytes, "big", signed=True)
            if got < 0:  # vLLM's end-of-replay marker
                break
            if self._next_seq <= got and (seq is None or got < seq):
                self.replayed += 1
                out.extend(self._apply(got, payload))
        if seq is not None and self._next_seq < seq:
            out.append(
                CacheEvent(
                    CacheEventKind.UNMAPPED,
                    detail=f"lost KV event batches {self._next_seq}..{seq - 1} (not in replay)",
                )
            )
        return out

    def close(self) -> None:
        self._sock.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        path = self.replay_endpoint.removeprefix("ipc://")
        if os.path.exists(path):
            os.unlink(path)
