"""Small steps of bench/gpu_check.sh that are easier in Python (standard library, plus cka-offline's public API
for ``compare``). Not a benchmark on its own.

    python bench/gpu_check_steps.py has-workload H          exit 0 if bench/benchlib.spec knows it
    python bench/gpu_check_steps.py compare CUDA.h5 CPU.h5  CKA of each layer extracted on CUDA with itself on CPU
    python bench/gpu_check_steps.py summary STEPS.tsv OUT.json [GPU_JSON ...]
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from pathlib import Path


def has_workload(name: str) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import benchlib

    try:
        benchlib.spec(name)
    except ValueError:
        print(f"workload {name} is not defined in bench/benchlib.py: skipped")
        return 1
    return 0


def compare(cuda_file: str, cpu_file: str, tolerance: float = 1e-4) -> int:
    """Layer-by-layer CKA (float64, on the CPU) of an extraction on CUDA against the same on the CPU: each must
    be 1 up to the GPU's different but valid rounding (cuDNN convolutions)."""
    import numpy as np

    import cka_offline

    res = cka_offline.analyze([cuda_file, cpu_file], precision="float64", device="cpu", hash_files=False)
    n = res.cka.shape[0] // 2
    same = np.array([res.cka[i, n + i] for i in range(n)])
    worst = float(np.min(same))
    ok = bool(np.all(np.isfinite(same)) and worst >= 1.0 - tolerance)
    print(json.dumps({"layers": n, "min_cka_cuda_vs_cpu": worst, "tolerance": tolerance, "ok": ok}))
    return 0 if ok else 1


def summary(steps_tsv: str, out: str, *gpu_json: str) -> int:
    steps = []
    path = Path(steps_tsv)
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, rc, seconds, limit, note = (line.split("\t") + [""] * 6)[:6]
        steps.append(
            {
                "step": name,
                "status": status,
                "rc": int(rc),
                "seconds": float(seconds),
                "limit_s": int(limit),
                "note": note,
            }
        )
    doc = {
        "check": "bench/gpu_check.sh (issue 19)",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "steps": steps,
        "failed": [s["step"] for s in steps if s["status"] == "fail"],
        "ok": all(s["status"] != "fail" for s in steps),
    }
    for g in gpu_json:
        p = Path(g)
        if p.exists():
            d = json.loads(p.read_text())
            doc.setdefault("benchmarks", {})[p.stem] = {
                "skipped": d.get("skipped"),
                "targets": d.get("targets"),
                "rows": [
                    {
                        k: r.get(k)
                        for k in ("device", "precision", "seconds", "loop_s", "h2d_fraction_of_pinned", "max_err")
                    }
                    for r in d.get("rows", [])
                ],
                "h2d_bandwidth_Bps": d.get("h2d_bandwidth_Bps"),
                "startup_s": d.get("startup_s"),
            }
    Path(out).write_text(json.dumps(doc, indent=2))
    width = max([len(s["step"]) for s in steps] + [4])
    print(f"\n{'step':{width}s}  status  seconds  limit")
    for s in steps:
        print(f"{s['step']:{width}s}  {s['status']:6s}  {s['seconds']:7.1f}  {s['limit_s']:5d}  {s['note']}")
    print(f"summary: {out} ({'all passed' if doc['ok'] else 'FAILED: ' + ', '.join(doc['failed'])})")
    return 0


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:] or ["--help"]
    if cmd == "has-workload":
        sys.exit(has_workload(*rest))
    if cmd == "compare":
        sys.exit(compare(*rest))
    if cmd == "summary":
        sys.exit(summary(*rest))
    print(__doc__)
    sys.exit(0 if cmd in ("-h", "--help") else 2)
