"""``cadscope doctor``: what this machine's worker and API would find, one line per check.

Each line is ``ok``, ``warn`` or ``fail``, then what was checked and what was found:
the CAD engines and their versions, whether the broker answers (within a timeout),
whether an API token is set (never the token itself), where metrics go (the
multiprocess directory and the ``/metrics`` port) and where traces go (the
``OTEL_*`` and ``CADSCOPE_TRACES_FILE`` settings). The exit status is 1 when a
check failed, else 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

__all__ = ["Check", "add_doctor_parser", "cmd_doctor", "run_checks"]

Level = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    level: Level
    name: str
    message: str

    def line(self) -> str:
        return f"{self.level:<4}  {self.name:<8} {self.message}"


def _engines() -> list[Check]:
    from ..freecad_bridge import discover_engines

    found = discover_engines()
    checks = []
    hints = {
        "freecad": "freecadcmd not found or did not answer (install freecad-python3, or set CADSCOPE_FREECADCMD)",
        "ocp": "OCP not importable by the engine's Python (pip install 'cadscope[ocp]', or set CADSCOPE_OCP_PYTHON)",
    }
    for name in ("freecad", "ocp"):
        if name not in found:
            checks.append(Check("warn", "engine", f"{name}: {hints[name]}"))
    # Every engine pool (several OCP interpreters may run side by side), each once.
    for pool, info in sorted({info.pool: info for info in found.values()}.items()):
        versions = f"FreeCAD {info.freecad_version}, " if info.freecad_version != "none" else ""
        checks.append(Check("ok", "engine", f"{pool}: {versions}OCCT {info.occt_version} ({info.argv[0]})"))
    if not found:
        checks.append(Check("fail", "engine", "no CAD engine found: a worker cannot run a job"))
    return checks


def _broker(url: str | None, timeout_s: float) -> Check:
    from kombu import Connection

    from ._app import DEFAULT_BROKER
    from ._config import EMBEDDED
    from .cli import redacted_url

    url = url or os.environ.get("CELERY_BROKER_URL") or DEFAULT_BROKER
    shown = redacted_url(url)
    if url in (EMBEDDED, "filesystem://"):
        return Check("ok", "broker", f"{shown}: kombu's filesystem transport (one machine, no server)")
    try:
        connection = Connection(url, connect_timeout=timeout_s)
        connection.transport_cls  # noqa: B018 - KeyError for an unknown scheme
    except (KeyError, ValueError, ImportError) as exc:
        return Check("fail", "broker", f"{shown}: not a broker URL cadscope can use ({type(exc).__name__})")
    # In a thread of its own, waited for at most the timeout: a broker that accepts the
    # connection and never answers holds a client's read for longer than kombu's timeout.
    answer: list[str | None] = []

    def connect() -> None:
        try:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout_s)
            answer.append(None)
        except Exception as exc:  # noqa: BLE001 - any failure to connect is the same answer
            answer.append((str(exc).replace(url, shown).splitlines() or [type(exc).__name__])[0][:160])
        finally:
            connection.release()

    thread = threading.Thread(target=connect, name="cadscope-doctor-broker", daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    if not answer:
        return Check("fail", "broker", f"{shown} did not answer within {timeout_s:g} s")
    if answer[0] is not None:
        return Check("fail", "broker", f"{shown} did not answer within {timeout_s:g} s: {answer[0]}")
    return Check("ok", "broker", f"{shown} answers")


def _token() -> Check:
    if os.environ.get("CADSCOPE_API_TOKEN"):
        return Check("ok", "token", "API token set (CADSCOPE_API_TOKEN)")
    path = os.environ.get("CADSCOPE_API_TOKEN_FILE")
    if path:
        try:
            readable = bool(Path(path).read_text().strip())
        except OSError as exc:
            return Check("fail", "token", f"CADSCOPE_API_TOKEN_FILE {path}: {exc.strerror}")
        if readable:
            return Check("ok", "token", f"API token set (CADSCOPE_API_TOKEN_FILE {path})")
        return Check("fail", "token", f"CADSCOPE_API_TOKEN_FILE {path} is empty")
    if os.environ.get("CADSCOPE_API_ALLOW_ANONYMOUS") == "1":
        return Check("warn", "token", "no API token: the API accepts anyone (CADSCOPE_API_ALLOW_ANONYMOUS=1)")
    return Check("warn", "token", "no API token: `cadscope api` refuses to start (set CADSCOPE_API_TOKEN)")


def _metrics() -> Check:
    from ._config import WorkerSettings

    try:
        settings = WorkerSettings.from_env()
    except ValueError as exc:
        return Check("fail", "metrics", str(exc))
    where = settings.metrics_dir
    source = "PROMETHEUS_MULTIPROC_DIR" if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else "under CADSCOPE_DATA_DIR"
    served = f"served at http://{settings.metrics_addr}:{settings.metrics_port}/metrics"
    existing = next((p for p in (where, *where.parents) if p.exists()), None)
    if existing is None or not os.access(existing, os.W_OK):
        return Check("fail", "metrics", f"multiprocess dir {where} ({source}) cannot be created or written")
    return Check("ok", "metrics", f"multiprocess dir {where} ({source}), {served}")


def _traces() -> Check:
    from ..tracing import _setup

    if _setup.sdk_disabled():
        return Check("warn", "traces", "OTEL_SDK_DISABLED=true: no traces")
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    file = os.environ.get(_setup.TRACES_FILE_ENV)
    try:
        exporters = _setup.traces_exporters()
    except ValueError as exc:
        return Check("fail", "traces", str(exc))
    where = []
    for exporter in exporters:
        name = type(exporter).__name__
        if name.startswith("OTLP"):
            protocol = "http/protobuf" if "http" in type(exporter).__module__ else "grpc"
            where.append(f"OTLP {protocol} to {endpoint or 'the exporter default'}")
        else:
            where.append(name)
        exporter.shutdown()
    if file:
        where.append(f"OTLP/JSON lines in {file} ({_setup.TRACES_FILE_ENV})")
    if not where:
        return Check("warn", "traces", "spans are made but go nowhere: set OTEL_EXPORTER_OTLP_ENDPOINT "
                                       "or CADSCOPE_TRACES_FILE")  # fmt: skip
    return Check("ok", "traces", "; ".join(where))


def run_checks(broker: str | None = None, timeout_s: float = 3.0) -> list[Check]:
    """Every check, in the order printed."""
    return [*_engines(), _broker(broker, timeout_s), _token(), _metrics(), _traces()]


def add_doctor_parser(sub: Any) -> None:
    doctor = sub.add_parser(
        "doctor",
        help="check this machine: engines, broker, API token, where metrics and traces go",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  CELERY_BROKER_URL=redis://127.0.0.1:6379/0 cadscope doctor --timeout 2",
    )
    doctor.add_argument("--broker", help="broker URL to check (default: $CELERY_BROKER_URL, else a local Redis)")
    doctor.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the broker (default 3)")


def cmd_doctor(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if not args.timeout > 0:
        print("cadscope doctor: --timeout must be above 0", file=sys.stderr)
        return 2
    checks = run_checks(args.broker, args.timeout)
    for check in checks:
        print(check.line(), file=out)
    return 1 if any(c.level == "fail" for c in checks) else 0
