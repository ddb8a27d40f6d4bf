"""The one place HDF5 compression filters are made available: the writer, ``--resume``, the reader and
the analysis' reader threads all go through :func:`require_filters` (or :func:`load_plugins`).

HDF5 knows gzip (deflate), shuffle and a few others itself; h5py adds LZF; the ``hdf5plugin`` package
registers the rest (LZ4, Zstd, Blosc, Bitshuffle, ...) with the HDF5 library of the whole process when it
is imported. A filter is checked when a file is opened, so a missing one is one clear line naming the file,
the layer and the package to install, never a traceback in a thread that decompresses a chunk later.
"""

from __future__ import annotations

import functools
import logging

import h5py

from ..errors import FormatError
from .damage import filter_codes

log = logging.getLogger(__name__)

#: names of the filters HDF5 and h5py provide themselves, by filter id
BUILTIN_FILTERS = {1: "gzip", 2: "shuffle", 3: "fletcher32", 4: "szip", 5: "nbit", 6: "scaleoffset", 32000: "lzf"}
#: names of the filters hdf5plugin provides (hdf5plugin.FILTERS, as of hdf5plugin 4-7), for messages when
#: it is not installed
PLUGIN_FILTERS = {
    307: "bzip2",
    32001: "blosc",
    32004: "lz4",
    32008: "bitshuffle",
    32013: "zfp",
    32015: "zstd",
    32017: "sz",
    32018: "fcidecomp",
    32024: "sz3",
    32026: "blosc2",
    32028: "sperr",
    32033: "htj2k",
}


@functools.lru_cache(maxsize=1)
def load_plugins() -> bool:
    """Import ``hdf5plugin`` once, which registers its filters for the whole process; False when it is
    not installed (or fails to load)."""
    try:
        import hdf5plugin
    except ImportError:
        return False
    except Exception as exc:  # a broken build of the package: report it like a missing one
        log.warning("hdf5plugin failed to load (%s: %s); its filters are not available", type(exc).__name__, exc)
        return False
    PLUGIN_FILTERS.update({int(code): str(name) for name, code in getattr(hdf5plugin, "FILTERS", {}).items()})
    return True


def filter_name(code: int) -> str:
    """``lz4``, ``zstd``, ``gzip``... or ``#12345`` for a filter id nobody here knows."""
    return BUILTIN_FILTERS.get(code) or PLUGIN_FILTERS.get(code) or f"#{code}"


def available(code: int) -> bool:
    """Whether HDF5 can run filter ``code`` now, after loading hdf5plugin if needed."""
    if h5py.h5z.filter_avail(code):
        return True
    return load_plugins() and bool(h5py.h5z.filter_avail(code))


def require_filters(ds: h5py.Dataset, path: str, what: str) -> None:
    """Make every filter of ``ds``'s pipeline available (loading hdf5plugin if one needs it), or raise
    FormatError naming ``path``, ``what`` (``layer 'fc'``), the filter and the fix."""
    for code in filter_codes(ds):
        if available(code):
            continue
        name = filter_name(code)
        label = f"an unknown HDF5 filter (id {code})" if name.startswith("#") else f"{name} (HDF5 filter id {code})"
        if code in PLUGIN_FILTERS and not load_plugins():
            fix = "install hdf5plugin, which provides it (pip install hdf5plugin), and run the command again"
        else:
            fix = (
                "no installed package provides it: ask the file's author for a copy stored with gzip, lz4 or "
                "no compression (cka-extract --compression)"
            )
        raise FormatError(f"{path}: {what} is compressed with {label}, which is not available here; {fix}")


__all__ = ["BUILTIN_FILTERS", "PLUGIN_FILTERS", "available", "filter_name", "load_plugins", "require_filters"]
