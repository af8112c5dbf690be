"""The whole pipeline with real parts: Redis, a prefork ``celery worker``, freecadcmd,
OCP, and an OTLP/gRPC receiver run by the test. Spans are read back over OTLP,
metrics over HTTP from the worker's ``/metrics``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid

import pytest
from opentelemetry import trace

from cadscope.workers import run_job
from cadscope.workers._workload import ASSEMBLY, PLATE, workload

from .test_metrics import SEED_003

pytestmark = pytest.mark.slow

SMALL = {
    "name": "small_plate",
    "parts": [
        {
            "name": "plate",
            "material": "pla",
            "steps": [
                {"kind": "box", "name": "b", "length": 20, "width": 10, "height": 2},
                {"kind": "cylinder", "name": "h", "radius": 2, "height": 2, "placement": {"position": [10, 5, 0]}},
                {"kind": "boolean", "name": "d", "operation": "cut", "operands": ["b", "h"]},
            ],
        }
    ],
    "exports": [{"format": "brep", "of": "plate", "name": "plate"}],
}


def _worker_env(otlp_receiver):
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }


def _submit(tracer, spec, queue):
    job_id = f"job-{uuid.uuid4().hex[:10]}"
    with tracer.start_as_current_span("POST /v1/jobs", kind=trace.SpanKind.SERVER) as root:
        handle = run_job.apply_async(args=[spec], kwargs={"job_id": job_id}, task_id=job_id, queue=queue)
    return job_id, format(root.get_span_context().trace_id, "032x"), handle


def test_one_trace_from_the_publisher_to_the_deepest_occt_span(producer, start_worker, otlp_receiver, engines):
    worker = start_worker(env=_worker_env(otlp_receiver))
    submitted = [_submit(producer, {**PLATE, "engine": name}, worker.queue) for name in ("freecad", "ocp")]
    # The assembly job covers the Assembly4 families, so every CAD metric family has samples.
    assemblies = [_submit(producer, {**ASSEMBLY, "engine": name}, worker.queue) for name in ("freecad", "ocp")]
    for job_id, _trace_id, handle in submitted + assemblies:
        result = handle.get(timeout=180)
        assert result["status"] == "succeeded", result
        assert result["job_id"] == job_id
    for (_job_id, trace_id, _handle), engine in zip(submitted, ("freecad", "ocp"), strict=True):

        def complete(spans, trace_id=trace_id):
            mine = [s for s in spans if s["trace_id"] == trace_id]
            names = {s["name"] for s in mine}
            return {"POST /v1/jobs", "run/cadscope.run_job", "occt.feature", "cad.stage validate_export"} <= names

        spans = [s for s in otlp_receiver.wait_for(complete, timeout=60) if s["trace_id"] == trace_id]
        by_id = {s["span_id"]: s for s in spans}
        by_name = {s["name"]: s for s in spans}
        root = by_name["POST /v1/jobs"]
        assert root["parent_span_id"] == ""
        for span in spans:
            if span is root:
                continue
            parent = by_id.get(span["parent_span_id"])
            assert parent is not None, f"{span['name']} has a parent that is not in the trace"
            assert parent["start"] <= span["start"], span["name"]
            if span["kind"] != 5:  # a CONSUMER outlives its PRODUCER: messaging is asynchronous
                assert span["end"] <= parent["end"], span["name"]
        producer_span = by_name["apply_async/cadscope.run_job"]
        consumer = by_name["run/cadscope.run_job"]
        assert producer_span["kind"] == 4 and consumer["kind"] == 5  # PRODUCER, CONSUMER
        assert consumer["parent_span_id"] == producer_span["span_id"]  # a parent, not a link
        # The deepest OCCT span hangs off the subprocess span through the child's stage span.
        chain, node = [], by_name["occt.feature"]
        while node["parent_span_id"]:
            chain.append(node["name"])
            node = by_id[node["parent_span_id"]]
        assert chain[:3] == ["occt.feature", "cad.stage generate", f"cad.subprocess {engine}"]
        sub = by_name[f"cad.subprocess {engine}"]
        assert sub["attributes"]["cad.freecad_version"] == engines[engine].freecad_version
        assert sub["attributes"]["cad.occt_version"] == engines[engine].occt_version
        assert consumer["resource"]["service.name"] == "cadscope-worker"

    text = worker.scrape()
    families = set(re.findall(r"^# TYPE (\S+)", text, re.M))
    for name in SEED_003:
        base = name.removesuffix("_total")
        if name == "ai_provider_latency_seconds":
            continue  # no AI flow in this run: the family has no samples yet
        assert name in families or base in families, name
        assert re.search(rf'^{name}\S*{{[^}}]*freecad_version="0\.20\.2"', text, re.M), name
        assert re.search(
            rf'^{name}\S*{{[^}}]*freecad_version="none",occt_version="8\.0\.\d+"', text, re.M
        ) or re.search(rf'^{name}\S*{{[^}}]*occt_version="8\.0\.\d+"', text, re.M), name
    promtool = shutil.which("promtool")
    assert promtool, "promtool is part of the test environment (Debian prometheus)"
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_worker_exporting_over_otlp_http_joins_the_publishers_trace(producer, start_worker, otlp_receiver, engines):
    """As docker-compose.yml deploys it: the worker's spans over OTLP/HTTP (cadscope's encoding), the
    publisher's over gRPC, one trace down to the child's OCCT boolean."""
    worker = start_worker(env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.http_endpoint,
                               "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})  # fmt: skip
    _, trace_id, handle = _submit(producer, {**SMALL, "engine": "ocp"}, worker.queue)
    assert handle.get(timeout=120)["status"] == "succeeded"

    def complete(spans):
        return {"run/cadscope.run_job", "occt.boolean"} <= {s["name"] for s in spans if s["trace_id"] == trace_id}

    spans = [s for s in otlp_receiver.wait_for(complete, timeout=60) if s["trace_id"] == trace_id]
    by_name = {s["name"]: s for s in spans}
    consumer = by_name["run/cadscope.run_job"]
    assert consumer["parent_span_id"] == by_name["apply_async/cadscope.run_job"]["span_id"]
    assert consumer["resource"]["service.name"] == "cadscope-worker"
    assert by_name["occt.boolean"]["resource"]["service.name"] == "cadscope-worker"
    assert "http" in otlp_receiver.transports  # the worker was given no other endpoint


def test_failed_job_is_a_classified_result_and_counted(producer, start_worker, otlp_receiver, engines):
    worker = start_worker(env=_worker_env(otlp_receiver))
    _, trace_id, handle = _submit(producer, {**SMALL, "engine": "freecad", "fault": "raise"}, worker.queue)
    result = handle.get(timeout=120)
    assert result["status"] == "failed" and result["outcome"] == "script_error"
    assert result["error_type"] == "RuntimeError"
    invalid = run_job.apply_async(args=[{"name": "x", "parts": []}], queue=worker.queue).get(timeout=60)
    assert invalid["outcome"] == "rejected" and invalid["errors"][0]["loc"] == "parts"
    text = worker.scrape()
    assert (
        re.search(r'^model_generation_completed_total\{[^}]*status="failure"[^}]*\} 2\.0$', text, re.M)
        or text.count('status="failure"') >= 2
    )
    spans = otlp_receiver.wait_for(
        lambda spans: any(s["trace_id"] == trace_id and s["name"] == "cad.subprocess freecad" for s in spans), 60
    )
    sub = next(s for s in spans if s["trace_id"] == trace_id and s["name"] == "cad.subprocess freecad")
    assert sub["status"] == 2 and sub["attributes"]["error.type"] == "script_error"


def test_max_tasks_per_child_1_loses_no_span(producer, start_worker, otlp_receiver, engines):
    """Upstream loses spans here (contrib #4916): billiard children leave through
    os._exit. We flush in worker_process_shutdown."""
    worker = start_worker("--max-tasks-per-child", "1", env=_worker_env(otlp_receiver))
    jobs = [_submit(producer, {**SMALL, "engine": "ocp" if i % 2 else "freecad"}, worker.queue) for i in range(10)]
    for _job_id, _trace, handle in jobs:
        assert handle.get(timeout=180)["status"] == "succeeded"
    traces = {trace_id for _job, trace_id, _handle in jobs}

    def count(spans, name_prefix):
        return len({s["trace_id"] for s in spans if s["trace_id"] in traces and s["name"].startswith(name_prefix)})

    spans = otlp_receiver.wait_for(
        lambda spans: count(spans, "run/cadscope.run_job") == 10 and count(spans, "cad.subprocess") == 10, 60
    )
    assert count(spans, "occt.boolean") == 10
    pids = {s["attributes"]["process.pid"] for s in spans if s["trace_id"] in traces and s["name"].startswith("run/")}
    assert len(pids) == 10  # each job in a fresh pool child


def test_workload_mix_is_what_the_demo_runs():
    specs = workload(14, ["freecad", "ocp"])
    assert sum(1 for s in specs if s.get("expect_failure")) == 4
    assert {s["engine"] for s in specs} == {"freecad", "ocp"}
