"""Matching named input arrays to a model's forward arguments, and turning them into tensors.

Rules (documented in the extractor's docstring):

- the ``ids`` array is never passed to the model;
- an input whose name is a forward parameter is passed by that name (``input_ids``, ``attention_mask``);
- exactly one input array whose name matches no parameter is passed positionally (``x``, ``arr_0``);
- any other input the forward does not accept, or a required forward parameter without an input,
  is an :class:`~cka_offline.errors.InputError` naming both sides.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cka_offline.errors import InputError

if TYPE_CHECKING:
    import torch

#: the example-id array the core may include in a batch; it is never a model input
IDS_KEY = "ids"


@dataclass(frozen=True)
class Param:
    name: str
    positional: bool  # may be passed by position
    keyword: bool  # may be passed by name
    required: bool


@dataclass(frozen=True)
class ForwardSignature:
    """The parameters of a model's forward, without ``self``."""

    params: tuple[Param, ...]
    var_positional: bool = False
    var_keyword: bool = False

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def describe(self) -> str:
        parts = [p.name if p.required else f"{p.name}=..." for p in self.params]
        parts += ["*args"] if self.var_positional else []
        parts += ["**kwargs"] if self.var_keyword else []
        return f"forward({', '.join(parts)})"


def module_signature(model: Any) -> ForwardSignature | None:
    """The signature of ``model.forward``, or ``None`` if it cannot be determined."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    params = []
    var_pos = var_kw = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            var_pos = True
        elif p.kind is p.VAR_KEYWORD:
            var_kw = True
        else:
            params.append(
                Param(
                    p.name,
                    positional=p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD),
                    keyword=p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY),
                    required=p.default is p.empty,
                )
            )
    if not params and var_pos and var_kw:
        return None  # a generic wrapper (*args, **kwargs) says nothing about its inputs
    return ForwardSignature(tuple(params), var_pos, var_kw)


def export_signature(program: Any) -> ForwardSignature | None:
    """The inputs of a ``torch.export`` program: its positional args, then its keyword args (all required)."""
    try:
        entry = program.module_call_graph[0].signature
        spec = entry.in_spec
        children = list(spec.children()) if callable(getattr(spec, "children", None)) else spec.children_specs
        n_args = children[0].num_children
        kw_names = list(children[1].context or [])
        names = list(entry.forward_arg_names or [])
    except (AttributeError, IndexError, TypeError):
        return None
    arg_names = names[:n_args] if len(names) >= n_args else [f"arg{i}" for i in range(n_args)]
    params = [Param(n, positional=True, keyword=False, required=True) for n in arg_names]
    params += [Param(n, positional=False, keyword=True, required=True) for n in kw_names]
    return ForwardSignature(tuple(params))


def bind(signature: ForwardSignature | None, names: list[str], where: str) -> tuple[list[str], dict[str, str]]:
    """``(input names passed positionally, {parameter: input name})`` for the model inputs ``names``.

    ``where`` names the model in error messages.
    """
    names = [n for n in names if n != IDS_KEY]
    if not names:
        raise InputError(
            f"the batch for {where} holds no model input (only {IDS_KEY!r}); give at least one input array"
        )
    if signature is None:
        if len(names) == 1:
            return list(names), {}
        return [], {n: n for n in names}
    by_name = {p.name: p for p in signature.params}
    positional: list[str] = []
    keywords: dict[str, str] = {}
    bound: set[str] = set()
    described = f"{signature.describe()} of {where}"
    if len(names) == 1 and (names[0] not in by_name):
        first = next((p for p in signature.params if p.positional), None)
        if first is None and not signature.var_positional:
            raise InputError(
                f"input {names[0]!r} does not match {described}, which takes no positional argument; "
                f"name the input array after one of its parameters ({', '.join(signature.names)})"
            )
        positional.append(names[0])
        if first is not None:
            bound.add(first.name)
    else:
        slots = [p.name for p in signature.params if p.positional and not p.keyword]  # positional-only, in order
        unknown = []
        for name in names:
            param = by_name.get(name)
            if param is not None and param.keyword:
                keywords[name] = name
                bound.add(name)
            elif param is not None:
                bound.add(name)
            elif signature.var_keyword:
                keywords[name] = name
            else:
                unknown.append(name)
        if unknown:
            raise InputError(
                f"input(s) {', '.join(map(repr, unknown))} are not accepted by {described}; "
                f"rename the input arrays to its parameter names, or give a single array to pass it positionally"
            )
        gap = ""
        for slot in slots:
            if slot not in bound:
                gap = gap or slot
            elif gap:
                raise InputError(
                    f"input {slot!r} of {described} is positional and comes after {gap!r}; give {gap!r} too"
                )
            else:
                positional.append(slot)
    missing = [p.name for p in signature.params if p.required and p.name not in bound]
    if missing:
        raise InputError(
            f"{described} requires {', '.join(map(repr, missing))} but the inputs are {', '.join(map(repr, names))}; "
            "add arrays with those names to the input file"
        )
    return positional, keywords


def to_tensor(name: str, array: np.ndarray, device: torch.device, float_dtype: torch.dtype | None) -> torch.Tensor:
    """A copy of ``array`` on ``device``; floating arrays become ``float_dtype`` unless it is ``None``."""
    import torch

    array = np.asarray(array)
    if array.dtype.kind not in "biuf" or array.dtype.kind == "f" and array.dtype.itemsize > 8:
        raise InputError(
            f"input {name!r} has dtype {array.dtype}, which cannot be given to a torch model; "
            "store numbers (float, int or bool arrays)"
        )
    try:
        tensor = torch.tensor(array)  # a copy: inputs may be read-only memory maps
    except (TypeError, RuntimeError) as exc:
        raise InputError(f"input {name!r} (dtype {array.dtype}) cannot be converted to a torch tensor: {exc}") from exc
    if float_dtype is not None and tensor.is_floating_point() and tensor.dtype != float_dtype:
        tensor = tensor.to(float_dtype)
    return tensor.to(device)


def tensors_for(
    inputs: Mapping[str, np.ndarray],
    plan: tuple[list[str], dict[str, str]],
    device: torch.device,
    float_dtype: torch.dtype | None,
) -> tuple[list[Any], dict[str, Any]]:
    positional, keywords = plan
    args = [to_tensor(n, inputs[n], device, float_dtype) for n in positional]
    kwargs = {param: to_tensor(n, inputs[n], device, float_dtype) for param, n in keywords.items()}
    return args, kwargs
