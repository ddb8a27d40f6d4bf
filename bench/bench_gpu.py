"""Question 6: the same analysis on CUDA. Runs anywhere; without a CUDA device it says so and skips.

Writes a workload (W by default, bench/benchlib.py) as HDF5, reads the files once so that they are in the page
cache, then times `cka-analyze --device cuda` against `--device cpu` on the same files (end to end, after a
warm-up run each), float32 and float64 Grams, and checks every result against the float64 reference
(bench/reference.py, over cka-analyze's own minibatches). Beside each CUDA row it reports the minibatch loop
time (the result's ``read_wait + compute``), the host-to-device rate that loop achieved (the bytes of every
minibatch's rows over the loop time) against the pinned-copy bandwidth measured in the same run, and the
fixed cost a command pays before it can start (interpreter, ``import torch``, CUDA initialisation). Also
measures the GPU's float32 and float64 GEMM rate to put the CUDA time next to its floor. The issue-19
targets (end to end <= 2.0 s, loop >= 60% of the pinned-copy bandwidth, max error <= 1e-8 float32 and
1e-15 float64) are recorded as met or not; missing one is a result, not a failure of this script.
Needs only cka-offline's environment (no peers):

    python bench/bench_gpu.py [--quick | --smoke] [--workload W|H] [--dry-run]

``--dry-run`` on a machine without CUDA still generates the workload and runs the CPU rows and the reference
(the CUDA rows are skipped); the result says ``skipped`` so the report keeps its GPU section as it was.
bench/gpu_check.sh runs this on the device machine with everything else issue 19 asks for.

On a machine where cka-offline is not installed, run it from the repository root with the source on the path:
``PYTHONPATH=. python bench/bench_gpu.py`` (needs torch with CUDA, numpy, h5py, click, pluggy).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import reference as ref

import benchlib as bl

TARGETS = {"end_to_end_s": 2.0, "h2d_fraction": 0.6, "max_err_float32": 1e-8, "max_err_float64": 1e-15}


def cuda_rate(dtype: str, size: int = 8192) -> float:
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


def h2d_bandwidth(mbytes: int) -> dict[str, float]:
    """Host-to-device copy rate in bytes/s of one ``mbytes`` MiB buffer, pinned and pageable, best of 5
    (CUDA events around each copy, after a warm-up copy)."""
    import torch

    n = mbytes * 2**20 // 4
    dev = torch.empty(n, dtype=torch.float32, device="cuda")
    out = {}
    for kind, pinned in (("pinned", True), ("pageable", False)):
        host = torch.rand(n, dtype=torch.float32, pin_memory=pinned)  # random: never time zeros
        dev.copy_(host, non_blocking=pinned)
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dev.copy_(host, non_blocking=pinned)
            stop.record()
            stop.synchronize()
            best = min(best, start.elapsed_time(stop) / 1e3)
        out[f"{kind}_Bps"] = n * 4 / best
        del host
    return out


def startup_seconds(runs: int = 2) -> float:
    """Wall time of a fresh interpreter that imports torch and initialises CUDA: the fixed cost any
    ``cka-analyze --device cuda`` pays unless it overlaps that with opening the files (best of ``runs``)."""
    code = "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()"
    return min(bl.run([sys.executable, "-c", code]).seconds for _ in range(runs))


def read_into_cache(paths: list[str]) -> dict[str, float]:
    """Read every file once (so the timed runs read from the page cache); bytes and seconds of that read."""
    t0 = time.perf_counter()
    nbytes = 0
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(64 * 2**20):
                nbytes += len(chunk)
    return {"bytes": nbytes, "seconds": time.perf_counter() - t0}


def workload(args: argparse.Namespace) -> tuple[bl.Spec, str]:
    size = bl.size_of(args)
    if args.workload == "W" or size != "full":
        return bl.spec(size), size
    try:
        return bl.spec(args.workload), args.workload
    except ValueError as e:
        raise SystemExit(f"workload {args.workload!r} is not defined in bench/benchlib.py ({e})") from None


def reference_of(rows_h5: Any, n_layers: int, res: Any) -> tuple[np.ndarray | None, str]:
    try:
        return ref.minibatch_cka(rows_h5, n_layers, bl.analyze_plan(res)), ""
    except (ImportError, AttributeError, KeyError) as e:  # the plan's helper moved: report, don't crash
        return None, f"float64 reference unavailable: {type(e).__name__}: {e}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.common_args(p)
    p.add_argument("--runs", type=int, default=2, help="timed CUDA runs per precision (best kept)")
    p.add_argument("--cpu-runs", type=int, default=1, help="timed CPU runs per precision (best kept; 0: no CPU rows)")
    p.add_argument("--workload", default="W", help="W (default) or another name bench/benchlib.spec knows (H)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="without CUDA: still generate the workload and run the CPU rows and the reference",
    )
    args = p.parse_args()
    import torch

    s, size = workload(args)
    name = "gpu" if args.workload == "W" else f"gpu-{args.workload}"
    on_cuda = torch.cuda.is_available()
    if not on_cuda:
        reason = f"no CUDA device (torch {torch.__version__})"
        print(f"{reason}: skipping the GPU benchmark" + (" (dry run: CPU rows only)" if args.dry_run else ""))
        existing = (Path(args.results_dir) if args.results_dir else bl.RESULTS) / f"{name}.json"
        if existing.exists() and not json.loads(existing.read_text()).get("skipped"):
            print(f"keeping {existing}, measured on a machine with CUDA")
            return 0
        if not args.dry_run:
            bl.write_result(name, {"size": size, "skipped": reason}, args.results_dir)
            return 0
    directory = bl.data_dir(args, s.name.split()[0] + "-" + size)
    t0 = time.perf_counter()
    files = bl.materialize(s, directory, h5=True, npy=False)
    generated_s = time.perf_counter() - t0
    cache = read_into_cache(files["h5"])
    print(
        f"workload {s.name}: {cache['bytes'] / 1e9:.2f} GB in {len(files['h5'])} files "
        f"(made or reused in {generated_s:.1f} s, read into the page cache in {cache['seconds']:.1f} s)"
    )
    rows_h5, n_layers = ref.h5_rows(files["h5"])
    runs = 1 if args.smoke else args.runs
    cpu_runs = min(args.cpu_runs, 1) if args.smoke else args.cpu_runs
    devices = [("cuda", runs)] * on_cuda + [("cpu", cpu_runs)] * (cpu_runs > 0)
    bandwidth = h2d_bandwidth(64 if args.smoke else 1024) if on_cuda else {}
    startup = startup_seconds() if on_cuda else None
    if on_cuda:
        print(
            f"host to device: pinned {bandwidth['pinned_Bps'] / 1e9:.1f} GB/s, pageable "
            f"{bandwidth['pageable_Bps'] / 1e9:.1f} GB/s; python + import torch + CUDA init {startup:.2f} s"
        )
    want, note = None, ""
    ab = np.s_[: len(s.widths_a), len(s.widths_a) :]
    rows = []
    for device, n_runs in devices:
        for precision in ("float32", "float64"):
            out = str(directory / f"gpu-{device}-{precision}.json")
            if not args.smoke:
                bl.run_analyze(files["h5"], out, m=s.m, device=device, precision=precision, extra=["--quiet"])
            timed = [
                bl.run_analyze(files["h5"], out, m=s.m, device=device, precision=precision, extra=["--quiet"])
                for _ in range(n_runs)
            ]
            run, res = min(timed, key=lambda t: t[0].seconds)
            if want is None and not note:
                want, note = reference_of(rows_h5, n_layers, res)
                if note:
                    print(note)
            timing = dict(res.timing)
            loop = (timing.get("compute") or 0.0) + (timing.get("read_wait") or 0.0)
            epochs = int(res.params.get("epochs", 1))
            h2d_bytes = 4 * s.n * epochs * s.total_width  # the files are float32; each row goes over once an epoch
            row = {
                "device": device,
                "precision": precision,
                "seconds": run.seconds,
                "all_seconds": [t[0].seconds for t in timed],
                "compute_s": timing.get("compute"),
                "read_wait_s": timing.get("read_wait"),
                "loop_s": loop,
                "timing": timing,
                "max_rss_mb": run.max_rss_mb,
                # the reported pairs (A against B): the within-file ones are not computed by default (NaN)
                "max_err": bl.max_abs(res.cka[ab], want[ab]) if want is not None else None,
                "nan": bool(np.isnan(res.cka[ab]).any()),
            }
            if device == "cuda":
                row["h2d_bytes"] = h2d_bytes
                row["h2d_Bps"] = h2d_bytes / loop if loop > 0 else None
                row["h2d_fraction_of_pinned"] = row["h2d_Bps"] / bandwidth["pinned_Bps"] if row["h2d_Bps"] else None
            rows.append(row)
            err = f"{row['max_err']:.1e}" if row["max_err"] is not None else "n/a"
            extra = (
                f", {row['h2d_Bps'] / 1e9:.1f} GB/s to the device = {row['h2d_fraction_of_pinned']:.0%} of pinned"
                if row.get("h2d_Bps")
                else ""
            )
            print(
                f"{device:4s} {precision}: {run.seconds:7.2f} s end to end, loop {loop:.3f} s "
                f"({row['compute_s']:.3f} compute + {row['read_wait_s']:.3f} waiting){extra}; "
                f"max |CKA - float64 reference| = {err}"
            )
    common = {
        "size": size,
        "workload": s.describe(),
        "generate_s": generated_s,
        "page_cache_read": cache,
        "reference_note": note,
    }
    if not on_cuda:
        bl.write_result(
            name,
            {**common, "skipped": f"no CUDA device (torch {torch.__version__}); dry run", "dry_run": {"rows": rows}},
            args.results_dir,
        )
        return 0
    from cka_offline.analysis import batch_sizes

    widths = list(s.widths_a) + list(s.widths_b)
    flops = sum(2.0 * b * b * sum(widths) + 2.0 * len(widths) ** 2 * b * b for b in batch_sizes(s.n, s.m))
    rates = {dt: cuda_rate(dt, 2048 if args.smoke else 8192) for dt in ("float32", "float64")}
    by = {(r["device"], r["precision"]): r for r in rows}
    cuda32, cuda64 = by[("cuda", "float32")], by[("cuda", "float64")]
    targets = {
        "end_to_end_s": {"target": TARGETS["end_to_end_s"], "value": cuda32["seconds"]},
        "h2d_fraction": {"target": TARGETS["h2d_fraction"], "value": cuda32["h2d_fraction_of_pinned"]},
        "max_err_float32": {"target": TARGETS["max_err_float32"], "value": cuda32["max_err"]},
        "max_err_float64": {"target": TARGETS["max_err_float64"], "value": cuda64["max_err"]},
    }
    for key, t in targets.items():
        v = t["value"]
        t["met"] = None if v is None else bool(v >= t["target"] if key == "h2d_fraction" else v <= t["target"])
    print(
        "targets: "
        + ", ".join(
            f"{k} {t['value']} vs {t['target']}: {'met' if t['met'] else 'NOT met'}" for k, t in targets.items()
        )
    )
    bl.write_result(
        name,
        {
            **common,
            "gpu": torch.cuda.get_device_name(0),
            "rows": rows,
            "h2d_bandwidth_Bps": bandwidth,
            "startup_s": startup,
            "targets": targets,
            "cuda_gemm_rate_flops": rates,
            "flops": flops,
            "cuda_floor_s": {dt: flops / rates[dt] for dt in rates},
            "speedup_cuda_vs_cpu": {
                dt: by[("cpu", dt)]["seconds"] / by[("cuda", dt)]["seconds"] for dt in rates if ("cpu", dt) in by
            },
            "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        },
        args.results_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
