"""How rank 0 and the worker ranks exchange ``messages``: one interface, two implementations.

``MpiTransport`` is the only importer of mpi4py in the project. ``InProcessTransport`` connects n
endpoints in memory (unit tests, the simulator, threads standing in for ranks).

Both batch: ``send`` only queues, ``flush`` ships each destination's queue as ONE pickled list.
A worker step produces dozens of small messages (token deltas, cache events); one MPI message per
destination and step keeps the per-message latency (~3 us) from adding up::

    send(1, a) send(1, b) send(2, c) flush()  ->  isend([a, b] -> 1), isend([c] -> 2)

An MPI rank blocked in ``recv`` or spinning on ``Iprobe`` burns a whole core, and no MPI setting
stops that. ``poll(timeout_s)`` therefore probes, and while nothing arrives sleeps between probes,
doubling the sleep from ``_MIN_SLEEP_S`` up to ``idle_sleep_s``; traffic resets it. A busy rank
never sleeps, an idle one costs 1-2 % of a core and at most ``idle_sleep_s`` of extra latency.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

#: MPI tag of every preble message batch (one tag: ordering per source is then guaranteed).
_TAG = 7
#: First sleep after an empty probe; doubled up to ``idle_sleep_s`` while idle.
_MIN_SLEEP_S = 50e-6

#: Environment variables in which MPI launchers announce the world size they started.
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS")


@dataclass(frozen=True, slots=True)
class NodePeer:
    """One rank of the job on this node, and the CPUs it may run on (empty: unknown)."""

    rank: int
    cpus: frozenset[int]


def _allowed_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


class TransportError(RuntimeError):
    """The transport cannot work as launched (e.g. mismatched MPI libraries)."""


class Transport(Protocol):
    """Point-to-point message exchange between ranks ``0..size-1``."""

    rank: int
    size: int
    node_peers: tuple[NodePeer, ...]
    """The ranks on this rank's node (itself included) and their CPUs; empty when unknown."""

    def send(self, dest: int, msg: object) -> None:
        """Queue ``msg`` for ``dest``; nothing leaves before ``flush``."""
        ...

    def flush(self) -> None:
        """Ship every destination's queued messages as one batch each, without blocking."""
        ...

    def poll(self, timeout_s: float = 0.0) -> list[tuple[int, object]]:
        """Received ``(source, msg)`` pairs in arrival order; waits up to ``timeout_s`` for the
        first one (0: just look)."""
        ...

    def close(self) -> None:
        """Flush and release resources; the transport is unusable afterwards."""
        ...


def launched_world_size(environ: dict[str, str] | os._Environ[str] | None = None) -> int | None:
    """World size the launcher (mpiexec, mpirun, srun) says it started, or None when unknown."""
    env = os.environ if environ is None else environ
    for name in _LAUNCHER_SIZE_VARS:
        value = env.get(name, "")
        if value.isdigit():
            return int(value)
    return None


class _AdaptiveSleep:
    """Sleep that doubles while idle and resets on traffic."""

    def __init__(self, max_sleep_s: float) -> None:
        self.max_sleep_s = max_sleep_s
        self._next = _MIN_SLEEP_S

    def reset(self) -> None:
        self._next = _MIN_SLEEP_S

    def sleep(self, remaining_s: float) -> None:
        time.sleep(max(0.0, min(self._next, remaining_s)))
        self._next = min(self._next * 2, self.max_sleep_s)


class MpiTransport:
    """Transport over an mpi4py communicator (``COMM_WORLD`` by default).

    ``expected_size``: fail unless the communicator has exactly this many ranks. Without it, the
    size announced by the launcher's environment is checked: an mpiexec of one MPI with an mpi4py
    built against another starts N separate size-1 jobs that all "succeed".
    """

    def __init__(
        self,
        comm: Any = None,
        *,
        idle_sleep_s: float = 0.001,
        expected_size: int | None = None,
    ) -> None:
        # Imported here, not at module level: a vLLM engine process spawned from a worker
        # re-imports modules, and an MPI_Init there would join the job as a phantom rank.
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        expected = expected_size if expected_size is not None else launched_world_size()
        if expected is not None and expected != self.size:
            raise TransportError(
                f"the launcher started {expected} ranks but mpi4py sees a world of {self.size}: "
                f"mpiexec/srun and mpi4py use different MPI libraries "
                f"(mpi4py: {MPI.Get_library_version().splitlines()[0].strip()}). Launch with "
                f"the mpiexec of the same MPI (the mpich wheel's: .venv/bin/mpiexec), or "
                f"`srun --mpi=pmi2` for mpich / `--mpi=pmix` for Open MPI."
            )
        self.node_peers = self._node_peers()
        self._outbox: dict[int, list[object]] = {}
        self._pending: list[Any] = []  # isend requests not known complete (they own the buffers)
        self._sleep = _AdaptiveSleep(idle_sleep_s)
        self._closed = False

    def _node_peers(self) -> tuple[NodePeer, ...]:
        # One collective, at start only: the workers of a CPU-only node split its cores between
        # their engines (worker_rank/cpu_binding.py).
        node = self.comm.Split_type(self._mpi.COMM_TYPE_SHARED)
        try:
            peers = node.allgather((self.rank, _allowed_cpus()))
        finally:
            node.Free()
        return tuple(NodePeer(rank, frozenset(cpus)) for rank, cpus in peers)

    def send(self, dest: int, msg: object) -> None:
        if not 0 <= dest < self.size or dest == self.rank:
            raise ValueError(f"rank {self.rank}: bad destination {dest} (world size {self.size})")
        self._outbox.setdefault(dest, []).append(msg)

    def flush(self) -> None:
        if self._pending:
            self._pending = [req for req in self._pending if not req.Test()]
        for dest, batch in self._outbox.items():
            if batch:
                self._pending.append(self.comm.isend(batch, dest=dest, tag=_TAG))
        self._outbox.clear()

    def poll(self, timeout_s: float = 0.0) -> list[tuple[int, object]]:
        deadline = time.monotonic() + timeout_s
        status = self._mpi.Status()
        while True:
            received: list[tuple[int, object]] = []
            # Matched probe: the message found is the one received, whatever other threads do.
            while (message := self.comm.improbe(self._mpi.ANY_SOURCE, _TAG, status)) is not None:
                source = status.Get_source()
                received.extend((source, msg) for msg in message.recv())
            if received:
                self._sleep.reset()
                return received
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return received
            self._sleep.sleep(remaining)

    def wait_sent(self, timeout_s: float) -> bool:
        """Wait until every batch sent so far has left this rank; False on timeout (a peer that
        stopped receiving)."""
        self.flush()
        deadline = time.monotonic() + timeout_s
        while self._pending:
            self._pending = [req for req in self._pending if not req.Test()]
            if self._pending and time.monotonic() > deadline:
                return False
            if self._pending:
                time.sleep(0.001)
        return True

    def abort(self, errorcode: int = 1) -> None:
        """Kill the whole MPI job (last resort when a peer cannot be stopped otherwise)."""
        self.comm.Abort(errorcode)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.wait_sent(timeout_s=5.0)
        for req in self._pending:  # a dead peer never receives: do not hang on it
            req.Cancel()
        self._pending = []


class _Hub:
    """Shared state of a group of in-process endpoints: one inbox per rank."""

    def __init__(self, n: int) -> None:
        self.inboxes: list[deque[tuple[int, bytes | list[object]]]] = [deque() for _ in range(n)]
        self.cond = threading.Condition()


class InProcessTransport:
    """Endpoints connected in memory; safe to use from one thread per endpoint.

    ``pickle_messages`` (default on) ships each batch pickled, as MPI does, so a message that
    would not survive the wire fails here too; the simulator turns it off for speed.
    """

    def __init__(self, hub: _Hub, rank: int, *, pickle_messages: bool = True) -> None:
        self._hub = hub
        self.rank = rank
        self.size = len(hub.inboxes)
        self.node_peers: tuple[NodePeer, ...] = ()  # threads, not ranks: no node to share
        self._pickle = pickle_messages
        self._outbox: dict[int, list[object]] = {}
        self._closed = False

    @classmethod
    def create(cls, n: int, *, pickle_messages: bool = True) -> list[InProcessTransport]:
        if n < 1:
            raise ValueError(f"need at least one endpoint, got {n}")
        hub = _Hub(n)
        return [cls(hub, rank, pickle_messages=pickle_messages) for rank in range(n)]

    def send(self, dest: int, msg: object) -> None:
        if self._closed:
            raise TransportError(f"rank {self.rank}: send on a closed transport")
        if not 0 <= dest < self.size or dest == self.rank:
            raise ValueError(f"rank {self.rank}: bad destination {dest} (world size {self.size})")
        self._outbox.setdefault(dest, []).append(msg)

    def flush(self) -> None:
        if not self._outbox:
            return
        with self._hub.cond:
            for dest, batch in self._outbox.items():
                if batch:
                    payload = pickle.dumps(batch, protocol=5) if self._pickle else batch
                    self._hub.inboxes[dest].append((self.rank, payload))
            self._hub.cond.notify_all()
        self._outbox.clear()

    def poll(self, timeout_s: float = 0.0) -> list[tuple[int, object]]:
        inbox = self._hub.inboxes[self.rank]
        deadline = time.monotonic() + timeout_s
        with self._hub.cond:
            while not inbox:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._hub.cond.wait(remaining)
            batches = list(inbox)
            inbox.clear()
        received: list[tuple[int, object]] = []
        for source, payload in batches:
            batch = pickle.loads(payload) if isinstance(payload, bytes) else payload
            received.extend((source, msg) for msg in batch)
        return received

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True
