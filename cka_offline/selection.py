"""Choosing layers by exact names, path globs, ``kind:OpType``, aliases and module names.

Used by extraction (on a model's :class:`~cka_offline.extractor.LayerInfo` list), by ``--reduction
PATTERN=NAME`` (:func:`cka_offline.reduce.resolve_reductions`) and by analysis (on the plain layer names of
an activation file): one matcher, :func:`match_layers`, so a pattern selects the same layers everywhere.

Patterns are path globs over dotted names: ``*`` matches within one dotted component (``layer*`` gives
``layer1`` ... ``layer4``, not ``layer1.0.conv1``), ``**`` across components (``layer1.**`` is everything
inside ``layer1``; ``**.relu`` every ``relu`` at any depth), ``?`` one character of a component and
``[abc]`` / ``[!abc]`` one of (or none of) those characters.

A module that runs several times in one forward pass is offered as one layer per call, ``NAME:1``,
``NAME:2``, ... (:attr:`LayerInfo.group` is ``NAME``); selecting ``NAME`` (exactly or by a glob) selects
every call. For plain names (the layers of a file) a trailing ``:N`` (N = 1, 2, ...) is read the same way.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import logging
import re
from collections.abc import Sequence

from .errors import LayerSelectionError
from .extractor import LayerInfo

log = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")
#: ``NAME:N``: call N (counting from 1) of a module that runs several times per forward pass
_CALL = re.compile(r"(.+):([1-9][0-9]*)")


def is_glob(pattern: str) -> bool:
    """Whether ``pattern`` holds a glob character (``*``, ``?``, ``[``)."""
    return bool(_GLOB_CHARS & set(pattern))


def call_name(name: str, call: int) -> str:
    """The layer name of call ``call`` (counting from 1) of module ``name``: ``name:call``."""
    return f"{name}:{call}"


def split_call(name: str) -> tuple[str, int] | None:
    """``(module name, call)`` of a call name ``NAME:N``; ``None`` for any other name."""
    m = _CALL.fullmatch(name)
    return (m.group(1), int(m.group(2))) if m else None


@functools.lru_cache(maxsize=512)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**", i):
            whole_start = i == 0 or pattern[i - 1] == "."
            j = i + 2
            if whole_start and pattern.startswith(".", j):  # '**.' : any leading components, or none
                out.append(r"(?:.*\.)?")
                i = j + 1
            else:
                out.append(".*")
                i = j
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[":
            j = i + 1
            j += pattern.startswith("!", j)
            j += pattern.startswith("]", j)
            end = pattern.find("]", j)
            if end < 0:
                out.append(r"\[")
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                body = "^." + body[1:] if body.startswith("!") else body.replace("^", "\\^")
                out.append("[" + body + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def glob_matches(name: str, pattern: str) -> bool:
    """Whether ``name`` matches the path glob ``pattern`` (see the module docstring); case-sensitive."""
    return _glob_regex(pattern).fullmatch(name) is not None


def as_layer_info(layer: LayerInfo | str) -> LayerInfo:
    """``layer`` as a :class:`LayerInfo`: a plain name ``NAME:N`` is call N of module ``NAME`` (its group)."""
    if isinstance(layer, LayerInfo):
        return layer
    call = split_call(layer)
    return LayerInfo(name=layer, group=call[0] if call else "")


def match_layers(
    pattern: str, available: Sequence[LayerInfo | str], *, what: str = "layer", where: str = "the model"
) -> list[str]:
    """Names of the layers in ``available`` that ``pattern`` selects, in their order; ``[]`` if none.

    ``pattern`` is an exact layer name, a module name whose calls are layers (:attr:`LayerInfo.group`),
    an alias, ``kind:K`` (``K`` a kind or a glob over kinds: ``kind:Relu``, ``kind:Conv*``) or a path glob
    over names, groups and aliases. Exposability is not checked here (see :func:`select_layers`).

    Raises :class:`LayerSelectionError` when ``pattern`` is an alias of several layers.
    """
    return [i.name for i in _match(pattern, [as_layer_info(a) for a in available], what, where)]


def select_layers(
    available: Sequence[LayerInfo | str],
    patterns: Sequence[str] | None,
    *,
    what: str = "layer",
    where: str = "the model",
    hint: str = "",
) -> list[str]:
    """Canonical names of the layers that ``patterns`` select, in the order of ``available``.

    Each pattern is matched by :func:`match_layers`. No patterns select every extractable layer.

    Raises :class:`LayerSelectionError` when a pattern matches nothing (the message lists close names),
    an alias names two layers, or a pattern selects only layers that cannot be extracted (quoting why).
    ``what`` and ``where`` name the things and their place in messages ("layer", "model resnet.onnx");
    ``hint`` ends a no-match message ("list them with cka-extract --list-layers").
    """
    infos = [as_layer_info(a) for a in available]
    order = {info.name: i for i, info in enumerate(infos)}
    if not patterns:
        skipped = [i.name for i in infos if not i.exposable]
        if skipped:
            log.info("skipping %d %ss that cannot be extracted: %s", len(skipped), what, ", ".join(skipped[:5]))
        return [i.name for i in infos if i.exposable]

    chosen: set[str] = set()
    for pattern in patterns:
        matched = _match(pattern, infos, what, where)
        if not matched:
            raise LayerSelectionError(_no_match_message(pattern, infos, what, where) + (f" ({hint})" if hint else ""))
        usable = [i for i in matched if i.exposable]
        explicit = not pattern.startswith("kind:") and not is_glob(pattern)
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


def _match(pattern: str, infos: list[LayerInfo], what: str, where: str) -> list[LayerInfo]:
    exact = [i for i in infos if i.name == pattern]
    if exact:
        return exact[:1]
    names = {i.name for i in infos}
    calls = [i for i in infos if i.group and i.group == pattern]
    if calls:
        return calls
    targets = [i for i in infos if pattern in i.aliases and pattern not in names]
    if len(targets) > 1:
        raise LayerSelectionError(
            f"alias {pattern!r} names several {what}s in {where}: "
            f"{', '.join(t.name for t in targets)}; select one by its name"
        )
    if targets:
        return targets
    if pattern.startswith("kind:"):
        kind = pattern[len("kind:") :]
        return [i for i in infos if i.kind and fnmatch.fnmatchcase(i.kind, kind)]
    if is_glob(pattern):
        return [
            i
            for i in infos
            if glob_matches(i.name, pattern)
            or (i.group and glob_matches(i.group, pattern))
            or any(glob_matches(a, pattern) for a in i.aliases)
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
    crossing = ""
    if is_glob(pattern) and "**" not in pattern and any(fnmatch.fnmatchcase(n, pattern) for n in names):
        crossing = f"; '*' matches within one dotted name component: use '**' to cross dots (e.g. {pattern.replace('*', '**', 1)!r})"
    return f"no {what} matches {pattern!r} in {where}; {found}{crossing}"


__all__ = ["as_layer_info", "call_name", "glob_matches", "is_glob", "match_layers", "select_layers", "split_call"]
