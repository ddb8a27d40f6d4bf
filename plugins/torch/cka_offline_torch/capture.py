"""Capturing module outputs with forward hooks during one forward pass.

A module's output may be a tensor, a tuple/list, a dict or a transformers ``ModelOutput``; by default the
first tensor (depth first) is kept, ``output_index`` (an int position or a key) picks another.

A later in-place op (``ReLU(inplace=True)`` after a BatchNorm) may overwrite a captured tensor. Copying
every output at hook time is safe but costs a full pass over the activations, so a tensor is kept as it
is, together with its version counter (torch bumps it on every in-place op, on the tensor or any view of
it); after the forward pass, :meth:`Capture.modified` names the layers whose tensor changed, and the
caller reruns the batch copying those (``copy``). Tensors without a version counter (made under
``torch.inference_mode`` inside the model) are always copied. Writes that bypass the counter (through
``tensor.data`` or a numpy view) are not seen: ``copy=True`` for every layer covers such models.

A module called more than once in one forward pass is an error: its outputs cannot be told apart per
example, and silently keeping one of them would be a guess.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from cka_offline.errors import ModelError

if TYPE_CHECKING:
    import torch


def parse_output_index(value: Any) -> int | str | None:
    """``output_index`` as given on the CLI (a string) or from Python: an int position, a key, or None."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ModelError(f"output_index={value!r} must be an int position or a key name")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        return text


def _first_tensor(output: Any) -> torch.Tensor | None:
    import torch

    if isinstance(output, torch.Tensor):
        return output
    items = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def _describe(output: Any) -> str:
    import torch

    if isinstance(output, torch.Tensor):
        return f"tensor{tuple(output.shape)}"
    if isinstance(output, Mapping):
        return f"{type(output).__name__} with keys {list(output.keys())}"
    if isinstance(output, (tuple, list)):
        return f"{type(output).__name__} of {len(output)} ({', '.join(type(o).__name__ for o in output)})"
    return type(output).__name__


def select_output(output: Any, index: int | str | None, layer: str) -> torch.Tensor:
    """The tensor of ``output`` to keep for ``layer`` (see the module docstring)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if index is None:
        found = _first_tensor(output)
        if found is None:
            raise ModelError(f"layer {layer!r} returned {_describe(output)} holding no tensor; select another layer")
        return found
    try:
        if isinstance(output, Mapping):  # dicts and transformers ModelOutput
            chosen = output[index] if isinstance(index, str) else list(output.values())[index]
        elif isinstance(output, (tuple, list)):
            if not isinstance(index, str):
                chosen = output[index]
            elif hasattr(output, "_fields"):  # a named tuple's field
                chosen = getattr(output, index)
            else:
                raise TypeError(f"a {type(output).__name__} has no keys")
        else:
            raise TypeError(f"cannot index a {type(output).__name__}")
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ModelError(
            f"output_index={index!r} does not fit the output of layer {layer!r}, which is {_describe(output)}; "
            "give a position (0, 1, ...) or one of its keys"
        ) from exc
    if not isinstance(chosen, torch.Tensor):
        raise ModelError(
            f"output_index={index!r} picks a {type(chosen).__name__} from layer {layer!r} ({_describe(output)}), "
            "not a tensor; pick a tensor element"
        )
    return chosen


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach()
    if tensor.dtype in (torch.bfloat16,) or str(tensor.dtype).startswith("torch.float8"):
        tensor = tensor.float()  # numpy has no bfloat16 / float8
    return tensor.cpu().numpy()


def spatial_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The core's ``mean`` reduction in torch: ``(B, C, *spatial)`` -> ``(B, C)``, accumulated in float32
    (float64 for float64 tensors), on the tensor's device with torch's threads."""
    import torch

    work = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if tensor.dim() < 3:
        raise ModelError(f"the mean reduction needs a (batch, channels, *spatial) output, got {tuple(tensor.shape)}")
    return tensor.flatten(2).mean(2, dtype=work)


class Capture:
    """Forward hooks on ``modules`` (``{layer name: module}``) for one forward pass; a context manager.

    ``copy``: the layers whose output is copied at hook time (``True``: all); the others are checked
    with :meth:`modified` after the pass (see the module docstring). The hooks are removed on exit, also
    when the forward pass raises.
    """

    def __init__(
        self,
        modules: Mapping[str, torch.nn.Module],
        output_index: int | str | None,
        copy: bool | Collection[str] = False,
        reduce: Mapping[str, str] | None = None,
    ) -> None:
        self.modules = dict(modules)
        self.output_index = output_index
        self.copy = set(self.modules) if copy is True else set(copy or ())
        #: layers reduced in the hook (``{layer: "mean"}``): the small result is computed before any later op
        #: runs, so it needs neither a copy nor a version check
        self.reduce = dict(reduce or {})
        self.calls: dict[str, int] = {name: 0 for name in self.modules}
        self.outputs: dict[str, torch.Tensor] = {}
        #: version counter of each tensor kept without a copy, when it was captured
        self.versions: dict[str, int] = {}
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            self.calls[name] += 1
            tensor = select_output(output, self.output_index, name).detach()  # detach shares the counter
            if name in self.reduce:
                self.outputs[name] = spatial_mean(tensor)
            elif name in self.copy or tensor.is_inference():
                self.outputs[name] = tensor.clone()
                self.versions.pop(name, None)
            else:
                self.outputs[name] = tensor
                self.versions[name] = tensor._version

        return hook

    def modified(self) -> list[str]:
        """Layers whose uncopied output an in-place op changed after it was captured."""
        return [name for name, version in self.versions.items() if self.outputs[name]._version != version]

    def __enter__(self) -> Capture:
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def results(self, batch: int, where: str) -> dict[str, np.ndarray]:
        """The captured arrays; a layer that ran zero or several times or lost the batch axis is an error."""
        silent = [name for name, count in self.calls.items() if count == 0]
        if silent:
            raise ModelError(
                f"layer(s) {', '.join(map(repr, silent))} of {where} produced no output during the forward pass "
                "(a container such as ModuleList that is never called, a branch not taken, or a module whose "
                ".forward() is called directly); select its child modules or another layer"
            )
        repeated = {name: count for name, count in self.calls.items() if count > 1}
        if repeated:
            name, count = next(iter(repeated.items()))
            raise ModelError(
                f"layer {name!r} of {where} ran {count} times in one forward pass (a shared or looped module), so "
                "its outputs cannot be told apart; select a child that runs once, or the parent module that "
                "contains the repeated calls"
            )
        arrays = {}
        for name, tensor in self.outputs.items():
            if tensor.dim() == 0 or tensor.shape[0] != batch:
                raise ModelError(
                    f"layer {name!r} of {where} returned shape {tuple(tensor.shape)}, whose first axis is not the "
                    f"batch ({batch} examples); select a layer whose output keeps the batch first "
                    "(or use output_index to pick another element)"
                )
            arrays[name] = to_numpy(tensor)
        return arrays
