"""The checked-in gRPC stubs match proto/preble.proto (run `make proto` after editing it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import preble_hpc._proto as proto_pkg

REPO = Path(__file__).resolve().parents[2]

#: Lines that name the generator's version; a newer grpcio-tools changes only these.
_VERSION_LINES = re.compile(
    r"^(# Protobuf Python Version: .*|GRPC_GENERATED_VERSION = .*|\s+\d+,\s*$)", re.MULTILINE
)


def _normalized(path: Path) -> str:
    return _VERSION_LINES.sub("<version>", path.read_text(encoding="utf-8"))


def test_checked_in_stubs_match_a_fresh_generation(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) is not installed")
    fresh = proto_pkg.generate(tmp_path, REPO / "proto")
    for new in fresh:
        rel = new.relative_to(tmp_path)
        old = REPO / rel
        assert old.exists(), f"{rel} is missing: run `make proto`"
        assert _normalized(new) == _normalized(old), (
            f"{rel} is stale: proto/preble.proto changed; run `make proto` and commit the stubs"
        )


def test_stubs_import_and_describe_the_service():
    from preble_hpc._proto import preble_pb2, preble_pb2_grpc

    service = preble_pb2.DESCRIPTOR.services_by_name["Preble"]
    assert service.full_name == "preble.v1.Preble"
    assert {m.name for m in service.methods} == {"Generate", "GetStats"}
    assert hasattr(preble_pb2_grpc, "PrebleStub")
    # proto3 `optional`: unset sampling fields are distinguishable from zero
    assert not preble_pb2.SamplingParams().HasField("temperature")
    assert preble_pb2.SamplingParams(temperature=0).HasField("temperature")
