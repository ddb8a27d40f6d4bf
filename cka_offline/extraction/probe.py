"""The layers of a model as one probe batch of inputs shows them (:meth:`Extractor.probe`), for
extraction and for ``cka-extract --list-layers --inputs ...``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..extractor import Extractor, InputReader, LayerInfo
from ..selection import select_layers
from .batches import feed

log = logging.getLogger(__name__)


def probes(ext: Extractor) -> bool:
    """Whether the extractor learns its layers from a batch (overrides :meth:`Extractor.probe`)."""
    return type(ext).probe is not Extractor.probe


def probe_layers(ext: Extractor, reader: InputReader, start: int, stop: int) -> list[LayerInfo] | None:
    """``ext.probe`` on inputs ``start:stop`` (fed as :meth:`Extractor.run` gets them), or ``None`` when the
    extractor does not probe or there are no rows."""
    if not probes(ext) or stop <= start:
        return None
    data = reader.read(start, stop)
    infos = ext.probe(feed(ext, ext.input_names(), data, reader.path))
    if infos is not None:
        log.debug("probe batch of %d examples: %d layers", stop - start, len(infos))
    return infos


@dataclass(frozen=True)
class LayerListing:
    """What ``--list-layers`` shows: the layers, whether a probe batch of ``examples`` inputs filled in
    shapes and runs (``probed``), and the names the default selection (no ``--layers``) takes."""

    layers: list[LayerInfo]
    default: list[str]
    probed: bool
    can_probe: bool
    examples: int = 0


def list_layers(
    source: Any,
    inputs: Any = None,
    *,
    extractor: str | type[Extractor] | None = None,
    device: str = "cpu",
    options: Mapping[str, Any] | None = None,
    input_options: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    plugin_manager: Any = None,
) -> LayerListing:
    """The layers ``source`` offers; with ``inputs``, as the first batch of them (``batch_size`` examples)
    shows them, for an extractor that probes (:meth:`Extractor.probe`)."""
    from ..registry import get_plugin_manager
    from . import _open_inputs, _pick_extractor

    pm = plugin_manager or get_plugin_manager()
    cls, _ = _pick_extractor(source, extractor, pm)
    with contextlib.ExitStack() as stack:
        ext = cls(source, device=device, options=dict(options or {}))
        stack.callback(ext.close)
        infos, examples = None, 0
        if inputs is not None and probes(ext):
            reader = _open_inputs(inputs, input_options, ext, pm)
            stack.callback(reader.close)
            examples = min(len(reader), batch_size)
            infos = probe_layers(ext, reader, 0, examples)
        probed = infos is not None
        infos = infos if infos is not None else ext.layers()
        return LayerListing(infos, select_layers(infos, None), probed, probes(ext), examples if probed else 0)


__all__ = ["LayerListing", "list_layers", "probe_layers", "probes"]
