"""Question 1: how fast is `cka-analyze` on workload W, against the minibatch CKA of the peers a user would pick?

Writes W once (HDF5 for cka-analyze, per-layer .npy for the peers), warms the page cache, then for each peer
runs `cka-analyze` end to end (a subprocess, as a user runs it: start-up, reading the files, hashing them,
the analysis, writing the result) immediately followed by the peer's own loop in the peers' venv on the same
activations (timed inside the runner: constructor + loop), so each ratio comes from back-to-back runs on a
noisy machine. A peer too slow for the whole of W runs its first ``--max-batches`` minibatches and its time
is extrapolated per minibatch (reported as such).

    python bench/bench_speed.py [--quick | --smoke] [--rounds R] [--slow-peer-batches K]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import benchlib as bl

PEERS = ("ckatorch", "torch-cka", "pytorch-cka", "cka-pytorch")
#: peers whose per-minibatch cost makes the whole of W take minutes: run a prefix and extrapolate
SLOW = ("ckatorch",)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.common_args(p)
    p.add_argument("--rounds", type=int, default=1, help="pairs (cka-analyze, peer) per peer; the median ratio is kept")
    p.add_argument(
        "--slow-peer-batches", type=int, default=8, help="minibatches the slow peers (ckatorch) run on full W; 0 = all"
    )
    p.add_argument("--peers", help="comma-separated subset of the peers (default: all; --smoke: pytorch-cka)")
    args = p.parse_args()
    if args.peers is None:
        args.peers = "pytorch-cka" if args.smoke else ",".join(PEERS)
    size = bl.size_of(args)
    s = bl.spec(size)
    directory = bl.data_dir(args, s.name.split()[0] + "-" + size)
    files = bl.materialize(s, directory, h5=True, npy=True)
    manifest = bl.write_manifest(directory, s, files["npy"])
    n_batches = len(bl.sequential_batches(s.n, s.m))
    out = str(directory / "speed-result.json")

    print(
        f"workload {s.name}: {s.total_width} features over {len(s.widths_a) + len(s.widths_b)} layers, n={s.n}, m={s.m}"
    )
    if not args.smoke:
        bl.run_analyze(files["h5"], out, m=s.m, extra=["--quiet"])  # warm the page cache and the imports

    ok, why = bl.peers_available()
    if not ok:
        print(f"skipping the peers: {why}")
    rows = []
    for peer in [q for q in args.peers.split(",") if q] if ok else []:
        limit = args.slow_peer_batches if (peer in SLOW and size == "full" and args.slow_peer_batches) else None
        pairs = []
        for _ in range(args.rounds):
            run, result = bl.run_analyze(files["h5"], out, m=s.m, extra=["--quiet"])
            info = bl.run_peer(peer, manifest, str(directory / f"speed-{peer}.npy"), m=s.m, max_batches=limit)
            if not info.get("ok"):
                rows.append({"peer": peer, "version": info.get("version"), "ok": False, "error": info.get("error")})
                break
            estimated = info["seconds"] * n_batches / info["batches"]
            analysis = result.timing.get("total", float("nan"))  # opening the files to the result, in-process
            pairs.append(
                {
                    "analyze_s": run.seconds,
                    "analyze_compute_s": result.timing.get("compute"),
                    "analyze_analysis_s": analysis,
                    "peer_s_measured": info["seconds"],
                    "peer_batches": info["batches"],
                    "peer_s": estimated,
                    "ratio": estimated / run.seconds,
                    "ratio_in_process": estimated / analysis,
                }
            )
            print(
                f"  {peer:12s} {estimated:8.2f} s{' (extrapolated)' if limit else ''}   "
                f"cka-analyze {run.seconds:6.2f} s   ratio {estimated / run.seconds:6.2f}"
            )
        if pairs:
            mid = sorted(pairs, key=lambda q: q["ratio"])[len(pairs) // 2]
            rows.append(
                {
                    "peer": peer,
                    "version": info["version"],
                    "torch": info["torch"],
                    "ok": True,
                    "extrapolated": bool(limit),
                    "batches_run": info["batches"],
                    "batches_total": n_batches,
                    **mid,
                    "ratios": [q["ratio"] for q in pairs],
                }
            )
    if not rows or not any(r.get("ok") for r in rows):
        run, result = bl.run_analyze(files["h5"], out, m=s.m, extra=["--quiet"])
    alone = {
        "seconds": run.seconds,
        "timing": result.timing,
        "max_rss_mb": run.max_rss_mb,
        "minibatches": result.n_minibatches,
    }
    bl.write_result(
        "speed",
        {
            "size": size,
            "workload": s.describe(),
            "analyze": alone,
            "peers": rows,
            "median_ratio": {r["peer"]: r["ratio"] for r in rows if r.get("ok")},
            "analyze_command": " ".join(
                bl.analyze_cmd(["a.h5", "b.h5"], "result.json", m=s.m, extra=["--quiet"])[-14:]
            ),
            "note": "peer seconds exclude Python start-up and imports; cka-analyze seconds include them",
            "peers_skipped": None if ok else why,
        },
        args.results_dir,
    )
    if rows:
        print(
            "median ratio peer/cka-analyze:",
            {r["peer"]: round(r["ratio"], 2) for r in rows if r.get("ok")},
            "(all pairs:",
            statistics.median([x for r in rows if r.get("ok") for x in r["ratios"]]),
            ")",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
