"""Reductions: how one layer's per-example output becomes the row of features stored in the file.

The reduction of each layer is recorded in the file. All take an array with the batch on axis 0:

- ``flatten`` (default): every value is a feature, ``(B, *shape) -> (B, prod(shape))``, as in
  Kornblith et al. (2019), "Similarity of Neural Network Representations Revisited";
- ``mean``: the mean over positions, keeping the features. What the positions are depends on the
  output (:func:`concrete_reduction`): the spatial positions of a channels-first map
  ``(B, C, *spatial) -> (B, C)`` (every output with two or more axes after the channels, and a 2-D
  ``(C, L)`` one whose layer reports the ``channels_first`` layout: Conv1d, BatchNorm1d, 1-D pooling); the
  tokens of a ``tokens_first`` ``(B, T, D)`` output (Linear, LayerNorm, attention, embeddings, transformer
  blocks), which is ``token_mean``; nothing for a per-example vector ``(B, F)``, which is ``none``. A 2-D
  per-example output whose layout is not known is an error naming ``token_mean`` and ``-r LAYER=...``;
- ``token_mean``: mean over the non-padding tokens of a sequence output ``(B, T, F) -> (B, F)``, with
  the attention mask (``(B, T)``, nonzero = real token) taken from the inputs;
- ``first_token`` / ``last_token``: the first / last non-padding token of ``(B, T, F)`` (without a mask:
  token 0 / token T-1);
- ``none``: the output is already ``(B, F)``.

The layout of a layer (:attr:`cka_offline.extractor.LayerInfo.layout`) is one of :data:`LAYOUTS` or ``""``
(unknown).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .errors import InputError, LayerSelectionError
from .extractor import LayerInfo
from .store.schema import DEFAULT_REDUCTION, REDUCTIONS, TOKEN_REDUCTIONS

#: how a layer's per-example axes are ordered, where its extractor knows: ``channels_first`` ``(C, *spatial)``
#: (convolutions, their norms and pools), ``tokens_first`` ``(T, D)`` (Linear, LayerNorm, attention, ...)
CHANNELS_FIRST = "channels_first"
TOKENS_FIRST = "tokens_first"
LAYOUTS = (CHANNELS_FIRST, TOKENS_FIRST)

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


def resolve_reductions(reduction: str | Mapping[str, str], layers: Sequence[str | LayerInfo]) -> dict[str, str]:
    """The reduction each of ``layers`` (names or :class:`LayerInfo`) asks for, by name.

    ``reduction`` is one name for every layer, or ``{pattern: name}``: a pattern is matched exactly as
    ``--layers`` matches it (:func:`cka_offline.selection.match_layers`: names, module names of calls,
    aliases, ``kind:K``, path globs). A pattern that names the layer exactly (its name, module or an alias)
    wins over globs and kinds; among those the first matching key wins; the key ``"*"`` is the default for
    every other layer, and without it they get ``flatten``.

    The asked-for ``mean`` becomes what it means for the layer's output once its shape is known
    (:func:`concrete_reduction`).
    """
    from .selection import as_layer_info, match_layers

    infos = [as_layer_info(layer) for layer in layers]
    names = [i.name for i in infos]
    if isinstance(reduction, str):
        check_reduction(reduction)
        return dict.fromkeys(names, reduction)
    for value in reduction.values():
        check_reduction(value)
    exact: dict[str, str] = {}
    matched: dict[str, list[str]] = {}
    for pattern in reduction:
        if pattern == "*":
            continue
        matched[pattern] = match_layers(pattern, infos, where="the selected layers")
        for info in infos:
            if info.name in matched[pattern] and pattern in (info.name, info.group, *info.aliases):
                exact.setdefault(info.name, pattern)
    default = reduction.get("*", DEFAULT_REDUCTION)
    out = {}
    for name in names:
        key = exact.get(name) or next((k for k, hits in matched.items() if name in hits), None)
        out[name] = reduction[key] if key is not None else default
    unused = [k for k, hits in matched.items() if not hits]
    if unused:
        raise LayerSelectionError(
            f"reduction given for {', '.join(map(repr, unused))}, which matches no selected layer; "
            f"selected: {', '.join(names)} ('*' matches within one dotted name component, '**' across them)"
        )
    return out


def concrete_reduction(layer: str, reduction: str, shape: tuple[int, ...], layout: str = "") -> str:
    """The reduction ``reduction`` is for a layer with per-example ``shape`` and ``layout`` (one of
    :data:`LAYOUTS`, ``""`` unknown): ``mean`` becomes ``none`` for a vector (it has no positions),
    ``token_mean`` for a 2-D tokens-first output and stays ``mean`` for a channels-first one (or any with
    two or more axes after the channels); the others stay as they are. What is stored and recorded.

    Raises:
        LayerSelectionError: ``mean`` on a 2-D output whose layout is not known (``(C, L)`` or ``(T, D)``?),
            naming ``token_mean`` and ``-r LAYER=...``; an unknown reduction or layout.
    """
    check_reduction(reduction)
    if layout and layout not in LAYOUTS:
        raise LayerSelectionError(
            f"layer {layer!r} reports layout {layout!r}; expected one of {', '.join(LAYOUTS)} or ''"
        )
    if reduction != "mean":
        return reduction
    if len(shape) == 0:
        return "flatten"
    if len(shape) == 1:
        return "none"
    if len(shape) > 2 or layout == CHANNELS_FIRST:
        return "mean"
    if layout == TOKENS_FIRST:
        return "token_mean"
    raise LayerSelectionError(
        f"reduction 'mean' is ambiguous for layer {layer!r}: its per-example shape {tuple(shape)} may be "
        "(channels, length) or (tokens, features), and its module does not say which; give the layer its own "
        f"reduction: --reduction '{layer}=token_mean' averages the tokens (first axis), "
        f"--reduction '{layer}=flatten' keeps every value"
    )


def reduced_features(layer: str, reduction: str, shape: tuple[int, ...], layout: str = "") -> int:
    """Stored width of a layer with per-example ``shape`` (and ``layout``, see :func:`concrete_reduction`);
    an error if the reduction does not fit it."""
    reduction = concrete_reduction(layer, reduction, tuple(shape), layout)
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
    layer: str,
    reduction: str,
    array: np.ndarray,
    mask: np.ndarray | None = None,
    ids: Sequence | None = None,
    layout: str = "",
) -> np.ndarray:
    """Apply ``reduction`` to ``array`` (batch on axis 0); returns ``(B, features)``.

    ``mask`` is the attention mask ``(B, T)`` for the token reductions (nonzero = real token); ``None``
    treats every token as real. ``layout`` decides what ``mean`` averages (:func:`concrete_reduction`).
    Token means are computed in float64; spatial means in float32 (float64 for float64 input), see
    :func:`_spatial_mean`. ``ids`` (the batch's example ids) only make error messages name the example.
    """
    reduction = concrete_reduction(layer, reduction, array.shape[1:], layout)
    b = array.shape[0]
    reduced_features(layer, reduction, array.shape[1:], layout)
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
    "CHANNELS_FIRST",
    "DEFAULT_REDUCTION",
    "LAYOUTS",
    "TOKENS_FIRST",
    "concrete_reduction",
    "REDUCTIONS",
    "TOKEN_REDUCTIONS",
    "check_reduction",
    "resolve_reductions",
    "reduced_features",
    "reduce",
]
