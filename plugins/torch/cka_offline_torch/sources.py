"""What a torch model source is, and turning it into an ``nn.Module``.

A source is one of:

- a factory spec ``package.module:callable`` or ``path/to/file.py:callable`` (optionally with
  ``model_args`` keyword arguments and a ``weights`` state dict to load into the result);
- a ``torch.export`` archive (``.pt2``), unflattened so that submodules keep their original names;
- a fully pickled ``nn.Module`` (``.pt``/``.pth``), only with ``allow_pickle_code_execution``.

TorchScript archives (by content, whatever their name) and bare state dicts are recognised (without
executing them) and refused with a message that says what to use instead. :func:`parse_source` is cheap
(at most it reads a zip's list of names) and imports nothing heavy; every other function imports torch
lazily. User code (a factory's module, the factory, unpickled classes, the forward pass) runs inside
:func:`user_code`, so that it sees no command-line arguments and cannot end the program in silence.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import io
import json
import os
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cka_offline.errors import ModelError

from .archives import UnsafeLoadRefused, is_torchscript_zip, judge_zip, no_unsafe_loads
from .usercode import user_code

if TYPE_CHECKING:
    import torch

_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_MODULE_FACTORY = re.compile(rf"^(?P<module>{_DOTTED}):(?P<attr>{_DOTTED})$")
_ATTR = re.compile(rf"^{_DOTTED}$")

EXPORT_SUFFIXES = (".pt2",)
PICKLE_SUFFIXES = (".pt", ".pth")
#: claimed so that a TorchScript file gets the explanation (any other name is recognised by its content)
TORCHSCRIPT_SUFFIXES = (".jit", ".ts", ".ptl", ".torchscript")
WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
#: suffixes this plugin claims although they hold only weights, so the user gets a useful message
WEIGHTS_ONLY_SUFFIXES = (".safetensors",)

ALTERNATIVES = (
    "a torch.export archive (torch.export.save(torch.export.export(model, example_args), 'model.pt2')), "
    "a factory plus weights ('my_pkg.models:make -X weights=model.safetensors'), "
    "or an ONNX export (torch.onnx.export) read by the onnx extractor"
)


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source: ``kind`` is "factory", "export", "pickle", "torchscript", "weights" or "hf" (a
    torchscript source is refused with its explanation by :func:`load_pickle`)."""

    kind: str
    path: str = ""  # the file (factory file, .pt2, .pt, .safetensors); "" for a module factory
    module: str = ""  # the module of a module factory
    attr: str = ""  # the callable of a factory (dotted for a class attribute)


def parse_source(source: str) -> SourceSpec | None:
    """The kind of ``source`` judged from its spelling only (nothing is opened or imported)."""
    text = source.strip()
    if text.startswith("hf:"):  # a transformers model (hf.HFExtractor), before 'hf:name' reads as a factory
        return SourceSpec("hf", path=text[3:])
    head, sep, attr = text.rpartition(":")
    if sep and head.lower().endswith(".py") and _ATTR.match(attr):
        return SourceSpec("factory", path=head, attr=attr)
    match = _MODULE_FACTORY.match(text)
    if match:
        return SourceSpec("factory", module=match["module"], attr=match["attr"])
    lower = text.lower()
    if lower.endswith(EXPORT_SUFFIXES):
        return SourceSpec("export", path=text)
    if lower.endswith(PICKLE_SUFFIXES):
        return SourceSpec("pickle", path=text)
    if lower.endswith(WEIGHTS_ONLY_SUFFIXES):
        return SourceSpec("torchscript" if _sniff_torchscript(text) else "weights", path=text)
    if lower.endswith(TORCHSCRIPT_SUFFIXES) or _sniff_torchscript(text):
        return SourceSpec("torchscript", path=text)
    return None


def _sniff_torchscript(path: str) -> bool:
    """Whether ``path`` is an existing TorchScript archive, whatever its name (reads the zip's names only)."""
    try:
        return os.path.isfile(path) and is_torchscript(path)
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def parse_literal(value: Any) -> Any:
    """A ``model_args`` value: Python literals (ints, floats, True/true, None/null, tuples) or the string."""
    if not isinstance(value, str):
        return value
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


def parse_model_args(raw: Any) -> dict[str, Any]:
    """``model_args`` as a dict: a mapping, ``"k=v,k2=v2"`` or a JSON object string."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, Mapping):
        return {str(k): parse_literal(v) for k, v in raw.items()}
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("{"):
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ModelError(f"model_args {raw!r} is not valid JSON ({exc}); give key=value pairs instead") from exc
            if not isinstance(loaded, dict):
                raise ModelError(f"model_args {raw!r} must be a JSON object of keyword arguments")
            return {str(k): v for k, v in loaded.items()}
        pairs: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip().isidentifier():
                raise ModelError(f"model_args item {item!r} is not key=value; write e.g. model_args=depth=18,width=64")
            pairs[key.strip()] = parse_literal(value)
        return pairs
    raise ModelError(f"model_args must be a mapping of keyword arguments, got {type(raw).__name__}")


# --------------------------------------------------------------------------------------------- factories


@contextlib.contextmanager
def _on_sys_path(folder: str) -> Iterator[None]:
    """Let a factory file import its sibling modules while it is loaded and called."""
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)


def _import_factory_module(spec: SourceSpec, source: str) -> Any:
    if spec.path:
        path = os.path.abspath(spec.path)
        if not os.path.isfile(path):
            raise ModelError(f"factory file {spec.path!r} (from {source!r}) does not exist; check the path before ':'")
        name = factory_module_name(spec)
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ModelError(f"cannot load {spec.path!r} as a Python module (from {source!r})")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # pickling, dataclasses and typing need the module registered
        what = f"factory file {spec.path!r} (of {source!r}), while it was imported,"
        try:
            with user_code(what, path, spec.path), _on_sys_path(os.path.dirname(path)):
                module_spec.loader.exec_module(module)
        except ModelError:
            sys.modules.pop(name, None)
            raise
        except Exception as exc:
            sys.modules.pop(name, None)
            raise ModelError(
                f"factory file {spec.path!r} failed to run: {type(exc).__name__}: {exc}; fix the file or its imports"
            ) from exc
        return module
    what = f"module {spec.module!r} (of factory {source!r}), while it was imported,"
    try:
        with user_code(what, spec.module, f"module {spec.module!r}"):
            try:
                return importlib.import_module(spec.module)
            except ModuleNotFoundError as exc:
                if exc.name != spec.module.split(".")[0] or os.getcwd() in sys.path:
                    raise
                with _on_sys_path(os.getcwd()):  # like `python -m`: a package in the current folder is found
                    return importlib.import_module(spec.module)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"cannot import module {spec.module!r} of factory {source!r}: {type(exc).__name__}: {exc}; "
            "install the package or add its folder to PYTHONPATH, or give a file as path/to/file.py:callable"
        ) from exc


def _resolve_attr(module: Any, spec: SourceSpec, source: str) -> Any:
    obj = module
    for part in spec.attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
            close = difflib.get_close_matches(part, names, n=3)
            hint = (
                f"did you mean {', '.join(close)}?" if close else f"callables there: {', '.join(names[:10]) or 'none'}"
            )
            where = spec.path or spec.module
            raise ModelError(f"{where!r} has no attribute {spec.attr!r} (from factory {source!r}); {hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(
            f"{spec.attr!r} in {(spec.path or spec.module)!r} is a {type(obj).__name__}, not a callable factory"
        )
    return obj


def factory_module_name(spec: SourceSpec) -> str:
    """The name under which a factory's module is (or will be) in ``sys.modules``."""
    if not spec.path:
        return spec.module
    path = os.path.abspath(spec.path)
    digest = hashlib.sha256(path.encode()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    return f"_cka_offline_factory_{stem}_{digest}"


def factory_module(spec: SourceSpec) -> Any:
    """The imported module of a factory (after :func:`load_factory`), or None."""
    return sys.modules.get(factory_module_name(spec)) if spec.kind == "factory" else None


def factory_file(spec: SourceSpec) -> str:
    """The source file of a factory (for provenance), '' if there is none."""
    if spec.path:
        return os.path.abspath(spec.path)
    module = sys.modules.get(spec.module)
    return (
        os.path.abspath(getattr(module, "__file__", "") or "")
        if module is not None and getattr(module, "__file__", None)
        else ""
    )


def load_factory(spec: SourceSpec, source: str, model_args: Mapping[str, Any]) -> torch.nn.Module:
    """Import the factory and call it with ``model_args``; the result must be an ``nn.Module``."""
    import torch

    module = _import_factory_module(spec, source)
    factory = _resolve_attr(module, spec, source)
    folder = os.path.dirname(os.path.abspath(spec.path)) if spec.path else None
    where = spec.path or f"module {spec.module!r}"
    try:
        with user_code(f"factory {source!r}, when called,", spec.path or spec.module, where):
            with _on_sys_path(folder) if folder else contextlib.nullcontext():
                model = factory(**model_args)
    except ModelError:
        raise
    except Exception as exc:
        args = ", ".join(f"{k}={v!r}" for k, v in model_args.items())
        raise ModelError(
            f"factory {source!r} raised {type(exc).__name__}: {exc} (called with model_args: {args or 'none'}); "
            "check -X model_args against the factory's parameters"
        ) from exc
    if not isinstance(model, torch.nn.Module):
        raise ModelError(
            f"factory {source!r} returned a {type(model).__module__}.{type(model).__qualname__}, not a torch.nn.Module; "
            "make it return the model itself"
        )
    return model


# --------------------------------------------------------------------------------------------- weights


def _is_tensor_mapping(obj: Any) -> bool:
    import torch

    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save``d state dict (loaded with weights_only=True)."""
    import pickle

    import torch

    if not os.path.isfile(path):
        raise ModelError(f"weights file {path!r} does not exist")
    if path.lower().endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(
                f"weights file {path!r} is not a readable safetensors file: {exc}; "
                "check that the file is complete (download or copy it again)"
            ) from exc
    if is_torchscript(path):
        raise ModelError(
            f"weights file {path!r} is a TorchScript archive, not a state dict; save model.state_dict() instead"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"weights file {path!r} holds more than tensors (a pickled model or objects), which would execute code "
            f"when loaded; save torch.save(model.state_dict(), path) or safetensors instead ({str(exc).splitlines()[0]})"
        ) from exc
    except Exception as exc:
        raise ModelError(f"weights file {path!r} cannot be read by torch.load: {type(exc).__name__}: {exc}") from exc
    if _is_tensor_mapping(loaded):
        return dict(loaded)
    if isinstance(loaded, Mapping):
        # training checkpoints wrap the state dict ({"state_dict": ...}, {"model": ...})
        for key in ("state_dict", "model_state_dict", "model"):
            if _is_tensor_mapping(loaded.get(key)):
                return dict(loaded[key])
        keys = ", ".join(map(repr, list(loaded)[:8]))
        raise ModelError(
            f"weights file {path!r} is a dict whose values are not all tensors (keys: {keys}); "
            "save the model's state_dict() itself"
        )
    raise ModelError(f"weights file {path!r} holds a {type(loaded).__name__}, not a state dict of tensors")


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_weights(model: torch.nn.Module, path: str, source: str) -> None:
    """Load a state dict into ``model``; any missing, unexpected or mis-shaped key is a ModelError."""
    state = read_state_dict(path)
    expected = model.state_dict()
    # tied parameters appear once in a safetensors file: a key is present if any of its aliases is
    groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for key, tensor in expected.items():
        groups.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(key)
    missing = []
    for key, tensor in expected.items():
        if key in state or key.endswith("num_batches_tracked"):  # BatchNorm fills in a missing counter
            continue
        aliases = groups[(tensor.data_ptr(), tuple(tensor.shape))] if tensor.numel() else [key]
        if any(alias in state for alias in aliases):
            state[key] = state[next(a for a in aliases if a in state)]
            continue
        missing.append(key)
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} (file {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
        for key in state
        if key in expected and tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_few(mismatched, 3)}")
        hint = "check that -X model_args build the same architecture the weights were saved from"
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = "the file was saved from a DataParallel/DDP wrapper: save model.module.state_dict() instead"
        raise ModelError(f"weights {path!r} do not fit the model of {source!r}: {'; '.join(parts)}; {hint}")
    with user_code(f"the model of {source!r}, while loading {path!r},", path):
        model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------- files


def is_torchscript(path: str) -> bool:
    """True for a TorchScript archive (a zip with ``constants.pkl`` or a ``code/`` folder); reads names only."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return is_torchscript_zip(archive)


def _torchscript_error(path: str) -> ModelError:
    return ModelError(
        f"{path!r} is a TorchScript archive; TorchScript modules do not support forward hooks, so their layers "
        f"cannot be captured. Use instead {ALTERNATIVES}"
    )


def _unsafe_globals(data: bytes | str) -> list[str] | None:
    """Globals a torch checkpoint would import when unpickled; ``None`` if that cannot be told."""
    import torch

    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(
            io.BytesIO(data) if isinstance(data, bytes) else data
        )
    except Exception:
        return None
    return sorted(found, key=lambda name: (name.startswith("torch."), name))  # the model's own classes first


def pt2_pickled_entries(path: str) -> list[str]:
    """Entries of a ``.pt2`` archive that loading it would unpickle with code execution, or load as compiled
    code: those its configs mark as pickled or custom objects, and every entry whose bytes are such (see
    :mod:`.archives`: judged by content, whatever the entry is called)."""
    entries: list[str] = []
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith("_config.json") and "/data/" in name:
                try:
                    config = json.loads(archive.read(name)).get("config", {})
                    items = list(config.items())
                except (ValueError, AttributeError):
                    entries.append(name)
                    continue
                for fqn, meta in items:
                    meta = meta if isinstance(meta, dict) else {}
                    path_name = str(meta.get("path_name", ""))
                    if meta.get("use_pickle") or path_name.startswith(("custom_obj", "opaque_obj")):
                        entries.append(f"{fqn} ({path_name})")
            elif "/data/aotinductor/" in f"/{name}":
                entries.append(f"{name} (compiled AOTInductor code)")
    return list(dict.fromkeys(entries + judge_zip(path)))


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise ModelError(f"{what} {path!r} does not exist; check the path")


def _quiet_torch_loading() -> contextlib.ExitStack:
    """Silence torch's own warnings and log lines while an archive is read (deprecated layouts, pytree
    notices): what matters reaches the user as one error line."""
    import logging
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    for name in ("torch.export", "torch._export", "torch._export.serde.serialize", "torch.export.pt2_archive"):
        logger = logging.getLogger(name)
        level = logger.level
        logger.setLevel(logging.CRITICAL)
        stack.callback(logger.setLevel, level)
    return stack


def load_export(path: str, allow_pickle: bool, device: torch.device | None = None) -> tuple[Any, torch.nn.Module]:
    """``(ExportedProgram, unflattened module)`` of a ``.pt2`` archive, its tensors on ``device``.

    Without ``allow_pickle``, every entry is judged by content first (:func:`pt2_pickled_entries`), and
    ``torch.export.load`` then runs under :func:`archives.no_unsafe_loads`, so that no loader of any
    layout can fall back to unpickling code."""
    import torch

    _require_file(path, "torch.export archive")
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path!r} is not a torch.export archive (not a zip file); save it with torch.export.save")
    if is_torchscript(path):
        raise _torchscript_error(path)
    advice = (
        "re-export without tensor subclasses or custom objects, or, only if you trust the file, "
        "pass --allow-pickle-code-execution (-X allow_pickle_code_execution=true)"
    )
    if not allow_pickle:
        pickled = pt2_pickled_entries(path)
        if pickled:
            raise ModelError(
                f"torch.export archive {path!r} contains pickled entries ({_few(pickled, 3)}) that would execute "
                f"code when loaded; {advice}"
            )
    guard: contextlib.AbstractContextManager[list[str]] = (
        contextlib.nullcontext([]) if allow_pickle else no_unsafe_loads(path)
    )
    try:
        with _quiet_torch_loading(), guard as refused:
            if allow_pickle:
                with user_code(f"code unpickled from {path!r}", path):
                    program = torch.export.load(path)
            else:
                program = torch.export.load(path)
    except ModelError:
        raise
    except Exception as exc:
        if isinstance(exc, UnsafeLoadRefused) or refused:
            raise ModelError(
                f"torch.export archive {path!r} holds data that torch would unpickle with code execution or load "
                f"as compiled code ({(refused or [str(exc)])[0]}); {advice}"
            ) from exc
        raise ModelError(
            f"torch.export.load could not read {path!r}: {type(exc).__name__}: {exc}; "
            f"re-export it with this torch version ({torch.__version__})"
        ) from exc
    if refused:  # a loader that swallowed the refusal: the program may be incomplete, and was not trusted
        raise ModelError(
            f"torch.export archive {path!r} holds data that torch would unpickle with code execution "
            f"({refused[0]}); {advice}"
        )
    try:
        with _quiet_torch_loading():
            if device is not None and device.type != "cpu":
                # constants baked into the graph (not only parameters) must move too
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, str(device))
            module = torch.export.unflatten(program)
    except Exception as exc:
        raise ModelError(f"torch.export.unflatten failed on {path!r}: {type(exc).__name__}: {exc}") from exc
    return program, module


def load_pickle(path: str, allow_pickle: bool) -> torch.nn.Module:
    """A fully pickled ``nn.Module``; refuses TorchScript, bare state dicts and (without opt-in) pickles."""
    import pickle

    import torch

    _require_file(path, "model file")
    if is_torchscript(path):
        raise _torchscript_error(path)
    if zipfile.is_zipfile(path):
        unsafe = _unsafe_globals(path)
        needs_code = unsafe != []
    else:  # legacy (pre-1.6) format: try the safe loader, which refuses anything but tensors
        unsafe = None
        with open(path, "rb") as fh:
            if fh.read(1) != b"\x80":  # every pickle of protocol 2+ (all torch.save output) starts so
                raise ModelError(f"{path!r} is not a file torch.load can read (neither a zip archive nor a pickle)")
        try:
            torch.load(path, map_location="cpu", weights_only=True)
            needs_code = False
        except pickle.UnpicklingError:
            needs_code = True
        except Exception as exc:
            raise ModelError(f"{path!r} is not a file torch.load can read: {type(exc).__name__}: {exc}") from exc
    if not needs_code:
        raise ModelError(
            f"{path!r} holds only tensors (a state dict), not a model; give the code that builds the model as a "
            f"factory and load the file into it: 'my_pkg.models:make -X weights={path}'"
        )
    if not allow_pickle:
        refs = f" (it references {_few(unsafe, 3)})" if unsafe else ""
        raise ModelError(
            f"{path!r} is a pickled model{refs}: unpickling it imports and runs code named in the file. "
            f"Better: use {ALTERNATIVES}. Only if you trust the file, pass --allow-pickle-code-execution "
            "(-X allow_pickle_code_execution=true)"
        )
    try:
        with user_code(f"code unpickled from {path!r}", path):
            model = torch.load(path, map_location="cpu", weights_only=False)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"unpickling {path!r} failed: {type(exc).__name__}: {exc}; the classes it was saved with must be "
            "importable (install their package or add its folder to PYTHONPATH)"
        ) from exc
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"{path!r} holds a {type(model).__name__}, not a torch.nn.Module")
    return model
