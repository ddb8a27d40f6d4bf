"""Smoke test of bench/: every script runs at a tiny size (--smoke) and writes a result the report renders.

The benchmarks themselves never run in the test suite; this only keeps them from rotting. All scripts start
at once (they are subprocesses, mostly waiting on their own children) so the whole module takes about half a
minute on 2 cores. Without the peers' venv (.bench-venv, made by bench/setup_peers.sh) the scripts skip the
peers, and the peer checks here are skipped with the reason.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
PEERS = REPO / ".bench-venv" / "bin" / "python"
SCRIPTS = (
    "bench_speed",
    "bench_floor",
    "bench_accuracy",
    "bench_memory",
    "bench_extract",
    "bench_onnx",
    "bench_gpu",
    "bench_full",
    "bench_coverage",
    "bench_hundreds",
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    base = tmp_path_factory.mktemp("bench")
    results, data = base / "results", base / "data"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    procs = {}
    for name in SCRIPTS:
        # each script its own data folder: they run concurrently
        cmd = [
            sys.executable,
            str(BENCH / f"{name}.py"),
            "--smoke",
            "--results-dir",
            str(results),
            "--data-dir",
            str(data / name),
        ]
        procs[name] = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    outputs = {name: p.communicate(timeout=300)[0] for name, p in procs.items()}
    codes = {name: p.returncode for name, p in procs.items()}
    return {"results": results, "outputs": outputs, "codes": codes}


def _load(smoke: dict[str, object], name: str) -> dict:
    assert smoke["codes"][f"bench_{name}"] == 0, smoke["outputs"][f"bench_{name}"]  # type: ignore[index]
    return json.loads((smoke["results"] / f"{name}.json").read_text())  # type: ignore[operator]


def _peers_or_skip() -> None:
    if not PEERS.exists():
        pytest.skip(f"peers not checked: {PEERS} is missing (create it with bench/setup_peers.sh)")


def test_speed(smoke: dict[str, object]) -> None:
    d = _load(smoke, "speed")
    assert d["analyze"]["seconds"] > 0 and d["analyze"]["minibatches"] == 4
    assert d["machine"]["cores"] and d["versions"]["cka_offline"]
    _peers_or_skip()
    (row,) = d["peers"]
    assert row["peer"] == "pytorch-cka" and row["ok"], row
    assert row["batches_run"] == row["batches_total"] == 4 and row["ratio"] > 0


def test_accuracy(smoke: dict[str, object]) -> None:
    d = _load(smoke, "accuracy")
    ours = {r["precision"]: r for r in d["rows"] if r["impl"] == "cka-analyze"}
    # the smoke data are +50-shifted: cka-analyze must still agree with the float64 reference
    assert ours["float32"]["err_all"] < 1e-5 and ours["float64"]["err_all"] < 1e-10
    _peers_or_skip()
    peer = next(r for r in d["rows"] if r["impl"] == "torch-cka")
    # torch-cka's uncentred float32 Grams break on shifted data: it fails (NaN assertion) or is far off
    assert not peer["ok"] or peer["nan"] or peer["err_ab"] > 1e-4, peer


def test_floor(smoke: dict[str, object]) -> None:
    d = _load(smoke, "floor")
    for dt in ("float32", "float64"):
        assert d["floors"][dt]["gemm_rate_flops"] > 1e8
        assert d["analyze"][dt]["end_to_end_s"] > 0
    widths = d["workload"]["widths_a"] + d["workload"]["widths_b"]
    m, n = d["workload"]["m"], d["workload"]["n"]
    assert math.isclose(d["gram_flops"], (n // m) * 2 * m * m * sum(widths))
    assert math.isclose(d["symmetric_gram_flops"], (n // m) * m * (m + 1) * sum(widths))
    f32 = d["floors"]["float32"]
    assert f32["floor_symmetric_s"] < f32["floor_peak_s"] and d["target_ratio"] == 1.0
    assert d["target_met"] == (f32["ratio_end_to_end_vs_peak"] <= 1.0)
    assert all(v > 0 for v in d["gram_methods_s"]["float64"].values())
    assert d["bytes"] == 4 * n * sum(widths)


def test_memory(smoke: dict[str, object]) -> None:
    d = _load(smoke, "memory")
    assert [r["n"] for r in d["analyze"]] == [256, 1024]
    assert all(r["max_rss_mb"] > 10 for r in d["analyze"] + d["extract"])
    assert [r["n"] for r in d["extract"]] == [64, 256]


def test_extract(smoke: dict[str, object]) -> None:
    d = _load(smoke, "extract")
    assert {(r["plugin"], r["reduction"]) for r in d["rows"]} == {("torch", "mean"), ("onnx", "mean")}
    assert all(r["extract_s"][0] > 0 and r["bare_s"][0] > 0 for r in d["rows"])
    # flatten against the disk: 128 more inputs of 196,608 float32 values each, and the floor it is held to
    disk = d["flatten_vs_disk"]
    assert disk["n"] == [128, 256] and disk["file_bytes"][1] - disk["file_bytes"][0] == disk["marginal_bytes"]
    assert abs(disk["marginal_bytes"] / (128 * 196_608 * 4) - 1) < 0.01
    assert disk["disk_fsync_bytes_per_s"] > 0 and disk["disk_page_cache_bytes_per_s"] > 0
    assert disk["floor_s"] == max(disk["marginal_bare_s"], disk["marginal_bytes"] / disk["disk_fsync_bytes_per_s"])
    assert disk["ratio"] == disk["marginal_extract_s"] / disk["floor_s"]
    assert disk["target_met"] == (disk["ratio"] <= disk["target_ratio"] == 1.25)


def test_onnx(smoke: dict[str, object]) -> None:
    d = _load(smoke, "onnx")
    rows = {(r["selection"], r["reduction"]): r for r in d["in_process"]}
    assert set(rows) == {("post-activation", "mean"), ("pre-activation", "mean")}
    assert all(r["bare_s"] > 0 and r["plugin_run_s"] > 0 for r in rows.values())
    # the graph facts the section reports: post-activation Convs keep their Relu, pre-activation ones cannot
    assert rows["post-activation", "mean"]["graph"]["fused_conv_relu"] == 4
    assert rows["pre-activation", "mean"]["graph"]["relu_alone"] == 3
    assert all(r["graph"]["reorder_whole"] == 0 for r in rows.values())


def test_gpu(smoke: dict[str, object]) -> None:
    d = _load(smoke, "gpu")
    if d.get("skipped"):
        assert "CUDA" in d["skipped"]
    else:
        assert all(r["max_err"] < 1e-5 for r in d["rows"])


def test_full(smoke: dict[str, object]) -> None:
    d = _load(smoke, "full")
    assert d["workload"]["m"] == d["workload"]["n"]  # the baseline is one minibatch of every example
    assert [(r["kernel"], r["estimator"]) for r in d["rows"]] == [
        (k, e) for k in ("linear", "rbf") for e in ("full", "full-debiased")
    ]
    for r in d["rows"]:
        assert r["seconds"] > 0 and r["minibatch_seconds"] > 0
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and math.isfinite(r["ratio_analysis"])
        assert math.isclose(r["ratio"], r["seconds"] / r["minibatch_seconds"])
        assert r["target_met"] == (r["ratio"] <= 2.0)
    assert d["max_ratio"] == max(r["ratio"] for r in d["rows"])
    # full-debiased is HSIC_1 of one Gram of all examples: the one-minibatch estimate to float64 rounding
    checks = [r["max_abs_vs_one_minibatch"] for r in d["rows"] if "max_abs_vs_one_minibatch" in r]
    assert len(checks) == 2 and all(c < 1e-10 for c in checks)


def test_coverage(smoke: dict[str, object]) -> None:
    d = _load(smoke, "coverage")
    assert [(r["kernel"], r["epochs"]) for r in d["rows"]] == [(k, e) for k in ("linear", "rbf") for e in (1, 2, 4)]
    for kernel in ("linear", "rbf"):
        assert 0 < d["truth"][kernel]["cka"] < 1
    for r in d["rows"]:
        assert (r["replicates"], r["n"], r["m"]) == (24, 128, 16)
        assert 0 <= r["coverage"] <= 1 and 0 <= r["below"] <= 1 and 0 <= r["above"] <= 1
        assert math.isclose(r["coverage"] + r["below"] + r["above"], 1.0)
        assert math.isfinite(r["se_over_sd"]) and r["se_over_sd"] > 0
        assert r["n_groups"] >= 2 and r["minibatches"] == r["epochs"] * r["n"] // r["m"]
        assert r["true"] == d["truth"][r["kernel"]]["cka"] and abs(r["bias"]) < 0.2
    assert all(len(r["bandwidth_ratio"]["mean"]) == 2 for r in d["rows"] if r["kernel"] == "rbf")


def test_hundreds(smoke: dict[str, object]) -> None:
    d = _load(smoke, "hundreds")
    widths = d["workload"]["widths_a"] + d["workload"]["widths_b"]
    n_a, n_b, size = len(d["workload"]["widths_a"]), len(d["workload"]["widths_b"]), len(widths)
    m, n = d["workload"]["m"], d["workload"]["n"]
    assert math.isclose(d["gram_flops"], (n // m) * 2 * m * m * sum(widths))
    requested, every = d["rows"]
    cross = (n // m) * 2 * size**2 * m
    assert math.isclose(requested["pair_flops"], (n // m) * 2 * m * m * (n_a * n_b + size) + cross)
    assert math.isclose(every["pair_flops"], (n // m) * 2 * m * m * size**2 + cross)
    assert requested["variant"] == "requested" and every["variant"] == "all_pairs"
    for r in d["rows"]:
        assert r["seconds"] > 0 and r["floor_s"] > 0 and r["floor_f32_s"] > 0 and r["anon_rss_mb"] > 10
    assert d["within_file_not_computed"] is True and d["max_abs_ab_diff"] <= 1e-12
    assert d["memory_quarter"]["n"] == n // 4 and d["memory_quarter"]["anon_rss_mb"] > 10
    parts = d["breakdown"]
    assert parts["grams_one_core_s"] > 0 and parts["hsic_requested_s"] >= 0 and parts["hsic_all_pairs_s"] >= 0


def test_report(smoke: dict[str, object], tmp_path: Path) -> None:
    for name in SCRIPTS:
        _load(smoke, name.removeprefix("bench_"))
    out = tmp_path / "benchmarks.md"
    subprocess.run(
        [sys.executable, str(BENCH / "report.py"), "--results-dir", str(smoke["results"]), "--output", str(out)],
        check=True,
        cwd=REPO,
    )
    text = out.read_text()
    titles = ("1. Analysis speed", "2. The hardware floor", "3. Accuracy", "4. Memory", "5. Extraction", "6. GPU")
    for title in (
        *titles,
        "5b. ONNX extraction",
        "7. Exact full-data estimators",
        "8. Coverage of the intervals",
        "9. Workload H",
    ):
        assert f"## {title}" in text
    assert "could not be rendered" not in text and "No result yet" not in text
    assert "miss the bandwidth's own sampling variation" in text
    assert "**Flattened maps against the disk.**" in text and "| GB written per 128 inputs |" in text


def test_report_single_section_and_missing(smoke: dict[str, object], tmp_path: Path) -> None:
    def section(results: object, key: str) -> str:
        cmd = [sys.executable, str(BENCH / "report.py"), "--results-dir", str(results), "--section", key]
        return subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True).stdout

    assert section(smoke["results"], "coverage").startswith("## 8. Coverage of the intervals\n")
    assert "| rbf | full-debiased |" in section(smoke["results"], "full")
    assert "No result yet: run `python bench/bench_full.py`." in section(tmp_path, "full")
