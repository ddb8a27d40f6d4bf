"""analyze(): minibatch plan, alignment, estimators and errors against an independent float64 reference."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from cka_offline.analysis import (
    MinibatchPlan,
    align_ids,
    analyze,
    batch_sizes,
    check_options,
    plan_minibatches,
    resolve_device,
)
from cka_offline.errors import (
    ActivationValueError,
    AlignmentError,
    DeviceError,
    InsufficientDataError,
    LayerSelectionError,
    ResourceError,
)

from .analyze_fixtures import chain_activations, not_computed, plan_of, ref_full_linear, ref_minibatch, write_acts

N = 120


@pytest.fixture
def two_files(tmp_path):
    a = chain_activations(N, seed=1)
    b = chain_activations(N, widths=(5, 3), seed=2)
    return write_acts(tmp_path / "a.h5", a), write_acts(tmp_path / "b.h5", b, model="other"), a, b


def ref_of(layers, result, sigmas=None, ids=None):
    """The float64 reference of ``result``: the same minibatches and jackknife groups; NaN where the result
    computes nothing (within-file pairs of several files, unless ``params["all_pairs"]``)."""
    plan = plan_of(result, ids)
    batches = plan.minibatches()
    cka, se = ref_minibatch(layers, batches, sigmas=sigmas, groups=[plan.group_of(b) for b in range(len(batches))])
    skipped = not_computed([len(f.layers) for f in result.files], result.params["all_pairs"])
    cka[skipped] = se[skipped] = np.nan
    return cka, se


# ---------------------------------------------------------------- the plan
@pytest.mark.parametrize("n", [4, 5, 7, 8, 9, 31, 255, 256, 257, 259, 1000])
@pytest.mark.parametrize("m", [4, 5, 8, 32, 256])
def test_batch_sizes_tail_rule(n, m):
    sizes = batch_sizes(n, m)
    assert sum(sizes) == n
    assert min(sizes) >= 4
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)
    if m >= 8:
        assert max(sizes) <= m
        assert len(sizes) == -(-n // m)


def test_batch_sizes_examples():
    assert batch_sizes(257, 256) == [129, 128]
    assert batch_sizes(1000, 256) == [250] * 4
    assert batch_sizes(9, 4) == [5, 4]  # ceil(9/4) = 3 batches would leave one of 2
    with pytest.raises(InsufficientDataError, match="at least 4 examples.*got 3"):
        batch_sizes(3, 256)
    with pytest.raises(InsufficientDataError, match="batch size must be at least 4"):
        batch_sizes(100, 3)


@pytest.mark.parametrize("shuffle", ["uniform", "blocks"])
def test_plan_is_a_seeded_permutation_per_epoch(shuffle):
    kw = dict(seed=3, epochs=2, block_rows=10, buffer_blocks=3, shuffle=shuffle)
    plan = plan_minibatches(100, 16, **kw)
    assert len(plan) == 2 * len(batch_sizes(100, 16))
    assert [len(b) for b in plan] == 2 * batch_sizes(100, 16)
    half = len(plan) // 2
    for epoch in (plan[:half], plan[half:]):
        assert sorted(np.concatenate(epoch).tolist()) == list(range(100))
    assert not np.array_equal(np.concatenate(plan[:half]), np.concatenate(plan[half:]))
    again = plan_minibatches(100, 16, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(plan, again))
    other = plan_minibatches(100, 16, **{**kw, "seed": 4, "epochs": 1})
    assert not np.array_equal(np.concatenate(other), np.concatenate(plan[:half]))
    if shuffle == "blocks":  # epoch e uses seed + e: epoch 1 of seed 3 is epoch 0 of seed 4
        assert np.array_equal(np.concatenate(other), np.concatenate(plan[half:]))


def test_blocks_shuffle_buffer_holds_whole_blocks():
    block, per_buffer = 10, 3
    order = np.concatenate(
        plan_minibatches(100, 16, seed=0, block_rows=block, buffer_blocks=per_buffer, shuffle="blocks")
    )
    for start in range(0, 90, block * per_buffer):
        blocks = set((order[start : start + block * per_buffer] // block).tolist())
        assert len(blocks) == per_buffer  # each buffer is exactly 3 whole chunk-aligned blocks
    first = order[: block * per_buffer]
    assert not np.all(np.diff(first) == 1)  # rows shuffled inside the buffer


def test_uniform_plan_draws_every_pair_of_examples_alike():
    """Uniform minibatches: over seeds, any two examples share a minibatch equally often, whatever their
    positions (the block shuffle puts neighbours together far more often)."""
    n, m, seeds = 40, 10, 400
    together = {"uniform": np.zeros((n, n)), "blocks": np.zeros((n, n))}
    for shuffle, counts in together.items():
        for seed in range(seeds):
            for batch in plan_minibatches(n, m, seed=seed, shuffle=shuffle, block_rows=10, buffer_blocks=1):
                counts[np.ix_(batch, batch)] += 1
    off = ~np.eye(n, dtype=bool)
    expected = seeds * (m - 1) / (n - 1)  # P(two examples share a minibatch) = (m-1)/(n-1)
    uniform = together["uniform"][off]
    assert abs(uniform.mean() - expected) < 1e-9  # every minibatch has m examples: exact on average
    assert uniform.std() < 0.25 * expected  # binomial spread only
    assert together["blocks"][0, 1] > 3 * expected  # neighbours in one chunk: always together


def test_uniform_plan_groups_own_examples_across_epochs():
    plan = MinibatchPlan(200, 16, seed=1, epochs=3, n_groups=5)
    batches = plan.minibatches()
    assert plan.groups == 5
    owner = {}
    for b, batch in enumerate(batches):
        for position in batch.tolist():
            assert owner.setdefault(position, plan.group_of(b)) == plan.group_of(b)  # never in two groups
    assert sorted(owner) == list(range(200))
    few = MinibatchPlan(40, 16, n_groups=16)  # 3 minibatches an epoch: 3 groups
    assert few.per_epoch == 3 and few.groups == 3
    # several epochs: a group holds two or more minibatches, which every epoch mixes anew
    assert MinibatchPlan(40, 16, epochs=2).groups == 1 and MinibatchPlan(400, 16, epochs=2).groups == 12
    again = MinibatchPlan(64, 8, epochs=2, n_groups=4).minibatches()
    assert not any(np.array_equal(np.sort(x), np.sort(y)) for x, y in zip(again[:8], again[8:]))


def test_uniform_plan_depends_on_the_ids_not_their_order():
    ids = np.random.default_rng(0).permutation(1000)[:60] * 7
    perm = np.random.default_rng(1).permutation(60)
    a = plan_minibatches(60, 8, seed=2, epochs=2, ids=ids)
    b = plan_minibatches(60, 8, seed=2, epochs=2, ids=ids[perm])
    for x, y in zip(a, b):  # the same ids in every minibatch
        assert sorted(ids[x].tolist()) == sorted(ids[perm][y].tolist())


# ---------------------------------------------------------------- against the reference
@pytest.mark.parametrize("precision,tol", [("float64", 1e-10), ("float32", 1e-5)])
def test_two_files_match_reference(two_files, precision, tol):
    pa, pb, a, b = two_files
    r = analyze([pa, pb], batch_size=16, seed=5, precision=precision, device="cpu", n_groups=4)
    plan = plan_of(r).minibatches()
    assert [len(x) for x in plan] == batch_sizes(N, 16)
    cka, se = ref_of([*a.values(), *b.values()], r)
    np.testing.assert_allclose(r.cka, cka, atol=tol, rtol=0)
    np.testing.assert_allclose(r.se, se, atol=tol, rtol=0)
    block = r.pair(0, 1)
    # 95% interval: cka -+ t_{G-1=3, 0.975} * se with t = 3.1824463
    np.testing.assert_allclose(block.high - block.cka, 3.182446305284263 * block.se, rtol=1e-6)
    np.testing.assert_allclose(block.cka - block.low, 3.182446305284263 * block.se, rtol=1e-6)
    assert r.matrix(0, 1).shape == (3, 2)
    np.testing.assert_allclose(r.matrix(0, 1), cka[:3, 3:], atol=tol)
    assert r.pairs == [(0, 1)]
    assert [f.layers for f in r.files] == [list(a), list(b)]
    assert r.files[0].provenance["model"] == "chain" and r.files[1].provenance["model"] == "other"
    assert len(r.files[0].sha256[0]) == 64
    assert r.n_examples == N and r.n_minibatches == len(plan)
    assert r.params["precision"] == precision and r.params["device"] == "cpu"
    assert r.params["all_pairs"] is False  # the default: A-A and B-B pairs off the diagonal are not computed
    assert np.isnan(r.cka[0, 1]) and np.isnan(r.se[3, 4]) and np.isnan(r.low[1, 0]) and np.isnan(r.high[4, 3])


@pytest.mark.parametrize("shuffle", ["uniform", "blocks"])
def test_epochs_small_buffer_and_float16_match_reference(tmp_path, shuffle):
    a = chain_activations(90, seed=1)
    pa = write_acts(tmp_path / "a.h5", a, chunk_rows=8, dtype="float16")
    # a buffer budget below one minibatch: minibatches span several shuffle buffers
    r = analyze(
        [pa],
        batch_size=16,
        epochs=3,
        seed=1,
        precision="float64",
        device="cpu",
        buffer_bytes=200,
        n_groups=5,
        shuffle=shuffle,
    )
    if shuffle == "blocks":
        assert r.params["buffer_blocks"] * r.params["block_rows"] < 16
    assert r.params["n_groups"] == (3 if shuffle == "uniform" else 5)  # uniform: 6 minibatches an epoch, 2 a group
    plan = plan_of(r).minibatches()
    assert len(plan) == 3 * 6
    stored = [x.astype(np.float16) for x in a.values()]
    cka, se = ref_of(stored, r)
    np.testing.assert_allclose(r.cka, cka, atol=1e-10)
    np.testing.assert_allclose(r.se, se, atol=1e-10)


def test_rbf_kernel_matches_reference(tmp_path):
    a = chain_activations(60, widths=(4, 3), seed=1)
    pa = write_acts(tmp_path / "a.h5", a)
    r = analyze([pa], batch_size=20, kernel="rbf", rbf_fraction=0.5, precision="float64", device="cpu", n_groups=3)
    # bandwidth: fraction * median pairwise distance over the seeded sample (all 60 rows here)
    for name, x in a.items():
        x = x.astype(np.float64)
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))[np.triu_indices(len(x), 1)]
        assert r.params["bandwidths"][pa][name] == pytest.approx(0.5 * np.median(d), rel=1e-9)
    sigmas = [r.params["bandwidths"][pa][name] for name in a]
    cka, _ = ref_of(list(a.values()), r, sigmas=sigmas)
    np.testing.assert_allclose(r.cka, cka, atol=1e-10)


@pytest.mark.parametrize("estimator", ["full", "full-debiased"])
def test_full_estimators(two_files, estimator):
    pa, pb, a, b = two_files
    r = analyze([pa, pb], estimator=estimator, device="cpu")
    assert r.n_minibatches == 0 and np.all(np.isnan(r.se))
    if estimator == "full":
        for i, x in enumerate(a.values()):
            for j, y in enumerate(b.values()):
                assert r.matrix(0, 1)[i, j] == pytest.approx(ref_full_linear(x, y), abs=1e-10)
    else:
        cka, _ = ref_minibatch([*a.values(), *b.values()], [np.arange(N)], n_groups=1)
        np.testing.assert_allclose(r.cka, cka, atol=1e-10)


def test_full_estimator_refuses_what_does_not_fit(two_files, monkeypatch):
    import cka_offline.analysis.loop as mod

    monkeypatch.setattr(mod, "FULL_DATA_BYTES", 1000)
    with pytest.raises(ResourceError, match="full-data estimator holds all 120 examples.*--estimator minibatch"):
        analyze([two_files[0]], estimator="full", device="cpu")


# ---------------------------------------------------------------- self, many files
def test_self_comparison_symmetric_unit_diagonal(two_files):
    r = analyze([two_files[0]], batch_size=16, device="cpu")
    assert r.pairs == [(0, 0)]
    m = r.matrix()
    assert m.shape == (3, 3)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-6)
    np.testing.assert_array_equal(m, m.T)
    assert np.all(np.diag(r.se) < 1e-6)


def test_three_files_in_one_pass_equal_pairwise_runs(tmp_path):
    paths = [write_acts(tmp_path / f"c{k}.h5", chain_activations(80, seed=k)) for k in range(3)]
    together = analyze(paths, batch_size=16, precision="float64", device="cpu")
    assert together.pairs == [(0, 1), (0, 2), (1, 2)]
    for i, j in together.pairs:
        alone = analyze([paths[i], paths[j]], batch_size=16, precision="float64", device="cpu")
        np.testing.assert_allclose(together.matrix(i, j), alone.matrix(0, 1), atol=1e-12)
        np.testing.assert_allclose(together.pair(i, j).se, alone.pair(0, 1).se, atol=1e-12)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_only_the_reported_pairs_are_computed_unless_all_pairs(tmp_path, monkeypatch, kernel):
    """Three files: every i < j block and the diagonal are computed, the within-file entries off it are NaN
    (not computed) in all four matrices; --all-pairs fills them; the computed entries are the same numbers
    (float64 rounding: the block products sum in another order) on both engines, and match the float64
    reference."""
    import cka_offline.cka.accumulator as accumulator
    from cka_offline.analysis import loop

    data = [chain_activations(80, widths=w, seed=k) for k, w in enumerate([(6, 5, 4), (5, 3), (5, 6, 4, 5)])]
    paths = [write_acts(tmp_path / f"c{k}.h5", x) for k, x in enumerate(data)]
    stacked = [x[k] for x in data for k in x]
    opts = dict(batch_size=16, precision="float64", device="cpu", kernel=kernel)
    blocks_seen = []
    real = accumulator.hsic1_matrix
    monkeypatch.setattr(
        accumulator, "hsic1_matrix", lambda g, **kw: (blocks_seen.append(kw.get("blocks")), real(g, **kw))[1]
    )
    part = analyze(paths, **opts)
    # each file against all later ones: one product per file, no within-file block
    assert blocks_seen and all(list(b) == [((0, 3), (3, 9)), ((3, 5), (5, 9))] for b in blocks_seen)
    blocks_seen.clear()
    every = analyze(paths, all_pairs=True, **opts)
    assert blocks_seen and all(b is None for b in blocks_seen)
    skipped = not_computed([3, 2, 4])
    assert part.params["all_pairs"] is False and every.params["all_pairs"] is True
    assert part.pairs == every.pairs == [(0, 1), (0, 2), (1, 2)]
    for name in ("cka", "se", "low", "high"):
        got, want = getattr(part, name), getattr(every, name)
        assert np.isnan(got[skipped]).all() and not np.isnan(want).any(), name
        np.testing.assert_allclose(got[~skipped], want[~skipped], rtol=0, atol=1e-13, err_msg=name)
    sigmas = None if kernel == "linear" else _sigmas(every)
    want_cka, want_se = ref_of(stacked, every, sigmas=sigmas)
    np.testing.assert_allclose(every.cka, want_cka, rtol=0, atol=1e-10)
    np.testing.assert_allclose(every.se, want_se, rtol=0, atol=1e-10)
    np.testing.assert_allclose(part.cka, ref_of(stacked, part, sigmas=sigmas)[0], rtol=0, atol=1e-10)
    assert np.all(np.diag(part.cka) == pytest.approx(1.0, abs=1e-12))
    # the loop CUDA uses (torch tensors), on the CPU: the same blocks, the same numbers
    monkeypatch.setattr(loop, "engine_for", lambda device: "torch")
    torch_part = analyze(paths, **opts)
    np.testing.assert_allclose(torch_part.cka, part.cka, rtol=0, atol=1e-12)  # NaN where part is NaN
    np.testing.assert_allclose(torch_part.se, part.se, rtol=0, atol=1e-12)
    # what users see comes from the reported pairs only
    assert "nan" not in part.summary() and part.to_frame()["cka"].notna().all()


def test_self_comparison_computes_its_whole_block(two_files):
    r = analyze([two_files[0]], batch_size=16, precision="float64", device="cpu")
    assert r.params["all_pairs"] is True and not np.isnan(r.cka).any() and not np.isnan(r.se).any()


def test_shards_by_glob_equal_single_file(tmp_path):
    a = chain_activations(70, seed=1)
    whole = write_acts(tmp_path / "whole.h5", a)
    cut = 40
    write_acts(tmp_path / "part-0.h5", {k: v[:cut] for k, v in a.items()}, ids=np.arange(cut), shard=(0, 2, 0))
    write_acts(tmp_path / "part-1.h5", {k: v[cut:] for k, v in a.items()}, ids=np.arange(cut, 70), shard=(1, 2, cut))
    r1 = analyze([whole, str(tmp_path / "part-*.h5")], batch_size=16, precision="float64", device="cpu", all_pairs=True)
    np.testing.assert_allclose(r1.matrix(0, 1), r1.matrix(0, 0), atol=1e-12)
    assert len(r1.files[1].paths) == 2 and len(r1.files[1].sha256) == 2


# ---------------------------------------------------------------- alignment
def test_ids_in_another_order_give_the_same_result(tmp_path, two_files):
    pa, pb, a, b = two_files
    perm = np.random.default_rng(0).permutation(N)
    pb_perm = write_acts(tmp_path / "b_perm.h5", {k: v[perm] for k, v in b.items()}, ids=perm)
    same = analyze([pa, pb], batch_size=16, precision="float64", device="cpu")
    shuffled = analyze([pa, pb_perm], batch_size=16, precision="float64", device="cpu")
    np.testing.assert_allclose(shuffled.cka, same.cka, atol=1e-12)
    np.testing.assert_allclose(shuffled.se, same.se, atol=1e-12)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_memory_mapped_scratch_and_hdf5_read_paths_agree(tmp_path, two_files, kernel, caplog):
    """Uncompressed layers are gathered from memory maps by the compute threads; compressed ones are
    decompressed into a scratch file and mapped from there (uniform minibatches), or, with the block
    shuffle, come through the HDF5 reader thread. Same minibatches, same numbers (in any id order)."""
    pa, pb, a, b = two_files
    perm = np.random.default_rng(3).permutation(N)
    pb_perm = write_acts(tmp_path / "b_perm.h5", {k: v[perm] for k, v in b.items()}, ids=perm)
    pa_gz = write_acts(tmp_path / "a_gz.h5", a, compression="gzip")
    opts = dict(batch_size=16, precision="float64", device="cpu", kernel=kernel, scratch_dir=str(tmp_path))
    stacked = [a[k] for k in a] + [b[k] for k in b]
    with caplog.at_level(logging.INFO, logger="cka_offline.analysis"):
        for shuffle in ("uniform", "blocks"):
            caplog.clear()
            mapped = analyze([pa, pb_perm], shuffle=shuffle, **opts)
            assert "reading through HDF5" not in caplog.text and "decompressing" not in caplog.text
            compressed = analyze([pa_gz, pb_perm], shuffle=shuffle, **opts)
            if shuffle == "uniform":
                assert "stored compressed or unusually: decompressing it into" in caplog.text
                assert not list(tmp_path.glob("cka-scratch-*"))  # removed afterwards
            else:
                assert "stored compressed or unusually: reading through HDF5" in caplog.text
            np.testing.assert_allclose(compressed.cka, mapped.cka, rtol=0, atol=1e-12)
            np.testing.assert_allclose(compressed.se, mapped.se, rtol=0, atol=1e-12)
            want, _ = ref_of(stacked, mapped, sigmas=None if kernel == "linear" else _sigmas(mapped))
            np.testing.assert_allclose(mapped.cka, want, rtol=0, atol=1e-10)
    one = analyze([pa], layers=["layer1"], **opts)  # one layer: one task per minibatch, BLAS gets the cores
    np.testing.assert_allclose(one.cka, [[1.0]], atol=1e-12)


def test_scratch_space_is_checked_before_decompressing(tmp_path, two_files, monkeypatch):
    import shutil

    pa, pb, a, _ = two_files
    pa_gz = write_acts(tmp_path / "a_gz.h5", a, compression="gzip")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(
        ResourceError,
        match=r"stored compressed; uniform minibatches need it decompressed.*--scratch-dir.*--shuffle blocks",
    ):
        analyze([pa_gz, pb], batch_size=16, device="cpu", scratch_dir=str(tmp_path))


@pytest.mark.parametrize("kernel, compression", [("linear", None), ("rbf", None), ("linear", "gzip")])
def test_torch_loop_matches_the_numpy_loop(tmp_path, two_files, monkeypatch, kernel, compression):
    """The loop CUDA uses (rows gathered from the memory maps, or read by the HDF5 reader thread for
    compressed files, into torch tensors; torch Grams), run on the CPU here: the same numbers as the numpy
    loop. Only the copy to the GPU and its synchronisation are left out."""
    from cka_offline.analysis import loop

    pa, pb, a, _ = two_files
    if compression:
        pa = write_acts(tmp_path / "a_gz.h5", a, compression=compression)
    opts = dict(batch_size=16, precision="float64", device="cpu", kernel=kernel)
    numpy_loop = analyze([pa, pb], **opts)
    monkeypatch.setattr(loop, "engine_for", lambda device: "torch")
    torch_loop = analyze([pa, pb], **opts)
    np.testing.assert_allclose(torch_loop.cka, numpy_loop.cka, rtol=0, atol=1e-12)
    np.testing.assert_allclose(torch_loop.se, numpy_loop.se, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shuffle", ["uniform", "blocks"])
def test_mapped_pages_are_released_at_every_shuffle_buffer(two_files, monkeypatch, shuffle):
    """Resident memory stays flat: the pages read from the memory maps are unmapped whenever a minibatch
    starts a new shuffle buffer (uniform: every ``buffer_bytes`` of minibatches), once per buffer and file;
    the results do not change."""
    from cka_offline.analysis import MinibatchPlan
    from cka_offline.store.reader import ActivationFile

    pa, pb, a, b = two_files
    opts = dict(batch_size=8, precision="float64", device="cpu", buffer_bytes=4000, shuffle=shuffle)  # several
    # uniform: the release cadence changes nothing; blocks: the buffers are part of the plan
    kept = analyze([pa, pb], **{**opts, "buffer_bytes": 2**30 if shuffle == "uniform" else 4000})
    calls = []
    release = ActivationFile.release_mapped
    monkeypatch.setattr(ActivationFile, "release_mapped", lambda self: (calls.append(self.path), release(self))[1])
    result = analyze([pa, pb], **opts)
    row_bytes = 4 * sum(x.shape[1] for x in [*a.values(), *b.values()])
    plan = MinibatchPlan.for_data(
        N, batch_size=8, seed=0, epochs=1, chunk_rows=16, row_bytes=row_bytes, buffer_bytes=4000, shuffle=shuffle
    )
    _, ends = plan.epoch_order(0)
    starts = plan.offsets[:-1]
    buffers = len(set(np.searchsorted(ends, starts, side="right").tolist()))
    assert buffers > 2 and len(calls) == 2 * buffers  # both files, once per buffer the minibatches start in
    np.testing.assert_array_equal(result.cka, kept.cka)


def test_compute_threads_follow_the_environment(monkeypatch):
    from cka_offline.analysis.grams import THREAD_VARIABLES
    from cka_offline.analysis.grams import blas_threads as _blas_threads

    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cores = _blas_threads()
    assert cores >= 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun sets for each process
    assert _blas_threads() == 1
    monkeypatch.setenv("CKA_NUM_THREADS", "3")
    assert _blas_threads() == 3
    monkeypatch.setenv("CKA_NUM_THREADS", "many")  # ignored with a warning
    assert _blas_threads() == 1


def _sigmas(result):
    return [bw for per_file in result.params["bandwidths"].values() for bw in per_file.values()]


def test_string_ids_in_another_order(tmp_path):
    a = chain_activations(40, seed=1)
    ids = np.array([f"img{k:03d}" for k in range(40)])
    perm = np.random.default_rng(1).permutation(40)
    pa = write_acts(tmp_path / "a.h5", a, ids=ids)
    pb = write_acts(tmp_path / "b.h5", {k: v[perm] for k, v in a.items()}, ids=ids[perm])
    r = analyze([pa, pb], batch_size=8, precision="float64", device="cpu")
    np.testing.assert_allclose(np.diag(r.matrix(0, 1)), 1.0, atol=1e-10)


def test_different_sets_error_and_intersection(tmp_path):
    a = chain_activations(100, seed=1)
    b = chain_activations(100, seed=2)
    pa = write_acts(tmp_path / "a.h5", {k: v[:80] for k, v in a.items()}, ids=np.arange(80))
    # B: ids 10..99 shuffled, so 10 ids of A are missing from B and 20 of B from A
    ids_b = np.random.default_rng(2).permutation(np.arange(10, 100))
    pb = write_acts(tmp_path / "b.h5", {k: v[ids_b] for k, v in b.items()}, ids=ids_b)
    with pytest.raises(
        AlignmentError,
        match=r"10 id\(s\) of .*a.h5 are missing from .*b.h5 \(e.g. 0, 1, 2, ...\), "
        r"20 id\(s\) of .*b.h5 are missing from .*a.h5.*--intersection",
    ):
        analyze([pa, pb], device="cpu")
    r = analyze([pa, pb], batch_size=16, intersect=True, precision="float64", device="cpu")
    assert r.n_examples == 70
    # the same as files holding just the common examples 10..79
    pa2 = write_acts(tmp_path / "a2.h5", {k: v[10:80] for k, v in a.items()}, ids=np.arange(10, 80))
    pb2 = write_acts(tmp_path / "b2.h5", {k: v[10:80] for k, v in b.items()}, ids=np.arange(10, 80))
    ref = analyze([pa2, pb2], batch_size=16, precision="float64", device="cpu")
    np.testing.assert_allclose(r.cka, ref.cka, atol=1e-12)


def test_disjoint_ids(tmp_path):
    a = chain_activations(20, seed=1)
    pa = write_acts(tmp_path / "a.h5", a)
    pb = write_acts(tmp_path / "b.h5", a, ids=np.arange(100, 120))
    with pytest.raises(AlignmentError, match=r"20 id\(s\) of .* are missing .* 20 id\(s\)"):
        analyze([pa, pb], device="cpu")
    with pytest.raises(InsufficientDataError, match="0 example\\(s\\) common to all files"):
        analyze([pa, pb], intersect=True, device="cpu")


def test_id_types_must_agree():
    with pytest.raises(AlignmentError, match="integers in some files and strings in others"):
        align_ids([np.arange(5), np.array(list("abcde"))], ["a.h5", "b.h5"])


def test_fewer_than_four_examples(tmp_path):
    pa = write_acts(tmp_path / "a.h5", chain_activations(3, seed=1))
    with pytest.raises(InsufficientDataError, match="at least 4 examples.*3 example"):
        analyze([pa], device="cpu")


# ---------------------------------------------------------------- bad values
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("estimator", ["minibatch", "full"])
def test_non_finite_activation_names_file_layer_and_id(tmp_path, bad, estimator):
    a = chain_activations(50, seed=1)
    a["layer1"][17, 2] = bad
    pa = write_acts(tmp_path / "a.h5", a, ids=np.arange(1000, 1050))
    with pytest.raises(ActivationValueError, match=r"a.h5: layer 'layer1' holds (nan|inf) for example id 1017"):
        analyze([pa], batch_size=16, estimator=estimator, device="cpu")


def test_non_finite_in_rbf_bandwidth_sample(tmp_path):
    a = chain_activations(50, seed=1)
    a["layer0"][3, 0] = np.nan
    pa = write_acts(tmp_path / "a.h5", a)
    with pytest.raises(ActivationValueError, match="layer 'layer0' holds nan for example id 3"):
        analyze([pa], kernel="rbf", device="cpu")


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_units_do_not_matter_from_1e_minus_30_to_1e30(tmp_path, kernel, precision):
    """CKA is scale-invariant; each layer is brought to unit scale by a power of two before its Gram, so
    float32 Grams neither underflow ("constant" layers) nor overflow for any finite activations."""
    a = chain_activations(64, seed=4)
    opts = dict(batch_size=16, kernel=kernel, precision=precision, device="cpu", hash_files=False)
    base = analyze(write_acts(tmp_path / "base.h5", a), **opts)
    # powers of two from 2^-100 (8e-31) to 2^100 (1e30) are stored exactly: the same numbers, bit for bit
    for exponent in (-100, -83, -40, 40, 83, 100):
        scaled = {k: (v * 2.0**exponent).astype(np.float32) for k, v in a.items()}
        r = analyze(write_acts(tmp_path / f"x{exponent}.h5", scaled), **opts)
        assert not any("constant" in w for w in r.warnings), (exponent, r.warnings)
        np.testing.assert_array_equal(r.cka, base.cka)
        np.testing.assert_array_equal(r.se, base.se)
    for factor in (1e-30, 1e-25, 1e25, 1e30):  # other factors: the stored values round differently
        scaled = {k: (v * factor).astype(np.float32) for k, v in a.items()}
        r = analyze(write_acts(tmp_path / f"x{factor:g}.h5", scaled), **opts)
        np.testing.assert_allclose(r.cka, base.cka, rtol=0, atol=2e-6)
    one = dict(a)
    one["layer0"] = (a["layer0"] * 1e-25).astype(np.float32)  # one tiny layer among ordinary ones
    r = analyze(write_acts(tmp_path / "one.h5", one), **opts)
    np.testing.assert_allclose(r.cka, base.cka, rtol=0, atol=2e-6)


def test_gram_overflow_from_a_rare_outlier_is_reported(tmp_path):
    """The scale comes from a sample of examples: an outlier outside it (1e25 where the layer is ~1) can
    still overflow a float32 Gram; that is said, with the fix."""
    from cka_offline.analysis import MinibatchPlan
    from cka_offline.analysis.loop import SCALE_SAMPLE

    n = 600
    a = chain_activations(n, seed=1)
    outside = sorted(set(range(n)) - set(MinibatchPlan(n, 16).sample(SCALE_SAMPLE).tolist()))[0]
    a["layer0"][outside] = np.float32(1e25)  # finite, but its float32 Gram entries overflow
    pa = write_acts(tmp_path / "a.h5", a)
    with pytest.raises(
        ActivationValueError,
        match=rf"a\.h5: layer 'layer0': its float32 Gram matrix of minibatch \d+ overflows although the activations "
        rf"are finite \(values up to 1e\+25, largest for example id {outside}, row {outside}\); use --precision float64$",
    ):
        analyze([pa], batch_size=16, device="cpu")
    r = analyze([pa], batch_size=16, precision="float64", device="cpu")  # the fix runs
    assert np.isfinite(r.cka[1:, 1:]).all()


@pytest.mark.parametrize("kernel,estimator", [("linear", "minibatch"), ("rbf", "minibatch"), ("linear", "full")])
def test_constant_layer_is_nan_with_warning(tmp_path, caplog, kernel, estimator):
    a = chain_activations(60, seed=1)
    a["layer1"][:] = 0.25
    pa = write_acts(tmp_path / "a.h5", a)
    with caplog.at_level(logging.WARNING, logger="cka_offline.analysis"):
        r = analyze([pa], batch_size=16, kernel=kernel, estimator=estimator, device="cpu")
    m = r.matrix()
    assert np.all(np.isnan(m[1])) and np.all(np.isnan(m[:, 1]))
    assert np.isfinite(m[np.ix_([0, 2], [0, 2])]).all()
    assert np.all(np.isnan(r.se[1]))
    constant = [w for w in r.warnings if "constant" in w]
    assert len(constant) == 1 and "'layer1'" in constant[0]
    assert "'layer1'" in caplog.text
    assert "constant" in r.summary()


# ---------------------------------------------------------------- layers, options, devices
def test_layer_selection_per_side(two_files):
    pa, pb, a, b = two_files
    r = analyze([pa, pb], layers_a=["layer[12]"], layers_b=["layer0"], device="cpu")
    assert r.files[0].layers == ["layer1", "layer2"] and r.files[1].layers == ["layer0"]
    r = analyze([pa, pb], layers=["layer1"], device="cpu")
    assert [f.layers for f in r.files] == [["layer1"], ["layer1"]]
    with pytest.raises(LayerSelectionError, match=r"no layer matches 'layer9' in .*b.h5; close matches: .*layer0"):
        analyze([pa, pb], layers_b=["layer9"], device="cpu")


def test_check_options():
    good = dict(
        batch_size=256,
        epochs=1,
        kernel="linear",
        rbf_fraction=0.5,
        precision="float32",
        estimator="minibatch",
        n_groups=16,
    )
    check_options(**good)
    for change, message in [
        ({"kernel": "poly"}, "unknown kernel 'poly'"),
        ({"precision": "float16"}, "unknown precision"),
        ({"estimator": "exact"}, "unknown estimator"),
        ({"full_max_bytes": "lots"}, r"full_max_bytes \(--max-memory\) must be a size such as 8G"),
        ({"rbf_fraction": 0.0}, "rbf fraction must be a number > 0"),
        ({"batch_size": 3}, "batch size must be at least 4"),
        ({"epochs": 0}, "epochs must be 1 to 1000000, got 0"),
        ({"epochs": 10**6 + 1}, "epochs must be 1 to 1000000"),
        ({"seed": -1}, r"seed must be 0 to 9223372036854775807 \(2\*\*63 - 1\), got -1"),
        ({"seed": 2**63}, "seed must be 0 to"),
        ({"confidence": 1.0}, "confidence must be a level between 0 and 1"),
        ({"confidence": float("nan")}, "confidence must be a level between 0 and 1"),
        ({"confidence": 0}, "confidence must be a level between 0 and 1"),
        ({"n_groups": 1}, "n_groups must be at least 2"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_options(**{**good, **change})


def test_devices():
    import torch

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        with pytest.raises(DeviceError, match="only .* CUDA device"):
            resolve_device("cuda:99")
        with pytest.raises(DeviceError, match="expected cuda:N"):
            resolve_device("cuda:x")
    else:
        with pytest.raises(DeviceError, match="'cuda:1' requested but CUDA is not available"):
            resolve_device("cuda:1")


@pytest.mark.cuda
def test_cuda_matches_cpu(two_files):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pa, pb, _, _ = two_files
    cpu = analyze([pa, pb], batch_size=16, precision="float64", device="cpu")
    gpu = analyze([pa, pb], batch_size=16, precision="float64", device="cuda")
    np.testing.assert_allclose(gpu.cka, cpu.cka, atol=1e-10)


def test_tf32_setting_is_overridden_and_restored(two_files):
    """The torch (CUDA) loop runs under _torch_compute: full float32 matmuls and no autograd, restored after."""
    import torch

    from cka_offline.analysis.grams import torch_compute

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with torch_compute():
            assert torch.get_float32_matmul_precision() == "highest" and not torch.is_grad_enabled()
        assert torch.get_float32_matmul_precision() == "high" and torch.is_grad_enabled()
        with pytest.raises(KeyError):
            with torch_compute():
                raise KeyError("restored on error too")
        assert torch.get_float32_matmul_precision() == "high"
        seen = []  # the CPU loop is numpy: it leaves torch's settings alone
        analyze(
            [two_files[0]],
            batch_size=16,
            device="cpu",
            progress=lambda *_: seen.append(torch.get_float32_matmul_precision()),
        )
        assert set(seen) == {"high"}
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_cpu_analysis_does_not_import_torch(two_files, tmp_path, device):
    """Start-up matters on short runs: --device cpu (and auto without a GPU driver) never imports torch."""
    from cka_offline.devices import GPU_DRIVER_FILES as _GPU_DRIVER_FILES

    code = (
        "import sys\n"
        "from cka_offline import analyze\n"
        f"r = analyze([{str(two_files[0])!r}, {str(two_files[1])!r}], batch_size=16, device={device!r})\n"
        "r.save(sys.argv[1])\n"
        "assert r.cka.shape[0] > 0\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "r.json")], capture_output=True, text=True, check=True
    )
    driver = device == "auto" and any(os.path.exists(p) for p in _GPU_DRIVER_FILES)
    assert out.stdout.strip() == str(driver), out.stderr


def test_package_level_call(two_files):
    import cka_offline
    import cka_offline.analysis  # binds the submodule to the package attribute

    r = cka_offline.analyze([two_files[0]], batch_size=16, device="cpu")
    assert isinstance(r, cka_offline.CKAResult) and r.matrix().shape == (3, 3)
    import cka_offline.extraction

    assert callable(cka_offline.extract) and cka_offline.extract is cka_offline.extraction.extract


def test_progress_callback(two_files):
    seen = []
    analyze(
        [two_files[0]], batch_size=16, epochs=2, device="cpu", progress=lambda done, total: seen.append((done, total))
    )
    assert seen[-1] == (2 * N, 2 * N)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
