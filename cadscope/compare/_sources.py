"""Where the two sides of a comparison come from: the raw span durations of a
``cadscope run`` folder (``traces.jsonl``), its histograms (``metrics.prom``),
its job results (``results.jsonl``), or a Prometheus server's histograms.

A side is chosen by a selector, ``engine=ocp,occt_version=8.0.1``: a job
belongs to it when its trace (or its result, or its series) carries every
named value. A job without a role is a primary one.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._stats import Buckets

__all__ = [
    "SELECTOR_KEYS",
    "Selector",
    "SideData",
    "SourceError",
    "feature_of_span",
    "parse_range",
    "parse_selector",
    "read_exposition",
    "read_prometheus",
    "read_results",
    "read_run_folder",
    "read_traces",
]

# Selector key -> span attribute (on the job's task, flow or subprocess span) -> metric label.
SELECTOR_KEYS: Mapping[str, tuple[str, str | None]] = {
    "engine": ("cad.engine", None),
    "freecad_version": ("cad.freecad_version", "freecad_version"),
    "occt_version": ("cad.occt_version", "occt_version"),
    "role": ("cad.role", "role"),
}
_TRACE_KEYS = {attribute: key for key, (attribute, _) in SELECTOR_KEYS.items()}
_OUTCOME_ATTRIBUTE = "cad.subprocess.outcome"
# Operation spans the engines' probe and the auto-instrumentation emit, measured as they are named.
_PLAIN_OPERATIONS = frozenset(
    {
        "document.recompute",
        "topology.hash",
        "material.apply_property",
        "material.apply_appearance",
        "a4.solve",
        "a4.lcs_resolution",
        "occt.mesh",
    }
)
# Operations split by what they do: a cut is not a union, a STEP export is not an STL one.
_SPLIT_OPERATIONS = {
    "occt.boolean": "cad.boolean.operation",
    "occt.feature": "cad.feature",
    "export": "cad.export.format",
}
# Histogram -> (feature, label that splits it). The same features as the spans give.
METRIC_FEATURES: Mapping[str, tuple[str, str | None]] = {
    "model_generation_duration_seconds": ("flow", None),
    "model_generation_stage_duration_seconds": ("stage", "stage"),
    "occt_boolean_duration_seconds": ("occt.boolean", "operation"),
    "occt_feature_duration_seconds": ("occt.feature", "feature"),
    "export_duration_seconds": ("export", "format"),
    "freecad_document_load_seconds": ("document.load", None),
    "freecad_recompute_duration_seconds": ("document.recompute", None),
    "topology_hash_compute_duration_seconds": ("topology.hash", None),
    "material_property_apply_duration_seconds": ("material.apply_property", None),
    "material_appearance_apply_duration_seconds": ("material.apply_appearance", None),
    "a4_constraint_solve_duration_seconds": ("a4.solve", None),
    "a4_lcs_resolution_duration_seconds": ("a4.lcs_resolution", None),
}
OUTCOME_METRIC = "model_generation_completed"

Selector = dict[str, str]


class SourceError(ValueError):
    """Input that cannot be compared: a missing file, a bad selector, an unreachable server."""


@dataclass
class SideData:
    """What one side of a comparison holds."""

    selector: Selector
    label: str
    source: str = ""
    raw: dict[str, array[float]] = field(default_factory=dict)
    buckets: dict[str, Buckets] = field(default_factory=dict)
    outcomes: Counter[str] = field(default_factory=Counter)  # jobs (or counter increases) by outcome
    versions: set[tuple[str, str, str]] = field(default_factory=set)
    manifests: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def features(self) -> set[str]:
        return set(self.raw) | set(self.buckets)


def parse_selector(text: str) -> Selector:
    """``engine=ocp,occt_version="8.0.1"`` -> ``{"engine": "ocp", "occt_version": "8.0.1"}``."""
    selector: Selector = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip().strip("\"'")
        if not sep or not value:
            raise SourceError(f"bad selector {text!r}: expected KEY=VALUE[,KEY=VALUE]")
        if key not in SELECTOR_KEYS:
            raise SourceError(f"unknown selector key {key!r} in {text!r} (use {', '.join(SELECTOR_KEYS)})")
        selector[key] = value
    return selector


def parse_range(text: str) -> str:
    """A Prometheus range (``30m``, ``24h``, ``7d``), checked."""
    units = {"s", "m", "h", "d", "w", "y"}
    body, unit = text[:-1], text[-1:]
    if unit not in units or not body.isdigit() or int(body) == 0:
        raise SourceError(f"bad range {text!r}: expected a number and one of s, m, h, d, w, y (e.g. 24h)")
    return text


def feature_of_span(name: str, attributes: Mapping[str, Any]) -> str | None:
    """The feature a span's duration measures (``occt.boolean[cut]``, ``stage:export``, ``flow``), or None."""
    if name in _PLAIN_OPERATIONS:
        return name
    split = _SPLIT_OPERATIONS.get(name)
    if split is not None:
        return f"{name}[{str(attributes.get(split, 'other')).lower()}]"
    if name in ("document.create", "document.load"):
        return "document.load"
    if name.startswith("cad.stage") and "cad.stage" in attributes:
        return f"stage:{attributes['cad.stage']}"
    if name.startswith("cad.flow"):
        return "flow"
    return None


def _feature_of_series(metric: str, labels: Mapping[str, str]) -> str:
    feature, split = METRIC_FEATURES[metric]
    if split is None:
        return feature
    value = labels.get(split, "other").lower()
    return f"stage:{value}" if feature == "stage" else f"{feature}[{value}]"


def _matches(selector: Selector, labels: Mapping[str, str]) -> bool:
    return all(labels.get(key, "primary" if key == "role" else "") == value for key, value in selector.items())


# -- traces ---------------------------------------------------------------------------------------------


# The span attributes a comparison reads: what names a feature, and what labels a job.
_WANTED = frozenset({*_TRACE_KEYS, _OUTCOME_ATTRIBUTE, "cad.job_id", "cad.stage", *_SPLIT_OPERATIONS.values()})


def _spans(path: Path) -> Iterator[tuple[str, str, int, int, dict[str, Any]]]:
    """(trace id, name, start ns, end ns, the attributes a comparison reads) of every span, a line at a time."""
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                request = json.loads(line)
                for resource_spans in request.get("resourceSpans", ()):
                    for scope_spans in resource_spans.get("scopeSpans", ()):
                        for span in scope_spans.get("spans", ()):
                            attributes = {}
                            for item in span.get("attributes", ()):
                                key = item["key"]
                                if key in _WANTED:
                                    value = item.get("value", {})
                                    for kind in ("stringValue", "intValue", "doubleValue", "boolValue"):
                                        if kind in value:
                                            attributes[key] = value[kind]
                                            break
                            yield (
                                span["traceId"],
                                span["name"],
                                int(span["startTimeUnixNano"]),
                                int(span["endTimeUnixNano"]),
                                attributes,
                            )
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise SourceError(f"{path}: line {number} is not OTLP/JSON ({type(exc).__name__}: {exc})") from None


def read_traces(path: Path, sides: list[SideData]) -> None:
    """Fill each side's raw durations, outcomes and versions from an OTLP/JSON file.

    One pass, holding the durations and not the spans. A trace's side is known once its
    ``cad.subprocess`` span (which carries the job's engine, versions, role and outcome) is
    read; the durations of its spans read before that wait with the trace, and a trace whose
    subprocess span never came is settled at the end with the labels its other spans gave.
    """
    resolved: dict[str, tuple[SideData, ...]] = {}
    labels_of: dict[str, dict[str, str]] = {}
    waiting: dict[str, list[tuple[str, float]]] = {}
    # One tuple per distinct label set: traces share them rather than hold their own.
    shared: dict[tuple[tuple[str, str], ...], tuple[SideData, ...]] = {}

    def settle(trace_id: str) -> None:
        labels = labels_of.pop(trace_id, {})
        matching: tuple[SideData, ...] = ()
        if "job" in labels:
            key = tuple(sorted((k, v) for k, v in labels.items() if k != "job"))
            matching = shared.get(key, ())
            if key not in shared:
                matching = shared[key] = tuple(side for side in sides if _matches(side.selector, labels))
            for side in matching:
                side.outcomes[labels.get("outcome", "unknown")] += 1
                side.versions.add(
                    (labels.get("engine", "?"), labels.get("freecad_version", "?"), labels.get("occt_version", "?"))
                )
        resolved[trace_id] = matching
        for feature, seconds in waiting.pop(trace_id, ()):
            for side in matching:
                side.raw.setdefault(feature, array("d")).append(seconds)

    for trace_id, name, start, end, attributes in _spans(path):
        feature = feature_of_span(name, attributes)
        matching = resolved.get(trace_id)
        if matching is not None:
            if feature is not None:
                for side in matching:
                    side.raw.setdefault(feature, array("d")).append(max(end - start, 0) / 1e9)
            continue
        found = {_TRACE_KEYS[k]: str(v) for k, v in attributes.items() if k in _TRACE_KEYS}
        if _OUTCOME_ATTRIBUTE in attributes:
            found["outcome"] = str(attributes[_OUTCOME_ATTRIBUTE])
        if "cad.job_id" in attributes:
            found["job"] = str(attributes["cad.job_id"])
        if found:
            labels = labels_of.setdefault(trace_id, {})
            for key, value in found.items():
                labels.setdefault(key, value)
        if feature is not None:
            waiting.setdefault(trace_id, []).append((feature, max(end - start, 0) / 1e9))
        if _OUTCOME_ATTRIBUTE in attributes:
            settle(trace_id)
    for trace_id in list(labels_of) + list(waiting):
        if trace_id not in resolved:
            settle(trace_id)
    for side in sides:
        side.source = "traces"


# -- histograms: a metrics exposition or Prometheus ------------------------------------------------------


def _buckets_from(per_feature: Mapping[str, Mapping[float, float]]) -> dict[str, Buckets]:
    result = {}
    for feature, by_bound in per_feature.items():
        bounds = tuple(sorted(by_bound))
        if not bounds or not math.isinf(bounds[-1]) or by_bound[bounds[-1]] <= 0:
            continue
        result[feature] = Buckets(bounds, tuple(by_bound[b] for b in bounds))
    return result


def _check_metric_selector(selector: Selector) -> None:
    unlabelled = [key for key in selector if SELECTOR_KEYS[key][1] is None]
    if unlabelled:
        raise SourceError(
            f"metrics carry no {', '.join(unlabelled)} label: select histograms by "
            "freecad_version, occt_version or role"
        )


def read_exposition(path: Path, sides: list[SideData]) -> None:
    """Fill each side's histograms (summed over every other label) and outcomes from a metrics text file."""
    from prometheus_client.parser import text_string_to_metric_families

    for side in sides:
        _check_metric_selector(side.selector)
    per_side: list[dict[str, dict[float, float]]] = [{} for _ in sides]
    try:
        families = list(text_string_to_metric_families(path.read_text()))
    except (ValueError, IndexError) as exc:
        raise SourceError(f"{path} is not a Prometheus text exposition ({exc})") from None
    for family in families:
        is_histogram = family.name in METRIC_FEATURES
        is_outcome = family.name == OUTCOME_METRIC
        if not (is_histogram or is_outcome):
            continue
        for sample in family.samples:
            for side, buckets in zip(sides, per_side, strict=True):
                if not _matches(side.selector, sample.labels):
                    continue
                if is_outcome and sample.name == OUTCOME_METRIC + "_total":
                    side.outcomes[sample.labels.get("status", "unknown")] += round(sample.value)
                    side.versions.add(
                        ("?", sample.labels.get("freecad_version", "?"), sample.labels.get("occt_version", "?"))
                    )
                elif is_histogram and sample.name.endswith("_bucket"):
                    feature = _feature_of_series(family.name, sample.labels)
                    bound = float(sample.labels["le"])
                    row = buckets.setdefault(feature, {})
                    row[bound] = row.get(bound, 0.0) + sample.value
    for side, buckets in zip(sides, per_side, strict=True):
        side.buckets = _buckets_from(buckets)
        side.source = "metrics"


def _matchers(selector: Selector) -> str:
    def quoted(value: str) -> str:
        return json.dumps(value)  # a PromQL string literal takes JSON's escapes

    return ",".join(f"{SELECTOR_KEYS[key][1]}={quoted(value)}" for key, value in selector.items())


def _query(url: str, promql: str, timeout: float) -> list[dict[str, Any]]:
    request = url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - the user's server
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            detail = json.load(exc).get("error", exc.reason)
        except ValueError:
            detail = exc.reason
        raise SourceError(f"Prometheus at {url} refused a query: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SourceError(f"cannot reach Prometheus at {url}: {reason}") from None
    except ValueError:
        raise SourceError(f"{url} did not answer as Prometheus's HTTP API does") from None
    if body.get("status") != "success":
        raise SourceError(f"Prometheus at {url} answered {body.get('error', body.get('status'))}")
    return list(body["data"]["result"])


def read_prometheus(url: str, window: str, sides: list[SideData], timeout: float = 30.0) -> None:
    """Fill each side's histograms and outcomes from ``increase(...[window])`` on a Prometheus server."""
    parse_range(window)
    for side in sides:
        _check_metric_selector(side.selector)
        matchers = _matchers(side.selector)
        per_feature: dict[str, dict[float, float]] = {}
        for metric, (_feature, split) in METRIC_FEATURES.items():
            by = "le" + (f",{split}" if split else "")
            promql = f"sum by ({by}) (increase({metric}_bucket{{{matchers}}}[{window}]))"
            for series in _query(url, promql, timeout):
                labels = series["metric"]
                feature = _feature_of_series(metric, labels)
                row = per_feature.setdefault(feature, {})
                bound = float(labels["le"])
                row[bound] = row.get(bound, 0.0) + float(series["value"][1])
        side.buckets = _buckets_from(per_feature)
        promql = (
            f"sum by (status, freecad_version, occt_version) (increase({OUTCOME_METRIC}_total{{{matchers}}}[{window}]))"
        )
        for series in _query(url, promql, timeout):
            labels = series["metric"]
            side.outcomes[labels.get("status", "unknown")] += round(float(series["value"][1]))
            side.versions.add(("?", labels.get("freecad_version", "?"), labels.get("occt_version", "?")))
        side.source = "prometheus"


# -- results --------------------------------------------------------------------------------------------


def _result_lines(path: Path) -> Iterable[dict[str, Any]]:
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    raise SourceError(f"{path}: line {number} is not JSON") from None
                if not isinstance(row, dict):
                    raise SourceError(f"{path}: line {number} is not a job result object")
                yield row


def read_results(path: Path, sides: list[SideData], *, outcomes: bool) -> None:
    """Fill each side's manifests (by workload job name), and its outcomes when ``outcomes``,
    from a ``results.jsonl`` (one job result a line)."""
    for side in sides:
        if outcomes:
            side.outcomes.clear()
    for row in _result_lines(path):
        labels = {key: str(row[key]) for key in SELECTOR_KEYS if row.get(key) is not None}
        for side in sides:
            if not _matches(side.selector, labels):
                continue
            if outcomes:
                side.outcomes[str(row.get("outcome") or "unknown")] += 1
            manifest = row.get("manifest")
            if isinstance(manifest, dict) and row.get("name"):
                side.manifests.setdefault(str(row["name"]), []).append(manifest)


def read_run_folder(folder: Path, sides: list[SideData]) -> None:
    """A ``cadscope run`` output folder: raw durations from its traces if it has them, else
    histograms from its metrics; results (geometry, outcomes) when it has them."""
    if not folder.is_dir():
        raise SourceError(f"no such folder: {folder}" if not folder.exists() else f"{folder} is not a folder")
    traces, metrics, results = folder / "traces.jsonl", folder / "metrics.prom", folder / "results.jsonl"
    if traces.is_file():
        read_traces(traces, sides)
    elif metrics.is_file():
        read_exposition(metrics, sides)
    else:
        raise SourceError(f"{folder} holds neither traces.jsonl nor metrics.prom (is it a cadscope run --out folder?)")
    if results.is_file():
        read_results(results, sides, outcomes=True)
