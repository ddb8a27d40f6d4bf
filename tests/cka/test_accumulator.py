"""MinibatchCKA against the float64 numpy reference: accuracy, invariances, streaming, merge, state, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cka_offline.cka import MinibatchCKA, gram_linear, gram_rbf, rbf_bandwidth
from cka_offline.errors import ActivationValueError, InsufficientDataError

from . import reference as ref
from .conftest import relu_chain

M = 32  # minibatch size used throughout


def batches(layers: list[np.ndarray], m: int = M) -> list[list[np.ndarray]]:
    n = layers[0].shape[0]
    return [[z[s : s + m] for z in layers] for s in range(0, n, m)]


def grams_of(batch: list[np.ndarray], dtype=torch.float64, kernel=None) -> torch.Tensor:
    kernel = kernel or (lambda x: gram_linear(x, dtype))
    return torch.stack([kernel(torch.from_numpy(np.ascontiguousarray(z))) for z in batch])


def accumulate(layers, n_groups=4, dtype=torch.float64, kernel=None, m=M) -> MinibatchCKA:
    acc = MinibatchCKA(n_layers=len(layers), n_groups=n_groups)
    for b, batch in enumerate(batches(layers, m)):
        acc.update(grams_of(batch, dtype, kernel), batch_index=b)
    return acc


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
def test_matches_reference(chain, dtype, tol):
    got = accumulate(chain, dtype=dtype).compute()
    assert got.dtype == torch.float64 and got.shape == (5, 5)
    want = ref.minibatch_cka_matrix(chain, M)
    assert np.abs(got.numpy() - want).max() <= tol
    assert np.abs(want[0, 1]) > 0.5  # the data has structure; the comparison is not between zeros


def test_cka_of_a_layer_with_itself_is_one(chain):
    got = accumulate([chain[1], chain[1], chain[3]]).compute().numpy()
    np.testing.assert_allclose(got[:2, :2], np.ones((2, 2)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.diag(got), 1.0, rtol=0, atol=1e-12)


def test_invariant_to_orthogonal_transform_isotropic_scale_and_shift(chain):
    rng = np.random.default_rng(7)
    x, y = chain[1], chain[2]
    q, _ = np.linalg.qr(rng.standard_normal((x.shape[1], x.shape[1])))
    shift = rng.standard_normal(x.shape[1]) * 10.0
    base = accumulate([x, y]).compute().numpy()
    for x2, y2 in ((x @ q, y), (3.7 * x, 0.01 * y), (x + shift, y - 4.0)):
        got = accumulate([x2, y2]).compute().numpy()
        np.testing.assert_allclose(got, base, rtol=0, atol=1e-10)
    assert abs(base[0, 1] - accumulate([x, chain[4]]).compute()[0, 1].item()) > 0.3  # can tell layers apart


def test_large_mean_and_small_scale_with_float32_grams_needs_the_centring():
    """Activations 50 + 1e-3 h (h from a random linear+ReLU chain): float32 Grams stay within 1e-6."""
    clean = relu_chain(512, seed=1)
    want = ref.minibatch_cka_matrix(clean, M)  # CKA is invariant to the shift and the scale
    shifted = [50.0 + 1e-3 * z for z in clean]
    got = accumulate(shifted, dtype=torch.float32).compute().numpy()
    assert np.abs(got - want).max() <= 1e-6
    # stored as float32 (as activation files are): compare with the reference on the same float32 values
    stored = [z.astype(np.float32) for z in shifted]
    want_stored = ref.minibatch_cka_matrix([z.astype(np.float64) for z in stored], M)
    got = accumulate(stored, dtype=torch.float32).compute().numpy()
    assert np.abs(got - want_stored).max() <= 1e-6
    # the same Grams without centring (X X^T in float32) lose the signal: wrong values or NaN
    naive = accumulate(shifted, kernel=lambda x: x.float() @ x.float().T).compute().numpy()
    assert not np.abs(naive - want).max() <= 0.1  # NaN compares False too


def test_rbf_minibatch_matches_reference(chain):
    layers = [z[:128] for z in chain]
    sigma = rbf_bandwidth(torch.from_numpy(chain[1][128:]), 0.8)
    want = ref.minibatch_cka_matrix(layers, M, kernel=lambda x: ref.rbf_gram(x, sigma))
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-6)):
        got = accumulate(layers, dtype=dtype, kernel=lambda x: gram_rbf(x, sigma, dtype)).compute().numpy()
        assert np.abs(got - want).max() <= tol


def test_streaming_in_any_order_equals_one_pass(chain):
    one = accumulate(chain, n_groups=4)
    shuffled = MinibatchCKA(n_layers=5, n_groups=4)
    bs = batches(chain)
    for b in np.random.default_rng(0).permutation(len(bs)):
        shuffled.update(grams_of(bs[b]), batch_index=int(b))
    np.testing.assert_allclose(shuffled.hsic_sum.numpy(), one.hsic_sum.numpy(), rtol=1e-13, atol=0)
    np.testing.assert_allclose(shuffled.compute().numpy(), one.compute().numpy(), rtol=0, atol=1e-13)
    assert int(one.n_batches.sum()) == len(bs) and int(one.n_examples.sum()) == 256


def test_merge_equals_sequential(chain):
    seq = accumulate(chain, n_groups=3)
    bs = batches(chain)
    a, b = MinibatchCKA(5, 3), MinibatchCKA(5, 3)
    for i, batch in enumerate(bs):
        (a if i % 2 else b).update(grams_of(batch), batch_index=i)
    assert a.merge(b) is a
    np.testing.assert_allclose(a.hsic_sum.numpy(), seq.hsic_sum.numpy(), rtol=1e-13, atol=1e-300)
    assert torch.equal(a.n_batches, seq.n_batches) and torch.equal(a.n_examples, seq.n_examples)
    sa, ss = a.compute_stats(), seq.compute_stats()
    np.testing.assert_allclose(sa.se, ss.se, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(sa.cka, ss.cka, rtol=0, atol=1e-13)


def test_state_dict_round_trip_and_reset(chain):
    acc = accumulate(chain)
    state = acc.state_dict()
    assert {k: v.dtype for k, v in state.items()} == {
        "hsic_sum": torch.float64, "n_batches": torch.int64, "n_examples": torch.int64,
    }
    state["hsic_sum"].zero_()  # a copy: the accumulator is untouched
    assert acc.hsic_sum.abs().sum() > 0
    other = MinibatchCKA(5, 4)
    other.load_state_dict(acc.state_dict())
    assert torch.equal(other.compute(), acc.compute())
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
    np.testing.assert_allclose(ranks[0].compute().numpy(), seq.compute().numpy(), rtol=0, atol=1e-13)


def _all_reduce_rank(rank: int, world: int, init_file: str, layers: list[np.ndarray], out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    acc = MinibatchCKA(len(layers), 4)
    for i, batch in enumerate(batches(layers)):
        if i % world == rank:
            acc.update(grams_of(batch), batch_index=i)
    state = acc.state_dict()
    for t in state.values():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    acc.load_state_dict(state)
    if rank == 0:
        torch.save(acc.compute(), out)
    dist.destroy_process_group()


def test_torch_distributed_all_reduce_equals_one_process(chain, tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    layers = [z[:128] for z in chain[:3]]
    out = tmp_path / "cka.pt"
    mp.spawn(_all_reduce_rank, args=(2, str(tmp_path / "init"), layers, str(out)), nprocs=2, join=True)
    np.testing.assert_allclose(torch.load(out).numpy(), accumulate(layers).compute().numpy(), rtol=0, atol=1e-13)


def test_constant_layer_is_degenerate_nan_and_nothing_else_is(chain):
    layers = [chain[0], np.full((256, 3), 7.0), chain[2]]
    acc = accumulate(layers)
    got = acc.compute().numpy()
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
    state["hsic_sum"][0] = torch.tensor([[2.0, 0.5, 0.1], [0.5, -1e-3, 0.2], [0.1, 0.2, 0.5]], dtype=torch.float64)
    state["hsic_sum"][1] = state["hsic_sum"][0]
    state["n_batches"][:] = 1
    acc.load_state_dict(state)
    got = acc.compute().numpy()
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
    assert all(torch.equal(before[k], v) for k, v in acc.state_dict().items())


def test_device_argument_keeps_state_there(chain):
    acc = MinibatchCKA(n_layers=2, n_groups=2, device="cpu")
    acc.update(grams_of([chain[0][:M], chain[1][:M]], torch.float32), batch_index=0)
    assert acc.hsic_sum.device.type == "cpu" and "batches=1" in repr(acc)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_grams_match_cpu(chain):
    """Grams and pair products on the GPU, state on the GPU, same numbers as the float64 reference."""
    want = ref.minibatch_cka_matrix(chain, M)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-6)):
        acc = MinibatchCKA(n_layers=5, n_groups=4, device="cuda")
        for b, batch in enumerate(batches(chain)):
            grams = torch.stack([gram_linear(torch.from_numpy(z).cuda(), dtype) for z in batch])
            assert grams.is_cuda
            acc.update(grams, batch_index=b)
        got = acc.compute()
        assert got.is_cuda
        assert np.abs(got.cpu().numpy() - want).max() <= tol
        cpu = MinibatchCKA(5, 4).merge(acc)  # merge across devices
        assert np.abs(cpu.compute().numpy() - want).max() <= tol


def _grams(l_layers: int = 2, m: int = 5) -> torch.Tensor:
    return torch.stack([gram_linear(torch.randn(m, 3)) for _ in range(l_layers)])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: MinibatchCKA(0), ValueError, "n_layers must be an int >= 1, got 0"),
        (lambda: MinibatchCKA(2, n_groups=0), ValueError, "n_groups must be an int >= 1, got 0"),
        (lambda: MinibatchCKA(3).update(_grams(2), 0), ValueError, r"grams must have shape \(3, m, m\), got \(2, 5, 5\)"),
        (lambda: MinibatchCKA(2).update(_grams(2).numpy(), 0), ValueError, "grams must have shape .* got ndarray"),
        (lambda: MinibatchCKA(2).update(_grams(2), -1), ValueError, "batch_index must be an int >= 0, got -1"),
        (lambda: MinibatchCKA(2).update(_grams(2), 1.0), ValueError, "batch_index must be an int >= 0"),
        (lambda: MinibatchCKA(2).update(_grams(2, m=3), 0), InsufficientDataError, "at least 4 examples, got 3"),
        (lambda: MinibatchCKA(2).merge("x"), TypeError, "can only merge a MinibatchCKA, got str"),
        (lambda: MinibatchCKA(2).merge(MinibatchCKA(2, n_groups=3)), ValueError,
         r"cannot merge MinibatchCKA\(n_layers=2, n_groups=3\)"),
        (lambda: MinibatchCKA(2).load_state_dict({"hsic_sum": torch.zeros(16, 2, 2)}), ValueError,
         "state keys must be"),
        (lambda: MinibatchCKA(2).load_state_dict(MinibatchCKA(3).state_dict()), ValueError,
         r"state\['hsic_sum'\] must be a torch.float64 tensor of shape \(16, 2, 2\)"),
        (lambda: MinibatchCKA(2).compute(), InsufficientDataError, "no minibatch was added"),
        (lambda: MinibatchCKA(2).compute_stats(), InsufficientDataError, "no minibatch was added"),
        (lambda: MinibatchCKA(2).compute_stats(confidence=95), ValueError, r"confidence must be a number in \(0, 1\)"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
