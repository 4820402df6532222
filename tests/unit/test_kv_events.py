"""Mapping vLLM KV events (block hashes) to token prefixes, with synthetic events.

The look-alike event classes carry vLLM's class names and fields; the real msgspec types and the
ZMQ path are tested in tests/e2e/test_engine.py."""

from __future__ import annotations

from dataclasses import dataclass

from preble_hpc.messages import CacheEventKind as K
from preble_hpc.worker_rank.kv_events import BlockPrefixMap
from preble_hpc.worker_rank.worker import PrefixMirror

B = 4  # block size


@dataclass
class BlockStored:
    block_hashes: list
    parent_block_hash: object
    token_ids: list
    block_size: int = B
    medium: str | None = None


@dataclass
class BlockRemoved:
    block_hashes: list
    medium: str | None = None


@dataclass
class AllBlocksCleared:
    pass


def toks(start, n=B):
    return list(range(start, start + n))


def summary(events):
    return [(e.kind, e.token_ids, e.block_tokens) for e in events]


def test_stored_batch_reports_the_whole_prefix_through_its_last_block():
    m = BlockPrefixMap()
    ev = m.apply([BlockStored([1, 2], None, toks(0, 2 * B))])
    assert summary(ev) == [(K.STORED, tuple(range(8)), 8)]
    ev = m.apply([BlockStored([3], 2, toks(8))])
    assert summary(ev) == [(K.STORED, tuple(range(12)), 4)]
    assert m.prefix(3) == tuple(range(12))


def test_removed_block_reports_the_prefix_through_that_block():
    m = BlockPrefixMap()
    m.apply([BlockStored([1, 2, 3], None, toks(0, 3 * B))])
    ev = m.apply([BlockRemoved([3, 2])])
    assert summary(ev) == [(K.EVICTED, tuple(range(12)), 4), (K.EVICTED, tuple(range(8)), 4)]


def test_branches_share_their_parent_prefix():
    m = BlockPrefixMap()
    m.apply([BlockStored([1], None, toks(0))])
    ev = m.apply([BlockStored([2], 1, toks(100)), BlockStored([3], 1, toks(200))])
    assert [e.token_ids for e in ev] == [
        tuple(toks(0) + toks(100)),
        tuple(toks(0) + toks(200)),
    ]


def test_parent_evicted_before_child_still_maps_the_child_later():
    m = BlockPrefixMap()
    m.apply([BlockStored([1, 2], None, toks(0, 2 * B))])
    assert summary(m.apply([BlockRemoved([1])])) == [(K.EVICTED, tuple(range(4)), 4)]
    assert len(m) == 2  # block 1 is kept: block 2 still names it as parent
    assert summary(m.apply([BlockRemoved([2])])) == [(K.EVICTED, tuple(range(8)), 4)]
    assert len(m) == 0  # both gone once nothing needs them


def test_removed_blocks_are_forgotten_when_no_child_needs_them():
    m = BlockPrefixMap()
    m.apply([BlockStored([1, 2], None, toks(0, 2 * B))])
    m.apply([BlockRemoved([2])])
    assert len(m) == 1
    m.apply([BlockRemoved([1])])
    assert len(m) == 0


def test_block_stored_again_after_eviction_is_live_again():
    m = BlockPrefixMap()
    m.apply([BlockStored([1, 2], None, toks(0, 2 * B))])
    m.apply([BlockRemoved([1])])
    ev = m.apply([BlockStored([1], None, toks(0))])
    assert summary(ev) == [(K.STORED, tuple(range(4)), 4)]
    assert summary(m.apply([BlockRemoved([1])])) == [(K.EVICTED, tuple(range(4)), 4)]


def test_unknown_parent_and_unknown_removal_are_unmapped_not_guessed():
    m = BlockPrefixMap()
    ev = m.apply([BlockStored([5], 4, toks(0)), BlockRemoved([9])])
    assert [e.kind for e in ev] == [K.UNMAPPED, K.UNMAPPED]
    assert "unknown parent" in ev[0].detail
    assert "unknown block" in ev[1].detail
    assert len(m) == 0
    # children of an unmapped block are unmapped too
    assert m.apply([BlockStored([6], 5, toks(4))])[0].kind is K.UNMAPPED


def test_removing_twice_is_unmapped_the_second_time():
    m = BlockPrefixMap()
    m.apply([BlockStored([1, 2], None, toks(0, 2 * B))])
    m.apply([BlockRemoved([1])])
    assert m.apply([BlockRemoved([1])])[0].kind is K.UNMAPPED


def test_token_count_mismatch_is_unmapped():
    m = BlockPrefixMap()
    ev = m.apply([BlockStored([1, 2], None, toks(0, B + 1))])
    assert ev[0].kind is K.UNMAPPED and "carries 5 tokens" in ev[0].detail


def test_all_blocks_cleared_forgets_everything():
    m = BlockPrefixMap()
    m.apply([BlockStored([1], None, toks(0))])
    assert summary(m.apply([AllBlocksCleared()])) == [(K.CLEARED, (), 0)]
    assert len(m) == 0
    assert m.apply([BlockRemoved([1])])[0].kind is K.UNMAPPED


def test_unknown_event_type_is_unmapped():
    class SomethingNew:
        pass

    ev = BlockPrefixMap().apply([SomethingNew()])
    assert ev[0].kind is K.UNMAPPED and "SomethingNew" in ev[0].detail


def test_bytes_hashes_work_like_ints():
    m = BlockPrefixMap()
    m.apply([BlockStored([b"\x01" * 32], None, toks(0))])
    ev = m.apply([BlockStored([b"\x02" * 32], b"\x01" * 32, toks(4)), BlockRemoved([b"\x03"])])
    assert ev[0].token_ids == tuple(range(8))
    assert ev[1].kind is K.UNMAPPED and ev[1].detail.endswith("block 03")


def test_a_block_host_memory_keeps_is_evicted_only_when_it_leaves_host_memory_too():
    m = BlockPrefixMap()
    m.apply([BlockStored([1, 2], None, toks(0, 2 * B), medium="GPU")])
    ev = m.apply([BlockStored([1, 2], None, toks(0, 2 * B), medium="CPU")])
    assert summary(ev) == [(K.STORED, tuple(range(8)), 8)]
    assert m.apply([BlockRemoved([2, 1], medium="GPU")]) == []  # offloaded: still the rank's
    ev = m.apply([BlockRemoved([2], medium="CPU")])
    assert summary(ev) == [(K.EVICTED, tuple(range(8)), 4)]
    # Loaded back to the GPU: a second medium again, so the host's eviction is not the rank's.
    m.apply([BlockStored([1], None, toks(0), medium="GPU")])
    assert m.apply([BlockRemoved([1], medium="CPU")]) == []
    assert summary(m.apply([BlockRemoved([1])])) == [(K.EVICTED, tuple(range(4)), 4)]
    assert len(m) == 0


def test_a_block_announced_twice_in_a_medium_needs_two_removals():
    # vLLM can cache two physical blocks of one hash (two requests filled it at once); each is
    # stored and removed on its own, and the hash is gone only with the last.
    m = BlockPrefixMap()
    m.apply([BlockStored([1], None, toks(0)), BlockStored([1], None, toks(0))])
    assert m.apply([BlockRemoved([1])]) == []
    assert [e.kind for e in m.apply([BlockRemoved([1])])] == [K.EVICTED]


def test_placeholder_stores_without_tokens_take_known_blocks_only():
    m = BlockPrefixMap()
    m.apply([BlockStored([1, 2], None, toks(0, 2 * B))])
    ev = m.apply([BlockStored([2], None, [], block_size=0, medium="CPU")])
    assert summary(ev) == [(K.STORED, tuple(range(8)), 4)]
    assert m.apply([BlockRemoved([2])]) == []  # the CPU copy holds it
    ev = m.apply([BlockStored([9], None, [], block_size=0, medium="CPU")])
    assert ev[0].kind is K.UNMAPPED and "BlockStored in CPU without tokens" in ev[0].detail
    ev = m.apply([BlockRemoved([1], medium="CPU")])
    assert ev[0].kind is K.UNMAPPED and "BlockRemoved in CPU of unknown block" in ev[0].detail


def test_prefix_mirror_follows_stored_and_evicted_events():
    m, mirror = BlockPrefixMap(), PrefixMirror(B)
    for e in m.apply([BlockStored([1, 2, 3], None, toks(0, 3 * B))]):
        mirror.apply(e)
    assert mirror.cached_tokens(toks(0, 14)) == 12
    assert mirror.cached_tokens(toks(0, 6)) == 4  # only whole blocks count
    assert mirror.cached_tokens([99] + toks(1, 11)) == 0
    for e in m.apply([BlockRemoved([2])]):
        mirror.apply(e)
    assert mirror.cached_tokens(toks(0, 12)) == 4  # block 3 is unreachable without block 2
    for e in m.apply([AllBlocksCleared()]):
        mirror.apply(e)
    assert mirror.cached_tokens(toks(0, 12)) == 0 and len(mirror) == 0
