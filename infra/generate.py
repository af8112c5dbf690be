"""Generate the Prometheus rules, their promtool unit tests and the Grafana dashboard.

Thresholds live here, once. ``python infra/generate.py`` rewrites:

    infra/prometheus/rules/cadscope.rules.yml
    infra/prometheus/tests/cadscope.rules.test.yml
    infra/grafana/dashboards/cadscope-model-generation.json

and ``tests/test_infra.py`` fails when the committed files differ from what
this script would write.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.utils import floatToGoString

ROOT = Path(__file__).resolve().parent
RUNBOOKS = "https://github.com/cadscope/cadscope/blob/main/docs/runbooks"

# -- thresholds: the one place ----------------------------------------------------------

GiB = 1 << 30
THRESHOLDS = {
    "failure_ratio": 0.10,  # > 10 % of flows fail over 5 m
    "worker_restarts_per_s": 0.1,  # > 0.1 CAD process restarts per second
    "ai_error_ratio": 0.10,  # > 10 % provider errors
    "generation_p95_s": 300,  # P95 of a flow > 5 minutes
    "boolean_p95_s": 30,  # P95 of an OCCT boolean > 30 s
    # "> 1.5 GB" is read as 1.5 GiB (1,610,612,736 bytes): the units of the memory histogram's
    # other boundaries (32 MiB ... 8 GiB) and of what an operator compares it with (ps and top,
    # Docker's "1.5g", Kubernetes' "1.5Gi"). Read as 1.5e9 bytes, a process at 1.45 GiB would
    # alert though it is below 1.5 GB as those tools count.
    "occt_memory_bytes": 1.5 * GiB,
    "a4_solve_p95_s": 15,  # P95 of an Assembly4 solve > 15 s
    "a4_iterations_p95": 200,  # P95 of solver iterations > 200
    "http_latency_avg_s": 0.5,  # mean request latency > 500 ms
    "http_error_ratio": 0.05,  # > 5 % 5xx
    "ai_latency_p95_s": 30,  # provider latency > 30 s
    "ai_rate_limit_remaining": 0.10,  # < 10 % of the provider's rate limit left
    "spans_dropped_per_s": 0,  # any span the collector never got, sustained for 10 m
    "queue_messages": 50,  # backlog: more than 50 jobs waiting for 10 minutes
    "slo_success": 0.99,  # 99 % of flows succeed (28-day SLO); burn rates per the SRE workbook
    # Minimum volumes: a ratio alert speaks only from this many events in its window. Below it one
    # event swings the ratio by 5 points or more: two failed jobs of two in a quiet five minutes
    # read 100 %. Sustained failure in a quiet fleet still pages, through the SLO burn-rate alerts,
    # whose long windows (1 h to 3 d) collect the volume.
    "min_flows": 20,  # finished flows per flow type and version pair (per window for the burn rates)
    "min_provider_calls": 20,  # calls to one AI provider in 5 m
    "min_requests": 50,  # API requests on the routes the ratio counts, in 5 m
    # A version's stage p95 this many times the fleet baseline version's, for 30 m, from at least
    # min_version_samples stages on each side in 30 m: slower than the version the fleet trusts.
    "version_p95_ratio": 1.25,
    "min_version_samples": 20,
}
VERSIONS = ("freecad_version", "occt_version")
V = ", ".join(VERSIONS)
ERROR_BUDGET = round(1 - THRESHOLDS["slo_success"], 6)
MEMORY_LE = floatToGoString(THRESHOLDS["occt_memory_bytes"])  # the histogram boundary, as exposed

# The API routes the request alerts count. Monitoring traffic is left out of both ratios (a scrape
# every 5 s and a health probe every 10 s outnumber a quiet API's users and dilute its errors), and
# an event stream is no request to time: it stays open for the whole job it follows, minutes for a
# heavy part. Streams have signals of their own (http_streams_open, http_stream_errors_total).
STREAM_ROUTES = ("/v1/jobs/{job_id}/events",)
USER_ROUTES = 'route!="/metrics", route!~"/health/.*"'
SHORT_ROUTES = USER_ROUTES + "".join(f', route!="{route}"' for route in STREAM_ROUTES)


def p95(record: str, bucket: str, by: str) -> dict[str, str]:
    return {"record": record, "expr": f"histogram_quantile(0.95, sum by (le, {by}) (rate({bucket}[5m])))"}


SLO_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
SLO_LONG_WINDOWS = ("1h", "6h", "1d", "3d")  # each burn-rate pair's long window: where its volume is counted

RECORDING_RULES = [
    p95("cadscope:model_generation_duration_seconds:p95_5m", "model_generation_duration_seconds_bucket",
        f"flow_type, {V}"),
    p95("cadscope:model_generation_stage_duration_seconds:p95_5m", "model_generation_stage_duration_seconds_bucket",
        f"flow_type, stage, {V}"),
    p95("cadscope:occt_boolean_duration_seconds:p95_5m", "occt_boolean_duration_seconds_bucket",
        f"operation, {V}"),
    p95("cadscope:occt_feature_duration_seconds:p95_5m", "occt_feature_duration_seconds_bucket", f"feature, {V}"),
    p95("cadscope:a4_constraint_solve_duration_seconds:p95_5m", "a4_constraint_solve_duration_seconds_bucket",
        f"solver, {V}"),
    p95("cadscope:a4_solver_iterations:p95_5m", "a4_solver_iterations_per_solve_bucket", f"solver, {V}"),
    p95("cadscope:export_duration_seconds:p95_5m", "export_duration_seconds_bucket", f"format, {V}"),
    p95("cadscope:ai_provider_latency_seconds:p95_5m", "ai_provider_latency_seconds_bucket", "provider, model"),
] + [
    {
        "record": f"cadscope:job_error_ratio:rate{window}",
        "expr": f'sum(rate(model_generation_completed_total{{status="failure"}}[{window}]))'
        f" / sum(rate(model_generation_completed_total[{window}]))",
    }
    for window in SLO_WINDOWS
] + [
    {"record": f"cadscope:jobs_completed:increase{window}",
     "expr": f"sum(increase(model_generation_completed_total[{window}]))"}
    for window in SLO_LONG_WINDOWS
]  # fmt: skip


# -- version comparison: per-version p95 over 30 m, and the fleet's baseline version -----------
# Each series also carries ``version`` ("<freecad_version>/<occt_version>"): one value per pair, what
# the dashboard's baseline and candidate variables choose from.
VERSION_WINDOW = "30m"
STAGE_P95 = "cadscope:version_stage_duration_seconds:p95_30m"
STAGE_COUNT = "cadscope:version_stage_duration_seconds:count_30m"
OPERATION_P95 = "cadscope:version_operation_duration_seconds:p95_30m"
OPERATION_COUNT = "cadscope:version_operation_duration_seconds:count_30m"
BASELINE_VERSION = "cadscope:fleet_baseline_version:flows_1h"
BASELINE_STAGE_P95 = "cadscope:fleet_baseline_stage_duration_seconds:p95_30m"
BASELINE_STAGE_COUNT = "cadscope:fleet_baseline_stage_duration_seconds:count_30m"
# Operation histograms, each under one ``operation`` label: (metric, label that splits it or "", name).
OPERATIONS = (
    ("occt_boolean_duration_seconds", "operation", "occt.boolean"),
    ("occt_feature_duration_seconds", "feature", "occt.feature"),
    ("export_duration_seconds", "format", "export"),
    ("freecad_document_load_seconds", "", "document.load"),
    ("freecad_recompute_duration_seconds", "", "document.recompute"),
    ("topology_hash_compute_duration_seconds", "", "topology.hash"),
    ("a4_constraint_solve_duration_seconds", "", "a4.solve"),
    ("material_property_apply_duration_seconds", "", "material.apply_property"),
)


def _versioned(expr: str) -> str:
    return f'label_join({expr}, "version", "/", "freecad_version", "occt_version")'


def _as_operation(selector: str, split: str, name: str) -> str:
    """A series' ``operation`` label: ``occt.boolean:cut`` from the boolean's own label, or the name alone."""
    if split:
        return f'label_replace({selector}, "operation", "{name}:$1", "{split}", "(.*)")'
    return f'label_replace({selector}, "operation", "{name}", "", "")'


VERSION_RULES = [
    {"record": STAGE_P95, "expr": _versioned(
        f"histogram_quantile(0.95, sum by (le, stage, {V}) "
        f"(rate(model_generation_stage_duration_seconds_bucket[{VERSION_WINDOW}])))")},
    {"record": STAGE_COUNT, "expr": _versioned(
        f"sum by (stage, {V}) (increase(model_generation_stage_duration_seconds_count[{VERSION_WINDOW}]))")},
    # One rule a record: every operation histogram, each under its own operation values, joined by "or".
    {"record": OPERATION_P95, "expr": " or ".join(_versioned(
        f"histogram_quantile(0.95, sum by (le, operation, {V}) "
        f"({_as_operation(f'rate({metric}_bucket[{VERSION_WINDOW}])', split, name)}))")
        for metric, split, name in OPERATIONS)},
    {"record": OPERATION_COUNT, "expr": " or ".join(_versioned(
        f"sum by (operation, {V}) ({_as_operation(f'increase({metric}_count[{VERSION_WINDOW}])', split, name)})")
        for metric, split, name in OPERATIONS)},
    # The fleet's baseline: the version pair that ran the most primary flows in the last hour
    # (shadow runs on a candidate never make it the baseline).
    {"record": BASELINE_VERSION, "expr": _versioned(
        f'topk(1, sum by ({V}) (increase(model_generation_completed_total{{role!="shadow"}}[1h])))')},
    {"record": BASELINE_STAGE_P95,
     "expr": f"max by (stage) ({STAGE_P95} and on ({V}) {BASELINE_VERSION})"},
    {"record": BASELINE_STAGE_COUNT,
     "expr": f"max by (stage) ({STAGE_COUNT} and on ({V}) {BASELINE_VERSION})"},
]  # fmt: skip
VERSION_RATIO = f"{STAGE_P95} / on (stage) group_left () {BASELINE_STAGE_P95}"


@dataclass
class Alert:
    name: str
    expr: str
    severity: str
    summary: str
    description: str
    runbook: str
    for_: str = "5m"
    # promtool test: (input_series, labels of the expected alert, value) above / below the threshold
    above: list[dict[str, str]] = field(default_factory=list)
    below: list[dict[str, str]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    value_text: str = ""
    eval_time: str = "20m"
    # A ratio alert's third case: the ratio above its threshold (``ratio`` evaluates to
    # ``quiet_value`` there), the volume below its minimum: silent.
    quiet: list[dict[str, str]] = field(default_factory=list)
    ratio: str = ""
    quiet_value: float = 0.0

    def rule(self) -> dict[str, Any]:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity},
            "annotations": {
                "summary": self.summary,
                "description": self.description,
                "runbook_url": f"{RUNBOOKS}/{self.runbook}.md",
            },
        }


def guarded(ratio: str, threshold: float, volume: str, minimum: float) -> str:
    """``ratio`` above ``threshold``, only where ``volume`` (what the ratio is made of) reached ``minimum``."""
    return f"({ratio}) > {threshold:g} and ({volume}) >= {minimum:g}"


def series(name: str, values: str) -> dict[str, str]:
    return {"series": name, "values": values}


def counter_pair(
    metric: str, labels: str, bad: str, total_per_min: float, bad_ratio: float, minutes: int = 40
) -> list[dict[str, str]]:
    """A total counter and its failing part, rising linearly (ratio exact under rate())."""
    good = total_per_min * (1 - bad_ratio)
    failed = total_per_min * bad_ratio
    return [
        series(f"{metric}{{{labels}, {bad}}}", f"0+{failed:g}x{minutes}"),
        series(f"{metric}{{{labels}, {_ok(bad)}}}", f"0+{good:g}x{minutes}"),
    ]


def _ok(bad: str) -> str:
    return {'status="failure"': 'status="success"', 'outcome="server_error"': 'outcome="ok"',
            'status="500"': 'status="200"'}[bad]  # fmt: skip


def histogram(metric: str, labels: str, boundary: float, above: bool) -> list[dict[str, str]]:
    """Observations all in (boundary, next] when ``above``, all in (prev, boundary] when not."""
    rising = "0+10x40"
    return [
        series(f'{metric}_bucket{{{labels}, le="{boundary:g}"}}', "0x40" if above else rising),
        series(f'{metric}_bucket{{{labels}, le="+Inf"}}', rising),
        series(f"{metric}_count{{{labels}}}", rising),
    ]


def latency(labels: str, mean_s: float, per_min: float) -> list[dict[str, str]]:
    """A route's latency sum and count: ``per_min`` requests a minute of ``mean_s`` each."""
    return [
        series(f"http_request_duration_seconds_sum{{{labels}}}", f"0+{mean_s * per_min:g}x40"),
        series(f"http_request_duration_seconds_count{{{labels}}}", f"0+{per_min:g}x40"),
    ]


def pct(ratio: float) -> str:
    return f"{ratio * 100:g}%"


VSEL = 'freecad_version="0.20.2", occt_version="7.6.3"'
FLOW = f'flow_type="parametric", {VSEL}'
FLOW_LABELS = {"flow_type": "parametric", "freecad_version": "0.20.2", "occt_version": "7.6.3"}
VLABELS = {"freecad_version": "0.20.2", "occt_version": "7.6.3"}
API = 'instance="api:8000"'
POST_JOBS = f'{API}, method="POST", route="/v1/jobs"'
STREAM = f'{API}, method="GET", route="{STREAM_ROUTES[0]}"'
SCRAPE = f'{API}, method="GET", route="/metrics"'
PROVIDER = 'provider="openai_compatible", model="m"'


def quantile_in_bucket(low: float, high: float) -> float:
    """histogram_quantile(0.95) when every observation is in (low, high]."""
    return low + (high - low) * 0.95


MIN_FLOWS = THRESHOLDS["min_flows"]
MIN_REQUESTS = THRESHOLDS["min_requests"]
MIN_CALLS = THRESHOLDS["min_provider_calls"]

FAILURE_RATIO = (
    f'sum by (flow_type, {V}) (rate(model_generation_completed_total{{status="failure"}}[5m]))'
    f" / sum by (flow_type, {V}) (rate(model_generation_completed_total[5m]))"
)
FLOWS_5M = f"sum by (flow_type, {V}) (increase(model_generation_completed_total[5m]))"
# A refused prompt is the prompt's fault, not the provider's.
AI_ERROR_RATIO = (
    'sum by (provider) (rate(ai_provider_requests_total{outcome!~"ok|refused"}[5m]))'
    " / sum by (provider) (rate(ai_provider_requests_total[5m]))"
)
AI_CALLS_5M = "sum by (provider) (increase(ai_provider_requests_total[5m]))"
LATENCY_MEAN = (
    f"sum by (instance) (rate(http_request_duration_seconds_sum{{{SHORT_ROUTES}}}[5m]))"
    f" / sum by (instance) (rate(http_request_duration_seconds_count{{{SHORT_ROUTES}}}[5m]))"
)
SHORT_REQUESTS_5M = f"sum by (instance) (increase(http_request_duration_seconds_count{{{SHORT_ROUTES}}}[5m]))"
ERROR_RATIO = (
    f'sum by (instance) (rate(http_requests_total{{status=~"5..", {USER_ROUTES}}}[5m]))'
    f" / sum by (instance) (rate(http_requests_total{{{USER_ROUTES}}}[5m]))"
)
USER_REQUESTS_5M = f"sum by (instance) (increase(http_requests_total{{{USER_ROUTES}}}[5m]))"


def stage_histogram(versions: str, low: float, high: float, per_min: float, minutes: int = 80) -> list[dict[str, str]]:
    """A stage's histogram on one version pair: ``per_min`` observations a minute, all in (low, high]."""
    labels = f'flow_type="parametric", stage="generate", {versions}'
    rising = f"0+{per_min:g}x{minutes}"
    return [
        series(f'model_generation_stage_duration_seconds_bucket{{{labels}, le="{low:g}"}}', f"0x{minutes}"),
        series(f'model_generation_stage_duration_seconds_bucket{{{labels}, le="{high:g}"}}', rising),
        series(f'model_generation_stage_duration_seconds_bucket{{{labels}, le="+Inf"}}', rising),
        series(f"model_generation_stage_duration_seconds_count{{{labels}}}", rising),
    ]


# The fleet runs OCCT 7.9.3 (ten flows a minute); 8.0.1 is the candidate.
BASE_V = 'freecad_version="none", occt_version="7.9.3"'
CAND_V = 'freecad_version="none", occt_version="8.0.1"'
MIN_VERSION_SAMPLES = THRESHOLDS["min_version_samples"]


def version_case(cand_low: float, cand_high: float, cand_per_min: float) -> list[dict[str, str]]:
    """The baseline's generate stage in (0.25, 0.5] (p95 0.4875 s), the candidate's where the case puts it."""
    return [
        series(f'model_generation_completed_total{{flow_type="parametric", {BASE_V}, status="success"}}', "0+10x80"),
        series(f'model_generation_completed_total{{flow_type="parametric", {CAND_V}, status="success"}}',
               f"0+{cand_per_min:g}x80"),
        *stage_histogram(BASE_V, 0.25, 0.5, 10),
        *stage_histogram(CAND_V, cand_low, cand_high, cand_per_min),
    ]  # fmt: skip


def burn(pairs: tuple[tuple[float, str, str], ...]) -> str:
    """Multiwindow burn rates: each (factor, long, short) pair, guarded by its long window's volume."""
    return " or ".join(
        f"(cadscope:job_error_ratio:rate{long} > {factor * ERROR_BUDGET:g} and cadscope:job_error_ratio:rate{short}"
        f" > {factor * ERROR_BUDGET:g} and cadscope:jobs_completed:increase{long} >= {MIN_FLOWS:g})"
        for factor, long, short in pairs
    )


ALERTS = [
    Alert(
        "ModelGenerationHighFailureRate",
        guarded(FAILURE_RATIO, THRESHOLDS["failure_ratio"], FLOWS_5M, MIN_FLOWS),
        "critical", "Model generation failing for {{ $labels.flow_type }} on FreeCAD {{ $labels.freecad_version }}",
        "{{ $value | humanizePercentage }} of {{ $labels.flow_type }} flows failed over 5 m on FreeCAD "
        "{{ $labels.freecad_version }} / OCCT {{ $labels.occt_version }} (threshold "
        f"{pct(THRESHOLDS['failure_ratio'])}, counted from {MIN_FLOWS} flows in 5 m).",
        "model-generation-failures",
        above=counter_pair("model_generation_completed_total", FLOW, 'status="failure"', 10, 0.12),
        below=counter_pair("model_generation_completed_total", FLOW, 'status="failure"', 10, 0.08),
        labels=FLOW_LABELS, value_text="12%",
        # Two failures of two in a quiet five minutes: 100 %, and no page.
        quiet=counter_pair("model_generation_completed_total", FLOW, 'status="failure"', 0.4, 1),
        ratio=FAILURE_RATIO, quiet_value=1,
    ),
    Alert(
        "FreeCADWorkerFailure",
        f"sum by (reason, {V}) (rate(freecad_worker_restarts_total[5m])) > {THRESHOLDS['worker_restarts_per_s']}",
        "critical", "CAD processes dying: {{ $labels.reason }}",
        "{{ printf \"%.2f\" $value }} CAD process restarts per second ({{ $labels.reason }}) on FreeCAD "
        f"{{{{ $labels.freecad_version }}}} (threshold {THRESHOLDS['worker_restarts_per_s']}/s).",
        "freecad-worker-failure", for_="2m",
        above=[series(f'freecad_worker_restarts_total{{reason="oom", {VSEL}}}', "0+7.2x40")],
        below=[series(f'freecad_worker_restarts_total{{reason="oom", {VSEL}}}', "0+4.8x40")],
        labels={"reason": "oom", **VLABELS}, value_text="0.12",
    ),
    Alert(
        "AIProviderHighErrorRate",
        guarded(AI_ERROR_RATIO, THRESHOLDS["ai_error_ratio"], AI_CALLS_5M, MIN_CALLS),
        "critical", "AI provider {{ $labels.provider }} failing",
        "{{ $value | humanizePercentage }} of calls to {{ $labels.provider }} failed over 5 m (threshold "
        f"{pct(THRESHOLDS['ai_error_ratio'])}, counted from {MIN_CALLS} calls in 5 m).",
        "ai-provider-errors",
        above=counter_pair("ai_provider_requests_total", PROVIDER, 'outcome="server_error"', 10, 0.12),
        below=counter_pair("ai_provider_requests_total", PROVIDER, 'outcome="server_error"', 10, 0.08),
        labels={"provider": "openai_compatible"}, value_text="12%",
        quiet=counter_pair("ai_provider_requests_total", PROVIDER, 'outcome="server_error"', 0.4, 1),
        ratio=AI_ERROR_RATIO, quiet_value=1,
    ),
    Alert(
        "ModelGenerationSlow",
        f"cadscope:model_generation_duration_seconds:p95_5m > {THRESHOLDS['generation_p95_s']}",
        "warning", "Slow model generation ({{ $labels.flow_type }})",
        "P95 of {{ $labels.flow_type }} flows is {{ printf \"%.0f\" $value }} s on FreeCAD "
        "{{ $labels.freecad_version }} / OCCT {{ $labels.occt_version }} "
        f"(threshold {THRESHOLDS['generation_p95_s']} s).",
        "model-generation-slow", for_="10m",
        above=histogram("model_generation_duration_seconds", f'{FLOW}, status="success"', 300, True)
        + [series(f'model_generation_duration_seconds_bucket{{{FLOW}, status="success", le="600"}}', "0+10x40")],
        below=histogram("model_generation_duration_seconds", f'{FLOW}, status="success"', 300, False)
        + [series(f'model_generation_duration_seconds_bucket{{{FLOW}, status="success", le="120"}}', "0x40")],
        labels=FLOW_LABELS, value_text=f"{quantile_in_bucket(300, 600):.0f}",
    ),
    Alert(
        "OCCTBooleanOperationSlow",
        f"cadscope:occt_boolean_duration_seconds:p95_5m > {THRESHOLDS['boolean_p95_s']}",
        "warning", "Slow OCCT {{ $labels.operation }} booleans",
        "P95 of OCCT {{ $labels.operation }} is {{ printf \"%.1f\" $value }} s on OCCT {{ $labels.occt_version }} "
        f"(threshold {THRESHOLDS['boolean_p95_s']} s).",
        "occt-boolean-slow", for_="10m",
        above=histogram("occt_boolean_duration_seconds", f'operation="cut", solids_range="3-5", {VSEL}', 30, True)
        + [series(f'occt_boolean_duration_seconds_bucket{{operation="cut", solids_range="3-5", {VSEL}, le="60"}}',
                  "0+10x40")],
        below=histogram("occt_boolean_duration_seconds", f'operation="cut", solids_range="3-5", {VSEL}', 30, False)
        + [series(f'occt_boolean_duration_seconds_bucket{{operation="cut", solids_range="3-5", {VSEL}, le="10"}}',
                  "0x40")],
        labels={"operation": "cut", **VLABELS}, value_text=f"{quantile_in_bucket(30, 60):.1f}",
    ),
    Alert(
        "OCCTHighMemoryUsage",
        # Observations above the boundary: the +Inf bucket less the boundary's, never _count less a bucket.
        # A scrape can read a process's file while a new label set's keys are still being appended (the sum,
        # then each bucket up to +Inf): _count is then served before the boundary's bucket exists, and the
        # difference of their increases reads one operation above 1.5 GiB for five minutes. A file holds a
        # prefix of its keys, so the +Inf bucket never appears before a lower one.
        f'sum by (operation, {V}) (increase(occt_operation_memory_bytes_bucket{{le="+Inf"}}[5m]))'
        f' - sum by (operation, {V}) (increase(occt_operation_memory_bytes_bucket{{le="{MEMORY_LE}"}}[5m])) > 0',
        "warning", "OCCT {{ $labels.operation }} above 1.5 GiB",
        "{{ printf \"%.0f\" $value }} {{ $labels.operation }} operations peaked above 1.5 GiB in 5 m on OCCT "
        "{{ $labels.occt_version }}.",
        "occt-high-memory", for_="1m",
        above=[series(f'occt_operation_memory_bytes_bucket{{operation="fillet", {VSEL}, le="+Inf"}}', "0+1x40"),
               series(f'occt_operation_memory_bytes_bucket{{operation="fillet", {VSEL}, le="{MEMORY_LE}"}}',
                      "0x40")],
        # One operation, below the boundary, first scraped mid-creation: _count at 0 one scrape before the
        # buckets, which first show it at 1.
        below=[series(f'occt_operation_memory_bytes_count{{operation="fillet", {VSEL}}}', "_x16 0 1x23"),
               series(f'occt_operation_memory_bytes_bucket{{operation="fillet", {VSEL}, le="+Inf"}}', "_x17 1x23"),
               series(f'occt_operation_memory_bytes_bucket{{operation="fillet", {VSEL}, le="{MEMORY_LE}"}}',
                      "_x17 1x23")],
        labels={"operation": "fillet", **VLABELS}, value_text="5",
    ),
    Alert(
        "Assembly4SolverSlow",
        f"cadscope:a4_constraint_solve_duration_seconds:p95_5m > {THRESHOLDS['a4_solve_p95_s']}",
        "warning", "Slow Assembly4 solves ({{ $labels.solver }})",
        "P95 of the {{ $labels.solver }} solve is {{ printf \"%.1f\" $value }} s "
        f"(threshold {THRESHOLDS['a4_solve_p95_s']} s).",
        "assembly4-solver", for_="10m",
        above=histogram("a4_constraint_solve_duration_seconds", f'solver="lcs_attachment", {VSEL}', 15, True)
        + [series(f'a4_constraint_solve_duration_seconds_bucket{{solver="lcs_attachment", {VSEL}, le="30"}}',
                  "0+10x40")],
        below=histogram("a4_constraint_solve_duration_seconds", f'solver="lcs_attachment", {VSEL}', 15, False)
        + [series(f'a4_constraint_solve_duration_seconds_bucket{{solver="lcs_attachment", {VSEL}, le="10"}}',
                  "0x40")],
        labels={"solver": "lcs_attachment", **VLABELS}, value_text=f"{quantile_in_bucket(15, 30):.1f}",
    ),
    Alert(
        "Assembly4ExcessiveIterations",
        f"cadscope:a4_solver_iterations:p95_5m > {THRESHOLDS['a4_iterations_p95']}",
        "warning", "Assembly4 solver needs many iterations ({{ $labels.solver }})",
        f"P95 of solver iterations is {{{{ printf \"%.0f\" $value }}}} (threshold {THRESHOLDS['a4_iterations_p95']}).",
        "assembly4-solver", for_="10m",
        above=histogram("a4_solver_iterations_per_solve", f'solver="lcs_attachment", {VSEL}', 200, True)
        + [series(f'a4_solver_iterations_per_solve_bucket{{solver="lcs_attachment", {VSEL}, le="500"}}',
                  "0+10x40")],
        below=histogram("a4_solver_iterations_per_solve", f'solver="lcs_attachment", {VSEL}', 200, False)
        + [series(f'a4_solver_iterations_per_solve_bucket{{solver="lcs_attachment", {VSEL}, le="100"}}',
                  "0x40")],
        labels={"solver": "lcs_attachment", **VLABELS}, value_text=f"{quantile_in_bucket(200, 500):.0f}",
    ),
    Alert(
        "HighRequestLatency",
        guarded(LATENCY_MEAN, THRESHOLDS["http_latency_avg_s"], SHORT_REQUESTS_5M, MIN_REQUESTS),
        "warning", "High request latency on {{ $labels.instance }}",
        "Mean latency of short API requests (event streams, /metrics and /health left out) is "
        f"{{{{ printf \"%.2f\" $value }}}} s (threshold {THRESHOLDS['http_latency_avg_s']} s, counted from "
        f"{MIN_REQUESTS} requests in 5 m).",
        "api-latency", for_="1m",
        above=latency(POST_JOBS, 0.6, 20),
        # Four clients following jobs for 4 s each and a slow scrape: what the mean used to count.
        below=latency(POST_JOBS, 0.4, 20) + latency(STREAM, 4, 4) + latency(SCRAPE, 2, 12),
        labels={"instance": "api:8000"}, value_text="0.60",
        quiet=latency(POST_JOBS, 2, 5), ratio=LATENCY_MEAN, quiet_value=2,
    ),
    Alert(
        "HighErrorRate",
        guarded(ERROR_RATIO, THRESHOLDS["http_error_ratio"], USER_REQUESTS_5M, MIN_REQUESTS),
        "critical", "High error rate on {{ $labels.instance }}",
        "{{ $value | humanizePercentage }} of API requests answered 5xx (monitoring routes left out; threshold "
        f"{pct(THRESHOLDS['http_error_ratio'])}, counted from {MIN_REQUESTS} requests in 5 m).",
        "api-errors", for_="1m",
        above=counter_pair("http_requests_total", POST_JOBS, 'status="500"', 20, 0.06),
        # A failing readiness probe is the health check's answer, not a user's error.
        below=counter_pair("http_requests_total", POST_JOBS, 'status="500"', 20, 0.04)
        + [series(f'http_requests_total{{{API}, method="GET", route="/health/ready", status="503"}}', "0+6x40")],
        labels={"instance": "api:8000"}, value_text="6%",
        quiet=counter_pair("http_requests_total", POST_JOBS, 'status="500"', 2, 0.5), ratio=ERROR_RATIO,
        quiet_value=0.5,
    ),
    Alert(
        "InstanceDown", "up == 0", "critical", "{{ $labels.job }} instance {{ $labels.instance }} down",
        "{{ $labels.instance }} of job {{ $labels.job }} has not answered a scrape for 1 minute.",
        "instance-down", for_="1m",
        above=[series('up{job="cadscope-api", instance="api:8000"}', "1x5 0x20")],
        below=[series('up{job="cadscope-api", instance="api:8000"}', "1x25")],
        labels={"job": "cadscope-api", "instance": "api:8000"}, value_text="",
    ),
    Alert(
        "CadscopeWorkersDown",
        'sum(up{job="cadscope-worker"}) == 0 or absent(up{job="cadscope-worker"})',
        "critical", "No cadscope worker is up",
        "No worker's /metrics answers: jobs queue up and nothing runs them.",
        "workers-down", for_="2m",
        above=[series('up{job="cadscope-worker", instance="worker-freecad:9808"}', "0x25")],
        below=[series('up{job="cadscope-worker", instance="worker-freecad:9808"}', "1x25")],
        labels={}, value_text="",
    ),
    Alert(
        "CadscopeQueueBacklog",
        f"sum by (queue) (cadscope_queue_messages) > {THRESHOLDS['queue_messages']}",
        "warning", "Queue {{ $labels.queue }} backlog",
        "{{ printf \"%.0f\" $value }} jobs have been waiting in {{ $labels.queue }} "
        f"(threshold {THRESHOLDS['queue_messages']} for 10 m).",
        "queue-backlog", for_="10m",
        above=[series('cadscope_queue_messages{queue="cadscope", instance="api:8000"}', "51x25")],
        below=[series('cadscope_queue_messages{queue="cadscope", instance="api:8000"}', "49x25")],
        labels={"queue": "cadscope"}, value_text="51",
    ),
    Alert(
        "AIProviderSlow",
        f"cadscope:ai_provider_latency_seconds:p95_5m > {THRESHOLDS['ai_latency_p95_s']}",
        "warning", "AI provider {{ $labels.provider }} slow",
        "P95 latency of {{ $labels.provider }} ({{ $labels.model }}) is {{ printf \"%.1f\" $value }} s "
        f"(threshold {THRESHOLDS['ai_latency_p95_s']} s).",
        "ai-provider-latency",
        above=histogram("ai_provider_latency_seconds", 'provider="local", model="m", operation="prompt_to_job"',
                        30, True)
        + [series('ai_provider_latency_seconds_bucket{provider="local", model="m", operation="prompt_to_job", le="60"}',
                  "0+10x40")],
        below=histogram("ai_provider_latency_seconds", 'provider="local", model="m", operation="prompt_to_job"',
                        30, False)
        + [series('ai_provider_latency_seconds_bucket{provider="local", model="m", operation="prompt_to_job", le="20"}',
                  "0x40")],
        labels={"provider": "local", "model": "m"}, value_text=f"{quantile_in_bucket(30, 60):.1f}",
    ),
    Alert(
        "AIProviderRateLimitLow",
        f"ai_provider_rate_limit_remaining_ratio < {THRESHOLDS['ai_rate_limit_remaining']}",
        "warning", "AI provider {{ $labels.provider }} near its rate limit",
        "{{ $value | humanizePercentage }} of the rate limit of {{ $labels.provider }} is left "
        f"(threshold {pct(THRESHOLDS['ai_rate_limit_remaining'])}).",
        "ai-provider-rate-limit",
        above=[series('ai_provider_rate_limit_remaining_ratio{provider="openai_compatible", instance="w:9808"}',
                      "0.05x25")],
        below=[series('ai_provider_rate_limit_remaining_ratio{provider="openai_compatible", instance="w:9808"}',
                      "0.15x25")],
        labels={"provider": "openai_compatible", "instance": "w:9808"}, value_text="5%",
    ),
    Alert(
        "AIProviderCircuitOpen",
        "max by (provider) (ai_provider_circuit_state) == 2",
        "warning", "AI provider {{ $labels.provider }} skipped: circuit open",
        "The circuit breaker of {{ $labels.provider }} has been open for 5 m: prompts fail over to the next "
        "provider (value {{ printf \"%.0f\" $value }}: 0 closed, 1 half-open, 2 open).",
        "ai-provider-errors",
        above=[series('ai_provider_circuit_state{provider="openai_compatible", instance="a:8000"}', "2x25")],
        below=[series('ai_provider_circuit_state{provider="openai_compatible", instance="a:8000"}', "1x25")],
        labels={"provider": "openai_compatible"}, value_text="2",
    ),
    Alert(
        "TelemetrySpansDropped",
        "sum by (instance, reason) (rate(cadscope_telemetry_spans_dropped_total[5m]))"
        f" > {THRESHOLDS['spans_dropped_per_s']}",
        "warning", "Spans dropped on {{ $labels.instance }} ({{ $labels.reason }})",
        "{{ printf \"%.2f\" $value }} spans per second never reach the collector from {{ $labels.instance }} "
        "(reason {{ $labels.reason }}): traces are incomplete.",
        "telemetry-spans-dropped", for_="10m",
        above=[series('cadscope_telemetry_spans_dropped_total{reason="queue_full", instance="w:9808"}', "0+6x40")],
        below=[series('cadscope_telemetry_spans_dropped_total{reason="queue_full", instance="w:9808"}', "30x40")],
        labels={"instance": "w:9808", "reason": "queue_full"}, value_text="0.10",
    ),
    Alert(
        "MetricsFileUnreadable",
        "sum by (instance, action) (increase(cadscope_metrics_files_unreadable_total[5m])) > 0",
        "warning", "A metrics file on {{ $labels.instance }} is unreadable ({{ $labels.action }})",
        "{{ printf \"%.0f\" $value }} multiprocess metric file(s) on {{ $labels.instance }} could not be read in "
        "the last 5 m ({{ $labels.action }}): their samples are missing from /metrics, so the counts there read "
        "low. The worker's log names each file.",
        "metrics-file-unreadable", for_="0m",
        above=[series('cadscope_metrics_files_unreadable_total{action="moved_aside", instance="w:9808"}',
                      "0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1")],
        below=[series('cadscope_metrics_files_unreadable_total{action="moved_aside", instance="w:9808"}', "1x25")],
        labels={"instance": "w:9808", "action": "moved_aside"}, value_text="1", eval_time="3m",
    ),
    Alert(
        "SecurityViolation",
        "sum by (instance, violation_type) (increase(cadscope_security_violations_total[5m])) > 0",
        "critical", "Security violation on {{ $labels.instance }}: {{ $labels.violation_type }}",
        "{{ printf \"%.0f\" $value }} {{ $labels.violation_type }} violation(s) in the last 5 m: an input document did not match its "
        "checksum, or a document key tried to leave the store. The job was rejected; find out who sent it.",
        "security-violation", for_="0m",
        above=[series('cadscope_security_violations_total{violation_type="checksum_mismatch", severity="critical", '
                      'instance="w:9808"}', "0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1")],
        below=[series('cadscope_security_violations_total{violation_type="checksum_mismatch", severity="critical", '
                      'instance="w:9808"}', "1x25")],
        labels={"instance": "w:9808", "violation_type": "checksum_mismatch"}, value_text="1", eval_time="3m",
    ),
    Alert(
        "VersionStageSlowerThanBaseline",
        f"({VERSION_RATIO}) > {THRESHOLDS['version_p95_ratio']:g}"
        f" and on (stage, {V}) {STAGE_COUNT} >= {MIN_VERSION_SAMPLES:g}"
        f" and on (stage) {BASELINE_STAGE_COUNT} >= {MIN_VERSION_SAMPLES:g}",
        "warning", "Stage {{ $labels.stage }} slower on FreeCAD {{ $labels.freecad_version }} / OCCT "
        "{{ $labels.occt_version }} than on the fleet's baseline version",
        "The P95 of the {{ $labels.stage }} stage on FreeCAD {{ $labels.freecad_version }} / OCCT "
        "{{ $labels.occt_version }} has been {{ printf \"%.2f\" $value }} times the fleet baseline version's for "
        f"30 m (threshold {THRESHOLDS['version_p95_ratio']:g}, from at least {MIN_VERSION_SAMPLES} stages on each "
        "side in 30 m). The baseline is the version pair that ran the most primary flows in the last hour. "
        "Get a verdict per operation: cadscope compare --prometheus.",
        "version-regression", for_="30m", eval_time="75m",
        # 8.0.1's generate stage in (0.5, 1]: p95 0.975 s, twice the baseline's 0.4875 s.
        above=version_case(0.5, 1, 1),
        # ... in (0.25, 0.5] like the baseline: the same p95.
        below=version_case(0.25, 0.5, 1),
        labels={"stage": "generate", "freecad_version": "none", "occt_version": "8.0.1", "version": "none/8.0.1"},
        value_text="2.00",
        # Twice as slow, but from 15 stages in 30 m: too few to say.
        quiet=version_case(0.5, 1, 0.5),
        # (to a thousandth: histogram_quantile's arithmetic leaves the last bit of 2 behind)
        ratio="round(" + VERSION_RATIO.replace(STAGE_P95, STAGE_P95 + '{occt_version="8.0.1"}', 1) + ", 0.001)",
        quiet_value=2,
    ),
    Alert(
        "JobSLOBurnRateFast",
        burn(((14.4, "1h", "5m"), (6, "6h", "30m"))),
        "critical", "Job success SLO burning fast",
        "Flows fail at {{ $value | humanizePercentage }}: at this rate the 28-day error budget "
        f"({pct(ERROR_BUDGET)}) lasts less than 2 days.",
        "slo-burn-rate", for_="2m", eval_time="70m",
        above=counter_pair("model_generation_completed_total", FLOW, 'status="failure"', 10, 0.15, minutes=100),
        below=counter_pair("model_generation_completed_total", FLOW, 'status="failure"', 10, 0.05, minutes=100),
        labels={}, value_text="15%",
        # Half of 14 flows an hour failing: too few to page on.
        quiet=counter_pair("model_generation_completed_total", FLOW, 'status="failure"', 0.2, 0.5, minutes=100),
        ratio="cadscope:job_error_ratio:rate1h", quiet_value=0.5,
    ),
    Alert(
        "JobSLOBurnRateSlow",
        burn(((3, "1d", "2h"), (1, "3d", "6h"))),
        "warning", "Job success SLO burning",
        "Flows fail at {{ $value | humanizePercentage }}: the 28-day error budget "
        f"({pct(ERROR_BUDGET)}) is being spent faster than it accrues.",
        # A steady ratio is the same over every window, so 75 minutes of it show what a day would (for: 1h).
        "slo-burn-rate", for_="1h", eval_time="75m",
        above=counter_pair("model_generation_completed_total", FLOW, 'status="failure"', 10, 0.04, minutes=100),
        below=counter_pair("model_generation_completed_total", FLOW, 'status="failure"', 10, 0.005, minutes=100),
        labels={}, value_text="4%",
        # Half of 12 flows a day failing.
        quiet=counter_pair("model_generation_completed_total", FLOW, 'status="failure"', 0.008, 0.5, minutes=100),
        ratio="cadscope:job_error_ratio:rate1d", quiet_value=0.5,
    ),
]  # fmt: skip


def rules() -> dict[str, Any]:
    return {
        "groups": [
            {"name": "cadscope-recording", "interval": "30s", "rules": RECORDING_RULES},
            {"name": "cadscope-versions", "interval": "30s", "rules": VERSION_RULES},
            {"name": "cadscope-alerts", "rules": [alert.rule() for alert in ALERTS]},
        ]
    }


def _annotations(alert: Alert, labels: dict[str, str]) -> dict[str, str]:
    """The annotations Prometheus will render for ``labels`` and ``alert.value_text``."""
    text = {}
    for key, template in alert.rule()["annotations"].items():
        rendered = template
        for name, value in labels.items():
            rendered = rendered.replace(f"{{{{ $labels.{name} }}}}", value)
        for pattern in ("{{ $value | humanizePercentage }}", '{{ printf "%.2f" $value }}',
                        '{{ printf "%.1f" $value }}', '{{ printf "%.0f" $value }}'):  # fmt: skip
            rendered = rendered.replace(pattern, alert.value_text)
        text[key] = rendered
    return text


def rule_tests() -> dict[str, Any]:
    tests = []
    for alert in ALERTS:
        labels = {"severity": alert.severity, "alertname": alert.name, **alert.labels}
        rendered_labels = {k: v for k, v in labels.items() if k != "alertname"}
        template_labels = {
            **alert.labels,
            "job": alert.labels.get("job", ""),
            "instance": alert.labels.get("instance", ""),
        }
        for case, input_series, expected in (("above", alert.above, True), ("below", alert.below, False)):
            exp = [{"exp_labels": rendered_labels, "exp_annotations": _annotations(alert, template_labels)}]
            tests.append({
                "name": f"{alert.name} {case} its threshold",
                "interval": "1m",
                "input_series": input_series,
                "alert_rule_test": [{"eval_time": alert.eval_time, "alertname": alert.name,
                                     "exp_alerts": exp if expected else []}],
            })  # fmt: skip
        if alert.quiet:
            keys = ", ".join(alert.labels)
            tests.append({
                "name": f"{alert.name} silent below its minimum volume",
                "interval": "1m",
                "input_series": alert.quiet,
                "alert_rule_test": [{"eval_time": alert.eval_time, "alertname": alert.name, "exp_alerts": []}],
                # ... though the ratio is above the threshold: the guard, not the ratio, keeps it silent.
                "promql_expr_test": [{
                    "expr": f"sum by ({keys}) ({alert.ratio})" if keys else f"sum({alert.ratio})",
                    "eval_time": alert.eval_time,
                    "exp_samples": [{"labels": "{" + ", ".join(f'{k}="{v}"' for k, v in alert.labels.items()) + "}",
                                     "value": alert.quiet_value}],
                }],
            })  # fmt: skip
    return {"rule_files": ["../rules/cadscope.rules.yml"], "evaluation_interval": "1m", "tests": tests}


# -- the dashboard: the CAD fleet's 16 panels, then the API's ------------------------

SEL = 'freecad_version=~"$freecad_version", occt_version=~"$occt_version"'
FSEL = f'flow_type=~"$flow_type", {SEL}'
LEGEND_V = "FreeCAD {{freecad_version}} / OCCT {{occt_version}}"
RATE = "[$__rate_interval]"


def q(expr: str, legend: str, **extra: Any) -> dict[str, Any]:
    return {"expr": expr, "legendFormat": legend, **extra}


def p95_of(bucket: str, by: str, selector: str) -> str:
    return f"histogram_quantile(0.95, sum by (le, {by}) (rate({bucket}{{{selector}}}{RATE})))"


# Each panel: title, unit, targets; "units" gives a query (by refId) its own unit and axis;
# "versions": False for the panels whose metrics carry no engine versions (AI provider, API).
PANELS: list[dict[str, Any]] = [
    {"title": "Model Generation Success Rate", "unit": "percentunit",
     "description": "Share of finished flows that succeeded, by flow type and overall, per FreeCAD/OCCT pair.",
     "targets": [
        q(f'sum by (flow_type, {V}) (rate(model_generation_completed_total{{status="success", {FSEL}}}{RATE}))'
          f" / sum by (flow_type, {V}) (rate(model_generation_completed_total{{{FSEL}}}{RATE}))",
          "{{flow_type}} " + LEGEND_V),
        q(f'sum by ({V}) (rate(model_generation_completed_total{{status="success", {FSEL}}}{RATE}))'
          f" / sum by ({V}) (rate(model_generation_completed_total{{{FSEL}}}{RATE}))",
          "all flows " + LEGEND_V)]},
    {"title": "P95 Latencies by Flow", "unit": "s",
     "description": "P95 of whole flows (ModelGenerationSlow: 300 s) and of each stage.",
     "targets": [
        q(p95_of("model_generation_duration_seconds_bucket", f"flow_type, {V}", FSEL), "{{flow_type}} " + LEGEND_V),
        q(p95_of("model_generation_stage_duration_seconds_bucket", f"stage, {V}", FSEL), "{{stage}} " + LEGEND_V)]},
    {"title": "Active Flows", "unit": "short", "description": "Flows running now.", "targets": [
        q(f"sum by (flow_type, {V}) (model_generation_active_flows{{{FSEL}}})", "{{flow_type}} " + LEGEND_V)]},
    {"title": "AI Provider Performance", "type": "heatmap", "unit": "s", "versions": False,
     "description": "Latency of AI provider calls: calls per latency bucket and interval (AIProviderSlow: P95 30 s).",
     "targets": [
        q(f"sum by (le) (increase(ai_provider_latency_seconds_bucket{RATE}))", "{{le}}", format="heatmap")]},
    {"title": "Document Operations", "unit": "s", "targets": [
        q(p95_of("freecad_document_load_seconds_bucket", f"source, {V}", SEL), "load {{source}} " + LEGEND_V),
        q(p95_of("freecad_recompute_duration_seconds_bucket", f"doc_complexity, {V}", SEL),
          "recompute {{doc_complexity}} " + LEGEND_V)]},
    {"title": "OCCT Operations", "unit": "s",
     "description": "P95 of OCCT booleans (OCCTBooleanOperationSlow: 30 s) and of fillets and chamfers.",
     "targets": [
        q(p95_of("occt_boolean_duration_seconds_bucket", f"operation, {V}", SEL), "{{operation}} " + LEGEND_V),
        q(p95_of("occt_feature_duration_seconds_bucket", f"feature, {V}", SEL), "{{feature}} " + LEGEND_V)]},
    {"title": "OCCT Memory Usage", "unit": "bytes",
     "description": "P95 of the CAD process's peak memory during an operation (OCCTHighMemoryUsage: 1.5 GiB).",
     "targets": [
        q(p95_of("occt_operation_memory_bytes_bucket", f"operation, {V}", SEL), "{{operation}} " + LEGEND_V)]},
    {"title": "Assembly4 Solver", "unit": "s", "units": {"B": "short"},
     "description": "P95 of a placement solve in seconds (Assembly4SolverSlow: 15 s) and of its iterations, "
                    "a count (Assembly4ExcessiveIterations: 200), by solver.",
     "targets": [
        q(p95_of("a4_constraint_solve_duration_seconds_bucket", f"solver, {V}", SEL),
          "{{solver}} solve p95 " + LEGEND_V),
        q(p95_of("a4_solver_iterations_per_solve_bucket", f"solver, {V}", SEL),
          "{{solver}} iterations p95 " + LEGEND_V)]},
    {"title": "LCS Resolution", "unit": "s", "targets": [
        q(p95_of("a4_lcs_resolution_duration_seconds_bucket", f"lcs_count_range, {V}", SEL),
          "{{lcs_count_range}} LCS " + LEGEND_V)]},
    {"title": "Material Library", "unit": "percentunit", "targets": [
        q(f'sum by (library, {V}) (rate(material_library_access_total{{result="hit", {SEL}}}{RATE}))'
          f" / sum by (library, {V}) (rate(material_library_access_total{{{SEL}}}{RATE}))",
          "hit ratio {{library}} " + LEGEND_V)]},
    {"title": "Material Application", "unit": "s", "targets": [
        q(p95_of("material_property_apply_duration_seconds_bucket", f"property, {V}", SEL),
          "{{property}} " + LEGEND_V),
        q(p95_of("material_appearance_apply_duration_seconds_bucket", f"appearance_type, {V}", SEL),
          "{{appearance_type}} " + LEGEND_V)]},
    {"title": "Topology Hash", "unit": "s", "targets": [
        q(p95_of("topology_hash_compute_duration_seconds_bucket", f"scope, {V}", SEL), "{{scope}} " + LEGEND_V)]},
    {"title": "Export Validation", "unit": "percentunit", "targets": [
        q(f'sum by (format, {V}) (rate(deterministic_export_validation_total{{result="pass", {SEL}}}{RATE}))'
          f" / sum by (format, {V}) (rate(deterministic_export_validation_total{{{SEL}}}{RATE}))",
          "{{format}} deterministic " + LEGEND_V)]},
    {"title": "Export Duration", "unit": "s", "targets": [
        q(p95_of("export_duration_seconds_bucket", f"format, file_size_range, {V}", SEL),
          "{{format}} {{file_size_range}} " + LEGEND_V)]},
    {"title": "Workbench Usage", "unit": "short", "targets": [
        q(f"sum by (workbench, {V}) (increase(freecad_workbench_invocations_total{{{SEL}}}[$__range]))",
          "{{workbench}} " + LEGEND_V),
        q(f'sum by (workbench, compatible, {V}) (increase(freecad_workbench_compatibility_total{{{SEL}}}[$__range]))',
          "{{workbench}} compatible={{compatible}} " + LEGEND_V)]},
    {"title": "Worker Resources", "unit": "percentunit", "units": {"B": "bytes", "C": "short"},
     "description": "CPU of the CAD processes (100% = one core busy), P95 of their peak memory, and CAD "
                    "processes that died and were replaced, a count per interval (FreeCADWorkerFailure: 0.1/s).",
     "targets": [
        q(f"sum by (engine, {V}) (rate(cadscope_subprocess_cpu_seconds_total{{{SEL}}}{RATE}))",
          "CAD CPU {{engine}} " + LEGEND_V),
        q(p95_of("cadscope_subprocess_peak_memory_bytes_bucket", f"engine, {V}", SEL),
          "CAD peak memory p95 {{engine}} " + LEGEND_V),
        q(f"sum by (reason, {V}) (increase(freecad_worker_restarts_total{{{SEL}}}{RATE}))",
          "restarts ({{reason}}) " + LEGEND_V)]},
    # The API.
    {"title": "API Request Rate", "unit": "reqps", "versions": False,
     "description": "Requests per second by route (monitoring routes left out).",
     "targets": [
        q(f"sum by (method, route) (rate(http_requests_total{{{USER_ROUTES}}}{RATE}))", "{{method}} {{route}}")]},
    {"title": "API Latency", "unit": "s", "versions": False,
     "description": "P95 by route, and the mean HighRequestLatency watches (0.5 s): short requests only, "
                    "event streams and monitoring routes left out.",
     "targets": [
        q(f"histogram_quantile(0.95, sum by (le, route) "
          f"(rate(http_request_duration_seconds_bucket{{{SHORT_ROUTES}}}{RATE})))", "p95 {{route}}"),
        q(LATENCY_MEAN.replace("[5m]", RATE), "mean {{instance}}")]},
    {"title": "API Errors", "unit": "percentunit", "units": {"B": "reqps"}, "versions": False,
     "description": "Share of requests answered 5xx (HighErrorRate: 5%), and errors by route and status.",
     "targets": [
        q(f'(sum by (instance) (rate(http_requests_total{{status=~"5..", {USER_ROUTES}}}{RATE}))'
          f" or sum by (instance) (rate(http_requests_total{{{USER_ROUTES}}}{RATE})) * 0)"
          f" / sum by (instance) (rate(http_requests_total{{{USER_ROUTES}}}{RATE}))", "5xx share {{instance}}"),
        q(f'sum by (route, status) (rate(http_requests_total{{status=~"[45]..", {USER_ROUTES}}}{RATE}))',
          "{{status}} {{route}}")]},
    {"title": "API Event Streams", "unit": "short", "versions": False,
     "description": "Progress streams open now, and streams that ended before the server finished them: "
                    "server_error (the client got a cut stream), client_disconnected (the client or a proxy "
                    "closed it first).",
     "targets": [
        q("sum by (route) (http_streams_open)", "open {{route}}"),
        q(f"sum by (route, reason) (increase(http_stream_errors_total{RATE}))", "ended early ({{reason}}) {{route}}")]},
    {"title": "Active Alerts", "type": "table", "unit": "short", "versions": False,
     "description": "Alerts pending or firing now.",
     "targets": [q("sum by (alertname, alertstate, severity) (ALERTS)", "", format="table", instant=True)]},
    # Two chosen version pairs side by side ("versions": "pair": the $baseline and $candidate variables).
    {"title": "Version comparison", "type": "row", "versions": False, "targets": []},
    {"title": "Stage P95: baseline and candidate", "unit": "s", "versions": "pair",
     "description": "P95 of each stage over 30 m on the two chosen version pairs.",
     "targets": [
        q(f'{STAGE_P95}{{version="$baseline"}}', "{{stage}} baseline {{version}}"),
        q(f'{STAGE_P95}{{version="$candidate"}}', "{{stage}} candidate {{version}}")]},
    {"title": "Stage P95 ratio: candidate / baseline", "unit": "short", "versions": "pair",
     "description": f"Above 1 the candidate is slower. VersionStageSlowerThanBaseline fires at "
                    f"{THRESHOLDS['version_p95_ratio']:g} against the fleet's baseline version, for 30 m.",
     "targets": [
        q(f'{STAGE_P95}{{version="$candidate"}} / ignoring (version, {V}) {STAGE_P95}{{version="$baseline"}}',
          "{{stage}}")]},
    {"title": "Operation P95 ratio: candidate / baseline", "unit": "short", "versions": "pair",
     "description": "The same per OCCT and FreeCAD operation: which operation made a stage slower.",
     "targets": [
        q(f'{OPERATION_P95}{{version="$candidate"}} / ignoring (version, {V}) {OPERATION_P95}{{version="$baseline"}}',
          "{{operation}}")]},
    {"title": "Samples in 30 m: baseline and candidate", "unit": "short", "versions": "pair",
     "description": f"Stages measured in the P95s' window. Below {MIN_VERSION_SAMPLES} a side, a ratio says little "
                    "and the alert stays silent.",
     "targets": [
        q(f'{STAGE_COUNT}{{version="$baseline"}}', "{{stage}} baseline {{version}}"),
        q(f'{STAGE_COUNT}{{version="$candidate"}}', "{{stage}} candidate {{version}}")]},
]  # fmt: skip


def _panel(index: int, spec: dict[str, Any], y: int) -> dict[str, Any]:
    datasource = {"type": "prometheus", "uid": "prometheus"}
    kind = spec.get("type", "timeseries")
    if kind == "row":
        return {"id": index + 1, "type": "row", "title": spec["title"], "collapsed": False, "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "targets": []}  # fmt: skip
    panel: dict[str, Any] = {
        "id": index + 1, "type": kind, "title": spec["title"], "description": spec.get("description", ""),
        "datasource": datasource,
        "gridPos": {"h": 8, "w": 24 if kind == "table" else 12, "x": 12 * (index % 2), "y": y},
        "fieldConfig": {"defaults": {"unit": spec["unit"]}, "overrides": [
            {"matcher": {"id": "byFrameRefID", "options": ref_id},
             "properties": [{"id": "unit", "value": unit}, {"id": "custom.axisPlacement", "value": "right"}]}
            for ref_id, unit in spec.get("units", {}).items()
        ]},
        "options": {"legend": {"displayMode": "table", "placement": "bottom"}},
        "targets": [{"refId": chr(65 + i), "datasource": datasource, **t} for i, t in enumerate(spec["targets"])],
    }  # fmt: skip
    if kind == "heatmap":
        panel["options"] = {"calculate": False, "yAxis": {"unit": spec["unit"]}, "cellValues": {"unit": "short"},
                            "color": {"mode": "scheme", "scheme": "Oranges"}, "legend": {"show": True}}  # fmt: skip
    elif kind == "table":
        panel["options"] = {"showHeader": True}
    return panel


def dashboard() -> dict[str, Any]:
    def variable(name: str, query: str) -> dict[str, Any]:
        return {
            "name": name, "label": name, "type": "query", "datasource": {"type": "prometheus", "uid": "prometheus"},
            "query": {"query": query, "refId": name}, "definition": query, "includeAll": True, "allValue": ".*",
            "multi": True, "current": {"text": "All", "value": "$__all"}, "refresh": 2, "sort": 1,
        }  # fmt: skip

    def pair(name: str, description: str) -> dict[str, Any]:
        query = f"label_values({STAGE_P95}, version)"
        return {
            "name": name, "label": name, "description": description, "type": "query",
            "datasource": {"type": "prometheus", "uid": "prometheus"}, "query": {"query": query, "refId": name},
            "definition": query, "includeAll": False, "multi": False, "refresh": 2, "sort": 1,
        }  # fmt: skip

    panels, y, column = [], 0, 0
    for index, spec in enumerate(PANELS):
        if spec.get("type") == "row":  # a row starts on a line of its own
            y, column = y + (8 if column else 0), 0
            panels.append(_panel(index, spec, y))
            y += 1
            continue
        panels.append(_panel(index, spec, y))
        panels[-1]["gridPos"]["x"] = 12 * column
        y, column = (y + 8, 0) if column or spec.get("type") == "table" else (y, 1)
    return {
        "uid": "cadscope-model-generation", "title": "cadscope: model generation (FreeCAD / OCCT)",
        "tags": ["cadscope", "freecad", "occt"], "timezone": "utc", "schemaVersion": 39, "version": 1,
        "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            variable("freecad_version", "label_values(model_generation_started_total, freecad_version)"),
            variable("occt_version", 'label_values(model_generation_started_total{freecad_version=~"$freecad_version"}, occt_version)'),
            variable("flow_type", "label_values(model_generation_started_total, flow_type)"),
            pair("baseline", "The version pair to compare against (FreeCAD/OCCT)."),
            pair("candidate", "The version pair under test (FreeCAD/OCCT)."),
        ]},
        "panels": panels,
    }  # fmt: skip


def outputs() -> dict[Path, str]:
    header = "# Generated by infra/generate.py: edit the generator, not this file.\n"
    dump = lambda data: yaml.safe_dump(data, sort_keys=False, width=120, allow_unicode=True)  # noqa: E731
    return {
        ROOT / "prometheus" / "rules" / "cadscope.rules.yml": header + dump(rules()),
        ROOT / "prometheus" / "tests" / "cadscope.rules.test.yml": header + dump(rule_tests()),
        ROOT / "grafana" / "dashboards" / "cadscope-model-generation.json": json.dumps(dashboard(), indent=2) + "\n",
    }


def main() -> int:
    for path, text in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
