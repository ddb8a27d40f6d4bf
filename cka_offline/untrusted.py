"""Opening files a user names but did not write: the checks every reader of inputs and arrays shares.

- :func:`require_regular_file`: only regular files are opened (a FIFO, socket or device given as a file would
  block forever or stream without end); checked with ``os.stat`` before anything opens the path.
- :func:`shown`: a path for a message, with bytes that are not UTF-8 written as ``\\xNN`` (a name read from
  a folder keeps them as surrogate escapes, which a terminal cannot print).
- :func:`read_npy_header` and :func:`check_npy_stored`: a ``.npy`` header (alone or as an ``.npz`` member)
  parsed without pickle and without trusting its sizes: the values it declares must be stored in the bytes
  that follow it, so no reader allocates for rows that are not there.

numpy only; used by :mod:`cka_offline.inputs` and the arrays plugin.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from typing import IO

import numpy as np

from .errors import CKAOfflineError, InputError

#: the largest ``.npy`` header read (numpy's own default limit)
MAX_NPY_HEADER = 10_000


def shown(text: str | os.PathLike[str] | bytes) -> str:
    """``text`` (a path, a name read from a folder, bytes) as printable text: bytes that are not valid
    UTF-8 become ``\\xNN`` escapes (``os`` gives them to Python as surrogate escapes)."""
    value = os.fspath(text)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def utf8_name(name: str) -> bool:
    """Whether a file name (as ``os`` returns it) is valid UTF-8, i.e. holds no surrogate escapes."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def require_regular_file(
    path: str | os.PathLike[str], what: str = "file", error: type[CKAOfflineError] = InputError
) -> int:
    """The size of ``path`` in bytes; ``error`` (one line naming ``what`` and the path) unless it exists and
    is a regular file (symbolic links are followed). Never opens the path: opening a FIFO blocks."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {shown(path)}: no such file; check the path") from None
    except OSError as exc:
        raise error(f"{what} {shown(path)}: cannot read it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(
            f"{what} {shown(path)} is {_kind(st.st_mode)}, not a regular file; only regular files are read "
            "(copy the data to a file first)"
        )
    return st.st_size


@dataclass(frozen=True)
class NpyHeader:
    """What a ``.npy`` header declares, and where its data starts."""

    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    header_bytes: int  #: bytes from the start of the magic string to the first data byte

    @property
    def nbytes(self) -> int:
        """Bytes of the declared values (a Python int: no overflow whatever the shape)."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (axis 0) of the declared values."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize


def read_npy_header(fh: IO[bytes], where: str, error: type[CKAOfflineError] = InputError) -> NpyHeader:
    """Parse the ``.npy`` header at ``fh``'s position (numpy's parser: a literal, never pickle); ``error``
    naming ``where`` for a malformed header, a negative dimension or a dtype of Python objects."""
    start = fh.tell()
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh, max_header_size=MAX_NPY_HEADER)
        else:  # 2.0 and 3.0 share the layout
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh, max_header_size=MAX_NPY_HEADER)
    except Exception as exc:  # numpy parses untrusted bytes: ValueError, SyntaxError, tokenize.TokenError...
        detail = " ".join(str(exc).split())[:160]
        raise error(
            f"{where}: not a readable .npy array (malformed header: {detail}); save it with numpy.save"
        ) from None
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise error(f"{where}: the .npy header declares a negative dimension {shape}; the file is damaged")
    if dtype.hasobject:
        raise error(
            f"{where}: cannot read it without unpickling: it holds Python objects (dtype {dtype}), which are "
            "never unpickled; save it as a numeric or fixed-width string array"
        )
    return NpyHeader(shape, bool(fortran), dtype, fh.tell() - start)


def check_npy_stored(
    header: NpyHeader, stored: int, where: str, error: type[CKAOfflineError] = InputError, *, exact: bool = False
) -> None:
    """``error`` unless the ``stored`` bytes after the header hold every value the header declares (more is
    allowed unless ``exact``), and rows hold at least one byte (else a header could declare 10**12 empty
    rows, and readers allocate per row)."""
    if header.shape and header.shape[0] > 0 and header.row_bytes == 0:
        raise error(
            f"{where}: declares {header.shape[0]} examples of 0 bytes each (shape {header.shape}, dtype "
            f"{header.dtype}); every example needs at least one value"
        )
    if header.nbytes > stored or (exact and header.nbytes != stored):
        raise error(
            f"{where}: the header declares shape {header.shape} of {header.dtype} ({header.nbytes} bytes) but "
            f"{stored} bytes follow it; the file is truncated or damaged: save it again"
        )


__all__ = [
    "MAX_NPY_HEADER",
    "NpyHeader",
    "check_npy_stored",
    "read_npy_header",
    "require_regular_file",
    "shown",
    "utf8_name",
]
