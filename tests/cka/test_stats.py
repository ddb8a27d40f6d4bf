"""Student-t quantiles and the grouped jackknife: formula against the reference, coverage by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cka_offline.cka import MinibatchCKA, gram_linear, student_t_ppf
from cka_offline.cka.stats import betainc_regularized, student_t_cdf

from . import reference as ref


@pytest.mark.parametrize(
    "p, df, want",
    [
        (0.975, 15, 2.131449545559323),  # tables: 2.131
        (0.975, 1, math.tan(math.pi * 0.475)),  # Cauchy, closed form: 12.706
        (0.975, 2, 0.95 * math.sqrt(2.0 / (4 * 0.975 * 0.025))),  # closed form for df = 2: 4.303
        (0.995, 30, 2.749995653567),  # tables: 2.750
        (0.95, 1000, 1.6463788172854643),  # scipy; -> normal 1.6449
        (0.025, 15, -2.131449545559323),
        (0.5, 3, 0.0),
    ],
)
def test_student_t_quantile_known_values(p, df, want):
    assert student_t_ppf(p, df) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_student_t_quantile_inverts_the_cdf_and_matches_scipy_when_present():
    for df in (1, 2.5, 7, 40):
        for p in (0.6, 0.9, 0.999):
            assert student_t_cdf(student_t_ppf(p, df), df) == pytest.approx(p, abs=1e-12)
    assert student_t_cdf(-2.131449545559323, 15) == pytest.approx(0.025, abs=1e-13)
    assert student_t_cdf(-1.0, 1) == pytest.approx(0.25, abs=1e-14)  # Cauchy: 1/2 + atan(t)/pi
    assert student_t_cdf(math.inf, 3) == 1.0 and student_t_cdf(-math.inf, 3) == 0.0
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 3, 15, 100):
        for p in (0.55, 0.975, 0.9995):
            assert student_t_ppf(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: student_t_ppf(1.0, 3), ValueError, "0 < p < 1, got p=1.0"),
        (lambda: student_t_ppf(0.9, 0), ValueError, "degrees of freedom must be > 0, got 0"),
        (lambda: student_t_cdf(1.0, -1), ValueError, "degrees of freedom must be > 0, got -1"),
        (lambda: betainc_regularized(0.0, 1.0, 0.5), ValueError, "a > 0 and b > 0"),
        (lambda: betainc_regularized(1.0, 1.0, 1.5), ValueError, "0 <= x <= 1, got x=1.5"),
        (lambda: betainc_regularized(1e12, 1e12, 0.5 - 1e-13), ArithmeticError, "did not converge"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _per_batch_hsic(x: np.ndarray, y: np.ndarray, m: int) -> list[tuple[float, float, float]]:
    out = []
    for s in range(0, x.shape[0], m):
        k, l = ref.linear_gram(x[s : s + m]), ref.linear_gram(y[s : s + m])
        out.append((ref.hsic1(k, l), ref.hsic1(k, k), ref.hsic1(l, l)))
    return out


@pytest.mark.parametrize("n_groups", [3, 10])  # 7 minibatches: 3 groups of 3/2/2, or 7 groups and 3 empty ones
def test_jackknife_matches_reference_with_empty_groups(chain, n_groups):
    x, y, m = chain[1][:112], chain[2][:112], 16
    per_batch = _per_batch_hsic(x, y, m)
    groups: dict[int, np.ndarray] = {}
    for b, h in enumerate(per_batch):
        groups[b % n_groups] = groups.get(b % n_groups, 0) + np.asarray(h)
    theta, se = ref.jackknife(list(groups.values()))
    acc = MinibatchCKA(2, n_groups)
    for b, s in enumerate(range(0, 112, m)):
        acc.update(torch.stack([gram_linear(torch.from_numpy(z[s : s + m]), torch.float64) for z in (x, y)]), b)
    stats = acc.compute_stats(confidence=0.9)
    g = len(groups)
    assert stats.n_groups == g and stats.confidence == 0.9
    assert stats.cka[0, 1] == pytest.approx(theta, abs=1e-12)
    assert stats.se[0, 1] == pytest.approx(se, rel=1e-9)
    t = student_t_ppf(0.95, g - 1)
    assert stats.low[0, 1] == pytest.approx(theta - t * se, abs=1e-12)
    assert stats.high[0, 1] == pytest.approx(theta + t * se, abs=1e-12)
    assert all(a.dtype == np.float64 and a.shape == (2, 2) for a in (stats.cka, stats.se, stats.low, stats.high))


def test_one_non_empty_group_gives_nan_standard_errors_and_a_warning(chain, caplog):
    acc = MinibatchCKA(2, n_groups=4)
    for b in (0, 4):  # both land in group 0
        acc.update(torch.stack([gram_linear(torch.from_numpy(z[b * 8 : b * 8 + 16])) for z in chain[:2]]), b)
    stats = acc.compute_stats()
    assert stats.n_groups == 1 and np.isfinite(stats.cka).all()
    assert np.isnan(stats.se).all() and np.isnan(stats.low).all() and np.isnan(stats.high).all()
    assert "at least 2 groups, got 1" in caplog.text


def _population_cka(sxx: np.ndarray, a: np.ndarray, noise: float) -> float:
    """Linear CKA of x ~ N(0, Sxx) and y = x A + noise e: ||Sxy||_F^2 / (||Sxx||_F ||Syy||_F)."""
    sxy = sxx @ a
    syy = a.T @ sxx @ a + noise**2 * np.eye(a.shape[1])
    return float(np.linalg.norm(sxy) ** 2 / (np.linalg.norm(sxx) * np.linalg.norm(syy)))


def test_jackknife_interval_covers_the_population_cka_about_95_percent():
    rng = np.random.default_rng(0)
    d, d_y, noise, n_batches, m, n_groups, reps = 6, 5, 1.5, 16, 32, 16, 200
    b = rng.standard_normal((d, d)) / math.sqrt(d)
    sxx = b @ b.T + 0.5 * np.eye(d)
    a = rng.standard_normal((d, d_y)) / math.sqrt(d)
    true = _population_cka(sxx, a, noise)
    chol = np.linalg.cholesky(sxx)
    covered, ses, estimates = 0, [], []
    for _ in range(reps):
        x = rng.standard_normal((n_batches, m, d)) @ chol.T
        y = x @ a + noise * rng.standard_normal((n_batches, m, d_y))
        # the population means are 0, so uncentred float64 Grams are fine here and faster to build in bulk
        grams = torch.from_numpy(np.stack([x @ x.transpose(0, 2, 1), y @ y.transpose(0, 2, 1)], axis=1))
        acc = MinibatchCKA(2, n_groups)
        for i in range(n_batches):
            acc.update(grams[i], batch_index=i)
        stats = acc.compute_stats(confidence=0.95)
        covered += stats.low[0, 1] <= true <= stats.high[0, 1]
        ses.append(stats.se[0, 1])
        estimates.append(stats.cka[0, 1])
    assert 0.2 < true < 0.6
    assert 0.88 <= covered / reps <= 0.99
    assert 0.8 <= np.mean(ses) / np.std(estimates) <= 1.25  # SE estimates the spread of the estimator
