"""The model's inputs: which are per example, which are given once (``fixed_inputs``), and the arrays fed.

An input is *per example* when its batch is on axis 0 (images, token ids, audio chunks): it comes from
the inputs file, a row per example. Other inputs are *shared*: a scalar (Silero VAD's sample rate ``sr``,
shape ``[]``) or a tensor whose batch symbol sits on another axis (its recurrent ``state``, shape
``[2, batch, 128]``). Shared inputs are given once, with ``-X fixed_inputs='{"sr": 16000, "state": "zeros"}'``,
and fed to every batch: a value whose batch axis has size 1 is broadcast to the batch, ``"zeros"`` is built
per batch from the declared shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cka_offline.errors import InputError, OptionError

if TYPE_CHECKING:
    import onnx

Dims = tuple[int | str | None, ...]

#: the one value of a fixed input that is built per batch rather than given
ZEROS = "zeros"


@dataclass(frozen=True)
class InputSpec:
    """One input the caller feeds: name, numpy dtype (None: unknown), dims (None: unknown rank), and the
    axis that holds the batch (None: none, or unknown)."""

    name: str
    dtype: Any
    dims: Dims | None
    batch_dim: int | None

    @property
    def shared(self) -> bool:
        """Not per example: a scalar, or a tensor with its batch symbol on an axis other than 0."""
        return self.dims == () or (self.batch_dim is not None and self.batch_dim != 0)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller feeds, with the axis of their batch where the graph's symbols tell it."""
    from onnx import helper

    from .graph import model_inputs, tensor_type

    raw = []
    for vi in model_inputs(model):
        t = tensor_type(vi)
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)) if t.elem_type else None
        except (KeyError, TypeError, ValueError):
            dtype = None
        raw.append((vi.name, dtype, t.dims))
    return [InputSpec(name, dtype, dims, batch) for (name, dtype, dims), batch in zip(raw, batch_dims(raw))]


def batch_dims(raw: list[tuple[str, Any, Dims | None]]) -> list[int | None]:
    """The axis holding the batch of each input: where the batch symbol is (a dim_param that starts some
    input, an exporter's ``batch_size``), else, for an input whose axis 0 is fixed above 1 while another
    input's is dynamic, its one dynamic axis (Silero VAD with unnamed dims: ``state`` ``[2, ?, 128]``)."""
    symbols = {dims[0] for _, _, dims in raw if dims and isinstance(dims[0], str)}
    dynamic_first = any(dims and not isinstance(dims[0], int) for _, _, dims in raw)
    out: list[int | None] = []
    for _, _, dims in raw:
        at = [i for i, d in enumerate(dims or ()) if isinstance(d, str) and d in symbols]
        if len(at) == 1 or (dims and 0 in at):
            out.append(at[0] if len(at) == 1 else 0)
            continue
        free = [i for i, d in enumerate(dims or ()) if not isinstance(d, int)]
        fixed_first = bool(dims) and isinstance(dims[0], int) and dims[0] > 1  # type: ignore[index]
        out.append(free[0] if dynamic_first and fixed_first and len(free) == 1 else None)
    return out


class FixedInputs:
    """The inputs given once (``fixed_inputs``), checked against the model, fed to every batch."""

    def __init__(self, given: Any, specs: list[InputSpec], path: str) -> None:
        self.path = path
        self.values: dict[str, np.ndarray | str] = {}
        self.batch_dims: dict[str, int | None] = {}
        self._specs = {s.name: s for s in specs}
        if given is None:
            return
        if not isinstance(given, Mapping):
            raise OptionError(
                f"option fixed_inputs={given!r:.80} is not a mapping; give JSON such as "
                'fixed_inputs=\'{"sr": 16000, "state": "zeros"}\''
            )
        by_name = self._specs
        for name, value in given.items():
            if name not in by_name:
                raise OptionError(
                    f"option fixed_inputs names {name!r}, which is not an input of {path}; its inputs: "
                    f"{', '.join(by_name) or 'none'}"
                )
            spec = by_name[name]
            self.batch_dims[name] = _fixed_batch_dim(spec)
            self.values[name] = self._check(spec, value)

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def _check(self, spec: InputSpec, value: Any) -> np.ndarray | str:
        dims, bd = spec.dims, self.batch_dims[spec.name]
        if isinstance(value, str):
            if value.strip().lower() != ZEROS:
                raise OptionError(
                    f"fixed input {spec.name!r} of {self.path}: {value!r} is not a value; give a number, a nested "
                    'list, or "zeros" (built per batch from the declared shape)'
                )
            unknown = [i for i, d in enumerate(dims or ()) if not isinstance(d, int) and i != bd]
            if dims is None or unknown:
                raise OptionError(
                    f'fixed input {spec.name!r} of {self.path} has declared shape {fmt_dims(dims)}: "zeros" needs '
                    "every dimension but the batch known; give the value as a nested list instead"
                )
            return ZEROS
        arr = np.asarray(value)
        if spec.dtype is not None and arr.dtype != spec.dtype:
            arr = cast(arr, spec.dtype, spec.name, self.path)
        if dims is not None:
            fits = arr.ndim == len(dims) and all(
                not isinstance(d, int) or d == n or i == bd for i, (d, n) in enumerate(zip(dims, arr.shape))
            )
            if not fits:
                raise OptionError(
                    f"fixed input {spec.name!r} of {self.path} expects shape {fmt_dims(dims)}, got "
                    f"{tuple(arr.shape)}; give a value of that shape (size 1 on the batch axis is broadcast)"
                )
        return arr

    def feeds(self, batch: int) -> dict[str, np.ndarray]:
        """The fixed inputs for a batch of ``batch`` examples."""
        out: dict[str, np.ndarray] = {}
        for name, value in self.values.items():
            bd = self.batch_dims[name]
            if isinstance(value, str):  # "zeros": every dim known but the batch one
                spec = self._specs[name]
                shape = tuple(batch if i == bd else int(d or 0) for i, d in enumerate(spec.dims or ()))
                out[name] = np.zeros(shape, dtype=spec.dtype or np.float32)
            elif bd is None or value.shape[bd] == batch:
                out[name] = value
            elif value.shape[bd] == 1:
                shape = value.shape[:bd] + (batch,) + value.shape[bd + 1 :]
                out[name] = np.ascontiguousarray(np.broadcast_to(value, shape))
            else:
                raise InputError(
                    f"fixed input {name!r} of {self.path} has {value.shape[bd]} on its batch axis {bd}, but the batch "
                    f'has {batch} examples; give it size 1 there (broadcast to every batch) or use "zeros"'
                )
        return out


def _fixed_batch_dim(spec: InputSpec) -> int | None:
    """The batch axis of an input given once: its batch symbol, else its one unknown dimension."""
    if spec.batch_dim is not None or spec.dims is None:
        return spec.batch_dim
    unknown = [i for i, d in enumerate(spec.dims) if not isinstance(d, int)]
    return unknown[0] if len(unknown) == 1 else None


def fixed_hint(names: list[str]) -> str:
    """How to give ``names`` once, as the command line spells it."""
    pairs = ", ".join(f'"{n}": VALUE' for n in names)
    return f"give {'them' if len(names) > 1 else 'it'} once with -X fixed_inputs='{{{pairs}}}' (a number, a nested list, or \"zeros\")"


def cast(arr: np.ndarray, dtype: np.dtype, name: str, path: str) -> np.ndarray:
    """Cast to the model's element type; refuse casts that would change values (3.5 -> int, 300 -> uint8)."""
    if dtype.kind in "iub" and arr.dtype.kind in "iufb":
        out = arr.astype(dtype)
        if arr.size and not np.array_equal(out.astype(arr.dtype), arr):
            raise InputError(
                f"input {name!r} of {path} is {dtype.name} in the model, but the given {arr.dtype.name} values do "
                f"not fit it (fractions or out of range); give {dtype.name}-valued data"
            )
        return out
    try:
        return arr.astype(dtype)
    except (TypeError, ValueError) as exc:
        raise InputError(f"input {name!r} of {path} expects {dtype.name}, got {arr.dtype.name} ({exc})") from exc


def fmt_dims(dims: Dims | None) -> str:
    if dims is None:
        return "[?]"
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
