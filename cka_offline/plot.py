"""Heatmap of a CKA matrix from a :class:`~cka_offline.results.CKAResult` (matplotlib).

:func:`plot_heatmap` returns the matplotlib Figure, draws into a given Axes, and writes a file only when
given a path. matplotlib is imported inside it, so importing this module is cheap; it never imports
pyplot, so it neither opens a window nor changes a notebook's backend.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from .errors import OutputError
from .files import write_bytes
from .results.summary import display_names

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .results import CKAPair, CKAResult

#: display labels of :func:`plot_heatmap`: by layer name, one sequence for both axes, or (rows, columns)
Labels = Mapping[str, str] | Sequence[str] | tuple[Sequence[str], Sequence[str]]

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


@overload
def plot_heatmap(
    result: CKAResult,
    path: str | os.PathLike[str],
    pair: tuple[int, int],
    annotate: bool | None = None,
    *,
    ax: Axes | None = None,
    labels: Labels | None = None,
    title: str | None = None,
    cmap: str = "magma",
    dpi: int = 150,
) -> str: ...


@overload
def plot_heatmap(
    result: CKAResult,
    path: str | os.PathLike[str] | None = None,
    pair: None = None,
    annotate: bool | None = None,
    *,
    i: int = 0,
    j: int | None = None,
    ax: Axes | None = None,
    labels: Labels | None = None,
    title: str | None = None,
    cmap: str = "magma",
    dpi: int = 150,
) -> Figure: ...


def plot_heatmap(
    result: CKAResult,
    path: str | os.PathLike[str] | None = None,
    pair: tuple[int, int] | None = None,
    annotate: bool | None = None,
    *,
    i: int = 0,
    j: int | None = None,
    ax: Axes | None = None,
    labels: Labels | None = None,
    title: str | None = None,
    cmap: str = "magma",
    dpi: int = 150,
) -> Figure | str:
    """Draw the CKA matrix of files ``i`` (rows) and ``j`` (columns) as a heatmap; return the Figure.

    Rows are the layers of file ``i`` (A, y axis, first layer at the bottom), columns those of file ``j``
    (B, x axis); ``j`` defaults to the other file of a two-file result, or ``i`` for a one-file result.
    Axis titles name the models from the files' provenance, and the title says what was compared: the
    models, the kernel and estimator, n (examples) and m (examples per minibatch, and how many). The colour
    scale is fixed to [0, 1]; undefined cells (NaN, constant layers) are grey. Long layer names keep the
    part that tells them apart (:func:`tick_labels`); beyond 50 layers on an axis only every k-th tick
    label is drawn.

    Args:
        result: the analysis result.
        path: write the figure there (PNG, PDF or SVG, from the extension); nothing is written without it.
        pair: ``(i, j)``, the older spelling: with it (and a ``path``) the function returns ``path``, as
            ``cka-analyze`` expects, instead of the Figure.
        annotate: write each cell's value in it; default: only when the matrix has at most 144 cells.
        i, j: the files of the rows and the columns.
        ax: a matplotlib Axes to draw into (e.g. one of ``plt.subplots``); its figure is returned and
            keeps its size. Default: a new Figure sized to the layer counts (no pyplot, no GUI).
        labels: shorter display names for the layers: a mapping ``{layer name: label}`` (both axes; names
            it does not hold show as by default), a sequence for both axes when they have as many layers,
            or a pair ``(row labels, column labels)``. Default: each layer's display alias, the name it
            was selected by at extraction (``conv1`` for the ONNX tensor ``/conv1/Conv_output_0``), else
            its name (:attr:`~cka_offline.results.FileInfo.display_layers`).
        title: the figure title instead of the default.
        cmap: matplotlib colour map.
        dpi: resolution of raster output.

    Raises:
        OutputError: ``path`` has an extension other than .png, .pdf or .svg, or cannot be written (its
            folder is missing or not writable, the disk is full).
        ValueError: ``labels`` do not fit the layers.
        IndexError: no such file.
    """
    fspath = None if path is None else os.fspath(path)
    fmt = None if fspath is None else plot_format(fspath)
    if pair is not None:
        i, j = pair
    block = result.pair(i, j)
    rows, cols = display_labels(block.layers_a, block.layers_b, labels, shown=(block.display_a, block.display_b))
    values = np.asarray(block.cka, dtype=np.float64)
    n_rows, n_cols = values.shape
    if annotate is None:
        annotate = n_rows * n_cols <= AUTO_ANNOTATE_CELLS

    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend, a notebook's stays

    largest = max(n_rows, n_cols, 1)
    side = min(16.0, max(6.0, 3.0 + 0.2 * largest))
    # tick labels: at most MAX_TICK_LABELS per axis, sized to the space each one gets (points)
    shown = min(largest, MAX_TICK_LABELS)
    font = max(4.0, min(10.0, 0.45 * side * 72 * 0.75 / shown))
    colours = matplotlib.colormaps[cmap].with_extremes(bad="#bbbbbb")
    if ax is None:
        # square cells: the heatmap gets side x side inches for the larger axis; labels and colour bar get
        # their own room (savefig's tight bounding box grows the canvas for long layer names)
        cell = side / largest
        fig = Figure(figsize=(n_cols * cell * 1.12, n_rows * cell), dpi=dpi)
        ax = fig.add_axes((0.0, 0.0, 1 / 1.12, 1.0))  # the cells fill the figure; labels go outside it
        cax = fig.add_axes((1 / 1.12 + 0.02, 0.0, 0.03, 1.0))
        parent: Any = fig
    else:
        parent = ax.figure  # a Figure or a SubFigure of one
        fig = parent if isinstance(parent, Figure) else parent.figure
        cax = None
    image = ax.imshow(
        np.ma.masked_invalid(values),
        origin="lower",
        cmap=colours,
        vmin=0.0,
        vmax=1.0,
        aspect="equal",
        interpolation="nearest",
    )
    colorbar = parent.colorbar(image, cax=cax) if cax is not None else parent.colorbar(image, ax=ax, fraction=0.046)
    colorbar.set_label("CKA", fontsize=10)
    colorbar.ax.tick_params(labelsize=9)

    _ticks(ax.set_xticks, ax.set_xticklabels, cols, font, rotation=90)
    _ticks(ax.set_yticks, ax.set_yticklabels, rows, font, rotation=0)
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
    ax.set_title(heatmap_title(result, block) if title is None else title, fontsize=11)
    if fspath is not None:  # drawn in memory, then written atomically: a full disk is one clear error
        import io

        buffer = io.BytesIO()
        with _glyphs_summarized():
            fig.savefig(buffer, format=fmt, dpi=dpi, bbox_inches="tight", pad_inches=0.15)
        write_bytes(fspath, buffer.getvalue())
        if pair is not None:
            return fspath
    return fig


@contextlib.contextmanager
def _glyphs_summarized() -> Iterator[None]:
    """matplotlib warns once per character its font lacks (CJK layer names: one warning per glyph); they
    become one warning listing the characters. Other warnings pass through unchanged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    missing: list[str] = []
    for record in caught:
        found = _GLYPH.match(str(record.message))
        if found and issubclass(record.category, UserWarning):
            char = chr(int(found.group(1)))
            if char not in missing:
                missing.append(char)
            continue
        warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)
    if missing:
        warnings.warn(
            f"the plot's font has no glyph for {len(missing)} character(s) of the labels ({''.join(missing[:20])}"
            f"{'...' if len(missing) > 20 else ''}); they are drawn as boxes: install a font that has them "
            "(or give plot_heatmap labels=)",
            UserWarning,
            stacklevel=3,
        )


#: matplotlib's warning for a character missing from the font
_GLYPH = re.compile(r"Glyph (\d+) .*missing from (current )?font")


def heatmap_title(result: CKAResult, block: CKAPair) -> str:
    """What was compared: the models, then the kernel, estimator, n and m, e.g. ``net_a vs net_b`` /
    ``linear CKA, minibatch estimator, n = 1000 examples, m = 256 (8 minibatches)``."""
    p = result.params
    a, b = block.file_a.model_name, block.file_b.model_name
    models = f"{a} (layers against each other)" if block.i == block.j else f"{a} vs {b}"
    estimator = p.get("estimator", "minibatch")
    parts = [f"{p.get('kernel', 'linear')} CKA, {estimator} estimator", f"n = {result.n_examples} examples"]
    if estimator == "minibatch" and p.get("batch_size"):
        parts.append(
            f"m = {p['batch_size']}" + (f" ({result.n_minibatches} minibatches)" if result.n_minibatches else "")
        )
    return f"{models}\n{', '.join(parts)}"


def display_labels(
    layers_a: list[str],
    layers_b: list[str],
    labels: Labels | None = None,
    *,
    shown: tuple[Sequence[str], Sequence[str]] | None = None,
) -> tuple[list[str], list[str]]:
    """The tick labels of the rows and the columns: ``labels`` (see :func:`plot_heatmap`) applied to the
    layer names, else ``shown`` (what to show for each layer by default: the display aliases, one per
    layer of each axis; default the names), then :func:`tick_labels`.

    Raises:
        ValueError: a sequence of labels whose length is not the layer count.
    """
    rows, cols = list(layers_a), list(layers_b)
    default_a, default_b = (rows, cols) if shown is None else (list(shown[0]), list(shown[1]))
    if isinstance(labels, Mapping):
        rows = [str(labels.get(n, d)) for n, d in zip(rows, default_a)]
        cols = [str(labels.get(n, d)) for n, d in zip(cols, default_b)]
    elif labels is None:
        rows, cols = default_a, default_b
    else:
        given = list(labels)
        if len(given) == 2 and all(not isinstance(x, str) and isinstance(x, Sequence) for x in given):
            new_rows, new_cols = (list(map(str, x)) for x in given)
        else:
            new_rows = new_cols = [str(x) for x in given]
        for which, new, old in (("rows", new_rows, rows), ("columns", new_cols, cols)):
            if len(new) != len(old):
                raise ValueError(
                    f"labels: expected {len(old)} labels for the {which} (the layers "
                    f"{', '.join(old[:3])}{', ...' if len(old) > 3 else ''}), got {len(new)}; "
                    "give a mapping {layer name: label} or a pair (row labels, column labels)"
                )
        rows, cols = new_rows, new_cols
    return tick_labels(rows), tick_labels(cols)


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


__all__ = ["Labels", "display_labels", "heatmap_title", "plot_format", "plot_heatmap", "tick_labels"]
