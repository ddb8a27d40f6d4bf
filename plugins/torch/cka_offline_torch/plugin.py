"""Entry point module of the ``torch`` plugin (entry-point group ``cka_offline``)."""

from __future__ import annotations

from cka_offline.hookspecs import hookimpl


@hookimpl
def cka_extractors() -> list[type]:
    from .extractor import TorchExtractor  # cheap: torch itself is imported inside its methods

    return [TorchExtractor]
