"""The ONNX extractor: any ``.onnx`` model (PyTorch, TensorFlow, JAX, Paddle exports), run by onnxruntime.

How a batch is extracted: the graph is loaded *without* its weights (``load_external_data=False``, so
models over 2 GB and external-data models stay cheap), the chosen tensors become the graph's outputs,
the modified graph is serialized and handed to onnxruntime, which reads the weights from the model's
folder. One session is built per set of chosen tensors and kept (a few at most). Its graph keeps only the
nodes the chosen tensors need, and takes ``--reduction mean`` itself (:func:`~cka_offline_onnx.graph.add_means`:
pooled in onnxruntime's NCHWc layout, so a fused Conv + Relu stays fused and only ``(batch, C)`` is
converted back); the listing always reads the graph as written.

Graph optimisation is on (``all``, onnxruntime's own default) unless ``optimization_level`` says
otherwise: onnxruntime never fuses away a node whose output is a graph output, so every chosen tensor
keeps its name and meaning (a Conv followed by BatchNormalization is folded only when the Conv's own
output is not chosen; the BatchNormalization output then comes from the folded Conv, equal to float32
rounding). Values agree with ``disable`` to float32 rounding (other kernels, such as the blocked NCHWc
convolutions); tests/plugins/test_onnx_extractor.py checks this on every level.

``onnx`` and ``onnxruntime`` are imported inside methods only: listing plugins must stay fast.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cka_offline.errors import DeviceError, InputError, LayerSelectionError, ModelError
from cka_offline.extractor import Extractor, LayerInfo, Option, sha256_path

from .feeds import FixedInputs, InputSpec, cast, fixed_hint, fmt_dims, input_specs
from .loading import external_files, load_model, providers
from .session import SessionModel, is_session, session_inputs, session_model, session_outputs

if TYPE_CHECKING:
    import onnx
    import onnxruntime

log = logging.getLogger(__name__)

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
DEFAULT_OPTIMIZATION_LEVEL = "all"
#: sessions kept per extractor; each holds the weights once more, so keep few
MAX_SESSIONS = 2
#: onnxruntime >= 1.20 resolves external data of a model given as bytes against this folder
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
#: output name of a tensor's spatial mean taken in the graph (Extractor.reduce_early; graph.add_means)
_MEAN_SUFFIX = "::cka_mean"


class OnnxExtractor(Extractor):
    """Extract any float tensor of an ONNX graph with onnxruntime."""

    name = "onnx"
    framework = "onnxruntime"
    description = (
        "ONNX models (.onnx file, or a folder holding model.onnx; external data and >2 GB ok), run with onnxruntime"
    )
    declared_options = (
        Option(
            "optimization_level",
            str,
            DEFAULT_OPTIMIZATION_LEVEL,
            "onnxruntime graph optimisation (default all, as onnxruntime's own); chosen tensors are graph outputs, "
            "which onnxruntime keeps, so every level gives the same tensors (values equal to float32 rounding); "
            "disable runs the graph exactly as written, about 2x slower",
            choices=OPTIMIZATION_LEVELS,
        ),
        Option(
            "batch_axis", int, 0, "axis of the chosen tensors that holds the batch (default 0); it is moved to axis 0"
        ),
        Option("threads", int, 0, "onnxruntime intra-op threads (default 0: onnxruntime decides)", minimum=0),
        Option(
            "mean_layout",
            str,
            "auto",
            "how --reduction mean reads a per-example (a, b) tensor: auto (channels first after Conv and pooling; "
            "(tokens, features) after MatMul, attention, LayerNormalization is refused, naming token_mean; other "
            "ops are refused) or channels_first (every such tensor is (C, L): mean over L)",
            choices=("auto", "channels_first"),
        ),
        Option(
            "fixed_inputs",
            object,
            None,
            "inputs given once, not per example, as JSON {name: value}: a number or nested list (a size-1 batch "
            'axis is broadcast to each batch), or "zeros" built per batch; e.g. \'{"sr": 16000, "state": "zeros"}\'',
        ),
    )

    #: the spatial mean is taken inside the graph (ReduceMean), by onnxruntime's threads
    early_reductions = frozenset({"mean"})

    @classmethod
    def can_open(cls, source: Any) -> bool:
        if is_session(source):
            return True
        if not isinstance(source, (str, os.PathLike)):  # a live model object is another extractor's
            return False
        source = os.fspath(source)
        if source.lower().endswith(".onnx"):
            return True
        return os.path.isdir(source) and os.path.isfile(os.path.join(source, "model.onnx"))

    def __init__(self, source: Any, *, device: str = "cpu", options: Mapping[str, Any] | None = None) -> None:
        """``source``: an ``.onnx`` path, a folder holding ``model.onnx``, or an ``onnxruntime.InferenceSession``
        (its model is re-read from the path or bytes it was built from; see :mod:`cka_offline_onnx.session`)."""
        origin = session_model(source) if is_session(source) else None
        super().__init__(origin.label if origin else source, device=device, options=options)
        #: the caller's session (Python API), which runs its own outputs; None for a path
        self._given: Any = source if origin else None
        #: whether sessions rebuilt from the given session's file or bytes were checked to be its model
        self._given_checked = False
        values = self.option_values
        self.optimization_level: str = values["optimization_level"]
        self.batch_axis: int = values["batch_axis"]
        self.threads: int = values["threads"]
        self.mean_layout: str = values["mean_layout"]
        self._providers = providers(device)
        self._model_bytes: bytes | None = None
        if origin is None:
            self.path = os.path.abspath(os.path.join(source, "model.onnx") if os.path.isdir(source) else source)
            self._model: onnx.ModelProto | None = load_model(self.path)
        else:
            self.path = origin.path or origin.label
            self._model = self._session_graph(origin)
        on_disk = origin is None or origin.path is not None
        self._external_files = external_files(self._model, self.path) if self._model is not None and on_disk else []
        self._layers: list[LayerInfo] | None = None
        self._types: dict[str, Any] | None = None
        self._layouts: dict[str, str] | None = None
        self._sessions: OrderedDict[tuple[str, ...], onnxruntime.InferenceSession] = OrderedDict()
        self._inputs = input_specs(self._model) if self._model is not None else session_inputs(self._given)
        self._fixed = FixedInputs(values["fixed_inputs"], self._inputs, self.path)
        #: rank, dtype and spatial positions of every tensor fetched so far, and those whose mean the graph takes
        self._seen: dict[str, tuple[int, np.dtype, int]] = {}  # rank, dtype, positions (axes 2..)
        self._early: set[str] = set()
        # a graph traced at batch 1 often bakes the 1 into Reshape constants: only example-by-example is safe
        self.fixed_batch_one = any(s.dims and s.dims[0] == 1 for s in self._per_example())

    def _session_graph(self, origin: SessionModel) -> onnx.ModelProto | None:
        """The graph a given session was built from, or None (then only its outputs are offered)."""
        import onnx

        why = origin.missing
        if origin.path:
            try:
                return load_model(origin.path)
            except ModelError as exc:
                why = str(exc)
        elif origin.data is not None:
            try:
                model = onnx.load_model_from_string(origin.data)
            except Exception as exc:
                why = f"its model bytes are not an ONNX graph ({type(exc).__name__})"
            else:
                external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
                if model.graph.node and not external:
                    self._model_bytes = origin.data
                    return model
                why = "its model bytes refer to external data files, whose folder a session does not record"
        names = ", ".join(o.name for o in self._given.get_outputs())
        log.warning(
            "%s: only the session's own outputs (%s) can be extracted: %s; build the session from the .onnx "
            "path (or its bytes) to reach intermediate tensors",
            origin.label,
            names,
            why,
        )
        return None

    # --- listing ---------------------------------------------------------------------------------------

    def layers(self) -> list[LayerInfo]:
        if self._layers is None:
            from .graph import list_layers

            if self._model is None:
                self._layers = session_outputs(self._given, self.batch_axis)
            else:
                self._layers = [
                    self._with_layout(i) for i in list_layers(self._model, self.batch_axis, self._tensor_types())
                ]
        return list(self._layers)

    def _with_layout(self, info: LayerInfo) -> LayerInfo:
        """``info`` with the layout its producing op tells (what the core's ``mean`` follows: channels first
        -> mean over the positions, tokens first -> token_mean); ``-X mean_layout=channels_first`` says
        channels first for the tensors whose op does not tell."""
        import dataclasses

        told = {"channels": "channels_first", "tokens": "tokens_first"}.get(self.mean_layout_of(info.name) or "", "")
        if not told and self.mean_layout == "channels_first":
            told = "channels_first"
        return dataclasses.replace(info, layout=told) if told else info

    def _tensor_types(self) -> dict[str, Any]:
        if self._model is None:
            return {}
        if self._types is None:
            from .graph import infer_types

            self._types = infer_types(self._model)
        return self._types

    def mean_layout_of(self, tensor: str) -> str | None:
        """``"channels"`` or ``"tokens"``: what the op producing ``tensor`` says its first per-example axis
        holds (see :func:`cka_offline_onnx.graph.mean_layouts`); None where it does not say."""
        if self._layouts is None:
            from .graph import mean_layouts

            self._layouts = mean_layouts(self._model, self._tensor_types()) if self._model is not None else {}
        return self._layouts.get(tensor)

    def input_names(self) -> list[str] | None:
        """The per-example inputs (those given once, ``fixed_inputs`` or shared, are not read from the inputs)."""
        return [s.name for s in self._per_example()]

    def _per_example(self) -> list[InputSpec]:
        return [s for s in self._inputs if s.name not in self._fixed and not s.shared]

    # --- running ---------------------------------------------------------------------------------------

    def reduce_early(self, reductions: Mapping[str, str]) -> list[str]:
        """Take ``mean`` in the graph: GlobalAveragePool + Flatten per tensor (float16 cast to float32 first;
        ReduceMean for float64; :func:`~cka_offline_onnx.graph.add_means`), so onnxruntime returns
        ``(batch, channels)``. Only with the batch on axis 0 and a batch dimension that is not fixed at 1,
        for tensors already fetched once (their rank is known)."""
        tensors = self._resolve([name for name, r in reductions.items() if r == "mean"])
        self._check_mean_layouts(tensors)
        if self.batch_axis != 0 or self.fixed_batch_one or self._model is None:
            return []
        accepted = [name for name, t in tensors.items() if t in self._seen and self._seen[t][0] >= 3]
        self._early.update(tensors[name] for name in accepted)
        self._sessions.clear()
        return accepted

    def _check_mean_layouts(self, tensors: Mapping[str, str]) -> None:
        """``mean`` on a per-example ``(a, b)`` tensor averages ``b``: right for a Conv1d's ``(C, L)``, wrong for a
        transformer's ``(tokens, features)``. Refuse it unless the producing op says channels first."""
        if self.mean_layout == "channels_first":
            return
        kinds = {i.name: i.kind for i in self.layers()}
        for requested, tensor in tensors.items():
            seen = self._seen.get(tensor)
            if seen is None or seen[0] != 3:
                continue  # a vector, or channels with spatial axes (C, H, W...): mean is unambiguous
            layout = self.mean_layout_of(tensor)
            if layout == "channels":
                continue
            what = f"tensor {tensor!r} ({kinds.get(tensor) or 'unknown op'}, per-example {self._shape_text(tensor)})"
            if layout == "tokens":
                raise LayerSelectionError(
                    f"{self.path}: {what} is (tokens, features): --reduction mean would average its features, one "
                    f"value per token; for the mean over tokens use -r '{requested}=token_mean' (or flatten)"
                )
            raise LayerSelectionError(
                f"{self.path}: --reduction mean on {what} is ambiguous, (tokens, features) or (channels, length); "
                f"use -r '{requested}=token_mean' for tokens, or -X mean_layout=channels_first for channels"
            )

    def _shape_text(self, tensor: str) -> str:
        shape = next((i.shape for i in self.layers() if i.name == tensor), None)
        return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")" if shape else "(a, b)"

    def run(self, inputs: Mapping[str, np.ndarray], layers: Sequence[str]) -> dict[str, np.ndarray]:
        tensors = self._resolve(layers)
        feeds, batch = self._feeds(inputs)
        wanted = tuple(dict.fromkeys(t + _MEAN_SUFFIX if t in self._early else t for t in tensors.values()))
        session = self._session(wanted)
        if session is not self._given and self._given is not None and not self._given_checked:
            self._check_rebuilt_is_given({**feeds, **self._fixed.feeds(batch)})
        if self.fixed_batch_one and batch != 1:
            once = self._fixed.feeds(1)
            parts = [
                self._run(session, wanted, {**{k: v[i : i + 1] for k, v in feeds.items()}, **once})
                for i in range(batch)
            ]
            fetched = [self._batch_first(parts_of_tensor, name) for name, parts_of_tensor in zip(wanted, zip(*parts))]
            arrays = {name: np.concatenate(a, axis=0) for name, a in zip(wanted, fetched)}
        else:
            values = self._run(session, wanted, {**feeds, **self._fixed.feeds(batch)})
            arrays = {name: self._batch_first([v], name)[0] for name, v in zip(wanted, values)}
        out: dict[str, np.ndarray] = {}
        for requested, tensor in tensors.items():
            arr = arrays[tensor + _MEAN_SUFFIX if tensor in self._early else tensor]
            if tensor not in self._early:
                self._seen[tensor] = (arr.ndim, arr.dtype, int(np.prod(arr.shape[2:], dtype=np.int64)))
            if arr.shape[0] != batch:
                raise ModelError(
                    f"{self.path}: tensor {tensor!r} has shape {arr.shape} for a batch of {batch}: its axis "
                    f"{self.batch_axis} is not the batch axis; choose another layer or set -X batch_axis=N"
                )
            out[requested] = arr
        return out

    def _check_rebuilt_is_given(self, feeds: dict[str, np.ndarray]) -> None:
        """The intermediate tensors of a session come from sessions rebuilt from the file (or bytes) it was
        made from: refuse when that file now holds another model (re-exported to the same name since), which
        would extract another network under the session's name. Checked once, on the first batch: the given
        session's own outputs against a rebuilt session's."""
        names = [o.name for o in self._given.get_outputs()]
        theirs = self._run(self._given, names, feeds)
        ours = self._run(self._build_session(tuple(names)), names, feeds)
        for name, a, b in zip(names, theirs, ours):
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True):
                raise ModelError(
                    f"{self.path} no longer holds the model of the InferenceSession given (its output {name!r} "
                    "differs on the first batch): the file changed after the session was made; make the session "
                    "again, or give the model file itself"
                )
        self._given_checked = True

    def _run(self, session: Any, wanted: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return list(session.run(list(wanted), feeds))
        except Exception as exc:  # onnxruntime's kernel errors: shapes or values the graph cannot take
            message = " ".join(str(exc).split())
            raise InputError(
                f"{self.path}: onnxruntime could not run the model on these inputs ({message}); the model takes: "
                f"{self._describe_inputs()}"
            ) from exc

    def _describe_inputs(self) -> str:
        return ", ".join(
            f"{s.name} {fmt_dims(s.dims)} {np.dtype(s.dtype).name if s.dtype else '?'}"
            + (" (given once)" if s.name in self._fixed else "")
            for s in self._inputs
        )

    def _batch_first(self, arrays: Sequence[np.ndarray], name: str) -> list[np.ndarray]:
        result = []
        for arr in arrays:
            arr = np.asarray(arr)
            if arr.ndim == 0 or not -arr.ndim <= self.batch_axis < arr.ndim:
                raise ModelError(
                    f"{self.path}: tensor {name!r} has shape {arr.shape}, which has no axis {self.batch_axis} "
                    "to hold the batch; choose another layer or set -X batch_axis=N"
                )
            result.append(np.moveaxis(arr, self.batch_axis, 0) if self.batch_axis not in (0, -arr.ndim) else arr)
        return result

    def _resolve(self, layers: Sequence[str]) -> dict[str, str]:
        """``{requested name: tensor name}``; aliases are accepted too when they name one tensor."""
        infos = {i.name: i for i in self.layers()}
        by_alias: dict[str, list[str]] = {}
        for info in infos.values():
            for alias in info.aliases:
                by_alias.setdefault(alias, []).append(info.name)
        resolved: dict[str, str] = {}
        for name in layers:
            if name in infos:
                info = infos[name]
            elif len(by_alias.get(name, ())) == 1:
                info = infos[by_alias[name][0]]
            else:
                close = difflib.get_close_matches(name, list(infos) + list(by_alias), n=5)
                hint = f"; close matches: {', '.join(close)}" if close else ""
                raise LayerSelectionError(
                    f"{self.path}: no tensor named {name!r}{hint}; list the layers with cka-extract --list-layers"
                )
            if not info.exposable:
                raise ModelError(
                    f"{self.path}: layer {name!r} cannot be extracted: {info.reason}; choose another layer"
                )
            resolved[name] = info.name
        if not resolved:
            raise LayerSelectionError(f"{self.path}: no layers requested; name at least one tensor")
        return resolved

    def _feeds(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """Check and cast the per-example inputs: ``({model input name: array}, batch size)``."""
        specs = self._per_example()
        expected = {s.name: s for s in specs}
        given = dict(inputs)
        if len(expected) == 1 and len(given) == 1 and not set(given) & set(expected):
            given = {next(iter(expected)): next(iter(given.values()))}  # one input: passed by position
        described = self._describe_inputs()
        shared = [s for s in self._inputs if s.name not in expected and s.name not in self._fixed]
        if shared:
            listed = ", ".join(f"{s.name!r} {fmt_dims(s.dims)}" for s in shared)
            raise InputError(
                f"{self.path}: input{'s' if len(shared) > 1 else ''} {listed} {'are' if len(shared) > 1 else 'is'} not per example (a scalar, or the "
                f"batch on another axis than 0); {fixed_hint([s.name for s in shared])}"
            )
        for name in given:
            if name not in expected and name not in self._fixed:
                raise InputError(f"{self.path}: the model has no input {name!r}; it takes: {described}")
        feeds: dict[str, np.ndarray] = {}
        batch: int | None = None
        given = {k: v for k, v in given.items() if k in expected}  # a fixed input's own value wins
        for name, spec in expected.items():
            if name not in given:
                raise InputError(f"{self.path}: input {name!r} is missing; the model takes: {described}")
            arr = np.asarray(given[name])
            if spec.dims is not None:
                self._check_shape(name, arr, spec.dims)
            if spec.dtype is not None and arr.dtype != spec.dtype:
                arr = cast(arr, spec.dtype, name, self.path)
            feeds[name] = arr
            if arr.ndim == 0:
                continue
            if batch is not None and arr.shape[0] != batch:
                raise InputError(
                    f"{self.path}: input {name!r} has {arr.shape[0]} examples, the other inputs {batch}; "
                    "give every input the same number of rows"
                )
            batch = arr.shape[0]
        return feeds, batch if batch is not None else 1

    def _check_shape(self, name: str, arr: np.ndarray, dims: tuple[int | str | None, ...]) -> None:
        expected = fmt_dims(dims)
        if arr.ndim != len(dims):
            raise InputError(
                f"{self.path}: input {name!r} expects shape {expected} (rank {len(dims)}), got {tuple(arr.shape)} "
                f"(rank {arr.ndim}); reshape the input array"
            )
        for axis, (want, got) in enumerate(zip(dims, arr.shape)):
            if not isinstance(want, int) or want == got or (axis == 0 and want == 1):
                continue  # batch 1 fixed in the graph: run() feeds one example at a time
            what = (
                f"a batch of {want} (the graph fixes it; use --batch-size {want})"
                if axis == 0
                else f"{want} on axis {axis}"
            )
            raise InputError(
                f"{self.path}: input {name!r} expects shape {expected}, got {tuple(arr.shape)}: needs {what}"
            )

    # --- sessions --------------------------------------------------------------------------------------

    def _session(self, tensors: tuple[str, ...]) -> onnxruntime.InferenceSession:
        if self._given is not None and set(tensors) <= {o.name for o in self._given.get_outputs()}:
            return self._given  # its own outputs: the caller's session, with its own options and providers
        key = tuple(sorted(tensors))
        if key in self._sessions:
            self._sessions.move_to_end(key)
            return self._sessions[key]
        session = self._build_session(key)
        self._sessions[key] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def _build_session(self, tensors: tuple[str, ...]) -> onnxruntime.InferenceSession:
        model_bytes = self._graph_bytes(tensors)
        opts = self._session_options()
        folder = os.path.dirname(self.path)
        try:
            session = _new_session(model_bytes, opts, self._providers)
        except Exception as exc:
            if not self._external_files:
                raise ModelError(f"{self.path}: onnxruntime cannot load the model: {exc}") from exc
            # older onnxruntime ignores the folder key: save the graph next to its weights instead
            log.info("loading %s from bytes failed (%s); using a temporary file beside it", self.path, exc)
            session = self._session_via_file(model_bytes, opts, folder)
        self._check_session(session, tensors)
        return session

    def _graph_bytes(self, tensors: tuple[str, ...]) -> bytes:
        """The serialized graph a session for ``tensors`` runs: the model with exactly these outputs (a
        ``<tensor>::cka_mean`` one computed by appended nodes, :func:`~cka_offline_onnx.graph.add_means`) and
        only the nodes they depend on. The listing (names, aliases, layouts) always reads the model as written."""
        import onnx

        from .graph import add_means, keep_needed

        assert self._model is not None  # without a graph only the given session's outputs are listed
        graph = self._model.graph
        kept = list(graph.output)
        nodes, inits = list(graph.node), len(graph.initializer)
        try:
            # only the chosen tensors are outputs: nothing else is kept alive or copied back
            del graph.output[:]
            graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors)
            means = [t[: -len(_MEAN_SUFFIX)] for t in tensors if t.endswith(_MEAN_SUFFIX)]
            add_means(self._model, {t: self._seen[t] for t in means}, _MEAN_SUFFIX)
            keep_needed(graph)
            return self._model.SerializeToString()
        finally:
            del graph.output[:]
            graph.output.extend(kept)
            del graph.node[:]
            graph.node.extend(nodes)
            del graph.initializer[inits:]

    def _session_options(self) -> onnxruntime.SessionOptions:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization_level]
        # The CPU arena (onnxruntime's default) keeps one batch's peak reserved for the session's life: memory
        # stays bounded by the batch size, and runs are ~2x faster than allocating every tensor afresh
        # (each fresh allocation of a large tensor is new pages from the system). Outputs are copied out of it.
        opts.log_severity_level = ort_log_severity()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if self._external_files:
            opts.add_session_config_entry(EXTERNAL_FOLDER_KEY, os.path.dirname(self.path))
        return opts

    def _session_via_file(self, model_bytes: bytes, opts: Any, folder: str) -> onnxruntime.InferenceSession:
        try:
            fd, tmp = tempfile.mkstemp(prefix=".cka-offline-", suffix=".onnx", dir=folder)
        except OSError as exc:
            raise ModelError(
                f"{self.path}: onnxruntime needs the modified graph beside its external data, but {folder} is not "
                f"writable ({exc}); copy the model folder somewhere writable or upgrade onnxruntime (>= 1.20)"
            ) from exc
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(model_bytes)
            return _new_session(tmp, opts, self._providers)
        except Exception as exc:
            raise ModelError(f"{self.path}: onnxruntime cannot load the model: {exc}") from exc
        finally:
            os.unlink(tmp)

    def _check_session(self, session: onnxruntime.InferenceSession, tensors: tuple[str, ...]) -> None:
        outputs = {o.name for o in session.get_outputs()}
        missing = [t for t in tensors if t not in outputs]
        if missing:
            raise ModelError(
                f"{self.path}: tensor(s) {', '.join(map(repr, missing))} vanished at optimization_level="
                f"{self.optimization_level} (fused by onnxruntime); use -X optimization_level=disable"
            )
        if self._providers[0] != "CPUExecutionProvider" and self.device != "auto":
            if "CUDAExecutionProvider" not in session.get_providers():
                raise DeviceError(
                    f"{self.path}: onnxruntime could not start CUDAExecutionProvider for device {self.device!r} "
                    "(driver, CUDA or cuDNN libraries missing?); check `nvidia-smi` and the onnxruntime-gpu "
                    "CUDA requirements, or use --device cpu"
                )

    # --- provenance ------------------------------------------------------------------------------------

    def provenance(self) -> dict[str, str]:
        import onnxruntime as ort

        model = self._model
        if self._model_bytes is not None:  # a session built from bytes: they are its identity
            identity = hashlib.sha256(self._model_bytes).hexdigest()
        else:
            identity = sha256_path(self.path) if model is not None else ""
        prov = {
            "framework": self.framework,
            "framework_version": ort.__version__,
            "model": self.path,
            "model_sha256": identity,
            "optimization_level": self.optimization_level,
            "execution_provider": self._providers[0] if isinstance(self._providers[0], str) else self._providers[0][0],
        }
        if model is not None:
            prov["opset"] = ",".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import)
            prov["producer"] = " ".join(p for p in (model.producer_name, model.producer_version) if p)
            prov["ir_version"] = str(model.ir_version)
        else:
            meta = self._given.get_modelmeta()
            prov["producer"] = str(meta.producer_name or "")
            prov["model_identity"] = "unknown: the session's model bytes were not found (only its outputs were run)"
        if self._external_files:
            # model_sha256 covers the graph only; the weights live in these files
            digest = hashlib.sha256()
            for path in self._external_files:
                digest.update(os.path.basename(path).encode())
                digest.update(sha256_path(path).encode())
            prov["external_data_sha256"] = digest.hexdigest()
        return prov

    def close(self) -> None:
        self._sessions.clear()


# --- helpers ---------------------------------------------------------------------------------------------


def ort_log_severity() -> int:
    """onnxruntime's own log level: fatal only (4) unless this plugin logs at DEBUG (``cka-extract --debug``),
    then warnings (2, what onnxruntime shows by itself; its info level is dozens of lines per session).
    Its warnings (unused initializers of the pruned graph, nodes placed on the CPU) and error lines would
    otherwise reach the terminal beside ours; every failure that matters is raised, and becomes one line
    of ours."""
    return 2 if log.isEnabledFor(logging.DEBUG) else 4


def _new_session(model: bytes | str, opts: Any, providers: list[Any]) -> onnxruntime.InferenceSession:
    import onnxruntime as ort

    # the process-wide default logger (the C++ environment's) prints what happens before a session has its own
    ort.set_default_logger_severity(ort_log_severity())
    return ort.InferenceSession(model, opts, providers=providers)
