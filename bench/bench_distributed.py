"""Scale-out: how much faster is `cka-analyze` on 2 processes (torchrun, gloo) than on 1, one thread each?

Workload: two files of 6 layers x 1024 features, n = 8192 examples, minibatch m = 256 (32 minibatches;
each process computes 16). Each round runs, back to back on the same warm page cache:

    one: cka-analyze a.h5 b.h5 -m 256 --device cpu                                   (1 process)
    two: python -m torch.distributed.run --standalone --nproc-per-node 2 -m cka_offline.cli.analyze ...

with OMP_NUM_THREADS=MKL_NUM_THREADS=1 (one compute thread per process), and the median of the rounds is
kept. Two times are reported: the *analysis* (the result's own ``timing.total``: opening the files to the
summed result, rank 0's clock, including the wait for the other rank and the all-reduce) and *end to end*
(the command's wall time, including Python and torch start-up and, for two, the torchrun launcher and the
rendezvous). The ideal speed-up is 2x on 2 idle cores; the two results must agree to float64 rounding.

One process is not one core: its reader threads (reading and gathering minibatches) and the file hashing
run beside the compute thread, so unpinned it already uses part of the second core. The baseline is
therefore also run pinned to one core (``taskset -c 0``, where taskset exists): "2 processes over 1 core"
is the scaling per core, "over 1 process" what a user sees. CPU seconds (user + system, of the command and
its children) and the load average before and after are recorded, and so is what the machine allows at
that moment: a 1-thread Gram loop (m x d at the workload's shape) timed alone and as two copies at once,
``2 * alone / pair`` (2 on two idle cores, 1 when someone else holds the second core). On a shared machine
that ceiling, not 2, is what the speed-up should be read against.

    python bench/bench_distributed.py [--quick | --smoke] [--rounds R] [--batch-size M]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys

import benchlib as bl


def _spec(size: str) -> bl.Spec:
    if size == "smoke":
        return bl.Spec("scale-out smoke", (32, 48), (40, 24), 256, 32)
    if size == "quick":
        return bl.Spec("scale-out quick", (512,) * 6, (512,) * 6, 4096, 256)
    return bl.Spec("scale-out", (1024,) * 6, (1024,) * 6, 8192, 256)


def _torchrun(files: list[str], output: str, m: int, procs: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(procs),
        "-m",
        "cka_offline.cli.analyze",
        *files,
        "-o",
        output,
        "-m",
        str(m),
        "--device",
        "cpu",
        "--overwrite",
        "--quiet",
    ]


_GEMM = """
import time, torch
torch.set_num_threads(1)
x = torch.randn({m}, {d})
for _ in range(3):
    x @ x.T
t = time.perf_counter()
for _ in range({reps}):
    x @ x.T
print(time.perf_counter() - t)
"""


def gemm_ceiling(m: int, d: int, reps: int, env: dict[str, str]) -> dict[str, float]:
    """What the machine allows right now: a 1-thread Gram loop alone, then two copies at once. The speed-up
    two processes can reach is ``2 * alone / pair`` (2 on two idle cores; 1 when the second core is taken
    by someone else, or is a hyperthread of the first)."""
    import subprocess

    code = _GEMM.format(m=m, d=d, reps=reps)
    alone = float(
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    pair = [float(proc.communicate()[0]) for proc in procs]
    return {"alone": alone, "pair": max(pair), "ceiling": 2 * alone / max(pair)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.common_args(p)
    p.add_argument(
        "--rounds",
        type=int,
        help="pairs (1 process, 2 processes); the medians are kept (default 3, --quick 2, --smoke 1)",
    )
    p.add_argument(
        "--batch-size",
        "-m",
        type=int,
        help="minibatch size (default 256; the Grams' cost grows as m^2, "
        "so a larger m is more GEMM-bound); the result goes to distributed-mM.json",
    )
    args = p.parse_args()
    size = bl.size_of(args)
    rounds = args.rounds or {"full": 3, "quick": 2, "smoke": 1}[size]
    s = _spec(size)
    directory = bl.data_dir(args, "distributed-" + size)
    files = bl.materialize(s, directory, h5=True)["h5"]  # the same files whatever the minibatch size
    if args.batch_size:
        s = bl.Spec(s.name, s.widths_a, s.widths_b, s.n, args.batch_size, s.seed)
    one_out, two_out = str(directory / "one.json"), str(directory / "two.json")
    env = bl.child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CKA_DIST_TIMEOUT="600")
    print(f"workload {s.name}: {len(s.widths_a) + len(s.widths_b)} layers, {s.total_width} features, n={s.n}, m={s.m}")

    from cka_offline.results import load_result

    one_cmd = bl.analyze_cmd(files, one_out, m=s.m, extra=["--quiet"])
    configs = {"one": one_cmd, "two": _torchrun(files, two_out, s.m, 2)}
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        configs["one_pinned"] = ["taskset", "-c", "0", *one_cmd]
    outputs = {"one": one_out, "one_pinned": one_out, "two": two_out}
    if size != "smoke":
        bl.run(one_cmd, env=env)  # warm the page cache and the imports
    reps = 2 if size == "smoke" else 40
    ceiling_before = gemm_ceiling(s.m, max(s.widths_a), reps, env)
    load_before = os.getloadavg()
    rows = []
    for r in range(rounds):
        row: dict[str, float | int] = {"round": r}
        results = {}
        for name, cmd in configs.items():
            cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            run = bl.run(cmd, env=env)
            cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            results[name] = load_result(outputs[name])
            row[f"{name}_wall"] = run.seconds
            row[f"{name}_analysis"] = results[name].timing["total"]
            row[f"{name}_cpu"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        row["max_abs_cka_diff"] = bl.max_abs(results["one"].cka, results["two"].cka)
        row["max_abs_se_diff"] = bl.max_abs(results["one"].se, results["two"].se)
        rows.append(row)
        print(
            f"round {r}: "
            + ", ".join(
                f"{name} {row[f'{name}_wall']:.2f} s (analysis {row[f'{name}_analysis']:.2f} s, cpu {row[f'{name}_cpu']:.2f} s)"
                for name in configs
            )
            + f", max |CKA diff| {row['max_abs_cka_diff']:.1e}"
        )
    load_after = os.getloadavg()
    ceiling_after = gemm_ceiling(s.m, max(s.widths_a), reps, env)
    keys = [f"{name}_{what}" for name in configs for what in ("wall", "analysis", "cpu")]
    med = {k: statistics.median(row[k] for row in rows) for k in keys}
    summary = {
        "speedup_analysis": med["one_analysis"] / med["two_analysis"],
        "speedup_end_to_end": med["one_wall"] / med["two_wall"],
        "ideal": 2.0,
        "launch_overhead_two": med["two_wall"] - med["two_analysis"],
        "launch_overhead_one": med["one_wall"] - med["one_analysis"],
        "max_abs_cka_diff": max(row["max_abs_cka_diff"] for row in rows),
        "max_abs_se_diff": max(row["max_abs_se_diff"] for row in rows),
        "n_minibatches": results["one"].n_minibatches,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "gemm_ceiling_before": ceiling_before,
        "gemm_ceiling_after": ceiling_after,
        **{f"median_{k}": v for k, v in med.items()},
    }
    if "one_pinned" in configs:
        summary["speedup_analysis_over_one_core"] = med["one_pinned_analysis"] / med["two_analysis"]
        summary["speedup_end_to_end_over_one_core"] = med["one_pinned_wall"] / med["two_wall"]
    print(
        f"speed-up of 2 processes over 1: analysis {summary['speedup_analysis']:.2f}x, end to end "
        f"{summary['speedup_end_to_end']:.2f}x (ideal 2x)"
        + (
            f"; over 1 process pinned to 1 core: analysis {summary['speedup_analysis_over_one_core']:.2f}x"
            if "one_pinned" in configs
            else ""
        )
        + f"; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; what the machine allowed "
        f"(2 Gram loops at once): {ceiling_before['ceiling']:.2f}x before, {ceiling_after['ceiling']:.2f}x after"
    )
    bl.write_result(
        "distributed" if not args.batch_size else f"distributed-m{s.m}",
        {
            "size": size,
            "workload": s.describe(),
            "rounds": rows,
            "summary": summary,
            "threads_per_process": 1,
            "backend": "gloo",
            "launcher": "python -m torch.distributed.run --standalone",
        },
        args.results_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
