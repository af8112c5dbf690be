"""cadscope inside someone else's OpenTelemetry set-up, with real prefork workers and real FreeCAD jobs.

- A user's own ``TracerProvider`` (with a span processor of the user's and resource attributes
  of the user's) installed before cadscope starts: it stays the provider, and sees every span of
  every job, the task span, the stages, the subprocess and the CAD child's spans, on start and end.
- A worker started under ``opentelemetry-instrument`` (with opentelemetry-distro exporting over
  OTLP to a real receiver): one consumer span per task run, each span exported once, with the
  distro's resource.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections import Counter
from pathlib import Path

import pytest

from cadscope.workers import app, configure_app, run_job
from cadscope.workers._workload import PLATE

from .conftest import REPO, free_port, wait_until

pytestmark = pytest.mark.slow

USERS_APP = textwrap.dedent(
    """
    import json, os
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    RECORD = os.environ["USER_RECORD_DIR"]

    class Recording(SpanProcessor):
        def on_start(self, span, parent_context=None):
            self._write("start", span)

        def on_end(self, span):
            self._write("end", span)

        def _write(self, what, span):
            with open(os.path.join(RECORD, f"{os.getpid()}.jsonl"), "a") as out:
                out.write(json.dumps({"e": what, "id": format(span.context.span_id, "016x"), "n": span.name,
                                      "service": span.resource.attributes.get("service.name"),
                                      "team": span.resource.attributes.get("team")}) + "\\n")

    provider = TracerProvider(resource=Resource.create({"service.name": "users-cad-fleet", "team": "cad"}))
    provider.add_span_processor(Recording())
    trace.set_tracer_provider(provider)

    from cadscope.workers import app  # noqa: E402  the user's worker module, importing cadscope's app
    """
)


def _worker(argv_prefix: list[str], app_path: str, queue: str, data: Path, env: dict[str, str]):  # type: ignore[no-untyped-def]
    ready = data / "ready"
    full_env = {
        **os.environ,
        "CADSCOPE_DATA_DIR": str(data),
        "PROMETHEUS_MULTIPROC_DIR": str(data / "metrics"),
        "CADSCOPE_METRICS_PORT": str(free_port()),
        "CADSCOPE_READY_FILE": str(ready),
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        **env,
    }
    log = data / "worker.log"
    proc = subprocess.Popen(
        [*argv_prefix, "celery", "-A", app_path, "worker", "--pool", "prefork", "--concurrency", "2", "-Q", queue,
         "-n", f"{queue}@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=full_env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    wait_until(lambda: ready.exists() or proc.poll() is not None, 90, what="worker ready")
    assert proc.poll() is None, log.read_text()[-3000:]
    return proc, log


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _run_jobs(redis_url: str, queue: str, count: int) -> list[dict]:  # type: ignore[type-arg]
    configure_app(app, redis_url)
    handles = [
        run_job.apply_async(args=[{**PLATE, "engine": "freecad"}], queue=queue, task_id=f"job-{uuid.uuid4().hex[:10]}")
        for _ in range(count)
    ]
    return [handle.get(timeout=180) for handle in handles]


def test_a_users_provider_is_kept_and_its_processor_sees_every_span_of_every_job(tmp_path, redis_url, engines):
    records = tmp_path / "records"
    records.mkdir()
    (tmp_path / "users_celery_app.py").write_text(USERS_APP)
    traces = tmp_path / "traces.jsonl"
    queue = f"test-{uuid.uuid4().hex[:8]}"
    data = tmp_path / "data"
    data.mkdir()
    env = {
        "USER_RECORD_DIR": str(records),
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "CELERY_BROKER_URL": redis_url,
        "CELERY_RESULT_BACKEND": redis_url,
        "CADSCOPE_TRACES_FILE": str(traces),  # cadscope's own exporter, added to the user's provider
    }
    proc, log = _worker([sys.executable, "-m"], "users_celery_app.app", queue, data, env)
    try:
        results = _run_jobs(redis_url, queue, 2)
    finally:
        _stop(proc)  # pool processes flush on their way out
    assert [r["status"] for r in results] == ["succeeded", "succeeded"], log.read_text()[-3000:]

    events = [json.loads(line) for path in records.glob("*.jsonl") for line in path.read_text().splitlines()]
    starts = Counter(e["id"] for e in events if e["e"] == "start")
    ends = Counter(e["id"] for e in events if e["e"] == "end")
    names = {e["n"] for e in events}
    # Every span of the jobs, cadscope's and upstream's and the CAD child's, started and ended once each.
    assert starts == ends and set(starts.values()) == {1}
    for expected in ("run/cadscope.run_job", "cad.flow parametric", "cad.stage engine", "cad.subprocess freecad",
                     "occt.boolean", "occt.feature", "export"):  # fmt: skip
        assert expected in names, sorted(names)
    # All on the user's provider: the user's resource on every span.
    assert {(e["service"], e["team"]) for e in events} == {("users-cad-fleet", "cad")}
    # cadscope's exporter on the user's provider exported those spans, once each.
    exported = Counter(
        span["spanId"]
        for line in traces.read_text().splitlines()
        for resource in json.loads(line)["resourceSpans"]
        for scope in resource["scopeSpans"]
        for span in scope["spans"]
    )
    assert set(exported) == set(starts) and set(exported.values()) == {1}


def test_under_opentelemetry_instrument_each_task_run_has_one_consumer_span(
    tmp_path, redis_url, otlp_receiver, engines
):
    queue = f"test-{uuid.uuid4().hex[:8]}"
    data = tmp_path / "data"
    data.mkdir()
    env = {
        "CELERY_BROKER_URL": redis_url,
        "CELERY_RESULT_BACKEND": redis_url,
        "OTEL_SERVICE_NAME": "distro-worker",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "PYTHONPATH": str(REPO),
    }
    instrument = str(Path(sys.executable).parent / "opentelemetry-instrument")
    proc, log = _worker([instrument, sys.executable, "-m"], "cadscope.workers.app", queue, data, env)
    try:
        results = _run_jobs(redis_url, queue, 2)
    finally:
        _stop(proc)
    assert [r["status"] for r in results] == ["succeeded", "succeeded"], log.read_text()[-3000:]
    job_traces = {r["trace_id"] for r in results}
    spans = otlp_receiver.wait_for(
        lambda spans: sum(s["name"] == "cad.stage collect" and s["trace_id"] in job_traces for s in spans) == 2, 60
    )
    ours = [s for s in spans if s["trace_id"] in job_traces]
    consumers = Counter(s["trace_id"] for s in ours if s["name"] == "run/cadscope.run_job")
    assert consumers == Counter({trace_id: 1 for trace_id in job_traces})
    assert max(Counter(s["span_id"] for s in ours).values()) == 1  # no span exported twice
    worker_side = [s for s in ours if not s["name"].startswith("apply_async/")]  # this test process publishes
    assert {s["resource"].get("service.name") for s in worker_side} == {"distro-worker"}
