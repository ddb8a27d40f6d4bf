"""The result of an analysis: CKA matrices with uncertainty, what was compared and how.

A :class:`CKAResult` holds one CKA matrix over the *stacked* layers of every compared file (file 0's
layers first, then file 1's, ...); the matrix of a pair of files is a block of it (:meth:`CKAResult.pair`).
It saves to and loads from ``.h5``, ``.json`` and ``.csv``, specified in ``docs/results.md``.

Modules: :mod:`.model` (the classes), :mod:`.schema` (the format's names and version, the only mirror of
``docs/results.md``), :mod:`.io` (save and load), :mod:`.summary` (the terminal text), :mod:`.frames`
(pandas and xarray, optional).
"""

from __future__ import annotations

from ..files import atomic_output
from .io import load_result, result_format, save_result
from .model import CKAPair, CKAResult, FileInfo
from .schema import CSV_COLUMNS, FORMATS
from .schema import FORMAT_NAME as RESULT_FORMAT
from .schema import FORMAT_VERSION as RESULT_FORMAT_VERSION
from .summary import best_matches, display_names, layer_identification, shorten_name, summarize

__all__ = [
    "CKAPair",
    "CKAResult",
    "CSV_COLUMNS",
    "FORMATS",
    "FileInfo",
    "RESULT_FORMAT",
    "RESULT_FORMAT_VERSION",
    "atomic_output",
    "best_matches",
    "display_names",
    "layer_identification",
    "load_result",
    "result_format",
    "save_result",
    "shorten_name",
    "summarize",
]
