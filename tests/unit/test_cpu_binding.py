"""How the worker ranks of one CPU-only node split its cores between their engines."""

from __future__ import annotations

import pytest

from preble_hpc.config import ConfigError, EngineConfig
from preble_hpc.transport import InProcessTransport, NodePeer
from preble_hpc.worker_rank.cpu_binding import format_cpu_list, worker_cores


def node(cpus: set[int], ranks=(0, 1, 2)) -> list[NodePeer]:
    return [NodePeer(r, frozenset(cpus)) for r in ranks]


def test_two_workers_sharing_two_cores_get_one_each_and_rank0_is_left_out():
    peers = node({0, 1})
    assert worker_cores(1, peers) == (0,)
    assert worker_cores(2, peers) == (1,)
    assert worker_cores(0, peers) is None


def test_the_remainder_goes_to_the_first_workers_in_rank_order():
    peers = node({0, 1, 2, 3, 4}, ranks=(0, 3, 5))  # ranks need not be contiguous
    assert worker_cores(3, peers) == (0, 1, 2)
    assert worker_cores(5, peers) == (3, 4)


def test_more_workers_than_cores_wrap_around():
    peers = node({4, 6}, ranks=(0, 1, 2, 3))
    assert [worker_cores(r, peers) for r in (1, 2, 3)] == [(4,), (6,), (4,)]


def test_a_node_without_rank0_splits_among_all_its_ranks():
    peers = node({0, 1, 2, 3}, ranks=(4, 5))
    assert worker_cores(4, peers) == (0, 1)
    assert worker_cores(5, peers) == (2, 3)


def test_vllm_keeps_its_choice_for_a_lone_worker_or_launcher_bound_tasks():
    assert worker_cores(1, node({0, 1, 2, 3}, ranks=(0, 1))) is None
    bound = [NodePeer(0, frozenset({0})), NodePeer(1, frozenset({1})), NodePeer(2, frozenset({2}))]
    assert worker_cores(1, bound) is None
    assert worker_cores(1, []) is None  # unknown topology (in-process transport)
    assert worker_cores(1, node(set())) is None
    assert InProcessTransport.create(3)[1].node_peers == ()


def test_format_cpu_list_uses_ranges():
    assert format_cpu_list([5, 0, 1, 2, 7, 8, 1]) == "0-2,5,7-8"
    assert format_cpu_list([3]) == "3"


@pytest.mark.parametrize("bad", [(), (-1,), (0, "1")])
def test_engine_config_rejects_bad_cpu_cores(bad):
    with pytest.raises(ConfigError, match="cpu_cores"):
        EngineConfig(model="m", cpu_cores=bad)
