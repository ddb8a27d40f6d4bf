"""Opening an ONNX model: the execution providers for a device, the graph without its weights, and the
external data files it refers to (refused outside the model's folder)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from cka_offline.devices import parse_device
from cka_offline.errors import DeviceError, ModelError

if TYPE_CHECKING:
    import onnx

#: the device kinds onnxruntime runs on here (no mps)
DEVICES = ("auto", "cpu", "cuda")


def providers(device: str) -> list[Any]:
    """onnxruntime's execution providers for ``device`` (parsed by :func:`cka_offline.devices.parse_device`):
    ``cpu``; ``auto`` (CUDA where onnxruntime has it); ``cuda`` / ``cuda:N`` (device N, needs onnxruntime-gpu)."""
    dev = parse_device(device, allowed=DEVICES, default="cpu")
    import onnxruntime as ort

    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if dev.is_cpu:
        return ["CPUExecutionProvider"]
    if dev.kind == "auto":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if has_cuda else ["CPUExecutionProvider"]
    if not has_cuda:
        raise DeviceError(
            f"device {device!r} needs onnxruntime's CUDAExecutionProvider, but onnxruntime {ort.__version__} "
            f"here has only {', '.join(available)}; install onnxruntime-gpu instead of onnxruntime, "
            "or use --device cpu"
        )
    return [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]


def load_model(path: str) -> onnx.ModelProto:
    import onnx

    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such ONNX file; give the path of an .onnx file (or a folder holding model.onnx)")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise ModelError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}); "
            "check that the file is complete and was written by an ONNX exporter"
        ) from exc
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.node:
        raise ModelError(
            f"{path} is not an ONNX model (no IR version or no graph nodes); check that the file is complete "
            "and was written by an ONNX exporter"
        )
    return model


def external_files(model: onnx.ModelProto, path: str) -> list[str]:
    """Absolute paths of the external data files the graph refers to; a missing one is an error now."""
    from onnx import TensorProto

    folder = os.path.dirname(path)
    files: list[str] = []
    for tensor in model.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        full = os.path.normpath(os.path.join(folder, location))
        if os.path.isabs(location) or os.path.commonpath([folder, full]) != folder:
            # a shared model must not make the tool read arbitrary local files as its weights
            raise ModelError(
                f"{path}: weight {tensor.name!r} points to external data {location!r}, outside the model's folder "
                f"{folder}; such models are refused: put the data file beside the .onnx file and give its plain name"
            )
        if full not in files:
            if not os.path.isfile(full):
                raise ModelError(
                    f"{path}: weight {tensor.name!r} lives in external data file {location!r}, which is not in "
                    f"{folder}; keep the .onnx file and its data files together"
                )
            files.append(full)
    return sorted(files)
