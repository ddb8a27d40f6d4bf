"""cka-analyze with click's CliRunner: success path, outputs, failures as one line, fast import."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from cka_offline.cli.analyze import main
from cka_offline.results import load_result

from ..analyze_fixtures import chain_activations, write_acts


@pytest.fixture
def files(tmp_path):
    a = write_acts(tmp_path / "a.h5", chain_activations(64, seed=1), model="net_a")
    b = write_acts(tmp_path / "b.h5", chain_activations(64, seed=2), model="net_b")
    return a, b


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_success_writes_result_and_plot_and_prints_summary(tmp_path, files):
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    res = run([*files, "-m", "16", "--seed", "3", "-o", out, "--plot", plot, "--layers-b", "layer0,layer2"])
    assert res.exit_code == 0, res.output
    assert "A = " in res.stdout and "best layer of B" in res.stdout and "layer identification" not in res.stdout
    r = load_result(out)
    assert r.files[1].layers == ["layer0", "layer2"] and r.params["seed"] == 3 and r.params["batch_size"] == 16
    assert r.files[0].provenance["model"] == "net_a"
    assert plot.stat().st_size > 1000
    assert "wrote" in res.stderr


def test_all_pairs_fills_the_within_file_blocks(tmp_path, files):
    """By default the A-A and B-B pairs off the diagonal are not computed (null in the JSON, params say so);
    --all-pairs computes them, and the A-B block is the same (float64 rounding)."""
    run([*files, "-m", "16", "--precision", "float64", "-o", tmp_path / "p.json", "--quiet"])
    res = run([*files, "-m", "16", "--precision", "float64", "-o", tmp_path / "a.json", "--all-pairs", "--quiet"])
    assert res.exit_code == 0, res.output
    part, every = load_result(tmp_path / "p.json"), load_result(tmp_path / "a.json")
    assert part.params["all_pairs"] is False and every.params["all_pairs"] is True
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["cka"][0][1] is None and doc["cka"][0][0] == pytest.approx(1.0)
    assert np.isnan(part.matrix(0, 0)[0, 1]) and not np.isnan(every.cka).any()
    np.testing.assert_allclose(part.matrix(0, 1), every.matrix(0, 1), rtol=0, atol=1e-13)
    assert "--all-pairs" in run(["--help"]).stdout


def test_hash_recorded_unless_no_hash(tmp_path, files):
    import hashlib

    run([*files, "-m", "16", "-o", tmp_path / "h.json"])
    run([*files, "-m", "16", "-o", tmp_path / "n.json", "--no-hash"])
    hashed, plain = load_result(tmp_path / "h.json"), load_result(tmp_path / "n.json")
    assert hashed.files[0].sha256 == [hashlib.sha256(open(files[0], "rb").read()).hexdigest()]
    assert plain.files[0].sha256 in ([], [""])
    np.testing.assert_array_equal(hashed.cka, plain.cka)


def test_three_files_csv_and_one_plot_per_pair(tmp_path, files):
    c = write_acts(tmp_path / "c.h5", chain_activations(64, seed=3))
    res = run(
        [*files, c, "-m", "8", "-o", tmp_path / "r.out", "--format", "csv", "--plot", tmp_path / "p.svg", "--quiet"]
    )
    assert res.exit_code == 0, res.output
    assert res.stdout == res.stderr == ""  # -m 8: enough jackknife groups, so no warning either
    assert sorted(p.name for p in tmp_path.glob("p_*.svg")) == ["p_0-1.svg", "p_0-2.svg", "p_1-2.svg"]
    assert open(tmp_path / "r.out").readline().startswith("file_a,layer_a,file_b,layer_b,cka")


def test_constant_layer_warning_is_printed(tmp_path):
    acts = chain_activations(40, seed=1)
    acts["layer2"][:] = 1.0
    path = write_acts(tmp_path / "k.h5", acts)
    res = run([path, "-m", "8", "--estimator", "full-debiased"])
    assert res.exit_code == 0, res.output
    assert "warnings:" in res.stdout and "'layer2'" in res.stdout
    assert (res.stdout + res.stderr).count("'layer2' of") == 1  # once: in the summary, not also logged


def test_quiet_prints_no_summary_but_the_warnings_once_and_still_saves(tmp_path):
    acts = chain_activations(40, seed=1)
    acts["layer2"][:] = 1.0
    path = write_acts(tmp_path / "k.h5", acts)
    res = run([path, "-m", "8", "--estimator", "full-debiased", "-q", "-o", tmp_path / "r.json"])
    assert res.exit_code == 0, res.output
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cka-analyze: warning: layer 'layer2' of "), res.stderr
    assert load_result(tmp_path / "r.json").warnings == [lines[0][len("cka-analyze: warning: ") :]]


def test_held_warnings_pass_other_loggers_and_come_back_after_an_error(caplog):
    import logging

    from cka_offline.cli.common import HeldWarnings

    logging.basicConfig(force=True)
    root = logging.getLogger()
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    root.addHandler(handler)
    try:
        with HeldWarnings() as held:
            logging.getLogger("cka_offline.analysis.runner").warning("in the result")
            logging.getLogger("cka_offline.analysis.grams").warning("not in the result")
            logging.getLogger("cka_offline.cka.hsic").warning("full CKA undefined")
            logging.getLogger("cka_offline.store").warning("elsewhere")
        assert seen == ["elsewhere"]
        held.release(["in the result"])
        assert seen == ["elsewhere", "not in the result"]  # the math's: summarized by the result's warnings
        with pytest.raises(RuntimeError), HeldWarnings():
            logging.getLogger("cka_offline.analysis").warning("before the error")
            raise RuntimeError
        assert seen[-1] == "before the error"
    finally:
        root.removeHandler(handler)


@pytest.mark.parametrize(
    "args,message",
    [
        (["{a}", "{missing}"], "no such file"),
        (["{a}", "--layers", "nope"], "no layer matches 'nope'"),
        (["{a}", "--device", "cuda:7"], "cuda:7"),
        (["{a}", "-o", "{b}"], "already exists; pass --overwrite"),
        (["{a}", "-o", "{a}", "--overwrite"], "is one of the inputs"),
        (["{a}", "-o", "{tmp}/r.xml"], "cannot tell the result format"),
        (["{a}", "--plot", "{tmp}/p.gif"], "cannot tell the plot format"),
    ],
)
def test_known_errors_are_one_line(tmp_path, files, args, message):
    if "cuda" in args[-1]:
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    values = {"a": files[0], "b": files[1], "missing": tmp_path / "missing.h5", "tmp": tmp_path}
    res = run([arg.format(**values) for arg in args])
    assert res.exit_code == 3  # a data error (docs/reliability.md)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cka-analyze: error: ") and message in lines[0], res.stderr
    assert res.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "b.h5"]  # nothing half-written


def test_bad_option_value_is_a_usage_error(files):
    res = run([files[0], "--estimator", "full", "--max-memory", "lots"])
    assert res.exit_code == 2 and "Invalid value for '--max-memory': 'lots' must be a size such as 8G" in res.stderr


def test_help_has_description_and_example():
    res = run(["--help"])
    assert res.exit_code == 0
    assert "Example:" in res.stdout and "cka-analyze resnet_a.h5 resnet_b.h5" in res.stdout
    assert "--intersection" in res.stdout and "--rbf-fraction" in res.stdout


def test_import_does_not_load_torch_or_h5py():
    code = (
        "import sys, cka_offline.cli.analyze\n"
        "heavy = [m for m in ('torch', 'h5py', 'matplotlib', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_json_result_is_strict_json(tmp_path, files):
    out = tmp_path / "r.json"
    assert run([files[0], "-m", "16", "-o", out]).exit_code == 0
    doc = json.loads(out.read_text())
    assert np.allclose(np.diag(np.array(doc["cka"], dtype=float)), 1.0, atol=1e-6)


def test_a_quoted_glob_of_whole_files_says_how_to_compare_them(tmp_path):
    for seed in (1, 2, 3):
        write_acts(tmp_path / f"r18_s{seed}.h5", chain_activations(32, seed=seed))
    res = run([str(tmp_path / "r18_s*.h5"), "-m", "8"])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code != 0 and len(lines) == 1, res.stderr
    assert "matched 3 files that are not shards of one file" in lines[0] and "r18_s1.h5" in lines[0]
    assert "pass them as separate files (unquoted on the command line, e.g. cka-analyze r18_s*.h5" in lines[0]
    res = run([*sorted(tmp_path.glob("r18_s*.h5")), "-m", "8", "-q"])  # what the shell gives unquoted
    assert res.exit_code == 0, res.output


def test_a_self_comparison_shows_each_layers_most_similar_other_layer(tmp_path, files):
    """Against itself every layer's best match is itself (CKA 1): the summary names the most similar *other*
    layer instead, taken here from the saved matrix with the diagonal left out."""
    out = tmp_path / "self.json"
    res = run([files[0], "-m", "16", "-o", out])
    assert res.exit_code == 0, res.output
    r = load_result(out)
    cka = r.pair(0, 0).cka.copy()
    np.fill_diagonal(cka, -np.inf)
    names = r.files[0].layers
    lines = res.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "most similar other layer" in line)
    for a, line in enumerate(lines[header + 1 : header + 1 + len(names)]):
        layer_a, layer_b, value = line.split()[:3]
        assert layer_a == names[a] and layer_b == names[int(np.argmax(cka[a]))] != layer_a
        assert float(value) == pytest.approx(cka[a].max(), abs=5e-4)
    assert "best layer of B" not in res.stdout
