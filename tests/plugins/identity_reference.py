"""An independent reference of the torch extractor's model identity, written from its definition in
plugins/torch/cka_offline_torch/identity.py's docstring (not by calling it)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def files_sha(paths: Iterable[str | Path]) -> str:
    """Content of a set of files: the sorted SHA-256 of each, one a line, hashed."""
    each = sorted(hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in set(map(str, paths)))
    return hashlib.sha256("\n".join(each).encode()).hexdigest()


def state_sha(model) -> str:
    """Every parameter and buffer by name (buffers as ``buffer:NAME``), sorted, with dtype, shape and bytes."""
    items = [(n, t) for n, t in model.named_parameters(remove_duplicate=False)]
    items += [(f"buffer:{n}", t) for n, t in model.named_buffers(remove_duplicate=False)]
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in sorted(items, key=lambda item: item[0]):
        array = tensor.detach().cpu().contiguous()
        digest.update(f"|{name}|{array.dtype}|{tuple(array.shape)}|".encode())
        if array.numel():
            digest.update(np.ascontiguousarray(array.reshape(-1).view(__import__("torch").uint8).numpy()).tobytes())
    return digest.hexdigest()


def identity(code: str, state: str) -> str:
    return hashlib.sha256(f"cka-offline torch model identity 1\ncode {code}\nstate {state}\n".encode()).hexdigest()
