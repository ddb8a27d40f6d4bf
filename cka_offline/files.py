"""Output files: the helpers every writer of the package shares (activation files, results, plots).

A file at its final path is always complete: writers write ``<path>.partial`` (activation files, which
``--resume`` continues) or a hidden temporary name (:func:`atomic_output`) and rename it when done.
h5py and numpy free: the CLIs import this before anything heavy.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import socket
import sys
from collections.abc import Iterable, Iterator
from typing import IO

from .errors import OutputError

log = logging.getLogger(__name__)

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


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether ``a`` and ``b`` name one file: the same inode (symlinks, hard links, ``./a.h5``), or, when one
    does not exist, the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output(
    path: str | os.PathLike[str],
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
    option: str = "-o",
    hint: str | None = None,
) -> None:
    """Refuse an output before any work is done: a folder, a folder that does not exist or is not
    writable, one of the command's own ``inputs`` (even with ``overwrite``), or an existing file without
    ``overwrite``. ``option`` names the command-line option in the fix; ``hint``: the alternative offered
    after ``--overwrite`` (default ``choose another OPTION``).

    Raises:
        OutputError: saying which and the fix.
    """
    text = os.fspath(path)
    for source in inputs:
        if same_file(text, source):
            raise OutputError(
                f"{option} {text} is one of the inputs ({os.fspath(source)}); writing it would destroy that input "
                f"(even with --overwrite): choose another {option}"
            )
    if os.path.isdir(text):
        raise OutputError(f"{option} {text} is a folder; give a file name ({option} {os.path.join(text, 'NAME')})")
    folder, problem = output_folder(text)
    if problem == "missing":
        raise OutputError(f"cannot write {text}: folder {folder} does not exist; create it first")
    if problem == "not a folder":
        raise OutputError(f"cannot write {text}: {folder} is not a folder; choose another {option}")
    if problem == "not writable":
        raise OutputError(f"{text}: folder {folder} is not writable; choose another {option}")
    refuse_existing(text, overwrite=overwrite, hint=hint or f"choose another {option}")


def output_folder(path: str) -> tuple[str, str]:
    """The folder ``path`` would be written in, and what stops that: ``""`` (nothing), ``"missing"``,
    ``"not a folder"`` or ``"not writable"`` (the checks both commands make before any work)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(folder):
        return folder, "missing"
    if not os.path.isdir(folder):
        return folder, "not a folder"
    return folder, "" if writable_folder(folder) else "not writable"


def writable_folder(folder: str) -> bool:
    """Create and remove an empty file in ``folder``: the only test that permission bits, ACLs, read-only
    mounts and root's capabilities all answer truthfully."""
    probe = os.path.join(folder, f".cka-probe.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        return False
    remove_quietly(probe)
    return True


#: free space kept in hand beyond a file's own bytes (file system metadata)
WRITE_MARGIN = 64 * 1024


def _size_text(size: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} bytes"


def room_error(path: str | os.PathLike[str], need: int, exc: BaseException | None = None) -> OutputError | None:
    """The error for writing ``need`` bytes as ``path`` when the disk or the process's file size limit
    cannot take them (``exc``: the write error, if there was one), else None."""
    text = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(text))
    code = getattr(exc, "errno", None)
    if sys.platform != "win32":
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if (limit != resource.RLIM_INFINITY and need > limit) or code == errno.EFBIG:
            shown = "unlimited" if limit == resource.RLIM_INFINITY else f"{limit} bytes"
            return OutputError(
                f"{text}: the file would grow past this process's file size limit ({shown}, ulimit -f; "
                f"{need} bytes needed); raise the limit, or write it elsewhere"
            )
    try:
        st = os.statvfs(folder)
        root = hasattr(os, "geteuid") and os.geteuid() == 0
        free: int | None = st.f_frsize * (st.f_bfree if root else st.f_bavail)
    except (AttributeError, OSError):  # no statvfs (Windows): only the write error tells
        free = None
    if code in (errno.ENOSPC, errno.EDQUOT) or (free is not None and need + WRITE_MARGIN > free):
        have = "" if free is None else f"{_size_text(free)} free in {folder}, "
        return OutputError(
            f"{text}: the disk is full ({have}{_size_text(need + WRITE_MARGIN)} needed); free space, or write it "
            "elsewhere"
        )
    return None


def write_bytes(path: str | os.PathLike[str], data: bytes) -> str:
    """Write ``data`` as ``path`` atomically (:func:`atomic_output`), flushed to the disk, after checking that
    the disk and the process's file size limit can take it; return the path.

    Raises:
        OutputError: the folder is missing or not writable, or the disk is full (naming the file, the free
            space and the space needed); nothing is left at ``path`` or under a temporary name.
    """
    text = os.fspath(path)
    refused = room_error(text, len(data))
    if refused is not None:
        raise refused
    try:
        with atomic_output(text) as tmp, open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OutputError as exc:
        full = room_error(text, len(data), exc.__cause__) if isinstance(exc.__cause__, OSError) else None
        if full is not None and getattr(exc.__cause__, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise full from exc.__cause__
        raise
    return text


# -- the output of cka-extract: reserved names, checks before any work, the lock -----------------------

#: suffix of the lock file a writer holds while it writes ``<path>.partial`` (``<path>.lock``)
LOCK_SUFFIX = ".lock"
#: endings an output may not have: the writers' own files are named with them
RESERVED_SUFFIXES = (PARTIAL_SUFFIX, LOCK_SUFFIX)


def lock_path(path: str | os.PathLike[str]) -> str:
    """``<path>.lock``: the file the writer of ``path`` holds an exclusive lock on (see :class:`OutputLock`)."""
    return os.fspath(path) + LOCK_SUFFIX


def scratch_path(path: str | os.PathLike[str]) -> str:
    """Where the writer of ``path`` builds a new ``<path>.partial`` before renaming it into place: a hidden
    name ending in ``.partial.partial``, which no output and no output's partial file can have (an output
    may not end in ``.partial``)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}{PARTIAL_SUFFIX}{PARTIAL_SUFFIX}")


def check_output_path(path: str | os.PathLike[str], *, option: str = "-o") -> None:
    """Refuse an output before any work is done: a name ending in a reserved suffix (``.partial``,
    ``.lock``), a folder, a folder that does not exist or is not writable.

    Raises:
        OutputError: naming the path and what to give instead.
    """
    path = os.fspath(path)
    for suffix in RESERVED_SUFFIXES:
        if path.endswith(suffix):
            what = "unfinished activation files" if suffix == PARTIAL_SUFFIX else "the lock file of a running writer"
            raise OutputError(
                f"{path}: output names may not end in {suffix!r}, which names {what}; choose another {option}"
            )
    if os.path.isdir(path):
        raise OutputError(f"{path} is a folder; give a file name inside it, such as {os.path.join(path, 'acts.h5')}")
    folder, problem = output_folder(path)
    if problem in ("missing", "not a folder"):
        raise OutputError(f"{path}: folder {folder} does not exist; create it first")
    if problem == "not writable":
        raise OutputError(f"{path}: folder {folder} is not writable; choose another {option}")


class OutputLock:
    """An exclusive, non-blocking lock on ``<path>.lock``, held by the one process that writes ``path``
    (and its ``.partial``): taken before the partial file is touched, released after the final rename.

    The lock is an OS file lock (``flock``; ``msvcrt.locking`` on Windows), so it dies with its process:
    a lock file a killed writer leaves behind is simply taken by the next one. The holder removes the file
    while it still holds the lock; a waiter that then gets the lock on the removed file sees that the name
    now points elsewhere (or nowhere) and tries again.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.lock_file = lock_path(self.path)
        self._handle: IO[bytes] | None = None

    def acquire(self) -> None:
        """Take the lock, or raise OutputError naming the process that holds it."""
        for _ in range(100):
            try:
                handle = open(self.lock_file, "a+b")  # kept open while the lock is held
            except OSError as exc:
                raise OutputError(
                    f"{self.path}: cannot create the lock file {self.lock_file}: {exc.strerror or exc}"
                ) from exc
            locked = _try_lock(handle)
            if locked is None:  # the file system has no locks (some network file systems)
                log.warning(
                    "%s: the file system does not support file locks, so another run writing the same output "
                    "would not be noticed; write each output from one run at a time",
                    self.path,
                )
                handle.close()
                return
            if not locked:
                holder = _read_holder(handle)
                handle.close()
                raise OutputError(busy_message(self.path, holder))
            try:
                same = _same_file(os.stat(self.lock_file), os.fstat(handle.fileno()))
            except OSError:
                same = False
            if same:
                handle.seek(0)
                handle.truncate()
                handle.write(f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)}"[:500].encode())
                handle.flush()
                self._handle = handle
                return
            handle.close()  # the holder removed it meanwhile: lock the file now at that name
        raise OutputError(f"{self.path}: cannot lock {self.lock_file}: it keeps being replaced")  # pragma: no cover

    def release(self) -> None:
        """Remove the lock file and drop the lock (a no-op when not held)."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        remove_quietly(self.lock_file)  # while still held: see the class docstring
        handle.close()

    @property
    def held(self) -> bool:
        return self._handle is not None

    @staticmethod
    def holder(path: str | os.PathLike[str]) -> str | None:
        """Who holds the lock of ``path`` (``"pid N on HOST: command"``, or ``""`` when unknown), or None
        when nobody does. Creates nothing."""
        try:
            handle = open(lock_path(path), "rb")
        except OSError:
            return None
        with handle:
            if _try_lock(handle) is not False:
                return None
            return _read_holder(handle)


def busy_message(path: str | os.PathLike[str], holder: str | None) -> str:
    """The one line for an output another process is writing."""
    who = f"another process ({holder})" if holder else "another process"
    return (
        f"{os.fspath(path)}: {who} is writing {partial_path(path)} right now; nothing was touched: wait for it to "
        "finish, or stop it first, or choose another -o"
    )


def _try_lock(handle: IO[bytes]) -> bool | None:
    """An exclusive lock on ``handle`` without waiting; False if another open file holds one, None if the
    file system does not support locks."""
    try:
        if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            return None
        return False
    return True


def _read_holder(handle: IO[bytes]) -> str:
    try:
        handle.seek(0)
        return " ".join(handle.read(500).decode("utf-8", "replace").split())
    except OSError:  # pragma: no cover - Windows refuses to read a locked byte
        return ""


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


__all__ = [
    "LOCK_SUFFIX",
    "PARTIAL_SUFFIX",
    "RESERVED_SUFFIXES",
    "WRITE_MARGIN",
    "OutputLock",
    "atomic_output",
    "busy_message",
    "check_output",
    "check_output_path",
    "lock_path",
    "partial_path",
    "refuse_existing",
    "remove_quietly",
    "require_folder",
    "room_error",
    "same_file",
    "writable_folder",
    "write_bytes",
    "scratch_path",
]
