"""The statistics of a comparison: quantiles and their ratio with a bootstrap
interval, the two-sample Kolmogorov-Smirnov test, the Population Stability
Index, and the difference of two rates.

Each works from raw durations (a sorted ``numpy`` array) or from histogram
buckets (``Buckets``: upper bounds and cumulative counts, as Prometheus keeps
them). From buckets, a quantile is interpolated inside its bucket as PromQL's
``histogram_quantile`` does, and the KS statistic is the largest gap between
the two cumulative distributions at the bucket bounds, which is never more
than the raw statistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import stats as _scipy_stats

__all__ = [
    "PSI_MODERATE",
    "PSI_SIGNIFICANT",
    "Buckets",
    "KSResult",
    "ks_buckets",
    "ks_raw",
    "psi",
    "psi_band",
    "psi_buckets",
    "psi_raw",
    "quantile_buckets",
    "quantile_raw",
    "ratio_interval_buckets",
    "ratio_interval_raw",
    "rate_difference_interval",
]

PSI_MODERATE = 0.1
PSI_SIGNIFICANT = 0.2
# An empty bin would make ln(a/e) infinite: its share counts as this instead
# (the usual convention of PSI implementations).
PSI_EPSILON = 1e-4
# Quantile bins of the baseline for PSI on raw durations: ten, fewer for small samples,
# so that a bin expects some observations on both sides (an empty bin alone reads as drift).
PSI_RAW_BINS = 10
PSI_MIN_PER_BIN = 10
BOOTSTRAP_DRAWS = 2000

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class Buckets:
    """A histogram: ascending upper bounds (the last one ``inf``) and cumulative counts."""

    bounds: tuple[float, ...]
    cumulative: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.bounds) != len(self.cumulative) or not self.bounds:
            raise ValueError("buckets need one cumulative count per upper bound")
        if not math.isinf(self.bounds[-1]):
            raise ValueError("the last bucket must be +Inf")
        if any(b <= a for a, b in zip(self.bounds, self.bounds[1:], strict=False)):
            raise ValueError("bucket bounds must ascend")

    @property
    def count(self) -> float:
        return self.cumulative[-1]

    def counts(self) -> FloatArray:
        """Per-bucket (not cumulative) counts; a decrease (a counter reset seen by
        ``increase()`` rounding) counts as zero."""
        cumulative = np.maximum.accumulate(np.asarray(self.cumulative, dtype=np.float64))
        return np.diff(cumulative, prepend=0.0)


@dataclass(frozen=True)
class KSResult:
    statistic: float
    p_value: float


def quantile_raw(ordered: FloatArray, q: float) -> float:
    """The ``q`` quantile of sorted durations: the smallest value with at least ``q`` of them at or below it."""
    if ordered.size == 0:
        return math.nan
    k = max(1, math.ceil(q * ordered.size))
    return float(ordered[k - 1])


def _quantile_counts(bounds: FloatArray, counts: FloatArray, q: float) -> FloatArray:
    """``histogram_quantile`` for each row of ``counts`` (per-bucket counts, one histogram a row)."""
    cumulative = np.cumsum(counts, axis=-1)
    total = cumulative[..., -1:]
    rank = q * total
    index = np.minimum((cumulative < rank).sum(axis=-1), bounds.size - 1)
    # The +Inf bucket has no upper bound: like PromQL, answer the highest finite bound.
    finite = bounds[-2] if bounds.size > 1 else math.nan
    lower = np.where(index > 0, bounds[np.maximum(index - 1, 0)], 0.0)
    upper = bounds[index]
    below = np.where(index > 0, np.take_along_axis(cumulative, np.maximum(index - 1, 0)[..., None], -1)[..., 0], 0.0)
    inside = np.take_along_axis(counts, index[..., None], -1)[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(inside > 0, (rank[..., 0] - below) / inside, 1.0)
        value = lower + (upper - lower) * np.clip(fraction, 0.0, 1.0)
    value = np.where(np.isinf(upper), finite, value)
    return np.where(total[..., 0] > 0, value, np.nan)


def quantile_buckets(buckets: Buckets, q: float) -> float:
    """The ``q`` quantile of a histogram, interpolated as PromQL's ``histogram_quantile``."""
    bounds = np.asarray(buckets.bounds, dtype=np.float64)
    return float(_quantile_counts(bounds, buckets.counts(), q))


def _order_statistic_draws(ordered: FloatArray, q: float, draws: int, rng: np.random.Generator) -> FloatArray:
    """The bootstrap distribution of ``quantile_raw(ordered, q)``, sampled exactly without resampling.

    In a resample of n values drawn with replacement, the k-th smallest is at most
    ``ordered[i-1]`` exactly when at least k draws fall among the i smallest: a
    Binomial(n, i/n) event. Inverting that distribution function gives the same
    draws as resampling the whole array ``draws`` times, in O(n) memory and time.
    """
    n = ordered.size
    k = max(1, math.ceil(q * n))
    positions = np.arange(1, n + 1, dtype=np.float64) / n
    cdf = _scipy_stats.binom.sf(k - 1, n, positions)
    index = np.searchsorted(cdf, rng.random(draws), side="left")
    return ordered[np.minimum(index, n - 1)]


def _interval(ratios: FloatArray, confidence: float) -> tuple[float, float]:
    ratios = ratios[np.isfinite(ratios)]
    if ratios.size == 0:
        return (math.nan, math.nan)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return (float(low), float(high))


def ratio_interval_raw(
    baseline: FloatArray, candidate: FloatArray, q: float, *, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``quantile(candidate, q) / quantile(baseline, q)`` (sorted inputs)."""
    if baseline.size == 0 or candidate.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    base = _order_statistic_draws(baseline, q, BOOTSTRAP_DRAWS, rng)
    cand = _order_statistic_draws(candidate, q, BOOTSTRAP_DRAWS, rng)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _interval(cand / base, confidence)


def ratio_interval_buckets(
    baseline: Buckets, candidate: Buckets, q: float, *, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap interval of the quantile ratio from buckets: each side's counts redrawn
    from a multinomial with its own bucket shares (what resampling its observations does)."""
    if baseline.bounds != candidate.bounds:
        raise ValueError("the two histograms have different buckets")
    rng = np.random.default_rng(seed)
    bounds = np.asarray(baseline.bounds, dtype=np.float64)
    draws = []
    for side in (baseline, candidate):
        counts = side.counts()
        n = int(round(counts.sum()))
        if n == 0:
            return (math.nan, math.nan)
        resampled = rng.multinomial(n, counts / counts.sum(), size=BOOTSTRAP_DRAWS).astype(np.float64)
        draws.append(_quantile_counts(bounds, resampled, q))
    with np.errstate(divide="ignore", invalid="ignore"):
        return _interval(draws[1] / draws[0], confidence)


def ks_raw(baseline: FloatArray, candidate: FloatArray) -> KSResult:
    """Two-sample Kolmogorov-Smirnov test on raw durations (scipy's ``ks_2samp``, two-sided)."""
    result = _scipy_stats.ks_2samp(baseline, candidate)
    return KSResult(float(result.statistic), float(result.pvalue))


def ks_buckets(baseline: Buckets, candidate: Buckets) -> KSResult:
    """KS on histograms: the largest gap between the two empirical distribution functions
    at the shared bucket bounds, with the asymptotic p-value for the two sample sizes
    (scipy's choice for large samples). Binning only hides gaps, so the statistic is a
    lower bound of the raw one and the test errs on the side of "no difference"."""
    if baseline.bounds != candidate.bounds:
        raise ValueError("the two histograms have different buckets")
    n, m = baseline.count, candidate.count
    if n <= 0 or m <= 0:
        return KSResult(math.nan, math.nan)
    base = np.maximum.accumulate(np.asarray(baseline.cumulative, dtype=np.float64)) / n
    cand = np.maximum.accumulate(np.asarray(candidate.cumulative, dtype=np.float64)) / m
    statistic = float(np.max(np.abs(base - cand)))
    effective = round(n * m / (n + m))
    p_value = float(_scipy_stats.kstwo.sf(statistic, max(effective, 1)))
    return KSResult(statistic, min(max(p_value, 0.0), 1.0))


def psi(expected: FloatArray, actual: FloatArray) -> float:
    """Population Stability Index of two vectors of bin counts:
    ``sum((a - e) * ln(a / e))`` over the bins' shares, an empty bin counting as ``PSI_EPSILON``."""
    e = np.maximum(expected / max(expected.sum(), 1e-300), PSI_EPSILON)
    a = np.maximum(actual / max(actual.sum(), 1e-300), PSI_EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def psi_raw(baseline: FloatArray, candidate: FloatArray, bins: int | None = None) -> float:
    """PSI over ``bins`` quantile bins of the baseline (by default ``PSI_RAW_BINS``, fewer when
    the smaller side has under ``PSI_MIN_PER_BIN`` observations a bin)."""
    if baseline.size == 0 or candidate.size == 0:
        return math.nan
    if bins is None:
        bins = max(2, min(PSI_RAW_BINS, min(baseline.size, candidate.size) // PSI_MIN_PER_BIN))
    inner = np.unique(np.quantile(baseline, np.linspace(0, 1, bins + 1)[1:-1]))
    expected = np.bincount(np.searchsorted(inner, baseline, side="right"), minlength=inner.size + 1)
    actual = np.bincount(np.searchsorted(inner, candidate, side="right"), minlength=inner.size + 1)
    return psi(expected.astype(np.float64), actual.astype(np.float64))


def psi_buckets(baseline: Buckets, candidate: Buckets) -> float:
    """PSI over the histogram's own buckets."""
    if baseline.bounds != candidate.bounds:
        raise ValueError("the two histograms have different buckets")
    if baseline.count <= 0 or candidate.count <= 0:
        return math.nan
    return psi(baseline.counts(), candidate.counts())


def psi_band(value: float) -> str:
    """``none`` below 0.1, ``moderate`` below 0.2, ``significant`` from 0.2."""
    if math.isnan(value) or value < PSI_MODERATE:
        return "none"
    return "moderate" if value < PSI_SIGNIFICANT else "significant"


def _wilson(successes: float, n: float, z: float) -> tuple[float, float]:
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate_difference_interval(
    base_hits: float, base_n: float, cand_hits: float, cand_n: float, confidence: float = 0.95
) -> tuple[float, float]:
    """Interval for ``cand_rate - base_rate`` (Newcombe's hybrid score interval, from
    Wilson intervals of each rate: sound for small counts and rates near 0 or 1)."""
    z = float(_scipy_stats.norm.ppf(1 - (1 - confidence) / 2))
    p1 = base_hits / base_n if base_n else 0.0
    p2 = cand_hits / cand_n if cand_n else 0.0
    l1, u1 = _wilson(base_hits, base_n, z)
    l2, u2 = _wilson(cand_hits, cand_n, z)
    d = p2 - p1
    low = d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2)
    high = d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
    return (max(-1.0, low), min(1.0, high))
