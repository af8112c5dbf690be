"""Shared fixtures: real Redis, real prefork workers, a real OTLP receiver, real engines."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from cadscope.freecad_bridge import EngineInfo, discover_engines
from cadscope.tracing.testing import OTLPReceiver
from cadscope.workers.cli import worker_command

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        return urllib.request.urlopen(self.metrics_url, timeout=30).read().decode()  # noqa: S310

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


@pytest.fixture
def start_worker(tmp_path: Path, redis_url: str):  # type: ignore[no-untyped-def]
    """Start real ``celery worker`` processes (prefork); stopped after the test."""
    handles: list[WorkerHandle] = []

    def start(*extra: str, env: dict[str, str] | None = None, concurrency: int = 2) -> WorkerHandle:
        queue = f"test-{uuid.uuid4().hex[:8]}"
        data = tmp_path / queue
        data.mkdir()
        port = free_port()
        ready = data / "ready"
        worker_env = {
            **os.environ,
            "CELERY_BROKER_URL": redis_url,
            "CELERY_RESULT_BACKEND": redis_url,
            "CADSCOPE_DATA_DIR": str(data),
            "PROMETHEUS_MULTIPROC_DIR": str(data / "metrics"),
            "CADSCOPE_METRICS_PORT": str(port),
            "CADSCOPE_READY_FILE": str(ready),
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            **(env or {}),
        }
        log = data / "worker.log"
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
