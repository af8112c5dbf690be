"""Shared fixtures: real Redis, real prefork workers, a real OTLP receiver, real engines."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from cadscope.freecad_bridge import EngineInfo, discover_engines
from cadscope.tracing import setup_tracing
from cadscope.tracing.testing import OTLPReceiver
from cadscope.workers import app, configure_app
from cadscope.workers.cli import worker_command

REPO = Path(__file__).resolve().parent.parent


class Recorder:
    """An EventObserver that keeps whatever the replay hands it."""

    def __init__(self):  # type: ignore[no-untyped-def]
        self.spans, self.metrics, self.progress_events = [], [], []

    def span_ended(self, name, attributes, duration_s, error_type):  # type: ignore[no-untyped-def]
        self.spans.append((name, dict(attributes), duration_s, error_type))

    def metric(self, name, value, attributes):  # type: ignore[no-untyped-def]
        self.metrics.append((name, value, dict(attributes)))

    def progress(self, attributes):  # type: ignore[no-untyped-def]
        self.progress_events.append(dict(attributes))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def corrupt_metrics_file(path: Path) -> None:
    """Two entries, the second's key length then set to -28: upstream's reader loops on it for ever."""
    from prometheus_client.mmap_dict import MmapedDict

    store = MmapedDict(str(path))
    for op in ("a", "b"):
        store.write_value(json.dumps(["jobs", "jobs_total", {"op": op}, "Jobs."]), 1.0, 0.0)
    store.close()
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[8:12], "little", signed=True)
    second = 8 + 4 + length + (8 - (length + 4) % 8) + 16
    data[second : second + 4] = (-28).to_bytes(4, "little", signed=True)
    path.write_bytes(bytes(data))


# The wall-clock stamps in STEP and IGES headers: what differs between two exports of one shape
# whatever runs them.
STAMPS: tuple[tuple[re.Pattern[bytes], bytes], ...] = (
    (re.compile(rb"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:[+-]\d{2}:\d{2})?"), b"<stamp>"),
    (re.compile(rb"\d{1,2}H\d{8}\.\d{6}"), b"<stamp>"),
)


def normalised(path: Path, patterns: tuple[tuple[re.Pattern[bytes], bytes], ...] = STAMPS) -> bytes:
    """The file's bytes with what ``patterns`` match replaced (by default the export stamps)."""
    data = path.read_bytes()
    for pattern, replacement in patterns:
        data = pattern.sub(replacement, data)
    return data


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something truthy, with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def engines() -> dict[str, EngineInfo]:
    found = discover_engines()
    missing = {"freecad", "ocp"} - set(found)
    if missing:
        pytest.fail(f"engines missing on this host: {sorted(missing)} (CI installs freecad-python3 and the ocp extra)")
    return found


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/11")
    redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    return url


@pytest.fixture(scope="session")
def otlp_receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as receiver:
        yield receiver


@dataclass
class WorkerHandle:
    proc: subprocess.Popen[bytes]
    queue: str
    metrics_url: str
    data_dir: Path
    log: Path
    env: dict[str, str]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def scrape(self) -> str:
        try:
            return urllib.request.urlopen(self.metrics_url, timeout=30).read().decode()  # noqa: S310
        except urllib.error.HTTPError as exc:  # the server's traceback is in the worker's log, not the response
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            start = max(text.rfind("Traceback"), 0)
            raise AssertionError(f"/metrics answered {exc.code}; the worker log from its last traceback:\n"
                                 f"{text[start:start + 4000]}") from exc  # fmt: skip

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


@pytest.fixture
def start_worker(tmp_path: Path, redis_url: str):  # type: ignore[no-untyped-def]
    """Start real ``celery worker`` processes (prefork); stopped after the test."""
    handles: list[WorkerHandle] = []

    def start(
        *extra: str,
        env: dict[str, str] | None = None,
        concurrency: int = 2,
        queue: str | None = None,
        data_dir: Path | None = None,
    ) -> WorkerHandle:
        queue = queue or f"test-{uuid.uuid4().hex[:8]}"
        data = data_dir or tmp_path / f"{queue}-{uuid.uuid4().hex[:4]}"
        data.mkdir(exist_ok=True)
        port = free_port()
        ready = data / f"ready-{uuid.uuid4().hex[:4]}"
        worker_env = {
            **os.environ,
            "CELERY_BROKER_URL": redis_url,
            "CELERY_RESULT_BACKEND": redis_url,
            "CADSCOPE_DATA_DIR": str(data),
            "PROMETHEUS_MULTIPROC_DIR": str(data / "metrics"),
            "CADSCOPE_METRICS_PORT": str(port),
            "CADSCOPE_READY_FILE": str(ready),
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "CADSCOPE_ALLOW_FAULTS": "1",  # the suite injects faults on purpose
            **(env or {}),
        }
        log = data / f"worker-{uuid.uuid4().hex[:4]}.log"
        proc = subprocess.Popen(  # noqa: S603
            worker_command(queue, concurrency, *extra),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env=worker_env,
            stdin=subprocess.DEVNULL,
        )
        handle = WorkerHandle(proc, queue, f"http://127.0.0.1:{port}/metrics", data, log, worker_env)
        handles.append(handle)
        try:
            wait_until(lambda: ready.exists() or proc.poll() is not None, 90, what="worker ready")
        except TimeoutError:
            pytest.fail(f"worker not ready:\n{handle.log_tail()}")
        if proc.poll() is not None:
            pytest.fail(f"worker exited {proc.returncode}:\n{handle.log_tail()}")
        return handle

    yield start
    for handle in handles:
        handle.stop()


@dataclass
class RedisServer:
    proc: subprocess.Popen[bytes]
    port: int
    dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """A clean shutdown (the append-only file is flushed): the broker is gone."""
        self.proc.terminate()
        self.proc.wait(10)

    def start(self) -> None:
        """The same server again: same port, same data directory."""
        self.proc = _start_redis(self.port, self.dir)


def _start_redis(port: int, directory: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(  # noqa: S603
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
         "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    wait_until(lambda: _pings(client), 10, what="test redis-server")
    return proc


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, on its own port (never the shared one)."""
    port = free_port()
    server = RedisServer(_start_redis(port, tmp_path), port, tmp_path)
    yield server
    if server.proc.poll() is None:
        server.resume()
        server.proc.terminate()
        server.proc.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@dataclass
class ApiHandle:
    proc: subprocess.Popen[bytes]
    url: str
    token: str
    log: Path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
def start_api(tmp_path: Path):  # type: ignore[no-untyped-def]
    """``cadscope api`` (uvicorn) sharing a worker's broker, queue and data folder."""
    handles: list[ApiHandle] = []

    def start(worker: WorkerHandle, env: dict[str, str] | None = None) -> ApiHandle:
        import httpx

        port = free_port()
        token = uuid.uuid4().hex
        log = tmp_path / f"api-{port}.log"
        api_env = {**worker.env, "CADSCOPE_API_TOKEN": token, "CADSCOPE_QUEUE": worker.queue, **(env or {})}
        if "PROMETHEUS_MULTIPROC_DIR" not in (env or {}):
            api_env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the worker's: never the API's unless asked
        proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "cadscope.workers.cli", "api", "--port", str(port)],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env=api_env,
            stdin=subprocess.DEVNULL,
        )
        handle = ApiHandle(proc, f"http://127.0.0.1:{port}", token, log)
        handles.append(handle)

        def up() -> bool:
            try:
                return httpx.get(f"{handle.url}/health/live", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None

        wait_until(up, 60, what="api up")
        if proc.poll() is not None:
            pytest.fail(f"api exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        return handle

    yield start
    for handle in handles:
        handle.proc.terminate()
        try:
            handle.proc.wait(15)
        except subprocess.TimeoutExpired:
            handle.proc.kill()


@pytest.fixture(scope="session")
def producer(otlp_receiver, redis_url):
    """This test process as the API would be: a traced Celery producer."""
    configure_app(app, redis_url)
    provider = setup_tracing("cadscope-test-producer", exporters=())
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=otlp_receiver.endpoint, insecure=True)))
    instrumentor = CeleryInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=provider)
    return trace.get_tracer("test.api", tracer_provider=provider)
