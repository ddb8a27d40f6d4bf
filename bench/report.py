"""Regenerate docs/benchmarks.md from the JSON results in bench/results/ (one per bench script).

    python bench/report.py [--results-dir DIR] [--output docs/benchmarks.md]
    python bench/report.py --section full --section coverage   # print only those sections

Sections whose JSON is missing say so, with the command that produces them. The text around the tables
(what is measured and how) lives here, so the page always matches the scripts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

SCRIPTS = {
    "speed": "python bench/bench_speed.py",
    "floor": "python bench/bench_floor.py",
    "accuracy": "python bench/bench_accuracy.py",
    "memory": "python bench/bench_memory.py",
    "extract": "python bench/bench_extract.py",
    "onnx": "python bench/bench_onnx.py",
    "gpu": "python bench/bench_gpu.py",
    "full": "python bench/bench_full.py",
    "coverage": "python bench/bench_coverage.py",
    "hundreds": "python bench/bench_hundreds.py",
}


def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        if isinstance(x, float) and math.isnan(x):
            return "NaN"
        return f"{x:.{digits}f}"
    return str(x)


def sci(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    return f"{x:.1e}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def provenance(d: dict[str, Any]) -> str:
    m, v = d["machine"], d["versions"]
    env = ", ".join(f"{k}={val}" for k, val in sorted(m.get("env", {}).items())) or "none"
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (
        f"*{d['date']}; `{d['command']}`; {m['cpu']} ({m['cores']} cores, {m.get('simd', '')}), "
        f"{m['memory']} RAM{gpu}; torch threads {m.get('torch_threads')}; Python {m['python']}; "
        + ", ".join(f"{k} {val}" for k, val in v.items())
        + f"; BLAS environment: {env}; size: {d.get('size')}.*"
    )


def workload_line(w: dict[str, Any]) -> str:
    return (
        f"{w['name']}: {w['layers']} layers ({len(w['widths_a'])} + {len(w['widths_b'])}), total width "
        f"{w['total_width']:,}, n = {w['n']:,}, m = {w['m']}"
    )


def section_speed(d: dict[str, Any]) -> str:
    a = d["analyze"]
    rows = []
    for r in d["peers"]:
        if not r.get("ok"):
            rows.append([r["peer"], fmt(r.get("version")), "-", "failed: " + fmt(r.get("error")), "-", "-"])
            continue
        est = (
            f" (extrapolated from {r['batches_run']} of {r['batches_total']} minibatches)" if r["extrapolated"] else ""
        )
        rows.append(
            [
                r["peer"],
                r["version"],
                r.get("torch", "-"),
                fmt(r["peer_s"]) + est,
                fmt(r["analyze_s"]),
                fmt(r["ratio"]),
                fmt(r.get("ratio_in_process")),
            ]
        )
    body = table(
        [
            "peer",
            "version",
            "peer's torch",
            "peer seconds",
            "cka-analyze seconds (same pair)",
            "peer / cka-analyze",
            "peer / cka-analyze's in-process time",
        ],
        rows,
    )
    return (
        f"Workload {workload_line(d['workload'])}. cka-analyze alone: {fmt(a['seconds'])} s end to end "
        f"({fmt(a['timing'].get('compute'))} s in the minibatch loop, {fmt(a['timing'].get('read_wait'))} s of it "
        f"waiting for data), peak RSS {fmt(a['max_rss_mb'], 0)} MB.\n\n{body}\n\n"
        "Each row is one back-to-back pair: cka-analyze end to end as a user runs it (process start, imports, "
        "reading the HDF5 files, writing the result; the files' SHA-256, recorded in the result, is remembered "
        "from the warm-up run -- section 2 times the first analysis too), then the peer's own loop on the same "
        "values (timed inside bench/peers_runner.py: constructor + loop + result, without interpreter start-up "
        "and imports -- torch alone takes about 1 s to import here --, which favours the peers). The last column "
        "compares like with like: the peer's in-process time against cka-analyze's own in-process time "
        "(`timing.total` of its result: opening the files to the summed result, without interpreter start-up, "
        "imports or writing the result file). Peers run sequential minibatches; cka-analyze its shuffled ones "
        "(same sizes)."
    )


def _notes(name: str) -> str:
    """A hand-written note kept beside the scripts (bench/<name>), rendered under its section's table."""
    path = BENCH / name
    return "\n\n" + path.read_text().strip() if path.exists() else ""


def _symmetric_floor(d: dict[str, Any], dt: str) -> tuple[float | None, float | None]:
    """(symmetric floor s, end to end / it); derived for results written before bench_floor recorded it
    when every minibatch has m rows (then the upper triangles' FLOPs are (m + 1) / 2m of the general ones)."""
    f, t = d["floors"][dt], d["analyze"][dt]
    if "floor_symmetric_s" in f:
        return f["floor_symmetric_s"], f["ratio_end_to_end_vs_symmetric"]
    m, n = d["workload"]["m"], d["workload"]["n"]
    if n % m:
        return None, None
    floor = (d["gram_flops"] * (m + 1) / (2 * m) + d["pair_flops"]) / f["gemm_rate_flops"]
    return floor, t["end_to_end_s"] / floor


def section_floor(d: dict[str, Any]) -> str:
    rows = []
    for dt in ("float32", "float64"):
        f, t = d["floors"][dt], d["analyze"][dt]
        symmetric, ratio = _symmetric_floor(d, dt)
        rows.append(
            [
                dt,
                fmt(f["gemm_rate_flops"] / 1e9, 1),
                fmt(f["floor_peak_s"]),
                fmt(f["floor_shapes_s"]),
                fmt(symmetric),
                fmt(t["end_to_end_s"]),
                fmt(t["compute_s"]),
                fmt(f["ratio_end_to_end_vs_peak"]),
                fmt(ratio),
                fmt(f["achieved_flops_end_to_end"] / 1e9, 1),
            ]
        )
    bw = d["bandwidth"]
    body = table(
        [
            "Grams",
            "GEMM GFLOP/s (square)",
            "GEMM floor s",
            "floor at W's shapes s",
            "symmetric floor s",
            "cka-analyze s",
            "of which loop s",
            "cka-analyze / floor",
            "/ symmetric floor",
            "achieved GFLOP/s",
        ],
        rows,
    )
    by_lib = d.get("gemm_rates_by_lib")
    libs = ""
    if by_lib:
        libs = (
            " The square GEMM ran at "
            + ", ".join(
                f"{by_lib[lib]['float32'] / 1e9:.0f} (float32) / {by_lib[lib]['float64'] / 1e9:.0f} (float64) GFLOP/s with "
                + ("torch (MKL)" if lib == "torch" else "numpy (OpenBLAS)")
                for lib in ("torch", "numpy")
            )
            + "; the floor uses the faster."
        )
    t32 = d["analyze"]["float32"]
    first = ""
    if "end_to_end_hashing_s" in t32:
        floor = d["floors"]["float32"]["floor_peak_s"]
        first = (
            f" The float32 time is a repeat analysis, which reuses the files' remembered SHA-256; the first "
            f"analysis of new files also hashes them ({fmt(t32['end_to_end_hashing_s'])} s, "
            f"{fmt(t32['end_to_end_hashing_s'] / floor)}x the floor); with `--no-hash` it took "
            f"{fmt(t32['end_to_end_no_hash_s'])} s."
        )
    if "end_to_end_blocks_s" in t32:
        floor = d["floors"]["float32"]["floor_peak_s"]
        first += (
            f" Uniform minibatches (the default) against `--shuffle blocks` (the plan before them, whose numbers "
            f"are those of that version bit for bit), best runs interleaved: {fmt(t32['end_to_end_s'])} s "
            f"({fmt(t32['end_to_end_s'] / floor)}x the floor; loop {fmt(t32['compute_s'])} s) against "
            f"{fmt(t32['end_to_end_blocks_s'])} s ({fmt(t32['end_to_end_blocks_s'] / floor)}x; loop "
            f"{fmt(t32['compute_blocks_s'])} s)."
        )
    methods = d.get("gram_methods_s")
    if methods:
        first += (
            " One minibatch of W's Gram products on one core (CPU time, best of interleaved rounds; each into a "
            "float64 buffer, as the engine writes them): "
            + "; ".join(
                f"{dt} general product {fmt(v['general_s'] * 1e3, 1)} ms, syrk {fmt(v['syrk_s'] * 1e3, 1)} ms "
                f"({fmt(v['syrk_s'] / v['general_s'])}x), GEMM tiles of 64 rows {fmt(v['tiles64_s'] * 1e3, 1)} ms "
                f"({fmt(v['tiles64_s'] / v['general_s'])}x), the engine's whole Gram (copy, centring, syrk) "
                f"{fmt(v['engine_s'] * 1e3, 1)} ms"
                for dt, v in methods.items()
            )
            + "."
        )
    return (
        f"Workload {workload_line(d['workload'])}, {d['minibatches']} minibatches: "
        f"{d['gram_flops'] / 1e9:.1f} GFLOP of Grams + {d['pair_flops'] / 1e9:.2f} GFLOP of pair terms; "
        f"{d['bytes'] / 1e9:.2f} GB to read. Memory bandwidth: read {bw['read_Bps'] / 1e9:.1f} GB/s, copy "
        f"{bw['copy_Bps'] / 1e9:.1f} GB/s, so reading the values once takes at least "
        f"{fmt(d['memory_floor_s'])} s.\n\n{body}\n\n"
        f"GEMM floor = FLOPs / the rate of a square {d['square_gemm_n']}^3 matrix product measured in the same "
        "run (the machine's best)." + libs + ' "At W\'s shapes" times the (m x d)(d x m) Gram products as general '
        "products, which run slower than square ones. The GEMM floor counts general products (2 m^2 d FLOPs a "
        "Gram); the symmetric floor counts a Gram's upper triangle only (m (m + 1) d FLOPs), at the same "
        "measured GEMM rate: about half. cka-analyze computes each Gram as a symmetric rank-k update (numpy's "
        'syrk) -- that is how its "achieved GFLOP/s" (general-product FLOPs / time) can exceed the GEMM rate. '
        "cka-analyze is the best of the timed runs after a warm-up (files in the page cache)."
        + first
        + f" Target: at most {d['target_ratio']}x the float32 GEMM floor end to end"
        + (" (2x the symmetric floor)" if d["target_ratio"] == 1.0 else "")
        + f": **{'met' if d['target_met'] else 'missed'}**."
        + _notes("FLOOR.md")
    )


def section_accuracy(d: dict[str, Any]) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in d["rows"]))
    impls = list(dict.fromkeys((r["impl"], r["precision"]) for r in d["rows"]))
    names = {"none": "W", "scale1e-3": "W x 1e-3", "shift50": "W + 50"}
    rows = []
    for impl, precision in impls:
        cells = [impl, fmt(next((r["version"] for r in d["rows"] if r["impl"] == impl), "")), precision]
        for v in variants:
            r = next(
                (r for r in d["rows"] if r["impl"] == impl and r["precision"] == precision and r["variant"] == v), None
            )
            if r is None:
                cells.append("-")
            elif not r["ok"]:
                cells.append("fails: " + fmt(r.get("error")).replace("|", "/")[:70])
            else:
                cells.append(sci(r["err_ab"]) + (" (NaN)" if r.get("nan") else ""))
        rows.append(cells)
    body = table(["implementation", "version", "Grams", *[names.get(v, v) for v in variants]], rows)
    full = [r for r in d["rows"] if r["impl"] == "cka-analyze"]
    worst = {p: max((r["err_all"] for r in full if r["precision"] == p), default=None) for p in ("float32", "float64")}
    lines = [
        f"Workload {workload_line(d['workload'])}. Entries: max |CKA - float64 reference| over the A-vs-B "
        f"block ({len(d['workload']['widths_a'])} x {len(d['workload']['widths_b'])}). Peers ran their first {d['peer_batches']} sequential minibatches, the reference the "
        "same ones; cka-analyze ran all of its shuffled minibatches, its reference the same ones "
        "(`plan_minibatches`). Over the whole stacked matrix (A-A, A-B, B-B) cka-analyze's worst error is "
        f"{sci(worst['float32'])} with float32 Grams and {sci(worst['float64'])} with float64 Grams.",
        "",
        body,
    ]
    ck = [r for r in d["rows"] if r["impl"] == "ckatorch" and r.get("ok")]
    if ck:
        lines += [
            "",
            "ckatorch's CKA class against the CKA of the *last minibatch alone*: max difference "
            + ", ".join(f"{sci(r['err_ab_vs_last_batch'])} ({names.get(r['variant'], r['variant'])})" for r in ck)
            + " -- its loop assigns each minibatch's CKA instead of accumulating HSIC sums.",
        ]
    return "\n".join(lines)


def section_memory(d: dict[str, Any]) -> str:
    a = table(
        ["n", "files GB", "peak RSS MB", "seconds"],
        [[f"{r['n']:,}", fmt(r["file_gb"]), fmt(r["max_rss_mb"], 0), fmt(r["seconds"], 1)] for r in d["analyze"]],
    )
    e = table(
        ["inputs", "inputs MB", "peak RSS MB", "seconds"],
        [[f"{r['n']:,}", fmt(r["inputs_mb"], 0), fmt(r["max_rss_mb"], 0), fmt(r["seconds"], 1)] for r in d["extract"]],
    )
    ratio = d.get("analyze_rss_ratio")
    verdict = (
        "-" if ratio is None else f"{ratio:.3f} ({'within' if d['analyze_target_met'] else 'above'} the 1.10 target)"
    )
    return (
        f"`cka-analyze` on {workload_line(d['workload'])} (n varied):\n\n{a}\n\nPeak RSS ratio large/small n: "
        f"{verdict}.\n\n`cka-extract` (PyTorch plugin, bench/cnn.py, 8 layers, `--reduction mean`):\n\n{e}\n\n"
        f"Peak RSS ratio largest/smallest: {d['extract_rss_ratio']:.3f}." + _notes("MEMORY.md")
    )


def section_extract(d: dict[str, Any]) -> str:
    def ratio(r: dict[str, Any]) -> str:
        ok = r["marginal_extract_s"] > 0 and r["marginal_bare_s"] > 0
        return fmt(r["overhead_ratio"]) if ok else "noise (negative marginal; see end to end)"

    rows = [
        [
            r["plugin"],
            r["reduction"],
            fmt(r["marginal_extract_s"]),
            fmt(r["marginal_bare_s"]),
            ratio(r),
            fmt(r["end_to_end_ratio"]),
            fmt(r["extract_max_rss_mb"], 0),
        ]
        for r in d["rows"]
    ]
    n = d["rows"][0]["n"] if d["rows"] else ["?", "?"]
    body = table(
        [
            "plugin",
            "reduction",
            f"cka-extract s per {n[0]:,} inputs",
            "bare forward s",
            "ratio",
            f"end-to-end ratio at {n[1]:,}",
            "cka-extract peak RSS MB",
        ],
        rows,
    )
    return (
        f"Small CNN (bench/cnn.py), 8 layers ({', '.join(d['layers'])}), batch {d['batch_size']}, CPU. "
        f"Seconds are marginal: time({n[1]:,} inputs) - time({n[0]:,} inputs), so start-up cancels out.\n\n"
        f"{body}\n\nTarget: at most {d['target_ratio']}x the bare forward passes (8 layers, CPU), for `mean`; "
        "retired for `flatten`, whose floor is the disk (its own target and table below). On this "
        'machine these ratios swing by up to 2x between runs of the same code (see "Reading these numbers": '
        "the bare loop itself took 0.43-1.05 s per 2,048 inputs); a ratio below 1 is that noise, not "
        "extraction being faster than the forward passes." + _in_process(d) + _flatten_vs_disk(d)
    )


def _flatten_vs_disk(d: dict[str, Any]) -> str:
    r = d.get("flatten_vs_disk")
    if not r:
        return ""
    n = r["n"]
    body = table(
        [
            f"GB written per {n[0]:,} inputs",
            "disk MB/s (fsync'ed)",
            "page cache MB/s",
            "disk s",
            "bare forward s",
            "floor s",
            "cka-extract flatten s",
            "ratio to floor",
            f"target {r['target_ratio']}x",
        ],
        [
            [
                fmt(r["marginal_bytes"] / 1e9),
                fmt(r["disk_fsync_bytes_per_s"] / 1e6, 0),
                fmt(r["disk_page_cache_bytes_per_s"] / 1e6, 0),
                fmt(r["marginal_disk_s"]),
                fmt(r["marginal_bare_s"]),
                fmt(r["floor_s"]),
                fmt(r["marginal_extract_s"]),
                fmt(r["ratio"]),
                "**met**" if r["target_met"] else "**missed**",
            ]
        ],
    )
    return (
        "\n\n**Flattened maps against the disk.** `--reduction flatten` stores every value (768 KiB per input "
        "here), so its floor is physical: floor = max(bare forward passes, bytes written / the output disk's "
        "sequential write bandwidth), all measured in this run and marginal over "
        f"{n[0]:,} inputs (PyTorch, `cka-extract` as installed). The bandwidth is that of a file the size of "
        f"the {n[1]:,}-input output written to the same folder in 4 MiB writes and fsync'ed: `cka-extract` "
        "fsyncs its file before renaming it into place, so the command cannot finish before every byte is on "
        "the disk; the page-cache rate (the same writes without fsync) is shown beside it. Target: at most "
        f"{r['target_ratio']}x the floor.\n\n" + body + "\n\n" + FLATTEN_NOTE
    )


#: hand-written (issue 18): what the profile of flatten showed and what was decided; its numbers are from the
#: A/B runs it names, not from the table above
FLATTEN_NOTE = """*Hand-written note (issue 18): where flatten's time goes and what was decided.* Profiled with
cProfile, timers around every step and strace on `cka_offline.extract` of 1,024 inputs (805 MB, 16 batches;
2 cores shared with other jobs, load 3-19, so wall times are medians of interleaved runs and CPU times and
counts carry the comparison). The hooks keep each layer's output tensor; `to_numpy` is a view, `flatten` a
reshape, `np.ascontiguousarray` copies nothing (the rows are C-contiguous float32 already) and uncompressed
rows are stored every batch, so no `np.concatenate` runs; the finiteness check is one pass (about 0.1 s CPU
per 1,024 inputs). Two costs were not the disk's. (1) HDF5 2.0 caches chunks up to 8 MiB, so
`Dataset.write_direct` copied every 2-4 MB chunk into a freshly allocated chunk-cache buffer and wrote it
only in the first of the store's two flushes: a second pass over every byte, and (strace) a 2-4 MB buffer
per chunk allocated and freed every batch. Whole chunks of uncompressed layers now go to the file with `write_direct_chunk`
straight from the captured array (`cka_offline/store/rawio.py`; partial chunks keep the normal path; the file
content is the same, `tests/store/test_rawio.py`): writing and flushing the same 805 MB (a micro-benchmark of 8 such layers) took 0.29 s CPU against 0.54 s
(0.47 s with the chunk cache turned off, `rdcc_nbytes=0`, which is why the cache setting was not the fix), the
flush after the data now writes only metadata (about 20 KB, 1 ms), and the two flushes per store stay (data
flushed before `rows_complete` counts it). (2) Nothing reached the disk before `close()`'s fsync: dirty pages
below the kernel's background threshold (10% of RAM here) wait 30 s, so the whole file was written after the
last batch (1.4-1.6 s per 805 MB in close). The writer now starts the write-back (`sync_file_range`, Linux,
no waiting) every 16 MiB stored, so the disk works while the next batches run: the fsync in `close()` fell
to 0.17-0.19 s. Both changes against neither, 5 interleaved extractions of 1,024 inputs each, in two runs:
median CPU 5.3 -> 4.8 s and 5.1 -> 4.5 s, median wall 12.3 -> 10.7 s (load 10-19) and 6.9 -> 7.2 s (load 4-5;
bare loop 3.7 s): the CPU saving is steady, the wall change is within this shared machine's noise, and the
table above, from a quiet run, is the measure. The floor uses the fsync'ed bandwidth because `close()`
fsyncs before the rename: the command's time includes every byte reaching the disk. The allocator: with the
chunk-cache copies gone, glibc's default thresholds give the bare loop no page faults at all and the
extraction between about 50 and 40,000 per 1,024 inputs, varying from run to run (at most about 160 MB
re-faulted: some tens of ms against seconds); with
`MALLOC_MMAP_THRESHOLD_=32 MiB` and `MALLOC_TRIM_THRESHOLD_=256 MiB` (what `mallopt` at start-up would set)
the faults drop to about 1,000 but CPU time does not move (bare loop 3.41 s against 3.45 s, extraction 4.93 s
against 4.88 s, medians of 3 runs in alternating processes), the bare loop cannot gain (it has no faults to
save), and the process would keep its freed memory. Decision: `cka-extract` does not change the allocator.

*Hand-written (lead, from the 18:17 UTC run of 2026-12-01, quiet machine, load 1.7-1.9): why the 1.25x target is
missed and what would meet it.* The extraction runs each batch's forward pass and then its writes, one after
the other, on one thread: 2.16 s of forward passes plus 1.61 GB into the page cache at the measured 1.5 GB/s
(1.07 s) plus what the CRC-32 of every chunk (format 1.2, on a second thread beside the writes) adds is 3.3-3.5 s
before the last write-back and the fsync, against the 4.32 s measured; the floor (2.87 s, the disk) assumes the
forward passes and the writes overlap. What would meet it: a writer thread (the batch's rows handed over, the
next forward pass running while they are written and checksummed, HDF5 touched by that thread only, the
crash-safety order unchanged), which would bring the time to about max(forward, disk) plus the hand-over.
Not done in this session."""


def _in_process(d: dict[str, Any]) -> str:
    rows = d.get("in_process") or []
    if not rows:
        return ""
    body = table(
        [
            "plugin",
            "reduction",
            "extract s per 2,048 inputs (median)",
            "bare loop s (median)",
            "ratio",
            "spread: extract / bare s",
        ],
        [
            [
                r["plugin"],
                r["reduction"],
                fmt(r["marginal_extract_s"]),
                fmt(r["marginal_bare_s"]),
                fmt(r["ratio"]),
                f"{fmt(r['extract_spread_s'][0])}-{fmt(r['extract_spread_s'][1])} / "
                f"{fmt(r['bare_spread_s'][0])}-{fmt(r['bare_spread_s'][1])}",
            ]
            for r in rows
        ],
    )
    return (
        "\n\nThe same marginal comparison in one process (`cka_offline.extract` and the bare loop alternated, "
        f"{rows[0]['repeats']} times, medians): the steadier measurement here. `flatten` writes 768 KiB per "
        "input; in one process, several GB written and deleted within seconds also meet the kernel's "
        "write-back throttling, so its row measures the disk more than the extraction.\n\n" + body
    )


def section_onnx(d: dict[str, Any]) -> str:
    def graph(g: dict[str, int]) -> str:
        return (
            f"{g['fused_conv_relu']} fused / {g['relu_alone']} alone; "
            f"{g['reorder_whole']} whole, {g['reorder_pooled']} pooled"
        )

    cmd = {(r["selection"], r["reduction"]): r for r in d["through_command"]}
    proc = d["in_process"]
    n = proc[0]["n"] if proc else 0

    def command_cells(r: dict[str, Any]) -> list[str]:
        c = cmd.get((r["selection"], r["reduction"]))
        if c is None:
            return ["-", "-"]
        ok = c["marginal_extract_s"] > 0 and c["marginal_bare_s"] > 0
        return [fmt(c["marginal_extract_s"]), fmt(c["ratio"]) if ok else "noise (negative marginal)"]

    rows = [
        [
            r["selection"],
            r["reduction"],
            fmt(r["marginal_extract_s"]),
            fmt(r["plugin_run_s"]),
            fmt(r["bare_s"]),
            f"**{fmt(r['ratio'])}**",
            fmt(r["plugin_ratio"]),
            *command_cells(r),
            graph(r["graph"]),
        ]
        for r in proc
    ]
    body = table(
        [
            "selection",
            "reduction",
            f"extract s per {n:,} inputs (median)",
            "plugin run s",
            "bare session s",
            "ratio",
            "plugin ratio",
            "cka-extract s (marginal)",
            "cka-extract ratio",
            "optimised graph: Conv+Relu; tensors reordered",
        ],
        rows,
    )
    sel = d["selections"]
    post = next((r for r in proc if r["selection"] == "post-activation" and r["reduction"] == "mean"), None)
    verdict = (
        f"{fmt(post['ratio'])}x: **{'met' if d['target_met'] else 'missed'}**" if post is not None else "not measured"
    )
    return (
        f"The bench CNN (bench/cnn.py) exported to ONNX; batch {d['batch_size']}, CPU. Post-activation: "
        f"{', '.join(sel['post-activation'])} (Conv + Relu pairs onnxruntime fuses); pre-activation: "
        f"{', '.join(sel['pre-activation'])} (a chosen Conv output cannot be fused with its Relu). The bare "
        "session is what a user runs: `onnxruntime.InferenceSession(cnn.onnx)` with default options (every "
        "optimisation on) and `run(None, ...)`, the whole network to its logits. In one process, alternated "
        f"{proc[0]['repeats'] if proc else '?'} times (medians): the bare loop on {n:,} inputs, the extractor's "
        "own `run` over the same batches (plugin run: the session it builds, no file), and `cka_offline.extract` "
        f"marginal between {n:,} and {2 * n:,} inputs (the whole pipeline, HDF5 file included; the ratio column). "
        "`cka-extract` columns: the installed command and the bare loop as subprocesses, marginal between the "
        "same input counts (best of runs; start-up cancels out, noisier). The last column reads the graph "
        "onnxruntime optimised for the extractor's session: Convs carrying their Relu / Relu nodes left alone; "
        "whole tensors / pooled (batch, C) results converted out of the blocked NCHWc layout.\n\n"
        f"{body}\n\nTarget: post-activation `mean` at most {d['target_ratio']}x the bare session (in one "
        f"process): {verdict}. The extractor's session skips the nodes after the last chosen tensor (here the "
        "last pooling and the classifier, a small part), so a ratio a little below 1 can be real; far below 1, "
        f"or negative, in the `cka-extract` columns is the machine's noise.{_load(d)}\n\n{ONNX_NOTE}"
    )


def _load(d: dict[str, Any]) -> str:
    load = d.get("load_average")
    if not load:
        return ""
    before, after = (", ".join(fmt(x) for x in load[k]) for k in ("before", "after"))
    return f" Load average (1, 5, 15 min) before the run {before}, after it {after}."


ONNX_NOTE = (
    "*Hand-written note (what was measured and why).* Exposing a Relu's output as a graph output never blocked "
    "onnxruntime's Conv + Relu fusion: the fused node keeps the Relu's output name (the graph column shows it). "
    "What exposing cost was layout: on x86 the convolutions run in the blocked NCHWc layout, and every graph "
    "output, and every input of an op without an NCHWc kernel such as `ReduceMean`, is first converted back to "
    "NCHW whole (`ReorderOutput`). The in-graph mean is now `GlobalAveragePool` + `Flatten`, which onnxruntime "
    "runs in NCHWc, so only the (batch, C) means are converted back; and the session's graph keeps only the "
    "nodes the chosen tensors need (onnxruntime runs unused nodes too). A pre-activation selection keeps the "
    "Relu as its own node, and `flatten` must convert every value back to NCHW and hand it to the core: both "
    "are reported apart. The plugin-run column separates the session from the rest of the pipeline (reduction "
    "bookkeeping, the HDF5 writer): where the ratio misses, compare it with the plugin ratio to see which side "
    "the time is on. Lower levels than `all` (`-X optimization_level=extended`) drop NCHWc and run slower."
)


def section_gpu(d: dict[str, Any]) -> str:
    if d.get("skipped"):
        return f"Skipped on this machine: {d['skipped']}." + _notes("GPU.md")
    rows = [
        [r["device"], r["precision"], fmt(r["seconds"]), fmt(r["compute_s"]), fmt(r["read_wait_s"]), sci(r["max_err"])]
        for r in d["rows"]
    ]
    body = table(["device", "Grams", "end to end s", "loop s", "waiting for data s", "max err vs float64"], rows)
    rates = d["cuda_gemm_rate_flops"]
    return (
        f"{d['gpu']}; workload {workload_line(d['workload'])}.\n\n{body}\n\nCUDA GEMM rate: float32 "
        f"{rates['float32'] / 1e12:.1f} TFLOP/s (TF32 {'on' if d['tf32'] else 'off'}), float64 "
        f"{rates['float64'] / 1e12:.1f} TFLOP/s; GEMM floor of W on the GPU: {fmt(d['cuda_floor_s']['float32'], 3)} s "
        f"(float32). Speed-up of CUDA over the same machine's CPU, end to end: float32 {fmt(d['speedup_cuda_vs_cpu']['float32'], 1)}x, "
        f"float64 {fmt(d['speedup_cuda_vs_cpu']['float64'], 1)}x."
    )


def section_full(d: dict[str, Any]) -> str:
    rows = [
        [
            r["kernel"],
            r["estimator"],
            fmt(r["seconds"]),
            fmt(r["minibatch_seconds"]),
            fmt(r["ratio"]),
            fmt(r["ratio_analysis"]),
            "met" if r["ratio"] <= 2.0 else "**missed**",
        ]
        for r in d["rows"]
    ]
    w = d["workload"]
    body = table(
        [
            "kernel",
            "estimator",
            "seconds",
            f"`-m {w['n']:,} --precision float64` seconds",
            "ratio",
            "ratio, analysis only",
            "target <= 2x",
        ],
        rows,
    )
    checks = [r for r in d["rows"] if "max_abs_vs_one_minibatch" in r]
    check = ""
    if checks:
        check = (
            " As a check, `full-debiased` equals the one-minibatch estimate (HSIC_1 of one Gram of all examples) "
            "to float64 rounding: max |difference| "
            + ", ".join(f"{sci(r['max_abs_vs_one_minibatch'])} ({r['kernel']})" for r in checks)
            + "."
        )
    worst = max(r["ratio"] for r in d["rows"])
    return (
        f"Workload {workload_line(w)}: do the exact full-data estimators (`--estimator full` and "
        "`full-debiased`: one n x n float64 Gram per layer) run at the speed of `-m n --precision float64`, one "
        "minibatch of every example, which computes the same Grams? For each kernel, cka-analyze runs end to end as "
        f"a subprocess, the three estimators back to back, {d['rounds']} round{'s' if d['rounds'] != 1 else ''}; the "
        "medians are kept. Seconds: "
        "end to end (start-up, reading, hashing, RBF bandwidths, analysis); analysis only: the ratio of the "
        "results' `timing.total` (opening the files to the result).\n\n"
        f"{body}\n\nTarget: the full estimators within 2x of the `-m n --precision float64` run: "
        f"**{'met' if worst <= 2.0 else 'missed'}** (worst ratio {fmt(worst)}).{check}"
    )


def _span(values: list[float], digits: int = 2) -> str:
    lo, hi = min(values), max(values)
    return fmt(lo, digits) if f"{lo:.{digits}f}" == f"{hi:.{digits}f}" else f"{fmt(lo, digits)}-{fmt(hi, digits)}"


def section_coverage(d: dict[str, Any]) -> str:
    rs = d["rows"]
    conf = round(100 * rs[0]["confidence"]) if rs else 95
    body = table(
        [
            "kernel",
            "epochs",
            f"coverage of {conf}% intervals",
            "mean SE / sd",
            "jackknife groups",
            "replicates",
            "n",
            "m",
        ],
        [
            [
                r["kernel"],
                str(r["epochs"]),
                f"{fmt(r['coverage'], 3)} (+- {fmt(r['coverage_se'], 3)})",
                fmt(r["se_over_sd"]),
                str(r["n_groups"]),
                f"{r['replicates']:,}",
                f"{r['n']:,}",
                str(r["m"]),
            ]
            for r in rs
        ],
    )
    pop, truth = d["population"], d["truth"]
    first = rs[0] if rs else {"replicates": "?", "n": "?", "m": "?"}
    epochs = ", ".join(str(e) for e in dict.fromkeys(r["epochs"] for r in rs))
    values = [f"linear {truth['linear']['cka']:.4f} (closed form from the covariances)"] if "linear" in truth else []
    if "rbf" in truth:
        t = truth["rbf"]
        values.append(
            f"RBF {t['cka']:.4f} (Monte Carlo SE {sci(t['se'])}): each layer's bandwidth fixed at its population "
            f"value, rbf_fraction {t['rbf_fraction']} x the median distance, and each HSIC the mean of HSIC_1 over "
            f"{t['draws']:,} independent 4-example samples"
        )
        if "check" in t:
            c = t["check"]
            values[-1] += (
                f"; the debiased full-data CKA at the same bandwidths, pooled over {c['sets']} data sets of "
                f"n = {c['n']:,}, gives {c['cka']:.4f} ({c['z']:+.1f} SE from it)"
            )
    text = (
        f"Do the intervals mean what they say? {first['replicates']} independent data sets of n = {first['n']} "
        f"examples from one Gaussian population (x: {pop['d_x']} features; y = x A + {pop['noise']} N(0, I): "
        f"{pop['d_y']} features; population seed {pop['seed']}) are stored as layer pairs of one activation file and "
        f"analysed by `cka_offline.analyze` as a user would (`-m {first['m']}`, {d['precision']} Grams, other "
        f"options default; epochs {epochs}, a different seed per epochs value). Coverage: the fraction of data sets "
        "whose interval [low, high] contains the population CKA (+- its binomial SE); mean SE / sd: the mean "
        "jackknife SE over the standard deviation of the estimates across data sets (1 when the SE estimates the "
        "spread of the estimator). Population CKA: " + "; ".join(values) + f".\n\n{body}"
    )
    lin = [r for r in rs if r["kernel"] == "linear"]
    rbf = [r for r in rs if r["kernel"] == "rbf"]
    if rbf:
        bw = rbf[0].get("bandwidth_ratio")
        spread = (
            f" (here the estimated bandwidths' sd between data sets is {100 * bw['sd'][0]:.1f}% of the population "
            f"value for the x layers, {100 * bw['sd'][1]:.1f}% for the y layers)"
            if bw
            else ""
        )
        compare = (
            f"; mean SE / sd is {_span([r['se_over_sd'] for r in rbf])} for RBF against "
            f"{_span([r['se_over_sd'] for r in lin])} for linear, and coverage {_span([r['coverage'] for r in rbf], 3)} "
            f"against {_span([r['coverage'] for r in lin], 3)}"
            if lin
            else ""
        )
        text += (
            "\n\nThe RBF intervals miss the bandwidth's own sampling variation: `analyze` estimates each layer's "
            "bandwidth from the same data (rbf_fraction x the median distance) and then treats it as fixed, so the "
            f"jackknife SE leaves out how the estimate moves with the bandwidth{spread}{compare}."
        )
    return text


def section_hundreds(d: dict[str, Any]) -> str:
    rates = d["gemm_rates"]
    rows = [
        [
            "reported pairs (default)" if r["variant"] == "requested" else "`--all-pairs`",
            fmt(r["pair_flops"] / 1e9, 1),
            fmt(r["floor_s"]),
            fmt(r["floor_f32_s"]),
            fmt(r["seconds"]),
            fmt(r["compute_s"]),
            fmt(r["ratio"]),
            fmt(r["ratio_f32"]),
            fmt(r["anon_rss_mb"], 0),
        ]
        for r in d["rows"]
    ]
    body = table(
        [
            "pairs computed",
            "pair GFLOP (float64)",
            "floor s",
            "floor s, all at float32 rate",
            "cka-analyze s",
            "of which loop s",
            "/ floor",
            "/ float32 floor",
            "peak anonymous RSS MiB",
        ],
        rows,
    )
    req, every = d["rows"][0], d["rows"][1]
    q = d["memory_quarter"]
    parts = d.get("breakdown")
    where = ""
    if parts:
        cores = d.get("cores") or 1
        where = (
            " Where the loop's time goes (measured in the same run on random data of these shapes, for all "
            f"{d['minibatches']} minibatches): the Grams take {fmt(parts['grams_one_core_s'])} s on one core "
            f"({fmt(parts['grams_one_core_s'] / cores)} s spread over {cores} cores, against "
            f"{fmt(d['gram_flops'] / rates['float32'])} s at the GEMM rate), the HSIC terms {fmt(parts['hsic_requested_s'])} s for the reported "
            f"pairs and {fmt(parts['hsic_all_pairs_s'])} s for all pairs (the all-pairs product is one symmetric "
            "rank-k update, which computes half of its L^2 entries; the A-B block is a general product of "
            "L^2/4 entries, so the saving is at most 2x), the rest is gathering the rows and the pipeline."
        )
    return (
        f"Workload {workload_line(d['workload'])} (per-example normalised chain, so deep models keep their "
        f"scale), {d['minibatches']} minibatches: {d['gram_flops'] / 1e9:.1f} GFLOP of Grams (general-product "
        f"count), {d['bytes'] / 1e9:.2f} GB to read. GEMM rate measured in the same run (square "
        f"{d['square_gemm_n']}^3, best of torch and numpy): {rates['float32'] / 1e9:.1f} GFLOP/s float32, "
        f"{rates['float64'] / 1e9:.1f} GFLOP/s float64.\n\n{body}\n\n"
        "Pair FLOPs: `2 m^2` per computed `tr(K~_i K~_j)` entry (A against B and every layer's self term by "
        "default; all `L^2` with `--all-pairs`) plus the `2 L^2 m` of the row-sum terms. Floor = Gram FLOPs at "
        "the float32 rate + pair FLOPs at the float64 rate (the pair products are float64); the float32 floor "
        "takes both at the float32 rate (section 2's convention; the target is against it). cka-analyze "
        "end to end, best of the timed runs after a warm-up, the two variants interleaved. Peak anonymous RSS "
        "(`RssAnon`, sampled; the memory-mapped file pages are not in it): "
        f"{fmt(req['anon_rss_mb'], 0)} MiB at n = {d['workload']['n']}, {fmt(q['anon_rss_mb'], 0)} MiB at "
        f"n = {q['n']}. The A-B block of both variants agrees to {sci(d['max_abs_ab_diff'])}. All pairs take "
        f"{fmt(every['seconds'] / req['seconds'])}x the time of the reported pairs here. Target: at most "
        f"{d['target_ratio']}x the float32 floor: **{'met' if d['target_met'] else 'missed'}**."
        + where
        + _notes("HUNDREDS.md")
    )


SECTIONS = [
    ("speed", "1. Analysis speed against the peers", section_speed),
    ("floor", "2. The hardware floor", section_floor),
    ("accuracy", "3. Accuracy against a float64 reference", section_accuracy),
    ("memory", "4. Memory", section_memory),
    ("extract", "5. Extraction overhead", section_extract),
    ("onnx", "5b. ONNX extraction", section_onnx),
    ("gpu", "6. GPU", section_gpu),
    ("full", "7. Exact full-data estimators", section_full),
    ("coverage", "8. Coverage of the intervals", section_coverage),
    ("hundreds", "9. Workload H: hundreds of layers", section_hundreds),
]

INTRO = """# Benchmarks

Generated by `python bench/report.py` from the JSON files the scripts in `bench/` write to `bench/results/`
(not committed). Every number below carries the date, machine, versions and command that produced it.
Reproduce everything with `bash bench/run_all.sh` (add `--quick` for a one-minute-per-script version); the peer
packages live in their own venv, made by `bash bench/setup_peers.sh` from the pins in
`bench/requirements-peers.txt` -- they are never dependencies of cka-offline.

**Workload W**: two "models" A and B of 12 layers each, widths 256 to 4096 (40,960 features in all),
n = 8192 examples, minibatch m = 256, float32, uncompressed HDF5 written with `ActivationWriter`. The values are
deterministic and structured: both models see the same 256-d inputs (decaying spectrum); each is a random
linear+ReLU chain and each layer emits a random projection of the chain's state through a ReLU, so layers are
non-negative with non-zero means and their CKA varies from layer to layer (see `bench/benchlib.py`).

**Peers**, each run through its own minibatch loop on the stored activations by `bench/peers_runner.py`
(trivial `nn.Module`s emit the stored rows as layer outputs so the peers' forward hooks fire; sequential,
unshuffled minibatches of m rows): ckatorch 1.0.3 (the package this project grew from), torch-cka 0.21,
pytorch-cka 1.1.3 (import name `cka`), cka-pytorch 1.1.3. The float64 reference is `bench/reference.py`,
written from the formulas.
"""


def render_section(results_dir: Path, key: str) -> str:
    """One section (heading, text, table, provenance) from ``results_dir/<key>.json``."""
    title, fn = next((title, fn) for k, title, fn in SECTIONS if k == key)
    out = [f"## {title}\n"]
    path = results_dir / f"{key}.json"
    if not path.exists():
        out.append(f"No result yet: run `{SCRIPTS[key]}`.\n")
        return "\n".join(out)
    d = json.loads(path.read_text())
    try:
        out.append(fn(d) + "\n")
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        out.append(
            f"The result file {path.name} could not be rendered ({type(exc).__name__}: {exc}); "
            f"run `{SCRIPTS[key]}` again.\n"
        )
    out.append(provenance(d) + "\n")
    return "\n".join(out)


def render(results_dir: Path) -> str:
    out = [INTRO]
    out += [render_section(results_dir, key) for key, _, _ in SECTIONS]
    # hand-written sections: the scale-out measurements (bench/bench_distributed.py) and the notes
    for name in ("SCALE_OUT.md", "NOTES.md"):
        extra = REPO / "bench" / name
        if extra.exists():
            out.append(extra.read_text())
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default=str(BENCH / "results"))
    p.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument(
        "--section",
        action="append",
        choices=[key for key, _, _ in SECTIONS],
        help="print only this section (repeatable) to stdout instead of writing the page",
    )
    args = p.parse_args()
    if args.section:
        print("\n".join(render_section(Path(args.results_dir), key) for key in args.section), end="")
        return 0
    text = render(Path(args.results_dir))
    Path(args.output).write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
