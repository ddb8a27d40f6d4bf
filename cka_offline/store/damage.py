"""How the reader reports a damaged file: h5py's errors from reading corrupt bytes become a FormatError."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import h5py

from ..errors import FormatError

#: the fix for a file whose content breaks the format
DAMAGED = "the file is damaged or was not written by cka-extract: extract it again, or ask its author for a new copy"
#: what h5py raises when a file's bytes are corrupt (any of these from reading a file is the file's fault)
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, UnicodeDecodeError)


@contextlib.contextmanager
def damaged(path: str, what: str) -> Iterator[None]:
    """h5py's errors from reading corrupt bytes become a FormatError naming the file (the cause is chained,
    so --debug shows it); the reader's own errors pass through."""
    try:
        yield
    except FormatError:
        raise
    except H5_ERRORS as exc:
        detail = " ".join(str(exc).split())[:160]
        raise FormatError(f"{path} is damaged: cannot read {what} ({type(exc).__name__}: {detail}); {DAMAGED}") from exc


def filter_codes(ds: h5py.Dataset) -> list[int]:
    """The HDF5 filter ids of a dataset's pipeline (gzip 1, shuffle 2, LZ4 32004...), through h5py's public
    low-level API (its ``Dataset._filters`` is private)."""
    plist = ds.id.get_create_plist()
    return [int(plist.get_filter(i)[0]) for i in range(plist.get_nfilters())]


__all__ = ["DAMAGED", "H5_ERRORS", "damaged", "filter_codes"]
