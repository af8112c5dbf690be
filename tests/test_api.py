"""The API with real parts: uvicorn serving ``cadscope api``, a prefork worker,
Redis (shared, or the test's own for outages), freecadcmd, and an OTLP receiver.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import time

import httpx
import pytest

from .conftest import corrupt_metrics_file, wait_until

pytestmark = pytest.mark.slow

SMALL = {
    "name": "small_plate",
    "engine": "freecad",
    "parts": [{"name": "plate", "material": "pla", "steps": [
        {"kind": "box", "name": "b", "length": 20, "width": 10, "height": 2},
        {"kind": "cylinder", "name": "h", "radius": 2, "height": 2, "placement": {"position": [10, 5, 0]}},
        {"kind": "boolean", "name": "d", "operation": "cut", "operands": ["b", "h"]},
        {"kind": "fillet", "name": "f", "target": "d", "radius": 0.5, "edges": "vertical"}]}],
    "exports": [{"format": "brep", "of": "plate", "name": "plate"}, {"format": "step", "of": "plate", "name": "plate"}],
}  # fmt: skip
CANARY = "canary-secret-3f9a1c"


def _otlp(receiver):
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "200", "CADSCOPE_TEST_CANARY": CANARY}  # fmt: skip


def _submit(api, spec=SMALL, headers=None, timeout=30):
    return httpx.post(f"{api.url}/v1/jobs", json=spec, headers={**api.headers(), **(headers or {})}, timeout=timeout)


def _wait_finished(api, job_id, timeout=120):
    def done():
        body = httpx.get(f"{api.url}/v1/jobs/{job_id}", headers=api.headers(), timeout=10).json()
        return body if body.get("state") == "finished" else None

    return wait_until(done, timeout, interval=0.2, what=f"{job_id} finished")


def test_submit_complete_manifest_events_and_artifacts(start_worker, start_api, otlp_receiver, engines):
    worker = start_worker(env=_otlp(otlp_receiver))
    api = start_api(worker)
    response = _submit(api)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    traceparent = response.headers["traceparent"]
    body = _wait_finished(api, job_id)
    assert body["status"] == "succeeded" and body["outcome"] == "ok"
    assert body["engine"]["freecad_version"] == "0.20.2"
    assert [s["stage"] for s in body["stages"]][:1] == ["validate"]
    artifacts = {a["name"]: a for a in body["artifacts"]}
    assert set(artifacts) == {"plate.brep", "plate.step"}

    # SSE: a late subscriber gets every event from the start, in order, and the stream closes.
    with httpx.stream("GET", f"{api.url}/v1/jobs/{job_id}/events", headers=api.headers(), timeout=30) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "job.submitted" and kinds[-1] == "job.finished"
    stages = [e["stage"] for e in events if e["type"] == "stage.finished"]
    assert stages == ["validate", "generate", "export", "validate_export", "engine"]
    assert any(e["type"] == "document" for e in events) and any(e["type"] == "export" for e in events)

    # Artifacts: token required, content matches the manifest.
    url = f"{api.url}/v1/jobs/{job_id}/artifacts/plate.step"
    assert httpx.get(url, timeout=10).status_code == 401
    download = httpx.get(url, headers=api.headers(), timeout=10)
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == artifacts["plate.step"]["sha256"]
    assert httpx.get(f"{api.url}/v1/jobs/{job_id}/artifacts/..%2F..%2Fetc%2Fpasswd", headers=api.headers(),
                     timeout=10).status_code == 404  # fmt: skip

    # One trace from the API's SERVER span to the deepest OCCT span.
    trace_id = traceparent.split("-")[1]

    def complete(spans):
        names = {s["name"] for s in spans if s["trace_id"] == trace_id}
        return "occt.feature" in names and "run/cadscope.run_job" in names and "POST /v1/jobs" in names

    spans = [s for s in otlp_receiver.wait_for(complete, 60) if s["trace_id"] == trace_id]
    by_id = {s["span_id"]: s for s in spans}
    roots = [s for s in spans if not s["parent_span_id"]]
    assert [(r["name"], r["kind"]) for r in roots] == [("POST /v1/jobs", 2)]  # SERVER
    assert all(s["parent_span_id"] in by_id for s in spans if s["parent_span_id"])
    assert roots[0]["resource"]["service.name"] == "cadscope-api"


def test_bad_requests_auth_and_limits(start_worker, start_api, engines):
    api = start_api(start_worker())
    assert httpx.post(f"{api.url}/v1/jobs", json=SMALL, timeout=10).status_code == 401
    wrong = httpx.post(f"{api.url}/v1/jobs", json=SMALL, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json() == {"detail": "unauthorized"}
    bad = _submit(api, {**SMALL, "exports": [{"format": "dwg", "of": "plate", "name": "x"}]})
    assert bad.status_code == 422
    assert any(err["loc"][:2] == ["exports", 0] for err in bad.json()["detail"])
    assert "dwg" not in bad.text  # the input is never echoed back
    huge = _submit(api, {**SMALL, "name": "x", "padding": "y" * (2 << 20)})
    assert huge.status_code == 413
    not_json = httpx.post(f"{api.url}/v1/jobs", content=b"{nope", headers=api.headers(), timeout=10)
    assert not_json.status_code == 422
    assert httpx.get(f"{api.url}/v1/jobs/job-00000000000000000000", timeout=10).status_code == 401
    assert httpx.get(f"{api.url}/v1/jobs/job-00000000000000000000", headers=api.headers(),
                     timeout=10).status_code == 404  # fmt: skip
    metrics = httpx.get(f"{api.url}/metrics", timeout=10).text
    assert 'http_requests_total{method="POST",route="/v1/jobs",status="401"} 2.0' in metrics
    assert 'route="/v1/jobs/{job_id}"' in metrics and "job-0000" not in metrics
    # TelemetrySpansDropped must see the API's first drops: the series are there at 0 from its start.
    for reason in ("queue_full", "export_failed", "shutdown"):
        assert f'cadscope_telemetry_spans_dropped_total{{reason="{reason}"}} 0.0' in metrics, reason


def test_the_api_serves_its_multiprocess_files_through_one_collector(start_worker, start_api, tmp_path):
    """``cadscope api --workers N`` with PROMETHEUS_MULTIPROC_DIR: /metrics sums the server
    processes' files, in a directory wiped at its start. A file no scrape can read costs only
    its own samples, and it is counted and logged once however often the page is scraped,
    as on a worker's page."""
    directory = tmp_path / "api-metrics"
    directory.mkdir()
    (directory / "counter_1.db").write_bytes(b"an earlier run's file")
    api = start_api(start_worker(), env={"PROMETHEUS_MULTIPROC_DIR": str(directory)})
    assert not (directory / "counter_1.db").exists(), "the directory is wiped before the server starts"
    corrupt_metrics_file(directory / f"counter_{os.getpid()}.db")
    assert httpx.post(f"{api.url}/v1/jobs", json=SMALL, timeout=10).status_code == 401
    pages = [httpx.get(f"{api.url}/metrics", timeout=10).text for _ in range(3)]
    assert any(p.name.startswith("counter_") and p.name != f"counter_{os.getpid()}.db" for p in directory.iterdir())
    for page in pages:  # the API's own counts come from its files, beside the one left out
        assert 'http_requests_total{method="POST",route="/v1/jobs",status="401"} 1.0' in page
        assert 'cadscope_telemetry_spans_dropped_total{reason="queue_full"} 0.0' in page
        assert "jobs_total" not in page
    assert 'cadscope_metrics_files_unreadable_total{action="left_out"} 1.0' in pages[-1]
    assert api.log.read_text(errors="replace").count(f"counter_{os.getpid()}.db") == 1


def test_trace_context_from_outside(start_worker, start_api, otlp_receiver, engines):
    worker = start_worker(env=_otlp(otlp_receiver))
    api = start_api(worker)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    valid = _submit(api, headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert valid.status_code == 202 and valid.headers["traceparent"].split("-")[1] == trace_id
    for bad in (f"ff-{trace_id}-00f067aa0ba902b7-01", f"00-{'0' * 32}-00f067aa0ba902b7-01",
                f"00-{trace_id}-{'0' * 16}-01", f"00-{trace_id[:-2]}-00f067aa0ba902b7-01",
                f"00-{trace_id.upper()}-00F067AA0BA902B7-01"):  # fmt: skip
        response = _submit(api, headers={"traceparent": bad})
        assert response.status_code == 202, bad
        assert response.headers["traceparent"].split("-")[1] != trace_id.lower(), bad
    hostile = _submit(api, headers={
        "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01",
        "tracestate": ",".join(f"k{i}=v{i}" for i in range(100)),
        "baggage": ",".join(f"key{i}={'v' * 200}" for i in range(100)),  # ~20 kB
        "user-agent": 'evil\\u000d\\u000a{"level": "critical"}',
    })  # fmt: skip
    assert hostile.status_code == 202
    job_id = hostile.json()["job_id"]
    _wait_finished(api, job_id)
    spans = otlp_receiver.wait_for(
        lambda spans: any(s["attributes"].get("cad.job_id") == job_id and s["name"].startswith("run/") for s in spans),
        60,
    )
    assert any(s["trace_id"] == trace_id and s["name"] == "POST /v1/jobs" for s in spans)
    for line in api.log.read_text().splitlines():
        record = json.loads(line)  # every log line is one JSON object
        assert record["level"] != "critical"
    for span in spans:
        assert not any(key.startswith(("k9", "key9")) for key in span["attributes"])  # baggage is no label


def test_broker_outage_is_a_fast_503_and_nothing_accepted_is_lost(redis_server, start_worker, start_api, engines):
    worker = start_worker(env={"CELERY_BROKER_URL": redis_server.url, "CELERY_RESULT_BACKEND": redis_server.url})
    api = start_api(worker)
    before = _submit(api)
    assert before.status_code == 202
    wait_until(lambda: httpx.get(f"{api.url}/health/ready", timeout=5).status_code == 200, 30, what="ready")
    redis_server.pause()  # a hung broker: the harder case (no refusal, no RST)
    try:
        started = time.monotonic()
        during = _submit(api, timeout=120)
        elapsed = time.monotonic() - started
        assert during.status_code == 503, during.text
        # The API's publish timeout (5 s) answered, not the client's: margin for a loaded machine.
        assert elapsed < 60, f"503 took {elapsed:.1f} s"
        assert "redis://" not in during.text
        ready = httpx.get(f"{api.url}/health/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["checks"]["broker"]["ok"] is False
        assert httpx.get(f"{api.url}/health/live", timeout=5).status_code == 200
    finally:
        redis_server.resume()
    after = wait_until(lambda: (r := _submit(api)).status_code == 202 and r, 60, interval=0.5, what="202 again")
    for job_id in (before.json()["job_id"], after.json()["job_id"]):
        assert _wait_finished(api, job_id, timeout=180)["status"] == "succeeded"


def test_two_hundred_concurrent_submissions(start_worker, start_api, engines):
    api = start_api(start_worker())
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(pool.map(lambda _: _submit(api, timeout=60), range(200)))
    assert [r.status_code for r in responses] == [202] * 200
    job_ids = {r.json()["job_id"] for r in responses}
    assert len(job_ids) == 200
    deadline = time.monotonic() + 600
    pending = set(job_ids)
    while pending and time.monotonic() < deadline:
        for job_id in list(pending):
            if (
                httpx.get(f"{api.url}/v1/jobs/{job_id}", headers=api.headers(), timeout=10).json().get("state")
                == "finished"
            ):
                pending.discard(job_id)
        time.sleep(1)
    assert not pending, f"{len(pending)} jobs never finished"


def test_health_tells_the_truth_and_no_secret(start_worker, start_api, engines):
    worker = start_worker(env={"CADSCOPE_TEST_CANARY": CANARY})
    api = start_api(worker)
    wait_until(lambda: httpx.get(f"{api.url}/health/ready", timeout=5).status_code == 200, 30, what="ready")
    ready = httpx.get(f"{api.url}/health/ready", timeout=5).json()
    assert ready["status"] == "ready" and set(ready["checks"]) == {"broker", "workers", "engines"}
    assert httpx.get(f"{api.url}/health/detailed", timeout=5).status_code == 401
    detailed = httpx.get(f"{api.url}/health/detailed", headers=api.headers(), timeout=5)
    body = detailed.json()
    assert body["score"] == 100
    versions = {(e["engine"], e["freecad_version"], e["occt_version"]) for w in body["workers"] for e in w["engines"]}
    assert ("freecad", "0.20.2", "7.6.3") in versions
    for response in (ready, body, httpx.get(f"{api.url}/health/live", timeout=5).json()):
        text = json.dumps(response)
        assert CANARY not in text and api.token not in text and "redis://" not in text and "Traceback" not in text
