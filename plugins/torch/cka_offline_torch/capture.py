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

A module called more than once in one forward pass gives one layer per call: ``NAME:1``, ``NAME:2``, ...
(:func:`cka_offline.selection.call_name`). Its bare name then names no single output and is an error that
lists the call names; a call layer of a module that ran a different number of times than in the probe
batch (or fewer times than its call index) is an error too, never a silent guess.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from cka_offline.errors import ModelError
from cka_offline.selection import call_name

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

    ``calls``: ``{layer name: (module name, call)}`` for the layers that are one call (counting from 1) of a
    module that runs several times; any other layer is its module's only call, named by the module's name.
    ``runs``: how many times each module ran in the probe batch, where known (checked by :meth:`results`).
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
        calls: Mapping[str, tuple[str, int]] | None = None,
        runs: Mapping[str, int] | None = None,
    ) -> None:
        self.modules = dict(modules)
        self.output_index = output_index
        self.copy = set(self.modules) if copy is True else set(copy or ())
        #: layers reduced in the hook (``{layer: "mean"}``): the small result is computed before any later op
        #: runs, so it needs neither a copy nor a version check
        self.reduce = dict(reduce or {})
        #: ``{layer: (module name, call)}``: bare layers are call 0 of the module of their own name
        self.targets = {name: (calls or {}).get(name, (name, 0)) for name in self.modules}
        self.runs = dict(runs or {})
        #: calls of each module (by module name) during the pass
        self.calls: dict[str, int] = {module: 0 for module, _ in self.targets.values()}
        self.outputs: dict[str, torch.Tensor] = {}
        #: version counter of each tensor kept without a copy, when it was captured
        self.versions: dict[str, int] = {}
        self._handles: list[Any] = []

    def _hook(self, module_name: str, layers: dict[int, str]) -> Any:
        """The hook of one module; ``layers`` maps a call (0: every call, kept until a second one) to its layer."""

        def hook(module: Any, args: Any, output: Any) -> None:
            self.calls[module_name] += 1
            name = layers.get(self.calls[module_name]) or (layers.get(0) if self.calls[module_name] == 1 else None)
            if name is None:
                return
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
        per_module: dict[str, dict[int, str]] = {}
        module_of: dict[str, torch.nn.Module] = {}
        for layer, (module_name, call) in self.targets.items():
            per_module.setdefault(module_name, {})[call] = layer
            module_of[module_name] = self.modules[layer]
        try:
            for module_name, layers in per_module.items():
                hook = self._hook(module_name, layers)
                self._handles.append(module_of[module_name].register_forward_hook(hook))
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
        """The captured arrays; a layer whose module ran too few, too many or other than the probe batch's
        number of times, or whose output lost the batch axis, is an error."""
        silent = [name for name, (module, _) in self.targets.items() if self.calls[module] == 0]
        if silent:
            raise ModelError(
                f"layer(s) {', '.join(map(repr, silent))} of {where} produced no output during the forward pass "
                "(a container such as ModuleList that is never called, a branch not taken, or a module whose "
                ".forward() is called directly); select its child modules or another layer"
            )
        for name, (module, call) in self.targets.items():
            count = self.calls[module]
            if call == 0 and count > 1:
                names = ", ".join(repr(call_name(module, i)) for i in range(1, count + 1))
                raise ModelError(
                    f"layer {name!r} of {where} ran {count} times in one forward pass (a shared or looped module); "
                    f"each call is a layer of its own: {names} (select them, or the module's name with the inputs "
                    "that show its calls: cka-extract --list-layers --inputs ...)"
                )
            expected = self.runs.get(module)
            if call and (count < max(call, 2) or (expected is not None and count != expected)):
                seen = f", but {expected} times in the first (probe) batch" if expected is not None else ""
                raise ModelError(
                    f"layer {name!r} of {where} is call {call} of module {module!r}, which ran {count} time(s) in "
                    f"this forward pass{seen}; the calls of a module must not depend on the inputs (select "
                    "another layer, or a parent module that contains the calls)"
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
