"""Tracing for cadscope: setup after fork, the env-var carrier, pinned span ids.

Usage in a process that starts CAD subprocesses::

    from cadscope.tracing import setup_tracing, inject_into_env, shutdown_tracing

    setup_tracing("cadscope-worker")           # once per process, after fork
    env = inject_into_env({"PATH": "/usr/bin"}) # TRACEPARENT/TRACESTATE/BAGGAGE
    ...
    shutdown_tracing(5000)                      # before os._exit: bounded, drops counted

``OTEL_EXPORTER_OTLP_ENDPOINT`` (and the other standard ``OTEL_*`` variables)
turn on OTLP export; ``CADSCOPE_TRACES_FILE`` writes OTLP/JSON lines.
"""

from __future__ import annotations

from ._carrier import EnvGetter, EnvSetter, extract_from_env, inject_into_env, normalise_key
from ._celery import TracedTask, instrument_celery_worker, uninstrument_celery_worker
from ._ids import PinnableIdGenerator, pinned_span_id
from ._logging import JsonFormatter, configure_json_logging, job_id_var
from ._otlpjson import OTLPJsonFileSpanExporter, spans_to_otlp_json
from ._setup import flush_tracing, get_tracer_provider, setup_tracing, shutdown_tracing

__all__ = [
    "EnvGetter",
    "EnvSetter",
    "JsonFormatter",
    "OTLPJsonFileSpanExporter",
    "PinnableIdGenerator",
    "TracedTask",
    "configure_json_logging",
    "extract_from_env",
    "flush_tracing",
    "get_tracer_provider",
    "inject_into_env",
    "instrument_celery_worker",
    "job_id_var",
    "normalise_key",
    "pinned_span_id",
    "setup_tracing",
    "shutdown_tracing",
    "spans_to_otlp_json",
    "uninstrument_celery_worker",
]
