"""Memory-mapped row access to uncompressed layers: rows straight from the page cache, without HDF5.

:class:`FileMap` maps one activation file and finds where each stored chunk of a layer lies in it;
:class:`MappedRows` gathers chosen rows of a layer (over every shard) into a caller's buffer. Only the
reader (:meth:`cka_offline.store.reader.ActivationFile.mapped_rows`) makes them.
"""

from __future__ import annotations

import mmap

import h5py
import numpy as np

from . import schema
from .damage import damaged, filter_codes
from .schema import StoredLayer


class FileMap:
    """A read-only memory map of one file, opened on first use."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._map: mmap.mmap | None = None

    def blocks(self, file: h5py.File, meta: StoredLayer, n: int) -> list[tuple[int, np.ndarray, mmap.mmap, int]] | None:
        """``[(first_row, rows_view, map, byte_offset), ...]``: read-only numpy views of layer ``meta``'s rows
        straight from a memory map of the file, one per stored chunk (or one for contiguous storage), in row
        order, with the map and the view's offset in it; ``None``
        when the layer cannot be read that way (compressed or filtered, byte-swapped, partial-width chunks,
        a user block, external or virtual storage) -- then read it through HDF5."""
        ds = file[schema.LAYERS_GROUP][meta.key]
        if (
            ds.compression is not None
            or filter_codes(ds)
            or not ds.dtype.isnative
            or ds.is_virtual
            or ds.external
            or ds.shape[0] == 0
            or file.id.get_create_plist().get_userblock() != 0
        ):
            return None
        dtype = ds.dtype
        itemsize, features = dtype.itemsize, ds.shape[1]
        row_bytes = features * itemsize
        with damaged(self.path, f"the chunk index of layer {meta.name!r}"):
            if ds.chunks is None:
                offset = ds.id.get_offset()
                places = [] if offset is None else [(0, offset, n)]
            elif ds.chunks[1] != features:
                return None
            else:
                rows = ds.chunks[0]
                places = []
                for i in range(ds.id.get_num_chunks()):
                    info = ds.id.get_chunk_info(i)
                    if info.byte_offset is None or info.size != rows * row_bytes or info.chunk_offset[1] != 0:
                        return None
                    start = info.chunk_offset[0]
                    places.append((start, info.byte_offset, min(rows, n - start)))
        if self._map is None:
            with open(self.path, "rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        blocks = []
        for start, offset, count in sorted(places):
            if count <= 0 or offset < 0 or offset + count * row_bytes > len(self._map):
                return None  # a chunk outside the file: let HDF5 report the damage
            view = np.frombuffer(self._map, dtype=dtype, count=count * features, offset=offset)
            blocks.append((start, view.reshape(count, features), self._map, offset))
        # the views must show what HDF5 reads: check the first and last rows of the first and last blocks
        for start, view, _, _ in (blocks[0], blocks[-1]):
            last = start + len(view) - 1
            with damaged(self.path, f"rows of layer {meta.name!r}"):
                first_row, last_row = ds[start : start + 1], ds[last : last + 1]  # slices: fast reads
            if not (
                np.array_equal(view[:1], first_row, equal_nan=True)
                and np.array_equal(view[-1:], last_row, equal_nan=True)
            ):
                return None
        return blocks

    def release(self) -> None:
        """Unmap the pages of this file read so far from the process (the page cache keeps them; a later
        read maps them again), so resident memory does not grow while streaming through the file."""
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view: the map closes when the last view goes
                pass
            self._map = None


class MappedRows:
    """One layer's rows as read-only views of a memory-mapped file, one view per block of rows.

    :meth:`gather` copies chosen rows into a caller's buffer straight from the page cache: one copy,
    no HDF5 call (so threads gather in parallel), no intermediate block read. Made by
    :meth:`ActivationFile.mapped_rows`.
    """

    def __init__(self, starts: np.ndarray, views: list[np.ndarray], n_rows: int) -> None:
        self.starts, self.views, self.n_rows = starts, views, n_rows

    def gather(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Copy rows ``rows`` (int64, any order, each in ``0..n_rows-1``) into ``out`` (``len(rows)`` rows of
        the stored dtype and width) in that order; returns ``out``. Runs of rows in ascending order are
        copied block by block with ``np.take``; other orders by fancy indexing. The pages read stay mapped
        until :meth:`FileMap.release` (``ActivationFile.release_mapped``) unmaps the file's."""
        if len(rows) == 0:
            return out
        if rows.min() < 0 or rows.max() >= self.n_rows:
            raise IndexError(f"row index out of range 0..{self.n_rows - 1}")
        block = np.searchsorted(self.starts, rows, side="right") - 1
        local = rows - self.starts[block]
        if np.all(block[1:] >= block[:-1]):
            cuts = [0, *(np.flatnonzero(block[1:] != block[:-1]) + 1).tolist(), len(rows)]
            for a, b in zip(cuts[:-1], cuts[1:]):
                # mode="clip" keeps np.take from buffering the output (the rows were checked above)
                np.take(self.views[block[a]], local[a:b], axis=0, out=out[a:b], mode="clip")
        else:
            order = np.argsort(block, kind="stable")
            sorted_block = block[order]
            cuts = [0, *(np.flatnonzero(sorted_block[1:] != sorted_block[:-1]) + 1).tolist(), len(rows)]
            for a, b in zip(cuts[:-1], cuts[1:]):
                where = order[a:b]
                out[where] = self.views[sorted_block[a]][local[where]]
        return out


__all__ = ["FileMap", "MappedRows"]
