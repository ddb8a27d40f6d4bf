"""MinibatchCKA against the float64 numpy reference: accuracy, invariances, streaming, merge, state, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cka_offline.cka import MinibatchCKA, gram_linear, gram_rbf, rbf_bandwidth
from cka_offline.errors import ActivationValueError, InsufficientDataError

from . import reference as ref
from .conftest import as_lib, relu_chain

M = 32  # minibatch size used throughout


def batches(layers: list[np.ndarray], m: int = M) -> list[list[np.ndarray]]:
    n = layers[0].shape[0]
    return [[z[s : s + m] for z in layers] for s in range(0, n, m)]


def grams_of(batch: list[np.ndarray], dtype="float64", kernel=None, lib="numpy"):
    kernel = kernel or (lambda x: gram_linear(x, dtype))
    grams = [kernel(as_lib(lib, z)) for z in batch]
    return torch.stack(grams) if lib == "torch" else np.stack(grams)


def accumulate(layers, n_groups=4, dtype="float64", kernel=None, m=M, lib="numpy") -> MinibatchCKA:
    acc = MinibatchCKA(n_layers=len(layers), n_groups=n_groups)
    for b, batch in enumerate(batches(layers, m)):
        acc.update(grams_of(batch, dtype, kernel, lib), batch_index=b)
    return acc


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-10), ("float32", 1e-6), (torch.float32, 1e-6)])
def test_matches_reference(chain, dtype, tol, lib):
    got = accumulate(chain, dtype=dtype, lib=lib).compute()
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (5, 5)
    want = ref.minibatch_cka_matrix(chain, M)
    assert np.abs(got - want).max() <= tol
    assert np.abs(want[0, 1]) > 0.5  # the data has structure; the comparison is not between zeros


def test_cka_of_a_layer_with_itself_is_one(chain, lib):
    got = accumulate([chain[1], chain[1], chain[3]], lib=lib).compute()
    np.testing.assert_allclose(got[:2, :2], np.ones((2, 2)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.diag(got), 1.0, rtol=0, atol=1e-12)


def test_invariant_to_orthogonal_transform_isotropic_scale_and_shift(chain, lib):
    rng = np.random.default_rng(7)
    x, y = chain[1], chain[2]
    q, _ = np.linalg.qr(rng.standard_normal((x.shape[1], x.shape[1])))
    shift = rng.standard_normal(x.shape[1]) * 10.0
    base = accumulate([x, y], lib=lib).compute()
    for x2, y2 in ((x @ q, y), (3.7 * x, 0.01 * y), (x + shift, y - 4.0)):
        got = accumulate([x2, y2], lib=lib).compute()
        np.testing.assert_allclose(got, base, rtol=0, atol=1e-10)
    assert abs(base[0, 1] - accumulate([x, chain[4]], lib=lib).compute()[0, 1]) > 0.3  # can tell layers apart


def test_large_mean_and_small_scale_with_float32_grams_needs_the_centring(lib):
    """Activations 50 + 1e-3 h (h from a random linear+ReLU chain): float32 Grams stay within 1e-6."""
    clean = relu_chain(512, seed=1)
    want = ref.minibatch_cka_matrix(clean, M)  # CKA is invariant to the shift and the scale
    shifted = [50.0 + 1e-3 * z for z in clean]
    got = accumulate(shifted, dtype="float32", lib=lib).compute()
    assert np.abs(got - want).max() <= 1e-6
    # stored as float32 (as activation files are): compare with the reference on the same float32 values
    stored = [z.astype(np.float32) for z in shifted]
    want_stored = ref.minibatch_cka_matrix([z.astype(np.float64) for z in stored], M)
    got = accumulate(stored, dtype="float32", lib=lib).compute()
    assert np.abs(got - want_stored).max() <= 1e-6
    # the same Grams without centring (X X^T in float32) lose the signal: wrong values or NaN
    f32 = lambda x: x.float() if lib == "torch" else x.astype(np.float32)  # noqa: E731
    naive = accumulate(shifted, kernel=lambda x: f32(x) @ f32(x).T, lib=lib).compute()
    assert not np.abs(naive - want).max() <= 0.1  # NaN compares False too


def test_rbf_minibatch_matches_reference(chain, lib):
    layers = [z[:128] for z in chain]
    sigma = rbf_bandwidth(as_lib(lib, chain[1][128:]), 0.8)
    want = ref.minibatch_cka_matrix(layers, M, kernel=lambda x: ref.rbf_gram(x, sigma))
    for dtype, tol in (("float64", 1e-10), ("float32", 1e-6)):
        got = accumulate(
            layers, dtype=dtype, kernel=lambda x, dtype=dtype: gram_rbf(x, sigma, dtype), lib=lib
        ).compute()
        assert np.abs(got - want).max() <= tol


def test_streaming_in_any_order_equals_one_pass(chain):
    one = accumulate(chain, n_groups=4)
    shuffled = MinibatchCKA(n_layers=5, n_groups=4)
    bs = batches(chain)
    for b in np.random.default_rng(0).permutation(len(bs)):
        shuffled.update(grams_of(bs[b]), batch_index=int(b))
    np.testing.assert_allclose(shuffled.hsic_sum, one.hsic_sum, rtol=1e-13, atol=0)
    np.testing.assert_allclose(shuffled.compute(), one.compute(), rtol=0, atol=1e-13)
    assert int(one.n_batches.sum()) == len(bs) and int(one.n_examples.sum()) == 256


def test_merge_equals_sequential(chain):
    seq = accumulate(chain, n_groups=3)
    bs = batches(chain)
    a, b = MinibatchCKA(5, 3), MinibatchCKA(5, 3)
    for i, batch in enumerate(bs):
        (a if i % 2 else b).update(grams_of(batch), batch_index=i)
    assert a.merge(b) is a
    np.testing.assert_allclose(a.hsic_sum, seq.hsic_sum, rtol=1e-13, atol=1e-300)
    assert np.array_equal(a.n_batches, seq.n_batches) and np.array_equal(a.n_examples, seq.n_examples)
    sa, ss = a.compute_stats(), seq.compute_stats()
    np.testing.assert_allclose(sa.se, ss.se, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(sa.cka, ss.cka, rtol=0, atol=1e-13)


def test_state_dict_round_trip_and_reset(chain):
    acc = accumulate(chain)
    state = acc.state_dict()
    assert {k: v.dtype for k, v in state.items()} == {
        "hsic_sum": np.float64,
        "n_batches": np.int64,
        "n_examples": np.int64,
    }
    state["hsic_sum"][...] = 0.0  # a copy: the accumulator is untouched
    assert np.abs(acc.hsic_sum).sum() > 0
    other = MinibatchCKA(5, 4)
    other.load_state_dict(acc.state_dict())
    assert np.array_equal(other.compute(), acc.compute())
    as_tensors = MinibatchCKA(5, 4)  # what comes back from torch.distributed: tensors
    as_tensors.load_state_dict({k: torch.from_numpy(v) for k, v in acc.state_dict().items()})
    assert np.array_equal(as_tensors.compute(), acc.compute())
    other.reset()
    with pytest.raises(InsufficientDataError, match="no minibatch was added"):
        other.compute()


def test_summed_state_dicts_equal_one_process(chain):
    """What torch.distributed.all_reduce(SUM) does to the state of two ranks, done by hand."""
    seq = accumulate(chain)
    ranks = [MinibatchCKA(5, 4), MinibatchCKA(5, 4)]
    for i, batch in enumerate(batches(chain)):
        ranks[i % 2].update(grams_of(batch), batch_index=i)
    states = [r.state_dict() for r in ranks]
    summed = {k: states[0][k] + states[1][k] for k in states[0]}
    ranks[0].load_state_dict(summed)
    np.testing.assert_allclose(ranks[0].compute(), seq.compute(), rtol=0, atol=1e-13)


def _all_reduce_rank(rank: int, world: int, init_file: str, layers: list[np.ndarray], out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    acc = MinibatchCKA(len(layers), 4)
    for i, batch in enumerate(batches(layers)):
        if i % world == rank:
            acc.update(grams_of(batch), batch_index=i)
    state = acc.state_dict()
    for a in state.values():
        dist.all_reduce(torch.from_numpy(a), op=dist.ReduceOp.SUM)  # shares the array's memory
    acc.load_state_dict(state)
    if rank == 0:
        np.save(out, acc.compute())
    dist.destroy_process_group()


def test_torch_distributed_all_reduce_equals_one_process(chain, tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    layers = [z[:128] for z in chain[:3]]
    out = tmp_path / "cka.npy"
    mp.spawn(_all_reduce_rank, args=(2, str(tmp_path / "init"), layers, str(out)), nprocs=2, join=True)
    np.testing.assert_allclose(np.load(out), accumulate(layers).compute(), rtol=0, atol=1e-13)


def test_constant_layer_is_degenerate_nan_and_nothing_else_is(chain):
    layers = [chain[0], np.full((256, 3), 7.0), chain[2]]
    acc = accumulate(layers)
    got = acc.compute()
    assert acc.degenerate_layers == [1]
    assert np.isnan(got[1]).all() and np.isnan(got[:, 1]).all()
    keep = np.ix_([0, 2], [0, 2])
    assert np.isfinite(got[keep]).all()
    np.testing.assert_allclose(got[keep], ref.minibatch_cka_matrix([chain[0], chain[2]], M), atol=1e-10)
    stats = acc.compute_stats()
    assert stats.degenerate_layers == [1]
    for arr in (stats.cka, stats.se, stats.low, stats.high):
        assert np.isnan(arr[1]).all() and np.isfinite(arr[keep]).all()


def test_negative_self_hsic_sum_counts_as_degenerate():
    """Unbiased HSIC_1 can be negative by chance; a layer whose sum is <= 0 has no CKA (no clamping)."""
    acc = MinibatchCKA(3, n_groups=2)
    state = acc.state_dict()
    state["hsic_sum"][0] = [[2.0, 0.5, 0.1], [0.5, -1e-3, 0.2], [0.1, 0.2, 0.5]]
    state["hsic_sum"][1] = state["hsic_sum"][0]
    state["n_batches"][:] = 1
    acc.load_state_dict(state)
    got = acc.compute()
    assert acc.degenerate_layers == [1]
    assert np.isnan(got[1]).all() and np.isnan(got[:, 1]).all()
    assert got[0, 2] == pytest.approx(0.2 / np.sqrt(4.0 * 1.0), rel=1e-15)


def test_non_finite_activations_raise_and_leave_the_state_alone(chain):
    acc = accumulate(chain[:2])
    before = acc.state_dict()
    bad = [chain[0][:M].copy(), chain[1][:M]]
    bad[0][3, 1] = np.nan
    with pytest.raises(ActivationValueError, match=r"minibatch 9: HSIC is NaN or Inf for layer indices \[0, 1\]"):
        acc.update(grams_of(bad), batch_index=9)
    assert all(np.array_equal(before[k], v) for k, v in acc.state_dict().items())


def test_repr_counts_batches(chain):
    acc = MinibatchCKA(n_layers=2, n_groups=2)
    acc.update(grams_of([chain[0][:M], chain[1][:M]], "float32"), batch_index=0)
    assert "batches=1" in repr(acc) and f"examples={M}" in repr(acc)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_grams_match_cpu(chain):
    """Grams and pair products on the GPU, sums on the host, same numbers as the float64 reference."""
    want = ref.minibatch_cka_matrix(chain, M)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-6)):
        acc = MinibatchCKA(n_layers=5, n_groups=4)
        for b, batch in enumerate(batches(chain)):
            grams = torch.stack([gram_linear(torch.from_numpy(z).cuda(), dtype) for z in batch])
            assert grams.is_cuda
            acc.update(grams, batch_index=b)
        assert np.abs(acc.compute() - want).max() <= tol
        cpu = MinibatchCKA(5, 4)
        for b, batch in enumerate(batches(chain)):
            cpu.update(grams_of(batch, dtype), batch_index=b)
        assert np.abs(cpu.merge(acc).compute() - want).max() <= tol  # merge of GPU-fed and CPU-fed sums


def _grams(l_layers: int = 2, m: int = 5) -> torch.Tensor:
    return torch.stack([gram_linear(torch.randn(m, 3)) for _ in range(l_layers)])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: MinibatchCKA(0), ValueError, "n_layers must be an int >= 1, got 0"),
        (lambda: MinibatchCKA(2, n_groups=0), ValueError, "n_groups must be an int >= 1, got 0"),
        (
            lambda: MinibatchCKA(3).update(_grams(2), 0),
            ValueError,
            r"grams must have shape \(3, m, m\), got \(2, 5, 5\)",
        ),
        (lambda: MinibatchCKA(2).update([[0.0]], 0), ValueError, "grams must have shape .* got list"),
        (lambda: MinibatchCKA(2).update(_grams(2), -1), ValueError, "batch_index must be an int >= 0, got -1"),
        (lambda: MinibatchCKA(2).update(_grams(2), 1.0), ValueError, "batch_index must be an int >= 0"),
        (lambda: MinibatchCKA(2).update(_grams(2, m=3), 0), InsufficientDataError, "at least 4 examples, got 3"),
        (lambda: MinibatchCKA(2).merge("x"), TypeError, "can only merge a MinibatchCKA, got str"),
        (
            lambda: MinibatchCKA(2).merge(MinibatchCKA(2, n_groups=3)),
            ValueError,
            r"cannot merge MinibatchCKA\(n_layers=2, n_groups=3\)",
        ),
        (
            lambda: MinibatchCKA(2).load_state_dict({"hsic_sum": torch.zeros(16, 2, 2)}),
            ValueError,
            "state keys must be",
        ),
        (
            lambda: MinibatchCKA(2).load_state_dict(MinibatchCKA(3).state_dict()),
            ValueError,
            r"state\['hsic_sum'\] must be a float64 array of shape \(16, 2, 2\)",
        ),
        (lambda: MinibatchCKA(2).compute(), InsufficientDataError, "no minibatch was added"),
        (lambda: MinibatchCKA(2).compute_stats(), InsufficientDataError, "no minibatch was added"),
        (lambda: MinibatchCKA(2).compute_stats(confidence=95), ValueError, r"confidence must be a number in \(0, 1\)"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
