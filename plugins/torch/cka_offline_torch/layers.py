"""The layers of a PyTorch model: named submodules, their layouts, and what one probe batch shows.

Layout (:attr:`cka_offline.extractor.LayerInfo.layout`, which decides what ``mean`` averages on a 2-D
per-example output): a module class in :data:`CHANNELS_FIRST_KINDS` (Conv1d, BatchNorm1d, 1-D pooling, ...)
gives ``(C, L)``, one in :data:`TOKENS_FIRST_KINDS` (Linear, LayerNorm, Embedding, MultiheadAttention,
transformer layers, RNNs, Hugging Face's ``Conv1D``) gives ``(T, D)``. Any other module with children
(a transformers ``BertLayer``, a ``Sequential``, a ResNet block) has the layout on which all its
descendants of those classes agree; a leaf of another class (an activation, dropout) has the layout of the
nearest ancestor whose descendants decide it. Where they disagree (a block mixing Conv1d and Linear) the
layout is unknown, and ``mean`` on a 2-D output of it is refused with the fix.

Probe (:func:`probe`): one forward pass with a counting hook on every submodule records how many times
each runs and its per-example output shape per call; a module that runs ``k > 1`` times becomes ``k``
layers ``NAME:1`` ... ``NAME:k`` (group ``NAME``), one that does not run is listed as not extractable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from cka_offline.errors import ModelError
from cka_offline.extractor import LayerInfo
from cka_offline.reduce import CHANNELS_FIRST, TOKENS_FIRST
from cka_offline.selection import call_name

from .capture import select_output

if TYPE_CHECKING:
    import torch

#: module classes (by name) whose output is (batch, channels, *spatial)
CHANNELS_FIRST_KINDS = frozenset(
    f"{base}{d}d"
    for d in (1, 2, 3)
    for base in (
        "Conv",
        "ConvTranspose",
        "LazyConv",
        "LazyConvTranspose",
        "BatchNorm",
        "LazyBatchNorm",
        "InstanceNorm",
        "LazyInstanceNorm",
        "MaxPool",
        "AvgPool",
        "AdaptiveAvgPool",
        "AdaptiveMaxPool",
        "LPPool",
        "MaxUnpool",
        "FractionalMaxPool",
        "ConstantPad",
        "ReflectionPad",
        "ReplicationPad",
        "ZeroPad",
        "CircularPad",
        "Dropout",
    )
) | {"SyncBatchNorm", "GroupNorm", "LocalResponseNorm", "CrossMapLRN2d", "Upsample", "PixelShuffle"}
#: module classes (by name) whose output is (batch, tokens, features)
TOKENS_FIRST_KINDS = frozenset(
    {
        "Linear",
        "LazyLinear",
        "Bilinear",
        "NonDynamicallyQuantizableLinear",
        "LayerNorm",
        "RMSNorm",
        "Embedding",
        "MultiheadAttention",
        "TransformerEncoderLayer",
        "TransformerDecoderLayer",
        "TransformerEncoder",
        "TransformerDecoder",
        "Transformer",
        "RNN",
        "LSTM",
        "GRU",
        "Conv1D",  # Hugging Face's GPT-2 "Conv1D" is a Linear with its weight transposed
    }
)


def kind_layout(kind: str) -> str:
    """The layout a module class gives by itself, ``""`` if it does not say."""
    return CHANNELS_FIRST if kind in CHANNELS_FIRST_KINDS else TOKENS_FIRST if kind in TOKENS_FIRST_KINDS else ""


def layouts(kinds: Mapping[str, str]) -> dict[str, str]:
    """The layout of each module, ``{dotted name: kind}`` in, by the rules of the module docstring."""
    below: dict[str, set[str]] = {name: set() for name in kinds}
    for name, kind in kinds.items():
        own = kind_layout(kind)
        if own:
            parts = name.split(".")
            for depth in range(len(parts)):  # its ancestors, the root ("") included
                below.setdefault(".".join(parts[:depth]), set()).add(own)
    out = {}
    for name, kind in kinds.items():
        own = kind_layout(kind)
        if own:
            out[name] = own
            continue
        parts = name.split(".")
        out[name] = ""
        for depth in range(len(parts), -1, -1):  # itself, then its ancestors up to the root
            seen = below.get(".".join(parts[:depth]), set())
            if seen:
                out[name] = next(iter(seen)) if len(seen) == 1 else ""
                break
    return out


@dataclasses.dataclass
class _Calls:
    shapes: list[tuple[int, ...] | None] = dataclasses.field(default_factory=list)
    reasons: list[str] = dataclasses.field(default_factory=list)


def probe(
    modules: Mapping[str, torch.nn.Module],
    output_index: int | str | None,
    forward: Callable[[], int],
) -> dict[str, _Calls]:
    """Per module name, the per-example shape (or why there is none) of each call during ``forward()``,
    which runs the model once and returns the batch size. Only shapes are kept, never the tensors."""
    batch = [0]
    seen: dict[str, _Calls] = {name: _Calls() for name in modules}

    def hook_for(name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            calls = seen[name]
            try:
                tensor = select_output(output, output_index, name)
            except ModelError as exc:
                calls.shapes.append(None)
                calls.reasons.append(str(exc))
                return
            calls.shapes.append(tuple(int(d) for d in tensor.shape))
            calls.reasons.append("")

        return hook

    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(hook_for(name)))
        batch[0] = forward()
    finally:
        for handle in handles:
            handle.remove()
    for calls in seen.values():  # the batch axis first: per-example shapes
        for i, shape in enumerate(calls.shapes):
            if shape is not None and (not shape or shape[0] != batch[0]):
                calls.shapes[i] = None
                calls.reasons[i] = (
                    f"its output has shape {shape}, whose first axis is not the batch ({batch[0]} examples); "
                    "select a layer whose output keeps the batch first (or use output_index)"
                )
            elif shape is not None:
                calls.shapes[i] = shape[1:]
    return seen


def probed_layers(static: list[LayerInfo], seen: Mapping[str, _Calls], where: str) -> list[LayerInfo]:
    """``static`` (the listing without a probe) with what the probe ``seen``: shapes, runs, per-call layers."""
    taken = {info.name for info in static} | {a for info in static for a in info.aliases}
    out: list[LayerInfo] = []
    for info in static:
        calls = seen.get(info.name)
        if calls is None or not info.exposable:
            out.append(dataclasses.replace(info, runs=len(calls.shapes) if calls else 0))
            continue
        k = len(calls.shapes)
        if k == 0:
            out.append(
                dataclasses.replace(
                    info,
                    runs=0,
                    exposable=False,
                    reason="it did not run in the forward pass of the probe batch (a branch not taken, an unused "
                    "module, or one whose .forward() is called directly); select another layer",
                )
            )
            continue
        if k == 1:
            out.append(_call_info(info, info.name, info.aliases, calls, 0, k))
            continue
        for i in range(1, k + 1):
            name = call_name(info.name, i)
            if name in taken:
                raise ModelError(
                    f"module {info.name!r} of {where} runs {k} times per forward pass, and its call {i} would be "
                    f"the layer {name!r}, but a module of that name exists; rename that module"
                )
            aliases = tuple(call_name(a, i) for a in info.aliases)
            out.append(_call_info(info, name, aliases, calls, i, k))
    return out


def _call_info(info: LayerInfo, name: str, aliases: tuple[str, ...], calls: _Calls, call: int, k: int) -> LayerInfo:
    index = max(call - 1, 0)
    shape, reason = calls.shapes[index], calls.reasons[index]
    return dataclasses.replace(
        info,
        name=name,
        aliases=aliases,
        shape=shape,
        runs=k,
        group=info.name if call else "",
        exposable=shape is not None,
        reason=reason,
    )


__all__ = ["CHANNELS_FIRST_KINDS", "TOKENS_FIRST_KINDS", "kind_layout", "layouts", "probe", "probed_layers"]
