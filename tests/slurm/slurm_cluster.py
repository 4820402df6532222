"""A real single-node Slurm cluster (slurmctld + slurmd) started inside the test run.

Everything lives in one temporary folder (config, state, spool, logs, pid files) and both daemons
run in the foreground as our own child processes, so stopping them is terminating two pids we
started; free ports keep a system Slurm (or a second test run) out of the way. Needs root (the
daemons run as SlurmUser=root, auth/none) and the Debian packages slurmctld, slurmd, slurm-client.
See ../shared/ci/slurm-recipe.md for what this was measured on.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")


def missing_tools() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_hardware() -> dict[str, int]:
    """CPUs, sockets, cores, threads and memory of this machine as slurmd sees them."""
    out = subprocess.run(
        ["slurmd", "-C"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    fields = dict(re.findall(r"(\w+)=(\d+)", out))
    return {
        "CPUs": int(fields["CPUs"]),
        "Sockets": int(fields.get("SocketsPerBoard", fields.get("Sockets", 1))),
        "CoresPerSocket": int(fields["CoresPerSocket"]),
        "ThreadsPerCore": int(fields["ThreadsPerCore"]),
        "RealMemory": int(fields["RealMemory"]),
    }


class SlurmCluster:
    """``start()`` the daemons, ``sbatch()`` jobs, ``stop()`` (always; also on failures)."""

    def __init__(self, root: Path, node: str = "localhost") -> None:
        self.root = root
        self.node = node
        self.conf = root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        for sub in ("ctld", "d", "log", "run"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        # A fresh cluster would number its jobs from 1 every time, and the mpich wheel names its
        # shared-memory segment after the PMI job id ("1.0"): a segment left in /dev/shm by a job
        # killed earlier (a failed run's cleanup) then hangs the next job 1's MPI_Init (seen
        # here, spinning for 10 minutes). A random first id never repeats one.
        self.first_job_id = random.SystemRandom().randrange(1000, 60_000_000)

    def write_conf(self) -> None:
        hw = node_hardware()
        mem = max(1000, hw["RealMemory"] - 512)
        r = self.root
        self.conf.write_text(f"""\
ClusterName=preblet
FirstJobId={self.first_job_id}
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=30
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmdSpoolDir={r}/d
StateSaveLocation={r}/ctld
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={hw["CPUs"]} Sockets={hw["Sockets"]} \
CoresPerSocket={hw["CoresPerSocket"]} ThreadsPerCore={hw["ThreadsPerCore"]} RealMemory={mem} \
State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout_s: float = 60.0) -> None:
        self.write_conf()
        # -D: foreground (our child, our pid); -c: cold start, no state from an earlier run.
        self.procs["slurmctld"] = self._spawn(["slurmctld", "-D", "-c"], "slurmctld.out")
        self.wait_for(
            lambda: self._run(["scontrol", "ping"], check=False).returncode == 0,
            timeout_s,
            "slurmctld to answer `scontrol ping`",
        )
        self.procs["slurmd"] = self._spawn(["slurmd", "-D", "-N", self.node], "slurmd.out")
        self.wait_for(lambda: self.node_state() == "idle", timeout_s, "the node to be idle")

    def _spawn(self, cmd: list[str], out_name: str) -> subprocess.Popen:
        out = open(self.root / "log" / out_name, "wb")  # noqa: SIM115 (closed with the process)
        return subprocess.Popen(
            cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _run(
        self,
        cmd: list[str],
        check: bool = True,
        timeout_s: float = 30.0,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=check,
            cwd=cwd,
        )

    def wait_for(self, cond, timeout_s: float, what: str, interval_s: float = 0.3) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.returncode} while waiting for "
                        f"{what}:\n{self.daemon_logs()}"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out after {timeout_s:.0f} s waiting for {what}\n{self.daemon_logs()}"
                )
            time.sleep(interval_s)

    def node_state(self) -> str:
        res = self._run(["sinfo", "-h", "-o", "%T"], check=False)
        return res.stdout.strip().rstrip("*~#")

    def sbatch(self, script: Path, args: list[str], cwd: Path, env: dict[str, str]) -> str:
        res = self._run(["sbatch", "--parsable", *args, str(script)], cwd=cwd, env=env, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        res = self._run(["scontrol", "show", "job", "-o", job_id], check=False)
        return dict(re.findall(r"(\w+)=(\S*)", res.stdout))

    def job_done(self, job_id: str) -> bool:
        res = self._run(["squeue", "-h", "-j", job_id], check=False)
        return res.returncode == 0 and not res.stdout.strip() or "Invalid job id" in res.stderr

    def prepare_scancel(self, *args: str) -> PendingCommand:
        """A ``scancel`` started now that runs only on ``release()`` (no fork at that moment)."""
        proc = subprocess.Popen(
            ["bash", "-c", 'read -r _ && exec scancel "$@"', "scancel", *args],
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        return PendingCommand(proc)

    def daemon_logs(self, tail: int = 30) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name} ---\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self, timeout_s: float = 30.0) -> None:
        """TERM both daemons (by the pids we started) and wait; KILL what is left."""
        for name in ("slurmd", "slurmctld"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


class PendingCommand:
    """A command waiting on its stdin; ``release()`` lets it run and checks that it succeeded."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def release(self, timeout_s: float = 30.0) -> None:
        output, _ = self.proc.communicate("go\n", timeout=timeout_s)
        if self.proc.returncode != 0:
            raise RuntimeError(f"{self.proc.args} exited {self.proc.returncode}: {output}")

    def discard(self) -> None:
        """Never run it (the test failed before the signal): end the waiting shell."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
