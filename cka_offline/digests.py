"""SHA-256 of activation files, remembered between runs.

A result records the SHA-256 of every file it compared, so anyone can check later that a matrix came
from exactly these bytes. Hashing a few GB takes seconds of CPU, which on a small machine competes with
the analysis itself; researchers analyse the same files many times (other layers, seeds, batch sizes),
so a digest is remembered, keyed by what the file system says about the file: its real path, device,
inode, size, modification time and status-change time (``st_ctime_ns``, which no user tool can set
back). A file rewritten or replaced in any way changes at least one of them, and is hashed again.

The cache is a small JSON file, ``$CKA_OFFLINE_CACHE_DIR/sha256.json``; without that variable, in the
platform's cache folder (platformdirs' ``user_cache_dir("cka-offline")``: ``$XDG_CACHE_HOME/cka-offline``
or ``~/.cache/cka-offline`` on Linux, ``~/Library/Caches/cka-offline`` on macOS,
``%LOCALAPPDATA%\\cka-offline\\Cache`` on Windows). ``CKA_OFFLINE_HASH_CACHE=0`` turns it off.
A cache that cannot be read or written is ignored (the digest is computed instead): it only saves time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

#: entries kept (most recent last); older ones are dropped
MAX_ENTRIES = 4096
_LOCK = threading.Lock()


def cache_path() -> str | None:
    """Where remembered digests live, or None when the cache is turned off."""
    if os.environ.get("CKA_OFFLINE_HASH_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    return os.path.join(cache_dir(), "sha256.json")


def cache_dir() -> str:
    """``$CKA_OFFLINE_CACHE_DIR``, else the platform's user cache folder for cka-offline (module docstring)."""
    override = os.environ.get("CKA_OFFLINE_CACHE_DIR")
    if override:
        return override
    import platformdirs

    return platformdirs.user_cache_dir("cka-offline", appauthor=False)


def _key(path: str) -> str:
    st = os.stat(path)
    return json.dumps([os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])


def _load(cache: str) -> dict[str, str]:
    try:
        with open(cache, encoding="utf-8") as fh:
            data = json.load(fh)
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(cache: str, key: str, digest: str) -> None:
    with _LOCK:
        entries = _load(cache)
        entries.pop(key, None)
        entries[key] = digest
        entries = dict(list(entries.items())[-MAX_ENTRIES:])
        tmp = f"{cache}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(entries, fh)
            os.replace(tmp, cache)
        except OSError as exc:
            log.debug("cannot write the digest cache %s: %s", cache, exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass


def file_sha256(path: str, *, cancelled: Callable[[], bool] | None = None, block: int = 1 << 22) -> str | None:
    """The SHA-256 (hex) of the file at ``path``, remembered for unchanged files (module docstring).

    ``cancelled``: polled between blocks; when it returns true the hashing stops and None is returned.
    Raises OSError when the file cannot be read.
    """
    cache = cache_path()
    key = _key(path)
    if cache is not None:
        known = _load(cache).get(key)
        if known is not None:
            return known
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            if cancelled is not None and cancelled():
                return None
            digest.update(chunk)
    text = digest.hexdigest()
    if cache is not None and _key(path) == key:  # unchanged while we read it
        _store(cache, key, text)
    return text


def files_sha256(paths: Sequence[str], *, block: int = 1 << 20) -> str:
    """SHA-256 (hex) of a set of files by content only: their order, names and folders do not count (moving
    a project keeps its digest; editing any file changes it). A missing file counts as its path, marked
    missing. Not cached: meant for small files such as a model's source code."""
    parts = []
    for path in dict.fromkeys(paths):
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(block):
                    digest.update(chunk)
        except OSError:
            digest.update(f"missing:{os.path.abspath(path)}".encode())
        parts.append(digest.hexdigest())
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()


class FileHasher:
    """SHA-256 of files on a background thread, overlapping the analysis; digests of unchanged files are
    remembered between runs (:func:`file_sha256`)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(dict.fromkeys(paths))
        self.digests: dict[str, str] = {}
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self.thread = threading.Thread(target=self._run, name="cka-hash", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for path in self.paths:
                digest = file_sha256(path, cancelled=self._cancel.is_set)
                if digest is None:
                    return
                self.digests[path] = digest
        except BaseException as exc:  # handed to result(), which re-raises it in the caller's thread
            self.error = exc

    def result(self) -> dict[str, str]:
        """``{path: hex digest}``; waits for the thread, re-raises its error."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.digests

    def cancel(self) -> None:
        self._cancel.set()


__all__ = ["FileHasher", "MAX_ENTRIES", "cache_dir", "cache_path", "file_sha256", "files_sha256"]
