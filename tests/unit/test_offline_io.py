"""`preble-hpc batch` without MPI: input parsing, output repair/resume, tokenization, and whole
runs of BatchRun over the in-process runtime with fake workers."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from fakes_runtime import FakeBehaviour, FakeCluster

from preble_hpc.messages import SamplingSpec
from preble_hpc.offline import (
    EXIT_INTERRUPTED,
    EXIT_PARTIAL,
    BadLine,
    BatchRun,
    IdSet,
    InputItem,
    build_parser,
    done_ids,
    main,
    read_inputs,
    repair_output,
)
from preble_hpc.tokenization import TokenizationError, encode_prompt, load_tokenizer

# ---------------------------------------------------------------------------- input parsing


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_lines_become_items_with_sampling_defaults_and_overrides(tmp_path):
    f = write(
        tmp_path / "in.jsonl",
        [
            json.dumps({"id": "a", "prompt": "hello"}),
            "",
            json.dumps(
                {
                    "id": 7,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 5,
                    "metadata": {"k": 1},
                }
            ),
            json.dumps({"prompt": "no id", "sampling": {"temperature": 0.5, "stop": "x"}}),
        ],
    )
    items = list(read_inputs(f, {"max_tokens": 9}))
    assert [type(i) for i in items] == [InputItem] * 3
    a, b, c = items
    assert (a.request_id, a.prompt, a.where) == ("a", "hello", "in.jsonl:1")
    assert a.sampling.max_tokens == 9
    assert b.request_id == "7" and b.messages[0]["content"] == "hi"
    assert b.sampling.max_tokens == 5 and b.metadata == {"k": 1}
    assert c.request_id == "line-4"  # default id names the line
    assert c.sampling == SamplingSpec(max_tokens=9, temperature=0.5, stop=("x",))


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"id": "x"}', "exactly one of 'prompt'"),
        ('{"id": "x", "prompt": "p", "messages": []}', "exactly one of 'prompt'"),
        ('{"id": "x", "prompt": ""}', "non-empty string"),
        ('{"id": "x", "prompt": "p", "colour": "red"}', "unknown key(s) ['colour']"),
        ('{"id": "x", "prompt": "p", "max_tokens": 0}', "max_tokens must be an integer >= 1"),
        (
            '{"id": "x", "prompt": "p", "sampling": {"beam": 2}}',
            "unknown sampling field(s) ['beam']",
        ),
        ('{"id": true, "prompt": "p"}', "'id' must be"),
        ('{"id": "x", "prompt": "p", "sampling": 3}', "'sampling' must be an object"),
    ],
)
def test_malformed_jsonl_lines_are_reported_with_their_line_number(tmp_path, line, message):
    f = write(
        tmp_path / "in.jsonl",
        [
            json.dumps({"id": "ok", "prompt": "fine"}),
            line,
            json.dumps({"id": "ok2", "prompt": "fine"}),
        ],
    )
    items = list(read_inputs(f))
    assert isinstance(items[0], InputItem) and isinstance(items[2], InputItem)
    bad = items[1]
    assert isinstance(bad, BadLine) and bad.where == "in.jsonl:2"
    assert message in bad.message


def test_non_utf8_line_is_bad_alone(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_bytes(
        b'{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "\xff"}\n{"id": "c", "prompt": "y"}\n'
    )
    items = list(read_inputs(f))
    assert [type(i).__name__ for i in items] == ["InputItem", "BadLine", "InputItem"]
    assert "not UTF-8" in items[1].message


def test_plain_text_file_one_prompt_a_line(tmp_path):
    f = write(tmp_path / "prompts.txt", ["first prompt", "", "third line"])
    items = list(read_inputs(f))
    assert [(i.request_id, i.prompt) for i in items] == [
        ("line-1", "first prompt"),
        ("line-3", "third line"),
    ]


def test_text_file_that_starts_with_a_brace_is_read_as_jsonl(tmp_path):
    f = write(tmp_path / "data.txt", ['{"id": "j", "prompt": "p"}'])
    [item] = read_inputs(f)
    assert item.request_id == "j"


def test_folder_of_txt_files(tmp_path):
    (tmp_path / "b.txt").write_text("second\nwith two lines")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "ignored.md").write_text("not a prompt")
    items = list(read_inputs(tmp_path))
    assert [(getattr(i, "request_id", None), type(i).__name__) for i in items] == [
        ("a", "InputItem"),
        ("b", "InputItem"),
        (None, "BadLine"),
    ]
    assert items[1].prompt == "second\nwith two lines"


def test_idset_holds_many_ids_compactly():
    s = IdSet()
    for i in range(20_000):
        assert s.add(f"id-{i}")
    assert len(s) == 20_000
    assert not s.add("id-123")
    assert "id-19999" in s and "id-20000" not in s
    assert s._table.nbytes <= 16 * 2 * 20_000 * 2


# ---------------------------------------------------------------------------- output files


def test_repair_output_cuts_a_torn_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "te')
    assert repair_output(out) == len('{"id": "c", "te')
    assert out.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    assert repair_output(out) == 0
    single = tmp_path / "single.jsonl"
    single.write_text('{"id": "torn')
    assert repair_output(single) == len('{"id": "torn') and single.read_text() == ""
    assert repair_output(tmp_path / "missing.jsonl") == 0


def test_done_ids_reads_result_and_error_lines(tmp_path):
    out = write(
        tmp_path / "out.jsonl", ['{"id": "a", "text": "x"}', '{"id": "b", "error": "e"}', "garbage"]
    )
    ids, unreadable = done_ids(out)
    assert "a" in ids and "b" in ids and len(ids) == 2 and unreadable == 1
    other = write(
        tmp_path / "other.jsonl",
        ['{"text": "x", "id": 5}', '{"id": "q\\"1", "x": 1}', '{"id": 7}', '{"id": "open'],
    )
    ids, unreadable = done_ids(other)
    assert all(i in ids for i in ("5", 'q"1', "7")) and len(ids) == 3
    assert unreadable == 1


# ---------------------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    from preble_hpc.tiny_model import CHAT_TEMPLATE, _byte_level_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_tokenizer(),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return load_tokenizer(folder)


def test_encode_prompt_text_and_chat(byte_tokenizer):
    text = encode_prompt(byte_tokenizer, prompt="hi")
    assert text == byte_tokenizer.encode("hi") and len(text) == 2
    chat = encode_prompt(byte_tokenizer, messages=[{"role": "user", "content": "hi"}])
    rendered = byte_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<|user|>hi\n<|assistant|>"
    assert chat == byte_tokenizer.encode(rendered, add_special_tokens=False)


def test_encode_prompt_errors_are_clear(byte_tokenizer):
    with pytest.raises(TokenizationError, match="exactly one"):
        encode_prompt(byte_tokenizer)
    with pytest.raises(TokenizationError, match="exactly one"):
        encode_prompt(byte_tokenizer, prompt="a", messages=[])
    with pytest.raises(TokenizationError, match=r"messages\[0\].content must be a string"):
        encode_prompt(byte_tokenizer, messages=[{"role": "user", "content": 3}])
    with pytest.raises(TokenizationError, match="non-empty list"):
        encode_prompt(byte_tokenizer, messages=[])


def test_load_tokenizer_errors_are_clear(tmp_path):
    with pytest.raises(TokenizationError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizationError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------- whole runs


class CharTokenizer:
    """Test tokenizer: one token per character."""

    chat_template = "x"

    def encode(self, text, add_special_tokens=True):
        return [3 + ord(ch) % 200 for ch in text]

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def run_batch(tmp_path, input_path, *extra, stop=None, behaviour=None, n_workers=2, max_inflight=8):
    out = tmp_path / "out.jsonl"
    args = build_parser().parse_args(
        [
            "--model",
            "fake",
            "--input",
            str(input_path),
            "--output",
            str(out),
            "--no-progress",
            "--max-tokens",
            "3",
            *extra,
        ]
    )
    args.tokenizer_path, args.policy_name = "fake", "round_robin"
    cluster = FakeCluster(n_workers, max_inflight=max_inflight, behaviour=behaviour)
    try:
        cluster.rt.wait_ready(5)
        run = BatchRun(args, cluster.rt, stop or threading.Event(), tokenizer=CharTokenizer())
        code = run.run()
    finally:
        cluster.close()
    lines = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return code, lines, run


def prompts_file(tmp_path, n: int, extra: list[str] = ()) -> Path:
    lines = [json.dumps({"id": f"q{i}", "prompt": f"question number {i}"}) for i in range(n)]
    return write(tmp_path / "in.jsonl", lines + list(extra))


def test_every_id_comes_back_once_with_all_output_keys(tmp_path):
    code, lines, run = run_batch(tmp_path, prompts_file(tmp_path, 30))
    assert code == 0
    assert sorted(r["id"] for r in lines) == sorted(f"q{i}" for i in range(30))
    keys = {
        "id",
        "text",
        "token_ids",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "finish_reason",
        "rank",
        "decision",
        "latency_s",
    }
    assert all(keys <= set(r) for r in lines)
    r = lines[0]
    assert r["completion_tokens"] == 3 and len(r["token_ids"]) == 3 and r["decision"] == "baseline"
    summary = run.summary(1.0, False)
    assert summary["completed"] == 30 and set(summary["per_rank"]) == {"1", "2"}


def test_bad_and_duplicate_lines_are_reported_and_the_rest_runs(tmp_path, capsys):
    f = prompts_file(tmp_path, 5, ["{broken", json.dumps({"id": "q1", "prompt": "again"})])
    code, lines, run = run_batch(tmp_path, f)
    assert code == EXIT_PARTIAL
    assert sorted(r["id"] for r in lines) == [f"q{i}" for i in range(5)]
    captured = capsys.readouterr()
    assert "in.jsonl:6: invalid JSON" in captured.err
    assert "in.jsonl:7: duplicate id 'q1'" in captured.err
    assert run.bad_lines == 2
    assert "5 completed, 0 failed, 0 skipped (already done), 2 bad input line(s)" in captured.out
    assert "exit code 1" in captured.out


def test_failed_requests_are_written_as_errors(tmp_path):
    f = write(
        tmp_path / "in.jsonl",
        [
            json.dumps({"id": "ok", "prompt": "fine"}),
            json.dumps({"id": "bad", "prompt": "x", "max_tokens": 13}),
        ],
    )
    code, lines, _ = run_batch(tmp_path, f)
    assert code == EXIT_PARTIAL
    by_id = {r["id"]: r for r in lines}
    assert by_id["bad"]["error"] == "13 is unlucky" and by_id["bad"]["error_kind"]
    assert "text" in by_id["ok"]


def test_rerun_resumes_skipping_done_ids(tmp_path):
    f = prompts_file(tmp_path, 12)
    out = tmp_path / "out.jsonl"
    done = [{"id": f"q{i}", "text": "earlier"} for i in range(5)]
    out.write_text("".join(json.dumps(d) + "\n" for d in done) + '{"id": "q5", "tex')  # torn
    code, lines, run = run_batch(tmp_path, f)
    assert code == 0 and run.skipped == 5
    ids = [r["id"] for r in lines]
    assert sorted(ids) == sorted(f"q{i}" for i in range(12)) and len(ids) == len(set(ids))
    code, lines2, run2 = run_batch(tmp_path, f)  # nothing left to do
    assert code == 0 and run2.skipped == 12 and lines2 == lines


def test_interrupt_keeps_finished_results_and_a_rerun_completes(tmp_path):
    f = prompts_file(tmp_path, 40)
    stop = threading.Event()
    behaviour = FakeBehaviour(step_delay_s=0.005)

    def stop_soon():
        out = tmp_path / "out.jsonl"
        while not (out.exists() and out.stat().st_size > 0) and not stop.is_set():
            stop.wait(0.01)
        stop.set()

    threading.Thread(target=stop_soon, daemon=True).start()
    code, lines, run = run_batch(
        tmp_path, f, "--sync-every-s", "0", stop=stop, behaviour=behaviour, max_inflight=4
    )
    assert code == EXIT_INTERRUPTED
    assert 0 < len(lines) < 40
    assert all("error" not in r for r in lines)  # interrupted requests are not written
    code, lines, _ = run_batch(tmp_path, f)
    ids = [r["id"] for r in lines]
    assert code == 0 and sorted(ids) == sorted(f"q{i}" for i in range(40))
    assert len(ids) == len(set(ids))


def test_worker_failure_reroutes_and_exits_non_zero(tmp_path, capsys):
    behaviour = FakeBehaviour(fail_step_ranks={2})
    code, lines, run = run_batch(tmp_path, prompts_file(tmp_path, 10), behaviour=behaviour)
    assert code == 3
    assert sorted(r["id"] for r in lines) == sorted(f"q{i}" for i in range(10))
    assert all(r["rank"] == 1 for r in lines)
    out = capsys.readouterr().out
    assert "FAILED     rank 2: RuntimeError: fake engine on rank 2 crashed" in out


def test_batch_without_mpiexec_says_how_to_launch(tmp_path, capsys):
    f = prompts_file(tmp_path, 1)
    code = main(
        ["--model", str(tmp_path), "--input", str(f), "--output", str(tmp_path / "o.jsonl")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "single process" in err and "mpiexec -n 3 preble-hpc batch" in err


def test_batch_flag_errors_fail_before_any_engine(tmp_path, capsys):
    f = prompts_file(tmp_path, 1)
    assert main(["--model", "m", "--input", str(tmp_path / "missing"), "--output", "o"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--model", "m", "--input", str(f), "--output", "o", "--policy", "nope"]) == 2
    assert "round_robin" in capsys.readouterr().err
    assert main(["--model", "m", "--input", str(f), "--output", "o", "--profile", "nope"]) == 2
    assert "profile" in capsys.readouterr().err
    assert main(["--model", "m", "--input", str(f), "--output", "o", "--max-num-seqs", "0"]) == 2
    assert "max_num_seqs must be > 0" in capsys.readouterr().err


def test_requests_lost_with_the_last_worker_are_not_written_so_a_rerun_retries_them(
    tmp_path, capsys
):
    f = prompts_file(tmp_path, 6)
    code, lines, run = run_batch(
        tmp_path, f, n_workers=1, behaviour=FakeBehaviour(fail_step_ranks={1})
    )
    assert code == 3 and lines == [] and run.totals.retry > 0
    captured = capsys.readouterr()
    assert "not written, a rerun retries it" in captured.err
    assert "rerun the same command to retry them" in captured.out
    code, lines, _ = run_batch(tmp_path, f)
    assert code == 0 and sorted(r["id"] for r in lines) == sorted(f"q{i}" for i in range(6))
