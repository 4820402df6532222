"""The gRPC ingress over a real Rank0Runtime and fake workers (no MPI, no vLLM; seconds).

The live-engine version of these checks is tests/e2e/test_grpc.py."""

from __future__ import annotations

import concurrent.futures
import threading
import time
import urllib.request

import grpc
import pytest
from fakes_runtime import MAX_MODEL_LEN, FakeBehaviour, FakeCluster
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from invalid_requests import invalid_requests

from preble_hpc import client as client_cli
from preble_hpc._proto import preble_pb2 as pb
from preble_hpc._proto import preble_pb2_grpc as pb_grpc
from preble_hpc.rank0_scheduler.ingress import (
    SERVICE_NAME,
    BadRequest,
    IngressServer,
    check_unknown_fields,
    rank_rows,
    sampling_from_proto,
)
from preble_hpc.serve import write_addr_file


def _tokenizer():
    from transformers import PreTrainedTokenizerFast

    from preble_hpc.tiny_model import CHAT_TEMPLATE, _byte_level_tokenizer

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_tokenizer(),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


TOKENIZER = _tokenizer()


class Served:
    """FakeCluster + IngressServer on a free port + a thread driving the runtime loop."""

    def __init__(self, **cluster_kw) -> None:
        self.cluster = FakeCluster(2, policy="e2", **cluster_kw)
        self.cluster.rt.wait_ready(5)
        self.server = IngressServer(
            self.cluster.rt, TOKENIZER, self.cluster.rt.max_model_len, policy="e2"
        )
        self.port = self.server.start("127.0.0.1", 0)
        self.metrics_port = self.server.serve_metrics("127.0.0.1", 0)
        self._stop = threading.Event()
        self._loop = threading.Thread(target=self._drive, daemon=True)
        self._loop.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.PrebleStub(self.channel)

    def _drive(self) -> None:
        while not self._stop.is_set():
            self.cluster.rt.step()
            self.server.pump()

    def wait(self, until, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not until():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.01)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace_s=1)
        self._stop.set()
        self._loop.join(5)
        self.cluster.close()


@pytest.fixture
def served():
    s = Served()
    yield s
    s.close()


@pytest.fixture(scope="module")
def shared():
    """One server for the tests that only send requests and look at the answers."""
    s = Served()
    yield s
    s.close()


@pytest.fixture
def slow():
    """Fake workers that take 10 ms per token: requests stay in flight long enough to act on."""
    s = Served(behaviour=FakeBehaviour(step_delay_s=0.01), max_inflight=2)
    yield s
    s.close()


def generate(stub, **kw) -> tuple[list[pb.Delta], pb.Final]:
    timeout = kw.pop("timeout", 10)
    deltas, finals = [], []
    for r in stub.Generate(pb.GenerateRequest(**kw), timeout=timeout):
        assert not finals, "a message after the final one"
        assert r.HasField("delta") or r.HasField("final")
        if r.HasField("delta"):
            deltas.append(r.delta)
        if r.HasField("final"):
            finals.append(r.final)
    assert len(finals) == 1
    return deltas, finals[0]


def rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


# ---------------------------------------------------------------------------- streaming


def test_generate_streams_token_deltas_then_a_final_with_usage_rank_and_decision(served):
    deltas, final = generate(
        served.stub, request_id="r1", prompt="hello", sampling=pb.SamplingParams(max_tokens=4)
    )
    prompt_ids = TOKENIZER.encode("hello")
    # The fake worker's token i is prompt[-1] + i + 1, its text "<id>". Deltas that queue up
    # while the client reads arrive merged, so only their concatenation is fixed.
    assert [t for d in deltas for t in d.token_ids] == [prompt_ids[-1] + i for i in range(1, 5)]
    last = prompt_ids[-1]
    assert "".join(d.text for d in deltas) == "".join(f"<{last + i}>" for i in range(1, 5))
    assert final.request_id == "r1"
    assert final.finish_reason == "length"
    assert final.usage.prompt_tokens == len(prompt_ids)
    assert final.usage.completion_tokens == 4
    assert final.rank in (1, 2)
    assert final.decision == "explore"  # nothing cached yet: E2 explores
    assert final.decision_reason
    assert 0 < final.ttft_s <= final.latency_s


def test_token_ids_and_chat_messages_are_accepted(shared):
    _, final = generate(
        shared.stub, token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling=pb.SamplingParams(max_tokens=1)
    )
    assert final.usage.prompt_tokens == 3
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in messages])
    _, final = generate(shared.stub, messages=chat, sampling=pb.SamplingParams(max_tokens=1))
    rendered = TOKENIZER.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert final.usage.prompt_tokens == len(TOKENIZER.encode(rendered, add_special_tokens=False))


def test_server_makes_request_ids_unique_when_the_client_sends_none(shared):
    ids = {
        generate(shared.stub, prompt="x", sampling=pb.SamplingParams(max_tokens=1))[1].request_id
        for _ in range(3)
    }
    assert len(ids) == 3 and "" not in ids


def test_two_clients_may_use_the_same_request_id_at_once(shared):
    def one(_: int) -> str:
        return generate(
            shared.stub, request_id="same", prompt="x", sampling=pb.SamplingParams(max_tokens=20)
        )[1].request_id

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, range(4))) == ["same"] * 4


def test_max_tokens_is_capped_by_the_room_left_in_the_context(shared):
    prompt_len = MAX_MODEL_LEN - 3
    _, final = generate(
        shared.stub,
        token_ids=pb.TokenIds(ids=[5] * prompt_len),
        sampling=pb.SamplingParams(max_tokens=100),
    )
    assert final.usage.completion_tokens == 3


def test_64_concurrent_clients_all_get_their_own_complete_stream(shared):
    def one(i: int) -> tuple[str, int]:
        deltas, final = generate(
            shared.stub,
            request_id=f"c{i}",
            prompt=f"client {i}",
            sampling=pb.SamplingParams(max_tokens=3),
        )
        assert sum(len(d.token_ids) for d in deltas) == 3
        return final.request_id, final.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    assert results == [(f"c{i}", 3) for i in range(64)]
    shared.wait(lambda: shared.cluster.rt.inflight == 0 and shared.server.active == 0)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("request_kw", "needle"), invalid_requests(MAX_MODEL_LEN))
def test_bad_requests_are_invalid_argument_with_a_clear_message(shared, request_kw, needle):
    err = rpc_error(lambda: generate(shared.stub, **request_kw))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.details()
    assert shared.cluster.rt.inflight == 0


def test_unknown_fields_are_invalid_argument_not_silently_dropped(shared):
    known = pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(max_tokens=1))
    extra_top = bytes([(15 << 3) | 0, 1])  # field 15, varint 1: not in preble.proto
    inner = pb.SamplingParams(max_tokens=1).SerializeToString() + bytes([(12 << 3) | 0, 1])
    extra_sampling = bytes([(5 << 3) | 2, len(inner)]) + inner
    raw = shared.channel.unary_stream(
        f"/{SERVICE_NAME}/Generate",
        request_serializer=lambda b: b,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    for payload, needle in (
        (known.SerializeToString() + extra_top, "[15]"),
        (known.SerializeToString() + extra_sampling, "request.sampling"),
    ):
        err = rpc_error(lambda p=payload: list(raw(p, timeout=5)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in err.details()


def test_check_unknown_fields_and_sampling_conversion_units():
    check_unknown_fields(pb.GenerateRequest(prompt="x"))
    spec = sampling_from_proto(pb.SamplingParams(temperature=0.7, top_k=5, stop=["a"]))
    assert spec.temperature == 0.7 and spec.top_k == 5 and spec.stop == ("a",)
    assert sampling_from_proto(pb.SamplingParams()).temperature == 0.0  # unset: default
    with pytest.raises(BadRequest, match="top_p"):
        sampling_from_proto(pb.SamplingParams(top_p=float("inf")))


def test_in_flight_limit_is_resource_exhausted(slow):
    # max_inflight=2: two long requests fill it, the third is refused at once.
    streams = [
        slow.stub.Generate(
            pb.GenerateRequest(prompt=f"p{i}", sampling=pb.SamplingParams(max_tokens=200))
        )
        for i in range(2)
    ]
    for s in streams:
        next(s)  # both are running
    err = rpc_error(lambda: generate(slow.stub, prompt="third"))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_inflight" in err.details()
    for s in streams:
        s.cancel()
    slow.wait(lambda: slow.cluster.rt.inflight == 0)


def test_client_cancel_aborts_the_request_on_its_worker(slow):
    stream = slow.stub.Generate(
        pb.GenerateRequest(
            request_id="bye", prompt="cancel me", sampling=pb.SamplingParams(max_tokens=500)
        )
    )
    next(stream)
    stream.cancel()
    slow.wait(lambda: any(rid == "bye" for _, rid in slow.cluster.behaviour.aborts))
    slow.wait(lambda: slow.cluster.rt.inflight == 0 and slow.server.active == 0)
    # the slot is free again: two new requests fit under max_inflight=2
    for i in range(2):
        generate(slow.stub, prompt=f"after {i}", sampling=pb.SamplingParams(max_tokens=1))


def test_client_deadline_is_deadline_exceeded_and_aborts_the_request(slow):
    start = time.monotonic()
    err = rpc_error(
        lambda: generate(
            slow.stub,
            request_id="late",
            prompt="slow",
            sampling=pb.SamplingParams(max_tokens=500),
            timeout=0.3,
        )
    )
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 3
    slow.wait(lambda: any(rid == "late" for _, rid in slow.cluster.behaviour.aborts))
    slow.wait(lambda: slow.cluster.rt.inflight == 0)


def test_drain_timeout_fails_open_streams_with_unavailable(slow):
    stream = slow.stub.Generate(
        pb.GenerateRequest(
            request_id="open", prompt="long", sampling=pb.SamplingParams(max_tokens=500)
        )
    )
    next(stream)
    slow.server.begin_drain()
    slow.server.fail_open_streams("stopped (test)")
    err = rpc_error(lambda: list(stream))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "stopped (test)" in err.details()
    slow.wait(lambda: any(rid == "open" for _, rid in slow.cluster.behaviour.aborts))


# ---------------------------------------------------------------------------- health, stats


def _health(channel, service: str = "") -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_health_is_serving_then_not_serving_while_draining(served):
    assert _health(served.channel) == "SERVING"
    assert _health(served.channel, SERVICE_NAME) == "SERVING"
    served.server.begin_drain()
    assert _health(served.channel) == "NOT_SERVING"
    err = rpc_error(lambda: generate(served.stub, prompt="late"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.details()


def test_reflection_lists_the_preble_and_health_services(shared):
    stub = reflection_pb2_grpc.ServerReflectionStub(shared.channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_get_stats_reports_ranks_decisions_tree_and_json(served):
    for i in range(4):
        generate(
            served.stub,
            prompt="shared system prompt " * 3 + str(i),
            sampling=pb.SamplingParams(max_tokens=2),
        )
    stats = served.stub.GetStats(pb.GetStatsRequest(), timeout=5)
    assert [r.rank for r in stats.ranks] == [1, 2]
    assert all(r.live for r in stats.ranks)
    assert sum(r.finished for r in stats.ranks) == 4
    assert sum(stats.decisions.values()) == 4
    assert stats.policy == "e2"
    assert stats.tree_tokens > 0 and stats.tree_nodes > 0
    assert '"ingress"' in stats.stats_json and '"runtime"' in stats.stats_json


def test_rank_rows_tolerates_missing_parts():
    assert rank_rows({}) == []
    rows = rank_rows(
        {
            "runtime": {"per_rank": {"1": {"finished": 2}}, "live_ranks": [1]},
            "ranks": {"1": {"load_s": 0.5, "running": 3}},
        }
    )
    assert rows[0]["rank"] == 1 and rows[0]["load"] == 0.5 and rows[0]["running"] == 3
    assert rows[0]["live"] == 1.0 and rows[0]["finished"] == 2


def test_metrics_endpoint_counts_requests_latency_ttft_decisions_and_ranks(served):
    generate(served.stub, prompt="metrics", sampling=pb.SamplingParams(max_tokens=2))
    rpc_error(lambda: generate(served.stub, prompt=""))
    served.server._next_snapshot = 0  # refresh the per-rank snapshot on the next pump
    time.sleep(0.1)
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    assert 'preble_requests_total{status="ok"} 1.0' in text
    assert 'preble_requests_total{status="invalid_argument"} 1.0' in text
    assert "preble_request_latency_seconds_count 1.0" in text
    assert "preble_ttft_seconds_count 1.0" in text
    assert 'preble_decisions_total{kind="explore"} 1.0' in text
    assert "preble_cache_hit_rate" in text
    assert 'preble_rank_load{rank="1"}' in text and 'preble_rank_live{rank="2"} 1.0' in text
    assert "preble_serving 1.0" in text


# ---------------------------------------------------------------------------- client, addr file


def test_client_streams_to_stdout_and_exits_1_on_rpc_errors(served, capsys, tmp_path):
    addr = tmp_path / "job.addr"
    write_addr_file(addr, f"127.0.0.1:{served.port}")
    assert addr.read_text() == f"127.0.0.1:{served.port}\n"
    assert not list(tmp_path.glob(".*tmp"))
    code = client_cli.main(["--addr-file", str(addr), "--prompt", "hi", "--max-tokens", "2"])
    out, err = capsys.readouterr()
    ids = TOKENIZER.encode("hi")
    assert code == 0
    assert out == f"<{ids[-1] + 1}><{ids[-1] + 2}>\n"
    assert "length" in err and "completion 2" in err
    code = client_cli.main(["--addr", f"127.0.0.1:{served.port}", "--prompt", ""])
    out, err = capsys.readouterr()
    assert code == 1 and "INVALID_ARGUMENT" in err and "prompt is empty" in err
    assert client_cli.main(["--addr", f"127.0.0.1:{served.port}", "--health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert client_cli.main(["--addr", f"127.0.0.1:{served.port}", "--stats"]) == 0
    assert '"runtime"' in capsys.readouterr().out


def test_client_reads_prompt_files_and_reports_a_missing_addr_file(shared, capsys, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "a", "max_tokens": 1}\n\n{"messages": [{"role": "user", '
        '"content": "b"}], "max_tokens": 2}\n'
    )
    code = client_cli.main(
        ["--addr", f"127.0.0.1:{shared.port}", "--file", str(prompts), "--json", "--quiet"]
    )
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and len(lines) == 2
    assert '"completion_tokens": 1' in lines[0] and '"completion_tokens": 2' in lines[1]
    code = client_cli.main(["--addr-file", str(tmp_path / "missing.addr"), "--prompt", "x"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_a_busy_port_fails_with_a_clear_error(served):
    other = IngressServer(served.cluster.rt, TOKENIZER, MAX_MODEL_LEN)
    with pytest.raises(OSError, match="cannot listen"):
        other.start("127.0.0.1", served.port)
    with pytest.raises(OSError, match="cannot serve metrics"):
        other.serve_metrics("127.0.0.1", served.metrics_port)
