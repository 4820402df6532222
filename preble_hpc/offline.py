"""`preble-hpc batch`: offline inference over a prompt file, as one MPI job of N+1 ranks.

    mpiexec -n 3 preble-hpc batch --model PATH --input prompts.jsonl --output out.jsonl

Input (one of):
  * JSONL: one object a line: ``id`` (string or integer; default ``line-N``), exactly one of
    ``prompt`` (text) or ``messages`` (chat, rendered with the model's chat template), optional
    sampling fields (``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``,
    ``ignore_eos``) at the top level or under ``sampling``, optional ``metadata`` (copied to the
    output). A file ending in .jsonl/.ndjson/.json, or whose first line starts with ``{``.
  * plain text: one prompt a line, ids ``line-N`` (N counts from 1; blank lines are skipped).
  * a folder: every ``*.txt`` file is one prompt, its id the file name without ``.txt``.

Output: JSONL appended as requests finish (fsynced every ``--sync-every-s``), one line per request:
``id, text, token_ids, prompt_tokens, cached_tokens, completion_tokens, finish_reason, rank,
decision, latency_s`` -- or ``id, error, error_kind, rank, decision, latency_s`` for a request
that failed. A rerun with the same output skips the ids already in it (resume after a crash or
a time limit). A duplicate or malformed input line is reported with its line number; the rest
runs, and the exit code is then 1.

Memory stays flat for any input size: the input is read lazily, at most ``--max-inflight``
requests are in flight, and the ids seen are kept as 8-byte hashes (``IdSet``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preble_hpc.cli_args import add_job_args, job_config_from_args
from preble_hpc.config import ConfigError
from preble_hpc.messages import SAMPLING_FIELDS, SamplingSpec
from preble_hpc.mpi_job import EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_USAGE, run_job

log = logging.getLogger("preble_hpc.batch")

#: Exit code when some input lines were bad or some requests failed; mpi_job has the others:
#: 2 usage, 3 a worker failed, 130 interrupted (SIGTERM/SIGINT: rerun to resume).
EXIT_PARTIAL = 1

#: Error kinds that say nothing about the request itself (a worker died, the job is stopping):
#: such a request is not written to the output, so that a rerun runs it again.
RETRY_KINDS = frozenset(
    {"unavailable", "internal", "deadline_exceeded", "cancelled", "resource_exhausted"}
)

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_LINE_KEYS = ("id", "prompt", "messages", "sampling", "metadata", *SAMPLING_FIELDS)


# ---------------------------------------------------------------------------- input


@dataclass(slots=True)
class InputItem:
    """One request read from the input."""

    where: str  # "FILE:LINE" or the file's path, for messages
    request_id: str
    prompt: str | None
    messages: list[dict[str, Any]] | None
    sampling: SamplingSpec
    metadata: Any = None


@dataclass(slots=True)
class BadLine:
    """An input line that cannot become a request; reported, never fatal."""

    where: str
    message: str


def _input_format(path: Path) -> str:
    if path.is_dir():
        return "dir"
    if path.suffix.lower() in _JSONL_SUFFIXES:
        return "jsonl"
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                return "jsonl" if line.lstrip().startswith("{") else "text"
    return "text"


def read_inputs(
    path: str | Path, defaults: dict[str, Any] | None = None
) -> Iterator[InputItem | BadLine]:
    """Yield the requests of ``path`` lazily, in order; ``defaults``: sampling fields applied
    where a line sets none."""
    path = Path(path)
    defaults = dict(defaults or {})
    fmt = _input_format(path)
    if fmt == "dir":
        yield from _read_dir(path, defaults)
        return
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path.name}:{lineno}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                yield BadLine(where, f"not UTF-8 text ({exc.reason} at byte {exc.start})")
                continue
            if not line.strip():
                continue
            if fmt == "text":
                yield _item(where, f"line-{lineno}", line, None, defaults, None)
            else:
                yield _parse_json_line(where, lineno, line, defaults)


def _read_dir(folder: Path, defaults: dict[str, Any]) -> Iterator[InputItem | BadLine]:
    files = sorted(p for p in folder.iterdir() if p.suffix == ".txt" and p.is_file())
    for p in files:
        where = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            yield BadLine(where, f"cannot read: {exc}")
            continue
        if not text.strip():
            yield BadLine(where, "empty prompt file")
            continue
        yield _item(where, p.stem, text, None, defaults, None)


def _parse_json_line(
    where: str, lineno: int, line: str, defaults: dict[str, Any]
) -> InputItem | BadLine:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return BadLine(where, f"invalid JSON: {exc.msg} (column {exc.colno})")
    if not isinstance(obj, dict):
        return BadLine(where, f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_LINE_KEYS))
    if unknown:
        return BadLine(where, f"unknown key(s) {unknown}; valid keys: {list(_LINE_KEYS)}")
    rid = obj.get("id", f"line-{lineno}")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        return BadLine(where, f"'id' must be a non-empty string or an integer, got {rid!r}")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        return BadLine(where, "give exactly one of 'prompt' (text) or 'messages' (chat)")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        return BadLine(where, "'prompt' must be a non-empty string")
    nested = obj.get("sampling")
    if nested is not None and not isinstance(nested, dict):
        return BadLine(where, "'sampling' must be an object")
    sampling = {**(nested or {}), **{k: obj[k] for k in SAMPLING_FIELDS if k in obj}}
    return _item(where, str(rid), prompt, messages, {**defaults, **sampling}, obj.get("metadata"))


def _item(
    where: str, rid: str, prompt: str | None, messages: Any, sampling: dict[str, Any], metadata: Any
) -> InputItem | BadLine:
    try:
        spec = SamplingSpec.from_dict(sampling)
    except (TypeError, ValueError) as exc:
        return BadLine(where, f"bad sampling: {exc}")
    return InputItem(where, rid, prompt, messages, spec, metadata)


class IdSet:
    """A set of request ids in 16 bytes per id: 64-bit hashes in an open-addressing table.

    Ten million ids take ~320 MB as Python strings in a set and ~160 MB here. Two different
    ids collide with probability ~n^2/2^65 (3e-6 at ten million).
    """

    def __init__(self) -> None:
        self._table = np.zeros(1024, dtype=np.uint64)
        self._n = 0

    @staticmethod
    def _key(request_id: str) -> int:
        h = int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")
        return h or 1  # 0 marks an empty slot

    def _slot(self, key: int) -> int:
        mask = len(self._table) - 1
        i = key & mask
        while True:
            v = int(self._table[i])
            if v == 0 or v == key:
                return i
            i = (i + 1) & mask

    def add(self, request_id: str) -> bool:
        """Add; False if it was already there."""
        key = self._key(request_id)
        i = self._slot(key)
        if self._table[i] != 0:
            return False
        self._table[i] = key
        self._n += 1
        if 2 * self._n > len(self._table):
            self._grow()
        return True

    def __contains__(self, request_id: str) -> bool:
        return int(self._table[self._slot(self._key(request_id))]) != 0

    def __len__(self) -> int:
        return self._n

    def _grow(self) -> None:
        old = self._table[self._table != 0]
        self._table = np.zeros(2 * len(self._table), dtype=np.uint64)
        for key in old.tolist():
            self._table[self._slot(key)] = key


# ---------------------------------------------------------------------------- output


def repair_output(path: Path) -> int:
    """Cut a torn last line (a run killed mid-write); returns the bytes dropped."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        pos = size
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                pos = pos - step + cut + 1
                break
            pos -= step
        f.truncate(pos)
        return size - pos


_ID_PREFIX = '{"id": '
_decoder = json.JSONDecoder()


def _line_id(line: str) -> str:
    """The id of an output line; lines we wrote start with it, so only the id is decoded."""
    if line.startswith(_ID_PREFIX):
        value, end = _decoder.raw_decode(line, len(_ID_PREFIX))
        if isinstance(value, str) and line[end] in ",}":
            return value
    return str(json.loads(line)["id"])


def done_ids(path: Path) -> tuple[IdSet, int]:
    """Ids already in an output file, and how many of its lines were unreadable."""
    ids, bad = IdSet(), 0
    if not path.exists():
        return ids, bad
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                ids.add(_line_id(line))
            except (ValueError, KeyError, TypeError, IndexError):
                bad += 1
    return ids, bad


class ResultWriter:
    """Appends JSON lines; flushes and fsyncs at most every ``sync_every_s`` seconds."""

    def __init__(self, path: Path, sync_every_s: float = 1.0) -> None:
        self._f = path.open("a", encoding="utf-8")
        self._sync_every_s = sync_every_s
        self._last_sync = time.monotonic()
        self._dirty = False

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._dirty = True

    def maybe_sync(self) -> None:
        if self._dirty and time.monotonic() - self._last_sync >= self._sync_every_s:
            self.sync()

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._last_sync = time.monotonic()
        self._dirty = False

    def close(self) -> None:
        self.sync()
        self._f.close()


def result_record(event: Any, metadata: Any = None) -> dict[str, Any]:
    """The output line of a ``FinalEvent``."""
    common = {
        "rank": event.rank,
        "decision": event.decision,
        "latency_s": round(event.latency_s, 6),
    }
    if event.ok:
        fin = event.result
        record = {
            "id": event.request_id,
            "text": event.text,
            "token_ids": event.token_ids,
            "prompt_tokens": fin.prompt_tokens,
            "cached_tokens": fin.cached_tokens,
            "completion_tokens": fin.completion_tokens,
            "finish_reason": fin.finish_reason,
            **common,
        }
    else:
        err = event.result
        record = {"id": event.request_id, "error": err.message, "error_kind": err.kind, **common}
    if event.rerouted_from:
        record["rerouted_from"] = list(event.rerouted_from)
    if metadata is not None:
        record["metadata"] = metadata
    return record


# ---------------------------------------------------------------------------- the run


@dataclass
class _Totals:
    ok: int = 0
    failed: int = 0  # written as error lines
    retry: int = 0  # failed for reasons outside the request; not written
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    per_rank: dict[int, dict[str, int]] = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=dict)

    def add(self, event: Any) -> None:
        if event.decision is not None:
            self.decisions[event.decision] = self.decisions.get(event.decision, 0) + 1
        if not event.ok:
            self.failed += 1
            return
        fin = event.result
        self.ok += 1
        self.prompt_tokens += fin.prompt_tokens
        self.cached_tokens += fin.cached_tokens
        self.completion_tokens += fin.completion_tokens
        rank = self.per_rank.setdefault(
            event.rank,
            {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0},
        )
        rank["requests"] += 1
        rank["prompt_tokens"] += fin.prompt_tokens
        rank["cached_tokens"] += fin.cached_tokens
        rank["completion_tokens"] += fin.completion_tokens


class BatchRun:
    """Rank 0's side of `batch`: feed the runtime lazily, write results as they come."""

    def __init__(
        self,
        args: argparse.Namespace,
        runtime: Any,
        stop: threading.Event,
        *,
        tokenizer: Any = None,
    ) -> None:
        from preble_hpc.tokenization import load_tokenizer

        self.args = args
        self.rt = runtime
        self.stop = stop
        self.tok = tokenizer if tokenizer is not None else load_tokenizer(args.tokenizer_path)
        self.output = Path(args.output)
        self.totals = _Totals()
        self.bad_lines = 0
        self.skipped = 0
        self.accepting = True  # False once interrupted: unfinished requests are not written
        self.metadata: dict[str, Any] = {}
        self.pbar: Any = None

    def run(self) -> int:
        from tqdm import tqdm

        dropped = repair_output(self.output)
        if dropped:
            print(
                f"batch: dropped a torn last line ({dropped} bytes) of {self.output} left by "
                f"an interrupted run",
                file=sys.stderr,
            )
        done, unreadable = done_ids(self.output)
        if unreadable:
            print(
                f"batch: warning: {unreadable} unreadable line(s) in {self.output} ignored",
                file=sys.stderr,
            )
        if len(done):
            print(
                f"batch: resuming: {len(done)} id(s) already in {self.output} are skipped",
                file=sys.stderr,
            )
        self.writer = ResultWriter(self.output, self.args.sync_every_s)
        self.pbar = tqdm(
            total=_count_inputs(Path(self.args.input)),
            unit="req",
            disable=self.args.no_progress,
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        start = time.monotonic()
        try:
            interrupted = self._loop(done)
        finally:
            if self.stop.is_set() or sys.exc_info()[0] is not None:
                self.accepting = False
                self.rt.shutdown(drain=False, timeout_s=self.args.shutdown_timeout_s)
            self.writer.close()
            self.pbar.close()
        return self._finish(time.monotonic() - start, interrupted)

    def _loop(self, done: IdSet) -> bool:
        """Feed and step until the input is done; True if interrupted by a signal."""
        seen = IdSet()
        items = read_inputs(self.args.input, self._sampling_defaults())
        exhausted = False
        while not self.stop.is_set():
            while not exhausted and self.rt.has_room() and self.rt.live_ranks:
                item = next(items, None)
                if item is None:
                    exhausted = True
                else:
                    self._feed(item, seen, done)
            if exhausted and self.rt.inflight == 0:
                return False
            if not self.rt.live_ranks:
                return self.stop.is_set()
            self.rt.step()
            self.writer.maybe_sync()
        return True

    def _feed(self, item: InputItem | BadLine, seen: IdSet, done: IdSet) -> None:
        from preble_hpc.rank0_scheduler.main import ClientRequest
        from preble_hpc.tokenization import TokenizationError, encode_prompt

        if isinstance(item, BadLine):
            self._report_bad(item.where, item.message)
            return
        if not seen.add(item.request_id):
            self._report_bad(
                item.where,
                f"duplicate id {item.request_id!r} (already earlier in the input); skipped",
            )
            return
        if item.request_id in done:
            self.skipped += 1
            self.pbar.update(1)
            return
        try:
            ids = encode_prompt(self.tok, prompt=item.prompt, messages=item.messages)
        except TokenizationError as exc:
            self._report_bad(item.where, str(exc))
            return
        if item.metadata is not None:
            self.metadata[item.request_id] = item.metadata
        self.rt.submit(
            ClientRequest(item.request_id, ids, item.sampling), self._on_final, stream=False
        )

    def _on_final(self, event: Any) -> None:
        if not self.accepting:
            return
        metadata = self.metadata.pop(event.request_id, None)
        self.pbar.update(1)
        error = event.error
        if error is not None and error.kind in RETRY_KINDS:
            self.totals.retry += 1
            self.pbar.write(
                f"batch: request {event.request_id!r} failed ({error.kind}): {error.message}; "
                f"not written, a rerun retries it",
                file=sys.stderr,
            )
            return
        self.writer.write(result_record(event, metadata))
        self.totals.add(event)
        if error is not None:
            self.pbar.write(
                f"batch: request {event.request_id!r} failed: {error.message}", file=sys.stderr
            )
        elif self.args.echo:
            self.pbar.write(
                f"[rank {event.rank} {event.decision} cached "
                f"{event.result.cached_tokens}/{event.result.prompt_tokens}] "
                f"{event.request_id}: {event.text[:70]!r}"
            )

    def _report_bad(self, where: str, message: str) -> None:
        self.bad_lines += 1
        self.pbar.update(1)
        self.pbar.write(f"batch: {where}: {message}", file=sys.stderr)

    def _sampling_defaults(self) -> dict[str, Any]:
        names = ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos")
        return {n: getattr(self.args, n) for n in names if getattr(self.args, n) is not None}

    def _finish(self, wall_s: float, interrupted: bool) -> int:
        summary = self.summary(wall_s, interrupted)
        print(format_summary(summary))
        if self.args.summary_json:
            Path(self.args.summary_json).write_text(json.dumps(summary, indent=2) + "\n")
        if interrupted:  # first: a signal may also have killed engines on its way
            return EXIT_INTERRUPTED
        if self.rt.failed_ranks:
            return EXIT_JOB_FAILED
        if self.bad_lines or self.totals.failed or self.totals.retry:
            return EXIT_PARTIAL
        return 0

    def summary(self, wall_s: float, interrupted: bool) -> dict[str, Any]:
        t = self.totals
        stats = self.rt.stats()
        per_rank = {}
        for rank, c in sorted(t.per_rank.items()):
            per_rank[str(rank)] = {
                **c,
                "cache_hit_rate": _ratio(c["cached_tokens"], c["prompt_tokens"]),
            }
        return {
            "input": str(self.args.input),
            "output": str(self.output),
            "policy": self.args.policy_name,
            "workers": len(stats["runtime"]["per_rank"]),
            "completed": t.ok,
            "failed": t.failed,
            "failed_not_written": t.retry,
            "skipped_done": self.skipped,
            "bad_lines": self.bad_lines,
            "interrupted": interrupted,
            "wall_s": round(wall_s, 3),
            "requests_per_s": round(t.ok / wall_s, 3) if wall_s > 0 else 0.0,
            "prompt_tokens": t.prompt_tokens,
            "cached_tokens": t.cached_tokens,
            "completion_tokens": t.completion_tokens,
            "output_tokens_per_s": round(t.completion_tokens / wall_s, 2) if wall_s > 0 else 0.0,
            "total_tokens_per_s": round((t.prompt_tokens + t.completion_tokens) / wall_s, 2)
            if wall_s > 0
            else 0.0,
            "cache_hit_rate": _ratio(t.cached_tokens, t.prompt_tokens),
            "decisions": dict(sorted(t.decisions.items())),
            "per_rank": per_rank,
            "failed_ranks": {
                str(r): why.splitlines()[0] for r, why in self.rt.failed_ranks.items()
            },
            "scheduler": stats,
        }


def _ratio(a: int, b: int) -> float:
    return round(a / b, 4) if b else 0.0


def _count_inputs(path: Path, limit_bytes: int = 1 << 30) -> int | None:
    """Progress-bar total: files in a folder, or lines of a file up to 1 GiB (else unknown)."""
    if path.is_dir():
        return sum(1 for p in path.iterdir() if p.suffix == ".txt")
    if path.stat().st_size > limit_bytes:
        return None
    n = 0
    with path.open("rb") as f:
        for line in f:
            n += bool(line.strip())
    return n


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        "",
        f"batch summary ({s['policy']}, {s['workers']} worker rank(s)):",
        f"  requests   {s['completed']} completed, {s['failed']} failed, "
        f"{s['skipped_done']} skipped (already done), {s['bad_lines']} bad input line(s)",
        f"  time       {s['wall_s']:.2f} s, {s['requests_per_s']:.2f} req/s, "
        f"{s['output_tokens_per_s']:.1f} output tok/s, {s['total_tokens_per_s']:.1f} total tok/s",
        f"  tokens     {s['prompt_tokens']} prompt ({s['cached_tokens']} cached, hit rate "
        f"{s['cache_hit_rate']:.1%}), {s['completion_tokens']} completion",
        "  decisions  " + (", ".join(f"{k} {v}" for k, v in s["decisions"].items()) or "none"),
    ]
    for rank, c in s["per_rank"].items():
        lines.append(
            f"  rank {rank:<4}  {c['requests']} requests, {c['prompt_tokens']} prompt "
            f"tokens, hit rate {c['cache_hit_rate']:.1%}, {c['completion_tokens']} "
            f"completion tokens"
        )
    for rank, why in s["failed_ranks"].items():
        lines.append(f"  FAILED     rank {rank}: {why}")
    if s["failed_not_written"]:
        lines.append(
            f"  RETRY      {s['failed_not_written']} request(s) failed for reasons outside "
            f"themselves and were not written; rerun the same command to retry them"
        )
    if s["bad_lines"]:
        lines.append(
            f"  NOTE       {s['bad_lines']} input line(s) were bad (see messages above); "
            f"exit code 1"
        )
    if s["interrupted"]:
        lines.append(
            f"  INTERRUPTED: results so far are in {s['output']}; rerun the same command "
            f"to finish the rest"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preble-hpc batch",
        description="Offline batch inference over a prompt file, as an MPI job of N+1 ranks "
        "(rank 0 schedules with E2, ranks 1..N run vLLM).",
        epilog="Run as: mpiexec -n 3 preble-hpc batch --model PATH --input FILE --output FILE",
    )
    io = parser.add_argument_group("input / output")
    io.add_argument(
        "--input",
        required=True,
        help="JSONL file, text file (one prompt a line), or a folder of .txt files",
    )
    io.add_argument("--output", required=True, help="JSONL results, appended; rerun to resume")
    io.add_argument("--summary-json", help="also write the summary as JSON here")
    io.add_argument(
        "--sync-every-s",
        type=float,
        default=1.0,
        help="flush + fsync the output at most this often (default: %(default)s)",
    )
    io.add_argument("--no-progress", action="store_true", help="no progress bar")
    io.add_argument("--echo", action="store_true", help="print each result as it finishes")
    io.add_argument("--log-level", default="WARNING", help="python logging level")
    sampling = parser.add_argument_group("default sampling (a JSONL line's own fields win)")
    sampling.add_argument("--max-tokens", type=int)
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--top-k", type=int)
    sampling.add_argument("--sampling-seed", dest="seed", type=int)
    sampling.add_argument("--ignore-eos", action="store_true", default=None)
    add_job_args(parser)
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )
    try:
        job = job_config_from_args(args)
        _check_paths(Path(args.input), Path(args.output))
        if args.sync_every_s < 0:
            raise ConfigError("--sync-every-s must be >= 0")
    except ConfigError as exc:
        print(f"preble-hpc batch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args.tokenizer_path = job.engine.tokenizer or job.engine.model
    args.policy_name = job.scheduler.policy
    return run_job(job, lambda rt, stop: BatchRun(args, rt, stop).run(), command="batch")


def _check_paths(input_path: Path, output: Path) -> None:
    """Checked on every rank before any engine starts, so a typo costs no engine start."""
    if not input_path.exists():
        raise ConfigError(f"--input {str(input_path)!r} does not exist")
    if output.is_dir():
        raise ConfigError(f"--output {str(output)!r} is a folder; give a file path")
    if not output.parent.is_dir():
        raise ConfigError(f"--output folder {str(output.parent)!r} does not exist")
    if output.resolve() == input_path.resolve():
        raise ConfigError("--output must differ from --input")
