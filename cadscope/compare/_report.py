"""A comparison of two sides, feature by feature, and its verdict."""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _stats
from ._geometry import Mismatch, Tolerances, compare_geometry
from ._sources import SideData

__all__ = ["FeatureResult", "OutcomeResult", "Report", "Thresholds", "compare_sides"]


@dataclass(frozen=True)
class Thresholds:
    """When a difference is a verdict."""

    # KS rejects "same distribution" below this p-value.
    alpha: float = 0.05
    # A quantile ratio at or above this (or at or below its inverse) with its
    # bootstrap interval clear of 1 makes the candidate slower (faster).
    ratio: float = 1.25
    # Fewer observations than this on either side: no verdict.
    min_samples: int = 10
    confidence: float = 0.95
    seed: int = 0


@dataclass
class FeatureResult:
    feature: str
    kind: str  # "stage", "operation" or "flow"
    method: str  # "raw" or "buckets"
    n_baseline: int
    n_candidate: int
    p50: tuple[float, float] = (math.nan, math.nan)
    p95: tuple[float, float] = (math.nan, math.nan)
    ratio_p50: float = math.nan
    ratio_p50_ci: tuple[float, float] = (math.nan, math.nan)
    ratio_p95: float = math.nan
    ratio_p95_ci: tuple[float, float] = (math.nan, math.nan)
    ks: _stats.KSResult = _stats.KSResult(math.nan, math.nan)
    # The KS p-value adjusted for the number of features judged in the comparison (Holm).
    ks_p_adjusted: float = math.nan
    psi: float = math.nan
    verdict: str = "too few"  # slower, faster, different, same, too few
    # What the plots draw: sorted raw durations, or bucket bounds and cumulative shares.
    plot: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def regression(self) -> bool:
        return self.verdict == "slower"


@dataclass
class OutcomeResult:
    outcome: str
    baseline: int
    candidate: int
    rate_baseline: float
    rate_candidate: float
    difference_ci: tuple[float, float]


@dataclass
class Report:
    baseline: SideData
    candidate: SideData
    thresholds: Thresholds
    tolerances: Tolerances
    features: list[FeatureResult]
    outcomes: list[OutcomeResult]
    failure_rate_ci: tuple[float, float]
    mismatches: list[Mismatch]
    jobs_compared: int
    timestamp: str = field(default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))

    @property
    def regressions(self) -> list[FeatureResult]:
        return [f for f in self.features if f.regression]

    @property
    def failures_up(self) -> bool:
        """The candidate fails more often, beyond chance."""
        return self.failure_rate_ci[0] > 0

    @property
    def failed(self) -> bool:
        """What makes ``cadscope compare`` exit 1."""
        return bool(self.regressions or self.mismatches or self.failures_up)

    def sizes(self) -> tuple[int, int]:
        """Observations on each side, over every feature."""
        return (sum(f.n_baseline for f in self.features), sum(f.n_candidate for f in self.features))

    def as_dict(self) -> dict[str, Any]:
        """The drift-report form: timestamp, sizes, per-feature ``ks_test`` and ``psi`` blocks, ``drift_detected``."""
        features = {}
        for f in self.features:
            ks_drift = bool(f.ks.p_value < self.thresholds.alpha) if not math.isnan(f.ks.p_value) else False
            band = _stats.psi_band(f.psi)
            features[f.feature] = {
                "kind": f.kind,
                "method": f.method,
                "reference_size": f.n_baseline,
                "current_size": f.n_candidate,
                "ks_test": {
                    "statistic": _num(f.ks.statistic),
                    "p_value": _num(f.ks.p_value),
                    "p_value_adjusted": _num(f.ks_p_adjusted),
                    "drift_detected": ks_drift,
                },
                "psi": {"psi": _num(f.psi), "drift_level": band, "drift_detected": band != "none"},
                "p50_s": {"reference": _num(f.p50[0]), "current": _num(f.p50[1])},
                "p95_s": {"reference": _num(f.p95[0]), "current": _num(f.p95[1])},
                "p50_ratio": {"ratio": _num(f.ratio_p50), "ci": [_num(v) for v in f.ratio_p50_ci]},
                "p95_ratio": {"ratio": _num(f.ratio_p95), "ci": [_num(v) for v in f.ratio_p95_ci]},
                "verdict": f.verdict,
                "drift_detected": ks_drift or band != "none",
            }
        reference_size, current_size = self.sizes()
        return {
            "timestamp": self.timestamp,
            "reference": _side_dict(self.baseline),
            "current": _side_dict(self.candidate),
            "reference_size": reference_size,
            "current_size": current_size,
            "thresholds": {
                "alpha": self.thresholds.alpha,
                "ratio": self.thresholds.ratio,
                "min_samples": self.thresholds.min_samples,
                "confidence": self.thresholds.confidence,
            },
            "features": features,
            "outcomes": {
                o.outcome: {
                    "reference": o.baseline,
                    "current": o.candidate,
                    "reference_rate": _num(o.rate_baseline),
                    "current_rate": _num(o.rate_candidate),
                    "difference_ci": [_num(v) for v in o.difference_ci],
                }
                for o in self.outcomes
            },
            "failure_rate_difference_ci": [_num(v) for v in self.failure_rate_ci],
            "geometry": {
                "jobs_compared": self.jobs_compared,
                "tolerances": self.tolerances.__dict__,
                "mismatches": [m.as_dict() for m in self.mismatches],
            },
            "regressions": [f.feature for f in self.regressions],
            "drift_detected": any(v["drift_detected"] for v in features.values()),
            "verdict": "fail" if self.failed else "pass",
        }


def _num(value: float) -> float | None:
    return None if value is None or math.isnan(value) or math.isinf(value) else round(float(value), 9)


def _side_dict(side: SideData) -> dict[str, Any]:
    return {
        "label": side.label,
        "selector": side.selector,
        "source": side.source,
        "versions": [{"engine": e, "freecad_version": f, "occt_version": o} for e, f, o in sorted(side.versions)],
        "jobs": int(sum(side.outcomes.values())),
    }


def _kind(feature: str) -> str:
    if feature == "flow":
        return "flow"
    return "stage" if feature.startswith("stage:") else "operation"


def _verdict(result: FeatureResult, t: Thresholds) -> str:
    if min(result.n_baseline, result.n_candidate) < t.min_samples:
        return "too few"
    if not result.ks_p_adjusted < t.alpha:
        return "same"
    pairs = ((result.ratio_p50, result.ratio_p50_ci), (result.ratio_p95, result.ratio_p95_ci))
    if any(ratio >= t.ratio and low > 1 for ratio, (low, _high) in pairs):
        return "slower"
    if any(ratio <= 1 / t.ratio and high < 1 for ratio, (_low, high) in pairs):
        return "faster"
    return "different"


def _holm(features: list[FeatureResult], t: Thresholds) -> None:
    """Holm's step-down adjustment of the KS p-values of the features with enough observations
    for a verdict: a comparison of twenty features is one chance of a false alarm at ``alpha``,
    not twenty."""
    judged = sorted(
        (f for f in features if min(f.n_baseline, f.n_candidate) >= t.min_samples and not math.isnan(f.ks.p_value)),
        key=lambda f: f.ks.p_value,
    )
    running = 0.0
    for rank, result in enumerate(judged):
        running = max(running, min(1.0, (len(judged) - rank) * result.ks.p_value))
        result.ks_p_adjusted = running


def _ratio(a: float, b: float) -> float:
    return b / a if a > 0 else math.nan


def _fill(r: FeatureResult, base: Any, cand: Any, t: Thresholds, quantile: Callable[[Any, float], float],
          interval: Callable[..., tuple[float, float]], ks: Callable[[Any, Any], _stats.KSResult],
          psi: Callable[[Any, Any], float]) -> None:  # fmt: skip
    """The statistics of one feature, from raw durations or histogram buckets alike (the functions say which)."""
    r.p50 = (quantile(base, 0.5), quantile(cand, 0.5))
    r.p95 = (quantile(base, 0.95), quantile(cand, 0.95))
    r.ratio_p50, r.ratio_p95 = _ratio(*r.p50), _ratio(*r.p95)
    r.ratio_p50_ci = interval(base, cand, 0.5, confidence=t.confidence, seed=t.seed)
    r.ratio_p95_ci = interval(base, cand, 0.95, confidence=t.confidence, seed=t.seed + 1)
    r.ks = ks(base, cand)
    r.psi = psi(base, cand)


def _feature_raw(feature: str, base: np.ndarray, cand: np.ndarray, t: Thresholds) -> FeatureResult:
    base.sort()
    cand.sort()
    r = FeatureResult(feature, _kind(feature), "raw", int(base.size), int(cand.size))
    if base.size and cand.size:
        _fill(r, base, cand, t, _stats.quantile_raw, _stats.ratio_interval_raw, _stats.ks_raw, _stats.psi_raw)
    r.plot = {"baseline": base, "candidate": cand}
    return r


def _feature_buckets(feature: str, base: _stats.Buckets, cand: _stats.Buckets, t: Thresholds) -> FeatureResult:
    if base.bounds != cand.bounds:
        # Both sides' buckets merged on their common bounds: a histogram's buckets changed between versions.
        common = tuple(sorted(set(base.bounds) & set(cand.bounds)))
        base = _stats.Buckets(common, tuple(base.cumulative[base.bounds.index(b)] for b in common))
        cand = _stats.Buckets(common, tuple(cand.cumulative[cand.bounds.index(b)] for b in common))
    r = FeatureResult(feature, _kind(feature), "buckets", int(round(base.count)), int(round(cand.count)))
    if base.count > 0 and cand.count > 0:
        _fill(r, base, cand, t, _stats.quantile_buckets, _stats.ratio_interval_buckets, _stats.ks_buckets,
              _stats.psi_buckets)  # fmt: skip
    r.plot = {"bounds": base.bounds, "baseline": base.cumulative, "candidate": cand.cumulative}
    return r


def _order(feature: str) -> tuple[int, str]:
    return ({"flow": 0, "stage": 1}.get(_kind(feature), 2), feature)


def compare_sides(
    baseline: SideData,
    candidate: SideData,
    thresholds: Thresholds | None = None,
    tolerances: Tolerances | None = None,
) -> Report:
    """Every feature both sides measured, their outcomes, and their geometry."""
    t = thresholds or Thresholds()
    features = []
    for feature in sorted(baseline.features & candidate.features, key=_order):
        if feature in baseline.raw and feature in candidate.raw:
            # One view of each array, sorted in place: the durations are held once.
            base = np.frombuffer(baseline.raw[feature], dtype=np.float64)
            cand = np.frombuffer(candidate.raw[feature], dtype=np.float64)
            features.append(_feature_raw(feature, base, cand, t))
        elif feature in baseline.buckets and feature in candidate.buckets:
            features.append(_feature_buckets(feature, baseline.buckets[feature], candidate.buckets[feature], t))
    _holm(features, t)
    for result in features:
        result.verdict = _verdict(result, t)
    outcomes = []
    n_base, n_cand = sum(baseline.outcomes.values()), sum(candidate.outcomes.values())
    for outcome in sorted(set(baseline.outcomes) | set(candidate.outcomes)):
        b, c = baseline.outcomes[outcome], candidate.outcomes[outcome]
        outcomes.append(
            OutcomeResult(
                outcome,
                int(b),
                int(c),
                b / n_base if n_base else math.nan,
                c / n_cand if n_cand else math.nan,
                _stats.rate_difference_interval(b, n_base, c, n_cand, t.confidence),
            )
        )
    ok = ("ok", "success", "succeeded")
    base_failed = n_base - sum(baseline.outcomes[o] for o in ok)
    cand_failed = n_cand - sum(candidate.outcomes[o] for o in ok)
    failure_ci = (
        _stats.rate_difference_interval(base_failed, n_base, cand_failed, n_cand, t.confidence)
        if n_base and n_cand
        else (math.nan, math.nan)
    )
    mismatches, jobs = compare_geometry(baseline.manifests, candidate.manifests, tolerances)
    return Report(baseline, candidate, t, tolerances or Tolerances(), features, outcomes, failure_ci, mismatches, jobs)
