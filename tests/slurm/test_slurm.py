"""`sbatch slurm/preble.sbatch` on a real single-node Slurm started by this test (CPU settings:
mpich wheel -> srun --mpi=pmi2, 1 + 2 tasks overcommitted on the cores, tiny model): the job
writes preble-<jobid>.addr, serves gRPC, and on `scancel --batch --signal=TERM` (what
`#SBATCH --signal=B:TERM@120` does before the time limit) drains the open request, stops the
workers and ends COMPLETED with exit code 0."""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from slurm_cluster import SlurmCluster, missing_tools

from preble_hpc._proto import preble_pb2 as pb
from preble_hpc._proto import preble_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.mpi]

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "slurm" / "preble.sbatch"
DRAIN_CLIENT = Path(__file__).resolve().parent / "drain_client.py"
BATCH_SBATCH = ROOT / "slurm" / "preble-batch.sbatch"
BIN = Path(sys.executable).parent
ENGINE_FLAGS = "--enforce-eager --dtype float32 --kv-cache-gib 1 --seed 0 --max-model-len 4096"
# The drain check must still have a request open when SIGTERM reaches rank 0 (scancel ->
# slurmctld -> batch shell -> rank 0, well under a second on an idle machine). While vLLM engines
# decode on this 2-core machine, every other process crawls (each engine keeps 2+ cores busy and
# GIL hand-offs wait a scheduling round). With two engines decoding, a GetStats took 10-20 s,
# starting the drain client took 80 s, and the scancel chain 64 s; in CI the signal once came
# after both drain requests had streamed for a minute. So: one drain request (one engine busy,
# a core left for rank 0, the client and Slurm), a client started and connected before it is
# sent, a scancel forked ahead, and a long request (DRAIN_TOKENS past the tiny model's 4096
# positions, which vLLM allows on request: its weights are random anyway), 80-120 s of
# decoding; the signal goes out as soon as an engine's log shows the request running. Not on the
# client's first token: a CI run's client read it ~50 s after the engine began (rank 0 had sent
# it), so late that the signal came after the request ended; nor on GetStats, which once took
# over 30 s to answer while the engine decoded. And the workers run at nice 19 (_niced_workers):
# even with one engine busy, a CI run's test, client and scancel chain stalled until the request
# ended (the signal found 0 open). Decode speed varies by host: on a slow day the same VM took
# 314 s for 28k of the 30k tokens (the decode slows as the context grows), so rank 0's drain
# bound (DRAIN_TIMEOUT_S) is far above any decode seen; it costs nothing where decode is fast,
# since the drain ends when the request does.
DRAIN_MAX_MODEL_LEN = 30720
DRAIN_TOKENS = 30000
DRAIN_REQUESTS = 1
DRAIN_TIMEOUT_S = 900
SCANCEL_TIMEOUT_S = 180
#: CPU settings: one allocated task slot, three tasks overcommitted on it (2 cores here).
SBATCH_ARGS = [
    "--nodes=1",
    "--ntasks-per-node=1",
    "--cpus-per-task=1",
    "--overcommit",
    "--gres=none",
    "--time=20",
]
STARTUP_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_tools()
    if "slurmctld" in missing:
        pytest.skip(
            "slurmctld is not installed (apt-get install -y --no-install-recommends "
            "slurmctld slurmd slurm-client; .ci/run installs it)"
        )
    assert not missing, f"Slurm is partly installed; missing: {missing}"
    assert os.geteuid() == 0, "the test Slurm runs its daemons as root (SlurmUser=root)"
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_both_sbatch_scripts_are_valid_bash_with_the_same_shared_part():
    for script in (SBATCH, BATCH_SBATCH):
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)

    def shared(path: Path) -> str:
        text = path.read_text()
        start = text.index("\n", text.index("-------- shared with"))
        return text[start : text.index("-------- end of the shared part")]

    assert shared(SBATCH) == shared(BATCH_SBATCH), "edit the shared part of both scripts alike"


def _job_env(tiny_model: Path, submit_dir: Path) -> dict[str, str]:
    return {
        "PREBLE_MODEL": str(tiny_model),
        "PREBLE_BIN": str(BIN / "preble-hpc"),
        "PREBLE_MPI": "pmi2",  # the mpich wheel; Open MPI would be pmix
        "PREBLE_GPU_BIND": "none",
        "PREBLE_WORKERS_PER_NODE": "2",
        "PREBLE_SRUN_ARGS": "--overcommit",
        "PREBLE_HOST": "127.0.0.1",
        "PREBLE_ARGS": ENGINE_FLAGS,
        "PREBLE_DRAIN_TIMEOUT_S": "300",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "PREBLE_CONFIG": str(submit_dir / "preble.env"),
    }


class _DrainClient:
    """drain_client.py in its own process; its JSON lines are read on a thread, so waiting for
    one never depends on pipe buffering."""

    def __init__(self, addr: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(DRAIN_CLIENT), addr, str(DRAIN_REQUESTS), str(DRAIN_TOKENS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.records: list[dict] = []  # the lines, parsed
        self._events: queue.SimpleQueue[dict | None] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            record = json.loads(line)
            self.lines.append(line)
            self.records.append(record)
            self._events.put(record)
        self._events.put(None)

    def wait_for(self, event: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                record = self._events.get(timeout=left)
            except queue.Empty:
                break
            if record is None:
                err = self.proc.stderr.read()[-3000:]  # type: ignore[union-attr]
                raise RuntimeError(f"drain client exited before {event!r}: {err}")
            if record["event"] == event:
                return
        raise TimeoutError(f"drain client: no {event!r} in {timeout_s} s")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self, timeout_s: float) -> list[dict]:
        """Wait for the client to exit 0; its ``done`` records."""
        self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=30)
        err = self.proc.stderr.read()  # type: ignore[union-attr]
        assert self.proc.returncode == 0, err[-3000:]
        return [r for r in self.records if r["event"] == "done"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def _log_sizes(logs: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in logs.glob("rank-*.log")}


def _wait_engine_running(logs: Path, since: dict[Path, int], timeout_s: float) -> None:
    """Until a worker's vLLM engine logs a running request (its periodic stats line) in what it
    wrote after ``since`` (byte offsets per log)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in logs.glob("rank-*.log"):
            with open(p, "rb") as f:
                f.seek(since.get(p, 0))
                if re.search(rb"Running: [1-9]\d* reqs", f.read()):
                    return
        time.sleep(0.5)
    raise TimeoutError(f"no engine logged a running request within {timeout_s} s")


def _niced_workers(directory: Path, real_bin: str) -> Path:
    """A PREBLE_BIN that runs the worker ranks (their vLLM engines) at nice 19, rank 0 as is.

    On this 2-core VM a decoding engine's two busy processes delay every other process's
    wakeups: a sleep(0.05) loop beside this test woke up to 37 s late, and in CI the polling
    test, the drain client and the scancel chain all stalled until the request ended. At nice 19
    the engine still decodes, but rank 0, Slurm and the test's processes run first."""
    wrapper = directory / "niced-workers.sh"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$SLURM_PROCID" != 0 ]; then exec nice -n 19 {shlex.quote(real_bin)} "$@"; fi\n'
        f'exec {shlex.quote(real_bin)} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def test_serve_job_answers_grpc_then_drains_on_sigterm(slurm, tiny_model, tmp_path):
    submit_dir = tmp_path / "submit"
    submit_dir.mkdir()
    # Settings may also come from a config file: the policy is set only there.
    (submit_dir / "preble.env").write_text("PREBLE_POLICY=e2\n")
    env = _job_env(tiny_model, submit_dir)
    env["PREBLE_ARGS"] = env["PREBLE_ARGS"].replace(
        "--max-model-len 4096", f"--max-model-len {DRAIN_MAX_MODEL_LEN}"
    )
    env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    env["PREBLE_DRAIN_TIMEOUT_S"] = str(DRAIN_TIMEOUT_S)
    env["PREBLE_BIN"] = str(_niced_workers(submit_dir, env["PREBLE_BIN"]))
    job = slurm.sbatch(SBATCH, SBATCH_ARGS, cwd=submit_dir, env=env)
    addr_file = submit_dir / f"preble-{job}.addr"
    logs = submit_dir / f"preble-{job}.logs"
    out = submit_dir / f"preble-{job}.out"

    def report() -> str:
        parts = [
            f"--- {p.name} ---\n{p.read_text(errors='replace')[-4000:]}"
            for p in [out, *sorted(logs.glob("rank-*.log"))]
            if p.exists()
        ]
        return "\n".join(parts) + f"\n{slurm.job_info(job)}\n{slurm.daemon_logs()}"

    signaller = None
    drain: _DrainClient | None = None
    timeline = ""
    try:
        try:
            slurm.wait_for(
                lambda: addr_file.exists() or slurm.job_done(job),
                STARTUP_TIMEOUT_S,
                "the address file",
                interval_s=0.5,
            )
        except TimeoutError:
            pytest.fail(f"no address file after {STARTUP_TIMEOUT_S} s\n{report()}")
        assert addr_file.exists(), f"the job ended before serving\n{report()}"
        addr = addr_file.read_text().strip()
        assert addr.startswith("127.0.0.1:"), addr
        # Requests open when the stop signal comes must still finish in full. The drain request
        # comes from a separate process (drain_client.py), started now while the engines idle;
        # scancel is forked ahead and released through its stdin once an engine logs it running.
        drain = _DrainClient(addr)
        signaller = slurm.prepare_scancel("--batch", "--signal=TERM", job)

        with grpc.insecure_channel(addr) as channel:
            stub = pb_grpc.PrebleStub(channel)
            for i in range(4):
                final = list(
                    stub.Generate(
                        pb.GenerateRequest(
                            prompt=f"slurm request {i}", sampling=pb.SamplingParams(max_tokens=4)
                        ),
                        timeout=120,
                    )
                )[-1].final
                assert final.rank in (1, 2) and final.usage.completion_tokens >= 1
            stats = stub.GetStats(pb.GetStatsRequest(), timeout=30)
            assert [r.rank for r in stats.ranks] == [1, 2] and stats.policy == "e2"

        drain.wait_for("ready", 120)
        before = _log_sizes(logs)
        drain.go()
        _wait_engine_running(logs, before, timeout_s=180)
        signalled_at = time.time()
        signaller.release(timeout_s=SCANCEL_TIMEOUT_S)
        done = drain.finish(timeout_s=DRAIN_TIMEOUT_S + 120)
        timeline = f"--- drain client (scancel released at {signalled_at:.3f}) ---\n"
        timeline += "".join(drain.lines)
        outcomes = [(r["code"], r["finish_reason"], r["tokens"]) for r in done]
        # Open at the signal: finished in full. Not yet admitted when rank 0 began to drain:
        # refused whole, UNAVAILABLE before any token.
        finished = outcomes.count(("OK", "length", DRAIN_TOKENS))
        refused = outcomes.count(("UNAVAILABLE", None, 0))
        assert finished >= 1 and finished + refused == len(done) == DRAIN_REQUESTS, timeline

        slurm.wait_for(lambda: slurm.job_done(job), 300, "the job to end", interval_s=0.5)
        info = slurm.job_info(job)
        assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", report()
        rank0 = (logs / "rank-0.log").read_text(errors="replace")
        # Rank 0's own count of the streams open at the signal: at least one (the signal went out
        # mid-stream), each finished in full; every request the client finished was served.
        drained = re.search(
            r"draining: health NOT_SERVING, (\d+) request\(s\) open[\s\S]*?"
            r"drained: all \1 open request\(s\) finished \((\d+) served in total\)",
            rank0,
        )
        assert drained and 1 <= int(drained[1]) <= finished, report() + timeline
        assert int(drained[2]) == 4 + finished, report() + timeline
        assert "exited with code 0" in out.read_text(), report()
        assert not addr_file.exists()
        assert {p.name for p in logs.glob("rank-*.log")} == {
            "rank-0.log",
            "rank-1.log",
            "rank-2.log",
        }
    except (TimeoutError, RuntimeError, grpc.RpcError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"{type(exc).__name__}: {exc}\n{report()}\n{timeline}")
    finally:
        if signaller is not None:
            signaller.discard()
        if drain is not None:
            drain.stop()
        if not slurm.job_done(job):
            subprocess.run(["scancel", job], env=slurm.env, timeout=30, check=False)
            try:
                slurm.wait_for(lambda: slurm.job_done(job), 90, "the cancelled job to end")
            except (TimeoutError, RuntimeError):
                pass
        if os.environ.get("PREBLE_KEEP_SLURM_LOGS"):
            shutil.copytree(submit_dir, Path(os.environ["PREBLE_KEEP_SLURM_LOGS"]) / job)


def test_batch_job_writes_every_result_and_completes(slurm, tiny_model, tmp_path):
    submit_dir = tmp_path / "submit"
    submit_dir.mkdir()
    (submit_dir / "preble.env").write_text("PREBLE_POLICY=e2\n")
    prompts = submit_dir / "prompts.txt"
    prompts.write_text("".join(f"batch prompt number {i}\n" for i in range(6)))
    env = {
        **_job_env(tiny_model, submit_dir),
        "PREBLE_INPUT": str(prompts),
        "PREBLE_ARGS": f"{ENGINE_FLAGS} --max-tokens 8",
    }
    job = slurm.sbatch(BATCH_SBATCH, SBATCH_ARGS, cwd=submit_dir, env=env)
    out = submit_dir / f"preble-batch-{job}.out"
    try:
        slurm.wait_for(
            lambda: slurm.job_done(job), STARTUP_TIMEOUT_S, "the batch job to end", interval_s=1.0
        )
    finally:
        if not slurm.job_done(job):
            subprocess.run(["scancel", job], env=slurm.env, timeout=30, check=False)
    info = slurm.job_info(job)
    log = out.read_text(errors="replace") if out.exists() else "(no job output)"
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", log
    results = [
        json.loads(line) for line in (submit_dir / "prompts.results.jsonl").read_text().splitlines()
    ]
    assert sorted(r["id"] for r in results) == [f"line-{i}" for i in range(1, 7)]
    assert all(r["completion_tokens"] >= 1 and r["rank"] in (1, 2) for r in results)
    assert (submit_dir / f"preble-{job}.logs" / "summary.json").exists()
