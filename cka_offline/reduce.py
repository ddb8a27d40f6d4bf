"""Reductions: how one layer's per-example output becomes the row of features stored in the file.

The reduction of each layer is recorded in the file. All take an array with the batch on axis 0:

- ``flatten`` (default): every value is a feature, ``(B, *shape) -> (B, prod(shape))``, as in
  Kornblith et al. (2019), "Similarity of Neural Network Representations Revisited";
- ``mean``: mean over spatial positions of a convolutional map, ``(B, C, *spatial) -> (B, C)``;
- ``token_mean``: mean over the non-padding tokens of a sequence output ``(B, T, F) -> (B, F)``, with
  the attention mask (``(B, T)``, nonzero = real token) taken from the inputs;
- ``first_token`` / ``last_token``: the first / last non-padding token of ``(B, T, F)`` (without a mask:
  token 0 / token T-1);
- ``none``: the output is already ``(B, F)``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import numpy as np

from .errors import InputError, LayerSelectionError
from .store.schema import DEFAULT_REDUCTION, REDUCTIONS, TOKEN_REDUCTIONS

_NEEDS = {
    "mean": "a (batch, channels, *spatial) output",
    "token_mean": "a (batch, tokens, features) output",
    "first_token": "a (batch, tokens, features) output",
    "last_token": "a (batch, tokens, features) output",
    "none": "a (batch, features) output",
}


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise LayerSelectionError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    return reduction


def resolve_reductions(reduction: str | Mapping[str, str], layers: Sequence[str]) -> dict[str, str]:
    """The reduction of each layer.

    ``reduction`` is one name for every layer, or ``{layer name or glob: name}`` where the first
    matching key wins and ``"*"`` (or no match) falls back to ``flatten``.
    """
    if isinstance(reduction, str):
        check_reduction(reduction)
        return {name: reduction for name in layers}
    for value in reduction.values():
        check_reduction(value)
    out = {}
    for name in layers:
        out[name] = reduction.get(name) or next(
            (value for pattern, value in reduction.items() if fnmatch.fnmatchcase(name, pattern)), DEFAULT_REDUCTION
        )
    used = {k for k in reduction if k == "*" or k in out or any(fnmatch.fnmatchcase(n, k) for n in layers)}
    unused = [k for k in reduction if k not in used]
    if unused:
        raise LayerSelectionError(
            f"reduction given for {', '.join(map(repr, unused))}, which matches no selected layer; "
            f"selected: {', '.join(layers)}"
        )
    return out


def reduced_features(layer: str, reduction: str, shape: tuple[int, ...]) -> int:
    """Stored width of a layer with per-example ``shape``; an error if the reduction does not fit it."""
    check_reduction(reduction)
    ndim = len(shape)
    fits = {
        "flatten": True,
        "mean": ndim >= 2,
        "none": ndim == 1,
    }.get(reduction, ndim == 2)
    if not fits:
        fitting = "none" if ndim == 1 else "token_mean" if ndim == 2 else "mean"
        hint = f"give this layer its own reduction, e.g. --reduction '{layer}={fitting}' (flatten fits any shape)"
        raise LayerSelectionError(
            f"reduction {reduction!r} needs {_NEEDS[reduction]}, but layer {layer!r} gives per-example shape "
            f"{tuple(shape)} (batch shape (B, {', '.join(map(str, shape))})); {hint}"
        )
    if reduction == "flatten":
        return int(np.prod(shape, dtype=np.int64))
    if reduction in ("mean", "none"):
        return int(shape[0])
    return int(shape[1])


def reduce(
    layer: str, reduction: str, array: np.ndarray, mask: np.ndarray | None = None, ids: Sequence | None = None
) -> np.ndarray:
    """Apply ``reduction`` to ``array`` (batch on axis 0); returns ``(B, features)``.

    ``mask`` is the attention mask ``(B, T)`` for the token reductions (nonzero = real token); ``None``
    treats every token as real. Token means are computed in float64; spatial means in float32 (float64 for
    float64 input), see :func:`_spatial_mean`. ``ids`` (the batch's example ids)
    only make error messages name the example.
    """
    b = array.shape[0]
    reduced_features(layer, reduction, array.shape[1:])
    if reduction in ("flatten", "none"):
        return array.reshape(b, -1)
    if reduction == "mean":
        return _spatial_mean(array)
    t = array.shape[1]
    valid = np.ones((b, t), dtype=bool) if mask is None else _check_mask(layer, mask, b, t, ids)
    if reduction == "token_mean":
        weights = valid.astype(np.float64)
        return np.einsum("bt,btf->bf", weights, array.astype(np.float64)) / weights.sum(axis=1, keepdims=True)
    if reduction == "first_token":
        index = valid.argmax(axis=1)
    else:
        index = t - 1 - valid[:, ::-1].argmax(axis=1)
    return array[np.arange(b), index]


def _spatial_mean(array: np.ndarray) -> np.ndarray:
    """Mean over the spatial positions of ``(B, C, *spatial)`` -> ``(B, C)``, as one matrix-vector product
    in the working precision (float64 for float64 input, else float32): about 10x faster than numpy's
    reduction with a float64 accumulator, and within a few float32 ulps of the float64 mean (relative error
    below 1e-6 over 1024 positions) -- finer than the rounding of the forward pass that produced the values. Single-threaded BLAS is right here: during an
    extraction the model's threads own the cores (:func:`cka_offline.extraction.extract` limits it)."""
    b, c = array.shape[:2]
    work = np.float64 if array.dtype == np.float64 else np.float32
    flat = np.ascontiguousarray(array, dtype=work).reshape(b * c, -1)
    positions = flat.shape[1]
    return (flat @ np.ones(positions, dtype=work)).reshape(b, c) / positions


def _check_mask(layer: str, mask: np.ndarray, b: int, t: int, ids: Sequence | None) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != (b, t):
        raise InputError(
            f"attention mask has shape {mask.shape}, but layer {layer!r} has {t} tokens for {b} examples "
            f"(expected mask shape ({b}, {t})); check --mask-input, or pass --mask-input none to use all tokens"
        )
    valid = mask != 0
    empty = np.flatnonzero(~valid.any(axis=1))
    if len(empty):
        where = f"example id {ids[empty[0]]!r}" if ids is not None else f"batch row {empty[0]}"
        raise InputError(
            f"attention mask marks no token of {where} as real (all zeros); "
            f"layer {layer!r} cannot be pooled over zero tokens"
        )
    return valid


__all__ = [
    "DEFAULT_REDUCTION",
    "REDUCTIONS",
    "TOKEN_REDUCTIONS",
    "check_reduction",
    "resolve_reductions",
    "reduced_features",
    "reduce",
]
