"""Entry point module of the ``torch`` plugin (entry-point group ``cka_offline``)."""

from __future__ import annotations

from cka_offline.hookspecs import hookimpl


@hookimpl
def cka_extractors() -> list[type]:
    from .extractor import TorchExtractor  # cheap: torch itself is imported inside its methods
    from .hf import HFExtractor

    return [TorchExtractor, HFExtractor]


@hookimpl
def cka_input_readers() -> list[type]:
    from .text import TextInputs  # cheap: transformers is imported when a tokenizer is loaded

    return [TextInputs]
