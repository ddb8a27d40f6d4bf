"""The writer's two fast paths for large uncompressed layers (issue 18; measured in docs/benchmarks.md,
section 5).

- :func:`write_rows`: rows that cover whole chunks of an unfiltered layer are written with
  ``H5Dwrite_chunk`` straight from the caller's array. ``Dataset.write_direct`` copies them into the
  dataset's chunk cache first (HDF5 2.0 caches chunks up to 8 MiB: every chunk of a 4 MB-chunk layer)
  and writes them only at the next flush, one more pass over every byte and one more fresh allocation per
  chunk. The chunk's bytes are the same either way (an unfiltered chunk is the C-order rows it holds), so
  the file's content is unchanged. Rows that only partly cover a chunk (the first rows of a resumed run,
  a batch size that is not a multiple of the chunk rows, the dataset's last, short chunk) keep the normal
  path.
- :func:`start_writeback` (every 16 MiB stored, :class:`Writeback`): asks the kernel to start writing the file's dirty pages to the disk now
  (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, Linux only; it does not wait for them), so the disk works
  while the next batches run instead of all at once in the fsync of ``close()``. It changes nothing a
  reader sees and only makes rows durable sooner; it is no part of the crash-safety order (data flushed,
  then counted), which the writer keeps as it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Any

import h5py
import numpy as np

log = logging.getLogger(__name__)

_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = None


def unfiltered(ds: h5py.Dataset) -> bool:
    """Whether ``ds`` stores its chunks as they are (no compression or other filter)."""
    return ds.id.get_create_plist().get_nfilters() == 0


def write_rows(ds: h5py.Dataset, rows: np.ndarray, start: int, direct: bool) -> None:
    """Write the C-contiguous ``rows`` of ``ds``'s stored dtype at row ``start``; with ``direct`` (an
    unfiltered ``ds``), the chunks they fill completely are written whole with ``write_direct_chunk``."""
    stop = start + len(rows)
    chunk = ds.chunks[0] if ds.chunks else 0
    first = -(-start // chunk) * chunk if direct and chunk else stop  # the first chunk boundary at or after start
    last = min(stop, ds.shape[0]) // chunk * chunk if direct and chunk else stop  # end of the last whole chunk
    if first >= last:  # no whole chunk: the normal path for all of it
        ds.write_direct(rows, dest_sel=np.s_[start:stop])
        return
    if first > start:
        ds.write_direct(rows[: first - start], dest_sel=np.s_[start:first])
    for row in range(first, last, chunk):
        _write_chunk(ds, row, rows[row - start : row - start + chunk])
    if stop > last:
        ds.write_direct(rows[last - start :], dest_sel=np.s_[last:stop])


def _write_chunk(ds: h5py.Dataset, row: int, rows: np.ndarray) -> None:
    """The whole chunk of ``ds`` that starts at ``row``, as the bytes of ``rows`` (its C-order rows)."""
    ds.id.write_direct_chunk((row, *([0] * (ds.ndim - 1))), rows)


#: start the write-back once this many bytes were stored since the last start (small layers' files would
#: otherwise send their few changed metadata blocks to the disk after every batch)
WRITEBACK_BYTES = 16 << 20


class Writeback:
    """Counts the bytes stored in ``path`` and starts their write-back every :data:`WRITEBACK_BYTES`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pending = 0

    def stored(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= WRITEBACK_BYTES:
            self.pending = 0
            start_writeback(self.path)


def start_writeback(path: str) -> None:
    """Start writing ``path``'s dirty pages to the disk without waiting for them (Linux; elsewhere nothing)."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = _load_sync_file_range()
    if not _sync_file_range:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        _sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))
    finally:
        os.close(fd)


def _load_sync_file_range() -> Any:
    """libc's ``sync_file_range`` (``False`` where there is none: not Linux, or no glibc/musl symbol)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        log.debug("sync_file_range is not available; the disk writes happen at close")
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


__all__ = ["Writeback", "start_writeback", "unfiltered", "write_rows"]
