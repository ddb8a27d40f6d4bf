"""The identity of a loaded torch model: its code and its actual parameters and buffers.

``cka-extract --resume`` and the shard checks compare models by ``model_sha256``; for the torch
extractor that is the SHA-256 of two parts, both recorded in the file's provenance:

- ``model_code_sha256``: the content of the model's source files (``model_code_files``): the factory's
  module, every module of user code it reaches through its globals (sibling modules, helpers, classes it
  imports), and the modules that define the classes of the model and of all its submodules. User code is
  every file outside the Python installation (stdlib and site-packages) and outside cka-offline itself;
  an installed package that provides the factory or a model class counts by its version
  (``model_code_packages``, e.g. ``torchvision==0.21.0``; torch itself is the recorded framework version). A ``.pt2`` archive holds its own
  graph: the archive's bytes are its code.
- ``model_state_sha256``: every parameter and buffer after loading (persistent or not, tied ones under
  each of their names), by name in sorted order, with dtype, shape and bytes.

So editing a factory, loading other weights, another seed, or weights loaded by ``from_pretrained`` all
give another identity; moving the files does not.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import sysconfig
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cka_offline.digests import files_sha256

log = logging.getLogger(__name__)

#: at most this many source files are followed from a factory (a safeguard, logged when reached)
MAX_CODE_FILES = 2000
_OWN_PACKAGES = ("cka_offline",)
_FRAMEWORK = frozenset({"torch", "builtins"})


@dataclass(frozen=True)
class ModelIdentity:
    code_sha256: str
    state_sha256: str
    code_files: tuple[str, ...] = field(default=())
    packages: tuple[str, ...] = field(default=())

    @property
    def sha256(self) -> str:
        text = f"cka-offline torch model identity 1\ncode {self.code_sha256}\nstate {self.state_sha256}\n"
        return hashlib.sha256(text.encode()).hexdigest()

    def provenance(self) -> dict[str, str]:
        import json

        return {
            "model_code_sha256": self.code_sha256,
            "model_state_sha256": self.state_sha256,
            "model_code_files": json.dumps(list(self.code_files)),
            "model_code_packages": json.dumps(list(self.packages)),
        }


def _installed_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths.get(k, "") for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots |= {os.path.join(p, "lib") for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    return tuple(sorted(os.path.realpath(r) + os.sep for r in roots if r))


def _source_file(module: types.ModuleType) -> str:
    path = getattr(module, "__file__", None)
    if not isinstance(path, str) or not path:
        return ""
    if path.endswith((".pyc", ".pyo")):
        import importlib.util

        try:
            path = importlib.util.source_from_cache(path)
        except ValueError:
            pass
    return os.path.realpath(path) if os.path.isfile(path) else ""


def _is_user(module: types.ModuleType, file: str, installed: tuple[str, ...]) -> bool:
    top = module.__name__.split(".")[0]
    if top.startswith(_OWN_PACKAGES):
        return False
    return bool(file) and not file.startswith(installed)


def _imported_names(file: str, module: types.ModuleType) -> list[str]:
    """Modules that the source ``file`` of ``module`` imports (``import a.b``, ``from a import b``, relative
    imports resolved against its package): names bound by ``from helpers import SCALE`` are plain values,
    so the module globals alone would not lead to ``helpers``."""
    import ast

    if not file.endswith(".py"):
        return []
    try:
        with open(file, "rb") as fh:
            tree = ast.parse(fh.read())
    except (OSError, SyntaxError, ValueError):
        return []
    package = module.__name__ if hasattr(module, "__path__") else module.__name__.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join([*parts, base] if base else parts)
            if base:
                names.append(base)
                names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def code_files(roots: Iterable[types.ModuleType], model: Any) -> list[str]:
    """The source files of the model's code (module docstring): ``roots`` (the factory's module) always,
    followed into user code through module globals; plus the user-code modules of the model's classes."""
    return _walk(roots, model)[0]


def _walk(roots: Iterable[types.ModuleType], model: Any) -> tuple[list[str], list[str]]:
    """``(source files, installed top-level packages)`` of the model's code: the packages are those of an
    installed factory module or model class (counted by their version, see :func:`package_versions`)."""
    installed = _installed_roots()
    queue: list[types.ModuleType] = list(roots)
    forced = {id(m) for m in queue}
    for sub in model.modules() if model is not None else ():
        for cls in type(sub).__mro__:
            owner = sys.modules.get(cls.__module__)
            if owner is not None:
                queue.append(owner)
                forced.add(id(owner))
    roots_ids = {id(m) for m in roots}
    seen: set[int] = set()
    files: list[str] = []
    packages: set[str] = set()
    while queue:
        module = queue.pop(0)
        if id(module) in seen:
            continue
        seen.add(id(module))
        file = _source_file(module)
        user = _is_user(module, file, installed)
        if file and (user or id(module) in roots_ids):
            files.append(file)
        if not user:
            if id(module) in forced:
                packages.add(module.__name__.split(".")[0])
            continue  # an installed package counts by its version, not by what it imports
        if len(files) >= MAX_CODE_FILES:
            log.warning(
                "the model's code reaches more than %d source files; the identity covers the first ones", len(files)
            )
            break
        for imported in _imported_names(file, module):
            owner = sys.modules.get(imported)
            if owner is not None:
                queue.append(owner)
        for value in list(vars(module).values()):
            if isinstance(value, types.ModuleType):
                queue.append(value)
            else:
                try:
                    home = getattr(value, "__module__", None)
                except Exception:  # a proxy object whose attribute lookup fails
                    continue
                owner = sys.modules.get(home) if isinstance(home, str) else None
                if owner is not None:
                    queue.append(owner)
    return sorted(dict.fromkeys(files)), sorted(packages)


def package_versions(tops: Iterable[str]) -> list[str]:
    """``name==version`` of the distributions providing the top-level packages ``tops``; the framework
    itself (torch, recorded as ``framework_version``) and the standard library are left out."""
    from importlib import metadata

    wanted = [t for t in tops if t not in _FRAMEWORK]
    if not wanted:
        return []
    try:
        provides = metadata.packages_distributions()
    except Exception:  # a broken installation's metadata: the files still count
        return []
    found = set()
    for top in wanted:
        for dist in provides.get(top, []):
            try:
                found.add(f"{dist}=={metadata.version(dist)}")
            except metadata.PackageNotFoundError:
                continue
    return sorted(found)


def _tensor_bytes(tensor: Any) -> Any:
    import torch

    value = tensor.detach()
    if value.is_meta:
        return b"meta"
    if value.is_quantized:
        value = value.int_repr()
    if value.layout != torch.strided:
        value = value.to_dense()
    value = value.cpu().contiguous()
    if not value.numel():
        return b""
    return value.reshape(-1).view(torch.uint8).numpy()  # hashed in place, not copied


def state_sha256(model: Any) -> str:
    """SHA-256 of every parameter and buffer of ``model`` (names sorted; dtype, shape and bytes)."""
    named = list(model.named_parameters(remove_duplicate=False)) + [
        (f"buffer:{name}", tensor) for name, tensor in model.named_buffers(remove_duplicate=False)
    ]
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in sorted(named, key=lambda item: item[0]):
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def identify(model: Any, roots: Iterable[types.ModuleType] = (), archive: str = "") -> ModelIdentity:
    """The identity of ``model`` as loaded; ``roots``: the factory's module(s); ``archive``: a ``.pt2`` whose
    bytes are its code."""
    packages: list[str] = []
    if archive:
        files = [os.path.realpath(archive)]
    else:
        files, tops = _walk(roots, model)
        packages = package_versions(tops)
    code = files_sha256(files)
    if packages:
        code = hashlib.sha256("\n".join([code, *packages]).encode()).hexdigest()
    return ModelIdentity(code, state_sha256(model), tuple(files), tuple(packages))


__all__ = ["MAX_CODE_FILES", "ModelIdentity", "code_files", "identify", "state_sha256"]
