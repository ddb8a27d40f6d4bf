"""Matching the example ids of several activation files: which row of each file holds each example."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import AlignmentError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alignment:
    """The aligned examples of several files.

    Attributes:
        ids: the aligned example ids, in the first file's order; position ``p`` is ``ids[p]``.
        rows: per file, the row holding each aligned example (``rows[k][p]``), or ``None`` when the file's
            rows are the positions themselves (same ids in the same order).
    """

    ids: np.ndarray
    rows: list[np.ndarray | None]

    @property
    def n(self) -> int:
        return len(self.ids)

    def rows_of(self, file: int, positions: np.ndarray) -> np.ndarray:
        """The rows of file ``file`` that hold the aligned examples ``positions``."""
        rows = self.rows[file]
        return positions if rows is None else rows[positions]


def describe_ids(ids: np.ndarray, limit: int = 3) -> str:
    """The first ``limit`` ids as text, for error messages."""
    from ..store.writer import format_id  # error path only: keeps h5py out of this module's import

    shown = ", ".join(format_id(x) for x in ids[:limit])
    return shown + (", ..." if len(ids) > limit else "")


def align_ids(id_lists: Sequence[np.ndarray], labels: Sequence[str], *, intersect: bool = False) -> Alignment:
    """Match the example ids of every file to the first file's.

    Same ids in the same order: identity. Same set in another order: row maps. Different sets: AlignmentError
    saying how many ids each side lacks (with examples), unless ``intersect`` (then the common ids, in the
    first file's order).
    """
    ref = np.asarray(id_lists[0])
    kinds = {np.asarray(ids).dtype.kind in "iu" for ids in id_lists}
    if len(kinds) > 1:
        kind = ["integers" if np.asarray(i).dtype.kind in "iu" else "strings" for i in id_lists]
        raise AlignmentError(
            "example ids are integers in some files and strings in others ("
            + ", ".join(f"{lab}: {k}" for lab, k in zip(labels, kind))
            + "); extract all files from the same inputs"
        )
    if intersect:
        common, ref_rows = _common(ref, id_lists, labels[0])
    else:
        common, ref_rows = ref, None
        for ids, label in zip(id_lists[1:], labels[1:]):
            _require_same_set(ref, np.asarray(ids), labels[0], label)
    rows: list[np.ndarray | None] = [ref_rows]
    for ids in id_lists[1:]:
        ids = np.asarray(ids)
        if len(ids) == len(common) and np.array_equal(ids, common):
            rows.append(None)
            continue
        sorter = np.argsort(ids, kind="stable")
        rows.append(sorter[np.searchsorted(ids, common, sorter=sorter)].astype(np.int64))
    return Alignment(ids=common, rows=rows)


def _common(ref: np.ndarray, id_lists: Sequence[np.ndarray], label: str) -> tuple[np.ndarray, np.ndarray | None]:
    common = ref
    for ids in id_lists[1:]:
        common = common[np.isin(common, ids)]
    ref_rows = None if len(common) == len(ref) else np.flatnonzero(np.isin(ref, common))
    if ref_rows is not None:
        log.info("using the %d example ids common to all files (%d in %s)", len(common), len(ref), label)
    return common, ref_rows


def _require_same_set(ref: np.ndarray, ids: np.ndarray, ref_label: str, label: str) -> None:
    if len(ids) == len(ref) and np.array_equal(ids, ref):
        return
    only_ref = ref[~np.isin(ref, ids)]
    only_other = ids[~np.isin(ids, ref)]
    if len(only_ref) or len(only_other):
        raise AlignmentError(
            f"{ref_label} and {label} hold different examples: {len(only_ref)} id(s) of {ref_label} are "
            f"missing from {label} (e.g. {describe_ids(only_ref) or '-'}), {len(only_other)} id(s) of "
            f"{label} are missing from {ref_label} (e.g. {describe_ids(only_other) or '-'}); extract both "
            "from the same inputs, or use the common examples with --intersection"
        )


__all__ = ["Alignment", "align_ids", "describe_ids"]
