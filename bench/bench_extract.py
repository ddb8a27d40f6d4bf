"""Question 5: what does `cka-extract` cost on top of the bare forward passes of the same model?

The model is bench/cnn.py (a small CNN, 3 x 32 x 32 inputs); 8 layers (conv1..relu4) are extracted with
``--reduction mean`` (one value per channel, the usual choice for CNN CKA) and, separately, ``flatten``
(every value: 196,608 floats = 768 KiB per example, so the HDF5 writes dominate). Both plugins:

- PyTorch: ``cka-extract bench/cnn.py:make_model`` against ``model(x)`` under ``torch.no_grad()``;
- ONNX: ``cka-extract cnn.onnx`` against ``onnxruntime.InferenceSession(cnn.onnx).run`` with default
  session options (what a user runs; the plugin's own default optimisation level is recorded in the file).

Each side runs as a subprocess with the same batch size (64) on N and 2N inputs; the overhead is the ratio of
the marginal costs (time(2N) - time(N)): start-up and imports cancel out. End-to-end times at 2N are reported
too. Then, for PyTorch, the same marginal comparison in this one process, the bare loop and
``cka_offline.extract`` alternated five times (medians): steadier than separate processes here.

Flattened maps against the disk (issue 18): ``flatten`` writes 768 KiB per input, so its floor is the
disk, not the forward passes. In the same run the output folder's sequential write bandwidth is measured
(a file the size of the 2N extraction's output, 4 MiB writes of incompressible bytes, then ``fsync``; and
the page-cache rate, the same without ``fsync``), and PyTorch ``cka-extract --reduction flatten``'s
marginal seconds are compared with max(bare forward passes, marginal bytes written / fsync'ed bandwidth).
The fsync'ed rate is the floor because ``ActivationWriter.close()`` fsyncs the file before renaming it: the
command does not return before every byte is on the disk. Target: at most 1.25x that floor.

    python bench/bench_extract.py [--quick | --smoke] [--reductions mean,flatten]
    python bench/bench_extract.py --bare torch|onnx --model M --inputs x.npz   (the bare loop, used internally)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import benchlib as bl

BENCH = Path(__file__).resolve().parent
BATCH = 64
#: flatten's target: at most this many times max(bare forward passes, bytes written / disk bandwidth)
TARGET_DISK_RATIO = 1.25


def bare(kind: str, model: str, inputs: str) -> None:
    """The bare forward loop: load inputs, run every batch through the model, print the seconds as JSON."""
    import numpy as np

    t0 = time.perf_counter()
    x = np.load(inputs)["x"]
    if kind == "torch":
        import torch

        sys.path.insert(0, str(BENCH))
        import cnn

        net = cnn.make_model()
        t1 = time.perf_counter()
        with torch.no_grad():
            for start in range(0, len(x), BATCH):
                net(torch.from_numpy(x[start : start + BATCH]))
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        t1 = time.perf_counter()
        for start in range(0, len(x), BATCH):
            session.run(None, {"x": x[start : start + BATCH]})
    t2 = time.perf_counter()
    print(json.dumps({"load_s": t1 - t0, "loop_s": t2 - t1}))


def extract_command(model: str, inputs: str, out: str, layers: str, reduction: str) -> list[str]:
    return [
        *bl.cli("cka-extract"),
        model,
        "-i",
        inputs,
        "-o",
        out,
        "--layers",
        layers,
        "--reduction",
        reduction,
        "--batch-size",
        str(BATCH),
        "--overwrite",
        "--quiet",
    ]


def disk_bandwidth(directory: Path, size: int, *, sync: bool) -> float:
    """Bytes per second of writing ``size`` bytes to a new file in ``directory`` with 4 MiB sequential
    writes of incompressible bytes, then (``sync``) ``fsync`` -- the data on the disk -- or not (the
    page cache only). The file is removed."""
    import os

    import numpy as np

    block = np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    path = directory / "disk-bandwidth.bin"
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = 0
        while written < size:
            written += os.write(fd, block[: min(len(block), size - written)])
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t
    path.unlink()
    return written / seconds


def flatten_vs_disk(
    rows: list[dict],
    bare_runs: dict[int, bl.Run],
    model: str,
    inputs: dict[int, str],
    layers: str,
    repeats: int,
    directory: Path,
) -> dict:
    """PyTorch ``--reduction flatten`` against max(bare forward passes, bytes written / disk bandwidth),
    all measured in this run (the torch flatten row of ``rows`` when there is one, else measured here)."""
    n1, n2 = sorted(inputs)
    row = next((r for r in rows if r["plugin"] == "torch" and r["reduction"] == "flatten"), None)
    if row is None:
        ext, sizes = {}, {}
        for n in inputs:
            out = str(directory / f"torch-flatten-{n}.h5")
            ext[n] = min(
                (bl.run(extract_command(model, inputs[n], out, layers, "flatten")) for _ in range(repeats)),
                key=lambda r: r.seconds,
            )
            sizes[n] = Path(out).stat().st_size
            Path(out).unlink(missing_ok=True)
        extract_s, file_bytes = [ext[n].seconds for n in (n1, n2)], [sizes[n] for n in (n1, n2)]
    else:
        extract_s, file_bytes = row["extract_s"], row["file_bytes"]
    # the disk after the extractions (their write-back is done: each one fsyncs before it returns)
    synced = max(disk_bandwidth(directory, file_bytes[1], sync=True) for _ in range(repeats))
    cached = max(disk_bandwidth(directory, file_bytes[1], sync=False) for _ in range(repeats))
    marginal_bytes = file_bytes[1] - file_bytes[0]
    marginal_extract = extract_s[1] - extract_s[0]
    marginal_bare = bare_runs[n2].seconds - bare_runs[n1].seconds
    disk_s = marginal_bytes / synced
    floor = max(marginal_bare, disk_s)
    ratio = marginal_extract / floor if floor > 0 else float("nan")
    result = {
        "n": [n1, n2],
        "file_bytes": file_bytes,
        "marginal_bytes": marginal_bytes,
        "disk_fsync_bytes_per_s": synced,
        "disk_page_cache_bytes_per_s": cached,
        "marginal_disk_s": disk_s,
        "marginal_page_cache_s": marginal_bytes / cached,
        "marginal_bare_s": marginal_bare,
        "marginal_extract_s": marginal_extract,
        "floor_s": floor,
        "ratio": ratio,
        "target_ratio": TARGET_DISK_RATIO,
        "target_met": bool(ratio <= TARGET_DISK_RATIO),
    }
    print(
        f"torch flatten vs disk: per {n1} inputs {marginal_bytes / 1e9:.2f} GB, cka-extract {marginal_extract:.2f} s, "
        f"bare {marginal_bare:.2f} s, disk {disk_s:.2f} s ({synced / 1e6:.0f} MB/s fsync'ed, {cached / 1e6:.0f} MB/s "
        f"page cache) -> {ratio:.2f}x the floor (target {TARGET_DISK_RATIO}x: "
        f"{'met' if result['target_met'] else 'missed'})"
    )
    return result


def in_process(
    model: str, inputs: dict[int, str], reductions: list[str], layers: str, repeats: int, directory: Path
) -> list[dict]:
    """PyTorch only, in this one process: the bare loop and ``cka_offline.extract`` on N and 2N inputs,
    alternated ``repeats`` times; marginal seconds are medians. One process and alternation keep torch's
    and the allocator's state alike for both sides, which separate processes on this machine do not."""
    import statistics

    import cnn
    import numpy as np
    import torch

    from cka_offline import extract

    net = cnn.make_model()
    arrays = {n: np.load(path)["x"] for n, path in inputs.items()}

    def bare_loop(n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for start in range(0, n, BATCH):
                net(torch.from_numpy(arrays[n][start : start + BATCH]))
        return time.perf_counter() - t

    def extraction(n: int, reduction: str) -> float:
        out = directory / f"in-process-{reduction}-{n}.h5"
        t = time.perf_counter()
        extract(model, inputs[n], out, layers=layers.split(","), reduction=reduction, batch_size=BATCH, overwrite=True)
        seconds = time.perf_counter() - t
        out.unlink(missing_ok=True)
        return seconds

    n1, n2 = sorted(inputs)
    rows = []
    for reduction in reductions:
        extraction(n1, reduction)  # warm-up: imports, plugin discovery, first allocations
        bare_loop(n1)
        bare_m, ext_m = [], []
        for _ in range(repeats):
            bare_m.append(bare_loop(n2) - bare_loop(n1))
            ext_m.append(extraction(n2, reduction) - extraction(n1, reduction))
        b, e = statistics.median(bare_m), statistics.median(ext_m)
        rows.append(
            {
                "plugin": "torch",
                "reduction": reduction,
                "repeats": repeats,
                "marginal_bare_s": b,
                "marginal_extract_s": e,
                "ratio": e / b if b > 0 else float("nan"),
                "bare_spread_s": [min(bare_m), max(bare_m)],
                "extract_spread_s": [min(ext_m), max(ext_m)],
            }
        )
        print(
            f"in one process, torch {reduction:7s}: per {n1} inputs cka_offline.extract {e:6.2f} s, bare loop "
            f"{b:6.2f} s -> {e / b:.2f}x (medians of {repeats})"
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.common_args(p)
    p.add_argument("--reductions", help="comma-separated (default: mean,flatten; --smoke: mean)")
    p.add_argument("--n", type=int, help="N (the runs use N and 2N inputs)")
    p.add_argument("--repeats", type=int, default=2, help="runs per measurement (best kept)")
    p.add_argument("--bare", choices=["torch", "onnx"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bare:
        bare(args.bare, args.model, args.inputs)
        return 0
    size = bl.size_of(args)
    n1 = args.n or {"full": 2048, "quick": 512, "smoke": 128}[size]
    reductions = (args.reductions or ("mean" if args.smoke else "mean,flatten")).split(",")
    repeats = 1 if args.smoke else args.repeats
    directory = bl.data_dir(args, "extract-" + size)
    directory.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(BENCH))
    import cnn

    onnx_path, inputs = cnn.prepare(str(directory), (n1, 2 * n1))
    models = {"torch": f"{BENCH / 'cnn.py'}:make_model", "onnx": onnx_path}
    layers = ",".join(cnn.LAYERS)

    def best(cmd: list[str]) -> bl.Run:
        return min((bl.run(cmd) for _ in range(repeats)), key=lambda r: r.seconds)

    rows: list[dict] = []
    bare_by_plugin: dict[str, dict[int, bl.Run]] = {}
    for plugin, model in models.items():
        bare_runs = {
            n: best([sys.executable, __file__, "--bare", plugin, "--model", model, "--inputs", inputs[n]])
            for n in inputs
        }
        bare_loop = {n: json.loads(r.stdout.strip().splitlines()[-1])["loop_s"] for n, r in bare_runs.items()}
        bare_by_plugin[plugin] = bare_runs
        for reduction in reductions:
            ext, sizes = {}, {}
            for n in inputs:
                out = str(directory / f"{plugin}-{reduction}-{n}.h5")
                ext[n] = best(extract_command(model, inputs[n], out, layers, reduction))
                sizes[n] = Path(out).stat().st_size
                Path(out).unlink(missing_ok=True)
            marginal_ext = ext[2 * n1].seconds - ext[n1].seconds
            marginal_bare = bare_runs[2 * n1].seconds - bare_runs[n1].seconds
            row = {
                "plugin": plugin,
                "reduction": reduction,
                "n": [n1, 2 * n1],
                "extract_s": [ext[n].seconds for n in inputs],
                "bare_s": [bare_runs[n].seconds for n in inputs],
                "bare_loop_s": [bare_loop[n] for n in inputs],
                "marginal_extract_s": marginal_ext,
                "marginal_bare_s": marginal_bare,
                "overhead_ratio": marginal_ext / marginal_bare if marginal_bare > 0 else float("nan"),
                "overhead_ratio_vs_loop": marginal_ext / (bare_loop[2 * n1] - bare_loop[n1])
                if bare_loop[2 * n1] > bare_loop[n1]
                else float("nan"),
                "end_to_end_ratio": ext[2 * n1].seconds / bare_runs[2 * n1].seconds,
                "extract_max_rss_mb": ext[2 * n1].max_rss_mb,
                "file_bytes": [sizes[n] for n in inputs],
                "bare_max_rss_mb": bare_runs[2 * n1].max_rss_mb,
            }
            rows.append(row)
            print(
                f"{plugin:5s} {reduction:7s}: per {n1} inputs cka-extract {marginal_ext:6.2f} s, bare forward "
                f"{marginal_bare:6.2f} s -> {row['overhead_ratio']:.2f}x (end to end at {2 * n1}: "
                f"{row['end_to_end_ratio']:.2f}x)"
            )
    disk = flatten_vs_disk(rows, bare_by_plugin["torch"], models["torch"], inputs, layers, repeats, directory)
    same_process = in_process(
        models["torch"], inputs, reductions, layers, {"smoke": 1, "quick": 3}.get(size, 5), directory
    )
    bl.write_result(
        "extract",
        {
            "size": size,
            "batch_size": BATCH,
            "layers": list(cnn.LAYERS),
            "rows": rows,
            "in_process": same_process,
            "target_ratio": 1.15,
            "flatten_vs_disk": disk,
        },
        args.results_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
