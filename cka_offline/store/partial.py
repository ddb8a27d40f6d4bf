"""The writer's dealings with its output and ``.partial`` file outside HDF5's own writing: the checks
before any work (:func:`check_target`), reading a partial file's rows back, the disk errors' wording, and
pushing a finished file to the disk before it is renamed. See :mod:`cka_offline.store.writer`."""

from __future__ import annotations

import errno
import os

import h5py
import numpy as np

from ..errors import OutputError
from ..files import OutputLock, busy_message, check_output_path, partial_path, refuse_existing
from . import schema
from .damage import H5_ERRORS


def check_target(path: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False) -> None:
    """Every check of an output that needs no work done first, for a command to call before it loads a
    model: the name (:func:`~cka_offline.files.check_output_path`), an existing file without
    ``overwrite``, another process writing it, an interrupted run's ``.partial`` without ``resume`` or
    ``overwrite``. :class:`ActivationWriter` checks them again while it holds the output's lock.

    Raises:
        OutputError: one line naming the file and the fix.
    """
    path = os.fspath(path)
    check_output_path(path)
    refuse_existing(path, overwrite=overwrite)
    holder = OutputLock.holder(path)
    if holder is not None:
        raise OutputError(busy_message(path, holder))
    refuse_interrupted(path, resume=resume, overwrite=overwrite)


def refuse_interrupted(path: str, *, resume: bool, overwrite: bool) -> None:
    """An interrupted run's ``.partial`` is never deleted without ``overwrite``: a rerun without
    ``--resume`` would otherwise throw away its rows without a word."""
    partial = partial_path(path)
    if resume or overwrite or not os.path.exists(partial):
        return
    raise OutputError(
        f"{partial} holds an interrupted extraction{progress_of(partial)}; run the same command with --resume "
        "to continue it, or with --overwrite to delete it and start over"
    )


def progress_of(partial: str) -> str:
    """`` (1200 of 5000 rows written)`` for a readable partial file, else ``""``."""
    try:
        with h5py.File(partial, "r", locking=False) as f:
            done, n = int(f.attrs[schema.ATTR_ROWS_COMPLETE]), int(f.attrs[schema.ATTR_N_EXAMPLES])
    except (*H5_ERRORS, OSError):
        return ""
    return f" ({done} of {n} rows written)"


class NotStored(Exception):
    """A chunk the file counts as written is not in its chunk index."""


def read_stored(ds: h5py.Dataset, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` (inside one chunk) of ``ds``; NotStored when that chunk is not stored (HDF5
    would give zeros for it), an h5py error when it does not decompress."""
    info = ds.id.get_chunk_info_by_coord((start, 0))
    if info.byte_offset is None:
        raise NotStored(f"chunk at row {start} of {ds.name} is not stored")
    out = np.empty((stop - start, ds.shape[1]), dtype=ds.dtype)
    ds.read_direct(out, np.s_[start:stop])
    return out


def stat_open(f: h5py.File, path: str) -> os.stat_result:
    """The stat of the file ``f`` has open (its descriptor, with HDF5's default driver), else of ``path``."""
    try:
        return os.fstat(int(f.id.get_vfd_handle()))
    except (OSError, TypeError, ValueError, RuntimeError):  # pragma: no cover - another HDF5 driver
        return os.stat(path)


def fsync(path: str, *, folder: bool = False) -> None:
    """Push ``path`` (a file, or a folder's entries) to the disk: a power cut after the rename must not
    leave a complete-looking name over unwritten data. Best effort (some file systems refuse it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if not folder and getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            raise
    finally:
        os.close(fd)


def short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"


def write_failure(exc: BaseException) -> str:
    text = str(exc)
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "no space" in text.lower():
        return "the disk is full"
    if getattr(exc, "errno", None) == errno.EFBIG or "file too large" in text.lower():
        return "the file grew past the file size limit"
    return f"writing failed ({' '.join(text.split())[:200]})"


def disk_error(path: str, tmp_path: str, exc: BaseException) -> OutputError:
    error = OutputError(
        f"{path}: {write_failure(exc)}; the partial file {tmp_path} is kept: free space and rerun with --resume"
    )
    # an HDF5 file whose write failed cannot be closed cleanly (h5py's finalizers print tracebacks, HDF5 may
    # crash at exit): the commands print the one line and end the process at once (cli.common)
    error.abandon_process = True  # type: ignore[attr-defined]
    return error


def file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


__all__ = ["check_target", "disk_error", "file_size", "fsync", "read_stored", "refuse_interrupted", "write_failure"]
