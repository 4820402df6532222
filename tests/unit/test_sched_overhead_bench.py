"""The scheduler-overhead benchmark runs end to end (tiny sizes) and writes its documented rows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "sched_overhead.py"


def test_bench_writes_rows_with_the_documented_keys(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("sched_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "rows.json"
    argv = ["--ranks", "4", "--prompt-tokens", "256", "--decisions", "300"]
    argv += ["--warmup-tokens", "20000", "--tree-cap", "40000", "--kv-tokens", "8000"]
    argv += ["--gc", "default"]  # rank0 would freeze this test process's heap
    assert module.main(argv + ["--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1
    row = rows[0]
    for key in ("ranks", "prompt_tokens", "decisions_per_s", "p50_ms", "p99_ms"):
        assert key in row
    assert (row["ranks"], row["prompt_tokens"]) == (4, 256)
    assert 20000 <= row["tree_tokens"] <= 40000 and row["rss_mb"] > 0
    assert row["events_per_decision"] > 1  # engines evict: the tree follows their reports
    assert "dec/s" in capsys.readouterr().out
