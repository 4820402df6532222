"""Connect, print ``{"event": "ready"}``, wait for a line on stdin, then open N streaming
Generate calls at once and read them all to the end, printing JSON lines:
``{"event": "first_token", "request": i, "tokens": n}`` as soon as request i streams its first
message (``n`` tokens in it), ``progress`` lines as it goes, then one
``{"event": "done", ...}`` per request (tokens received, finish reason, or the gRPC status code
that ended it). Every line carries the wall time ``t``, to line it up with the job's logs.

Run as a separate process by the Slurm drain test, so that all the drain requests reach rank 0
at the same moment and nothing in the test process streams while the job is signalled. It starts
(imports, connects) before the engines get busy: on a 2-core machine with an engine decoding,
starting a Python process can take a minute.
Usage: python drain_client.py ADDR N MAX_TOKENS
"""

from __future__ import annotations

import concurrent.futures
import json
import sys
import threading
import time

import grpc

from preble_hpc._proto import preble_pb2 as pb
from preble_hpc._proto import preble_pb2_grpc as pb_grpc

_print_lock = threading.Lock()
#: A ``progress`` line every this many tokens: how far behind the server the client reads.
_PROGRESS_EVERY = 5000


def emit(record: dict) -> None:
    with _print_lock:
        print(json.dumps({**record, "t": round(time.time(), 3)}), flush=True)


def read(stub: pb_grpc.PrebleStub, i: int, max_tokens: int) -> dict:
    tokens = 0
    finish = None
    request = pb.GenerateRequest(
        prompt=f"drain me {i}",
        sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )
    try:
        # A deadline past test_slurm.DRAIN_TIMEOUT_S: rank 0's drain bound, not ours, ends it.
        for response in stub.Generate(request, timeout=1200):
            got = len(response.delta.token_ids)
            if tokens == 0 and got:
                emit({"event": "first_token", "request": i, "tokens": got})
            elif tokens // _PROGRESS_EVERY < (tokens + got) // _PROGRESS_EVERY:
                emit({"event": "progress", "request": i, "tokens": tokens + got})
            tokens += got
            if response.HasField("final"):
                finish = response.final.finish_reason
    except grpc.RpcError as exc:
        return {"request": i, "tokens": tokens, "finish_reason": None, "code": exc.code().name}
    return {"request": i, "tokens": tokens, "finish_reason": finish, "code": "OK"}


def main(addr: str, n: int, max_tokens: int) -> int:
    with grpc.insecure_channel(addr) as channel:
        grpc.channel_ready_future(channel).result(timeout=120)
        stub = pb_grpc.PrebleStub(channel)
        emit({"event": "ready"})
        if not sys.stdin.readline():
            return 1  # the test ended without asking for the requests
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            for result in pool.map(lambda i: read(stub, i, max_tokens), range(n)):
                emit({"event": "done", **result})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
