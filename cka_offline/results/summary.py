"""The terminal text of a :class:`~cka_offline.results.CKAResult`: best matches and layer identification."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .model import CKAPair, CKAResult


def summarize(result: CKAResult, *, max_detailed_pairs: int = 3) -> str:
    """A terminal summary.

    For each reported pair (the first ``max_detailed_pairs`` in detail): for every layer of A the
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


def best_matches(p: CKAPair) -> list[int | None]:
    """For each layer of A, the index of the B layer with the highest CKA (None if the row is all NaN)."""
    out: list[int | None] = []
    for row in p.cka:
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
    lines = [f"A = {_title(p, 'A')}", f"B = {_title(p, 'B')}" + ("  (self-comparison)" if p.i == p.j else "")]
    width_a = min(40, max([len("layer of A"), *(len(n) for n in p.layers_a)]))
    width_b = min(40, max([len("best layer of B"), *(len(n) for n in p.layers_b)]))
    level = f"{round(confidence * 100)}% interval"
    lines.append(f"  {'layer of A':<{width_a}}  {'best layer of B':<{width_b}}     CKA  {level}")
    for a, b in enumerate(best_matches(p)):
        name_a = shorten_name(p.layers_a[a], width_a)
        if b is None:
            lines.append(f"  {name_a:<{width_a}}  {'-':<{width_b}}     nan  (undefined: constant layer)")
            continue
        name_b = shorten_name(p.layers_b[b], width_b)
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
    best = [p.cka[a, b] for a, b in enumerate(best_matches(p)) if b is not None]
    mean = f"{np.mean(best):.3f}" if best else "nan"
    ident = layer_identification(p)
    ident_text = f"; {ident[0]}/{ident[2]} same depth, {ident[1]}/{ident[2]} within one" if ident else ""
    return f"{p.file_a.label} vs {p.file_b.label}: {mean}{ident_text}"


def shorten_name(name: str, width: int = 32) -> str:
    """``name`` cut to ``width`` characters with an ellipsis in the middle (layer names end informatively)."""
    if len(name) <= width:
        return name
    keep = width - 1
    return name[: keep // 2] + "…" + name[len(name) - (keep - keep // 2) :]


__all__ = ["best_matches", "layer_identification", "shorten_name", "summarize"]
