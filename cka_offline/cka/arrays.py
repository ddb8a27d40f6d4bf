"""Numpy arrays and torch tensors through one small set of helpers, so the CKA math is written once.

torch is never imported here: a tensor can only exist once the caller has imported torch, so
``sys.modules`` tells whether an object can be one. Dtypes are handled by name (``"float32"``).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = ["is_tensor", "dtype_name", "name_of", "wider", "astype", "to_numpy", "FLOAT_NAMES"]

#: floating dtypes the math accepts as input, narrowest first
FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
_RANK = {"float16": 0, "bfloat16": 0, "float32": 1, "float64": 2}


def is_tensor(x: Any) -> bool:
    """True for a torch.Tensor (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def dtype_name(dtype: Any) -> str:
    """``"float32"`` for ``"float32"``, ``np.float32``, ``np.dtype("float32")`` or ``torch.float32``."""
    if isinstance(dtype, str):
        return dtype
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    try:
        return np.dtype(dtype).name
    except TypeError:
        raise ValueError(f"not a dtype: {dtype!r}") from None


def name_of(x: Any) -> str:
    """The dtype name of an array or tensor."""
    return dtype_name(x.dtype)


def wider(*names: str) -> str:
    """The widest of floating dtype names (float16 and bfloat16 together widen to float32)."""
    names = tuple(dict.fromkeys(names))
    if set(names) == {"float16", "bfloat16"}:
        return "float32"
    return max(names, key=lambda n: _RANK[n])


def astype(x: Any, name: str, *, copy: bool = False) -> Any:
    """``x`` as dtype ``name`` in its own library (and device); no copy when it has that dtype already,
    unless ``copy``."""
    if is_tensor(x):
        import torch

        return x.to(getattr(torch, name), copy=copy)
    return x.astype(name, copy=copy)


def to_numpy(x: Any) -> np.ndarray:
    """A numpy array of ``x`` (a tensor is moved to the host; a numpy array is returned as is)."""
    if is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)
