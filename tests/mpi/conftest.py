"""Fixtures of the MPI tests; helpers live in mpi_helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from mpi_helpers import MPIEXEC


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/mpi/" in str(item.fspath):
            item.add_marker(pytest.mark.mpi)


@pytest.fixture(scope="session")
def mpiexec() -> Path:
    if not MPIEXEC.exists():
        pytest.skip(f"{MPIEXEC} not found: `make install` installs the mpich wheel")
    return MPIEXEC
