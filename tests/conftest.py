"""Test setup: without CUDA, Triton kernels run in the CPU interpreter (set before triton is imported)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SPARSE_ATTN_NO_AUTOTUNE", "1")  # tests launch each shape's preferred config (fits the chip)

import pytest  # noqa: E402

# Test shapes are small: one thread avoids OpenMP contention, which made small ops up to
# 70x slower when the 2-core machine was busy.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: slower tests (still run in CI)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test runs on one intra-op thread, also after one that changed it (the CLI's --threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
