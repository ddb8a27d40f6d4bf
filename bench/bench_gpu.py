"""Question 6: the same analysis on CUDA. Runs anywhere; without a CUDA device it says so and skips.

Writes W (bench/benchlib.py) as HDF5, then times `cka-analyze --device cuda` against `--device cpu` on the same
files (end to end, after a warm-up run each), float32 and float64 Grams, and checks every result against the
float64 reference (bench/reference.py, over cka-analyze's own minibatches). Also measures the GPU's float32 and
float64 GEMM rate to put the CUDA time next to its floor. Needs only cka-offline's environment (no peers):

    python bench/bench_gpu.py [--quick | --smoke]

On a machine where cka-offline is not installed, run it from the repository root with the source on the path:
``PYTHONPATH=. python bench/bench_gpu.py`` (needs torch with CUDA, numpy, h5py, click, pluggy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import benchlib as bl
import reference as ref


def cuda_rate(dtype: str, size: int = 8192) -> float:
    import time

    import torch

    x = torch.randn(size, size, dtype=getattr(torch, dtype), device="cuda")
    x @ x
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x @ x
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.common_args(p)
    p.add_argument("--runs", type=int, default=2, help="timed runs per device and precision (best kept)")
    args = p.parse_args()
    import torch

    size = bl.size_of(args)
    if not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}): skipping the GPU benchmark")
        existing = (Path(args.results_dir) if args.results_dir else bl.RESULTS) / "gpu.json"
        if existing.exists() and not json.loads(existing.read_text()).get("skipped"):
            print(f"keeping {existing}, measured on a machine with CUDA")
            return 0
        bl.write_result("gpu", {"size": size, "skipped": f"no CUDA device (torch {torch.__version__})"},
                        args.results_dir)
        return 0
    s = bl.spec(size)
    directory = bl.data_dir(args, s.name.split()[0] + "-" + size)
    files = bl.materialize(s, directory, h5=True, npy=False)
    rows_h5, n_layers = ref.h5_rows(files["h5"])
    runs = 1 if args.smoke else args.runs
    want = None
    rows = []
    for device in ("cuda", "cpu"):
        for precision in ("float32", "float64"):
            out = str(directory / f"gpu-{device}-{precision}.json")
            if not args.smoke:
                bl.run_analyze(files["h5"], out, m=s.m, device=device, precision=precision, extra=["--quiet"])
            timed = [bl.run_analyze(files["h5"], out, m=s.m, device=device, precision=precision, extra=["--quiet"])
                     for _ in range(runs)]
            run, res = min(timed, key=lambda t: t[0].seconds)
            if want is None:
                want = ref.minibatch_cka(rows_h5, n_layers, bl.analyze_plan(res))
            row = {"device": device, "precision": precision, "seconds": run.seconds,
                   "compute_s": res.timing.get("compute"), "read_wait_s": res.timing.get("read_wait"),
                   "max_rss_mb": run.max_rss_mb, "max_err": bl.max_abs(res.cka, want),
                   "nan": bool(np.isnan(res.cka).any())}
            rows.append(row)
            print(f"{device:4s} {precision}: {run.seconds:7.2f} s end to end ({row['compute_s']:.2f} s compute), "
                  f"max |CKA - float64 reference| = {row['max_err']:.1e}")
    widths = list(s.widths_a) + list(s.widths_b)
    from cka_offline.analysis import batch_sizes

    flops = sum(2.0 * b * b * sum(widths) + 2.0 * len(widths) ** 2 * b * b for b in batch_sizes(s.n, s.m))
    rates = {dt: cuda_rate(dt, 2048 if args.smoke else 8192) for dt in ("float32", "float64")}
    by = {(r["device"], r["precision"]): r for r in rows}
    bl.write_result("gpu", {
        "size": size, "workload": s.describe(), "gpu": torch.cuda.get_device_name(0), "rows": rows,
        "cuda_gemm_rate_flops": rates, "flops": flops,
        "cuda_floor_s": {dt: flops / rates[dt] for dt in rates},
        "speedup_cuda_vs_cpu": {dt: by[("cpu", dt)]["seconds"] / by[("cuda", dt)]["seconds"] for dt in rates},
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }, args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
