"""Shared test data for the CKA math: a small random linear+ReLU network, so layers have real structure."""

from __future__ import annotations

import numpy as np
import pytest


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
