"""Question 3: how accurate is every implementation against a float64 reference, on W, W x 1e-3 and W + 50?

For each variant of W (the float32 values actually stored are the input of every implementation):

- `cka-analyze` (float32 Grams, the default, and `--precision float64`): max |CKA - reference| over the whole
  stacked 24 x 24 matrix and over the A-vs-B block, the reference computed by bench/reference.py over
  cka-analyze's own minibatches (rebuilt with `plan_minibatches` from the parameters it records);
- each peer's own loop (bench/peers_runner.py, sequential unshuffled minibatches): max |CKA - reference| over
  A-vs-B, the reference over the same sequential minibatches; a peer that fails or returns NaN says so.
  On full W the peers run the first ``--peer-batches`` minibatches (default 8 = 2048 examples) to keep the run
  short; the reference is then over the same minibatches, so the comparison is exact.

    python bench/bench_accuracy.py [--quick | --smoke] [--variants none,scale1e-3,shift50]
"""

from __future__ import annotations

import argparse
import shutil
import sys

import numpy as np
import reference as ref

import benchlib as bl

VARIANTS = ("none", "scale1e-3", "shift50")
PEERS = ("ckatorch", "torch-cka", "pytorch-cka", "cka-pytorch")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.common_args(p)
    p.add_argument("--variants", help="comma-separated (default: all three; --smoke: shift50)")
    p.add_argument("--peers", help="comma-separated subset (default: all; --smoke: torch-cka)")
    p.add_argument("--peer-batches", type=int, default=8, help="minibatches the peers run on full W (0 = all)")
    p.add_argument("--keep-data", action="store_true", help="keep the scaled and shifted copies of W")
    args = p.parse_args()
    size = bl.size_of(args)
    s = bl.spec(size)
    variants = (args.variants or ("shift50" if args.smoke else ",".join(VARIANTS))).split(",")
    peers = (args.peers or ("torch-cka" if args.smoke else ",".join(PEERS))).split(",")
    ok, why = bl.peers_available()
    if not ok:
        print(f"skipping the peers: {why}")
        peers = []
    limit = args.peer_batches if (size == "full" and args.peer_batches) else None
    seq = bl.sequential_batches(s.n, s.m, limit)
    n_a = len(s.widths_a)
    out_rows = []
    for variant in variants:
        suffix = "" if variant == "none" else "-" + variant
        directory = bl.data_dir(args, s.name.split()[0] + "-" + size + suffix)
        files = bl.materialize(s, directory, transform=variant, h5=True, npy=bool(peers))
        rows_h5, n_layers = ref.h5_rows(files["h5"])
        print(f"== {variant}")
        for precision in ("float32", "float64"):
            run, res = bl.run_analyze(
                files["h5"],
                str(directory / f"acc-{precision}.json"),
                m=s.m,
                precision=precision,
                extra=["--quiet", "--all-pairs"],  # err_all: every entry, the within-file pairs too
            )
            want = ref.minibatch_cka(rows_h5, n_layers, bl.analyze_plan(res))
            row = {
                "variant": variant,
                "impl": "cka-analyze",
                "version": res.version,
                "precision": precision,
                "ok": True,
                "nan": bool(np.isnan(res.cka).any()),
                "err_all": bl.max_abs(res.cka, want),
                "err_ab": bl.max_abs(res.cka[:n_a, n_a:], want[:n_a, n_a:]),
                "batches": res.n_minibatches,
            }
            out_rows.append(row)
            print(f"  cka-analyze {precision}: max err {row['err_all']:.2e} (A-B {row['err_ab']:.2e})")
        if peers:
            rows_npy = ref.npy_rows(files["npy"]["a"] + files["npy"]["b"])
            want = ref.minibatch_cka(rows_npy, n_layers, seq)[:n_a, n_a:]
            last = ref.minibatch_cka(rows_npy, n_layers, seq[-1:])[:n_a, n_a:]
            manifest = bl.write_manifest(directory, s, files["npy"])
            for peer in peers:
                info = bl.run_peer(peer, manifest, str(directory / f"acc-{peer}.npy"), m=s.m, max_batches=limit)
                row = {
                    "variant": variant,
                    "impl": peer,
                    "version": info.get("version"),
                    "precision": "float32" if peer != "ckatorch" else "float64",
                    "ok": bool(info.get("ok")),
                    "batches": info.get("batches"),
                }
                if info.get("ok"):
                    got = np.load(str(directory / f"acc-{peer}.npy"))
                    row.update(
                        nan=bool(np.isnan(got).any()),
                        err_ab=bl.max_abs(got, want),
                        err_ab_vs_last_batch=bl.max_abs(got, last),
                    )
                    print(f"  {peer}: max err {row['err_ab']:.2e}" + (" NaN!" if row["nan"] else ""))
                else:
                    row["error"] = info.get("error")
                    print(f"  {peer}: FAILED {row['error']}")
                out_rows.append(row)
        if variant != "none" and not args.keep_data and not args.data_dir:
            shutil.rmtree(directory, ignore_errors=True)
    bl.write_result(
        "accuracy",
        {
            "size": size,
            "workload": s.describe(),
            "rows": out_rows,
            "peer_batches": len(seq),
            "peers_skipped": None if ok else why,
        },
        args.results_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
