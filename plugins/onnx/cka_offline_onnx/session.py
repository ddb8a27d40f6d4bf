"""An ``onnxruntime.InferenceSession`` as a model source (the Python API: ``extract(session, inputs, ...)``).

A session can fetch only its graph's outputs. To fetch intermediate tensors the extractor rebuilds
sessions from the model the session was made from: the file (``InferenceSession(path)``) or the bytes
(``InferenceSession(model_bytes)``), which onnxruntime's Python class keeps (``_model_path``,
``_model_bytes``). Where neither can be found (the file is gone, an ``.ort`` file, another onnxruntime),
only the session's own outputs are offered, run by the session itself, and a warning says so.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from cka_offline.extractor import LayerInfo

from .feeds import InputSpec, batch_dims

log = logging.getLogger(__name__)

#: onnxruntime's type strings of the element types numpy holds
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}
_FLOATS = ("tensor(float)", "tensor(double)", "tensor(float16)")


def is_session(obj: Any) -> bool:
    """True for an ``onnxruntime.InferenceSession`` (without importing onnxruntime: a session exists only
    if it was imported already)."""
    ort = sys.modules.get("onnxruntime")
    return ort is not None and isinstance(obj, ort.InferenceSession)


@dataclass(frozen=True)
class SessionModel:
    """Where a session's model came from: a file path, or the bytes (or neither), and a label for messages."""

    path: str | None
    data: bytes | None
    label: str
    #: why neither is there
    missing: str = ""


def session_model(session: Any) -> SessionModel:
    path = getattr(session, "_model_path", None)
    data = getattr(session, "_model_bytes", None)
    if isinstance(path, str) and os.path.isfile(path):
        return SessionModel(os.path.abspath(path), None, os.path.abspath(path))
    if isinstance(data, (bytes, bytearray)) and data:
        digest = hashlib.sha256(data).hexdigest()
        return SessionModel(None, bytes(data), f"<InferenceSession from {len(data)} bytes, sha256 {digest[:12]}>")
    why = f"its model file {path} no longer exists" if path else "the model it was built from is not recorded"
    return SessionModel(None, None, "<InferenceSession>", why)


def _dims(shape: Any) -> tuple[int | str | None, ...] | None:
    if shape is None:
        return None
    return tuple(d if isinstance(d, str) else (int(d) if isinstance(d, int) and d >= 0 else None) for d in shape)


def session_inputs(session: Any) -> list[InputSpec]:
    """The session's inputs as :class:`InputSpec`, the batch axis read from the symbols as for a graph."""
    raw = [
        (a.name, np.dtype(_ORT_TYPES[a.type]) if a.type in _ORT_TYPES else None, _dims(a.shape))
        for a in session.get_inputs()
    ]
    return [InputSpec(name, dtype, dims, batch) for (name, dtype, dims), batch in zip(raw, batch_dims(raw))]


def session_outputs(session: Any, batch_axis: int) -> list[LayerInfo]:
    """The session's own float outputs, the only layers a session without its model bytes can give."""
    from .graph import TensorType, per_example_shape

    infos = []
    for out in session.get_outputs():
        if out.type not in _FLOATS:
            continue
        dims = _dims(out.shape)
        infos.append(LayerInfo(out.name, "graph output", per_example_shape(TensorType(1, dims), batch_axis)))
    return infos


__all__ = ["SessionModel", "is_session", "session_inputs", "session_model", "session_outputs"]
