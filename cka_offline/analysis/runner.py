"""One analysis from start to end: open and align the files, plan, run a loop, build the result.

:func:`run_analysis` is what :func:`cka_offline.analyze` calls with a validated
:class:`~cka_offline.analysis.options.AnalysisOptions`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..devices import resolve_torch_device
from ..digests import FileHasher
from ..distributed import Distributed
from ..errors import DistributedError
from .loop import (
    BANDWIDTH_SAMPLE,
    SCALE_SAMPLE,
    LoopSettings,
    ProgressCallback,
    estimate_bandwidths,
    layer_statistics,
    pair_blocks,
    run_full,
    run_minibatch,
)
from .options import DEVICES, MIN_BATCH, AnalysisOptions
from .plan import MinibatchPlan, canonical_order
from .stack import LayerStack, as_paths, file_labels

if TYPE_CHECKING:
    from ..results import CKAResult

log = logging.getLogger(__name__)

#: fewer jackknife groups than this get a warning: their intervals have too few degrees of freedom
FEW_GROUPS = 8


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; checks that a requested CUDA device exists
    (:func:`cka_offline.devices.resolve_torch_device`; ``cpu`` and ``auto`` without a GPU driver never
    import torch)."""
    return str(resolve_torch_device(device, allowed=DEVICES))


@dataclass
class _Outcome:
    """What a loop produced: the L x L matrices, the stacked layers whose CKA is undefined, and its facts."""

    cka: np.ndarray
    se: np.ndarray
    low: np.ndarray
    high: np.ndarray
    degenerate: set[int]
    n_batches: int
    timing: dict[str, float]
    warnings: list[str] = field(default_factory=list)


def run_analysis(
    files: Sequence[Any],
    options: AnalysisOptions,
    *,
    progress: ProgressCallback | None = None,
    distributed: Distributed | None = None,
) -> CKAResult:
    """See :func:`cka_offline.analyze`."""
    if not files:
        raise ValueError("analyze() needs at least one activation file")
    t0 = time.perf_counter()
    ctx = distributed if distributed is not None else Distributed()
    with contextlib.ExitStack() as cleanup:
        with ctx.checked("opening the files"):
            stack, hasher, params = _open(files, options, ctx, cleanup)
            plan, scales, bandwidths = _plan(stack, options, params)
        if ctx.enabled:
            ctx.agree("data", stack.fingerprint(params), ("example ids", "layers", "file versions", "shuffle blocks"))
            # one bandwidth and scale for all: a median computed on another GPU model could round differently
            scales, bandwidths = ctx.broadcast((scales, bandwidths))
        if plan is not None:
            if bandwidths is not None:
                params["bandwidths"] = stack.per_file(bandwidths)
            settings = LoopSettings(
                device=params["device"],
                gram_dtype=options.precision,
                bandwidths=bandwidths,
                n_groups=plan.groups,  # the groups the plan forms: --n-groups beyond them would only allocate
                confidence=options.confidence,
                prefetch=options.prefetch,
                scratch_dir=options.scratch_dir,
                scales=scales,
                blocks=pair_blocks([len(names) for names in stack.selected], options.all_pairs),
            )
            outcome = _minibatch(stack, plan, settings, progress, ctx)
        else:
            outcome = _full(stack, options, params, progress)
        _mark_undefined(stack, outcome)
        outcome.timing["total"] = time.perf_counter() - t0
        return _result(stack, params, outcome, hasher, ctx)
    raise AssertionError("unreachable")  # pragma: no cover - the with block returns or raises


def _open(
    files: Sequence[Any], options: AnalysisOptions, ctx: Distributed, cleanup: contextlib.ExitStack
) -> tuple[LayerStack, FileHasher | None, dict[str, Any]]:
    """Open the files (closed by ``cleanup``), start hashing them, select and align: the stack, the
    hasher and the parameters the result records."""
    from ..store.reader import ActivationFile, open_activations
    from .memory import Activations, is_memory_source

    if ctx.enabled and options.estimator != "minibatch":
        raise DistributedError(
            f"the {options.estimator} estimator runs in one process (it holds all examples in memory); "
            "run it without torchrun, or use --estimator minibatch"
        )
    device = resolve_device(options.device)
    labels = file_labels(files)
    opened: list[Any] = []
    for spec in files:
        if isinstance(spec, ActivationFile):  # opened by the caller, who closes it
            opened.append(spec)
        elif is_memory_source(spec):
            opened.append(spec if isinstance(spec, Activations) else Activations(spec))
        else:
            f = open_activations(as_paths(spec), allow_external=options.allow_external)
            cleanup.callback(f.close)
            opened.append(f)
    hasher = None
    if options.hash_files:  # several ranks: each hashes its share of the files
        paths = list(dict.fromkeys(p for f in opened for p in f.paths))
        hasher = FileHasher(paths[ctx.rank :: ctx.world_size])
        cleanup.callback(hasher.cancel)
    stack = LayerStack.build(opened, labels, options)
    cleanup.callback(stack.close)
    params = options.params(device)
    # within-file pairs are computed for one file, --all-pairs and the full estimators (which compute all)
    params["all_pairs"] = bool(options.all_pairs or len(stack.files) == 1 or options.estimator != "minibatch")
    if ctx.enabled:
        params["world_size"] = ctx.world_size
    return stack, hasher, params


def _plan(
    stack: LayerStack, options: AnalysisOptions, params: dict[str, Any]
) -> tuple[MinibatchPlan | None, list[float] | None, list[float] | None]:
    """The minibatch plan (its shape recorded in ``params``), the layers' scales and the RBF bandwidths;
    ``(None, None, None)`` for the full estimators."""
    if options.estimator != "minibatch":
        return None, None, None
    plan = MinibatchPlan.for_data(
        stack.n,
        batch_size=options.batch_size,
        seed=options.seed,
        epochs=options.epochs,
        chunk_rows=stack.files[0].chunk_rows,
        row_bytes=stack.row_bytes,
        buffer_bytes=options.buffer_bytes,
        n_groups=options.n_groups,
        shuffle=options.shuffle,
        canonical=canonical_order(stack.alignment.ids),
    )
    params["n_groups"] = plan.groups  # the groups used: fewer than asked for when there are few minibatches
    if plan.shuffle == "blocks":
        params.update(block_rows=plan.block_rows, buffer_blocks=plan.buffer_blocks)
    rbf = options.kernel == "rbf"
    sample = plan.sample(BANDWIDTH_SAMPLE if rbf else SCALE_SAMPLE)
    scales, bandwidths = layer_statistics(stack, sample, options.rbf_fraction if rbf else None)
    return plan, scales, bandwidths


def _minibatch(
    stack: LayerStack,
    plan: MinibatchPlan,
    settings: LoopSettings,
    progress: ProgressCallback | None,
    ctx: Distributed,
) -> _Outcome:
    stats, n_batches, timing = run_minibatch(stack, plan, settings, progress=progress, distributed=ctx)
    outcome = _Outcome(stats.cka, stats.se, stats.low, stats.high, set(stats.degenerate_layers), n_batches, timing)
    if plan.shuffle == "blocks":
        outcome.warnings.append(
            "--shuffle blocks: each minibatch comes from a few stored chunks, so the estimate is biased when the "
            "rows are stored in an order that groups similar examples (class-sorted folders or datasets); use "
            "--shuffle uniform (the default) unless the files do not fit in memory or on the scratch disk"
        )
    suggest = max(MIN_BATCH, stack.n // FEW_GROUPS)
    if stats.n_groups < 2:
        outcome.warnings.append(
            f"only {n_batches} minibatch(es) of {stack.n} examples: no standard errors or intervals (NaN); "
            f"use a smaller batch size (-m {suggest}) or more examples"
        )
    elif stats.n_groups < FEW_GROUPS:
        outcome.warnings.append(
            f"only {stats.n_groups} jackknife groups ({plan.per_epoch} minibatches of {stack.n} examples per epoch): "
            f"the standard errors have {stats.n_groups - 1} degree(s) of freedom and the intervals are unreliable; "
            f"use -m {suggest} (or more examples) for {FEW_GROUPS} or more groups"
        )
    if settings.bandwidths is not None:
        outcome.degenerate |= {i for i, bw in enumerate(settings.bandwidths) if math.isnan(bw)}
    return outcome


def _full(
    stack: LayerStack, options: AnalysisOptions, params: dict[str, Any], progress: ProgressCallback | None
) -> _Outcome:
    bandwidths = None
    if options.kernel == "rbf":  # the minibatch estimator's bandwidths: its seeded sample, recorded the same way
        sample = MinibatchPlan(
            stack.n, options.batch_size, seed=options.seed, canonical=canonical_order(stack.alignment.ids)
        ).sample(BANDWIDTH_SAMPLE)
        bandwidths = estimate_bandwidths(stack, sample, options.rbf_fraction)
        params["bandwidths"] = stack.per_file(bandwidths)
    cka, timing = run_full(
        stack,
        debiased=options.estimator == "full-debiased",
        device=params["device"],
        bandwidths=bandwidths,
        max_bytes=options.full_max_bytes,
        progress=progress,
    )
    se = low = high = np.full_like(cka, np.nan)
    degenerate = {i for i in range(len(stack)) if math.isnan(cka[i, i])}
    return _Outcome(cka, se, low, high, degenerate, 0, timing)


def _mark_undefined(stack: LayerStack, outcome: _Outcome) -> None:
    """NaN rows and columns (and a warning) for every layer whose CKA is undefined (constant layers)."""
    for i in sorted(outcome.degenerate):
        layer = stack.layers[i]
        outcome.cka[i, :] = outcome.cka[:, i] = np.nan
        for arr in (outcome.se, outcome.low, outcome.high):
            arr[i, :] = arr[:, i] = np.nan
        message = (
            f"layer {layer.name!r} of {stack.labels[layer.file]} is constant over the examples, so its CKA is "
            "undefined (NaN)"
        )
        if message not in outcome.warnings:
            outcome.warnings.append(message)
            log.warning(message)


def _result(
    stack: LayerStack, params: dict[str, Any], outcome: _Outcome, hasher: FileHasher | None, ctx: Distributed
) -> CKAResult:
    from ..results import CKAResult, FileInfo

    infos = [
        FileInfo(
            label=stack.labels[k],
            paths=list(f.paths),
            layers=list(stack.selected[k]),
            provenance=dict(f.provenance),
            sha256=[],
            n_examples=int(f.n_examples),
            # activation files 1.1 carry each layer's display alias; in-memory activations have none
            aliases=[str(getattr(f.layer(name), "alias", "")) for name in stack.selected[k]],
        )
        for k, f in enumerate(stack.files)
    ]
    if hasher is not None:
        t_hash = time.perf_counter()
        with ctx.checked("hashing the files"):
            digests = hasher.result()
        digests = {path: digest for part in ctx.gather(digests) for path, digest in part.items()}
        outcome.timing["hash_wait"] = time.perf_counter() - t_hash
        for info in infos:
            info.sha256 = [digests[p] for p in info.paths]
    n_files = len(stack.files)
    pairs = [(0, 0)] if n_files == 1 else [(i, j) for i in range(n_files) for j in range(i + 1, n_files)]
    return CKAResult(
        files=infos,
        cka=outcome.cka,
        se=outcome.se,
        low=outcome.low,
        high=outcome.high,
        pairs=pairs,
        params=params,
        n_examples=stack.n,
        n_minibatches=outcome.n_batches,
        timing=outcome.timing,
        warnings=outcome.warnings,
        version=__version__,
        confidence=float(params["confidence"]),
    )


__all__ = ["resolve_device", "run_analysis"]
