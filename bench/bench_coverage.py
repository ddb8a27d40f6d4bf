"""Do the intervals mean what they say? Coverage of the 95% intervals of the *population* CKA, by simulation
through ``cka_offline.analyze`` (issue 14, section 2), for the linear and the RBF kernel at 1, 2 and 4 epochs.

Population: x ~ N(0, Sxx) (6 features), y = x A + 1.5 N(0, I) (5 features), fixed by ``--pop-seed`` (the
population of tests/test_sampling.py). ``--reps`` independent data sets of ``--n`` examples are stored as
pairs of layers of one activation file (x0, y0, x1, y1, ...), so one ``analyze()`` call computes all of them:
entry (2k, 2k+1) of its CKA matrix is data set k. Each (kernel, epochs) runs ``analyze`` on that file as a user
would (``-m`` ``--m``, defaults otherwise; a different seed per epochs value) and reports the fraction of
intervals [low, high] that contain the population CKA, and mean(SE) / sd(estimates) (1 when the jackknife SE
estimates the spread of the estimator).

Population CKA:
- linear: closed form from the covariances, ||Sxy||_F^2 / (||Sxx||_F ||Syy||_F).
- RBF (``rbf_fraction`` 0.5): the bandwidth of each layer fixed at its population value, 0.5 x the median
  of ||x - x'|| (x - x' ~ N(0, 2 Sxx), from ``--draws`` draws); then each population HSIC (xy, xx, yy) as the
  mean of the unbiased HSIC_1 (Song et al. 2012) over ``--draws`` independent 4-example samples -- HSIC_1 of
  4 examples is the U-statistic kernel, so its mean is the population HSIC -- and CKA = H_xy / sqrt(H_xx H_yy),
  with a jackknife SE over blocks of draws. Plain float64 numpy from the formulas (``analyze`` has no way to
  fix the bandwidth, so the package cannot compute this reference). Full runs cross-check it with the
  debiased full-data CKA (same fixed bandwidths, U-centred Grams, float64) on ``--check-sets`` data sets of
  ``--check-n`` examples.
- The RBF analyses estimate each layer's bandwidth from the same data (as ``analyze`` always does) and then
  treat it as fixed: that is the effect issue 14 documents (coverage below 95%). The estimated bandwidths are
  summarised in the JSON against the population values.

    python bench/bench_coverage.py [--quick | --smoke] [--reps R] [--n N] [--m M] [--epochs 1,2,4]
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import benchlib as bl

SIZES = {  # reps, n, m, Monte Carlo draws for the RBF population values, cross-check data sets
    "full": (400, 512, 32, 4_000_000, 4),
    "quick": (200, 512, 32, 1_000_000, 0),
    "smoke": (24, 128, 16, 100_000, 0),
}
CHUNK = 100_000  # 4-example draws per block at most (bounded memory)
BLOCKS = 20  # at least this many blocks: the jackknife blocks of the RBF reference's SE


@dataclass(frozen=True)
class Population:
    """x ~ N(0, sxx), y = x a + noise N(0, I)."""

    sxx: np.ndarray
    a: np.ndarray
    noise: float

    @property
    def syy(self) -> np.ndarray:
        return self.a.T @ self.sxx @ self.a + self.noise**2 * np.eye(self.a.shape[1])

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((n, self.sxx.shape[0])) @ np.linalg.cholesky(self.sxx).T
        return x, x @ self.a + self.noise * rng.standard_normal((n, self.a.shape[1]))


def population(seed: int, d: int = 6, d_y: int = 5, noise: float = 1.5) -> Population:
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((d, d)) / math.sqrt(d)
    return Population(b @ b.T + 0.5 * np.eye(d), rng.standard_normal((d, d_y)) / math.sqrt(d), noise)


def linear_cka(pop: Population) -> float:
    """Population linear CKA (Kornblith et al. 2019, eq. 4 with population covariances)."""
    sxy = pop.sxx @ pop.a
    return float(np.linalg.norm(sxy) ** 2 / (np.linalg.norm(pop.sxx) * np.linalg.norm(pop.syy)))


def population_bandwidths(
    pop: Population, fraction: float, draws: int, rng: np.random.Generator
) -> tuple[float, float]:
    """``fraction`` x the population median of ||x - x'|| and of ||y - y'|| (x - x' ~ N(0, 2 Sxx))."""
    out = []
    for cov in (pop.sxx, pop.syy):
        z = rng.standard_normal((draws, cov.shape[0])) @ np.linalg.cholesky(2.0 * cov).T
        out.append(fraction * float(np.median(np.sqrt((z * z).sum(1)))))
    return out[0], out[1]


def _rbf4(v: np.ndarray, sigma: float) -> np.ndarray:
    """(N, 4, d) -> (N, 4, 4) RBF Grams exp(-||v_i - v_j||^2 / (2 sigma^2)) with a zero diagonal."""
    diff = v[:, :, None, :] - v[:, None, :, :]
    k = np.exp(-(diff * diff).sum(-1) / (2.0 * sigma**2))
    k[:, np.arange(4), np.arange(4)] = 0.0
    return k


def _hsic1_4(k: np.ndarray, l: np.ndarray) -> np.ndarray:
    """HSIC_1 (Song et al. 2012, eq. 5) of N samples of 4 examples, zero-diagonal Grams (N, 4, 4) -> (N,):
    (tr(K L) + 1'K1 1'L1 / ((m-1)(m-2)) - 2/(m-2) 1'K L1) / (m(m-3)) at m = 4."""
    trace = (k * l).sum((1, 2))
    rk, rl = k.sum(2), l.sum(2)
    return (trace + rk.sum(1) * rl.sum(1) / 6.0 - (rk * rl).sum(1)) / 4.0


def rbf_cka(pop: Population, sigmas: tuple[float, float], draws: int, rng: np.random.Generator) -> tuple[float, float]:
    """Population RBF CKA at fixed bandwidths: (value, Monte Carlo SE). The mean of HSIC_1 over independent
    4-example samples is the population HSIC; CKA is formed from the three means, its SE a delete-a-block
    jackknife over blocks of draws (at least ``BLOCKS``)."""
    sums = []
    chunk = max(1, min(CHUNK, draws // BLOCKS))
    for start in range(0, draws, chunk):
        x, y = pop.sample(4 * min(chunk, draws - start), rng)
        kx = _rbf4(x.reshape(-1, 4, x.shape[1]), sigmas[0])
        ky = _rbf4(y.reshape(-1, 4, y.shape[1]), sigmas[1])
        sums.append([_hsic1_4(kx, ky).sum(), _hsic1_4(kx, kx).sum(), _hsic1_4(ky, ky).sum(), len(kx)])
    s = np.array(sums)
    return _ratio_with_jackknife(s)


def _ratio_with_jackknife(s: np.ndarray) -> tuple[float, float]:
    """Rows (sum H_xy, sum H_xx, sum H_yy, count) of independent blocks -> (CKA, jackknife SE)."""

    def cka(t: np.ndarray) -> float:
        return float(t[0] / math.sqrt(t[1] * t[2]))

    total = s.sum(0)
    g = len(s)
    if g < 2:
        return cka(total), math.nan
    loo = np.array([cka(total - row) for row in s])
    return cka(total), float(math.sqrt((g - 1) / g * ((loo - loo.mean()) ** 2).sum()))


def debiased_rbf_check(
    pop: Population, sigmas: tuple[float, float], n: int, sets: int, rng: np.random.Generator
) -> tuple[float, float]:
    """The debiased full-data RBF CKA (U-centred Grams, float64, fixed bandwidths) pooled over ``sets``
    independent data sets of ``n`` examples: (value, jackknife SE over the data sets)."""

    def gram(v: np.ndarray, sigma: float) -> np.ndarray:
        v = v - v.mean(0)
        sq = (v * v).sum(1)
        k = np.exp(-np.maximum(sq[:, None] + sq[None, :] - 2.0 * (v @ v.T), 0.0) / (2.0 * sigma**2))
        np.fill_diagonal(k, 0.0)
        # U-centring (Szekely & Rizzo 2014): sum_ij U(K)_ij U(L)_ij / (n(n-3)) is HSIC_1
        rows = k.sum(1) / (n - 2)
        u = k - rows[:, None] - rows[None, :] + k.sum() / ((n - 1) * (n - 2))
        np.fill_diagonal(u, 0.0)
        return u

    rows = []
    for _ in range(sets):
        x, y = pop.sample(n, rng)
        ux, uy = gram(x, sigmas[0]), gram(y, sigmas[1])
        norm = n * (n - 3)
        rows.append([(ux * uy).sum() / norm, (ux * ux).sum() / norm, (uy * uy).sum() / norm, 1])
    return _ratio_with_jackknife(np.array(rows))


def write_replicates(path: Path, pop: Population, n: int, reps: int, rng: np.random.Generator) -> str:
    """``reps`` independent data sets as layers x0, y0, x1, y1, ... of one activation file (float32)."""
    from cka_offline.store.writer import ActivationWriter, LayerSpec

    layers: dict[str, np.ndarray] = {}
    for k in range(reps):
        layers[f"x{k}"], layers[f"y{k}"] = pop.sample(n, rng)
    specs = [LayerSpec(name, (a.shape[1],), "none", a.shape[1]) for name, a in layers.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with ActivationWriter(
        path,
        ids=np.arange(n),
        layers=specs,
        overwrite=True,
        chunk_rows=n,
        provenance={"model": "gaussian population", "extractor": "bench_coverage"},
    ) as w:
        w.write(layers)
    return str(path)


def _bandwidths(result: Any) -> np.ndarray:
    """The recorded per-layer bandwidths (``{file: {layer: sigma}}``) of the one file: (reps, 2), x then y."""
    (by_layer,) = result.params["bandwidths"].values()
    reps = len(by_layer) // 2
    return np.array([[by_layer[f"x{k}"], by_layer[f"y{k}"]] for k in range(reps)], dtype=np.float64)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.common_args(p)
    p.add_argument("--reps", type=int, help="independent data sets per setting (default 400; --quick 200; --smoke 24)")
    p.add_argument("--n", type=int, help="examples per data set (default 512; --smoke 128)")
    p.add_argument("--m", type=int, help="minibatch size (default 32; --smoke 16)")
    p.add_argument("--epochs", default="1,2,4", help="comma-separated epochs values (default 1,2,4)")
    p.add_argument("--kernels", default="linear,rbf", help="comma-separated (default linear,rbf)")
    p.add_argument("--precision", default="float32", help="Gram precision of analyze (default float32, its default)")
    p.add_argument("--draws", type=int, help="Monte Carlo draws for the RBF population values (default 4e6)")
    p.add_argument("--check-sets", type=int, help="data sets of the full-data RBF cross-check (default 4; 0 = none)")
    p.add_argument("--check-n", type=int, default=4000, help="examples per cross-check data set (default 4000)")
    p.add_argument("--pop-seed", type=int, default=0, help="seed of the population (A and Sxx)")
    p.add_argument("--data-seed", type=int, default=1, help="seed of the data sets")
    args = p.parse_args()
    size = bl.size_of(args)
    reps0, n0, m0, draws0, check0 = SIZES[size]
    reps, n, m = args.reps or reps0, args.n or n0, args.m or m0
    draws = args.draws or draws0
    check_sets = check0 if args.check_sets is None else args.check_sets
    epochs_list = [int(e) for e in args.epochs.split(",")]
    kernels = args.kernels.split(",")

    from cka_offline import analyze
    from cka_offline.analysis import AnalysisOptions

    fraction = AnalysisOptions().rbf_fraction  # the default the user gets
    pop = population(args.pop_seed)
    truth: dict[str, dict[str, Any]] = {"linear": {"cka": linear_cka(pop), "se": 0.0, "method": "closed form"}}
    elapsed = bl.timer()
    if "rbf" in kernels:
        rng = np.random.default_rng([args.pop_seed, 7])
        sigmas = population_bandwidths(pop, fraction, draws, rng)
        value, se = rbf_cka(pop, sigmas, draws, rng)
        truth["rbf"] = {
            "cka": value,
            "se": se,
            "bandwidths": list(sigmas),
            "rbf_fraction": fraction,
            "draws": draws,
            "method": "mean HSIC_1 over independent 4-example samples, bandwidths fixed at "
            "rbf_fraction x the population median distance",
        }
        print(
            f"population RBF CKA {value:.4f} (Monte Carlo SE {se:.1e}), bandwidths {sigmas[0]:.4f} {sigmas[1]:.4f} "
            f"({elapsed():.1f} s)"
        )
        if check_sets:
            c_value, c_se = debiased_rbf_check(pop, sigmas, args.check_n, check_sets, rng)
            truth["rbf"]["check"] = {
                "method": "debiased full-data RBF CKA, fixed bandwidths, float64, pooled",
                "sets": check_sets,
                "n": args.check_n,
                "cka": c_value,
                "se": c_se,
                "z": (c_value - value) / math.hypot(c_se, se),
            }
            print(
                f"  cross-check: debiased full-data CKA over {check_sets} x n={args.check_n}: {c_value:.4f} "
                f"(SE {c_se:.1e}; {truth['rbf']['check']['z']:+.1f} SE from the Monte Carlo value)"
            )
    print(f"population linear CKA {truth['linear']['cka']:.4f} (closed form)")

    directory = bl.data_dir(args, f"coverage-{size}")
    path = write_replicates(directory / "replicates.h5", pop, n, reps, np.random.default_rng(args.data_seed))
    print(f"{reps} data sets of n={n} written to {path} ({elapsed():.1f} s)")
    k = np.arange(reps)
    rows = []
    for kernel in kernels:
        true = truth[kernel]["cka"]
        for epochs in epochs_list:
            t = bl.timer()
            r = analyze(
                path,
                batch_size=m,
                epochs=epochs,
                seed=100 + epochs,
                kernel=kernel,
                precision=args.precision,
                device="cpu",
                hash_files=False,
            )
            est, low, high, se = (
                np.asarray(getattr(r, name))[2 * k, 2 * k + 1] for name in ("cka", "low", "high", "se")
            )
            covered = (low <= true) & (true <= high)
            coverage = float(np.mean(covered))
            row = {
                "kernel": kernel,
                "epochs": epochs,
                "coverage": coverage,
                "coverage_se": math.sqrt(coverage * (1 - coverage) / reps),
                "below": float(np.mean(high < true)),
                "above": float(np.mean(low > true)),
                "se_over_sd": float(np.mean(se) / np.std(est, ddof=1)),
                "mean_se": float(np.mean(se)),
                "sd_estimates": float(np.std(est, ddof=1)),
                "mean_estimate": float(np.mean(est)),
                "bias": float(np.mean(est) - true),
                "true": true,
                "replicates": reps,
                "n": n,
                "m": m,
                "n_groups": int(r.params["n_groups"]),
                "minibatches": int(r.n_minibatches),
                "confidence": float(r.params["confidence"]),
                "seconds": t(),
            }
            if kernel == "rbf":
                ratio = _bandwidths(r) / np.array(truth["rbf"]["bandwidths"])
                row["bandwidth_ratio"] = {"mean": ratio.mean(0).tolist(), "sd": ratio.std(0, ddof=1).tolist()}
            rows.append(row)
            print(
                f"  {kernel:6s} E={epochs}: coverage {coverage:.3f} +- {row['coverage_se']:.3f}, "
                f"mean SE / sd {row['se_over_sd']:.2f}, bias {row['bias']:+.4f} ({row['seconds']:.1f} s)"
            )

    print()
    print("| kernel | epochs | coverage of 95% intervals | mean SE / sd | jackknife groups | replicates | n | m |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['kernel']} | {row['epochs']} | {row['coverage']:.3f} (+- {row['coverage_se']:.3f}) | "
            f"{row['se_over_sd']:.2f} | {row['n_groups']} | {row['replicates']} | {row['n']} | {row['m']} |"
        )
    print()
    bl.write_result(
        "coverage",
        {
            "size": size,
            "population": {
                "d_x": int(pop.sxx.shape[0]),
                "d_y": int(pop.a.shape[1]),
                "noise": pop.noise,
                "seed": args.pop_seed,
            },
            "truth": truth,
            "rows": rows,
            "precision": args.precision,
            "seconds": elapsed(),
            "note": "coverage: fraction of data sets whose interval [low, high] contains the population CKA "
            "(coverage_se: its binomial SE); se_over_sd: mean jackknife SE / sd of the estimates over the "
            "data sets. RBF: analyze estimates each layer's bandwidth from the same data and treats it as "
            "fixed (bandwidth_ratio: estimated / population bandwidth, x then y layers).",
        },
        args.results_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
