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

ROOT = Path(__file__).resolve().parent
RUNBOOKS = "https://github.com/cadscope/cadscope/blob/main/docs/runbooks"

# -- thresholds: the one place ----------------------------------------------------------

THRESHOLDS = {
    "failure_ratio": 0.10,  # seed 003: > 10 % of flows fail over 5 m
    "worker_restarts_per_s": 0.1,  # seed 003: > 0.1 CAD process restarts per second
    "ai_error_ratio": 0.10,  # seed 003: > 10 % provider errors
    "generation_p95_s": 300,  # seed 003: P95 of a flow > 5 minutes
    "boolean_p95_s": 30,  # seed 003: P95 of an OCCT boolean > 30 s
    "occt_memory_bytes": 1.5e9,  # seed 003: > 1.5 GB during an operation
    "a4_solve_p95_s": 15,  # seed 003: P95 of an Assembly4 solve > 15 s
    "a4_iterations_p95": 200,  # seed 003: P95 of solver iterations > 200
    "http_latency_avg_s": 0.5,  # seed 002: mean request latency > 500 ms
    "http_error_ratio": 0.05,  # seed 002: > 5 % 5xx
    "ai_latency_p95_s": 30,  # seed 004: provider latency > 30 s
    "ai_rate_limit_remaining": 0.10,  # seed 004: < 10 % of the provider's rate limit left
    "spans_dropped_per_s": 0,  # any span the collector never got, sustained for 10 m
    "queue_messages": 50,  # backlog: more than 50 jobs waiting for 10 minutes
    "slo_success": 0.99,  # 99 % of flows succeed (28-day SLO); burn rates per the SRE workbook
}
VERSIONS = ("freecad_version", "occt_version")
V = ", ".join(VERSIONS)
ERROR_BUDGET = round(1 - THRESHOLDS["slo_success"], 6)


def p95(record: str, bucket: str, by: str) -> dict[str, str]:
    return {"record": record, "expr": f"histogram_quantile(0.95, sum by (le, {by}) (rate({bucket}[5m])))"}


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
    for window in ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
]  # fmt: skip


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


VSEL = 'freecad_version="0.20.2", occt_version="7.6.3"'
FLOW = f'flow_type="parametric", {VSEL}'
FLOW_LABELS = {"flow_type": "parametric", "freecad_version": "0.20.2", "occt_version": "7.6.3"}
VLABELS = {"freecad_version": "0.20.2", "occt_version": "7.6.3"}


def quantile_in_bucket(low: float, high: float) -> float:
    """histogram_quantile(0.95) when every observation is in (low, high]."""
    return low + (high - low) * 0.95


ALERTS = [
    Alert(
        "ModelGenerationHighFailureRate",
        f'sum by (flow_type, {V}) (rate(model_generation_completed_total{{status="failure"}}[5m]))'
        f" / sum by (flow_type, {V}) (rate(model_generation_completed_total[5m])) > {THRESHOLDS['failure_ratio']}",
        "critical", "Model generation failing for {{ $labels.flow_type }} on FreeCAD {{ $labels.freecad_version }}",
        "{{ $value | humanizePercentage }} of {{ $labels.flow_type }} flows failed over 5 m on FreeCAD "
        "{{ $labels.freecad_version }} / OCCT {{ $labels.occt_version }} (threshold 10%).",
        "model-generation-failures",
        above=counter_pair("model_generation_completed_total", FLOW, 'status="failure"', 10, 0.12),
        below=counter_pair("model_generation_completed_total", FLOW, 'status="failure"', 10, 0.08),
        labels=FLOW_LABELS, value_text="12%",
    ),
    Alert(
        "FreeCADWorkerFailure",
        f"sum by (reason, {V}) (rate(freecad_worker_restarts_total[5m])) > {THRESHOLDS['worker_restarts_per_s']}",
        "critical", "CAD processes dying: {{ $labels.reason }}",
        "{{ printf \"%.2f\" $value }} CAD process restarts per second ({{ $labels.reason }}) on FreeCAD "
        "{{ $labels.freecad_version }} (threshold 0.1/s).",
        "freecad-worker-failure", for_="2m",
        above=[series(f'freecad_worker_restarts_total{{reason="oom", {VSEL}}}', "0+7.2x40")],
        below=[series(f'freecad_worker_restarts_total{{reason="oom", {VSEL}}}', "0+4.8x40")],
        labels={"reason": "oom", **VLABELS}, value_text="0.12",
    ),
    Alert(
        "AIProviderHighErrorRate",
        # A refused prompt is the prompt's fault, not the provider's.
        'sum by (provider) (rate(ai_provider_requests_total{outcome!~"ok|refused"}[5m]))'
        f" / sum by (provider) (rate(ai_provider_requests_total[5m])) > {THRESHOLDS['ai_error_ratio']}",
        "critical", "AI provider {{ $labels.provider }} failing",
        "{{ $value | humanizePercentage }} of calls to {{ $labels.provider }} failed over 5 m (threshold 10%).",
        "ai-provider-errors",
        above=counter_pair("ai_provider_requests_total", 'provider="openai_compatible", model="m"',
                           'outcome="server_error"', 10, 0.12),
        below=counter_pair("ai_provider_requests_total", 'provider="openai_compatible", model="m"',
                           'outcome="server_error"', 10, 0.08),
        labels={"provider": "openai_compatible"}, value_text="12%",
    ),
    Alert(
        "ModelGenerationSlow",
        f"cadscope:model_generation_duration_seconds:p95_5m > {THRESHOLDS['generation_p95_s']}",
        "warning", "Slow model generation ({{ $labels.flow_type }})",
        "P95 of {{ $labels.flow_type }} flows is {{ printf \"%.0f\" $value }} s on FreeCAD "
        "{{ $labels.freecad_version }} / OCCT {{ $labels.occt_version }} (threshold 300 s).",
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
        "(threshold 30 s).",
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
        f"sum by (operation, {V}) (increase(occt_operation_memory_bytes_count[5m]))"
        f' - sum by (operation, {V}) (increase(occt_operation_memory_bytes_bucket{{le="1.5e+09"}}[5m])) > 0',
        "warning", "OCCT {{ $labels.operation }} above 1.5 GB",
        "{{ printf \"%.0f\" $value }} {{ $labels.operation }} operations peaked above 1.5 GB in 5 m on OCCT "
        "{{ $labels.occt_version }}.",
        "occt-high-memory", for_="1m",
        above=[series(f'occt_operation_memory_bytes_count{{operation="fillet", {VSEL}}}', "0+1x40"),
               series(f'occt_operation_memory_bytes_bucket{{operation="fillet", {VSEL}, le="1.5e+09"}}', "0x40")],
        below=[series(f'occt_operation_memory_bytes_count{{operation="fillet", {VSEL}}}', "0+1x40"),
               series(f'occt_operation_memory_bytes_bucket{{operation="fillet", {VSEL}, le="1.5e+09"}}',
                      "0+1x40")],
        labels={"operation": "fillet", **VLABELS}, value_text="5",
    ),
    Alert(
        "Assembly4SolverSlow",
        f"cadscope:a4_constraint_solve_duration_seconds:p95_5m > {THRESHOLDS['a4_solve_p95_s']}",
        "warning", "Slow Assembly4 solves ({{ $labels.solver }})",
        "P95 of the {{ $labels.solver }} solve is {{ printf \"%.1f\" $value }} s (threshold 15 s).",
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
        "P95 of solver iterations is {{ printf \"%.0f\" $value }} (threshold 200).",
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
        "sum by (instance) (rate(http_request_duration_seconds_sum[5m]))"
        f" / sum by (instance) (rate(http_request_duration_seconds_count[5m])) > {THRESHOLDS['http_latency_avg_s']}",
        "warning", "High request latency on {{ $labels.instance }}",
        "Mean latency is {{ printf \"%.2f\" $value }} s (threshold 0.5 s).",
        "api-latency", for_="1m",
        above=[series('http_request_duration_seconds_sum{instance="api:8000", method="POST", route="/v1/jobs"}',
                      "0+6x40"),
               series('http_request_duration_seconds_count{instance="api:8000", method="POST", route="/v1/jobs"}',
                      "0+10x40")],
        below=[series('http_request_duration_seconds_sum{instance="api:8000", method="POST", route="/v1/jobs"}',
                      "0+4x40"),
               series('http_request_duration_seconds_count{instance="api:8000", method="POST", route="/v1/jobs"}',
                      "0+10x40")],
        labels={"instance": "api:8000"}, value_text="0.60",
    ),
    Alert(
        "HighErrorRate",
        'sum by (instance) (rate(http_requests_total{status=~"5.."}[5m]))'
        f" / sum by (instance) (rate(http_requests_total[5m])) > {THRESHOLDS['http_error_ratio']}",
        "critical", "High error rate on {{ $labels.instance }}",
        "{{ $value | humanizePercentage }} of requests answered 5xx (threshold 5%).",
        "api-errors", for_="1m",
        above=counter_pair("http_requests_total", 'instance="api:8000", method="POST", route="/v1/jobs"',
                           'status="500"', 10, 0.06),
        below=counter_pair("http_requests_total", 'instance="api:8000", method="POST", route="/v1/jobs"',
                           'status="500"', 10, 0.04),
        labels={"instance": "api:8000"}, value_text="6%",
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
        "{{ printf \"%.0f\" $value }} jobs have been waiting in {{ $labels.queue }} (threshold 50 for 10 m).",
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
        "(threshold 30 s).",
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
        "{{ $value | humanizePercentage }} of the rate limit of {{ $labels.provider }} is left (threshold 10%).",
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
        "JobSLOBurnRateFast",
        f"(cadscope:job_error_ratio:rate1h > {14.4 * ERROR_BUDGET:g} and cadscope:job_error_ratio:rate5m > "
        f"{14.4 * ERROR_BUDGET:g}) or (cadscope:job_error_ratio:rate6h > {6 * ERROR_BUDGET:g} and "
        f"cadscope:job_error_ratio:rate30m > {6 * ERROR_BUDGET:g})",
        "critical", "Job success SLO burning fast",
        "Flows fail at {{ $value | humanizePercentage }}: at this rate the 28-day error budget (1%) lasts "
        "less than 2 days.",
        "slo-burn-rate", for_="2m", eval_time="70m",
        above=counter_pair("model_generation_completed_total", FLOW, 'status="failure"', 10, 0.15, minutes=100),
        below=counter_pair("model_generation_completed_total", FLOW, 'status="failure"', 10, 0.05, minutes=100),
        labels={}, value_text="15%",
    ),
    Alert(
        "JobSLOBurnRateSlow",
        f"(cadscope:job_error_ratio:rate1d > {3 * ERROR_BUDGET:g} and cadscope:job_error_ratio:rate2h > "
        f"{3 * ERROR_BUDGET:g}) or (cadscope:job_error_ratio:rate3d > {ERROR_BUDGET:g} and "
        f"cadscope:job_error_ratio:rate6h > {ERROR_BUDGET:g})",
        "warning", "Job success SLO burning",
        "Flows fail at {{ $value | humanizePercentage }}: the 28-day error budget (1%) is being spent faster "
        "than it accrues.",
        "slo-burn-rate", for_="1h", eval_time="1d2h",
        above=[series(f'model_generation_completed_total{{{FLOW}, status="failure"}}', "0+0.4x1600"),
               series(f'model_generation_completed_total{{{FLOW}, status="success"}}', "0+9.6x1600")],
        below=[series(f'model_generation_completed_total{{{FLOW}, status="failure"}}', "0+0.05x1600"),
               series(f'model_generation_completed_total{{{FLOW}, status="success"}}', "0+9.95x1600")],
        labels={}, value_text="4%",
    ),
]  # fmt: skip


def rules() -> dict[str, Any]:
    return {
        "groups": [
            {"name": "cadscope-recording", "interval": "30s", "rules": RECORDING_RULES},
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
    return {"rule_files": ["../rules/cadscope.rules.yml"], "evaluation_interval": "1m", "tests": tests}


# -- the dashboard (seed 003's 16 panels) --------------------------------------------------

SEL = 'freecad_version=~"$freecad_version", occt_version=~"$occt_version"'
FSEL = f'flow_type=~"$flow_type", {SEL}'
LEGEND_V = "FreeCAD {{freecad_version}} / OCCT {{occt_version}}"


def q(expr: str, legend: str) -> dict[str, str]:
    return {"expr": expr, "legendFormat": legend}


PANELS: list[dict[str, Any]] = [
    {"title": "Model Generation Success Rate", "unit": "percentunit", "targets": [
        q(f'sum by (flow_type, {V}) (rate(model_generation_completed_total{{status="success", {FSEL}}}[$__rate_interval]))'
          f" / sum by (flow_type, {V}) (rate(model_generation_completed_total{{{FSEL}}}[$__rate_interval]))",
          "{{flow_type}} " + LEGEND_V)]},
    {"title": "P95 Latencies by Flow", "unit": "s", "targets": [
        q(f"histogram_quantile(0.95, sum by (le, flow_type, {V}) "
          f"(rate(model_generation_duration_seconds_bucket{{{FSEL}}}[$__rate_interval])))", "{{flow_type}} " + LEGEND_V),
        q(f"histogram_quantile(0.95, sum by (le, stage, {V}) "
          f"(rate(model_generation_stage_duration_seconds_bucket{{{FSEL}}}[$__rate_interval])))", "{{stage}} " + LEGEND_V)]},
    {"title": "Active Flows", "unit": "short", "targets": [
        q(f"sum by (flow_type, {V}) (model_generation_active_flows{{{FSEL}}})", "{{flow_type}} " + LEGEND_V)]},
    {"title": "AI Provider Performance", "unit": "s", "ai": True, "targets": [
        q('histogram_quantile(0.95, sum by (le, provider, model) (rate(ai_provider_latency_seconds_bucket[$__rate_interval])))',
          "{{provider}} {{model}}")]},
    {"title": "Document Operations", "unit": "s", "targets": [
        q(f"histogram_quantile(0.95, sum by (le, source, {V}) (rate(freecad_document_load_seconds_bucket{{{SEL}}}[$__rate_interval])))",
          "load {{source}} " + LEGEND_V),
        q(f"histogram_quantile(0.95, sum by (le, doc_complexity, {V}) (rate(freecad_recompute_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))",
          "recompute {{doc_complexity}} " + LEGEND_V)]},
    {"title": "OCCT Operations", "unit": "s", "targets": [
        q(f"histogram_quantile(0.95, sum by (le, operation, {V}) (rate(occt_boolean_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))",
          "{{operation}} " + LEGEND_V),
        q(f"histogram_quantile(0.95, sum by (le, feature, {V}) (rate(occt_feature_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))",
          "{{feature}} " + LEGEND_V)]},
    {"title": "OCCT Memory Usage", "unit": "bytes", "targets": [
        q(f"histogram_quantile(0.95, sum by (le, operation, {V}) (rate(occt_operation_memory_bytes_bucket{{{SEL}}}[$__rate_interval])))",
          "{{operation}} " + LEGEND_V)]},
    {"title": "Assembly4 Solver", "unit": "s", "targets": [
        q(f"histogram_quantile(0.95, sum by (le, solver, {V}) (rate(a4_constraint_solve_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))",
          "solve p95 " + LEGEND_V),
        q(f"histogram_quantile(0.95, sum by (le, solver, {V}) (rate(a4_solver_iterations_per_solve_bucket{{{SEL}}}[$__rate_interval])))",
          "iterations p95 " + LEGEND_V)]},
    {"title": "LCS Resolution", "unit": "s", "targets": [
        q(f"histogram_quantile(0.95, sum by (le, lcs_count_range, {V}) (rate(a4_lcs_resolution_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))",
          "{{lcs_count_range}} LCS " + LEGEND_V)]},
    {"title": "Material Library", "unit": "percentunit", "targets": [
        q(f'sum by (library, {V}) (rate(material_library_access_total{{result="hit", {SEL}}}[$__rate_interval]))'
          f" / sum by (library, {V}) (rate(material_library_access_total{{{SEL}}}[$__rate_interval]))",
          "hit ratio {{library}} " + LEGEND_V)]},
    {"title": "Material Application", "unit": "s", "targets": [
        q(f"histogram_quantile(0.95, sum by (le, property, {V}) (rate(material_property_apply_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))",
          "{{property}} " + LEGEND_V),
        q(f"histogram_quantile(0.95, sum by (le, appearance_type, {V}) (rate(material_appearance_apply_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))",
          "{{appearance_type}} " + LEGEND_V)]},
    {"title": "Topology Hash", "unit": "s", "targets": [
        q(f"histogram_quantile(0.95, sum by (le, scope, {V}) (rate(topology_hash_compute_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))",
          "{{scope}} " + LEGEND_V)]},
    {"title": "Export Validation", "unit": "percentunit", "targets": [
        q(f'sum by (format, {V}) (rate(deterministic_export_validation_total{{result="pass", {SEL}}}[$__rate_interval]))'
          f" / sum by (format, {V}) (rate(deterministic_export_validation_total{{{SEL}}}[$__rate_interval]))",
          "{{format}} deterministic " + LEGEND_V)]},
    {"title": "Export Duration", "unit": "s", "targets": [
        q(f"histogram_quantile(0.95, sum by (le, format, file_size_range, {V}) (rate(export_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))",
          "{{format}} {{file_size_range}} " + LEGEND_V)]},
    {"title": "Workbench Usage", "unit": "short", "targets": [
        q(f"sum by (workbench, {V}) (increase(freecad_workbench_invocations_total{{{SEL}}}[$__range]))",
          "{{workbench}} " + LEGEND_V),
        q(f'sum by (workbench, compatible, {V}) (increase(freecad_workbench_compatibility_total{{{SEL}}}[$__range]))',
          "{{workbench}} compatible={{compatible}} " + LEGEND_V)]},
    {"title": "Worker Resources", "unit": "bytes", "targets": [
        q(f"histogram_quantile(0.95, sum by (le, engine, {V}) (rate(cadscope_subprocess_peak_memory_bytes_bucket{{{SEL}}}[$__rate_interval])))",
          "CAD process peak RSS {{engine}} " + LEGEND_V),
        q(f'sum by (reason, {V}) (increase(freecad_worker_restarts_total{{{SEL}}}[$__range]))',
          "restarts {{reason}} " + LEGEND_V)]},
]  # fmt: skip


def dashboard() -> dict[str, Any]:
    def variable(name: str, query: str) -> dict[str, Any]:
        return {
            "name": name, "label": name, "type": "query", "datasource": {"type": "prometheus", "uid": "prometheus"},
            "query": {"query": query, "refId": name}, "definition": query, "includeAll": True, "allValue": ".*",
            "multi": True, "current": {"text": "All", "value": "$__all"}, "refresh": 2, "sort": 1,
        }  # fmt: skip

    panels = []
    for index, spec in enumerate(PANELS):
        panels.append({
            "id": index + 1, "type": "timeseries", "title": spec["title"],
            "datasource": {"type": "prometheus", "uid": "prometheus"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
            "fieldConfig": {"defaults": {"unit": spec["unit"]}, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom"}},
            "targets": [{"refId": chr(65 + i), "datasource": {"type": "prometheus", "uid": "prometheus"}, **t}
                        for i, t in enumerate(spec["targets"])],
        })  # fmt: skip
    return {
        "uid": "cadscope-model-generation", "title": "cadscope: model generation (FreeCAD / OCCT)",
        "tags": ["cadscope", "freecad", "occt"], "timezone": "utc", "schemaVersion": 39, "version": 1,
        "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            variable("freecad_version", "label_values(model_generation_started_total, freecad_version)"),
            variable("occt_version", 'label_values(model_generation_started_total{freecad_version=~"$freecad_version"}, occt_version)'),
            variable("flow_type", "label_values(model_generation_started_total, flow_type)"),
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
