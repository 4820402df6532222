"""The invalid GenerateRequests every ingress must answer INVALID_ARGUMENT, with a word of the
message each must contain: shared by the unit tests (fake workers) and the end-to-end tests (real
vLLM), so both hold the server to the same list."""

from __future__ import annotations

from preble_hpc._proto import preble_pb2 as pb


def invalid_requests(max_model_len: int) -> list[tuple[dict, str]]:
    """``(GenerateRequest keyword arguments, expected substring of the error)`` pairs."""
    return [
        ({}, "no input"),
        ({"prompt": ""}, "prompt is empty"),
        ({"token_ids": pb.TokenIds()}, "token_ids is empty"),
        ({"token_ids": pb.TokenIds(ids=[10**6])}, "out of the vocabulary"),
        ({"messages": pb.ChatMessages()}, "messages is empty"),
        ({"prompt": "x" * max_model_len}, "max_model_len"),
        ({"token_ids": pb.TokenIds(ids=[5] * max_model_len)}, "max_model_len"),
        ({"prompt": "x", "sampling": pb.SamplingParams(max_tokens=0)}, "max_tokens"),
        ({"prompt": "x", "sampling": pb.SamplingParams(temperature=-0.5)}, "temperature"),
        ({"prompt": "x", "sampling": pb.SamplingParams(temperature=float("nan"))}, "temperature"),
        ({"prompt": "x", "sampling": pb.SamplingParams(temperature=float("inf"))}, "temperature"),
        ({"prompt": "x", "sampling": pb.SamplingParams(top_p=0.0)}, "top_p"),
        ({"prompt": "x", "sampling": pb.SamplingParams(top_p=1.5)}, "top_p"),
        ({"prompt": "x", "sampling": pb.SamplingParams(top_k=-7)}, "top_k"),
        ({"prompt": "x", "sampling": pb.SamplingParams(stop=[""])}, "stop"),
        ({"prompt": "x", "request_id": "r" * 300}, "request_id"),
    ]
