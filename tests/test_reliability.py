"""Faults with real processes: a killed pool child, a poison job, a pickle on the
queue, a disabled fault, and a metrics directory that stays bounded under churn."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import time
import uuid
from pathlib import Path

import psutil
import pytest

from cadscope.workers import app, configure_app, run_job
from cadscope.workers._workload import ASSEMBLY, PLATE

from .conftest import wait_until

pytestmark = pytest.mark.slow

TINY = {
    "name": "tiny", "engine": "freecad",
    "parts": [{"name": "p", "steps": [{"kind": "box", "name": "b", "length": 5, "width": 5, "height": 5}]}],
    "exports": [{"format": "brep", "of": "p", "name": "p", "validate_determinism": False}],
}  # fmt: skip


@pytest.fixture
def client(redis_url):
    configure_app(app, redis_url)
    return app


def _cad_processes(worker, marker: str = "freecadcmd") -> list[psutil.Process]:
    found = []
    for process in psutil.Process(worker.proc.pid).children(recursive=True):
        try:
            if marker in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def _scrape_values(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))


def test_pool_child_killed_mid_job_runs_again_once_and_the_lost_attempt_shows(
    producer, start_worker, otlp_receiver, engines
):
    worker = start_worker(env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint,
                               "OTEL_EXPORTER_OTLP_INSECURE": "true"})  # fmt: skip
    job_id = f"job-killed-{uuid.uuid4().hex[:8]}"
    with producer.start_as_current_span("POST /v1/jobs") as root:
        handle = run_job.apply_async(args=[{**ASSEMBLY, "engine": "freecad"}], kwargs={"job_id": job_id},
                                     task_id=job_id, queue=worker.queue)  # fmt: skip
    trace_id = format(root.get_span_context().trace_id, "032x")
    cad = wait_until(lambda: _cad_processes(worker), 60, what="the CAD process")[0]
    pool_child = cad.parent()
    pool_child.kill()  # SIGKILL: no shutdown hook runs, the consumer span never ends
    wait_until(lambda: not cad.is_running() or cad.status() == psutil.STATUS_ZOMBIE, 2, what="CAD process gone")
    result = handle.get(timeout=180)
    assert result["status"] == "succeeded"
    text = worker.scrape()
    assert _scrape_values(text, "cadscope_task_attempts_lost_total") == 1
    assert _scrape_values(text, r'model_generation_completed_total(?=\{[^}]*status="success")') >= 1
    # Both attempts in the producer's trace: the lost one as an ERROR span, the second one complete.
    spans = otlp_receiver.wait_for(
        lambda spans: (
            any(s["trace_id"] == trace_id and s["name"] == "cad.stage validate_export" for s in spans)
            and any(s["trace_id"] == trace_id and s["name"].startswith("lost attempt 1/") for s in spans)
        ),
        60,
    )
    mine = [s for s in spans if s["trace_id"] == trace_id]
    lost = next(s for s in mine if s["name"].startswith("lost attempt 1/"))
    assert lost["status"] == 2 and lost["attributes"]["error.type"] == "worker_lost"
    consumers = [s for s in mine if s["name"] == "run/cadscope.run_job"]
    assert len(consumers) == 1 and consumers[0]["attributes"]["cad.attempt"] == 2


def test_poison_job_is_dead_lettered_after_max_deliveries(client, start_worker, engines):
    worker = start_worker(env={"CADSCOPE_MAX_DELIVERIES": "2"})
    job_id = f"job-poison-{uuid.uuid4().hex[:8]}"
    handle = run_job.apply_async(args=[{**TINY, "fault": "kill_worker"}], kwargs={"job_id": job_id}, task_id=job_id,
                                 queue=worker.queue)  # fmt: skip
    result = handle.get(timeout=120)
    assert result["outcome"] == "dead_letter" and result["status"] == "failed"
    text = worker.scrape()
    assert _scrape_values(text, "cadscope_task_attempts_lost_total") == 2
    assert _scrape_values(text, r'cadscope_task_outcomes_total(?=\{[^}]*outcome="dead_letter")') == 1
    # No hot loop: the job is not delivered again.
    time.sleep(2)
    assert _scrape_values(worker.scrape(), r'cadscope_task_outcomes_total(?=\{[^}]*outcome="dead_letter")') == 1


def test_fault_injection_is_refused_unless_enabled(client, start_worker, engines):
    worker = start_worker(env={"CADSCOPE_ALLOW_FAULTS": "0"})
    result = run_job.apply_async(args=[{**TINY, "fault": "segfault"}], queue=worker.queue).get(timeout=60)
    assert result["outcome"] == "rejected" and result["error_type"] == "faults_disabled"


class _Exploit:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # unpickling would create the file
        return (open, (self.path, "w"))


def test_a_pickled_message_is_rejected_and_nothing_runs(client, start_worker, tmp_path, engines):
    worker = start_worker()
    marker = tmp_path / "pwned"
    client.send_task("cadscope.run_job", args=[_Exploit(str(marker))], queue=worker.queue, serializer="pickle")
    pickle.dumps(_Exploit(str(marker)))  # the payload is real: this would work if unpickled
    wait_until(lambda: "ContentDisallowed" in worker.log_tail() or "disallowed" in worker.log_tail().lower(), 30,
               what="the worker refusing the message")  # fmt: skip
    assert not marker.exists()
    ok = run_job.apply_async(args=[TINY], queue=worker.queue).get(timeout=60)
    assert ok["status"] == "succeeded"  # the worker is still serving


def test_metrics_directory_stays_bounded_and_counters_never_drop(client, start_worker, engines):
    """max_tasks_per_child=1 for 300 jobs: a fresh pool child per job, as a recycling fleet does."""
    worker = start_worker("--max-tasks-per-child", "1")
    handles = [run_job.apply_async(args=[TINY], queue=worker.queue) for _ in range(300)]
    previous: dict[str, float] = {}
    sizes = []
    while not all(h.ready() for h in handles):
        text = worker.scrape()
        current = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                   for line in text.splitlines() if line.startswith(("model_generation_", "cadscope_task_outcomes"))
                   and "_created" not in line and "active_flows" not in line}  # fmt: skip
        for series, value in previous.items():
            assert current.get(series, 0) >= value, f"{series} went from {value} to {current.get(series)}"
        previous = current
        sizes.append(len(os.listdir(Path(worker.env["PROMETHEUS_MULTIPROC_DIR"]))))
        time.sleep(0.5)
    assert all(h.get(timeout=10)["status"] == "succeeded" for h in handles)
    time.sleep(6)  # one more compaction period
    text = worker.scrape()
    assert _scrape_values(text, r'model_generation_completed_total(?=\{[^}]*status="success")') == 300
    files = os.listdir(Path(worker.env["PROMETHEUS_MULTIPROC_DIR"]))
    # Two live pool children (a few files each) plus the accumulators; 300 children's files without compaction.
    assert len(files) <= 16, sorted(files)
    assert max(sizes) < 60, f"directory grew to {max(sizes)} files between compactions"
    os.kill(worker.proc.pid, signal.SIGTERM)


def test_worker_sigkilled_leaves_no_cad_process_and_another_worker_takes_the_job(client, start_worker, engines):
    # The runner's own timeout is the soft limit minus 5 s: leave the job room under a loaded machine.
    limits = {"CADSCOPE_TASK_TIME_LIMIT": "20", "CADSCOPE_TASK_SOFT_TIME_LIMIT": "15",
              "CADSCOPE_VISIBILITY_TIMEOUT": "21"}  # fmt: skip
    first = start_worker(env=limits, concurrency=1)
    job_id = f"job-orphan-{uuid.uuid4().hex[:8]}"
    handle = run_job.apply_async(args=[{**PLATE, "engine": "ocp"}], kwargs={"job_id": job_id}, task_id=job_id,
                                 queue=first.queue)  # fmt: skip
    cad = wait_until(lambda: _cad_processes(first, "engine_ocp"), 60, what="the CAD process")[0]
    first.proc.kill()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and cad.is_running() and cad.status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.02)
    assert not cad.is_running() or cad.status() == psutil.STATUS_ZOMBIE, "the CAD process outlived its worker"
    # Another worker on the same queue gets the unacknowledged job once the visibility timeout has passed
    # (kombu restores such messages when a consumer starts, and periodically after that).
    time.sleep(int(limits["CADSCOPE_VISIBILITY_TIMEOUT"]) + 1)
    start_worker(env=limits, concurrency=1, queue=first.queue)
    result = handle.get(timeout=120)
    assert result["status"] == "succeeded" and result["job_id"] == job_id


def test_warm_shutdown_finishes_the_job_and_exports_its_spans(producer, start_worker, otlp_receiver, engines):
    worker = start_worker(env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint,
                               "OTEL_EXPORTER_OTLP_INSECURE": "true"}, concurrency=1)  # fmt: skip
    job_id = f"job-sigterm-{uuid.uuid4().hex[:8]}"
    with producer.start_as_current_span("POST /v1/jobs") as root:
        handle = run_job.apply_async(args=[{**ASSEMBLY, "engine": "freecad"}], kwargs={"job_id": job_id},
                                     task_id=job_id, queue=worker.queue)  # fmt: skip
    wait_until(lambda: _cad_processes(worker), 60, what="the CAD process")
    worker.proc.send_signal(signal.SIGTERM)
    assert handle.get(timeout=120)["status"] == "succeeded"
    assert worker.proc.wait(60) == 0
    trace_id = format(root.get_span_context().trace_id, "032x")
    spans = otlp_receiver.wait_for(
        lambda s: any(x["trace_id"] == trace_id and x["name"] == "run/cadscope.run_job" for x in s), 30
    )
    assert any(s["trace_id"] == trace_id and s["name"] == "cad.stage validate_export" for s in spans)
    import redis as redis_lib

    broker = redis_lib.Redis.from_url(worker.env["CELERY_BROKER_URL"])
    assert not any(job_id.encode() in value for value in broker.hvals("unacked")), "left unacknowledged"


def test_hostile_trace_context_in_task_headers_never_breaks_a_job(client, start_worker, engines):
    worker = start_worker()
    hostile = [
        {"traceparent": "00-" + "f" * 32 + "-" + "0" * 16 + "-01"},
        {"traceparent": "zz" * 100, "tracestate": ",".join(f"k{i}=v" for i in range(200))},
        {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nX-Evil: 1"},
        {"baggage": "k=" + "v" * 20_000},
    ]
    handles = [run_job.apply_async(args=[TINY], queue=worker.queue, headers=h) for h in hostile]
    assert [h.get(timeout=60)["status"] for h in handles] == ["succeeded"] * len(hostile)
    for line in worker.log.read_text().splitlines():
        if "X-Evil" in line:
            json.loads(line)  # an echoed header stays inside one JSON record; it never starts a line


def test_a_canary_secret_reaches_no_log_span_or_metric(producer, start_worker, otlp_receiver, engines):
    canary = f"canary-{uuid.uuid4().hex}"
    worker = start_worker(env={"CADSCOPE_TEST_CANARY": canary, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint,
                               "OTEL_EXPORTER_OTLP_INSECURE": "true"})  # fmt: skip
    with producer.start_as_current_span("POST /v1/jobs") as root:
        result = run_job.apply_async(args=[TINY], queue=worker.queue).get(timeout=60)
    assert result["status"] == "succeeded"
    trace_id = format(root.get_span_context().trace_id, "032x")
    spans = otlp_receiver.wait_for(
        lambda s: any(x["trace_id"] == trace_id and x["name"].startswith("cad.subprocess") for x in s), 30
    )
    assert canary not in json.dumps([s for s in spans if s["trace_id"] == trace_id])
    assert canary not in worker.scrape()
    assert canary not in worker.log.read_text()
    stderr = Path(result["out_dir"]) / ".cadscope" / "stderr.log"
    assert canary not in stderr.read_text(errors="replace")
    sub = next(s for s in spans if s["trace_id"] == trace_id and s["name"].startswith("cad.subprocess"))
    assert "process.command_args" not in sub["attributes"]  # argv is not recorded unless asked for
    assert worker.metrics_url.startswith("http://127.0.0.1:")  # /metrics binds to loopback by default
