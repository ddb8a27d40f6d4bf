"""The small CNN of the extraction benchmarks (3 x 32 x 32 inputs, 10 outputs), deterministic weights.

    cka-extract bench/cnn.py:make_model --inputs x.npz --layers conv1,relu1,...

Module names, in model order: conv1 relu1 conv2 relu2 pool2 conv3 relu3 conv4 relu4 pool4 gap flatten fc.
Input ``x``: float32 ``(batch, 3, 32, 32)``. About 40 MFLOPs per example.
"""

from __future__ import annotations

import torch
from torch import nn

#: the 8 layers the benchmarks extract
LAYERS = ("conv1", "relu1", "conv2", "relu2", "conv3", "relu3", "conv4", "relu4")


class SmallCNN(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)  # 32 -> 16
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.relu4 = nn.ReLU()
        self.pool4 = nn.MaxPool2d(2)  # 16 -> 8
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool2(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        x = self.pool4(self.relu4(self.conv4(self.relu3(self.conv3(x)))))
        return self.fc(self.flatten(self.gap(x)))


def make_model(seed: int = 0) -> SmallCNN:
    """The benchmark CNN with weights drawn from ``seed`` (no file needed)."""
    torch.manual_seed(seed)
    return SmallCNN().eval()


def export_onnx(path: str) -> None:
    """Export ``make_model()`` to ONNX (TorchScript exporter, dynamic batch, input ``x``)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            make_model(),
            (torch.zeros(2, 3, 32, 32),),
            path,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=False,
        )


def write_inputs(path: str, n: int, seed: int = 0) -> None:
    """``n`` deterministic 3 x 32 x 32 images (smooth random fields) as ``.npz`` with ``x`` and ``ids``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = np.empty((n, 3, 32, 32), dtype=np.float32)
    for start in range(0, n, 1024):
        b = min(n, start + 1024) - start
        coarse = rng.standard_normal((b, 3, 8, 8)).astype(np.float32)
        x[start : start + b] = np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)
        x[start : start + b] += 0.3 * rng.standard_normal((b, 3, 32, 32)).astype(np.float32)
    np.savez(path, x=x, ids=np.arange(n, dtype=np.int64))


def prepare(directory: str, counts: tuple[int, ...]) -> tuple[str, dict[int, str]]:
    """The CNN's ONNX export (``directory/cnn.onnx``) and inputs of each of ``counts`` examples
    (``directory/x<n>.npz``, made once): what the extraction benchmarks run."""
    import os

    model = os.path.join(directory, "cnn.onnx")
    export_onnx(model)
    inputs = {}
    for n in counts:
        inputs[n] = os.path.join(directory, f"x{n}.npz")
        if not os.path.exists(inputs[n]):
            write_inputs(inputs[n], n)
    return model, inputs
