"""cka-offline: extract layer activations to HDF5 once, compare them with streaming minibatch CKA.

Public API (imported lazily so that ``import cka_offline`` and ``--help`` stay fast; the modules are
nouns, ``extraction`` and ``analysis``, so that importing them never shadows the functions):

- :func:`extract` -- run an extractor plugin (or a live model) over inputs (paths, arrays, a DataLoader)
  and write an activation file; :class:`BatchInputs` -- the reader over a DataLoader or batch iterable;
- :func:`compare` -- extract two models and analyse them in one call;
- :func:`analyze` -- stream activation files into the minibatch CKA accumulator, return a :class:`CKAResult`;
- :class:`AnalysisOptions`, :class:`ExtractOptions` -- every choice of an analysis / extraction as one
  frozen, validated object (the functions also take the same choices as keyword arguments);
- :func:`open_activations` -- read an activation file (or shards of one);
- :class:`MinibatchCKA` -- the streaming accumulator itself;
- :func:`plot_heatmap` -- a result's CKA matrix as a matplotlib Figure; :func:`load_result` a saved result;
  :class:`Activations` -- activations in memory for :func:`analyze`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "extract": ("cka_offline.extraction", "extract"),
    "analyze": ("cka_offline.analysis", "analyze"),
    "compare": ("cka_offline.comparison", "compare"),
    "AnalysisOptions": ("cka_offline.analysis.options", "AnalysisOptions"),
    "Activations": ("cka_offline.analysis.memory", "Activations"),
    "ExtractOptions": ("cka_offline.extraction", "ExtractOptions"),
    "CKAResult": ("cka_offline.results", "CKAResult"),
    "load_result": ("cka_offline.results", "load_result"),
    "open_activations": ("cka_offline.store.reader", "open_activations"),
    "MinibatchCKA": ("cka_offline.cka.accumulator", "MinibatchCKA"),
    "plot_heatmap": ("cka_offline.plot", "plot_heatmap"),
    "BatchInputs": ("cka_offline.batch_inputs", "BatchInputs"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'cka_offline' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]


def __dir__() -> list[str]:
    """The public API (the lazy names above are not module globals until first used)."""
    return sorted(__all__)
