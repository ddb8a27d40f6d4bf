"""Output files: the helpers every writer of the package shares (activation files, results, plots).

A file at its final path is always complete: writers write ``<path>.partial`` (activation files, which
``--resume`` continues) or a hidden temporary name (:func:`atomic_output`) and rename it when done.
h5py and numpy free: the CLIs import this before anything heavy.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

from .errors import OutputError

#: suffix of an activation file being written (``<path>.partial``), renamed to ``<path>`` when complete
PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | os.PathLike[str]) -> str:
    """``<path>.partial``: where an activation file is written until it is complete."""
    return os.fspath(path) + PARTIAL_SUFFIX


def remove_quietly(path: str | os.PathLike[str]) -> None:
    """Remove ``path`` if it exists; errors are ignored (cleanup on an error path)."""
    with contextlib.suppress(OSError):
        os.remove(path)


def refuse_existing(path: str | os.PathLike[str], *, overwrite: bool, hint: str = "choose another -o") -> None:
    """Raise :class:`OutputError` when ``path`` exists and ``overwrite`` is false.

    ``hint`` is the alternative offered after ``--overwrite`` (``choose another -o``).
    """
    if not overwrite and os.path.exists(path):
        raise OutputError(f"{os.fspath(path)} already exists; pass --overwrite to replace it or {hint}")


def require_folder(path: str | os.PathLike[str]) -> None:
    """Raise :class:`OutputError` when the folder that would hold ``path`` does not exist."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"cannot write {os.fspath(path)}: folder {folder} does not exist; create it first")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on failure remove it.

    Raises:
        OutputError: the folder does not exist or is not writable, or the write failed (disk full).
    """
    path = os.fspath(path)
    require_folder(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
    try:  # created like open() would (mode 0o666 less the umask), unlike mkstemp's 0o600
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        remove_quietly(tmp)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        remove_quietly(tmp)
        raise


__all__ = ["PARTIAL_SUFFIX", "atomic_output", "partial_path", "refuse_existing", "remove_quietly", "require_folder"]
