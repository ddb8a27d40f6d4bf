"""Shared test data for the CKA math: a small random linear+ReLU network, so layers have real structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def relu_chain(n: int, seed: int) -> list[np.ndarray]:
    """Five float64 layers (n, d): input, two ReLU layers, a linear readout and an unrelated noise layer."""
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((n, 10))
    h1 = np.maximum(x0 @ rng.standard_normal((10, 24)) / np.sqrt(10) + 0.3, 0.0)
    h2 = np.maximum(h1 @ rng.standard_normal((24, 16)) / np.sqrt(24), 0.0)
    h3 = h2 @ rng.standard_normal((16, 6))
    noise = rng.standard_normal((n, 7))
    return [x0, h1, h2, h3, noise]


@pytest.fixture
def chain() -> list[np.ndarray]:
    return relu_chain(256, seed=0)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These tests run thousands of tiny ops; on a busy 2-core box, intra-op threads make them 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["numpy", "torch"])
def lib(request) -> str:
    """The array library the math runs on: numpy (the CPU analysis) or torch (CUDA, and tensor callers)."""
    return request.param


def as_lib(lib: str, a: np.ndarray):
    """``a`` as a C-contiguous array of ``lib`` (same dtype)."""
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a) if lib == "torch" else a
