"""The one place a device string is parsed: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.

:func:`parse_device` checks the syntax only (no torch import, so the CLIs call it while parsing their
arguments); :func:`resolve_torch_device` asks torch whether the device exists. The ONNX plugin maps a parsed
:class:`Device` to onnxruntime providers itself. ``cpu``, and ``auto`` on a machine without a GPU driver, are
answered without importing torch (about a second): the CPU analysis runs on numpy alone.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from .errors import DeviceError

#: every device kind the package knows; commands and plugins accept a subset (``allowed``)
DEVICE_KINDS = ("auto", "cpu", "cuda", "mps")
#: device files whose presence means a GPU driver is loaded (NVIDIA, WSL2's GPU bridge, AMD ROCm)
GPU_DRIVER_FILES = ("/dev/nvidiactl", "/proc/driver/nvidia/version", "/dev/dxg", "/dev/kfd")


@dataclass(frozen=True)
class Device:
    """A parsed device: ``kind`` is one of :data:`DEVICE_KINDS`; ``index`` is ``N`` of ``cuda:N`` (else None)."""

    kind: str
    index: int | None = None

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def is_cpu(self) -> bool:
        return self.kind == "cpu"


def describe_kinds(allowed: tuple[str, ...] = DEVICE_KINDS) -> str:
    """``auto, cpu, cuda, cuda:N or mps`` for the kinds in ``allowed`` (help texts and errors)."""
    names = [k if k != "cuda" else "cuda, cuda:N" for k in DEVICE_KINDS if k in allowed]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def parse_device(
    spec: str | Device | None, *, allowed: tuple[str, ...] = DEVICE_KINDS, default: str = "auto"
) -> Device:
    """Parse ``spec`` (case and surrounding spaces ignored; ``None`` or empty: ``default``).

    Raises:
        DeviceError: not a device string, or a kind outside ``allowed`` (the message lists the accepted ones).
    """
    if isinstance(spec, Device):
        device = spec
    else:
        text = (spec or default).strip().lower()
        kind, sep, rest = text.partition(":")
        if sep and (kind != "cuda" or not rest.isdigit()):
            raise DeviceError(
                f"device {spec!r}: expected cuda:N with an integer N >= 0, or one of {describe_kinds(allowed)}"
            )
        if kind not in DEVICE_KINDS:
            raise DeviceError(f"unknown device {spec!r}; use {describe_kinds(allowed)}")
        device = Device(kind, int(rest) if sep else None)
    if device.kind not in allowed:
        raise DeviceError(f"device {str(device)!r} is not supported here; use {describe_kinds(allowed)}")
    return device


def gpu_driver_present() -> bool:
    """Whether CUDA could be available, without importing torch: no GPU driver, no CUDA."""
    if "torch" in sys.modules:  # already paid for: ask torch
        return True
    return any(os.path.exists(p) for p in GPU_DRIVER_FILES)


def resolve_torch_device(
    spec: str | Device | None, *, allowed: tuple[str, ...] = DEVICE_KINDS, default: str = "auto"
) -> Device:
    """The device to run on: ``auto`` becomes ``cuda`` when torch sees a GPU, else ``cpu``; a requested
    ``cuda``, ``cuda:N`` or ``mps`` is checked to exist. ``cpu``, and ``auto`` without a GPU driver, do not
    import torch.

    Raises:
        DeviceError: malformed or unsupported (see :func:`parse_device`), or the device does not exist here.
    """
    device = parse_device(spec, allowed=allowed, default=default)
    if device.is_cpu or (device.kind == "auto" and not gpu_driver_present()):
        return Device("cpu")
    import torch

    if device.kind == "auto":
        return Device("cuda") if torch.cuda.is_available() else Device("cpu")
    if device.kind == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("device 'mps' is not available on this machine; use --device cpu")
        return device
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {str(device)!r} requested but CUDA is not available (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu, or install a CUDA build of torch"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(
            f"device {str(device)!r} requested but only {count} CUDA device(s) exist (cuda:0..cuda:{count - 1})"
        )
    return device


__all__ = ["DEVICE_KINDS", "Device", "describe_kinds", "gpu_driver_present", "parse_device", "resolve_torch_device"]
