"""Choosing layers by exact names, globs, ``kind:OpType`` and aliases.

Used by extraction (on a model's :class:`~cka_offline.extractor.LayerInfo` list) and by analysis (on
the plain layer names of an activation file).
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
from collections.abc import Sequence

from .errors import LayerSelectionError
from .extractor import LayerInfo

log = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")


def _is_glob(pattern: str) -> bool:
    return bool(_GLOB_CHARS & set(pattern))


def select_layers(
    available: Sequence[LayerInfo | str],
    patterns: Sequence[str] | None,
    *,
    what: str = "layer",
    where: str = "the model",
    hint: str = "",
) -> list[str]:
    """Canonical names of the layers that ``patterns`` select, in the order of ``available``.

    Each pattern is an exact name, an alias (of a :class:`LayerInfo`), an :mod:`fnmatch` glob over names
    and aliases (``"layer*.conv1"``), or ``kind:K`` where ``K`` is a kind or a glob over kinds
    (``kind:Relu``, ``kind:Conv*``). No patterns select every extractable layer.

    Raises :class:`LayerSelectionError` when a pattern matches nothing (the message lists close names),
    an alias names two layers, or a pattern selects only layers that cannot be extracted (quoting why).
    ``what`` and ``where`` name the things and their place in messages ("layer", "model resnet.onnx");
    ``hint`` ends a no-match message ("list them with cka-extract --list-layers").
    """
    infos = [LayerInfo(name=a) if isinstance(a, str) else a for a in available]
    order = {info.name: i for i, info in enumerate(infos)}
    by_name = {info.name: info for info in infos}
    by_alias: dict[str, list[LayerInfo]] = {}
    for info in infos:
        for alias in info.aliases:
            if alias not in by_name:
                by_alias.setdefault(alias, []).append(info)
    if not patterns:
        skipped = [i.name for i in infos if not i.exposable]
        if skipped:
            log.info("skipping %d %ss that cannot be extracted: %s", len(skipped), what, ", ".join(skipped[:5]))
        return [i.name for i in infos if i.exposable]

    chosen: set[str] = set()
    for pattern in patterns:
        matched = _match(pattern, infos, by_name, by_alias, what, where)
        if not matched:
            raise LayerSelectionError(_no_match_message(pattern, infos, what, where) + (f" ({hint})" if hint else ""))
        usable = [i for i in matched if i.exposable]
        explicit = not pattern.startswith("kind:") and not _is_glob(pattern)
        if not usable or (explicit and len(usable) < len(matched)):
            bad = next(i for i in matched if not i.exposable)
            raise LayerSelectionError(
                f"{what} {bad.name!r} (selected by {pattern!r}) in {where} cannot be extracted: {bad.reason or 'no reason given'}"
            )
        for info in matched:
            if not info.exposable:
                log.warning(
                    "%s %r matches %r but cannot be extracted (%s); skipped", what, info.name, pattern, info.reason
                )
        chosen.update(i.name for i in usable)
    return sorted(chosen, key=order.__getitem__)


def _match(
    pattern: str,
    infos: list[LayerInfo],
    by_name: dict[str, LayerInfo],
    by_alias: dict[str, list[LayerInfo]],
    what: str,
    where: str,
) -> list[LayerInfo]:
    if pattern in by_name:
        return [by_name[pattern]]
    if pattern in by_alias:
        targets = by_alias[pattern]
        if len(targets) > 1:
            raise LayerSelectionError(
                f"alias {pattern!r} names several {what}s in {where}: "
                f"{', '.join(t.name for t in targets)}; select one by its name"
            )
        return targets
    if pattern.startswith("kind:"):
        kind = pattern[len("kind:") :]
        return [i for i in infos if i.kind and fnmatch.fnmatchcase(i.kind, kind)]
    if _is_glob(pattern):
        return [
            i
            for i in infos
            if fnmatch.fnmatchcase(i.name, pattern) or any(fnmatch.fnmatchcase(a, pattern) for a in i.aliases)
        ]
    return []


def _no_match_message(pattern: str, infos: list[LayerInfo], what: str, where: str) -> str:
    if pattern.startswith("kind:"):
        kinds = sorted({i.kind for i in infos if i.kind})
        close = difflib.get_close_matches(pattern[5:], kinds, n=5, cutoff=0.5)
        close += [k for k in kinds if k.lower() == pattern[5:].lower() and k not in close]
        known = ", ".join(close) if close else ", ".join(kinds[:20]) or "none (the extractor gives no kinds)"
        return f"no {what} of kind {pattern[5:]!r} in {where}; kinds {'close to it' if close else 'present'}: {known}"
    names = [i.name for i in infos] + [a for i in infos for a in i.aliases]
    close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
    if close:
        found = f"close matches: {', '.join(close)}"
    elif names:
        found = f"{len(infos)} {what}s, for example {', '.join(names[:5])}"
    else:
        found = f"it has no {what}s"
    return f"no {what} matches {pattern!r} in {where}; {found}"


__all__ = ["select_layers"]
