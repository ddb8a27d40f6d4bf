"""The ``torch`` extractor: PyTorch models from factories, torch.export archives or (opt-in) pickles.

Importing this module is cheap: torch is imported inside methods.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cka_offline.devices import resolve_torch_device
from cka_offline.errors import ModelError
from cka_offline.extractor import Extractor, LayerInfo, Option, sha256_path
from cka_offline.selection import split_call

from . import __version__
from .binding import ForwardSignature, bind, export_signature, module_signature, tensors_for
from .capture import Capture, parse_output_index
from .identity import ModelIdentity, identify
from .layers import layouts, probe, probed_layers
from .sources import (
    SourceSpec,
    factory_file,
    factory_module,
    load_export,
    load_factory,
    load_pickle,
    load_weights,
    parse_model_args,
    parse_source,
)
from .usercode import user_code

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: module classes that hold other modules but are never called themselves
_CONTAINERS = ("ModuleList", "ModuleDict", "ParameterList", "ParameterDict")


def resolve_device(spec: str | None) -> torch.device:
    """``cpu`` (the default), ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (cuda if available) as a torch device,
    parsed and checked by :func:`cka_offline.devices.resolve_torch_device`."""
    import torch

    return torch.device(str(resolve_torch_device(spec, default="cpu")))


class TorchExtractor(Extractor):
    """PyTorch models, with layers captured by forward hooks on named submodules.

    Sources: ``package.module:callable`` or ``path/to/file.py:callable`` (a factory returning an
    ``nn.Module``, called with ``model_args``, optionally loaded with ``weights``); a ``torch.export``
    archive ``.pt2`` (unflattened, so layers keep their original module names); a pickled ``nn.Module``
    ``.pt``/``.pth`` only with ``allow_pickle_code_execution``. TorchScript archives and bare state dicts
    are refused with what to use instead.

    Layers are the named submodules in ``named_modules()`` order (the root excluded); a module reachable
    under several names is listed once, with the other names as aliases. :meth:`probe` runs one batch and
    lists each module that runs ``k > 1`` times per forward pass as ``k`` layers ``NAME:1`` ... ``NAME:k``
    (a ResNet block's twice-called ``relu``), with every layer's per-example shape and run count, and the
    modules that did not run as not extractable (see :mod:`.layers`, which also gives each layer's layout).
    ``run`` captures each requested module's (or call's) output in eval mode under ``torch.no_grad``
    (copied only where a later in-place op would change it, see :mod:`.capture`); a
    tuple/list/dict/``ModelOutput`` output gives its first tensor unless ``output_index`` picks another. A
    requested module that does not run, a bare module name of a module that runs several times, or a call
    that does not happen is a :class:`~cka_offline.errors.ModelError`.

    Inputs (see :meth:`input_names`): an ``ids`` array is never passed; arrays named like forward parameters are passed by name
    (``input_ids``, ``attention_mask``); a single array with another name is passed positionally.
    Floating inputs are cast to the model's floating dtype (float64 -> float32 for a float32 model) unless
    ``keep_dtype``; integer and bool inputs keep their dtype.
    """

    name = "torch"
    framework = "torch"
    description = (
        "PyTorch models: factory 'pkg.mod:make' or 'file.py:make' (+ weights .safetensors/.pt), "
        "torch.export archives (.pt2), pickled nn.Module .pt/.pth (opt-in)"
    )
    #: the spatial mean is taken in the forward hook, with torch's threads, while the output is in cache
    early_reductions = frozenset({"mean"})
    declared_options = (
        Option(
            "model_args",
            object,
            None,
            "keyword arguments for a factory, key=value pairs (values parsed as "
            "Python literals: ints, floats, true/false, none; otherwise strings)",
        ),
        Option(
            "weights",
            str,
            "",
            "state dict loaded into the factory's model: .safetensors, or .pt/.pth/.bin "
            "read with torch.load(weights_only=True); every key must fit",
        ),
        Option(
            "output_index",
            object,
            None,
            "which element of a tuple/list/dict/ModelOutput module output to "
            "keep: a position (0, 1, ...) or a key (default: the first tensor)",
        ),
        Option(
            "allow_pickle_code_execution",
            bool,
            False,
            "true to load a fully pickled nn.Module (.pt/.pth) or "
            "a .pt2 with pickled entries; unpickling runs code from the file, so only for files you trust",
        ),
        Option(
            "keep_dtype",
            bool,
            False,
            "true to pass floating inputs in their stored dtype (default: cast to "
            "the model's floating dtype, so float64 arrays become float32)",
        ),
        Option(
            "copy_outputs",
            bool,
            False,
            "true to copy every captured output as its module returns it (default: "
            "copy only the outputs that a later in-place op changes, as torch's version counter shows; a model "
            "that writes into tensors through .data or numpy bypasses that counter and needs this)",
        ),
    )

    @classmethod
    def can_open(cls, source: str) -> bool:
        if not isinstance(source, str):
            return _is_module(source)
        spec = parse_source(source)
        return spec is not None and spec.kind != "hf"  # hf: sources are the hf extractor's (hf.py)

    def __init__(self, source: Any, *, device: str = "cpu", options: Mapping[str, Any] | None = None) -> None:
        live = _is_module(source)
        super().__init__(f"<live {type(source).__name__}>" if live else source, device=device, options=options)
        #: a model object given to the Python API (used as it is; its mode and device are restored on close)
        self._live: Any = source if live else None
        spec = SourceSpec("live") if live else parse_source(source)
        if spec is None:
            raise ModelError(
                f"{source!r} is not a torch model source; give 'pkg.module:factory', 'file.py:factory' or a .pt2 file"
            )
        if spec.kind == "hf" and type(self) is TorchExtractor:
            raise ModelError(
                f"{source!r} is a Hugging Face model, which the hf extractor loads (with its tokenizer): give "
                "--extractor hf, or leave --extractor out"
            )
        self.spec: SourceSpec = spec
        values = self.option_values
        self.model_args = parse_model_args(values["model_args"])
        self.weights = values["weights"]
        self.output_index = parse_output_index(values["output_index"])
        self.allow_pickle: bool = values["allow_pickle_code_execution"]
        self.keep_dtype: bool = values["keep_dtype"]
        self.copy_outputs: bool = values["copy_outputs"]
        #: layers found overwritten in place by a later op: their outputs are copied at hook time
        self._copied: set[str] = set()
        self._early: dict[str, str] = {}
        if spec.kind != "factory" and (self.model_args or self.weights):
            given = ", ".join(k for k in ("model_args", "weights") if self.options.get(k))
            raise ModelError(f"option(s) {given} apply only to a factory source ('pkg.mod:make'), not to {source!r}")
        self._device = resolve_device(device)
        self._model: torch.nn.Module | None = None
        self._signature: ForwardSignature | None = None
        self._kinds: dict[str, str] = {}
        #: how many times each module ran in the probe batch (run checks every later batch against it)
        self._runs: dict[str, int] = {}
        self._model_file = ""
        self._identity: ModelIdentity | None = None

    # ----------------------------------------------------------------------------------- loading

    def _load(self) -> torch.nn.Module:
        if self._model is not None:
            return self._model

        spec = self.spec
        if spec.kind == "live":
            return self._load_live()
        if spec.kind == "weights":
            raise ModelError(
                f"{self.source!r} holds only weights; give the code that builds the model as a factory and load "
                f"the file into it: 'my_pkg.models:make -X weights={self.source}'"
            )
        if spec.kind == "export":
            program, model = load_export(spec.path, self.allow_pickle, self._device)
            self._signature = export_signature(program)
            self._kinds = _export_kinds(program)
            self._model_file = spec.path
        else:
            if spec.kind == "factory":
                model = load_factory(spec, self.source, self.model_args)
                if self.weights:
                    load_weights(model, self.weights, self.source)
                self._model_file = self.weights or factory_file(spec)
            else:
                model = load_pickle(spec.path, self.allow_pickle)
                self._model_file = spec.path
            self._signature = module_signature(model)
        model = self._on_device(model)
        log.debug("loaded %s (%s) on %s", self.source, type(model).__name__, self._device)
        return model

    def _on_device(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` moved to the device (its code may run: one line if it fails or exits), in eval mode,
        kept as the loaded model."""
        try:
            with user_code(f"the model of {self.source!r}, when moved to {self._device},", self.source):
                model = model.to(self._device)
        except Exception as exc:
            raise ModelError(
                f"cannot move the model of {self.source!r} to {self._device}: {type(exc).__name__}: {exc}"
            ) from exc
        model.eval()
        self._model = model
        return model

    def _load_live(self) -> torch.nn.Module:
        """The live model: moved to the device and put in eval mode for the extraction; :meth:`close` puts
        back its training flag and device."""
        model = self._live
        self._was_training = bool(model.training)
        first = next(iter(model.parameters()), None)
        self._live_device = first.device if first is not None else None
        self._signature = module_signature(model)
        try:
            model.to(self._device)
        except Exception as exc:
            raise ModelError(
                f"cannot move the model {self.source} to {self._device}: {type(exc).__name__}: {exc}"
            ) from exc
        model.eval()
        self._model = model
        return model

    def _model_identity(self) -> ModelIdentity:
        """The code and the parameters and buffers as loaded (see :mod:`.identity`): taken before the first
        forward pass (so a model that changes a buffer as it runs has one identity), not for --list-layers."""
        if self._identity is None:
            model = self._load()
            roots = [m for m in (factory_module(self.spec),) if m is not None]
            self._identity = identify(model, roots, archive=self.spec.path if self.spec.kind == "export" else "")
        return self._identity

    def _float_dtype(self) -> torch.dtype | None:
        import torch

        if self.keep_dtype:
            return None
        model = self._load()
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32

    # ----------------------------------------------------------------------------------- contract

    def layers(self) -> list[LayerInfo]:
        model = self._load()
        primary: dict[int, str] = {}
        aliases: dict[int, list[str]] = {}
        modules: dict[int, Any] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            if not name:
                continue
            key = id(module)
            if key in primary:
                aliases[key].append(name)
            else:
                primary[key], aliases[key], modules[key] = name, [], module
        kinds = {name: self._kinds.get(name) or type(modules[key]).__name__ for key, name in primary.items()}
        layout = layouts(kinds)
        infos = []
        for key, name in primary.items():
            kind = kinds[name]
            container = kind in _CONTAINERS
            infos.append(
                LayerInfo(
                    name=name,
                    kind=kind,
                    shape=None,
                    aliases=tuple(aliases[key]),
                    exposable=not container,
                    reason=f"{name!r} is a {kind}, a container that is never called; select its elements"
                    if container
                    else "",
                    layout=layout[name],
                )
            )
        return infos

    def probe(self, inputs: Mapping[str, np.ndarray]) -> list[LayerInfo]:
        """:meth:`layers` as one forward pass over ``inputs`` shows them (see the class docstring)."""
        model = self._load()
        static = self.layers()
        named = dict(model.named_modules())
        modules = {info.name: named[info.name] for info in static if info.name in named}
        plan = bind(self._signature, list(inputs), repr(self.source))
        args, kwargs = tensors_for(inputs, plan, self._device, self._float_dtype())
        batch = len(args[0]) if args else len(next(iter(kwargs.values())))

        def forward() -> int:
            self._forward(model, args, kwargs, inputs, batch)
            return batch

        seen = probe(modules, self.output_index, forward)
        self._runs = {name: len(calls.shapes) for name, calls in seen.items()}
        return probed_layers(static, seen, repr(self.source))

    def input_names(self) -> list[str] | None:
        """The forward's parameter names when exactly those inputs are needed (every parameter required,
        no ``*args``/``**kwargs``, as for a ``.pt2`` program); otherwise ``None`` and :meth:`run` matches
        the arrays it is given to the forward's parameters by name (so ``input_ids`` + ``attention_mask``
        reach a transformers model whose other parameters are optional)."""
        self._load()
        sig = self._signature
        if sig is None or sig.var_positional or sig.var_keyword or not all(p.required for p in sig.params):
            return None
        return sig.names

    def reduce_early(self, reductions: Mapping[str, str]) -> list[str]:
        """Take ``mean`` reductions in the forward hooks (see :func:`capture.spatial_mean`)."""
        self._early = {name: r for name, r in reductions.items() if r in self.early_reductions}
        return list(self._early)

    def run(self, inputs: Mapping[str, np.ndarray], layers: Sequence[str]) -> dict[str, np.ndarray]:

        model = self._load()
        self._model_identity()
        available = dict(model.named_modules())
        calls: dict[str, tuple[str, int]] = {}
        for name in layers:
            call = split_call(name) if name not in available else None
            if call is not None and call[0] in available:
                calls[name] = call
        unknown = [name for name in layers if (name not in available or not name) and name not in calls]
        if unknown:
            import difflib

            hints = [difflib.get_close_matches(n, list(available), n=1) for n in unknown]
            near = "; ".join(f"{n!r} -> {h[0]!r}?" for n, h in zip(unknown, hints) if h)
            raise ModelError(
                f"unknown layer(s) {', '.join(map(repr, unknown))} in {self.source!r}"
                + (f" (close: {near})" if near else "")
                + "; list the layers with cka-extract --list-layers"
            )
        plan = bind(self._signature, list(inputs), repr(self.source))
        args, kwargs = tensors_for(inputs, plan, self._device, self._float_dtype())
        batch = len(args[0]) if args else len(next(iter(kwargs.values())))
        modules = {name: available[calls[name][0] if name in calls else name] for name in layers}
        while True:
            copy = True if self.copy_outputs else self._copied & set(layers)
            early = {name: r for name, r in self._early.items() if name in modules}
            with Capture(modules, self.output_index, copy, reduce=early, calls=calls, runs=self._runs) as capture:
                self._forward(model, args, kwargs, inputs, batch)
            modified = capture.modified()
            if not modified:
                return capture.results(batch, repr(self.source))
            # an in-place op overwrote these outputs after their hooks ran: copy them from now on
            log.debug(
                "layer(s) %s of %s are changed in place later in the forward pass; copying them",
                ", ".join(modified),
                self.source,
            )
            self._copied.update(modified)

    def _forward(
        self, model: torch.nn.Module, args: Any, kwargs: Any, inputs: Mapping[str, np.ndarray], batch: int
    ) -> None:
        import torch

        try:
            # no_grad rather than inference_mode: inference tensors have no version counter (see capture.py)
            with torch.no_grad(), user_code(f"the forward pass of {self.source!r}", str(self.source)):
                model(*args, **kwargs)
        except Exception as exc:
            if isinstance(exc, ModelError):
                raise
            shapes = ", ".join(f"{k}: {tuple(np.shape(v))} {np.asarray(v).dtype}" for k, v in inputs.items())
            raise ModelError(
                f"the forward pass of {self.source!r} failed on a batch of {batch} ({shapes}): "
                f"{type(exc).__name__}: {exc}; check that the inputs fit the model"
                + (
                    " (a .pt2 accepts only the shapes it was exported with: export with dynamic_shapes for "
                    "a variable batch)"
                    if self.spec.kind == "export"
                    else ""
                )
            ) from exc

    def provenance(self) -> dict[str, str]:
        import torch

        identity = self._model_identity()
        record = {
            "framework": self.framework,
            "framework_version": torch.__version__,
            "model": self.source,
            # code + parameters and buffers after loading: what --resume and the shard checks compare
            "model_sha256": identity.sha256,
            **identity.provenance(),
            "extractor_version": __version__,
            "device": str(self._device),
        }
        if self.spec.kind == "factory":
            record["model_args"] = json.dumps(self.model_args, sort_keys=True, default=str)
            record["factory_file"] = factory_file(self.spec)
            if self.weights:
                record["weights"] = os.path.abspath(self.weights)
                record["factory_sha256"] = sha256_path(record["factory_file"]) if record["factory_file"] else ""
        if self.output_index is not None:
            record["output_index"] = str(self.output_index)
        return record

    def close(self) -> None:
        import torch

        if self._live is not None and self._model is not None:  # give the caller's model back as it was
            self._live.train(self._was_training)
            if self._live_device is not None:
                self._live.to(self._live_device)
        self._model = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()


def _is_module(source: Any) -> bool:
    """Whether ``source`` is a live ``torch.nn.Module`` (without importing torch for a string)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(source, torch.nn.Module)


def _export_kinds(program: Any) -> dict[str, str]:
    """Original module class names of an exported program, from its nodes' ``nn_module_stack``."""
    kinds: dict[str, str] = {}
    for node in program.graph.nodes:
        for fqn, type_name in (node.meta.get("nn_module_stack") or {}).values():
            if fqn and isinstance(type_name, str):
                kinds.setdefault(fqn, type_name.rsplit(".", 1)[-1])
            elif fqn:
                kinds.setdefault(fqn, getattr(type_name, "__name__", str(type_name)))
    return kinds
