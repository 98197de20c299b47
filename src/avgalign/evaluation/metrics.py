"""Pure metrics over arrays (numpy only): mean and interval, win rates, the length-controlled
win rate, the KL estimate, length summaries; each with its formula in the docstring."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from typing import NamedTuple

import numpy as np


class MeanCI(NamedTuple):
    """A mean with the bounds of its confidence interval."""

    mean: float
    lo: float
    hi: float


@dataclass(frozen=True)
class WinRate:
    """A (possibly length-controlled) win rate in [0, 1] with a bootstrap confidence interval."""

    rate: float
    lo: float
    hi: float
    n: int  # number of paired comparisons


def _as_1d(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def mean_ci(values, confidence: float = 0.95) -> MeanCI:
    """Mean with a normal-approximation interval: mean +- z * s / sqrt(n).

    s is the sample standard deviation (ddof=1) and z = Phi^-1((1 + confidence) / 2). With a
    single value there is no spread to estimate, so lo = hi = mean.
    """
    x = _as_1d(values, "values")
    mean = float(x.mean())
    if x.size == 1:
        return MeanCI(mean, mean, mean)
    z = NormalDist().inv_cdf((1.0 + confidence) / 2.0)
    half = z * float(x.std(ddof=1)) / np.sqrt(x.size)
    return MeanCI(mean, mean - half, mean + half)


def pairwise_outcomes(policy_scores, reference_scores) -> np.ndarray:
    """Pair outcomes, policy vs reference: 1 if the policy scores higher, 0.5 if tied, else 0."""
    p = _as_1d(policy_scores, "policy_scores")
    r = _as_1d(reference_scores, "reference_scores")
    if p.shape != r.shape:
        raise ValueError(f"got {p.size} policy scores but {r.size} reference scores")
    return (p > r).astype(np.float64) + 0.5 * (p == r)


def _percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(samples, [tail, 100.0 - tail])
    return float(lo), float(hi)


def bootstrap(statistic: Callable[[np.ndarray], np.ndarray], n: int, n_boot: int, seed: int):
    """statistic(counts) over n_boot resamplings of n pairs with replacement -> [n_boot] values.

    A resampling is given as its multiplicities counts [B, n] (how often each pair was drawn):
    re-weighting is the same as resampling, and lets weighted statistics (and the logistic fit
    below) run on many replicates at once. Replicates go in chunks to bound memory.
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, 1_000_000 // n)
    values = []
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)
        values.append(statistic(counts))
    return np.concatenate(values)


def win_rate(
    policy_scores,
    reference_scores,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> WinRate:
    """Paired win rate of the policy over the reference: mean_i o_i, o_i in {1, 0.5, 0}.

    Pair i compares the policy's and the reference's completion for the same prompt and sample
    index. The interval is the percentile bootstrap over pairs.
    """
    outcomes = pairwise_outcomes(policy_scores, reference_scores)
    n = outcomes.size
    boot = bootstrap(lambda counts: counts @ outcomes / n, n, n_boot, seed)
    lo, hi = _percentile_interval(boot, confidence)
    return WinRate(float(outcomes.mean()), lo, hi, n)


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)), without overflow


def _logistic_objective(w: np.ndarray, x: np.ndarray, t: np.ndarray, c: np.ndarray, l2: float):
    """sum_i c_i [softplus(z_i) - t_i z_i] + l2/2 |w|^2 with z = x w, for each row of w [B, k]."""
    z = w @ x.T  # [B, n]
    return (c * (np.logaddexp(0.0, z) - t * z)).sum(axis=1) + 0.5 * l2 * (w * w).sum(axis=1)


def fit_logistic(
    x: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray,
    *,
    l2: float,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> np.ndarray:
    """L2-penalised logistic regression with soft targets, by damped Newton; one fit per row of
    `weights`.

    Minimises  sum_i c_i [-t_i log s(x_i.w) - (1 - t_i) log(1 - s(x_i.w))] + l2/2 |w|^2,
    s the sigmoid, x [n, k] features, t [n] targets in [0, 1], c [B, n] weights; returns w [B, k].
    A soft target t counts a row as t of a success and 1 - t of a failure, which is how ties
    (t = 0.5) enter as half a win and half a loss. With l2 > 0 the objective is strictly convex, so
    the minimiser exists and is finite even under perfect separation. Each Newton step is halved
    until the objective does not increase.
    """
    if l2 <= 0:
        raise ValueError("l2 must be > 0 (it keeps the fit finite under perfect separation)")
    c = np.atleast_2d(weights)
    n_fits, k = c.shape[0], x.shape[1]
    w = np.zeros((n_fits, k))
    eye = np.eye(k)
    outer = (x[:, :, None] * x[:, None, :]).reshape(len(x), k * k)  # x_i x_i^T, flattened
    f = _logistic_objective(w, x, targets, c, l2)
    for _ in range(max_iter):
        s = _sigmoid(w @ x.T)
        grad = (c * (s - targets)) @ x + l2 * w
        hess = ((c * s * (1.0 - s)) @ outer).reshape(n_fits, k, k) + l2 * eye
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        if np.max(np.abs(step)) < tol:
            break
        # near the optimum f changes below round-off, hence the slack in "does not increase"
        slack = 1e-12 * (1.0 + np.abs(f))
        eta = np.ones(n_fits)
        for _ in range(50):
            w_try = w - eta[:, None] * step
            f_try = _logistic_objective(w_try, x, targets, c, l2)
            worse = f_try > f + slack
            if not worse.any():
                break
            eta = np.where(worse, eta / 2.0, eta)
        w, f = w_try, f_try
    return w


def length_controlled_win_rate(
    policy_scores,
    reference_scores,
    policy_lengths,
    reference_lengths,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    l2: float = 0.1,
) -> WinRate:
    """Win rate at zero length difference, in the spirit of AlpacaEval 2's length control.

    Fit P(policy wins | d) = s(a + b * d / sd(d)), with d = len_policy - len_reference per pair and
    s the sigmoid, by L2-penalised logistic regression (ties count as half a win and half a loss),
    and report s(a): the win rate a policy would have if its completions were as long as the
    reference's. d is scaled by its standard deviation but not centred, so that the intercept sits
    at d = 0. The l2 penalty (on a and b, summed loss) keeps the fit finite when the outcome is
    perfectly separated by d or is the same for every pair; it shrinks a towards 0 (a rate of 0.5)
    by an amount that vanishes as the number of pairs grows. Interval: percentile bootstrap over
    pairs, refitting on each replicate with the scale of d held fixed.
    """
    outcomes = pairwise_outcomes(policy_scores, reference_scores)
    lp = _as_1d(policy_lengths, "policy_lengths")
    lr = _as_1d(reference_lengths, "reference_lengths")
    if not (lp.size == lr.size == outcomes.size):
        raise ValueError("scores and lengths must all have one entry per pair")
    d = lp - lr
    scale = float(d.std())
    x = np.stack([np.ones_like(d), d / (scale if scale > 0 else 1.0)], axis=1)
    n = outcomes.size
    w = fit_logistic(x, outcomes, np.ones((1, n)), l2=l2)

    def intercepts(counts: np.ndarray) -> np.ndarray:
        return fit_logistic(x, outcomes, counts, l2=l2)[:, 0]

    lo, hi = _percentile_interval(_sigmoid(bootstrap(intercepts, n, n_boot, seed)), confidence)
    return WinRate(float(_sigmoid(w[0, 0])), lo, hi, n)


def kl_estimate(policy_logps, reference_logps, confidence: float = 0.95) -> MeanCI:
    """Monte-Carlo estimate of KL(pi || pi_ref) from completions sampled from pi.

    KL = E_{y ~ pi(.|x)} [log pi(y|x) - log pi_ref(y|x)] ~ (1/N) sum_i (log pi(y_i|x_i) -
    log pi_ref(y_i|x_i)), with sequence (summed over tokens) log-likelihoods. Unbiased only if the
    y_i really are samples of pi (temperature 1, no top-p / top-k truncation); single terms can be
    negative. Interval from `mean_ci`.
    """
    p = _as_1d(policy_logps, "policy_logps")
    r = _as_1d(reference_logps, "reference_logps")
    if p.shape != r.shape:
        raise ValueError(f"got {p.size} policy log-probs but {r.size} reference log-probs")
    return mean_ci(p - r, confidence)


def length_summary(lengths) -> dict[str, float]:
    """mean, median, p90 (linear interpolation), min, max and std (sample std, ddof=1; 0 if n=1)."""
    x = _as_1d(lengths, "lengths")
    return {
        "mean": float(x.mean()),
        "median": float(np.median(x)),
        "p90": float(np.percentile(x, 90)),
        "min": float(x.min()),
        "max": float(x.max()),
        "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
    }
