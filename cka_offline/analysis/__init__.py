"""Compare the layers of activation files with CKA: files -> aligned minibatches -> accumulator -> result.

:func:`analyze` opens every file, aligns their example ids, cuts the examples into random minibatches,
reads them while the Grams and HSIC sums are computed on the device, and returns a
:class:`~cka_offline.results.CKAResult`. All selected layers of all files are stacked into one list of
``L`` layers fed to one :class:`~cka_offline.cka.accumulator.MinibatchCKA`, so each file's Grams are
computed once per minibatch and shared by every pair of files; a pair's CKA matrix is a block of the
``L x L`` result. One file is compared with itself (the matrix is symmetric by construction).

The modules, in the order the data flows through them:

- :mod:`.options` -- :class:`AnalysisOptions`, the one validated object of every choice; allowed values;
- :mod:`.stack` -- the opened files, their labels, the selected layers and the id alignment (:mod:`.align`);
- :mod:`.plan` -- :class:`MinibatchPlan`: exactly what is random, and each process's share;
- :mod:`.batches` -- where a minibatch's rows come from (memory maps, or an HDF5 reader thread);
- :mod:`.grams` -- the numpy (CPU) and torch (CUDA) Gram engines;
- :mod:`.loop` -- the minibatch and full-data loops; :mod:`.runner` -- one analysis from start to end.

Importing this package imports no numpy (``cka-analyze --help`` reads :mod:`.options`); the other
names are loaded on first use.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Union

from .options import BUFFER_BYTES, DEVICES, ESTIMATORS, KERNELS, MIN_BATCH, PRECISIONS, AnalysisOptions, check_options

if TYPE_CHECKING:
    from ..distributed import Distributed
    from ..results import CKAResult
    from .align import Alignment, align_ids
    from .memory import Activations
    from .plan import MinibatchPlan, batch_sizes, own_minibatches, plan_minibatches
    from .runner import resolve_device

#: one activation file as :func:`analyze` takes it: a path, a glob of shard files or a list of shard paths
FileSpec = Union[str, "os.PathLike[str]", Sequence[str]]

_LAZY = {
    "Activations": "memory",
    "Alignment": "align",
    "align_ids": "align",
    "MinibatchPlan": "plan",
    "batch_sizes": "plan",
    "own_minibatches": "plan",
    "plan_minibatches": "plan",
    "resolve_device": "runner",
}


def analyze(
    files: Any,
    options: AnalysisOptions | None = None,
    *,
    progress: bool | Callable[[int, int], None] | None = True,
    distributed: Distributed | None = None,
    **choices: Any,
) -> CKAResult:
    """CKA between the layers of one or more activation files.

    One file is compared with itself; two or more are compared pairwise in one pass (every file's Grams
    are computed once per minibatch and shared by all pairs); only the pairs across files and each layer's
    self-HSIC are computed then, the within-file entries are NaN unless ``all_pairs=True``
    (docs/results.md, "Within-file blocks"). :mod:`cka_offline.analysis.plan` says
    exactly what is random; :func:`plan_minibatches` reproduces the minibatches.

    Args:
        files: the sources; each a path, a glob of shard files, a list of shard paths, an opened
            :class:`~cka_offline.store.reader.ActivationFile` (left open), or activations in memory: a dict
            ``{layer name: array}`` (numpy or torch, ``(n, ...)``; ids ``0..n-1``) or an :class:`Activations`
            (with ids and a label). A single source may be given on its own.
        options: every choice as one :class:`AnalysisOptions`; or give its fields as keyword arguments
            (``batch_size=512, kernel="rbf"``...), not both.
        progress: ``True`` (the default) for a tqdm progress bar (a widget in Jupyter, lines in a log;
            ``TQDM_DISABLE=1`` hides it), ``False`` for none, or a function called as ``progress(examples_done, examples_total)`` after each minibatch.
        distributed: this process's place in a torchrun run (:func:`cka_offline.distributed.init`): each
            rank processes a contiguous share of the minibatches and the sums are all-reduced, so every
            rank returns the single-process result (up to float64 summation order; ``progress`` is called
            on rank 0 only; each rank hashes a share of the files). ``None``: one process.

    Raises:
        ValueError: an option value or combination is invalid (the message says the fix).
        AlignmentError: the files hold different examples (and ``intersect`` is false).
        LayerSelectionError: a layer name or pattern matches nothing.
        InsufficientDataError: fewer than 4 (common) examples.
        ActivationValueError: NaN or Inf in the activations (names the file, layer and example id).
        DeviceError: CUDA requested but not available.
        ResourceError: the full-data estimator does not fit in memory.
        FormatError and subclasses: a file is not a valid, complete activation file.
        DistributedError: another rank failed, sees other files, or the full-data estimator was asked for
            with several ranks.
    """
    from .runner import run_analysis

    if options is None:
        options = AnalysisOptions(**choices)
    elif choices:
        raise TypeError(f"analyze() takes options or keyword choices, not both (got {', '.join(sorted(choices))})")
    from ..progress import TqdmProgress, progress_callback

    sources: list[Any] = [files] if _is_one_source(files) else list(files)
    callback = progress_callback(progress, "analyzing")
    try:
        return run_analysis(sources, options, progress=callback, distributed=distributed)
    finally:
        if isinstance(callback, TqdmProgress):
            callback.finish()


def _is_one_source(files: Any) -> bool:
    """A single path, opened file or in-memory source given where a list of them is expected."""
    from collections.abc import Mapping

    return isinstance(files, (str, os.PathLike, Mapping)) or type(files).__name__ in ("Activations", "ActivationFile")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BUFFER_BYTES",
    "Activations",
    "DEVICES",
    "ESTIMATORS",
    "KERNELS",
    "MIN_BATCH",
    "PRECISIONS",
    "Alignment",
    "AnalysisOptions",
    "FileSpec",
    "MinibatchPlan",
    "align_ids",
    "analyze",
    "batch_sizes",
    "check_options",
    "own_minibatches",
    "plan_minibatches",
    "resolve_device",
]
