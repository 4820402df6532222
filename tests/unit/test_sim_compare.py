"""bench/compare_policies.py's summary: the best baseline is chosen among those that finished."""

import importlib.util
from pathlib import Path

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
