"""The terminal text of a :class:`~cka_offline.results.CKAResult`: best matches and layer identification."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .model import CKAPair, CKAResult


def summarize(result: CKAResult, *, max_detailed_pairs: int = 3) -> str:
    """A terminal summary.

    Layers show as their display alias where they have one, else their name (shortened as
    :func:`display_names` does). For each reported pair (the first ``max_detailed_pairs`` in detail): for every layer of A the
    best-matching layer of B with its CKA and interval, and, when both files have the same number of
    layers, the layer-identification check of Kornblith et al. (2019): how many layers of A have their
    most similar B layer at the same depth, and within one layer of it. Further pairs get one line.
    """
    lines = [_header(result)]
    for k, (i, j) in enumerate(result.pairs):
        p = result.pair(i, j)
        if k < max_detailed_pairs:
            lines.append("")
            lines.extend(_pair_detail(p, result.confidence))
        else:
            if k == max_detailed_pairs:
                lines.append("")
                lines.append("other pairs (mean best-match CKA; layer identification):")
            lines.append("  " + _pair_line(p))
    if result.warnings:
        lines.append("")
        lines.append("warnings:")
        lines.extend(f"  - {w}" for w in result.warnings)
    return "\n".join(lines)


def _header(result: CKAResult) -> str:
    p = result.params
    est = p.get("estimator", "minibatch")
    parts = [f"CKA ({p.get('kernel', 'linear')} kernel, {est} estimator)"]
    parts.append(f"{result.n_examples} examples")
    if est == "minibatch" and result.n_minibatches:
        per_epoch = max(1, result.n_minibatches // max(1, int(p.get("epochs") or 1)))
        small, large = result.n_examples // per_epoch, -(-result.n_examples // per_epoch)
        size = f"{small}" if small == large else f"{small}-{large}"
        parts.append(
            f"{result.n_minibatches} minibatches of {size} examples (batch size {p.get('batch_size')}) over "
            f"{p.get('epochs')} epoch(s), seed {p.get('seed')}"
        )
    total = result.timing.get("total")
    if total is not None:
        parts.append(f"{total:.1f} s")
    return ", ".join(parts)


def best_matches(p: CKAPair, *, others: bool = False) -> list[int | None]:
    """For each layer of A, the index of the B layer with the highest CKA (None if the row is all NaN).
    ``others``: a file against itself -- each layer's most similar *other* layer (its own CKA, 1, is left
    out)."""
    out: list[int | None] = []
    for a, row in enumerate(p.cka):
        if others:
            row = row.copy()
            row[a] = np.nan
        out.append(None if np.all(np.isnan(row)) else int(np.nanargmax(row)))
    return out


def layer_identification(p: CKAPair) -> tuple[int, int, int] | None:
    """Kornblith et al. (2019) layer identification for two files with the same number of layers.

    Returns ``(same, within_one, defined)``: how many layers of A have their highest-CKA layer of B at the
    same depth, within one layer of it, out of ``defined`` layers whose row is not all NaN; None when the
    layer counts differ or the pair is a file against itself.
    """
    if p.i == p.j or len(p.layers_a) != len(p.layers_b) or not p.layers_a:
        return None
    best = best_matches(p)
    defined = [(a, b) for a, b in enumerate(best) if b is not None]
    same = sum(1 for a, b in defined if a == b)
    near = sum(1 for a, b in defined if abs(a - b) <= 1)
    return same, near, len(defined)


def _interval(p: CKAPair, a: int, b: int) -> str:
    low, high = p.low[a, b], p.high[a, b]
    if math.isnan(low) or math.isnan(high):
        return ""
    return f"[{low:.3f}, {high:.3f}]"


def _title(p: CKAPair, which: str) -> str:
    info = p.file_a if which == "A" else p.file_b
    return f"{info.label} ({info.model_name})" if info.model_name != info.label else info.label


def _pair_detail(p: CKAPair, confidence: float) -> list[str]:
    self_pair = p.i == p.j
    lines = [f"A = {_title(p, 'A')}", f"B = {_title(p, 'B')}" + ("  (self-comparison)" if self_pair else "")]
    shown_a, shown_b = display_names(p.display_a, NAME_WIDTH), display_names(p.display_b, NAME_WIDTH)
    # against itself every layer's best match is itself (CKA 1): show its most similar other layer instead
    column = "most similar other layer" if self_pair else "best layer of B"
    width_a = max([len("layer of A"), *(len(n) for n in shown_a)])
    width_b = max([len(column), *(len(n) for n in shown_b)])
    level = f"{round(confidence * 100)}% interval"
    lines.append(f"  {'layer of A':<{width_a}}  {column:<{width_b}}     CKA  {level}")
    for a, b in enumerate(best_matches(p, others=self_pair)):
        name_a = shown_a[a]
        if b is None:
            why = "no other layer" if self_pair and len(p.layers_b) == 1 else "undefined: constant layer"
            lines.append(f"  {name_a:<{width_a}}  {'-':<{width_b}}     nan  ({why})")
            continue
        name_b = shown_b[b]
        lines.append(f"  {name_a:<{width_a}}  {name_b:<{width_b}}  {p.cka[a, b]:6.3f}  {_interval(p, a, b)}")
    ident = layer_identification(p)
    if ident is not None:
        same, near, defined = ident
        lines.append(
            f"layer identification (Kornblith et al. 2019): {same}/{defined} layers of A match the B layer at the "
            f"same depth, {near}/{defined} within one layer"
        )
    return lines


def _pair_line(p: CKAPair) -> str:
    best = [p.cka[a, b] for a, b in enumerate(best_matches(p, others=p.i == p.j)) if b is not None]
    mean = f"{np.mean(best):.3f}" if best else "nan"
    ident = layer_identification(p)
    ident_text = f"; {ident[0]}/{ident[2]} same depth, {ident[1]}/{ident[2]} within one" if ident else ""
    return f"{p.file_a.label} vs {p.file_b.label}: {mean}{ident_text}"


#: the widest a layer name is shown in the summary's columns
NAME_WIDTH = 40
#: where a layer name may be cut when its shared beginning or end is dropped (between components)
NAME_SEPARATORS = "./:"


def display_names(names: list[str], width: int = 32) -> list[str]:
    """Layer names at most ``width`` characters long that still tell the layers apart.

    Names that all fit are kept. Otherwise the beginning all of them share, up to a component boundary
    (``.``, ``/``, ``:``), becomes ``…`` (``transformer.encoder.layer_1.attention.output`` and
    ``...layer_12.attention.output`` -> ``…layer_1.attention.output``, ``…layer_12.attention.output``);
    if that is not enough, the end they share is cut off as far as needed (``…layer_1.attent…``), and
    entirely when the part that differs is longer still; a name still too long is cut in the middle (:func:`shorten_name`). A single name is only cut in the middle.
    """
    names = list(names)
    if len(names) < 2 or max(len(n) for n in names) <= width:
        return [shorten_name(n, width) for n in names]
    prefix = os.path.commonprefix(names)
    start = max(prefix.rfind(sep) for sep in NAME_SEPARATORS) + 1
    if start > 0 and all(len(n) > start for n in names):
        names = ["…" + n[start:] for n in names]
    if max(len(n) for n in names) > width:
        suffix = os.path.commonprefix([n[::-1] for n in names])[::-1]
        cuts = [suffix.find(sep) for sep in NAME_SEPARATORS if sep in suffix]
        if cuts:
            drop = len(suffix) - min(cuts)  # the shared end from its first component boundary on
            if all(1 < len(n) - drop <= width - 1 for n in names):  # the part that differs fits: cut the end
                names = [n if len(n) <= width else n[: width - 1] + "…" for n in names]
            elif all(len(n) - drop > 1 for n in names):
                names = [n[: len(n) - drop] + "…" for n in names]
    return [shorten_name(n, width) for n in names]


def shorten_name(name: str, width: int = 32) -> str:
    """``name`` cut to ``width`` characters with an ellipsis in the middle (layer names end informatively)."""
    if len(name) <= width:
        return name
    keep = width - 1
    return name[: keep // 2] + "…" + name[len(name) - (keep - keep // 2) :]


__all__ = ["best_matches", "display_names", "layer_identification", "shorten_name", "summarize"]
