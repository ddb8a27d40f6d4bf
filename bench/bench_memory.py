"""Question 4: is memory flat? Peak RSS of `cka-analyze` as n grows, and of `cka-extract` as the inputs grow.

- `cka-analyze` on W with n = 8192 and n = 65536 (same layers, 8x the rows: 1.3 GB and 10.6 GB of files);
  the target is the large run within 10% of the small one.
- `cka-extract` (PyTorch plugin, bench/cnn.py, 8 layers, ``--reduction mean``) on 1k, 4k and 16k inputs
  (an uncompressed .npz of 3 x 32 x 32 float32 images: 12 KiB per input).

Peak RSS is each child process's own ``ru_maxrss`` (``os.wait4``), so it includes the Python interpreter and
torch (a few hundred MB) and is measured, not sampled.

    python bench/bench_memory.py [--quick | --smoke] [--n-large N]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import benchlib as bl

BENCH = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.common_args(p)
    p.add_argument("--n-large", type=int, help="the large n for cka-analyze (default 65536; --quick 16384)")
    p.add_argument("--keep-data", action="store_true", help="keep the large copy of W")
    args = p.parse_args()
    size = bl.size_of(args)
    s = bl.spec(size)
    n_large = args.n_large or {"full": 65536, "quick": 16384, "smoke": 1024}[size]
    analyze_rows = []
    for n in (s.n, n_large):
        sn = s.with_n(n)
        suffix = "" if n == s.n else f"-n{n}"
        directory = bl.data_dir(args, s.name.split()[0] + "-" + size + suffix)
        need = 4 * n * sn.total_width / 2**30
        if bl.disk_free_gb(directory) < need + 2:
            print(f"skipping n={n}: needs {need:.1f} GiB of disk")
            continue
        files = bl.materialize(sn, directory, h5=True, npy=False)
        run, res = bl.run_analyze(files["h5"], str(directory / "memory-result.json"), m=s.m, extra=["--quiet"])
        analyze_rows.append(
            {
                "n": n,
                "file_gb": need * 2**30 / 1e9,
                "max_rss_mb": run.max_rss_mb,
                "seconds": run.seconds,
                "minibatches": res.n_minibatches,
            }
        )
        print(f"cka-analyze n={n:6d}: peak RSS {run.max_rss_mb:7.0f} MB ({run.seconds:.1f} s)")
        if n != s.n and not args.keep_data and not args.data_dir:
            shutil.rmtree(directory, ignore_errors=True)
    flat = (analyze_rows[-1]["max_rss_mb"] / analyze_rows[0]["max_rss_mb"]) if len(analyze_rows) == 2 else None

    sys.path.insert(0, str(BENCH))
    import cnn

    directory = bl.data_dir(args, "extract-" + size)
    directory.mkdir(parents=True, exist_ok=True)
    base = {"full": 1024, "quick": 512, "smoke": 64}[size]
    extract_rows = []
    for n in (base, 4 * base) if args.smoke else (base, 4 * base, 16 * base):
        inputs = directory / f"x{n}.npz"
        if not inputs.exists():
            cnn.write_inputs(str(inputs), n)
        out = directory / f"memory-{n}.h5"
        run = bl.run(
            [
                *bl.cli("cka-extract"),
                f"{BENCH / 'cnn.py'}:make_model",
                "-i",
                str(inputs),
                "-o",
                str(out),
                "--layers",
                ",".join(cnn.LAYERS),
                "--reduction",
                "mean",
                "--overwrite",
                "--quiet",
            ]
        )
        out.unlink(missing_ok=True)
        extract_rows.append(
            {"n": n, "inputs_mb": inputs.stat().st_size / 1e6, "max_rss_mb": run.max_rss_mb, "seconds": run.seconds}
        )
        print(
            f"cka-extract n={n:6d} ({inputs.stat().st_size / 1e6:6.0f} MB of inputs): peak RSS {run.max_rss_mb:7.0f} MB"
        )
    bl.write_result(
        "memory",
        {
            "size": size,
            "workload": s.describe(),
            "analyze": analyze_rows,
            "analyze_rss_ratio": flat,
            "analyze_target_met": None if flat is None else flat <= 1.10,
            "extract": extract_rows,
            "extract_rss_ratio": extract_rows[-1]["max_rss_mb"] / extract_rows[0]["max_rss_mb"],
        },
        args.results_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
