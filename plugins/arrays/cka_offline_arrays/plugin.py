"""Entry point of the cka-offline-arrays plugin (group ``cka_offline``)."""

from __future__ import annotations

from cka_offline.hookspecs import hookimpl

from .extractor import ArraysExtractor


@hookimpl
def cka_extractors() -> list[type[ArraysExtractor]]:
    return [ArraysExtractor]
