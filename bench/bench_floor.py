"""Question 2: the hardware floor. How close does `cka-analyze` get to what this machine can do at best?

Measures, in this process: the float32/float64 GEMM rate (square 2048^3, the best of torch.matmul on torch's
default threads -- MKL here -- and numpy's BLAS -- OpenBLAS, which cka-analyze uses on the CPU -- : the
machine's best), the rate of the Gram products at W's actual shapes (m x d) @ (d x m) as a general product,
and the memory bandwidth (read and copy of 512 MiB).
Counts the work the minibatch computation must do on W:

  Grams:      2 m^2 d FLOPs per layer per minibatch (sum over layers: 2 m^2 D, D = total width)
  pair terms: 2 L^2 m^2 (tr(K~ L~) for all L^2 pairs as one GEMM) + 2 L^2 m (the 1'K~L~1 terms) per minibatch
  bytes:      every stored value read once: n D 4 (float32)

and compares `cka-analyze` end to end (start-up, files from the page cache, result written; the best of
``--runs`` after one warm-up run) against floor = FLOPs / rate and bytes / bandwidth. The GEMM floor counts
general products (2 m^2 d per Gram); a Gram is symmetric, so it needs only m (m + 1) d FLOPs (its upper
triangle): the symmetric floor counts those at the same measured GEMM rate (about half the GEMM floor).
Target: at most 1.0x the float32 GEMM floor end to end (2x the symmetric floor).

It also times, in this process and on one core as the engine runs each layer (CPU time of this thread, so
other load on the machine inflates it less), one minibatch of W's Gram products three ways: a general product
``x @ y.T`` (y a distinct buffer), numpy's syrk and GEMM tiles of the upper triangle
(cka_offline.cka.products), each written into a float64 (m, m) buffer as the engine does, and the whole
per-layer Gram of the engine (copy of the rows, centring, product): the interleaved rounds' best.

A result records the SHA-256 of both files; the warm-up run computes them and later runs reuse them for
unchanged files (cka_offline.digests). So the float32 row is also timed once with the digest cache off
(the files hashed during the run, as on the first analysis of new files) and once with ``--no-hash``.

    python bench/bench_floor.py [--quick | --smoke] [--runs R]
"""

from __future__ import annotations

import argparse
import sys
import time

import benchlib as bl


def gram_methods(widths: list[int], m: int, dtype: str, rounds: int) -> dict[str, float]:
    """CPU seconds of one minibatch of Gram products of all ``widths`` on one thread (best of ``rounds``,
    interleaved): general product, syrk, GEMM tiles of 64 rows, and the engine's per-layer Gram."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from cka_offline.analysis.grams import gram_into
    from cka_offline.cka.products import symmetric_product

    rng = np.random.default_rng(0)
    stored = [rng.standard_normal((m, d), dtype=np.float32) + 3.0 for d in widths]
    work = [x.copy() for x in stored]  # the engine's scratch: rows as stored (float32)
    rows = [x.astype(dtype) for x in stored]  # the products' inputs in the Gram's precision
    others = [x.copy() for x in rows]
    product = np.empty((m, m), dtype=dtype)
    grams = np.empty((len(widths), m, m))

    def general() -> None:
        for i, (x, y) in enumerate(zip(rows, others)):
            np.matmul(x, y.T, out=product)
            grams[i] = product

    def syrk() -> None:
        for i, x in enumerate(rows):
            symmetric_product(x, grams[i], rows=None)

    def tiles() -> None:
        for i, x in enumerate(rows):
            symmetric_product(x, grams[i], rows=64)

    def engine() -> None:
        for i, (x, w) in enumerate(zip(stored, work)):
            np.copyto(w, x)  # the gather into the task's scratch
            gram_into(grams, i, w, dtype, None)

    variants = {"general_s": general, "syrk_s": syrk, "tiles64_s": tiles, "engine_s": engine}
    best = dict.fromkeys(variants, float("inf"))
    with threadpool_limits(1, user_api="blas"):
        for _ in range(rounds):
            for name, f in variants.items():
                t = time.thread_time()
                f()
                best[name] = min(best[name], time.thread_time() - t)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.common_args(p)
    p.add_argument("--runs", type=int, default=3, help="timed cka-analyze runs after the warm-up (best kept)")
    args = p.parse_args()
    size = bl.size_of(args)
    s = bl.spec(size)
    directory = bl.data_dir(args, s.name.split()[0] + "-" + size)
    files = bl.materialize(s, directory, h5=True, npy=False)
    out = str(directory / "floor-result.json")
    runs = 1 if args.smoke else args.runs
    if not args.smoke:
        bl.run_analyze(files["h5"], out, m=s.m, extra=["--quiet"])  # warm-up: page cache, imports

    widths = list(s.widths_a) + list(s.widths_b)
    n_layers = len(widths)
    sizes = __import__("cka_offline.analysis", fromlist=["batch_sizes"]).batch_sizes(s.n, s.m)
    gram_flops = sum(2.0 * b * b * sum(widths) for b in sizes)
    symmetric_flops = sum(b * (b + 1.0) * sum(widths) for b in sizes)  # the upper triangles' dot products
    pair_flops = sum(2.0 * n_layers**2 * b * b + 2.0 * n_layers**2 * b for b in sizes)
    nbytes = 4.0 * s.n * sum(widths)

    timings = {}
    blocks_best, blocks_compute = float("inf"), float("inf")
    for precision in ("float32", "float64"):
        best, best_compute = float("inf"), float("inf")
        for _ in range(runs if precision == "float32" else 1):
            run, res = bl.run_analyze(files["h5"], out, m=s.m, precision=precision, extra=["--quiet"])
            best = min(best, run.seconds)
            best_compute = min(best_compute, res.timing.get("compute", float("nan")))
            if precision == "float32":  # the block shuffle (the plan before uniform minibatches), interleaved
                blocks, res_b = bl.run_analyze(files["h5"], out, m=s.m, extra=["--quiet", "--shuffle", "blocks"])
                blocks_best = min(blocks_best, blocks.seconds)
                blocks_compute = min(blocks_compute, res_b.timing.get("compute", float("nan")))
        timings[precision] = {"end_to_end_s": best, "compute_s": best_compute, "max_rss_mb": run.max_rss_mb}
    timings["float32"].update(end_to_end_blocks_s=blocks_best, compute_blocks_s=blocks_compute)
    rehash, _ = bl.run_analyze(files["h5"], out, m=s.m, extra=["--quiet"], env={"CKA_OFFLINE_HASH_CACHE": "0"})
    nohash, _ = bl.run_analyze(files["h5"], out, m=s.m, extra=["--quiet", "--no-hash"])
    timings["float32"].update(end_to_end_hashing_s=rehash.seconds, end_to_end_no_hash_s=nohash.seconds)

    seconds = 0.2 if args.smoke else 1.0
    square = 512 if args.smoke else 2048
    rates_by_lib = {
        lib: {dt: bl.gemm_rate(dt, (square, square, square), seconds, lib=lib) for dt in ("float32", "float64")}
        for lib in ("torch", "numpy")
    }
    rates = {dt: max(r[dt] for r in rates_by_lib.values()) for dt in ("float32", "float64")}
    gram_time = {}
    for dt in ("float32", "float64"):
        per_width = {d: bl.gram_rate(dt, s.m, d, seconds / 4) for d in sorted(set(widths))}
        gram_time[dt] = sum(2.0 * b * b * d / per_width[d] for b in sizes for d in widths)
        gram_time[dt + "_rates"] = {str(d): r for d, r in per_width.items()}
    bw = bl.memory_bandwidth(64 if args.smoke else 512)
    methods = {dt: gram_methods(widths, s.m, dt, 2 if args.smoke else 7) for dt in ("float32", "float64")}

    floors = {}
    for dt in ("float32", "float64"):
        floor_peak = (gram_flops + pair_flops) / rates[dt]
        floor_shape = gram_time[dt] + pair_flops / rates[dt]
        floor_symmetric = (symmetric_flops + pair_flops) / rates[dt]
        t = timings[dt]
        floors[dt] = {
            "gemm_rate_flops": rates[dt],
            "floor_peak_s": floor_peak,
            "floor_shapes_s": floor_shape,
            "floor_symmetric_s": floor_symmetric,
            "ratio_end_to_end_vs_peak": t["end_to_end_s"] / floor_peak,
            "ratio_end_to_end_vs_symmetric": t["end_to_end_s"] / floor_symmetric,
            "ratio_end_to_end_vs_shapes": t["end_to_end_s"] / floor_shape,
            "ratio_compute_vs_peak": t["compute_s"] / floor_peak,
            "achieved_flops_end_to_end": (gram_flops + pair_flops) / t["end_to_end_s"],
        }
        print(
            f"{dt}: GEMM {rates[dt] / 1e9:.1f} GFLOP/s, floor {floor_peak:.2f} s (at W's shapes {floor_shape:.2f} s, "
            f"symmetric {floor_symmetric:.2f} s); "
            f"cka-analyze {t['end_to_end_s']:.2f} s end to end ({t['compute_s']:.2f} s compute) = "
            f"{floors[dt]['ratio_end_to_end_vs_peak']:.2f}x the floor; one minibatch's Grams on one core: "
            + ", ".join(f"{k[:-2]} {v * 1e3:.1f} ms" for k, v in methods[dt].items())
        )
    mem_floor = nbytes / bw["read_Bps"]
    print(
        f"memory: read {bw['read_Bps'] / 1e9:.1f} GB/s, copy {bw['copy_Bps'] / 1e9:.1f} GB/s; "
        f"{nbytes / 1e9:.2f} GB to read = {mem_floor:.2f} s"
    )
    bl.write_result(
        "floor",
        {
            "size": size,
            "workload": s.describe(),
            "minibatches": len(sizes),
            "gram_flops": gram_flops,
            "symmetric_gram_flops": symmetric_flops,
            "gram_methods_s": methods,
            "pair_flops": pair_flops,
            "bytes": nbytes,
            "bandwidth": bw,
            "memory_floor_s": mem_floor,
            "square_gemm_n": square,
            "gemm_rates_by_lib": rates_by_lib,
            "gram_time_s": gram_time,
            "analyze": timings,
            "floors": floors,
            "target_ratio": 1.0,
            "target_met": floors["float32"]["ratio_end_to_end_vs_peak"] <= 1.0,
        },
        args.results_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
