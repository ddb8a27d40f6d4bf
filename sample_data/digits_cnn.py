"""The small convolutional network of the sample data (8x8 handwritten digits, 10 classes).

Load network A with the torch plugin as factory + weights::

    cka-extract sample_data/digits_cnn.py:make_model --weights sample_data/cnn_a.safetensors ...

Network B is the same architecture trained from another seed and exported to ONNX
(``sample_data/cnn_b.onnx``); see ``make_sample_data.py`` and ``README.md``.

The module names are the layer names a comparison matches on, in model order::

    conv1 bn1 relu1  conv2 bn2 relu2 pool2  conv3 relu3  gap flatten  fc1 relu4  fc2

Input ``pixels``: float32 ``(batch, 1, 8, 8)`` scaled to [0, 1]. Output: logits ``(batch, 10)``.
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """conv-BN-ReLU, conv-BN-ReLU-maxpool, conv-ReLU, global average pool, two linear layers."""

    def __init__(self, width: int = 16, n_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)  # 8x8 -> 4x4
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(2 * width, 64)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(64, n_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(pixels)))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.conv3(x))
        x = self.flatten(self.gap(x))
        return self.fc2(self.relu4(self.fc1(x)))


def make_model(width: int = 16) -> nn.Module:
    """A freshly initialised :class:`DigitsCNN` (load ``cnn_a.safetensors`` into it for network A)."""
    return DigitsCNN(width=width)
