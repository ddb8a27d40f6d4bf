"""Workload H: hundreds of layers. Two models of 150 mean-pooled layers each (widths 64..2048, many narrow
early layers and fewer wide late ones), n = 16,384, m = 256: 5.1 GB of float32 activations, written once
(reused while the workload is unchanged) under --data-dir.

Per minibatch of ``b`` examples, with ``D`` the total width and ``L`` the stacked layers (300):

  Grams:       2 b^2 D FLOPs (general products; float32)
  pair terms:  2 b^2 P + 2 L^2 b FLOPs (float64): P = |A| |B| + L entries whose tr(K~_i K~_j) is computed --
               A against B and every layer's self term (the default) -- or P = L^2 with --all-pairs

Both are timed end to end (``cka-analyze a.h5 b.h5 -m 256 --device cpu``, files in the page cache after a
warm-up run, the best of ``--runs`` interleaved) against floor = Gram FLOPs / float32 GEMM rate + pair FLOPs
/ rate, with the GEMM rate of a square product measured in the same run (the best of torch and numpy):
``floor_s`` takes the pair terms at the float64 rate (they are float64 products), ``floor_f32_s`` at the
float32 rate (bench_floor.py's convention; the target is against it). Memory: the peak anonymous resident
memory (``RssAnon``, sampled every 20 ms: the memory-mapped file pages, which the kernel can drop, are not
in it) of the default run at n and at n / 4 -- bounded independently of n when the two agree.

    python bench/bench_hundreds.py [--quick | --smoke] [--runs R] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import benchlib as bl

VARIANTS = {"requested": [], "all_pairs": ["--all-pairs"]}
TARGET = 1.5


def run_sampled(cmd: list[str]) -> dict[str, float]:
    """``cmd``'s wall seconds and peak anonymous RSS (MiB), sampled from /proc every 20 ms."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=bl.child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    status = f"/proc/{proc.pid}/status"
    while proc.poll() is None:
        try:
            with open(status) as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]))
                        break
        except OSError:
            pass
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-4000:]}")
    return {"seconds": seconds, "anon_rss_mb": peak / 1024.0}


def flops(s: bl.Spec, sizes: list[int]) -> dict[str, float]:
    widths = [*s.widths_a, *s.widths_b]
    n_layers, n_a, n_b = len(widths), len(s.widths_a), len(s.widths_b)
    cross = sum(2.0 * n_layers**2 * b for b in sizes)  # the 1'K~L~1 terms, all pairs (cheap)
    return {
        "gram": sum(2.0 * b * b * sum(widths) for b in sizes),
        "requested": sum(2.0 * b * b * (n_a * n_b + n_layers) for b in sizes) + cross,
        "all_pairs": sum(2.0 * b * b * n_layers**2 for b in sizes) + cross,
    }


def breakdown(s: bl.Spec, minibatches: int, repeats: int) -> dict[str, float]:
    """Where the loop's time goes, in this process on random data of H's shapes, scaled to the run's
    minibatches: every layer's float32 Gram (gram_linear, as the loop computes it) on one core with
    single-threaded BLAS, and the HSIC terms of one minibatch (hsic1_matrix on the (L, m, m) float64 Grams,
    BLAS on all cores) with the reported pairs' blocks and with all pairs."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from cka_offline.analysis.loop import pair_blocks
    from cka_offline.cka.hsic import gram_linear, hsic1_matrix

    widths = [*s.widths_a, *s.widths_b]
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((s.m, w)).astype(np.float32) for w in widths]
    grams = rng.standard_normal((len(widths), s.m, s.m))
    grams += grams.transpose(0, 2, 1)

    def best(fn: Any) -> float:
        out = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t0)
        return out

    with threadpool_limits(1, user_api="blas"):
        gram_s = best(lambda: [gram_linear(x.copy(), dtype="float32", inplace=True) for x in xs])
    blocks = pair_blocks([len(s.widths_a), len(s.widths_b)])
    hsic_req = best(lambda: hsic1_matrix(grams.copy(), overwrite=True, blocks=blocks))
    hsic_all = best(lambda: hsic1_matrix(grams.copy(), overwrite=True))
    copy_s = best(grams.copy)  # the copies above are part of the timed calls: subtract them
    return {
        "grams_one_core_s": gram_s * minibatches,
        "hsic_requested_s": max(0.0, hsic_req - copy_s) * minibatches,
        "hsic_all_pairs_s": max(0.0, hsic_all - copy_s) * minibatches,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.common_args(p)
    p.add_argument("--runs", type=int, default=2, help="timed runs of each variant after the warm-up (best kept)")
    p.add_argument("--breakdown", nargs=3, metavar=("SIZE", "MINIBATCHES", "REPEATS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.breakdown:  # the child process of the breakdown: prints it as JSON
        name, minibatches, repeats = args.breakdown
        print(json.dumps(breakdown(bl.spec(name), int(minibatches), int(repeats))))
        return 0
    size = {"full": "H", "quick": "H-quick", "smoke": "H-smoke"}[bl.size_of(args)]
    s = bl.spec(size)
    small = s.with_n(s.n // 4)
    directory = bl.data_dir(args, size)
    need = 4.0 * (s.n + small.n) * s.total_width / 2**30
    free = bl.disk_free_gb(directory.parent)
    if free < 1.1 * need:
        raise SystemExit(f"workload {size} needs {need:.1f} GiB under {directory.parent}, {free:.1f} GiB free")
    t0 = time.perf_counter()
    files = bl.materialize(s, directory, h5=True, npy=False)["h5"]
    files_small = bl.materialize(small, bl.data_dir(args, size + "-quarter"), h5=True, npy=False)["h5"]
    generated = time.perf_counter() - t0
    print(f"workload {s.name}: {4 * s.n * s.total_width / 1e9:.2f} GB ({generated:.0f} s to make or reuse)")
    out = str(directory / "hundreds-result.json")
    base = bl.analyze_cmd(files, out, m=s.m, extra=["--quiet"])
    runs = 1 if args.smoke else args.runs
    if not args.smoke:
        run_sampled(base)  # warm-up: page cache, imports
    timings: dict[str, Any] = {name: [] for name in VARIANTS}
    results: dict[str, Any] = {}
    from cka_offline.results import load_result

    for _ in range(runs):
        for name, extra in VARIANTS.items():  # interleaved: both see the same machine state
            row = run_sampled(base + extra)
            res = load_result(out)
            row.update(compute_s=res.timing.get("compute"), read_wait_s=res.timing.get("read_wait"))
            timings[name].append(row)
            results[name] = res
    small_out = str(directory / "hundreds-quarter.json")
    memory_small = run_sampled(bl.analyze_cmd(files_small, small_out, m=s.m, extra=["--quiet"]))

    seconds = 0.2 if args.smoke else 1.0
    square = 512 if args.smoke else 2048
    rates = {
        dt: max(bl.gemm_rate(dt, (square,) * 3, seconds, lib=lib) for lib in ("torch", "numpy"))
        for dt in ("float32", "float64")
    }
    sizes = __import__("cka_offline.analysis", fromlist=["batch_sizes"]).batch_sizes(s.n, s.m)
    work = flops(s, sizes)
    # in a fresh process without torch, as cka-analyze on the CPU runs: torch's idle OpenMP threads (this
    # process measured its GEMM rate) slow numpy's BLAS threads down many times on a small machine
    probe = subprocess.run(
        [sys.executable, __file__, "--breakdown", size, str(len(sizes)), str(2 if args.smoke else 3)],
        env=bl.child_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    parts = json.loads(probe.stdout.strip().splitlines()[-1])
    print(
        f"in process, for all {len(sizes)} minibatches: Grams {parts['grams_one_core_s']:.2f} s on one core; HSIC "
        f"terms {parts['hsic_requested_s']:.2f} s (reported pairs) / {parts['hsic_all_pairs_s']:.2f} s (all pairs)"
    )
    n_a = len(s.widths_a)
    ab = (slice(0, n_a), slice(n_a, None))
    rows = []
    for name in VARIANTS:
        best = min(timings[name], key=lambda r: r["seconds"])
        floor = work["gram"] / rates["float32"] + work[name] / rates["float64"]
        floor_f32 = (work["gram"] + work[name]) / rates["float32"]
        rows.append(
            {
                "variant": name,
                "pair_flops": work[name],
                "floor_s": floor,
                "floor_f32_s": floor_f32,
                "seconds": best["seconds"],
                "compute_s": best["compute_s"],
                "read_wait_s": best["read_wait_s"],
                "anon_rss_mb": max(r["anon_rss_mb"] for r in timings[name]),
                "ratio": best["seconds"] / floor,
                "ratio_f32": best["seconds"] / floor_f32,
                "runs": timings[name],
            }
        )
        print(
            f"{name:9s}: {best['seconds']:7.2f} s ({best['compute_s']:.2f} s loop); floor {floor:.2f} s "
            f"(float32 rate for all: {floor_f32:.2f} s) -> {rows[-1]['ratio']:.2f}x ({rows[-1]['ratio_f32']:.2f}x); "
            f"peak anonymous RSS {rows[-1]['anon_rss_mb']:.0f} MiB"
        )
    diff = bl.max_abs(results["requested"].cka[ab], results["all_pairs"].cka[ab])
    nan_within = bool(results["requested"].params.get("all_pairs") is False)
    print(
        f"A-B block, requested vs all pairs: max |diff| {diff:.1e}; peak anonymous RSS at n = {small.n}: "
        f"{memory_small['anon_rss_mb']:.0f} MiB (n = {s.n}: {rows[0]['anon_rss_mb']:.0f} MiB)"
    )
    bl.write_result(
        "hundreds",
        {
            "size": size,
            "workload": s.describe(),
            "minibatches": len(sizes),
            "gram_flops": work["gram"],
            "bytes": 4.0 * s.n * s.total_width,
            "gemm_rates": rates,
            "square_gemm_n": square,
            "rows": rows,
            "max_abs_ab_diff": diff,
            "within_file_not_computed": nan_within,
            "memory_quarter": {"n": small.n, **memory_small},
            "cores": os.cpu_count(),
            "target_ratio": TARGET,
            "target_met": rows[0]["ratio_f32"] <= TARGET,
            "generated_s": generated,
            "breakdown": parts,
        },
        args.results_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
