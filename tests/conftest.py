"""Shared test set-up.

Triton kernels are tested on the CPU through Triton's interpreter when no GPU is present;
the variable must be set before any kernel module is imported. GPU tests carry the `gpu`
marker and are skipped here; the GPU is never queried at import of a test module beyond
torch.cuda.is_available(), which does not create a context.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
