"""Builders of bad inputs and helpers that run the real commands, shared by the hardening tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from click.testing import CliRunner, Result

from cka_offline.cli import analyze as cli_analyze
from cka_offline.cli import extract as cli_extract
from cka_offline.cli import inspect as cli_inspect

from ..activation_files import write_acts

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "sample_data"
BIN = ROOT / ".venv" / "bin"
COMMANDS: dict[str, Any] = {
    "cka-extract": cli_extract.main,
    "cka-analyze": cli_analyze.main,
    "cka-inspect": cli_inspect.inspect,
}


def invoke(prog: str, args: list[str]) -> Result:
    return CliRunner().invoke(COMMANDS[prog], [str(a) for a in args])


def error_line(result: Result, prog: str) -> str:
    """The one line a known error prints (stdout stays empty); returns the text after ``prog: error: ``."""
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0][len(f"{prog}: error: ") :]


def acts(
    path: Path,
    n: int = 40,
    *,
    ids: Any = None,
    layers: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    chunk_rows: int = 8,
) -> str:
    """A valid activation file of ``n`` examples (layers ``conv1`` (6 features) and ``fc`` (3))."""
    rng = np.random.default_rng(seed)
    if layers is None:
        layers = {"conv1": rng.normal(size=(n, 6)).astype(np.float32), "fc": rng.normal(size=(n, 3)).astype(np.float32)}
    rows = len(next(iter(layers.values())))
    return write_acts(path, layers, ids, chunk_rows=chunk_rows, provenance={"model": "m"}, rows_per_write=rows)


def mutate(path: str, fn: Callable[[h5py.File], Any]) -> str:
    with h5py.File(path, "r+") as h:
        fn(h)
    return path


def replace_dataset(h: h5py.File, name: str, data: np.ndarray) -> None:
    """Swap a dataset for ``data``, keeping its attributes."""
    attrs = dict(h[name].attrs)
    del h[name]
    h[name] = data
    h[name].attrs.update(attrs)


def npy_folder(folder: Path, n: int = 300, widths: tuple[int, ...] = (16, 8, 4), seed: int = 0) -> str:
    """A folder of ``.npy`` files for the arrays extractor, one per layer (``l0``, ``l1``, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, width in enumerate(widths):
        np.save(folder / f"l{i}.npy", rng.normal(size=(n, width)).astype(np.float32))
    return str(folder)


def digits(path: Path, n: int = 40, **changes: np.ndarray) -> str:
    """The first ``n`` sample digits as an inputs ``.npz`` (``pixels``, ``ids``), with ``changes`` applied."""
    with np.load(SAMPLE / "digits.npz") as d:
        arrays = {"pixels": d["pixels"][:n], "ids": d["ids"][:n]}
    arrays.update(changes)
    np.savez(path, **arrays)
    return str(path)


def write_py(path: Path, code: str) -> str:
    path.write_text(code)
    return str(path)


def two_input_onnx(path: Path) -> str:
    """An ONNX graph ``out = Relu(x + y)`` with float inputs ``x`` and ``y`` of shape (batch, 3)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3])
    nodes = [
        helper.make_node("Add", ["x", "y"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["out"], name="relu"),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "two", [x, y], [out]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.save(model, path)
    return str(path)


def leftovers(folder: Path, before: set[str]) -> set[str]:
    """Files (recursively) created under ``folder`` since ``before``."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - before


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def full_content(path: str) -> dict[str, Any]:
    """Every dataset and attribute of an HDF5 file except the creation time, comparable with ``==``."""
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as h:
        out["/"] = {k: _plain(v) for k, v in h.attrs.items() if k != "created"}

        def visit(name: str, obj: Any) -> None:
            attrs = {k: _plain(v) for k, v in obj.attrs.items()}
            if isinstance(obj, h5py.Dataset):
                out[name] = (
                    obj[()].tobytes() if obj.dtype.kind != "O" else obj.asstr()[()].tolist(),
                    obj.dtype.str,
                    obj.shape,
                    obj.chunks,
                    attrs,
                )
            else:
                out[name] = attrs

        h.visititems(visit)
    return out


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else value


def one_line(text: str) -> bool:
    return len(text.splitlines()) == 1
