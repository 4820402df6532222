"""The gRPC API of a live `mpiexec -n 3 preble-hpc serve` job with real vLLM engines (CPU, tiny
model): streaming, concurrency, cancellation, deadlines, every invalid input, admission control,
health, reflection, stats, metrics, and a SIGTERM drain at the end.

One job (engine start ~30 s on 2 cores) is shared by the whole module; the drain test runs last
and ends it. The fast, engine-free version of these checks is tests/unit/test_ingress.py."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from invalid_requests import invalid_requests

from preble_hpc._proto import preble_pb2 as pb
from preble_hpc._proto import preble_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
PREBLE = BIN / "preble-hpc"
SERVICE = "preble.v1.Preble"
MAX_MODEL_LEN = 2048
DRAIN_TOKENS = MAX_MODEL_LEN - 64
MAX_INFLIGHT = 40
ENGINE_FLAGS = [
    "--enforce-eager",
    "--dtype",
    "float32",
    "--kv-cache-gib",
    "1",
    "--seed",
    "0",
    "--max-model-len",
    str(MAX_MODEL_LEN),
]
STARTUP_TIMEOUT_S = 600
DECISIONS = {"exploit", "explore", "replicate", "rebalance", "baseline"}


def _metrics_port(log_path: Path) -> int:
    """The port serve logged for its metrics server (``--metrics-port 0`` lets it pick one: a
    port picked by the test and bound later was once taken in between by an engine's socket)."""
    pattern = re.compile(r"Prometheus metrics on http://[^/]*:(\d+)/metrics")
    deadline = time.monotonic() + 60  # mpiexec forwards rank 0's output a little later
    while not (found := pattern.search(log_path.read_text(errors="replace"))):
        assert time.monotonic() < deadline, f"serve logged no metrics address:\n{_tail(log_path)}"
        time.sleep(0.2)
    return int(found.group(1))


def _tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    if not MPIEXEC.exists():
        pytest.skip(f"{MPIEXEC} not found: `make install` installs the mpich wheel")
    d = tmp_path_factory.mktemp("serve")
    addr_file, log_path = d / "server.addr", d / "serve.log"
    cmd = [
        str(MPIEXEC),
        "-n",
        "3",
        str(PREBLE),
        "serve",
        "--model",
        str(tiny_model),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--addr-file",
        str(addr_file),
        "--metrics-port",
        "0",
        "--max-inflight",
        str(MAX_INFLIGHT),
        "--drain-timeout-s",
        "60",
        *ENGINE_FLAGS,
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not addr_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"serve did not write {addr_file} (exit {proc.poll()}):\n{_tail(log_path)}")
        time.sleep(0.2)
    addr = addr_file.read_text().strip()
    channel = grpc.insecure_channel(addr)
    s = SimpleNamespace(
        proc=proc,
        addr=addr,
        addr_file=addr_file,
        log=log_path,
        channel=channel,
        stub=pb_grpc.PrebleStub(channel),
        metrics_port=_metrics_port(log_path),
    )
    yield s
    channel.close()
    if proc.poll() is None:  # the drain test did not run (e.g. -k): stop the job
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def generate(stub, timeout: float = 120, **kw):
    """(text, token ids, number of messages, final) of one streamed request."""
    text, ids, final, n = [], [], None, 0
    for r in stub.Generate(pb.GenerateRequest(**kw), timeout=timeout):
        assert final is None, "a message after the final one"
        n += 1
        if r.HasField("delta"):
            text.append(r.delta.text)
            ids.extend(r.delta.token_ids)
        if r.HasField("final"):
            final = r.final
    assert final is not None
    return "".join(text), ids, n, final


def stats(server) -> pb.GetStatsResponse:
    return server.stub.GetStats(pb.GetStatsRequest(), timeout=30)


def runtime_stats(server) -> dict:
    return json.loads(stats(server).stats_json)["runtime"]


def wait_idle(server, late_before: int | None = None, timeout_s: float = 60) -> dict:
    """Until rank 0 has nothing in flight on any rank; with ``late_before``, also until a worker
    confirmed an abort (its Finished("abort") reaches rank 0 after the request was ended there,
    so the runtime counts one more late message)."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = stats(server)
        runtime = json.loads(st.stats_json)["runtime"]
        idle = st.in_flight == 0 and all(r.in_flight == 0 for r in st.ranks)
        confirmed = late_before is None or runtime["late_messages"] > late_before
        if idle and confirmed:
            return runtime
        assert time.monotonic() < deadline, f"not idle after {timeout_s} s: {st}"
        time.sleep(0.2)


def rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


LONG = {"max_tokens": MAX_MODEL_LEN - 64, "ignore_eos": True}


# ---------------------------------------------------------------------------- streaming


def test_generate_streams_deltas_then_final_with_usage_rank_and_decision(server):
    text, ids, n_messages, final = generate(
        server.stub,
        request_id="stream-1",
        prompt="The quick brown fox",
        sampling=pb.SamplingParams(max_tokens=24, ignore_eos=True),
    )
    assert n_messages > 1  # streamed, not one answer at the end
    assert len(ids) == final.usage.completion_tokens == 24
    assert text  # the engine's detokenized text
    assert final.request_id == "stream-1"
    assert final.finish_reason == "length"
    assert final.usage.prompt_tokens == len("The quick brown fox")  # one token per byte
    assert final.rank in (1, 2)
    assert final.decision in DECISIONS
    assert 0 < final.ttft_s <= final.latency_s


def test_greedy_output_is_reproducible_and_a_repeated_prefix_is_cached(server):
    prompt = "A long shared system prompt for the cache. " * 6
    sampling = pb.SamplingParams(max_tokens=8, temperature=0)
    runs = [generate(server.stub, prompt=prompt, sampling=sampling) for _ in range(4)]
    assert all(r[1] == runs[0][1] and r[0] == runs[0][0] for r in runs)
    # the engine's prefix cache served a repeat (E2 may first move the prefix to a lighter rank)
    assert max(r[3].usage.cached_tokens for r in runs[1:]) > 0
    assert all(r[3].decision in DECISIONS for r in runs)


def test_token_ids_and_chat_messages(server):
    _, ids, _, final = generate(
        server.stub,
        token_ids=pb.TokenIds(ids=[1, 80, 81, 82]),
        sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True),
    )
    assert final.usage.prompt_tokens == 4 and len(ids) == 3
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
    _, _, _, final = generate(server.stub, messages=chat, sampling=pb.SamplingParams(max_tokens=2))
    # the tiny model's template: "<|user|>hi\n<|assistant|>" in byte tokens
    assert final.usage.prompt_tokens == len("<|user|>hi\n<|assistant|>")


def test_stop_strings_and_sampling_options_are_applied(server):
    text, _, _, final = generate(
        server.stub,
        prompt="count:",
        sampling=pb.SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, top_k=20, seed=7),
    )
    again, _, _, _ = generate(
        server.stub,
        prompt="count:",
        sampling=pb.SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, top_k=20, seed=7),
    )
    assert text == again  # same seed, same sample
    if len(text) > 2:
        stop = text[1:3]
        stopped, _, _, final = generate(
            server.stub,
            prompt="count:",
            sampling=pb.SamplingParams(
                max_tokens=40, temperature=0.8, top_p=0.9, top_k=20, seed=7, stop=[stop]
            ),
        )
        assert final.finish_reason == "stop" and stop not in stopped


def test_40_concurrent_clients_each_get_their_own_complete_stream(server):
    def one(i: int):
        text, ids, _, final = generate(
            server.stub,
            request_id=f"conc-{i}",
            prompt=f"client number {i} says",
            sampling=pb.SamplingParams(max_tokens=12, ignore_eos=True),
        )
        return final.request_id, len(ids), final.usage.completion_tokens, final.rank

    with concurrent.futures.ThreadPoolExecutor(MAX_INFLIGHT) as pool:
        results = list(pool.map(one, range(MAX_INFLIGHT)))
    assert [r[:3] for r in results] == [(f"conc-{i}", 12, 12) for i in range(MAX_INFLIGHT)]
    assert {r[3] for r in results} <= {1, 2}
    wait_idle(server)


# ---------------------------------------------------------------------------- cancel, deadline


def test_cancel_aborts_the_request_on_its_worker(server):
    late = runtime_stats(server)["late_messages"]
    stream = server.stub.Generate(
        pb.GenerateRequest(
            request_id="to-cancel", prompt="cancel me", sampling=pb.SamplingParams(**LONG)
        ),
        timeout=120,
    )
    next(stream)  # running on a worker
    stream.cancel()
    runtime = wait_idle(server, late_before=late)
    assert runtime["errors_by_kind"].get("cancelled", 0) >= 1


def test_client_deadline_is_deadline_exceeded_and_aborts_the_request(server):
    late = runtime_stats(server)["late_messages"]
    start = time.monotonic()
    err = rpc_error(
        lambda: generate(
            server.stub, timeout=1.0, prompt="too slow", sampling=pb.SamplingParams(**LONG)
        )
    )
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 10
    wait_idle(server, late_before=late)


def test_in_flight_limit_is_resource_exhausted(server):
    wait_idle(server)
    streams = [
        server.stub.Generate(
            pb.GenerateRequest(prompt=f"hold {i}", sampling=pb.SamplingParams(**LONG)), timeout=300
        )
        for i in range(MAX_INFLIGHT)
    ]
    try:
        # Rank 0 counts a request in flight from its arrival to its end, queued or running; each
        # held one runs for seconds, so all of them are in flight together.
        deadline = time.monotonic() + 60
        while (st := stats(server)).in_flight < MAX_INFLIGHT:
            assert time.monotonic() < deadline, f"the held requests are not all in flight: {st}"
            time.sleep(0.05)
        assert st.in_flight == MAX_INFLIGHT, st
        err = rpc_error(lambda: generate(server.stub, prompt="one too many"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_inflight" in err.details()
    finally:
        for s in streams:
            s.cancel()
    wait_idle(server)


# ---------------------------------------------------------------------------- invalid input


@pytest.mark.parametrize(("request_kw", "needle"), invalid_requests(MAX_MODEL_LEN))
def test_invalid_requests_are_invalid_argument(server, request_kw, needle):
    err = rpc_error(lambda: generate(server.stub, **request_kw))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.details()


def test_unknown_fields_are_invalid_argument(server):
    raw = server.channel.unary_stream(
        f"/{SERVICE}/Generate",
        request_serializer=lambda b: b,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    payload = pb.GenerateRequest(prompt="x").SerializeToString() + bytes([(15 << 3) | 0, 1])
    err = rpc_error(lambda: list(raw(payload, timeout=30)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "[15]" in err.details()


def test_the_server_keeps_serving_after_bad_requests(server):
    _, ids, _, _ = generate(
        server.stub, prompt="still here", sampling=pb.SamplingParams(max_tokens=2, ignore_eos=True)
    )
    assert len(ids) == 2


# ---------------------------------------------------------------------------- health, stats


def test_health_is_serving_and_reflection_lists_the_service(server):
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", SERVICE):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


def test_get_stats_reports_ranks_decisions_and_tree(server):
    st = stats(server)
    assert [r.rank for r in st.ranks] == [1, 2] and all(r.live for r in st.ranks)
    assert sum(r.finished for r in st.ranks) > 0
    assert set(st.decisions) <= DECISIONS and sum(st.decisions.values()) > 0
    assert st.policy == "e2"
    assert st.tree_tokens > 0 and st.tree_nodes > 0
    assert 0 <= st.cache_hit_rate <= 1


def test_metrics_endpoint(server):
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    for needle in (
        'preble_requests_total{status="ok"}',
        'preble_requests_total{status="invalid_argument"}',
        "preble_request_latency_seconds_bucket",
        "preble_ttft_seconds_count",
        "preble_decisions_total",
        "preble_cache_hit_rate",
        'preble_rank_load{rank="1"}',
        'preble_rank_kv_usage{rank="2"}',
        "preble_serving 1.0",
    ):
        assert needle in text, needle


def test_client_cli_streams_and_reports_errors(server):
    ok = subprocess.run(
        [
            str(PREBLE),
            "client",
            "--addr-file",
            str(server.addr_file),
            "--prompt",
            "hello",
            "--max-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "completion 4" in ok.stderr or "stop" in ok.stderr
    bad = subprocess.run(
        [str(PREBLE), "client", "--addr", server.addr, "--prompt", "x", "--temperature", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr


# ---------------------------------------------------------------------------- drain (last)


def _cpus_of_vllm_workers(root: int) -> list[str]:
    """Cpus_allowed_list of every vLLM model-runner process descending from ``root``."""
    status: dict[int, dict[str, str]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        status[int(pid)] = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    children: dict[int, list[int]] = {}
    for pid, fields in status.items():
        children.setdefault(int(fields.get("PPid", "0")), []).append(pid)
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        if status.get(pid, {}).get("Name", "").startswith("VLLM::Worker"):
            found.append(status[pid]["Cpus_allowed_list"].strip())
    return sorted(found)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to split")
def test_the_two_cpu_engines_run_on_separate_cores(server):
    # vLLM's CPU build alone pins every engine on a node to the same core.
    assert server.log.read_text(errors="replace").count("CPU engine threads pinned to cores") == 2
    cpus = _cpus_of_vllm_workers(server.proc.pid)
    assert len(cpus) == 2 and cpus[0] != cpus[1], cpus
    sets = [set(_expand(c)) for c in cpus]
    assert not sets[0] & sets[1], cpus


def _expand(cpu_list: str) -> list[int]:
    out: list[int] = []
    for part in cpu_list.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def test_sigterm_drains_open_streams_then_exits_0(server):
    """Runs last. SIGTERM goes to rank 0 only, as slurm/preble.sbatch sends it: mpiexec (and
    plain scancel) signal every process, vLLM's engine helper processes included."""
    pid = json.loads(stats(server).stats_json)["ingress"]["pid"]
    stream = server.stub.Generate(
        pb.GenerateRequest(
            prompt="finish me",
            # Long enough that the stream is still open through the health and late-request
            # checks below: 200 tokens took under half a second on an idle CI machine.
            sampling=pb.SamplingParams(max_tokens=DRAIN_TOKENS, ignore_eos=True),
        ),
        timeout=300,
    )
    first = next(stream)
    os.kill(pid, signal.SIGTERM)
    health = health_pb2_grpc.HealthStub(server.channel)
    deadline = time.monotonic() + 30
    while True:  # NOT_SERVING while the open stream finishes
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        assert time.monotonic() < deadline, "health never went NOT_SERVING"
        time.sleep(0.05)
    assert not server.addr_file.exists()  # no new client finds a draining server
    err = rpc_error(lambda: generate(server.stub, prompt="late"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    rest = list(stream)
    ids = list(first.delta.token_ids) + [t for r in rest for t in r.delta.token_ids]
    assert rest[-1].HasField("final") and rest[-1].final.finish_reason == "length"
    assert len(ids) == DRAIN_TOKENS  # the open request finished in full
    assert server.proc.wait(120) == 0, _tail(server.log)
    log = server.log.read_text(errors="replace")
    assert "drained: all 1 open request(s) finished" in log
