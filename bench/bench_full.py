"""Do the exact full-data estimators run at the speed of the estimate? `--estimator full` / `full-debiased`
against `-m n --precision float64` (one minibatch of every example: the same n x n float64 Grams).

Workload: 1,024 examples x 30 layers (two models of 15, widths 64..2048 mixed, 18,624 features), from
benchlib's generator (both models see the same latent inputs: shared structure). For each kernel (linear,
RBF) `cka-analyze` runs end to end as a subprocess, minibatch then full then full-debiased, ``--rounds``
times; the median seconds are kept and the ratio full / minibatch printed (target: within 2x). As a check,
full-debiased must equal the one-minibatch estimate to float64 rounding (HSIC_1 of one Gram of all examples,
to whose order it is invariant).

    python bench/bench_full.py [--quick | --smoke] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import benchlib as bl

WIDTHS_A = (64, 128, 256, 512, 1024, 2048, 1024, 512, 256, 128, 64, 512, 2048, 256, 1024)
WIDTHS_B = (128, 64, 512, 256, 2048, 1024, 512, 128, 64, 1024, 256, 2048, 512, 64, 128)
ESTIMATORS = ("minibatch", "full", "full-debiased")


def workload(size: str) -> bl.Spec:
    """``full`` and ``quick``: 1,024 x 30 layers (quick runs one round); ``smoke``: 128 examples, narrow layers."""
    if size == "smoke":
        return bl.Spec(
            "full-ref smoke", tuple(w // 16 for w in WIDTHS_A[:5]), tuple(w // 16 for w in WIDTHS_B[:5]), 128, 128
        )
    return bl.Spec("full-ref", WIDTHS_A, WIDTHS_B, 1024, 1024)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.common_args(p)
    p.add_argument(
        "--rounds", type=int, help="runs of each command; the median is kept (default 3; --quick, --smoke 1)"
    )
    args = p.parse_args()
    size = bl.size_of(args)
    rounds = args.rounds or (3 if size == "full" else 1)
    s = workload(size)
    directory = bl.data_dir(args, "full-ref-" + size)
    files = bl.materialize(s, directory, h5=True)
    out = str(directory / "full-result.json")
    print(f"workload {s.name}: n={s.n}, {len(s.widths_a) + len(s.widths_b)} layers, {s.total_width} features")
    bl.run_analyze(files["h5"], out, m=s.n, precision="float64", extra=["--quiet"])  # warm the page cache

    rows = []
    for kernel in ("linear", "rbf"):
        runs: dict[str, list[dict]] = {e: [] for e in ESTIMATORS}
        results = {}
        for _ in range(rounds):
            for estimator in ESTIMATORS:  # back to back, so each ratio compares runs on the same machine state
                run, result = bl.run_analyze(
                    files["h5"],
                    out,
                    m=s.n,
                    precision="float64",
                    # the full estimators compute every pair; the minibatch run does the same work with --all-pairs
                    extra=["--quiet", "--kernel", kernel, "--estimator", estimator]
                    + (["--all-pairs"] if estimator == "minibatch" else []),
                )
                runs[estimator].append(
                    {
                        "seconds": run.seconds,
                        "analysis_s": result.timing["total"],
                        "compute_s": result.timing.get("compute"),
                        "max_rss_mb": run.max_rss_mb,
                    }
                )
                results[estimator] = result
        median = {
            e: {key: statistics.median(r[key] for r in runs[e]) for key in ("seconds", "analysis_s")}
            for e in ESTIMATORS
        }
        base = median["minibatch"]
        for estimator in ESTIMATORS[1:]:
            ratio = median[estimator]["seconds"] / base["seconds"]
            ratio_analysis = median[estimator]["analysis_s"] / base["analysis_s"]
            rows.append(
                {
                    "kernel": kernel,
                    "estimator": estimator,
                    "seconds": median[estimator]["seconds"],
                    "analysis_s": median[estimator]["analysis_s"],
                    "minibatch_seconds": base["seconds"],
                    "minibatch_analysis_s": base["analysis_s"],
                    "ratio": ratio,
                    "ratio_analysis": ratio_analysis,
                    "target_met": ratio <= 2.0,
                    "runs": runs[estimator],
                    "minibatch_runs": runs["minibatch"],
                }
            )
            print(
                f"  {kernel:6s} {estimator:13s} {median[estimator]['seconds']:6.2f} s   -m {s.n} float64 "
                f"{base['seconds']:6.2f} s   ratio {ratio:5.2f} (analysis only {ratio_analysis:5.2f})"
            )
        diff = bl.max_abs(results["full-debiased"].cka, results["minibatch"].cka)
        rows[-1]["max_abs_vs_one_minibatch"] = diff
        print(f"  {kernel:6s} full-debiased vs one minibatch of all examples: max |diff| {diff:.1e}")
    bl.write_result(
        "full",
        {
            "size": size,
            "workload": s.describe(),
            "rounds": rounds,
            "rows": rows,
            "max_ratio": max(r["ratio"] for r in rows),
            "target": "full estimators within 2x of -m n --precision float64",
            "note": "seconds: cka-analyze end to end (start-up, reading, hashing, RBF bandwidths, analysis); "
            "analysis_s: the result's timing['total'] (opening the files to the result)",
        },
        args.results_dir,
    )
    print("max ratio full / minibatch:", round(max(r["ratio"] for r in rows), 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
