"""Shared pytest fixtures: the devices to test on, the needs_cuda marker, and per-test seeding."""

import pytest
import torch

# The devices present here; op tests take the `device` fixture below, whose CUDA variant always
# exists (so a CPU-only run still lists it, skipped) and carries the needs_cuda marker.
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: the test needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    # A fixed seed per test keeps each test reproducible on its own, whatever ran before it.
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)])
def device(request):
    return request.param
