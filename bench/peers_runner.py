"""Run one peer package's own minibatch-CKA loop on stored activations (executed with .bench-venv/bin/python).

The activations come from per-layer ``.npy`` files (memory-mapped) listed in a manifest. Each "model" is a
trivial ``nn.Module`` whose child modules emit the stored rows of one layer as their output, so the peer's
forward hooks fire and its loop runs unchanged. The DataLoader yields ``(positions, dummy label)`` with
``shuffle=False``: consecutive, unshuffled minibatches of ``m`` rows, the same for every peer.

Prints one JSON line: peer, package version, seconds (the peer's constructor + loop + result; the rows are
read from the page cache inside its loop, like cka-analyze reads its files), batches, shape; the CKA matrix
(model A layers x model B layers, float64) goes to ``--out`` (.npy). Imports nothing from cka_offline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from importlib import metadata

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

PACKAGES = {
    "ckatorch": "ckatorch",
    "torch-cka": "torch-cka",
    "pytorch-cka": "pytorch-cka",
    "cka-pytorch": "cka-pytorch",
}


class StoredLayer(nn.Module):
    """Emits rows ``positions`` of one stored layer as its output (a fresh float32 tensor)."""

    def __init__(self, array: np.ndarray, leading_one: bool = False) -> None:
        super().__init__()
        self.array = array
        self.leading_one = leading_one

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        first, last = int(positions[0]), int(positions[-1])
        if last - first + 1 == len(positions):  # consecutive rows: one slice of the memory map
            rows = np.array(self.array[first : last + 1])
        else:
            rows = np.array(self.array[positions.numpy()])
        out = torch.from_numpy(rows)
        return out.unsqueeze(0) if self.leading_one else out


class StoredModel(nn.Module):
    """A "model" whose layers are :class:`StoredLayer` children named like the stored layers."""

    def __init__(self, names: list[str], arrays: list[np.ndarray], leading_one: bool = False) -> None:
        super().__init__()
        for name, array in zip(names, arrays):
            self.add_module(name, StoredLayer(array, leading_one))
        self.names = names
        self.anchor = nn.Parameter(torch.zeros(1))  # cka-pytorch asks the model for a parameter's device

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        for name in self.names:
            getattr(self, name)(x)
        return x


def loader(n: int, m: int, max_batches: int | None) -> DataLoader:
    data = TensorDataset(torch.arange(n), torch.zeros(n))
    if max_batches:
        data = Subset(data, range(min(n, max_batches * m)))
    return DataLoader(data, batch_size=m, shuffle=False, drop_last=False)


def import_peer(peer: str) -> None:
    """Import the peer's package before the clock starts (cka-pytorch pulls in lightning: seconds)."""
    module = {"ckatorch": "ckatorch", "torch-cka": "torch_cka", "pytorch-cka": "cka", "cka-pytorch": "cka_pytorch"}
    __import__(module[peer])


def run_peer(peer: str, a: StoredModel, b: StoredModel, dl: DataLoader) -> torch.Tensor:
    if peer == "ckatorch":
        from ckatorch import CKA

        cka = CKA(a, b, layers=a.names, second_layers=b.names, first_name="A", second_name="B", device="cpu")
        return cka(dl, epochs=1)
    if peer == "torch-cka":
        from torch_cka import CKA

        cka = CKA(a, b, model1_name="A", model2_name="B", model1_layers=a.names, model2_layers=b.names, device="cpu")
        cka.compare(dl)
        return cka.export()["CKA"]
    if peer == "pytorch-cka":
        from cka import compute_cka

        return compute_cka(a, b, dl, layers=a.names, model2_layers=b.names, device="cpu", progress=False)[0]
    if peer == "cka-pytorch":
        from cka_pytorch import CKACalculator

        calc = CKACalculator(
            a, b, model1_layers=a.names, model2_layers=b.names, device=torch.device("cpu"), verbose=False
        )
        return calc.calculate_cka_matrix(dl, num_epochs=1)
    raise SystemExit(f"unknown peer {peer!r}; one of {', '.join(PACKAGES)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--peer", required=True, choices=sorted(PACKAGES))
    p.add_argument("--manifest", required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-batches", type=int)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = json.load(open(args.manifest))
    arrays = {k: [np.load(path, mmap_mode="r") for path in manifest[k]["paths"]] for k in ("a", "b")}
    # ckatorch's cka_batch needs (batch, examples, features) outputs; a 2-D output fails in torch.bmm
    leading_one = args.peer == "ckatorch"
    a = StoredModel(manifest["a"]["names"], arrays["a"], leading_one)
    b = StoredModel(manifest["b"]["names"], arrays["b"], leading_one)
    dl = loader(manifest["n"], args.batch_size, args.max_batches)
    info = {
        "peer": args.peer,
        "version": metadata.version(PACKAGES[args.peer]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batches": len(dl),
        "batch_size": args.batch_size,
    }
    import_peer(args.peer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        try:
            cka = run_peer(args.peer, a, b, dl)
            info["seconds"] = time.perf_counter() - t0
        except Exception as exc:  # the peer failing is a result, reported, not a crash of the benchmark
            info.update(ok=False, seconds=time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}"[:300])
            traceback.print_exc()
            print(json.dumps(info))
            return 0
    cka = cka.detach().to(torch.float64).numpy()
    np.save(args.out, cka)
    info.update(
        ok=True,
        shape=list(cka.shape),
        nan=bool(np.isnan(cka).any()),
        warnings=sorted({str(w.message)[:120] for w in caught}),
    )
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
