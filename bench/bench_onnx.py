"""Question 5b: what does ONNX extraction cost on top of the bare onnxruntime session, per kind of layer?

The model is bench/cnn.py exported to ONNX (TorchScript exporter, opset 17). Two selections of 4 layers:

- post-activation: relu1..relu4, the outputs of Conv + Relu pairs that onnxruntime fuses into one node;
- pre-activation: conv1..conv4, the Conv outputs feeding a Relu: exposing them necessarily breaks the fusion;

each with ``--reduction mean`` (taken inside the graph) and ``flatten`` (every value leaves the graph).

"Bare" is what a user runs: ``onnxruntime.InferenceSession(cnn.onnx)`` with default session options (every
graph optimisation on, onnxruntime's threads) and ``session.run(None, {"x": batch})``, the whole network to
its logits. Batch 64 on both sides. Three measurements:

1. ``cka-extract`` (the installed command) against the bare loop, each a subprocess on N and 2N inputs; the
   marginal seconds (time(2N) - time(N)) cancel start-up and imports; best of ``--repeats``.
2. In this one process, alternated ``--in-process-repeats`` times (medians): the bare loop on N inputs, the
   extractor's own ``run`` over the same batches (the plugin alone: the session the extractor builds, no
   file), and ``cka_offline.extract`` marginal between N and 2N inputs (the whole pipeline, HDF5 file included).
   The target (at most 1.3x the bare session, post-activation mean) is read from this extract ratio.
3. The graph onnxruntime optimised for the extractor's session (``optimized_model_filepath``): Convs that
   carry their Relu, Relu nodes left on their own, and whole tensors reordered out of the NCHWc layout.

    python bench/bench_onnx.py [--quick | --smoke]
    python bench/bench_onnx.py --bare --model M --inputs x.npz   (the bare loop, used internally)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib as bl

BENCH = Path(__file__).resolve().parent
BATCH = 64
SELECTIONS = {
    "post-activation": ("relu1", "relu2", "relu3", "relu4"),
    "pre-activation": ("conv1", "conv2", "conv3", "conv4"),
}
TARGET = 1.3


def bare(model: str, inputs: str) -> None:
    """The bare loop as a process: default session, every batch to the logits; prints the loop seconds."""
    import numpy as np
    import onnxruntime as ort

    x = np.load(inputs)["x"]
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    t = time.perf_counter()
    for start in range(0, len(x), BATCH):
        session.run(None, {"x": x[start : start + BATCH]})
    print(json.dumps({"loop_s": time.perf_counter() - t}))


def through_command(model: str, inputs: dict[int, str], repeats: int, directory: Path, reductions: list[str]) -> list:
    def best(cmd: list[str]) -> bl.Run:
        return min((bl.run(cmd) for _ in range(repeats)), key=lambda r: r.seconds)

    n1, n2 = sorted(inputs)
    bare_runs = {n: best([sys.executable, __file__, "--bare", "--model", model, "--inputs", inputs[n]]) for n in inputs}
    marginal_bare = bare_runs[n2].seconds - bare_runs[n1].seconds
    rows = []
    for selection, layers in SELECTIONS.items():
        for reduction in reductions:
            ext = {}
            for n in inputs:
                out = directory / f"cmd-{selection}-{reduction}-{n}.h5"
                cmd = [*bl.cli("cka-extract"), model, "-i", inputs[n], "-o", str(out), "--layers", ",".join(layers)]
                cmd += ["--reduction", reduction, "--batch-size", str(BATCH), "--overwrite", "--quiet"]
                ext[n] = best(cmd)
                out.unlink(missing_ok=True)
            marginal = ext[n2].seconds - ext[n1].seconds
            rows.append(
                {
                    "selection": selection,
                    "reduction": reduction,
                    "n": [n1, n2],
                    "extract_s": [ext[n].seconds for n in inputs],
                    "bare_s": [bare_runs[n].seconds for n in inputs],
                    "marginal_extract_s": marginal,
                    "marginal_bare_s": marginal_bare,
                    "ratio": marginal / marginal_bare if marginal_bare > 0 else float("nan"),
                }
            )
            print(
                f"cka-extract {selection:15s} {reduction:7s}: per {n1} inputs {marginal:6.2f} s, bare session "
                f"{marginal_bare:6.2f} s -> {rows[-1]['ratio']:.2f}x"
            )
    return rows


def in_process(model: str, inputs: dict[int, str], repeats: int, directory: Path, reductions: list[str]) -> list:
    import numpy as np
    import onnxruntime as ort

    from cka_offline import extract
    from cka_offline_onnx.extractor import OnnxExtractor

    n1, n2 = sorted(inputs)
    x = {n: np.load(path)["x"] for n, path in inputs.items()}
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])

    def bare_loop() -> float:
        t = time.perf_counter()
        for start in range(0, n1, BATCH):
            session.run(None, {"x": x[n1][start : start + BATCH]})
        return time.perf_counter() - t

    def plugin_loop(ex: OnnxExtractor, layers: tuple[str, ...]) -> float:
        t = time.perf_counter()
        for start in range(0, n1, BATCH):
            ex.run({"x": x[n1][start : start + BATCH]}, layers)
        return time.perf_counter() - t

    def extraction(n: int, layers: tuple[str, ...], reduction: str) -> float:
        out = directory / f"in-process-{reduction}-{n}.h5"
        t = time.perf_counter()
        extract(model, inputs[n], out, layers=list(layers), reduction=reduction, batch_size=BATCH, overwrite=True,
                progress=False)  # fmt: skip
        seconds = time.perf_counter() - t
        out.unlink(missing_ok=True)
        return seconds

    rows = []
    for selection, layers in SELECTIONS.items():
        for reduction in reductions:
            ex = OnnxExtractor(model)
            ex.run({"x": x[n1][:BATCH]}, layers)  # as the core does: the first batch whole, then the mean in the graph
            if reduction == "mean":
                ex.reduce_early({name: "mean" for name in layers})
            graph = optimized_graph(ex, layers, directory)
            extraction(n1, layers, reduction)  # warm-up
            bare_loop()
            plugin_loop(ex, layers)
            bare_m, plugin_m, ext_m = [], [], []
            for _ in range(repeats):
                bare_m.append(bare_loop())
                plugin_m.append(plugin_loop(ex, layers))
                ext_m.append(extraction(n2, layers, reduction) - extraction(n1, layers, reduction))
            ex.close()
            b, p, e = (statistics.median(v) for v in (bare_m, plugin_m, ext_m))
            rows.append(
                {
                    "selection": selection,
                    "reduction": reduction,
                    "n": n1,
                    "repeats": repeats,
                    "bare_s": b,
                    "plugin_run_s": p,
                    "marginal_extract_s": e,
                    "plugin_ratio": p / b if b > 0 else float("nan"),
                    "ratio": e / b if b > 0 else float("nan"),
                    "spread_s": {k: [min(v), max(v)] for k, v in (("bare", bare_m), ("plugin", plugin_m), ("extract", ext_m))},
                    "graph": graph,
                }
            )  # fmt: skip
            print(
                f"in process  {selection:15s} {reduction:7s}: per {n1} inputs extract {e:6.2f} s, plugin run "
                f"{p:6.2f} s, bare session {b:6.2f} s -> {e / b:.2f}x ({p / b:.2f}x plugin alone); graph {graph}"
            )
    return rows


def optimized_graph(ex: Any, layers: tuple[str, ...], directory: Path) -> dict[str, int]:
    """Counts in the graph onnxruntime optimises for the session ``ex`` runs for ``layers`` (its own graph
    and session options, with ``optimized_model_filepath`` set)."""
    import onnx
    import onnxruntime as ort

    from cka_offline_onnx import extractor as onnx_extractor

    tensors = ex._resolve(layers).values()
    wanted = tuple(sorted(t + onnx_extractor._MEAN_SUFFIX if t in ex._early else t for t in tensors))
    opts = ex._session_options()
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(ex._graph_bytes(wanted), opts, providers=["CPUExecutionProvider"])
        model = onnx.load(opts.optimized_model_filepath)
    nodes = list(model.graph.node)
    producers = {o: n.op_type for n in nodes for o in n.output}
    fused = sum(1 for n in nodes for a in n.attribute if a.name == "activation" and a.s == b"Relu")
    reordered = [n for n in nodes if n.op_type == "ReorderOutput"]
    return {
        "nodes": len(nodes),
        "fused_conv_relu": fused,
        "relu_alone": sum(1 for n in nodes if n.op_type == "Relu"),
        "reorder_whole": sum(1 for n in reordered if producers.get(n.input[0]) != "GlobalAveragePool"),
        "reorder_pooled": sum(1 for n in reordered if producers.get(n.input[0]) == "GlobalAveragePool"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.common_args(p)
    p.add_argument("--n", type=int, help="N (the runs use N and 2N inputs)")
    p.add_argument("--repeats", type=int, help="subprocess runs per measurement, best kept (default 2; quick 1)")
    p.add_argument("--in-process-repeats", type=int, help="alternations in one process, medians (default 5)")
    p.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bare:
        bare(args.model, args.inputs)
        return 0
    size = bl.size_of(args)
    n1 = args.n or {"full": 2048, "quick": 256, "smoke": 64}[size]
    repeats = args.repeats or {"full": 2, "quick": 1, "smoke": 1}[size]
    in_repeats = args.in_process_repeats or {"full": 5, "quick": 3, "smoke": 1}[size]
    reductions = ["mean"] if args.smoke else ["mean", "flatten"]
    directory = bl.data_dir(args, "onnx-" + size)
    directory.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(BENCH))
    import cnn

    model, inputs = cnn.prepare(str(directory), (n1, 2 * n1))
    load_before = os.getloadavg()
    command_rows = through_command(model, inputs, repeats, directory, reductions)
    process_rows = in_process(model, inputs, in_repeats, directory, reductions)
    post_mean = next(r for r in process_rows if r["selection"] == "post-activation" and r["reduction"] == "mean")
    bl.write_result(
        "onnx",
        {
            "size": size,
            "batch_size": BATCH,
            "selections": {k: list(v) for k, v in SELECTIONS.items()},
            "through_command": command_rows,
            "in_process": process_rows,
            "load_average": {"before": load_before, "after": os.getloadavg()},
            "target_ratio": TARGET,
            "target_met": post_mean["ratio"] <= TARGET,
        },
        args.results_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
