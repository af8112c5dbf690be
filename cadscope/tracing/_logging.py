"""JSON log lines with ``trace_id``, ``span_id`` and ``job_id``.

Every record is one JSON object on one line; ``json.dumps`` escapes control
characters, so text from a job (a part name, an error message with CR/LF)
cannot forge or split a log line.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

from opentelemetry import trace

__all__ = ["JsonFormatter", "configure_json_logging", "job_id_var"]

job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("cadscope_job_id", default=None)

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "service": self.service,
            "pid": record.process,
            "message": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            out["trace_id"] = format(context.trace_id, "032x")
            out["span_id"] = format(context.span_id, "016x")
        job_id = job_id_var.get()
        if job_id is not None:
            out["job_id"] = job_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=True)


def configure_json_logging(service: str, level: int | str = logging.INFO, stream: Any = None) -> None:
    """Replace the root logger's handlers with one JSON handler (idempotent).

    Writes to the process's real stderr: in a Celery pool process ``sys.stderr``
    is Celery's redirect proxy, which logs what is written to it, and drops
    what its own logging writes back (recursion guard): every record of a pool
    process would be lost.
    """
    root = logging.getLogger()
    handler = logging.StreamHandler(stream or sys.__stderr__ or sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
