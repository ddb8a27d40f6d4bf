"""Regenerate the bundled sample data: digits.npz, cnn_a.safetensors, cnn_b.onnx.

    python sample_data/make_sample_data.py            # writes next to this script
    python sample_data/make_sample_data.py --out DIR  # writes elsewhere (to compare with the shipped files)

Deterministic on CPU: fixed seeds, one thread, ``torch.use_deterministic_algorithms(True)``; takes well
under a minute. Needs scikit-learn (for ``load_digits``, which ships its data, so no download), torch,
safetensors and onnx. See README.md for what every file is.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from digits_cnn import make_model  # noqa: E402

#: digits whose id (load_digits index) is a multiple of this are held out of training (599 of 1797)
HOLDOUT_EVERY = 3
EPOCHS = 40
BATCH = 64
LR = 3e-3
WEIGHT_DECAY = 1e-4
#: (file name, seed); network A is kept as torch weights, B is exported to ONNX
NETWORKS = (("cnn_a.safetensors", 0), ("cnn_b.onnx", 1))
OPSET = 17


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All 1797 scikit-learn digits: pixels (n, 1, 8, 8) float32 in [0, 1], labels int64, ids int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)  # raw values are 0..16
    labels = digits.target.astype(np.int64)
    ids = np.arange(len(labels), dtype=np.int64)
    return pixels, labels, ids


def heldout_mask(ids: np.ndarray) -> np.ndarray:
    return ids % HOLDOUT_EVERY == 0


def train(seed: int, pixels: np.ndarray, labels: np.ndarray) -> nn.Module:
    """Train one network from ``seed`` (initialisation and minibatch order) with Adam."""
    torch.manual_seed(seed)
    model = make_model()
    x = torch.from_numpy(pixels)
    y = torch.from_numpy(labels)
    order = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(EPOCHS):
        perm = torch.randperm(len(x), generator=order)
        for start in range(0, len(x), BATCH):
            idx = perm[start : start + BATCH]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def export_onnx(model: nn.Module, path: str) -> None:
    """Export with the TorchScript exporter: its node and tensor names keep the module names
    (``/conv1/Conv``, ``/conv1/Conv_output_0``), which is how layers of A and B are matched; the
    torch.export-based exporter (the default since torch 2.9) keeps them only in node metadata, adds
    shape nodes and records absolute source paths. BatchNorm is kept as its own node (no folding)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
        torch.onnx.export(
            model,
            (torch.zeros(2, 1, 8, 8),),
            path,
            dynamo=False,
            opset_version=OPSET,
            input_names=["pixels"],
            output_names=["logits"],
            dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=False,
        )


def sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=HERE, help="output folder (default: this folder)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()

    pixels, labels, ids = load_digits_arrays()
    test = heldout_mask(ids)
    digits_path = os.path.join(args.out, "digits.npz")
    np.savez_compressed(digits_path, pixels=pixels, labels=labels, ids=ids)
    written = [digits_path]
    print(f"digits: {len(ids)} examples, {int((~test).sum())} for training, {int(test.sum())} held out")

    from safetensors.torch import save_file

    for fname, seed in NETWORKS:
        model = train(seed, pixels[~test], labels[~test])
        with torch.no_grad():
            logits = model(torch.from_numpy(pixels)).numpy()
        path = os.path.join(args.out, fname)
        if fname.endswith(".safetensors"):
            save_file(
                {k: v.contiguous() for k, v in model.state_dict().items()},
                path,
                # one key: safetensors orders several metadata keys differently on every run
                metadata={
                    "made_by": f"sample_data/make_sample_data.py, seed {seed}, "
                    "factory sample_data/digits_cnn.py:make_model"
                },
            )
        else:
            export_onnx(model, path)
        written.append(path)
        print(
            f"{fname}: seed {seed}, accuracy held-out {accuracy(logits[test], labels[test]):.4f}, "
            f"train {accuracy(logits[~test], labels[~test]):.4f}, all {accuracy(logits, labels):.4f}"
        )

    for path in written:
        print(f"{os.path.basename(path)}  {os.path.getsize(path)} bytes  sha256 {sha256(path)}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
