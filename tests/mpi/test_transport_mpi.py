"""MpiTransport over a real 3-rank mpiexec job (no vLLM): order, batching, idle CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mpi_helpers import run

JOB = Path(__file__).with_name("transport_job.py")


def test_batches_arrive_in_order_and_idle_ranks_do_not_spin(mpiexec):
    import sys

    proc = run([str(mpiexec), "-n", "3", sys.executable, str(JOB)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["size"] == 3 and result["ordered"]
    for rank, cpu_s in result["idle_cpu_s"].items():
        # a rank spinning in Iprobe would use ~1 s of CPU in the 1 s idle window
        assert cpu_s < 0.25 * result["idle_s"], f"rank {rank} used {cpu_s:.3f} s CPU idling"
    # All three ranks share this node and its CPUs (what the workers split between engines).
    cpus = sorted(os.sched_getaffinity(0))
    assert result["node_peers"] == [[r, cpus] for r in range(3)]


def test_mismatched_launch_is_caught(mpiexec, tmp_path):
    """A launcher announcing more ranks than mpi4py sees (mixed MPIs) is an error, not N jobs."""
    import sys

    script = tmp_path / "one.py"
    script.write_text("from preble_hpc.transport import MpiTransport\nMpiTransport()\n")
    proc = run([sys.executable, str(script)], timeout=60, PMI_SIZE="4")
    assert proc.returncode != 0
    assert "different MPI libraries" in proc.stderr
