"""The exact full-data estimators (``--estimator full`` / ``full-debiased``, linear and RBF) through analyze()
and cka-analyze: values against the float64 reference, one Gram build per layer, blocks under a memory
limit, the --max-memory option and its errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from click.testing import CliRunner

from cka_offline.analysis import analyze, check_options, loop
from cka_offline.cka import hsic
from cka_offline.cli.analyze import main
from cka_offline.errors import ResourceError
from cka_offline.results import load_result

from .analyze_fixtures import chain_activations, write_acts
from .cka import reference as ref

N = 60


@pytest.fixture
def two_files(tmp_path):
    a = chain_activations(N, seed=1)
    a["layer1"] = a["layer1"] * 40.0 + 50.0  # a large mean and scale: the centring must carry them
    b = chain_activations(N, widths=(5, 3), seed=2)
    return write_acts(tmp_path / "a.h5", a), write_acts(tmp_path / "b.h5", b, model="other"), a, b


def _median_bandwidth(x: np.ndarray) -> float:
    """0.5 x the median pairwise distance over all rows (N <= 1000: the bandwidth sample is every example)."""
    return 0.5 * ref.median_pairwise_distance(x)


def _reference(layers_a, layers_b, kernel: str, debiased: bool) -> np.ndarray:
    def cka(x, y):
        if kernel == "linear":
            return (ref.cka_debiased if debiased else ref.cka_biased)(x, y)
        return ref.cka_rbf_full(x, y, _median_bandwidth(x), _median_bandwidth(y), debiased)

    return np.array([[cka(x, y) for y in layers_b] for x in layers_a])


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("estimator", ["full", "full-debiased"])
def test_full_estimators_match_reference(two_files, estimator, kernel):
    pa, pb, a, b = two_files
    r = analyze([pa, pb], estimator=estimator, kernel=kernel, device="cpu")
    assert r.n_minibatches == 0 and np.all(np.isnan(r.se)) and r.params["kernel"] == kernel
    want = _reference(list(a.values()), list(b.values()), kernel, estimator == "full-debiased")
    np.testing.assert_allclose(r.matrix(0, 1), want, rtol=0, atol=1e-12)
    if kernel == "rbf":
        for label, layers in ((r.files[0].label, a), (r.files[1].label, b)):
            for name, x in layers.items():
                assert r.params["bandwidths"][label][name] == pytest.approx(_median_bandwidth(x), rel=1e-12)
    else:
        assert "bandwidths" not in r.params


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_full_debiased_equals_minibatch_with_one_minibatch_of_every_example(two_files, kernel):
    """m = n, float64: the minibatch estimate is HSIC_1 over one Gram of all examples (in shuffled order, to
    which HSIC_1 is invariant), with the same recorded bandwidths."""
    pa, pb, _, _ = two_files
    full = analyze([pa, pb], estimator="full-debiased", kernel=kernel, device="cpu")
    mini = analyze([pa, pb], batch_size=N, precision="float64", kernel=kernel, device="cpu", all_pairs=True)
    np.testing.assert_allclose(full.cka, mini.cka, rtol=0, atol=1e-12)
    assert full.params["all_pairs"] is True  # the full estimators compute every pair
    assert full.params.get("bandwidths") == mini.params.get("bandwidths")


def _count_builds(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = hsic.full_gram

    def counted(x, **kw):
        calls.append(x.shape[1])
        return real(x, **kw)

    monkeypatch.setattr(hsic, "full_gram", counted)
    return calls


def test_each_layer_gram_is_built_once(two_files, monkeypatch):
    pa, pb, a, b = two_files
    calls = _count_builds(monkeypatch)
    progress: list[tuple[int, int]] = []
    analyze([pa, pb], estimator="full", device="cpu", progress=lambda done, total: progress.append((done, total)))
    assert len(calls) == len(a) + len(b)  # L builds, not L^2
    assert progress[-1] == (N, N)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_blocks_under_a_memory_limit_give_the_same_values(two_files, monkeypatch, kernel):
    """A limit that holds two Grams besides the scratch: blocks of one layer, each pair of blocks once."""
    pa, pb, a, b = two_files
    whole = analyze([pa, pb], estimator="full-debiased", kernel=kernel, device="cpu")
    monkeypatch.setattr(loop, "blas_threads", lambda: 1)
    gram, widest = 8 * N * N, max(x.shape[1] for x in [*a.values(), *b.values()])
    scratch = N * widest * (4 + 8) + (4 if kernel == "rbf" else 1) * gram
    calls = _count_builds(monkeypatch)
    progress: list[tuple[int, int]] = []
    blocked = analyze(
        [pa, pb],
        estimator="full-debiased",
        kernel=kernel,
        device="cpu",
        full_max_bytes=scratch + 3 * gram,
        progress=lambda done, total: progress.append((done, total)),
    )
    size = len(a) + len(b)
    assert len(calls) == size * (size + 1) // 2 and len(progress) == size * (size + 1) // 2
    assert progress[-1] == (N, N)
    np.testing.assert_allclose(blocked.cka, whole.cka, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(blocked.cka, blocked.cka.T)
    with pytest.raises(
        ResourceError,
        match=r"holds all 60 examples' 60x60 float64 Gram matrices .*--max-memory "
        r"\(full_max_bytes\), to at least \d+M .*or use --estimator minibatch",
    ):
        analyze([pa, pb], estimator="full", kernel=kernel, device="cpu", full_max_bytes=scratch + 2 * gram - 1)


def test_refusal_names_the_option_and_the_default_limit_is_8_gib(two_files, monkeypatch):
    assert loop.FULL_DATA_BYTES == 8 * 2**30 and check_options().full_max_bytes is None
    monkeypatch.setattr(loop, "FULL_DATA_BYTES", 1000)
    with pytest.raises(
        ResourceError,
        match=r"full-data estimator holds all 60 examples.*limit of 0\.00 GiB; raise "
        r"it with --max-memory",
    ):
        analyze([two_files[0]], estimator="full", device="cpu")
    r = analyze([two_files[0]], estimator="full", device="cpu", full_max_bytes="64M")  # the option wins
    np.testing.assert_allclose(np.diag(r.cka), 1.0, atol=1e-12)


def test_constant_layer_is_nan_with_warning_for_rbf(tmp_path, caplog):
    a = chain_activations(N, seed=1)
    a["layer1"][:] = 0.25
    pa = write_acts(tmp_path / "a.h5", a)
    with caplog.at_level(logging.WARNING, logger="cka_offline"):
        r = analyze([pa], estimator="full", kernel="rbf", device="cpu")
    m = r.matrix()
    assert np.all(np.isnan(m[1])) and np.all(np.isnan(m[:, 1])) and np.isfinite(m[np.ix_([0, 2], [0, 2])]).all()
    assert r.params["bandwidths"][r.files[0].label]["layer1"] is None
    assert len(r.warnings) == 1 and "'layer1'" in r.warnings[0] and "constant" in r.warnings[0]


def test_max_memory_option_values():
    assert check_options(estimator="full", kernel="rbf").kernel == "rbf"  # no longer refused
    for text, value in (("8G", 8 * 2**30), ("1.5GiB", 3 * 2**29), ("512mb", 512 * 2**20), ("4096", 4096), (7, 7)):
        assert check_options(full_max_bytes=text).full_max_bytes == value
    for bad, message in (
        ("lots", "must be a size such as 8G"),
        ("8iB", "must be a size"),
        ("-1G", "must be at least 1 byte"),
        (0, "must be at least 1 byte"),
        (True, "must be an integer"),
        (2.5, "must be an integer"),
    ):
        with pytest.raises(ValueError, match=rf"full_max_bytes \(--max-memory\) {message}"):
            check_options(full_max_bytes=bad)


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_full_rbf_and_max_memory(tmp_path, two_files):
    pa, pb, a, b = two_files
    out = tmp_path / "r.json"
    res = _run([pa, pb, "--estimator", "full", "--kernel", "rbf", "--max-memory", "64M", "-o", out, "--no-hash"])
    assert res.exit_code == 0, res.output
    r = load_result(out)
    np.testing.assert_allclose(
        r.matrix(0, 1), _reference(list(a.values()), list(b.values()), "rbf", False), rtol=0, atol=1e-12
    )
    res = _run([pa, "--estimator", "full", "--max-memory", "10K"])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code != 0 and len(lines) == 1 and "raise it with --max-memory" in lines[0], res.stderr
    res = _run([pa, "--estimator", "full", "--max-memory", "lots"])
    assert res.exit_code == 2 and "--max-memory" in res.stderr and "must be a size such as 8G" in res.stderr


def test_help_documents_max_memory():
    res = _run(["--help"])
    assert res.exit_code == 0 and "--max-memory SIZE" in res.stdout and "(default 8G)" in res.stdout


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cuda_full_matches_cpu(two_files, kernel):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pa, pb, _, _ = two_files
    for estimator in ("full", "full-debiased"):
        cpu = analyze([pa, pb], estimator=estimator, kernel=kernel, device="cpu")
        gpu = analyze([pa, pb], estimator=estimator, kernel=kernel, device="cuda")
        np.testing.assert_allclose(gpu.cka, cpu.cka, rtol=0, atol=1e-12)
