"""The API and the worker under the faults a fleet meets: a Redis that drops its clients or
restarts, a broker that stalls mid-publish, a crowd of event-stream followers, hostile
bodies. Real parts: ``cadscope api`` processes, a prefork worker, a redis-server of the
test's own (stopped, restarted, SIGSTOPped by pid).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import psutil
import pytest
import redis

from cadscope.api._app import job_id_for
from cadscope.workers._progress import FileStore, ProgressService, claim_run

from .conftest import wait_until

SMALL = {
    "name": "small_plate",
    "engine": "freecad",
    "parts": [{"name": "plate", "steps": [
        {"kind": "box", "name": "b", "length": 20, "width": 10, "height": 2},
        {"kind": "cylinder", "name": "h", "radius": 2, "height": 2, "placement": {"position": [10, 5, 0]}},
        {"kind": "boolean", "name": "d", "operation": "cut", "operands": ["b", "h"]}]}],
    "exports": [{"format": "step", "of": "plate", "name": "plate"}],
}  # fmt: skip


def _no_worker(broker_url: str, data: Path, **env: str) -> SimpleNamespace:
    """What ``start_api`` needs of a worker, for an API whose queue nobody consumes."""
    data.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(
        queue=f"test-{uuid.uuid4().hex[:8]}",
        env={**os.environ, "CELERY_BROKER_URL": broker_url, "CELERY_RESULT_BACKEND": broker_url,
             "CADSCOPE_DATA_DIR": str(data), **env},
    )  # fmt: skip


def _submit(api, spec=SMALL, headers=None, timeout=30):  # type: ignore[no-untyped-def]
    return httpx.post(f"{api.url}/v1/jobs", json=spec, headers={**api.headers(), **(headers or {})}, timeout=timeout)


def _status(api, job_id):  # type: ignore[no-untyped-def]
    return httpx.get(f"{api.url}/v1/jobs/{job_id}", headers=api.headers(), timeout=10)


def _events(api, job_id):  # type: ignore[no-untyped-def]
    with httpx.stream("GET", f"{api.url}/v1/jobs/{job_id}/events", headers=api.headers(), timeout=60) as stream:
        return [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]


# -- Redis drops the API's connections ------------------------------------------------------------


@pytest.mark.slow
def test_the_api_outlives_redis_closing_its_connections_and_restarting(redis_server, start_api, tmp_path):
    """An idle timeout (or a proxy) closes every client connection, then Redis restarts: the
    API, which once died of SIGPIPE at its next write, answers and reconnects by itself."""
    api = start_api(_no_worker(redis_server.url, tmp_path / "data"))
    first = _submit(api)
    assert first.status_code == 202, first.text
    job_id = first.json()["job_id"]

    admin = redis.Redis(port=redis_server.port)
    killed = admin.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1, "the API's connections were open"
    answers = [_submit(api).status_code for _ in range(3)]
    assert api.proc.poll() is None, f"the API died ({api.proc.returncode}):\n{api.log.read_text()[-2000:]}"
    assert answers[-1] == 202, answers  # a refused first write at most, then a fresh connection
    assert _status(api, job_id).json()["state"] == "queued"

    redis_server.stop()
    down = _submit(api, timeout=30)
    assert down.status_code == 503 and api.proc.poll() is None
    redis_server.start()
    after = wait_until(lambda: (r := _submit(api)).status_code == 202 and r, 60, interval=0.5, what="202 again")
    assert api.proc.poll() is None
    assert _status(api, after.json()["job_id"]).json()["state"] == "queued"
    assert [e["type"] for e in _events_now(api, job_id)] == ["job.submitted"]


def _events_now(api, job_id):  # type: ignore[no-untyped-def]
    """The events so far of a job that is not going to finish: read until the stream goes quiet."""
    sock = _open_stream(api, job_id)[0]
    sock.settimeout(2)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    finally:
        sock.close()
    return [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: ")]


# -- a publish in doubt, retried: one job, run once ----------------------------------------------


@pytest.mark.slow
def test_a_retry_after_an_in_doubt_503_is_the_same_job_and_runs_once(
    redis_server, redis_url, start_worker, start_api, engines
):  # fmt: skip
    """The broker stalls (SIGSTOP) past the publish timeout: the API answers 503, but its push
    is already in the socket and Redis runs it when it resumes. The client retries with the
    same Idempotency-Key: it gets the same job id, the worker receives both copies and runs
    the job once; the other copy is dropped and counted. (The progress store, which keeps
    the submission records and run leases, is another Redis here, so that the stall hits
    the publish itself: with one Redis for both, the API finds the store stalled first and
    answers 503 before publishing anything.)"""
    broker = {"CELERY_BROKER_URL": redis_server.url, "CELERY_RESULT_BACKEND": redis_server.url,
              "CADSCOPE_PROGRESS_URL": redis_url}  # fmt: skip
    worker = start_worker(env=broker)
    api = start_api(worker)
    warm = _submit(api)  # the API's broker connection is warm: the next publish is a single push
    assert warm.status_code == 202

    key = f"client-{uuid.uuid4()}"
    redis_server.pause()
    try:
        doubt = _submit(api, headers={"Idempotency-Key": key})
    finally:
        redis_server.resume()
    assert doubt.status_code == 503, doubt.text
    detail = doubt.json()["detail"]
    assert detail["job_id"] == job_id_for(key) and detail["idempotency_key"] == key
    assert "may still be enqueued" in detail["msg"] and "redis://" not in doubt.text

    retry = wait_until(lambda: (r := _submit(api, headers={"Idempotency-Key": key})).status_code == 202 and r,
                       60, interval=0.5, what="the retry accepted")  # fmt: skip
    job_id = retry.json()["job_id"]
    assert job_id == detail["job_id"] and retry.headers["idempotency-key"] == key

    events = _events(api, job_id)
    assert _status(api, job_id).json()["status"] == "succeeded"

    def dropped() -> float:
        prefix = "cadscope_task_duplicates_dropped_total{"
        return sum(float(line.rsplit(" ", 1)[1]) for line in worker.scrape().splitlines() if line.startswith(prefix))

    wait_until(lambda: dropped() >= 1, 120, interval=0.5, what="the second copy delivered and dropped")
    assert dropped() == 1
    events = _events(api, job_id)  # after the twin: still one run
    assert [e["type"] for e in events].count("job.finished") == 1
    assert sum(1 for e in events if e["type"] == "stage.started" and e.get("stage") == "engine") == 1
    finished = _status(api, job_id).json()
    assert finished["status"] == "succeeded" and finished["artifacts"], finished  # the twin left the result alone

    # A later retry is answered from the record: same body, nothing published.
    again = _submit(api, headers={"Idempotency-Key": key})
    assert again.status_code == 202 and again.json() == retry.json()
    conflict = _submit(api, {**SMALL, "name": "another"}, headers={"Idempotency-Key": key})
    assert conflict.status_code == 409 and conflict.json()["detail"]["job_id"] == job_id
    assert _submit(api, headers={"Idempotency-Key": "two words"}).status_code == 422


def test_a_delivery_is_dropped_only_while_its_holder_lives_or_after_the_job_finished(tmp_path):
    """The run lease with real processes as holders (the embedded broker's store): a twin of
    a live holder is dropped, a dead holder's lease is taken over, the same message
    redelivered is never dropped, and a finished job returns its earlier result."""
    from celery.exceptions import Ignore

    service = ProgressService(FileStore(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # noqa: S603
    try:
        lease = {"publish": "1.5", "host": socket.gethostname(), "pid": holder.pid,
                 "born": psutil.Process(holder.pid).create_time()}  # fmt: skip
        assert service.store.begin_run("job-a", json.dumps(lease), 600) == ("run", "")
        with pytest.raises(Ignore):
            claim_run(service, "job-a", "2.5", 600)  # a twin (another publish) while the holder runs
        assert claim_run(service, "job-a", "1.5", 600) is None  # its own message again: the holder is gone
    finally:
        holder.kill()
        holder.wait()
    other = subprocess.Popen([sys.executable, "-c", "pass"])  # noqa: S603
    other.wait()
    lease = {"publish": "1.5", "host": socket.gethostname(), "pid": other.pid, "born": 0.0}
    assert service.store.begin_run("job-b", json.dumps(lease), 600) == ("run", "")
    assert claim_run(service, "job-b", "2.5", 600) is None  # a dead holder's lease is taken over
    service.finish("job-b", result={"job_id": "job-b", "status": "succeeded", "artifacts": ["x"]}, status="succeeded")
    assert claim_run(service, "job-b", "3.5", 600) == {"job_id": "job-b", "status": "succeeded", "artifacts": ["x"]}
    assert claim_run(service, "job-c", None, 600) is None  # a job never seen runs


# -- event streams, bodies: one API process for several checks ----------------------------------


@pytest.fixture(scope="module")
def lone_api(redis_url, tmp_path_factory):  # type: ignore[no-untyped-def]
    """``cadscope api`` whose queue no worker consumes: jobs stay queued, streams stay open."""
    tmp = tmp_path_factory.mktemp("lone-api")
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    target = _no_worker(redis_url, tmp / "data", CADSCOPE_API_MAX_STREAMS="50", CADSCOPE_API_TOKEN=uuid.uuid4().hex,
                        CADSCOPE_QUEUE=f"test-{uuid.uuid4().hex[:8]}")  # fmt: skip
    log = tmp / "api.log"
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "cadscope.workers.cli", "api", "--port", str(number)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=target.env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    api = SimpleNamespace(proc=proc, url=f"http://127.0.0.1:{number}", port=number, log=log,
                          token=target.env["CADSCOPE_API_TOKEN"])  # fmt: skip
    api.headers = lambda: {"Authorization": f"Bearer {api.token}"}

    def up() -> bool:
        try:
            return httpx.get(f"{api.url}/health/live", timeout=1).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None

    wait_until(up, 60, what="api up")
    assert proc.poll() is None, log.read_text()
    yield api
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _open_stream(api, job_id, token=True):  # type: ignore[no-untyped-def]
    sock = socket.create_connection(("127.0.0.1", int(api.url.rsplit(":", 1)[1])), timeout=10)
    auth = f"Authorization: Bearer {api.token}\r\n" if token else ""
    sock.sendall(f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: api\r\n{auth}\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, int(head.split()[1]), head


def _nested(depth: int) -> list:  # type: ignore[type-arg]
    value: list = []  # type: ignore[type-arg]
    for _ in range(depth):
        value = [value]
    return value


def _gauge(api, name):  # type: ignore[no-untyped-def]
    for line in httpx.get(f"{api.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


@pytest.mark.slow
def test_event_streams_are_capped_private_and_never_starve_the_api(lone_api):
    api = lone_api
    job_id = _submit(api).json()["job_id"]
    assert _open_stream(api, job_id, token=False)[1] == 401
    assert httpx.get(f"{api.url}/v1/jobs/{job_id}", timeout=10).status_code == 401
    streams = []
    try:
        for _ in range(50):  # more followers than the server has threads (40)
            sock, status, head = _open_stream(api, job_id)
            streams.append(sock)
            assert status == 200, head
        sock, status, head = _open_stream(api, job_id)
        streams.append(sock)
        assert status == 503 and b"retry-after" in head.lower(), head
        # Every other route still answers while the streams are open.
        assert _submit(api, timeout=10).status_code == 202
        assert _status(api, job_id).status_code == 200
        assert _gauge(api, "cadscope_api_event_streams") == 50
        assert httpx.get(f"{api.url}/health/live", timeout=10).status_code == 200
    finally:
        for sock in streams:
            sock.close()
    # The followers left: their slots come back within seconds, and the API serves new ones.
    wait_until(lambda: _gauge(api, "cadscope_api_event_streams") == 0, 30, interval=0.5, what="streams released")
    sock, status, _ = _open_stream(api, job_id)
    sock.close()
    assert status == 200


@pytest.mark.slow
def test_no_body_gets_a_5xx_and_the_clients_keys_are_not_echoed(lone_api):
    api = lone_api
    hostile_key = '<script>alert("k")</script>\n\u2028' + "k" * 5000
    bodies = [
        b"[" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        json.dumps({**SMALL, "parts": _nested(40)}).encode(),  # valid JSON, past the depth bound
        json.dumps({**SMALL, hostile_key: 1}).encode(),
        json.dumps({**SMALL, "parts": [{**SMALL["parts"][0], "lcs": {hostile_key: {}}}]}).encode(),  # type: ignore[dict-item]
        b"\xff\xfe\x00garbage",
        b"1" * 5000,
        b'{"name": 1e999999}',
        b"NaN",
        b"null",
        b'"a string"',
        b"[]",
        b"{}",
        b"",
    ]
    prompts = [
        b"[" * 100_000,
        json.dumps({"prompt": {"nested": [1, 2]}}).encode(),
        json.dumps({"prompt": "a 60 x 40 x 8 mm plate", "engine": ["ocp"]}).encode(),
        json.dumps({"prompt": "a 60 x 40 x 8 mm plate", "engine": {"x": 1}}).encode(),
        json.dumps({"prompt": "a 60 x 40 x 8 mm plate", hostile_key: 1}).encode(),
    ]
    for path, cases in (("/v1/jobs", bodies), ("/v1/prompts", prompts)):
        for body in cases:
            response = httpx.post(f"{api.url}{path}", content=body, headers=api.headers(), timeout=30)
            assert 400 <= response.status_code < 500, (path, body[:60], response.status_code, response.text[:300])
            assert "<script>" not in response.text and "kkkk" not in response.text, response.text[:300]
    unknown = httpx.post(f"{api.url}/v1/jobs", json={**SMALL, "colour": "red"}, headers=api.headers(), timeout=30)
    # A key that looks like a field name is named, so a client can find its typo.
    assert unknown.status_code == 422 and ["colour"] in [e["loc"] for e in unknown.json()["detail"]]
    bad_key = _submit(api, headers={"Idempotency-Key": "x" * 500})
    assert bad_key.status_code == 422 and "xxxx" not in bad_key.text
    metrics = httpx.get(f"{api.url}/metrics", timeout=10).text
    posts = [line for line in metrics.splitlines() if line.startswith('http_requests_total{method="POST"')]
    assert posts and not [line for line in posts if 'status="5' in line], posts
    assert api.proc.poll() is None
