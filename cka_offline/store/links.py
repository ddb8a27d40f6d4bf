"""HDF5 objects whose values live in other files: external links, virtual datasets, external raw storage.

Reading one makes HDF5 open another local file and hand its contents on, so a shared file could pull in
files its recipient never named. Every HDF5 reader of the package refuses them unless the user opts in
(``--allow-external``): activation and result files are scanned whole (:func:`refuse_external`), an
inputs file only along the paths it is read from (:func:`refuse_external_path`), with one wording.
"""

from __future__ import annotations

from typing import Any

import h5py

from ..errors import UnsafeFileError
from .damage import H5_ERRORS, damaged

#: the opt-in, as activation and result readers name it
ACTIVATIONS_HINT = "If you trust the file, pass allow_external=True (cka-analyze --allow-external)"
#: the opt-in, as the inputs readers name it
INPUTS_HINT = "If you trust the file, pass --allow-external to cka-extract (allow_external=True in Python)"
#: soft links followed at most, along one path
MAX_SOFT_LINKS = 32


def dataset_problem(name: str, obj: Any) -> str | None:
    """Why dataset ``obj`` (at ``name``) reads other files, or None."""
    if not isinstance(obj, h5py.Dataset):
        return None
    if obj.is_virtual:
        return f"/{name.lstrip('/')} is a virtual dataset (its values come from other files)"
    if obj.external:
        files = ", ".join(str(e[0]) for e in obj.external[:3])
        return f"/{name.lstrip('/')} keeps its data in external file(s) ({files})"
    return None


def _refuse(path: str, problem: str, hint: str) -> None:
    raise UnsafeFileError(f"{path}: {problem}; files that point outside themselves are refused by default. {hint}")


def refuse_external(f: h5py.File, path: str, hint: str = ACTIVATIONS_HINT) -> None:
    """Raise UnsafeFileError if ``f`` holds external or soft links, external storage or virtual datasets
    anywhere (activation and result files: they never need any)."""
    problems: list[str] = []
    failures: list[BaseException] = []

    def visit(name: str, link: Any) -> Any:
        try:
            if isinstance(link, h5py.ExternalLink):
                problems.append(f"/{name} is an external link to {link.filename}")
            elif isinstance(link, h5py.SoftLink):
                problems.append(f"/{name} is a soft link to {link.path}")
            elif isinstance(link, h5py.HardLink):
                problem = dataset_problem(name, f.get(name))
                if problem:
                    problems.append(problem)
        except H5_ERRORS as exc:  # raised inside HDF5's iteration it would come out as a SystemError
            failures.append(exc)
            return True  # stops the iteration
        return None

    f.visititems_links(visit) if hasattr(f, "visititems_links") else f.visit_links(visit)
    if failures:
        with damaged(path, "its links"):
            raise failures[0]
    if problems:
        _refuse(path, problems[0], hint)


def refuse_external_path(f: h5py.File, path: str, name: str, hint: str = INPUTS_HINT) -> None:
    """Raise UnsafeFileError if reading object ``name`` of ``f`` would open another file: an external link
    on the way to it, or a dataset with virtual or external storage. Soft links inside the file are
    followed (at most :data:`MAX_SOFT_LINKS`). A missing object is left to the caller to report."""
    parts = [p for p in name.split("/") if p]
    current, hops, i = "", 0, 0
    while i < len(parts):
        child = f"{current}/{parts[i]}"
        try:
            link = f.get(child, getlink=True)
        except H5_ERRORS:
            return  # the caller's own lookup reports it
        if link is None:
            return
        if isinstance(link, h5py.ExternalLink):
            _refuse(path, f"{child} is an external link to {link.filename}:{link.path}", hint)
        if isinstance(link, h5py.SoftLink):
            hops += 1
            if hops > MAX_SOFT_LINKS:
                _refuse(path, f"{name} goes through more than {MAX_SOFT_LINKS} soft links", hint)
            target = [p for p in link.path.split("/") if p]
            base = [] if link.path.startswith("/") else [p for p in current.split("/") if p]
            parts, current, i = base + target + parts[i + 1 :], "", 0
            continue
        current, i = child, i + 1
    with damaged(path, f"object {name}"):
        problem = dataset_problem(current or "/", f.get(current or "/"))
    if problem:
        _refuse(path, problem, hint)


__all__ = ["ACTIVATIONS_HINT", "INPUTS_HINT", "dataset_problem", "refuse_external", "refuse_external_path"]
