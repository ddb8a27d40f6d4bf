"""Batches of one extraction: run the extractor, check what it returns, reduce each layer, check values."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from ..errors import ActivationValueError, InputError, ModelError
from ..extractor import Extractor, InputReader
from ..reduce import TOKENS_FIRST, concrete_reduction, reduce, reduced_features
from ..store.schema import TOKEN_REDUCTIONS, StoredLayer
from ..store.writer import format_id

log = logging.getLogger(__name__)

#: reductions that would silently pool padding without a mask
_MASKED = ("token_mean", "last_token")

Batch = tuple[dict[str, np.ndarray], "np.ndarray | None"]


class BatchRunner:
    """Runs batches, checks what the extractor returns, reduces and checks values."""

    def __init__(
        self,
        ext: Extractor,
        reader: InputReader,
        ids: np.ndarray,
        names: list[str],
        reductions: dict[str, str],
        mask_input: str | None,
        dtype: str,
        layouts: Mapping[str, str] | None = None,
    ) -> None:
        self.ext, self.reader, self.ids, self.names = ext, reader, ids, names
        #: each layer's reduction: as asked for, then (once its shape is known) what it is for that shape
        #: (reduce.concrete_reduction: 'mean' of a vector is 'none', of a tokens-first output 'token_mean')
        self.reductions = dict(reductions)
        #: layers asked for as ``mean`` whose tokens-first output made it ``token_mean``: without a mask in
        #: the inputs their mean counts every token (as ``mean`` does), rather than being refused
        self.asked_mean = {n for n, r in reductions.items() if r == "mean"}
        self.layouts = dict(layouts or {})
        self.mask_input = mask_input
        self.dtype = np.dtype(dtype)
        self.model_inputs = ext.input_names()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.needs_mask = mask_input is not None and any(
            r in TOKEN_REDUCTIONS or (r == "mean" and self.layouts.get(n) == TOKENS_FIRST)
            for n, r in reductions.items()
        )
        #: layers the extractor returns already reduced (Extractor.reduce_early), with their feature count
        self.early: dict[str, int] = {}

    def reduce_early(self) -> bool:
        """Hand the reductions the extractor can apply itself (while its batch runs) to it; True if any.
        Called after the first batch, when every layer's per-example shape is known and checked."""
        supported: frozenset[str] = getattr(self.ext, "early_reductions", frozenset())
        wanted = {n: r for n, r in self.reductions.items() if r in supported and n in self.shapes}
        if not wanted:
            return False
        accepted = set(self.ext.reduce_early(wanted)) & set(wanted)
        self.early = {n: reduced_features(n, wanted[n], self.shapes[n], self.layouts.get(n, "")) for n in accepted}
        if accepted:
            log.debug("extractor %r reduces %d layer(s) itself", self.ext.name, len(accepted))
        return bool(accepted)

    def forward(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        data = self.reader.read(start, stop)
        mask = self._mask(data) if self.needs_mask else None
        out = self.ext.run(self._feed(data), self.names)
        b = stop - start
        missing = [n for n in self.names if n not in out]
        if missing:
            raise ModelError(
                f"extractor {self.ext.name!r} returned no output for layer(s) {', '.join(map(repr, missing))} of "
                f"model {self.ext.source}; the layer may not run on these inputs"
            )
        arrays = {}
        for name in self.names:
            arr = np.asarray(out[name])
            if arr.ndim == 0 or arr.shape[0] != b:
                raise ModelError(
                    f"layer {name!r} returned shape {arr.shape} for a batch of {b} examples; the batch must be "
                    f"on axis 0 (extractor {self.ext.name!r}; for ONNX models see --batch-axis)"
                )
            if name in self.early:
                if arr.shape != (b, self.early[name]):
                    raise ModelError(
                        f"extractor {self.ext.name!r} returned shape {arr.shape} for layer {name!r}, which it "
                        f"reduces itself with {self.reductions[name]!r}; expected {(b, self.early[name])} (a bug "
                        "in the extractor plugin)"
                    )
            else:
                self._check_shape(name, arr.shape[1:], start)
            arrays[name] = arr
        return arrays, mask

    def _check_shape(self, name: str, shape: tuple[int, ...], start: int) -> None:
        if name not in self.shapes:
            self.reductions[name] = concrete_reduction(name, self.reductions[name], shape, self.layouts.get(name, ""))
        known = self.shapes.setdefault(name, shape)
        if self.reductions[name] in TOKEN_REDUCTIONS and len(shape) == len(known) == 2:
            same = shape[1] == known[1]  # the token count may change from batch to batch
        else:
            same = shape == known
        if not same:
            raise ModelError(
                f"layer {name!r} gave per-example shape {shape} for the batch starting at example id "
                f"{format_id(self.ids[start])}, but {known} for the first batch; every batch must give the same shape "
                "(pad the inputs to one length)"
            )

    def _mask(self, data: Mapping[str, np.ndarray]) -> np.ndarray | None:
        assert self.mask_input is not None
        if self.mask_input in data:
            return np.asarray(data[self.mask_input])
        needing = [n for n, r in self.reductions.items() if r in _MASKED and n not in self.asked_mean]
        if needing:
            raise InputError(
                f"layer {needing[0]!r} uses reduction {self.reductions[needing[0]]!r}, which needs the attention "
                f"mask input {self.mask_input!r}, but the inputs have only {', '.join(sorted(data))}; name the mask "
                "with --mask-input NAME, or pass --mask-input none to count every token"
            )
        return None

    def _feed(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return feed(self.ext, self.model_inputs, data, self.reader.path)

    def layer_specs(self) -> list[StoredLayer]:
        return [
            StoredLayer(
                n,
                tuple(int(d) for d in self.shapes[n]),
                self.reductions[n],
                reduced_features(n, self.reductions[n], self.shapes[n], self.layouts.get(n, "")),
            )
            for n in self.names
        ]

    def finish(
        self, batch: tuple[dict[str, np.ndarray], np.ndarray | None], start: int, stop: int
    ) -> dict[str, np.ndarray]:
        arrays, mask = batch
        batch_ids = self.ids[start:stop]
        out = {}
        for name, arr in arrays.items():
            with np.errstate(over="ignore"):  # float16 overflow is reported below, with the example's id
                reduced = (
                    arr
                    if name in self.early
                    else reduce(name, self.reductions[name], arr, mask, batch_ids.tolist(), self.layouts.get(name, ""))
                )
                rows = reduced.astype(self.dtype, copy=False)
            finite = np.isfinite(rows).all(axis=1)
            if not finite.all():
                raise _value_error(name, arr, rows, finite, batch_ids, self.dtype)
            if rows.dtype == np.float16:
                _check_float16_precision(name, reduced, rows)
            out[name] = rows
        return out


def feed(ext: Extractor, wanted: list[str] | None, data: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    """The arrays of ``data`` that go to ``ext.run``: all of them when the model names no inputs
    (``wanted`` is ``ext.input_names()``), else those inputs by name (one array for a one-input model,
    whatever its name)."""
    if wanted is None:
        return data
    if len(wanted) == 1 and len(data) == 1 and wanted[0] not in data:
        return {wanted[0]: next(iter(data.values()))}
    missing = [n for n in wanted if n not in data]
    if missing:
        raise InputError(
            f"model {ext.source} takes inputs {', '.join(wanted)} but {path} has "
            f"{', '.join(sorted(data))} (missing: {', '.join(missing)}); name the arrays after the model's inputs"
        )
    return {n: data[n] for n in wanted}


#: storing a layer as float16 may lose at most this relative error (float16 itself rounds to 2^-11 ~ 5e-4;
#: values below its normal range, 6.1e-5, keep fewer digits, down to none)
FLOAT16_MAX_RELATIVE_ERROR = 1e-2


def _check_float16_precision(name: str, reduced: np.ndarray, rows: np.ndarray) -> None:
    """Refuse a batch whose float16 copy has lost the layer: values so small that float16 keeps few or no
    digits of them (a layer of scale 3e-8 keeps 5 distinct values), measured as the relative error of the
    whole batch of the layer."""
    exact = np.asarray(reduced, dtype=np.float64)
    norm = float(np.linalg.norm(exact))
    if norm == 0.0:
        return
    error = float(np.linalg.norm(rows.astype(np.float64) - exact)) / norm
    if error > FLOAT16_MAX_RELATIVE_ERROR:
        raise ActivationValueError(
            f"layer {name!r} underflows float16: its values are too small for it (largest |value| "
            f"{np.abs(exact).max():.3g}; float16 keeps full precision only above 6.1e-05), so storing them would "
            f"change the layer by {error:.1%} (relative error); store it with --dtype float32"
        )


def _value_error(
    name: str, raw: np.ndarray, rows: np.ndarray, finite: np.ndarray, batch_ids: np.ndarray, dtype: np.dtype
) -> ActivationValueError:
    row = int(np.flatnonzero(~finite)[0])
    raw_row = np.asarray(raw[row], dtype=np.float64)
    if np.isfinite(raw_row).all():
        return ActivationValueError(
            f"layer {name!r} overflows {dtype.name} for example id {format_id(batch_ids[row])} (largest |value| "
            f"{np.abs(raw_row).max():.3g}); store it with --dtype float32"
        )
    what = "NaN" if np.isnan(raw_row).any() else "Inf"
    count = int((~finite).sum())
    return ActivationValueError(
        f"layer {name!r} has {what} activations for example id {format_id(batch_ids[row])} ({count} example(s) in this "
        "batch); check the inputs of that example and the model's weights. No complete file was written"
    )


__all__ = ["BatchRunner", "feed"]
