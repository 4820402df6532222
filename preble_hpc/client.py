"""`preble-hpc client`: send prompts to a running `preble-hpc serve` and stream the output.

    preble-hpc client --addr-file preble-1234.addr --prompt "Hello" --max-tokens 64
    preble-hpc client --addr node17:50051 --file prompts.txt      (one prompt a line, or JSONL)
    preble-hpc client --addr-file F --stats                       (the job's load and cache stats)

Output text streams to stdout as it is generated; a one-line summary of each request (finish
reason, tokens, cached tokens, serving rank, scheduler decision, TTFT) goes to stderr. A gRPC
error prints its status and message and exits 1; bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EXIT_RPC_ERROR = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preble-hpc client",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[1:]),
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--addr", help="HOST:PORT of rank 0")
    where.add_argument(
        "--addr-file",
        help="file holding HOST:PORT (written by serve --addr-file, "
        "e.g. preble-<jobid>.addr in the Slurm submit folder)",
    )
    parser.add_argument(
        "--wait-s",
        type=float,
        default=0.0,
        help="wait up to this long for --addr-file to appear (job starting)",
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="prompt text")
    what.add_argument(
        "--file",
        help="prompts: text (one a line) or JSONL ({'prompt': ...} or "
        "{'messages': [...]}, optional sampling fields); '-' reads stdin",
    )
    what.add_argument("--stats", action="store_true", help="print the job's stats as JSON")
    what.add_argument(
        "--health",
        action="store_true",
        help="print the health status (SERVING / NOT_SERVING); exit 1 unless SERVING",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="send each prompt as one user chat message (model's chat template)",
    )
    sampling = parser.add_argument_group("sampling (unset: the server's defaults)")
    sampling.add_argument("--max-tokens", type=int)
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--top-k", type=int)
    sampling.add_argument("--seed", type=int)
    sampling.add_argument("--stop", action="append", help="stop string (repeatable)")
    sampling.add_argument("--ignore-eos", action="store_true", default=None)
    parser.add_argument("--timeout-s", type=float, help="deadline of each request")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per request (text, tokens, usage, rank, ...) "
        "instead of streaming text",
    )
    parser.add_argument("--quiet", action="store_true", help="no per-request summary on stderr")
    return parser


def resolve_address(args: argparse.Namespace) -> str:
    if args.addr:
        return args.addr
    path = Path(args.addr_file)
    deadline = time.monotonic() + args.wait_s
    while not path.exists():
        if time.monotonic() >= deadline:
            raise FileNotFoundError(
                f"--addr-file {str(path)!r} does not exist (the server writes it once every "
                f"worker is ready; --wait-s N waits for it)"
            )
        time.sleep(0.2)
    address = path.read_text(encoding="utf-8").strip()
    if not address:
        raise ValueError(f"--addr-file {str(path)!r} is empty")
    return address


def _requests(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Input items as dicts with 'prompt' or 'messages' and optional sampling fields."""
    if args.prompt is not None:
        yield {"prompt": args.prompt}
        return
    stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
    with stream:
        for lineno, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{args.file}:{lineno}: bad JSON: {exc}") from exc
                if not isinstance(item, dict):
                    raise ValueError(f"{args.file}:{lineno}: expected a JSON object")
                yield item
            else:
                yield {"prompt": line.rstrip("\r\n")}


_SAMPLING_NAMES = ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos")


def build_request(item: dict[str, Any], args: argparse.Namespace):
    from preble_hpc._proto import preble_pb2 as pb

    req = pb.GenerateRequest(request_id=str(item.get("id", "")))
    if "messages" in item:
        for m in item["messages"]:
            req.messages.messages.add(role=m["role"], content=m["content"])
    elif args.chat:
        req.messages.messages.add(role="user", content=item["prompt"])
    else:
        req.prompt = item["prompt"]
    sampling = dict(item.get("sampling") or {})
    sampling.update({k: item[k] for k in (*_SAMPLING_NAMES, "stop") if k in item})
    for name in _SAMPLING_NAMES:
        value = getattr(args, name)
        if value is not None:
            sampling.setdefault(name, value)
    if args.stop:
        sampling.setdefault("stop", args.stop)
    stop = sampling.pop("stop", None)
    for name, value in sampling.items():
        setattr(req.sampling, name, value)
    if stop:
        req.sampling.stop.extend([stop] if isinstance(stop, str) else stop)
    return req


def _summary(final) -> str:
    u = final.usage
    return (
        f"[{final.request_id}: {final.finish_reason}, prompt {u.prompt_tokens} tokens "
        f"({u.cached_tokens} cached), completion {u.completion_tokens}, rank {final.rank} "
        f"({final.decision}), ttft {final.ttft_s * 1000:.1f} ms, "
        f"latency {final.latency_s * 1000:.1f} ms]"
    )


def run_generate(stub, req, args: argparse.Namespace) -> None:
    text: list[str] = []
    ids: list[int] = []
    final = None
    for response in stub.Generate(req, timeout=args.timeout_s):
        if response.HasField("delta"):
            if args.json:
                text.append(response.delta.text)
                ids.extend(response.delta.token_ids)
            else:
                sys.stdout.write(response.delta.text)
                sys.stdout.flush()
        if response.HasField("final"):
            final = response.final
    if final is None:
        raise RuntimeError("the stream ended without a final message")
    if args.json:
        from google.protobuf.json_format import MessageToDict

        out = {
            "text": "".join(text),
            "token_ids": ids,
            **MessageToDict(final, preserving_proto_field_name=True),
        }
        print(json.dumps(out), flush=True)
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if not args.quiet:
        print(_summary(final), file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not (args.prompt is not None or args.file or args.stats or args.health):
        print(
            "preble-hpc client: error: give --prompt, --file, --stats or --health", file=sys.stderr
        )
        return EXIT_USAGE
    import grpc

    from preble_hpc._proto import preble_pb2 as pb
    from preble_hpc._proto import preble_pb2_grpc as pb_grpc

    try:
        address = resolve_address(args)
    except (OSError, ValueError) as exc:
        print(f"preble-hpc client: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with grpc.insecure_channel(address) as channel:
            if args.health:
                from grpc_health.v1 import health_pb2, health_pb2_grpc

                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=args.timeout_s or 10
                )
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                print(name)
                return 0 if name == "SERVING" else EXIT_RPC_ERROR
            stub = pb_grpc.PrebleStub(channel)
            if args.stats:
                stats = stub.GetStats(pb.GetStatsRequest(), timeout=args.timeout_s or 30)
                print(json.dumps(json.loads(stats.stats_json), indent=2, sort_keys=True))
                return 0
            for item in _requests(args):
                run_generate(stub, build_request(item, args), args)
    except grpc.RpcError as exc:
        code = exc.code()
        name = code.name if code is not None else "UNKNOWN"
        print(
            f"\npreble-hpc client: error: {name} from {address}: {exc.details()}", file=sys.stderr
        )
        return EXIT_RPC_ERROR
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"preble-hpc client: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0
