"""Transport: batching, ordering, polling without spinning, launcher size checks."""

from __future__ import annotations

import threading
import time

import pytest

from preble_hpc.messages import Abort, SamplingSpec, Submit, TokenDelta
from preble_hpc.transport import (
    InProcessTransport,
    MpiTransport,
    TransportError,
    _AdaptiveSleep,
    launched_world_size,
)


def test_inprocess_send_is_queued_until_flush_and_order_is_kept():
    a, b, c = InProcessTransport.create(3)
    a.send(1, Abort("x"))
    a.send(1, Abort("y"))
    a.send(2, Abort("z"))
    assert b.poll() == [] and c.poll() == []
    a.flush()
    assert b.poll() == [(0, Abort("x")), (0, Abort("y"))]
    assert c.poll() == [(0, Abort("z"))]
    assert b.poll() == []


def test_inprocess_round_trips_real_messages_by_value():
    a, b = InProcessTransport.create(2)
    msg = Submit("r", [1, 2, 3], SamplingSpec(max_tokens=4, stop=("x",)), cached_hint=2)
    a.send(1, msg)
    a.flush()
    [(source, got)] = b.poll()
    assert source == 0 and got == msg and got is not msg  # pickled, like MPI


def test_inprocess_unpicklable_message_fails_at_flush_as_over_mpi():
    a, _ = InProcessTransport.create(2)
    a.send(1, lambda: None)
    with pytest.raises(Exception, match="pickle|lambda"):
        a.flush()


def test_bad_destination_is_rejected():
    a, _ = InProcessTransport.create(2)
    with pytest.raises(ValueError, match="bad destination 0"):
        a.send(0, Abort("self"))
    with pytest.raises(ValueError, match="bad destination 5"):
        a.send(5, Abort("nobody"))


def test_poll_waits_for_the_first_message_and_returns_early():
    a, b = InProcessTransport.create(2)

    def later():
        time.sleep(0.05)
        a.send(1, TokenDelta("r", [1], "a"))
        a.flush()

    threading.Thread(target=later).start()
    t0 = time.monotonic()
    got = b.poll(timeout_s=5)
    assert got and time.monotonic() - t0 < 2
    t0 = time.monotonic()
    assert b.poll(timeout_s=0.05) == []
    assert time.monotonic() - t0 >= 0.045


def test_adaptive_sleep_grows_to_the_cap_and_resets():
    s = _AdaptiveSleep(0.004)
    first = s._next
    for _ in range(20):
        s.sleep(0)  # remaining 0: never actually sleeps
    assert s._next == 0.004
    s.reset()
    assert s._next == first


def test_launched_world_size_reads_the_launchers_variables():
    assert launched_world_size({}) is None
    assert launched_world_size({"PMI_SIZE": "3"}) == 3
    assert launched_world_size({"OMPI_COMM_WORLD_SIZE": "5"}) == 5
    assert launched_world_size({"SLURM_STEP_NUM_TASKS": "9"}) == 9


def test_mpi_singleton_mismatch_is_a_clear_error():
    pytest.importorskip("mpi4py")
    with pytest.raises(TransportError, match="different MPI libraries"):
        MpiTransport(expected_size=3)


def test_mpi_idle_poll_sleeps_instead_of_spinning():
    pytest.importorskip("mpi4py")
    t = MpiTransport(idle_sleep_s=0.002, expected_size=1)
    assert (t.rank, t.size) == (0, 1)
    cpu0, wall0 = time.process_time(), time.monotonic()
    assert t.poll(timeout_s=0.5) == []
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    assert wall >= 0.45
    assert cpu < 0.25 * wall, f"idle poll used {cpu:.3f} s CPU in {wall:.3f} s"
    t.close()
