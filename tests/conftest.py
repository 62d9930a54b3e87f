"""Shared test set-up: the Triton interpreter on CPU-only machines, a NaN-poisoning fixture, `slow`."""
import os

import pytest
import torch

# Triton decides at decoration time whether a kernel is interpreted, so this must run before any test
# module imports a kernel module. On a GPU machine the kernels run on the device instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long exhaustive grids; run them with `pytest -m slow`")


def pytest_collection_modifyitems(config, items):
    # Slow tests run only when asked for by a marker expression that names them.
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with `pytest -m slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def nan_empty(monkeypatch):
    """Makes floating `torch.empty` return NaN-filled tensors, so outputs a kernel leaves unwritten fail."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", poisoned)
    yield
