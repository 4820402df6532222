"""bench/compare_policies.py's summary: the best baseline is chosen among those that finished."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "compare_policies.py"
_spec = importlib.util.spec_from_file_location("compare_policies", _PATH)
assert _spec is not None and _spec.loader is not None
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)


def _row(policy: str, mean: float, p99: float, finished: int = 100) -> dict:
    return {
        "workload": "w",
        "policy": policy,
        "requests": 100,
        "finished": finished,
        "mean_latency_s": mean,
        "p99_latency_s": p99,
        "hit_rate": 0.45,
        "ideal_hit_rate": 0.5,
        "pooled_lru_hit_rate": 0.48,
        "pooled_oracle_hit_rate": 0.5,
    }


def test_a_baseline_that_drops_requests_is_not_the_best():
    rows = [
        _row("e2", 2.0, 10.0),
        _row("round_robin", 8.0, 40.0, finished=60),
        _row("prefix_affinity", 1.0, 5.0, finished=99),  # faster, but dropped one
        _row("llmd_scorer", 3.0, 9.0),
        _row("sglang_cache_aware", 4.0, 8.0),
    ]
    s = compare.summarize(rows)["w"]
    assert s["baselines_finished_all"] == ["sglang_cache_aware", "llmd_scorer"]
    assert (s["best_baseline_mean"], s["best_over_e2_mean"]) == ("llmd_scorer", 1.5)
    assert (s["best_baseline_p99"], s["best_over_e2_p99"]) == ("sglang_cache_aware", 0.8)
    assert s["target_no_worse_mean"] and not s["target_no_worse_p99"]
    assert (s["rr_over_e2_mean"], s["rr_over_e2_p99"], s["rr_finished_all"]) == (4.0, 4.0, False)
    assert s["target_hit_within_10pct"]
    assert (s["hit_over_ideal"], s["hit_over_pooled_lru"]) == (0.9, 0.938)
    assert s["hit_over_pooled_oracle"] == 0.9


def test_no_baseline_finishing_leaves_the_best_empty():
    rows = [_row("e2", 2.0, 10.0), _row("round_robin", 8.0, 40.0, finished=50)]
    rows += [_row("llmd_scorer", 1.0, 5.0, finished=10)]
    s = compare.summarize(rows)["w"]
    assert s["best_baseline_mean"] is None and s["best_over_e2_mean"] is None
    assert s["target_no_worse_mean"] and s["target_no_worse_p99"]


def test_a_fixed_rate_skips_the_sweep_and_runs_every_policy_there():
    r = compare.compare_one("loogle", 2, 5.0, 0.1, 0, sweep_seeds=3, fixed_rate=3.0)
    assert r["rate"] == 3.0 and r["sweep"] == []
    assert [row["policy"] for row in r["rows"]] == list(compare.POLICY_NAMES)
    assert {(row["rate"], row["requests"]) for row in r["rows"]} == {(3.0, 15)}


def _seed_row(policy: str, seed: int, mean: float, p99: float, finished: int = 100) -> dict:
    return {**_row(policy, mean, p99, finished), "seed": seed}


def test_seed_means_pick_the_best_rival_and_count_the_seeds_e2_wins():
    rows = [
        _seed_row("e2", 0, 2.0, 10.0),
        _seed_row("e2", 1, 3.0, 12.0, finished=90),  # past saturation on seed 1
        _seed_row("round_robin", 0, 9.0, 50.0),
        _seed_row("round_robin", 1, 9.0, 50.0),
        _seed_row("sglang_cache_aware", 0, 2.5, 9.0),
        _seed_row("sglang_cache_aware", 1, 2.5, 14.0, finished=95),  # more than E2: a rival
        _seed_row("llmd_scorer", 0, 1.0, 5.0),
        _seed_row("llmd_scorer", 1, 1.0, 5.0, finished=80),  # dropped more than E2: not one
    ]
    s = compare.summarize_seeds(rows)["w"]
    assert s["seeds"] == [0, 1] and s["rivals"] == ["sglang_cache_aware"]
    assert s["policies"]["e2"] == {"mean_s": 2.5, "p99_s": 11.0, "finished": 190, "requests": 200}
    assert (s["best_baseline_mean"], s["best_over_e2_mean"]) == ("sglang_cache_aware", 1.0)
    assert (s["best_baseline_p99"], s["best_over_e2_p99"]) == ("sglang_cache_aware", 1.045)
    assert s["e2_p99_no_worse_seeds"] == 1  # 10 > 9 on seed 0, 12 <= 14 on seed 1
    assert s["target_no_worse_mean"] and s["target_no_worse_p99"]


@pytest.mark.parametrize(
    ("e2_p99s", "gap", "se", "no_worse", "printed"),
    [
        ([11.0, 13.0, 9.0, 13.0], 0.5, 0.5, True, "+0.50 (0.50)"),  # within the noise
        ([10.5, 12.5, 10.5, 12.5], 0.5, 0.0, False, "+0.50 (0.00)!"),  # higher on every seed
        ([10.0, 12.0, 10.0, 12.0], 0.0, 0.0, True, "+0.00 (0.00)"),
    ],
)
def test_e2_loses_on_seeds_only_by_a_paired_gap_beyond_two_standard_errors(
    e2_p99s, gap, se, no_worse, printed, capsys
):
    rival_p99s = [10.0, 12.0, 10.0, 12.0]
    rows = [_seed_row("e2", x, 1.0, v) for x, v in enumerate(e2_p99s)]
    rows += [_seed_row("llmd_scorer", x, 2.0, v) for x, v in enumerate(rival_p99s)]
    s = compare.summarize_seeds(rows)["w"]
    assert (s["e2_minus_best_p99_s"], s["e2_minus_best_p99_se"]) == (gap, se)
    assert s["target_no_worse_p99"] is no_worse
    assert (s["e2_minus_best_mean_s"], s["target_no_worse_mean"]) == (-1.0, True)
    compare.print_seeds_summary({"w": s})
    assert capsys.readouterr().out.rstrip().endswith(" " + printed)


def test_on_one_seed_any_gap_is_a_loss_and_an_unfinished_seed_an_infinite_one():
    one = [_seed_row("e2", 0, 1.0, 10.01), _seed_row("llmd_scorer", 0, 2.0, 10.0)]
    s = compare.summarize_seeds(one)["w"]
    assert s["e2_minus_best_p99_se"] is None and not s["target_no_worse_p99"]
    rows = [_seed_row("e2", 0, None, None, finished=0), _seed_row("llmd_scorer", 0, 1.0, 5.0)]
    rows += [_seed_row("e2", 1, 1.0, 5.0), _seed_row("llmd_scorer", 1, 1.0, 5.0)]
    s = compare.summarize_seeds(rows)["w"]
    assert s["e2_minus_best_mean_s"] == math.inf and not s["target_no_worse_mean"]


def test_a_policy_that_finished_nothing_has_no_seed_mean():
    rows = [_seed_row("e2", 0, 2.0, 10.0), _seed_row("llmd_scorer", 0, None, None, finished=0)]
    s = compare.summarize_seeds(rows)["w"]
    assert s["policies"]["llmd_scorer"]["mean_s"] is None and s["rivals"] == []
    # A seed where E2 and a rival both finished nothing counts as a tie, not a crash.
    rows = [_seed_row("e2", 0, None, None, finished=0), _seed_row("llmd_scorer", 0, 1.0, 5.0)]
    rows += [_seed_row("e2", 1, None, None, finished=0), _seed_row("llmd_scorer", 1, None, None, 0)]
    s = compare.summarize_seeds(rows)["w"]
    assert s["best_baseline_p99"] == "llmd_scorer" and s["e2_p99_no_worse_seeds"] == 1


def test_eval_seeds_runs_every_policy_on_each_seed_and_keeps_the_first_as_rows():
    r = compare.compare_one("loogle", 2, 5.0, 0.1, 0, sweep_seeds=1, fixed_rate=3.0, eval_seeds=2)
    assert [row["policy"] for row in r["rows"]] == list(compare.POLICY_NAMES)
    assert [row["seed"] for row in r["seed_rows"]] == [0] * 7 + [1] * 7

    def unseeded(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "seed"} for row in rows]

    assert unseeded(r["seed_rows"][:7]) == r["rows"]
    seed1 = compare.compare_one("loogle", 2, 5.0, 0.1, 1, sweep_seeds=1, fixed_rate=3.0)
    assert unseeded(r["seed_rows"][7:]) == seed1["rows"]


def test_eval_seeds_below_one_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        compare.main(["--eval-seeds", "0", "--workloads", "loogle"])
    assert exc.value.code == 2
    assert "--eval-seeds must be >= 1" in capsys.readouterr().err


def test_the_sweep_holds_the_chosen_rate_on_every_seed_the_comparison_reports(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(compare, "MULTIPLIERS", (1.0, 1.5))
    out = tmp_path / "c.json"
    args = ["--gpus", "2", "--duration", "10", "--workloads", "toolbench", "--eval-seeds", "4"]
    assert compare.main([*args, "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["sweep_seeds"] == 4
    rate = doc["selected_rates"]["toolbench"]
    at_rate = [r for r in doc["sweep"] if r["rate"] == rate]
    assert [r["seed"] for r in at_rate] == [0, 1, 2, 3]
    assert all(r["finished"] == r["requests"] for r in at_rate)
    assert {r["seed"] for r in doc["seed_rows"]} == {0, 1, 2, 3}


def test_where_prebles_rate_does_not_hold_the_sweep_steps_down_below_it(monkeypatch):
    monkeypatch.setattr(compare, "MULTIPLIERS", (1.0, 1.25))
    r = compare.compare_one("loogle", 2, 20.0, 0.1, 0, sweep_seeds=2)
    assert [
        (row["rate"], row["seed"], row["finished"] == row["requests"]) for row in r["sweep"]
    ] == [
        (6.0, 0, False),
        (5.4, 0, True),
        (5.4, 1, False),  # a rate holds only if it holds on every sweep seed
        (4.8, 0, True),
        (4.8, 1, True),
    ]
    assert r["rate"] == 4.8 and {row["requests"] for row in r["rows"]} == {96}


def test_where_no_rate_holds_the_comparison_runs_at_the_lowest_one_tried(monkeypatch):
    monkeypatch.setattr(compare, "MULTIPLIERS", (1.0,))
    r = compare.compare_one("videoqa", 2, 10.0, 0.1, 0, sweep_seeds=1)
    assert [row["rate"] for row in r["sweep"]] == [10.0, 9.0, 8.0, 7.0, 6.0, 5.0]
    assert r["rate"] == 5.0 and "does not finish every request even at 5/s" in r["lines"][6]


def test_resume_reruns_only_the_workloads_an_interrupted_run_left(tmp_path, monkeypatch):
    out = tmp_path / "c.json"
    args = ["--gpus", "2", "--duration", "5", "--workloads", "loogle,apps", "--out", str(out)]
    args += ["--rates-from", str(tmp_path / "rates.json")]
    (tmp_path / "rates.json").write_text(json.dumps({"selected_rates": {"loogle": 3, "apps": 2}}))
    assert compare.main(args) == 0
    first = json.loads(out.read_text())
    partial = out.with_suffix(".partial.jsonl")
    loogle_line, apps_line = partial.read_text().splitlines()  # one job at a time: in order
    stale = json.loads(apps_line) | {"job": ["apps", 2, 99.0, 0.1, 0, 3, 2, 1]}
    partial.write_text(loogle_line + "\n" + json.dumps(stale) + "\n")  # apps: other arguments
    ran: list[str] = []
    real = compare.compare_one
    monkeypatch.setattr(compare, "compare_one", lambda *a, **k: ran.append(a[0]) or real(*a, **k))
    assert compare.main([*args, "--resume"]) == 0
    assert ran == ["apps"]
    assert json.loads(out.read_text())["config"]["resumed"] == ["loogle"]
    assert json.loads(out.read_text())["rows"] == first["rows"]
    assert sorted(json.loads(x)["name"] for x in partial.read_text().splitlines()) == [
        "apps",
        "loogle",
    ]


def _loogle_at_3_per_s(tmp_path, monkeypatch, config_arg: int, *flags: str):
    """Every policy on LooGLE at 3/s on 2 GPUs with ``flags``: the output JSON and the config
    (positional argument ``config_arg`` of ``simulate``) each run got."""
    seen: list = []
    real = compare.simulate
    monkeypatch.setattr(
        compare, "simulate", lambda *a, **k: seen.append(a[config_arg]) or real(*a, **k)
    )
    out = tmp_path / "c.json"
    (tmp_path / "rates.json").write_text(json.dumps({"selected_rates": {"loogle": 3}}))
    args = ["--gpus", "2", "--duration", "5", "--workloads", "loogle", "--out", str(out)]
    assert compare.main([*args, "--rates-from", str(tmp_path / "rates.json"), *flags]) == 0
    assert len(seen) == len(compare.POLICY_NAMES)
    return json.loads(out.read_text()), seen


def test_set_overrides_the_scheduler_config_of_every_run(tmp_path, monkeypatch):
    flags = ("--set", "explore_prefill_window_s=30", "--set", "online_fit=false")
    doc, seen = _loogle_at_3_per_s(tmp_path, monkeypatch, 3, *flags)
    assert {(c.explore_prefill_window_s, c.online_fit) for c in seen} == {(30.0, False)}
    overrides = doc["config"]["scheduler_overrides"]
    assert overrides == {"explore_prefill_window_s": 30.0, "online_fit": False}


def test_sim_set_overrides_the_engines_of_every_run_and_sizes_the_references(tmp_path, monkeypatch):
    flags = ("--sim-set", "host_kv_tokens=900000")
    doc, seen = _loogle_at_3_per_s(tmp_path, monkeypatch, 2, *flags)
    assert {(c.host_kv_tokens, c.gpus) for c in seen} == {(900_000, 2)}
    assert doc["config"]["engine_overrides"] == {"host_kv_tokens": 900_000}
    rows = doc["rows"]
    assert all(0 <= r["host_hit_rate"] <= r["hit_rate"] for r in rows)
    # The pooled references hold what two 900k-token host tiers hold.
    accepted = compare.accept(compare.requests_for("loogle", 3, 5.0, 0), 131_072)[0]
    pooled = compare.pooled_lru_hit_rate(accepted, 2 * 900_000)
    assert {r["pooled_lru_hit_rate"] for r in rows} == {round(pooled, 6)}


@pytest.mark.parametrize(
    ("flag", "pair", "message"),
    [
        (
            "--set",
            "no_such_field=1",
            "--set no_such_field=1: expected FIELD=VALUE with FIELD one of",
        ),
        ("--set", "new_prefix_slack", "--set new_prefix_slack: expected FIELD=VALUE"),
        ("--set", "new_prefix_slack=wide", "--set new_prefix_slack=wide: 'wide' is not a float"),
        ("--set", "__doc__=x", "--set __doc__=x: expected FIELD=VALUE with FIELD one of"),
        ("--set", "online_fit=flase", "--set online_fit=flase: 'flase' is not a bool"),
        ("--set", "new_prefix_slack=-1", "--set: SchedulerConfig.new_prefix_slack must be >= 0"),
        ("--sim-set", "gpus=4", "--sim-set gpus=4: expected FIELD=VALUE with FIELD one of"),
        ("--sim-set", "host_kv_tokens=10", "--sim-set: SimConfig.host_kv_tokens must be 0 (no"),
        ("--sim-set", "host_load_per_token_s=x", "--sim-set host_load_per_token_s=x: 'x' is not"),
    ],
)
def test_a_bad_set_is_a_usage_error_naming_it(flag, pair, message, capsys):
    with pytest.raises(SystemExit) as exc:
        compare.main(["--workloads", "loogle", flag, pair])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_mooncake_without_its_trace_is_a_clear_error_and_the_default_says_it_is_left_out(
    tmp_path, capsys
):
    p = compare._parser()
    missing = tmp_path / "no_trace.jsonl"
    with pytest.raises(SystemExit) as exc:
        compare._workload_names(p, "toolbench,mooncake", missing)
    assert exc.value.code == 2
    assert f"needs the Mooncake trace at {missing}" in capsys.readouterr().err
    assert "mooncake" not in compare._workload_names(p, None, missing)
    assert f"mooncake left out: no trace at {missing}" in capsys.readouterr().err
    missing.write_text("")
    assert compare._workload_names(p, None, missing)[-1] == "mooncake"
    assert compare._workload_names(p, "apps,mooncake", missing) == ["apps", "mooncake"]
