"""Fixtures of the model tier."""

from __future__ import annotations

from types import ModuleType

import pytest


@pytest.fixture(scope="session")
def cpu_ops() -> ModuleType:
    """sluice's compiled CPU operators (built on first use); the test skips without a
    compiler."""
    from sluice.model.cpu_ops import load_cpu_ops
    ops = load_cpu_ops()
    if ops is None:
        pytest.skip("no C++ compiler: the CPU operators cannot be built here")
    return ops
