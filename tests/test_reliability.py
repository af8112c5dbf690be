"""Faults with real processes: a killed pool child, a poison job, a pickle on the
queue, a disabled fault, and a metrics directory that stays bounded under churn."""

from __future__ import annotations

import gc
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

from .conftest import corrupt_metrics_file, wait_until
from .test_death import _pool_process_of

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
    """max_tasks_per_child=1 for 150 jobs: a fresh pool process per job, as a recycling fleet does.

    Each process's files of five kinds are allocated ahead (counter, histogram, three gauge modes):
    without compaction 150 processes would leave 750 value files, past both bounds below."""
    worker = start_worker("--max-tasks-per-child", "1")
    directory = Path(worker.env["PROMETHEUS_MULTIPROC_DIR"])

    def value_files() -> list[str]:
        return sorted(name for name in os.listdir(directory) if name.endswith(".db"))

    handles = [run_job.apply_async(args=[TINY], queue=worker.queue) for _ in range(150)]
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
        sizes.append(len(value_files()))
        time.sleep(0.5)
    assert all(h.get(timeout=10)["status"] == "succeeded" for h in handles)
    # The main process and two live pool processes (five files each) plus the accumulators.
    wait_until(lambda: len(value_files()) <= 20, 30, what="a compaction after the last job")
    text = worker.scrape()
    assert _scrape_values(text, r'model_generation_completed_total(?=\{[^}]*status="success")') == 150
    # Between compactions the directory holds the files of the processes that died since the last one.
    assert max(sizes) < 300, f"directory grew to {max(sizes)} files between compactions"
    os.kill(worker.proc.pid, signal.SIGTERM)


def test_a_metric_file_met_before_it_is_sized_fails_no_scrape(client, start_worker, engines):
    """A process between creating its metric file and sizing it (or killed there) leaves 0 bytes;
    upstream's collector then fails every scrape (client_python #1199)."""
    worker = start_worker()
    directory = Path(worker.env["PROMETHEUS_MULTIPROC_DIR"])
    (directory / f"counter_{os.getpid()}.db").touch()  # a live process: stays until it is reaped
    dead = psutil.Popen(["true"])
    dead.wait()
    (directory / f"histogram_{dead.pid}.db").touch()  # killed before sizing it: reaped
    assert run_job.apply_async(args=[TINY], queue=worker.queue).get(timeout=60)["status"] == "succeeded"
    text = worker.scrape()
    assert _scrape_values(text, r'model_generation_completed_total(?=\{[^}]*status="success")') == 1
    # The counters that alert on one event are there at 0 from the start: a series that first
    # appears at 1 has no increase() to Prometheus, and the first event would not alert.
    for series in ('cadscope_metrics_files_unreadable_total{action="left_out"} 0.0',
                   'cadscope_metrics_files_unreadable_total{action="moved_aside"} 0.0',
                   'cadscope_security_violations_total{severity="critical",violation_type="checksum_mismatch"} 0.0',
                   'cadscope_telemetry_spans_dropped_total{reason="queue_full"} 0.0'):  # fmt: skip
        assert series in text.splitlines(), series
    wait_until(lambda: not (directory / f"histogram_{dead.pid}.db").exists(), 30, what="compaction")
    assert (directory / f"counter_{os.getpid()}.db").exists()
    assert "unreadable" not in worker.log_tail()
    worker.scrape()


def test_a_corrupt_metric_file_is_counted_and_costs_only_its_own_samples(client, start_worker, engines):
    """A corrupt file in a real worker's directory: /metrics still answers with every other
    process's samples, and the file is counted (cadscope_metrics_files_unreadable_total, which
    the MetricsFileUnreadable alert reads): left out of scrapes while its process lives, moved
    aside once it is reaped."""
    worker = start_worker()
    directory = Path(worker.env["PROMETHEUS_MULTIPROC_DIR"])
    corrupt_metrics_file(directory / f"counter_{os.getpid()}.db")  # a live process: left out until reaped
    dead = psutil.Popen(["true"])
    dead.wait()
    corrupt_metrics_file(directory / f"counter_{dead.pid}.db")  # reaped: moved aside
    assert run_job.apply_async(args=[TINY], queue=worker.queue).get(timeout=60)["status"] == "succeeded"
    wait_until(lambda: (directory / f"counter_{dead.pid}.db.unreadable").exists(), 30, what="compaction")
    text = worker.scrape()
    assert _scrape_values(text, r'model_generation_completed_total(?=\{[^}]*status="success")') == 1
    assert "jobs_total" not in text
    unreadable = r"cadscope_metrics_files_unreadable_total(?=\{{[^}}]*action=\"{}\")"
    assert _scrape_values(text, unreadable.format("left_out")) >= 1  # the live one, and the dead one if
    assert _scrape_values(text, unreadable.format("moved_aside")) == 1  # a scrape met it before compaction
    assert (directory / f"counter_{os.getpid()}.db").exists()
    worker.scrape()  # the live file is reported once, not at every scrape
    assert worker.log.read_text(errors="replace").count(f"counter_{os.getpid()}.db") == 1


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


class _HangingCollector:
    """A TCP listener that accepts connections and never answers: a collector
    that hangs (gRPC waits for the HTTP/2 handshake until its deadline)."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def _dropped_in_files(metrics_dir: Path) -> dict[str, float]:
    """Read the multiprocess files directly: the worker's HTTP server is gone after exit."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    found: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "cadscope_telemetry_spans_dropped_total":
                found[sample.labels["reason"]] = found.get(sample.labels["reason"], 0) + sample.value
    return found


def test_a_down_or_hanging_collector_costs_counted_spans_never_job_time(client, start_worker, otlp_receiver, engines):
    """Scenario 8. The exporter's deadline is 90 s: a job or a shutdown that
    waited on it would take at least that long (the bounds below leave a loaded
    machine room below it). Latency ratios against a live collector are
    printed, not asserted."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on: a collector that is down
        probe.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{probe.getsockname()[1]}"
    hanging = _HangingCollector()
    otel = {"OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_EXPORTER_OTLP_TIMEOUT": "90",
            "OTEL_BSP_MAX_QUEUE_SIZE": "48", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "8"}  # fmt: skip
    latency: dict[str, list[float]] = {}
    accounted: dict[str, float] = {}
    try:
        for mode, endpoint in (("live", otlp_receiver.endpoint), ("down", down), ("hanging", hanging.endpoint)):
            worker = start_worker(env={**otel, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}, concurrency=1)
            run_job.apply_async(args=[TINY], queue=worker.queue).get(timeout=60)  # warm-up
            for _ in range(6):
                started = time.monotonic()
                assert run_job.apply_async(args=[TINY], queue=worker.queue).get(timeout=60)["status"] == "succeeded"
                latency.setdefault(mode, []).append(time.monotonic() - started)
            queued = _dropped_in_files(Path(worker.env["PROMETHEUS_MULTIPROC_DIR"]))
            stopping = time.monotonic()
            assert worker.stop(signal.SIGTERM, timeout=60) == 0
            shutdown_s = time.monotonic() - stopping
            dropped = _dropped_in_files(Path(worker.env["PROMETHEUS_MULTIPROC_DIR"]))
            print(f"{mode}: median job {sorted(latency[mode])[3]:.3f} s, shutdown {shutdown_s:.1f} s, "
                  f"dropped {dropped}")  # fmt: skip
            # The pool child's flush is bounded at 5 s; the exporter's deadline is 90 s.
            assert shutdown_s < 60, f"{mode}: shutdown took {shutdown_s:.1f} s"
            assert max(latency[mode]) < 60, f"{mode}: a job waited on the exporter: {latency[mode]}"
            if mode == "live":
                assert sum(dropped.values()) == 0, dropped
            else:
                # 7 jobs' spans, a queue of 48: the rest were dropped and counted while jobs ran ...
                assert queued.get("queue_full", 0) > 0, queued
                # ... and what was still queued at exit is counted too, not silently lost.
                assert dropped.get("shutdown", 0) + dropped.get("export_failed", 0) > 0, dropped
                accounted[mode] = sum(dropped.values())
    finally:
        hanging.close()
    # Nothing was exported in either case, so every span of the same 7 jobs is in a counter.
    assert accounted["down"] == accounted["hanging"], accounted
    live = sorted(latency["live"])[3]
    print("job latency ratio vs live collector:",
          {m: round(sorted(v)[3] / live, 3) for m, v in latency.items()})  # fmt: skip


def test_celery_hard_time_limit_takes_the_cad_process_group_with_the_pool_child(client, start_worker, engines):
    """Scenario 5, hard limit: the pool process ignores the soft limit (as if
    stuck in C code), so billiard kills it at the hard limit (4 s for this one
    call, far below the runner's own timeout); the hung CAD process, which has
    PR_SET_PDEATHSIG, goes with it, and the worker carries on."""
    worker = start_worker(concurrency=1)
    hung = {**TINY, "fault": "hang_unresponsive"}
    started = time.monotonic()
    handle = run_job.apply_async(args=[hung], queue=worker.queue, soft_time_limit=2, time_limit=4)
    cad = wait_until(lambda: _cad_processes(worker), 60, what="the CAD process")[0]
    pool_child = _pool_process_of(worker, cad)
    with pytest.raises(Exception) as failed:  # noqa: PT011 - the worker's TimeLimitExceeded, re-raised
        handle.get(timeout=60)
    assert type(failed.value).__name__ == "TimeLimitExceeded", repr(failed.value)
    assert time.monotonic() - started < 60, "the hard limit, not the job's 120 s timeout, ended the job"
    wait_until(lambda: not pool_child.is_running() or pool_child.status() == psutil.STATUS_ZOMBIE, 10,
               what="pool child gone")  # fmt: skip
    wait_until(lambda: not cad.is_running() or cad.status() == psutil.STATUS_ZOMBIE, 30, what="CAD process gone")
    assert "Hard time limit (4s) exceeded" in worker.log.read_text()
    assert run_job.apply_async(args=[TINY], queue=worker.queue).get(timeout=60)["status"] == "succeeded"


def test_broker_stopped_and_restarted_mid_job_loses_no_accepted_job(redis_server, start_worker, engines):
    """Scenario 9, stop/start (the SIGSTOP case is in test_api.py): the test's
    own redis-server (append-only file on) goes away while one job runs and
    another waits, and comes back on the same port. The worker reconnects by
    itself; both jobs complete. A message the worker had reserved on the lost
    connection comes back through Redis's visibility timeout (here 25 s):
    at-least-once, so a job may run twice, never zero times."""
    from celery import Celery

    limits = {"CADSCOPE_TASK_TIME_LIMIT": "20", "CADSCOPE_TASK_SOFT_TIME_LIMIT": "15",
              "CADSCOPE_VISIBILITY_TIMEOUT": "25"}  # fmt: skip
    broker = {"CELERY_BROKER_URL": redis_server.url, "CELERY_RESULT_BACKEND": redis_server.url}
    worker = start_worker(env={**broker, **limits}, concurrency=1)
    client = configure_app(Celery("producer", set_as_current=False), redis_server.url)
    client.conf.broker_transport_options = {**client.conf.broker_transport_options, "visibility_timeout": 25}
    task = client.signature("cadscope.run_job")
    running = task.apply_async(args=[{**PLATE, "engine": "freecad"}], queue=worker.queue)
    waiting = task.apply_async(args=[TINY], queue=worker.queue)
    wait_until(lambda: _cad_processes(worker), 60, what="the first job running")
    redis_server.stop()
    time.sleep(2)
    assert worker.proc.poll() is None, "the worker must survive a broker outage"
    redis_server.start()
    # The producer's own result connection died with the server: read the results through a new one.
    # Its two handles stay subscribed on the dead connection; they go now, while the server is up,
    # not in whichever later test the garbage collector frees them (their __del__ unsubscribes,
    # and against a stopped server that raises "Retry limit exceeded" into that test).
    ids = [running.id, waiting.id]
    del running, waiting
    gc.collect()
    reader = configure_app(Celery("reader", set_as_current=False), redis_server.url)
    results = [reader.AsyncResult(task_id).get(timeout=150) for task_id in ids]
    assert [r["status"] for r in results] == ["succeeded", "succeeded"]
    assert worker.proc.poll() is None
