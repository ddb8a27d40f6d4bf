"""Entry point module of the ``cka-offline-onnx`` distribution (group ``cka_offline``)."""

from __future__ import annotations

from cka_offline.extractor import Extractor
from cka_offline.hookspecs import hookimpl

from .extractor import OnnxExtractor


@hookimpl
def cka_extractors() -> list[type[Extractor]]:
    """The ONNX extractor (``--extractor onnx``)."""
    return [OnnxExtractor]
