"""Cluster simulation end to end: the real GlobalScheduler in virtual time, every request
finishes, cache reports reach the tree, and E2 beats round robin on a prefix-heavy toy."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from preble_hpc.config import SimConfig
from preble_hpc.sim import cli
from preble_hpc.sim.cluster import accept, simulate
from preble_hpc.sim.workloads import Piece, SimRequest, make_workload, poisson_arrivals

KEYS = {
    "workload", "rate", "policy", "gpus", "requests", "finished", "mean_latency_s",
    "p99_latency_s", "mean_ttft_s", "p99_ttft_s", "throughput_rps", "hit_rate",
    "ideal_hit_rate", "imbalance",
}  # fmt: skip


def toy_documents(n: int = 400, docs: int = 8, rate: float = 8.0) -> list[SimRequest]:
    """Long shared documents + short questions: where a prefix is placed decides everything."""
    import random

    rng = random.Random(5)
    doc = [Piece(i + 1, 12_000) for i in range(docs)]
    times = poisson_arrivals(rate, n, rng)
    return [
        SimRequest(f"q{i}", t, (doc[rng.randrange(docs)], Piece(1000 + i, 100, keep=False)), 8, 8)
        for i, t in enumerate(times)
    ]


SMALL = SimConfig(gpus=4, kv_capacity_tokens=40_000)  # one GPU holds 3 documents, not 8


def test_every_request_finishes_and_e2_beats_round_robin_on_shared_documents():
    reqs = toy_documents()
    e2 = simulate(reqs, "e2", SMALL)
    rr = simulate(reqs, "round_robin", SMALL)
    assert e2.finished == rr.finished == len(reqs)
    # E2 keeps each document on few GPUs: most prompts hit; round robin thrashes every cache.
    assert e2.hit_rate > 0.8 > 0.5 > rr.hit_rate
    assert e2.hit_rate <= e2.ideal_hit_rate + 1e-9
    assert rr.mean_latency_s > 1.5 * e2.mean_latency_s
    assert e2.mean_ttft_s < rr.mean_ttft_s
    # The engines' STORED/EVICTED reports reached the scheduler's tree, and match it.
    ev = rr.scheduler_stats["cache_events"]
    assert ev["stored"] > 0 and ev["evicted"] > 0 and ev["ignored"] == 0
    assert ev["not_in_tree"] <= 0.05 * ev["evicted"]
    assert sum(e2.decisions.values()) == len(reqs)


def test_a_host_tier_keeps_what_the_gpus_evict_and_rank_0_routes_by_it():
    reqs = toy_documents()
    gpu_only = simulate(reqs, "round_robin", SMALL)
    host = simulate(reqs, "round_robin", replace(SMALL, host_kv_tokens=120_000))
    assert host.finished == len(reqs)
    # Each GPU's host tier holds all 8 documents: round robin's misses become loads.
    assert host.hit_rate > 0.9 > 0.5 > gpu_only.hit_rate
    assert 0.3 < host.host_hit_rate < host.hit_rate
    assert host.mean_latency_s < gpu_only.mean_latency_s
    # Nothing leaves a host tier, so rank 0 hears of no eviction, and sizes each rank by it.
    assert host.scheduler_stats["cache_events"]["evicted"] == 0
    assert host.scheduler_stats["ranks"]["0"]["kv_capacity_tokens"] == 120_000
    e2 = simulate(reqs, "e2", replace(SMALL, host_kv_tokens=120_000))
    assert e2.finished == len(reqs) and e2.hit_rate > 0.9


def test_runs_are_deterministic():
    reqs = make_workload("toolbench", 300, 30.0, seed=1)
    a = simulate(reqs, "e2", SimConfig(gpus=2))
    b = simulate(reqs, "e2", SimConfig(gpus=2))
    assert a.row("t", 30) == b.row("t", 30)


def test_overload_leaves_requests_unfinished_at_the_horizon():
    reqs = toy_documents(n=300, rate=200.0)
    res = simulate(reqs, "round_robin", SimConfig(gpus=1, kv_capacity_tokens=40_000, drain_s=1))
    assert 0 < res.finished < res.requests


def test_rank_0_refuses_prompts_over_max_model_len_and_caps_outputs_to_the_room_left():
    doc = Piece(1, 100)
    reqs = [
        SimRequest("fits", 0.0, (doc,), 20, 20),
        SimRequest("capped", 0.1, (doc, Piece(2, 20)), 20, 30),
        SimRequest("refused", 0.2, (doc, Piece(3, 28)), 1, 1),
    ]
    accepted, refused = accept(reqs, max_model_len=128)
    assert refused == 1
    assert [(r.request_id, r.output_tokens, r.max_tokens) for r in accepted] == [
        ("fits", 20, 20),
        ("capped", 8, 8),
    ]
    res = simulate(reqs, "e2", SimConfig(gpus=1, max_model_len=128))
    assert (res.requests, res.rejected, res.finished) == (2, 1, 2)
    with pytest.raises(ValueError, match="1 refused: prompt >= max_model_len"):
        simulate(reqs[2:], "e2", SimConfig(gpus=1, max_model_len=128))


@pytest.mark.parametrize("policy", ["least_load", "prefix_affinity", "sglang_cache_aware",
                                    "dynamo_kv", "llmd_scorer"])  # fmt: skip
def test_every_policy_runs_in_the_simulator(policy):
    res = simulate(make_workload("mix", 200, 20.0, seed=2), policy, SimConfig(gpus=3))
    assert res.finished == 200 and res.hit_rate > 0


def test_cli_writes_rows_with_exactly_the_issue_keys_and_a_plot(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = cli.main([
        "--workload", "toolbench,loogle", "--gpus", "2", "--rate", "4,8",
        "--policies", "e2,round_robin", "--requests", "120",
        "--json", str(out), "--plot", str(png),
    ])  # fmt: skip
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 2 * 2
    assert all(set(r) == KEYS for r in rows)
    assert {(r["workload"], r["rate"], r["policy"]) for r in rows} >= {("loogle", 8.0, "e2")}
    assert png.stat().st_size > 1000
    text = capsys.readouterr().out
    assert "== toolbench  rate 4/s" in text and "round_robin" in text


def test_cli_simulates_a_host_tier_and_refuses_one_smaller_than_the_gpu(tmp_path, capsys):
    out = tmp_path / "h.json"
    argv = ["--workload", "loogle", "--gpus", "2", "--requests", "60", "--json", str(out)]
    assert cli.main([*argv, "--host-kv-tokens", "2000000"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert all(set(r) == KEYS | {"host_hit_rate"} for r in rows)
    assert all(0 <= r["host_hit_rate"] <= r["hit_rate"] for r in rows)
    assert " host " in capsys.readouterr().out
    assert cli.main([*argv, "--host-kv-tokens", "1000"]) == 2
    assert "host_kv_tokens must be 0 (no host tier) or at least" in capsys.readouterr().err


def test_cli_rejects_an_unknown_policy_and_replays_a_trace(tmp_path, capsys):
    assert cli.main(["--workload", "apps", "--policies", "e3", "--requests", "5"]) == 2
    assert "valid policies" in capsys.readouterr().err
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "\n".join(
            json.dumps({"timestamp": i * 100, "input_length": 1500, "output_length": 4,
                        "hash_ids": [1, 2, 100 + i]})
            for i in range(40)
        )
    )  # fmt: skip
    out = tmp_path / "t.json"
    assert cli.main(["--trace", str(trace), "--gpus", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["finished"] for r in rows] == [40, 40] and rows[0]["workload"] == "t"
    long = tmp_path / "long.jsonl"
    long.write_text(trace.read_text() + "\n" + json.dumps(
        {"timestamp": 4000, "input_length": 140_000, "output_length": 4,
         "hash_ids": list(range(1000, 1274))}
    ))  # fmt: skip
    capsys.readouterr()
    assert cli.main(["--trace", str(long), "--gpus", "2", "--json", str(out)]) == 0
    assert "41 requests  2 GPUs  (1 refused: prompt >= max_model_len 131072" in (
        capsys.readouterr().out
    )
    assert [r["finished"] for r in json.loads(out.read_text())["rows"]] == [40, 40]


def test_cli_names_a_bad_trace_line_and_exits_2(tmp_path, capsys):
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 100}\n')
    assert cli.main(["--trace", str(trace), "--gpus", "2", "--policies", "e2"]) == 2
    assert f"trace {trace} line 1: missing hash_ids" in capsys.readouterr().err
