"""Extraction: run an extractor plugin over inputs, reduce each layer, write an activation file.

The core owns batching, layer selection, reductions, dtype, the file, resume, shards and progress;
the extractor only runs one batch (see :mod:`cka_offline.extractor`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from ..batch_inputs import BatchInputs, is_batch_iterable
from ..errors import InputError, ModelError, NoExtractorError, OutputError
from ..extractor import Extractor, InputReader, LayerInfo, declared_options
from ..inputs import check_ids
from ..memory_inputs import ArrayInputs, is_memory_inputs
from ..reduce import resolve_reductions
from ..registry import (
    PluginEntry,
    PluginsLike,
    find_extractor,
    find_input_reader,
    get_extractor,
    get_plugin_manager,
    list_extractors,
)
from ..selection import select_layers
from ..store import schema
from ..store.schema import DEFAULT_DTYPE, DEFAULT_REDUCTION, STORED_DTYPES, TOKEN_REDUCTIONS
from ..store.writer import ActivationWriter, check_target
from .batches import Batch, BatchRunner
from .probe import probe_layers

log = logging.getLogger(__name__)

#: the stored dtypes (kept importable here; the list lives in store.schema)
DTYPES = STORED_DTYPES
#: provenance keys the core takes from Extractor.provenance(); the rest are stored as extras
_MODEL_KEYS = ("framework", "framework_version", "model", "model_sha256")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ExtractOptions:
    """Everything that decides how an extraction runs, checked once when made; :func:`extract` takes its
    keyword arguments into one of these, :func:`extract_with` takes it directly. :meth:`recorded` is what
    the file's provenance and the resume fingerprint record.

    Attributes (see :func:`extract` for each): ``layers``, ``extractor``, ``batch_size``, ``device``,
    ``dtype``, ``reduction``, ``max_examples``, ``shard``, ``resume``, ``overwrite``, ``chunk_rows``,
    ``compression`` (``"none"`` is stored as None), ``options`` (the extractor's, as given),
    ``input_options``, ``mask_input``, ``command``, ``allow_external`` (a trust decision, not recorded).

    Raises:
        InputError, OutputError: a value out of range or not in its list (``store.schema``).
    """

    layers: Sequence[str] | None = None
    extractor: str | type[Extractor] | None = None
    batch_size: int = 64
    device: str = "cpu"
    dtype: str = DEFAULT_DTYPE
    reduction: str | Mapping[str, str] = DEFAULT_REDUCTION
    max_examples: int | None = None
    shard: tuple[int, int] | None = None
    resume: bool = False
    overwrite: bool = False
    chunk_rows: int | None = None
    compression: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    input_options: Mapping[str, Any] = field(default_factory=dict)
    mask_input: str | None = "attention_mask"
    command: str | None = None
    allow_external: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {self.batch_size}")
        if self.dtype not in STORED_DTYPES:
            raise OutputError(f"unknown dtype {self.dtype!r}; use one of {', '.join(STORED_DTYPES)}")
        if self.max_examples is not None and self.max_examples < 1:
            raise InputError(f"max_examples must be at least 1, got {self.max_examples}")
        if self.shard is not None:
            index, count = self.shard
            if count < 1 or not 0 <= index < count:
                raise InputError(f"shard {index}/{count} is not valid: the index counts from 0 to {max(count, 1) - 1}")
        try:
            compression = schema.compression_name(self.compression)
        except ValueError as exc:
            raise OutputError(str(exc)) from None
        # frozen: normalised values are set through object.__setattr__, once, here
        object.__setattr__(self, "compression", compression)
        object.__setattr__(self, "options", dict(self.options or {}))
        object.__setattr__(self, "input_options", dict(self.input_options or {}))

    def recorded(self, reductions: Mapping[str, str]) -> dict[str, Any]:
        """The settings that decide the stored values, as the file's ``options`` provenance records them
        (``reductions``: the reduction each selected layer got); batch size and device are left out."""
        return {
            "layers": list(self.layers) if self.layers else None,
            "reduction": dict(reductions),
            "mask_input": self.mask_input if any(r in TOKEN_REDUCTIONS for r in reductions.values()) else None,
            "dtype": self.dtype,
            "max_examples": self.max_examples,
            "extractor_options": dict(self.options),
            "input_options": dict(self.input_options),
        }


def extract(
    source: Any,
    inputs: Any = None,
    output: str | os.PathLike[str] | None = None,
    *,
    layers: Sequence[str] | None = None,
    extractor: str | type[Extractor] | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    dtype: str = DEFAULT_DTYPE,
    reduction: str | Mapping[str, str] = DEFAULT_REDUCTION,
    max_examples: int | None = None,
    shard: tuple[int, int] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    chunk_rows: int | None = None,
    compression: str | None = None,
    options: Mapping[str, Any] | None = None,
    input_options: Mapping[str, Any] | None = None,
    mask_input: str | None = "attention_mask",
    progress: bool | Progress | None = True,
    command: str | None = None,
    plugin_manager: PluginsLike | None = None,
    allow_external: bool = False,
) -> str:
    """Extract the activations of ``layers`` of the model ``source`` on ``inputs`` into ``output``.

    A façade over :func:`extract_with`: the keyword arguments become one :class:`ExtractOptions`.

    Args:
        source: the model: a path or a spec the extractor understands, such as ``pkg.mod:factory``, or a
            live ``torch.nn.Module`` (its weights as they are; the identity recorded is their SHA-256).
        inputs: arrays in memory (a numpy array, a torch tensor, or ``{input name: array}``, examples on
            axis 0; ids ``0..n-1``), a ``DataLoader`` or any iterable of batches (tuple, list or dict batches;
            ``input_options={"input": KEY_OR_INDEX, "ids": KEY_OR_INDEX}`` choose the parts, see
            :class:`cka_offline.batch_inputs.BatchInputs`), an inputs path (``.npz``, ``.npy``, ``file.h5:/dataset``, image folder, or anything an
            input-reader plugin opens), an :class:`InputReader`, or ``None`` to use the extractor's
            :meth:`~cka_offline.extractor.Extractor.default_inputs` (importers of precomputed arrays).
        output: path of the activation file (HDF5). Written as ``<output>.partial`` and renamed when done.
        layers: names, path globs (``*`` within a dotted component, ``**`` across), ``kind:K`` patterns,
            aliases or module names of per-call layers (:mod:`cka_offline.selection`); ``None`` for every
            layer. An extractor that probes (:meth:`~cka_offline.extractor.Extractor.probe`) shows its
            layers on the first batch: for PyTorch, a module run k times is the layers ``NAME:1`` ... ``NAME:k``.
        extractor: an extractor name or class; ``None`` picks the one extractor that can open ``source``.
        batch_size: examples per forward pass. Not part of the resume fingerprint: a run may be resumed
            with another batch size (the stored values then agree to floating-point rounding).
        device: passed to the extractor (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"``).
        dtype: stored dtype, one of :data:`cka_offline.store.schema.STORED_DTYPES`.
        reduction: one of :data:`cka_offline.store.schema.REDUCTIONS`, or ``{pattern: reduction}`` with
            patterns as ``layers`` takes them (:func:`cka_offline.reduce.resolve_reductions`); ``mean`` is
            applied as it fits each layer (:func:`cka_offline.reduce.concrete_reduction`: a vector is kept,
            a tokens-first output gets ``token_mean``), and the file records what was applied.
        max_examples: use only the first ``max_examples`` examples.
        shard: ``(index, count)``: write only the ``index``-th (0-based) of ``count`` disjoint contiguous
            ranges of the examples; the shard files together form one logical file.
        resume: continue ``<output>.partial`` left by an interrupted run with the same settings.
        overwrite: replace an existing ``output`` (only once the new file is complete).
        chunk_rows, compression: HDF5 storage (compression one of :data:`~cka_offline.store.schema.COMPRESSIONS`).
        options: extractor-specific options (the extractor's ``declared_options``).
        input_options: options of the input reader (``resize="224x224"`` for image folders...).
        mask_input: the input holding the attention mask for token reductions; ``None``: every token counts.
        progress: ``True`` (the default) for a tqdm progress bar (``TQDM_DISABLE=1`` hides it), ``False``
            for none, or a function called as ``progress(done, total)`` with
            example counts after every batch.
        command: the command line, recorded as provenance.
        plugin_manager: the plugins to look extractors and readers up in (default: installed plugins).
        allow_external: let an input reader that declares the option ``allow_external`` (HDF5 inputs) read
            data from other files (external links, virtual datasets, external storage); refused by default.

    Returns:
        The path of the complete file.

    Raises:
        CKAOfflineError subclasses for anything the user can fix; on any error (and on KeyboardInterrupt)
        the ``.partial`` file is kept for ``resume=True``, and the error propagates.
    """
    opts = ExtractOptions(
        layers=layers,
        extractor=extractor,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        reduction=reduction,
        max_examples=max_examples,
        shard=shard,
        resume=resume,
        overwrite=overwrite,
        chunk_rows=chunk_rows,
        compression=compression,
        options=options or {},
        input_options=input_options or {},
        mask_input=mask_input,
        command=command,
        allow_external=allow_external,
    )
    from ..progress import TqdmProgress, progress_callback

    callback = progress_callback(progress, "extracting")
    try:
        return extract_with(opts, source, inputs, output, progress=callback, plugin_manager=plugin_manager)
    finally:
        if isinstance(callback, TqdmProgress):
            callback.finish()


def extract_with(
    opts: ExtractOptions,
    source: Any,
    inputs: Any,
    output: str | os.PathLike[str] | None,
    *,
    progress: Progress | None = None,
    plugin_manager: PluginsLike | None = None,
) -> str:
    """:func:`extract` with its settings as one checked :class:`ExtractOptions`; returns the file's path."""
    if output is None:
        raise TypeError("extract() needs an output path")
    output = os.fspath(output)
    check_target(output, resume=opts.resume, overwrite=opts.overwrite)  # before any work
    _refuse_own_files(output, {"model": source, "inputs": inputs, "weights": opts.options.get("weights")})
    pm = plugin_manager or get_plugin_manager()
    ext_cls, entry = _pick_extractor(source, opts.extractor, pm)
    log.info("extracting %s with extractor %r on %s", describe_source(source), ext_cls.name, opts.device)

    with contextlib.ExitStack() as stack:
        ext = ext_cls(source, device=opts.device, options=dict(opts.options))
        stack.callback(ext.close)
        reader = _open_inputs(
            inputs, opts.input_options, ext, pm, allow_external=opts.allow_external, progress=progress
        )
        stack.callback(reader.close)
        if (opts.resume or opts.shard) and not getattr(reader, "replayable", True):
            raise InputError(
                f"cannot {'resume' if opts.resume else 'write shards'} from {reader.fingerprint()['description']}: it "
                "does not give its batches in the same order each time it is read (shuffle=True, a random sampler, "
                "or a one-shot iterator); use a DataLoader with shuffle=False and no sampler"
            )
        fingerprint = reader.fingerprint()
        ids, n_inputs, n_used, (lo, hi) = _rows(reader, fingerprint["description"], opts)

        first_stop = min(hi, lo + opts.batch_size)
        # an extractor that probes learns its layers from the first batch (per-call layers, shapes)
        infos = probe_layers(ext, reader, lo, first_stop) or ext.layers()
        names = select_layers(
            infos,
            opts.layers,
            what="layer",
            where=f"model {describe_source(source)}",
            hint="list them with cka-extract --list-layers",
        )
        by_name = {info.name: info for info in infos}
        reductions = resolve_reductions(opts.reduction, [by_name[n] for n in names])
        layouts = {n: by_name[n].layout for n in names}
        run = BatchRunner(ext, reader, ids, names, reductions, opts.mask_input, opts.dtype, layouts)

        first = run.forward(lo, first_stop)  # learns every layer's per-example shape
        shown = display_aliases([by_name[n] for n in names], opts.layers)
        specs = [dataclasses.replace(spec, alias=shown[spec.name]) for spec in run.layer_specs()]
        if run.reduce_early():  # the extractor reduces some layers itself from now on: same path for every row
            first = run.forward(lo, first_stop)
        settings = opts.recorded(run.reductions)  # each layer's reduction as applied to its shape
        provenance = _provenance(ext, entry, fingerprint, settings, opts.command)
        # shards differ only in their rows (recorded by the writer): they share provenance["options"]
        key = resume_key(provenance, names, (lo, hi, n_inputs), settings)

        writer = ActivationWriter(
            output,
            ids=ids[lo:hi],
            layers=specs,
            provenance=provenance,
            dtype=opts.dtype,
            chunk_rows=opts.chunk_rows,
            compression=opts.compression,
            overwrite=opts.overwrite,
            resume=opts.resume,
            resume_key=key,
            shard=(opts.shard[0], opts.shard[1], lo) if opts.shard else None,
            logical_rows=n_used,
        )
        # numpy's BLAS (the reductions) gets one thread: the model's own threads use the cores, and two
        # thread pools taking turns on the same cores spin against each other (measured: 3x slower)
        stack.enter_context(threadpool_limits(1, user_api="blas"))
        path = _write_rows(writer, run, first, (lo, first_stop, hi), opts.batch_size, progress)
    log.info("wrote %d examples x %d layers to %s", hi - lo, len(specs), path)
    return path


def _refuse_own_files(output: str, files: Mapping[str, Any]) -> None:
    """``--overwrite`` must not replace the model, the inputs or the weights the run reads with its output."""
    if not os.path.exists(output):
        return
    for what, given in files.items():
        if not isinstance(given, (str, os.PathLike)):
            continue
        for path in {os.fspath(given), os.fspath(given).rsplit(":", 1)[0]}:  # file.h5:/dataset
            if os.path.isfile(path) and os.path.samefile(path, output):
                raise OutputError(
                    f"{output} is this run's {what} ({os.fspath(given)}); writing the activations there would "
                    "replace it: choose another -o"
                )


def display_aliases(selected: Sequence[LayerInfo], patterns: Sequence[str] | None) -> dict[str, str]:
    """The display alias stored with each selected layer (format 1.1 ``alias``): the alias a pattern
    named exactly (``--layers conv1`` for the ONNX tensor ``/conv1/Conv_output_0``), else the layer's
    first alias, else ``""`` (a torch module's name is already the name to show). A pattern naming a
    module that runs several times selects its calls by their own names ``NAME:N``: no alias."""
    out = {}
    for info in selected:
        named = [p for p in patterns or () if p in info.aliases]
        alias = named[0] if named else (info.aliases[0] if info.aliases else "")
        out[info.name] = "" if alias == info.name else alias
    return out


def _rows(reader: InputReader, where: str, opts: ExtractOptions) -> tuple[np.ndarray, int, int, tuple[int, int]]:
    """``(ids, examples in the inputs, examples used, this run's rows [lo, hi))``."""
    ids = check_ids(reader.ids(), where)
    n_inputs = len(reader)
    if len(ids) != n_inputs:
        raise InputError(f"{where}: {len(ids)} example ids for {n_inputs} examples")
    n_used = min(n_inputs, opts.max_examples) if opts.max_examples else n_inputs
    return ids, n_inputs, n_used, shard_range(n_used, opts.shard)


def _write_rows(
    writer: ActivationWriter,
    run: BatchRunner,
    first: Batch,
    rows: tuple[int, int, int],
    batch_size: int,
    progress: Progress | None,
) -> str:
    """Write the first batch (unless resumed past it) and every later one; returns the complete file's
    path. On any error the writer keeps its ``.partial`` file for ``--resume``."""
    lo, first_stop, hi = rows
    total = hi - lo
    try:
        if writer.rows_done == 0:
            writer.write(run.finish(first, lo, first_stop))
        del first
        if progress is not None:
            progress(writer.rows_done, total)
        # a resumed run keeps the batches of an uninterrupted one (a model's values may depend on a batch's
        # size by rounding): it starts at the batch holding its first missing row and drops the rows before it
        done = writer.rows_done
        for start in range(lo + done - done % batch_size, hi, batch_size):
            stop = min(hi, start + batch_size)
            arrays = run.finish(run.forward(start, stop), start, stop)
            skip = lo + writer.rows_done - start
            writer.write({name: rows[skip:] for name, rows in arrays.items()} if skip else arrays)
            if progress is not None:
                progress(writer.rows_done, total)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def shard_range(n: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of shard ``(index, count)`` of ``n`` examples: contiguous, disjoint, covering all."""
    if shard is None:
        if n == 0:
            raise InputError("the inputs hold no examples")
        return 0, n
    index, count = shard
    lo, hi = index * n // count, (index + 1) * n // count
    if hi <= lo:
        raise InputError(f"shard {index}/{count} of {n} examples is empty; use at most {n} shards")
    return lo, hi


def shard_path(output: str | os.PathLike[str], index: int | str, count: int) -> str:
    """The file of shard ``index`` of ``count`` (0-based) that ``cka-extract`` writes under torchrun:
    ``OUT.h5`` -> ``OUT-00001-of-00004.h5``; ``shard_path(OUT, "*", count)`` is the glob of the set."""
    root, ext = os.path.splitext(os.fspath(output))
    number = f"{index:05d}" if isinstance(index, int) else str(index)
    return f"{root}-{number}-of-{count:05d}{ext}"


def resume_key(
    provenance: Mapping[str, str], layers: Sequence[str], rows: tuple[int, int, int], settings: Mapping[str, Any]
) -> str:
    """SHA-256 of everything that determines the stored values.

    The model and inputs count by content (SHA-256) where there is a file, so moving them does not break
    resume; batch size and device are left out (they change values only by floating-point rounding).
    """
    canonical = {
        "extractor": provenance["extractor"],
        "model": provenance["model_sha256"] or provenance["model"],
        "inputs": provenance["inputs_sha256"] or provenance["inputs"],
        "layers": list(layers),
        "rows": list(rows),
        # the selected names count, not the patterns that selected them
        "settings": {k: v for k, v in settings.items() if k != "layers"},
    }
    text = json.dumps(canonical, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------- helpers


def describe_source(source: Any) -> str:
    """How messages name a model source: its path or spec, or ``<live ClassName>`` for a model object (never
    its repr, which for a network is many lines)."""
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"<live {type(source).__name__}>"


def _pick_extractor(
    source: Any, extractor: str | type[Extractor] | None, pm: PluginsLike
) -> tuple[type[Extractor], PluginEntry | None]:
    if isinstance(extractor, type):
        cls = extractor
    elif extractor:
        cls = get_extractor(extractor, pm)
    else:
        try:
            cls = find_extractor(source, pm)
        except NoExtractorError as exc:
            if isinstance(source, (str, os.PathLike)) and not os.path.exists(source):
                raise ModelError(f"model {source} not found: no such file, and {exc}") from None
            raise
    entry = next((e for e in list_extractors(pm) if e.cls is cls), None)
    return cls, entry


def _open_inputs(
    inputs: Any,
    input_options: Mapping[str, Any] | None,
    ext: Extractor,
    pm: PluginsLike,
    *,
    allow_external: bool = False,
    progress: Progress | None = None,
) -> InputReader:
    if isinstance(inputs, InputReader):
        return inputs
    if is_memory_inputs(inputs):
        return ArrayInputs(inputs)
    if is_batch_iterable(inputs):
        options = dict(input_options or {})
        unknown = sorted(set(options) - {"input", "ids"})
        if unknown:
            raise InputError(
                f"input option(s) {', '.join(unknown)} do not apply to a DataLoader or iterable of batches; it takes "
                "input= (which part of a batch is the model input) and ids= (which part holds the example ids)"
            )
        from ..progress import TqdmProgress

        # the first read of the loader (counting, ids, fingerprint) gets its own bar when extract() draws one
        bar = TqdmProgress("reading batches", unit="batch") if isinstance(progress, TqdmProgress) else None
        try:
            return BatchInputs(inputs, input=options.get("input"), ids=options.get("ids"), progress=bar)
        finally:
            if bar is not None:
                bar.finish()
    if inputs is None:
        reader = ext.default_inputs()
        if reader is None:
            raise InputError(
                f"no inputs given for model {ext.source}; pass --inputs FILE (.npz, .npy, file.h5:/dataset, image folder)"
            )
        return reader
    path = os.fspath(inputs)
    if not os.path.exists(path) and not os.path.exists(path.rsplit(":", 1)[0]):
        raise InputError(f"inputs {path} not found; check the path")
    own = ext.open_inputs(path, dict(input_options or {}))  # e.g. text with the model's tokenizer
    if own is not None:
        return own
    reader_cls = find_input_reader(path, pm)
    options = dict(input_options or {})
    if allow_external and any(o.name == "allow_external" for o in declared_options(reader_cls)):
        options.setdefault("allow_external", True)
    return reader_cls(path, **options)


def _provenance(
    ext: Extractor,
    entry: PluginEntry | None,
    fingerprint: Mapping[str, str],
    settings: Mapping[str, Any],
    command: str | None,
) -> dict[str, Any]:
    model = dict(ext.provenance())
    prov: dict[str, Any] = {
        "extractor": type(ext).name,
        "extractor_version": entry.version if entry else "",
        "framework": str(model.pop("framework", type(ext).framework)),
        "framework_version": str(model.pop("framework_version", "")),
        "model": str(model.pop("model", ext.source)),
        "model_sha256": str(model.pop("model_sha256", "")),
        "inputs": fingerprint.get("description", ""),
        "inputs_sha256": fingerprint.get("sha256", ""),
        "command": command or "",
        "options": json.dumps(settings, sort_keys=True, default=str),
    }
    if entry is not None:
        prov["extractor_distribution"] = entry.distribution
    prov.update(model)  # anything else the extractor records goes to the file's extras
    return prov


__all__ = [
    "DTYPES",
    "ExtractOptions",
    "display_aliases",
    "extract",
    "extract_with",
    "resume_key",
    "shard_path",
    "shard_range",
]
