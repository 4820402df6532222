"""Fixtures shared by every test directory (unit, e2e, mpi, slurm).

``tiny_model``: the path of the tiny random-weight Llama that vLLM loads without a download.
``make test`` exports ``PREBLE_TINY_MODEL`` (built once by ``make``); a bare ``pytest`` builds
one per session into a temporary folder instead (a second or two, no network).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TINY_MODEL_ENV = "PREBLE_TINY_MODEL"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get(TINY_MODEL_ENV)
    if given and (Path(given) / "config.json").exists():
        return Path(given)
    from preble_hpc.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))
