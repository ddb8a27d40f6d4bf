"""Heatmap of a CKA matrix from a :class:`~cka_offline.results.CKAResult` (matplotlib, Agg backend).

matplotlib is imported inside :func:`plot_heatmap`, so importing this module is cheap.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import OutputError
from .files import atomic_output
from .results.summary import display_names

if TYPE_CHECKING:
    from .results import CKAResult

PLOT_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}
#: above this many layers on an axis only every k-th tick label is drawn
MAX_TICK_LABELS = 50
#: cells are annotated with their value by default when the matrix has at most this many cells
AUTO_ANNOTATE_CELLS = 144


def plot_format(path: str) -> str:
    """``png``, ``pdf`` or ``svg`` from the extension of ``path``.

    Raises:
        OutputError: any other extension.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in PLOT_FORMATS:
        raise OutputError(
            f"cannot tell the plot format of {path!r} from its extension {ext or '(none)'!r}; use .png, .pdf or .svg"
        )
    return PLOT_FORMATS[ext]


def plot_heatmap(
    result: CKAResult,
    path: str | os.PathLike[str],
    pair: tuple[int, int] | None = None,
    annotate: bool | None = None,
    *,
    title: str | None = None,
    cmap: str = "magma",
    dpi: int = 150,
) -> str:
    """Draw the CKA matrix of one file pair as a heatmap and write it to ``path`` (PNG, PDF or SVG).

    Rows are the layers of file ``pair[0]`` (A, y axis, first layer at the bottom), columns those of
    file ``pair[1]`` (B, x axis); axis titles name the models from the files' provenance. The colour
    scale is fixed to [0, 1]; undefined cells (NaN, constant layers) are grey. The figure and font sizes
    scale with the layer counts, so 100 layers a side stay readable: beyond 50 layers on an axis only
    every k-th tick label is drawn.

    Args:
        result: the analysis result.
        path: output file; the format comes from the extension.
        pair: ``(i, j)`` file indices; default ``(0, 1)``, or ``(0, 0)`` for a one-file result.
        annotate: write each cell's value in it; default: only when the matrix has at most 144 cells.
        title: figure title; default names the kernel, estimator and example count.
        cmap: matplotlib colour map.
        dpi: resolution of raster output.

    Returns:
        ``path``.
    """
    path = os.fspath(path)
    fmt = plot_format(path)
    if pair is None:
        pair = (0, 0) if len(result.files) == 1 else (0, 1)
    block = result.pair(*pair)
    values = np.asarray(block.cka, dtype=np.float64)
    n_rows, n_cols = values.shape
    if annotate is None:
        annotate = n_rows * n_cols <= AUTO_ANNOTATE_CELLS

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    largest = max(n_rows, n_cols, 1)
    side = min(16.0, max(6.0, 3.0 + 0.2 * largest))
    # tick labels: at most MAX_TICK_LABELS per axis, sized to the space each one gets (points)
    shown = min(largest, MAX_TICK_LABELS)
    font = max(4.0, min(10.0, 0.45 * side * 72 * 0.75 / shown))
    # square cells: the heatmap gets side x side inches for the larger axis; labels and colour bar get their
    # own room (savefig's tight bounding box grows the canvas for long layer names instead of squeezing it)
    cell = side / largest
    fig = Figure(figsize=(n_cols * cell * 1.12, n_rows * cell), dpi=dpi)
    ax = fig.add_axes((0.0, 0.0, 1 / 1.12, 1.0))  # the cells fill the figure; labels go outside it
    colours = matplotlib.colormaps[cmap].with_extremes(bad="#bbbbbb")
    image = ax.imshow(
        np.ma.masked_invalid(values),
        origin="lower",
        cmap=colours,
        vmin=0.0,
        vmax=1.0,
        aspect="equal",
        interpolation="nearest",
    )
    colorbar = fig.colorbar(image, cax=fig.add_axes((1 / 1.12 + 0.02, 0.0, 0.03, 1.0)))
    colorbar.set_label("CKA", fontsize=10)
    colorbar.ax.tick_params(labelsize=9)

    _ticks(ax.set_xticks, ax.set_xticklabels, block.layers_b, font, rotation=90)
    _ticks(ax.set_yticks, ax.set_yticklabels, block.layers_a, font, rotation=0)
    ax.set_xlabel(f"B: {_axis_title(block.file_b)}", fontsize=10)
    ax.set_ylabel(f"A: {_axis_title(block.file_a)}", fontsize=10)

    if annotate:
        cell_font = max(2.5, min(9.0, 0.9 * side * 72 / max(n_cols, 1) / 4))
        for a in range(n_rows):
            for b in range(n_cols):
                v = values[a, b]
                text = "nan" if math.isnan(v) else f"{v:.2f}"
                ax.text(
                    b,
                    a,
                    text,
                    ha="center",
                    va="center",
                    fontsize=cell_font,
                    color="black" if (not math.isnan(v) and v > 0.6) else "white",
                )
    if title is None:
        p = result.params
        title = (
            f"CKA ({p.get('kernel', 'linear')} kernel, {p.get('estimator', 'minibatch')}), {result.n_examples} examples"
        )
    ax.set_title(title, fontsize=12)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight", pad_inches=0.15)
    return path


def _axis_title(info: object) -> str:
    model = getattr(info, "model_name", "")
    label = getattr(info, "label", "")
    return f"{model} ({os.path.basename(label)})" if model and model != label else str(label)


def _ticks(
    set_ticks: Callable[..., Any], set_labels: Callable[..., Any], names: list[str], font: float, rotation: int
) -> None:
    step = max(1, math.ceil(len(names) / MAX_TICK_LABELS))
    positions = list(range(0, len(names), step))
    set_ticks(positions)
    set_labels([label for k, label in enumerate(tick_labels(names)) if k % step == 0], fontsize=font, rotation=rotation)


def tick_labels(names: list[str], width: int = 32) -> list[str]:
    """Layer names short enough for tick labels that still tell the layers apart
    (:func:`~cka_offline.results.summary.display_names`: the shared beginning and end become ``…``)."""
    return display_names(names, width)


__all__ = ["plot_heatmap", "plot_format", "tick_labels"]
