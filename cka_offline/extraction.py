"""Extraction: run an extractor plugin over inputs, reduce each layer, write an activation file.

The core owns batching, layer selection, reductions, dtype, the file, resume, shards and progress;
the extractor only runs one batch (see :mod:`cka_offline.extractor`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pluggy
from threadpoolctl import threadpool_limits

from .errors import InputError, ModelError, OutputError, PluginError, ActivationValueError
from .extractor import Extractor, InputReader
from .inputs import check_ids
from .reduce import TOKEN_REDUCTIONS, reduce, reduced_features, resolve_reductions
from .registry import PluginEntry, find_extractor, find_input_reader, get_extractor, get_plugin_manager, list_extractors
from .selection import select_layers
from .store.writer import ActivationWriter, LayerSpec, format_id

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16")
#: provenance keys the core takes from Extractor.provenance(); the rest are stored as extras
_MODEL_KEYS = ("framework", "framework_version", "model", "model_sha256")
#: reductions that would silently pool padding without a mask
_MASKED = ("token_mean", "last_token")

Progress = Callable[[int, int], None]


def extract(
    source: str,
    inputs: str | os.PathLike[str] | InputReader | None = None,
    output: str | os.PathLike[str] | None = None,
    *,
    layers: Sequence[str] | None = None,
    extractor: str | type[Extractor] | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    dtype: str = "float32",
    reduction: str | Mapping[str, str] = "flatten",
    max_examples: int | None = None,
    shard: tuple[int, int] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    chunk_rows: int | None = None,
    compression: str | None = None,
    options: Mapping[str, Any] | None = None,
    input_options: Mapping[str, Any] | None = None,
    mask_input: str | None = "attention_mask",
    progress: Progress | None = None,
    command: str | None = None,
    plugin_manager: pluggy.PluginManager | None = None,
) -> str:
    """Extract the activations of ``layers`` of the model ``source`` on ``inputs`` into ``output``.

    Args:
        source: the model (a path or a spec the extractor understands, such as ``pkg.mod:factory``).
        inputs: an inputs path (``.npz``, ``.npy``, ``file.h5:/dataset``, image folder, or anything an
            input-reader plugin opens), an :class:`InputReader`, or ``None`` to use the extractor's
            :meth:`~cka_offline.extractor.Extractor.default_inputs` (importers of precomputed arrays).
        output: path of the activation file (HDF5). Written as ``<output>.partial`` and renamed when done.
        layers: names, globs, ``kind:K`` patterns or aliases (:func:`cka_offline.selection.select_layers`);
            ``None`` for every layer.
        extractor: an extractor name or class; ``None`` picks the one extractor that can open ``source``.
        batch_size: examples per forward pass. Not part of the resume fingerprint: a run may be resumed
            with another batch size (the stored values then agree to floating-point rounding).
        device: passed to the extractor (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"``).
        dtype: stored dtype, ``"float32"`` or ``"float16"``.
        reduction: one of :data:`cka_offline.reduce.REDUCTIONS`, or ``{layer name or glob: reduction}``.
        max_examples: use only the first ``max_examples`` examples.
        shard: ``(index, count)``: write only the ``index``-th (0-based) of ``count`` disjoint contiguous
            ranges of the examples; the shard files together form one logical file.
        resume: continue ``<output>.partial`` left by an interrupted run with the same settings.
        overwrite: replace an existing ``output`` (only once the new file is complete).
        chunk_rows, compression: HDF5 storage (``None``, ``"gzip"``, ``"lz4"``).
        options: extractor-specific options (``Extractor.options_help``).
        input_options: options of the input reader (``resize="224x224"`` for image folders...).
        mask_input: the input holding the attention mask for token reductions; ``None``: every token counts.
        progress: called as ``progress(done, total)`` with example counts after every batch.
        command: the command line, recorded as provenance.
        plugin_manager: the plugin manager to look extractors and readers up in (default: installed plugins).

    Returns:
        The path of the complete file.

    Raises:
        CKAOfflineError subclasses for anything the user can fix; on any error (and on KeyboardInterrupt)
        the ``.partial`` file is kept for ``resume=True``, and the error propagates.
    """
    if output is None:
        raise TypeError("extract() needs an output path")
    output = os.fspath(output)
    _check_settings(batch_size, dtype, max_examples, shard, compression)
    if os.path.exists(output) and not overwrite:
        raise OutputError(f"{output} already exists; pass --overwrite to replace it or choose another -o")
    pm = plugin_manager or get_plugin_manager()
    ext_cls, entry = _pick_extractor(source, extractor, pm)
    log.info("extracting %s with extractor %r on %s", source, ext_cls.name, device)

    with contextlib.ExitStack() as stack:
        ext = ext_cls(source, device=device, options=dict(options or {}))
        stack.callback(ext.close)
        reader = _open_inputs(inputs, input_options, ext, pm)
        stack.callback(reader.close)
        fingerprint = reader.fingerprint()
        where = fingerprint["description"]
        ids = check_ids(reader.ids(), where)
        n_inputs = len(reader)
        if len(ids) != n_inputs:
            raise InputError(f"{where}: {len(ids)} example ids for {n_inputs} examples")
        n_used = min(n_inputs, max_examples) if max_examples else n_inputs
        lo, hi = shard_range(n_used, shard)

        names = select_layers(
            ext.layers(), layers, what="layer", where=f"model {source}", hint="list them with cka-extract --list-layers"
        )
        reductions = resolve_reductions(reduction, names)
        run = _BatchRunner(ext, reader, ids, names, reductions, mask_input, dtype)

        first_stop = min(hi, lo + batch_size)
        first = run.forward(lo, first_stop)  # learns every layer's per-example shape
        specs = run.layer_specs()
        if run.reduce_early():  # the extractor reduces some layers itself from now on: same path for every row
            first = run.forward(lo, first_stop)
        settings = {
            "layers": list(layers) if layers else None,
            "reduction": reductions,
            "mask_input": mask_input if any(r in TOKEN_REDUCTIONS for r in reductions.values()) else None,
            "dtype": dtype,
            "max_examples": max_examples,
            "extractor_options": dict(options or {}),
            "input_options": dict(input_options or {}),
        }
        provenance = _provenance(ext, entry, fingerprint, settings, command)
        # shards differ only in their rows (recorded by the writer): they share provenance["options"]
        key = resume_key(provenance, names, (lo, hi, n_inputs), settings)

        writer = ActivationWriter(
            output,
            ids=ids[lo:hi],
            layers=specs,
            provenance=provenance,
            dtype=dtype,
            chunk_rows=chunk_rows,
            compression=compression,
            overwrite=overwrite,
            resume=resume,
            resume_key=key,
            shard=(shard[0], shard[1], lo) if shard else None,
            logical_rows=n_used,
        )
        total = hi - lo
        # numpy's BLAS (the reductions) gets one thread: the model's own threads use the cores, and two
        # thread pools taking turns on the same cores spin against each other (measured: 3x slower)
        stack.enter_context(threadpool_limits(1, user_api="blas"))
        try:
            if writer.rows_done == 0:
                writer.write(run.finish(first, lo, first_stop))
            del first
            if progress is not None:
                progress(writer.rows_done, total)
            for start in range(lo + writer.rows_done, hi, batch_size):
                stop = min(hi, start + batch_size)
                writer.write(run.finish(run.forward(start, stop), start, stop))
                if progress is not None:
                    progress(writer.rows_done, total)
            path = writer.close()
        except BaseException:
            writer.abort()
            raise
    log.info("wrote %d examples x %d layers to %s", total, len(specs), path)
    return path


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


def resume_key(provenance: Mapping[str, str], layers: Sequence[str], rows: tuple[int, int, int], settings: Mapping[str, Any]) -> str:
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


def _check_settings(
    batch_size: int, dtype: str, max_examples: int | None, shard: tuple[int, int] | None, compression: str | None
) -> None:
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    if dtype not in DTYPES:
        raise OutputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if max_examples is not None and max_examples < 1:
        raise InputError(f"max_examples must be at least 1, got {max_examples}")
    if shard is not None:
        index, count = shard
        if count < 1 or not 0 <= index < count:
            raise InputError(f"shard {index}/{count} is not valid: the index counts from 0 to {max(count, 1) - 1}")
    if compression not in (None, "none", "gzip", "lz4"):
        raise OutputError(f"unknown compression {compression!r}; use one of none, gzip, lz4")


def _pick_extractor(
    source: str, extractor: str | type[Extractor] | None, pm: pluggy.PluginManager
) -> tuple[type[Extractor], PluginEntry | None]:
    if isinstance(extractor, type):
        cls = extractor
    elif extractor:
        cls = get_extractor(extractor, pm)
    else:
        try:
            cls = find_extractor(source, pm)
        except PluginError as exc:
            if "no extractor can open" in str(exc) and not os.path.exists(source):
                raise ModelError(f"model {source} not found: no such file, and {exc}") from None
            raise
    entry = next((e for e in list_extractors(pm) if e.cls is cls), None)
    return cls, entry


def _open_inputs(
    inputs: str | os.PathLike[str] | InputReader | None,
    input_options: Mapping[str, Any] | None,
    ext: Extractor,
    pm: pluggy.PluginManager,
) -> InputReader:
    if isinstance(inputs, InputReader):
        return inputs
    if inputs is None:
        reader = ext.default_inputs()
        if reader is None:
            raise InputError(f"no inputs given for model {ext.source}; pass --inputs FILE (.npz, .npy, file.h5:/dataset, image folder)")
        return reader
    path = os.fspath(inputs)
    if not os.path.exists(path) and not os.path.exists(path.rsplit(":", 1)[0]):
        raise InputError(f"inputs {path} not found; check the path")
    reader_cls = find_input_reader(path, pm)
    return reader_cls(path, **dict(input_options or {}))


def _provenance(
    ext: Extractor, entry: PluginEntry | None, fingerprint: Mapping[str, str], settings: Mapping[str, Any], command: str | None
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


class _BatchRunner:
    """Runs batches, checks what the extractor returns, reduces and checks values."""

    def __init__(
        self,
        ext: Extractor,
        reader: InputReader,
        ids: np.ndarray,
        names: list[str],
        reductions: dict[str, str],
        mask_input: str | None,
        dtype: str,
    ) -> None:
        self.ext, self.reader, self.ids, self.names = ext, reader, ids, names
        self.reductions = reductions
        self.mask_input = mask_input
        self.dtype = np.dtype(dtype)
        self.model_inputs = ext.input_names()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.needs_mask = mask_input is not None and any(r in TOKEN_REDUCTIONS for r in reductions.values())
        #: layers the extractor returns already reduced (Extractor.reduce_early), with their feature count
        self.early: dict[str, int] = {}

    def reduce_early(self) -> bool:
        """Hand the reductions the extractor can apply itself (while its batch runs) to it; True if any.
        Called after the first batch, when every layer's per-example shape is known and checked."""
        supported = getattr(self.ext, "early_reductions", frozenset())
        wanted = {n: r for n, r in self.reductions.items() if r in supported and n in self.shapes}
        if not wanted:
            return False
        accepted = set(self.ext.reduce_early(wanted)) & set(wanted)
        self.early = {n: reduced_features(n, wanted[n], self.shapes[n]) for n in accepted}
        if accepted:
            log.debug("extractor %r reduces %d layer(s) itself", self.ext.name, len(accepted))
        return bool(accepted)

    def forward(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        data = self.reader.read(start, stop)
        mask = self._mask(data) if self.needs_mask else None
        out = self.ext.run(self._feed(data), self.names)
        b = stop - start
        missing = [n for n in self.names if n not in out]
        if missing:
            raise ModelError(
                f"extractor {self.ext.name!r} returned no output for layer(s) {', '.join(map(repr, missing))} of "
                f"model {self.ext.source}; the layer may not run on these inputs"
            )
        arrays = {}
        for name in self.names:
            arr = np.asarray(out[name])
            if arr.ndim == 0 or arr.shape[0] != b:
                raise ModelError(
                    f"layer {name!r} returned shape {arr.shape} for a batch of {b} examples; the batch must be "
                    f"on axis 0 (extractor {self.ext.name!r}; for ONNX models see --batch-axis)"
                )
            if name in self.early:
                if arr.shape != (b, self.early[name]):
                    raise ModelError(
                        f"extractor {self.ext.name!r} returned shape {arr.shape} for layer {name!r}, which it "
                        f"reduces itself with {self.reductions[name]!r}; expected {(b, self.early[name])} (a bug "
                        "in the extractor plugin)"
                    )
            else:
                self._check_shape(name, arr.shape[1:], start)
            arrays[name] = arr
        return arrays, mask

    def _check_shape(self, name: str, shape: tuple[int, ...], start: int) -> None:
        known = self.shapes.setdefault(name, shape)
        if self.reductions[name] in TOKEN_REDUCTIONS and len(shape) == len(known) == 2:
            same = shape[1] == known[1]  # the token count may change from batch to batch
        else:
            same = shape == known
        if not same:
            raise ModelError(
                f"layer {name!r} gave per-example shape {shape} for the batch starting at example id "
                f"{format_id(self.ids[start])}, but {known} for the first batch; every batch must give the same shape "
                "(pad the inputs to one length)"
            )

    def _mask(self, data: Mapping[str, np.ndarray]) -> np.ndarray | None:
        assert self.mask_input is not None
        if self.mask_input in data:
            return np.asarray(data[self.mask_input])
        needing = [n for n, r in self.reductions.items() if r in _MASKED]
        if needing:
            raise InputError(
                f"layer {needing[0]!r} uses reduction {self.reductions[needing[0]]!r}, which needs the attention "
                f"mask input {self.mask_input!r}, but the inputs have only {', '.join(sorted(data))}; name the mask "
                "with --mask-input NAME, or pass --mask-input none to count every token"
            )
        return None

    def _feed(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        wanted = self.model_inputs
        if wanted is None:
            return data
        if len(wanted) == 1 and len(data) == 1 and wanted[0] not in data:
            return {wanted[0]: next(iter(data.values()))}  # one array for a one-input model, whatever its name
        missing = [n for n in wanted if n not in data]
        if missing:
            raise InputError(
                f"model {self.ext.source} takes inputs {', '.join(wanted)} but {self.reader.path} has "
                f"{', '.join(sorted(data))} (missing: {', '.join(missing)}); name the arrays after the model's inputs"
            )
        return {n: data[n] for n in wanted}

    def layer_specs(self) -> list[LayerSpec]:
        return [
            LayerSpec(n, tuple(int(d) for d in self.shapes[n]), self.reductions[n], reduced_features(n, self.reductions[n], self.shapes[n]))
            for n in self.names
        ]

    def finish(self, batch: tuple[dict[str, np.ndarray], np.ndarray | None], start: int, stop: int) -> dict[str, np.ndarray]:
        arrays, mask = batch
        batch_ids = self.ids[start:stop]
        out = {}
        for name, arr in arrays.items():
            with np.errstate(over="ignore"):  # float16 overflow is reported below, with the example's id
                reduced = arr if name in self.early else reduce(name, self.reductions[name], arr, mask, batch_ids.tolist())
                rows = reduced.astype(self.dtype, copy=False)
            finite = np.isfinite(rows).all(axis=1)
            if not finite.all():
                raise _value_error(name, arr, rows, finite, batch_ids, self.dtype)
            out[name] = rows
        return out


def _value_error(
    name: str, raw: np.ndarray, rows: np.ndarray, finite: np.ndarray, batch_ids: np.ndarray, dtype: np.dtype
) -> ActivationValueError:
    row = int(np.flatnonzero(~finite)[0])
    raw_row = np.asarray(raw[row], dtype=np.float64)
    if np.isfinite(raw_row).all():
        return ActivationValueError(
            f"layer {name!r} overflows {dtype.name} for example id {format_id(batch_ids[row])} (largest |value| "
            f"{np.abs(raw_row).max():.3g}); store it with --dtype float32"
        )
    what = "NaN" if np.isnan(raw_row).any() else "Inf"
    count = int((~finite).sum())
    return ActivationValueError(
        f"layer {name!r} has {what} activations for example id {format_id(batch_ids[row])} ({count} example(s) in this "
        "batch); check the inputs of that example and the model's weights. No complete file was written"
    )


__all__ = ["extract", "shard_range", "shard_path", "resume_key", "DTYPES"]
