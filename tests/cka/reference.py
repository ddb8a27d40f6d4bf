"""Plain float64 numpy reference for the CKA math, written from the papers' formulas.

Independent of cka_offline.cka on purpose: explicit matrices and loops, no shared helpers.
- Unbiased HSIC_1: Song et al. 2012, eq. 5, with K~ = K with its diagonal set to zero.
- Minibatch CKA: Nguyen, Raghu & Kornblith 2020, sums of HSIC_1 over minibatches.
- Biased linear CKA: Kornblith et al. 2019, HSIC(K, L) = tr(K H L H) / (n-1)^2, H = I - 11'/n.
- Full-data CKA of any kernel: the same two HSICs over one n x n Gram of all examples (RBF with a given sigma).
"""

from __future__ import annotations

import math

import numpy as np


def linear_gram(x: np.ndarray, center: bool = True) -> np.ndarray:
    """K = X X'. Centring the features first changes no HSIC_1 value and keeps float64 exact enough."""
    x = np.asarray(x, dtype=np.float64)
    if center:
        x = x - x.mean(axis=0, keepdims=True)
    return x @ x.T


def rbf_gram(x: np.ndarray, sigma: float) -> np.ndarray:
    """K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2)), by an explicit double loop."""
    x = np.asarray(x, dtype=np.float64)
    m = x.shape[0]
    k = np.empty((m, m))
    for i in range(m):
        for j in range(m):
            diff = x[i] - x[j]
            k[i, j] = math.exp(-float(diff @ diff) / (2.0 * sigma * sigma))
    return k


def median_pairwise_distance(x: np.ndarray) -> float:
    """Median of ||x_i - x_j|| over pairs i < j."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    dists = [math.sqrt(float((x[i] - x[j]) @ (x[i] - x[j]))) for i in range(n) for j in range(i + 1, n)]
    return float(np.median(dists))


def hsic1(k: np.ndarray, l: np.ndarray) -> float:
    """Unbiased HSIC_1 (Song et al. 2012):
    [tr(K~L~) + (1'K~1)(1'L~1)/((m-1)(m-2)) - 2/(m-2) 1'K~L~1] / (m(m-3))."""
    k = np.array(k, dtype=np.float64)
    l = np.array(l, dtype=np.float64)
    m = k.shape[0]
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(m)
    term1 = np.trace(k @ l)
    term2 = (one @ k @ one) * (one @ l @ one) / ((m - 1) * (m - 2))
    term3 = 2.0 / (m - 2) * (one @ k @ l @ one)
    return float((term1 + term2 - term3) / (m * (m - 3)))


def minibatch_cka(grams_x: list[np.ndarray], grams_y: list[np.ndarray]) -> float:
    """sum_b HSIC_1(K_b, L_b) / sqrt(sum_b HSIC_1(K_b, K_b) * sum_b HSIC_1(L_b, L_b))."""
    xy = sum(hsic1(k, l) for k, l in zip(grams_x, grams_y))
    xx = sum(hsic1(k, k) for k in grams_x)
    yy = sum(hsic1(l, l) for l in grams_y)
    return xy / math.sqrt(xx * yy)


def minibatch_cka_matrix(layers: list[np.ndarray], batch_size: int, kernel=linear_gram) -> np.ndarray:
    """L x L minibatch CKA of ``layers`` (each (n, d_i), same n), consecutive minibatches of ``batch_size``."""
    n = layers[0].shape[0]
    grams = [[kernel(z[s : s + batch_size]) for s in range(0, n, batch_size)] for z in layers]
    n_layers = len(layers)
    out = np.empty((n_layers, n_layers))
    for i in range(n_layers):
        for j in range(n_layers):
            out[i, j] = minibatch_cka(grams[i], grams[j])
    return out


def cka_biased(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. 2019 linear CKA with HSIC(K, L) = tr(K H L H) / (n-1)^2."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k = x @ x.T
    l = y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return float(hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l)))


def cka_debiased(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA with the unbiased HSIC_1 over all n examples in one Gram."""
    k, l = linear_gram(x), linear_gram(y)
    return hsic1(k, l) / math.sqrt(hsic1(k, k) * hsic1(l, l))


def hsic0(k: np.ndarray, l: np.ndarray) -> float:
    """Biased HSIC (Kornblith et al. 2019, eq. 3): tr(K H L H) / (n-1)^2, H = I - 11'/n, by explicit products."""
    k = np.asarray(k, dtype=np.float64)
    l = np.asarray(l, dtype=np.float64)
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l @ h) / (n - 1) ** 2)


def cka_full_kernel(k: np.ndarray, l: np.ndarray, debiased: bool) -> float:
    """Full-data CKA of two n x n Grams of all examples: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), with the
    biased HSIC (hsic0) or the unbiased HSIC_1 (hsic1)."""
    hsic = hsic1 if debiased else hsic0
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def cka_rbf_full(x: np.ndarray, y: np.ndarray, sigma_x: float, sigma_y: float, debiased: bool) -> float:
    """Exact RBF CKA (Kornblith et al. 2019, sec. 3, biased; or debiased with HSIC_1) over all n examples."""
    return cka_full_kernel(rbf_gram(x, sigma_x), rbf_gram(y, sigma_y), debiased)


def jackknife(per_group: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Grouped jackknife of CKA from per-group sums (xy, xx, yy); returns (theta, se)."""
    tot = np.sum(per_group, axis=0)
    theta = tot[0] / math.sqrt(tot[1] * tot[2])
    loo = []
    for g in per_group:
        r = tot - np.asarray(g)
        loo.append(r[0] / math.sqrt(r[1] * r[2]))
    n_groups = len(loo)
    mean = sum(loo) / n_groups
    se = math.sqrt((n_groups - 1) / n_groups * sum((t - mean) ** 2 for t in loo))
    return theta, se
