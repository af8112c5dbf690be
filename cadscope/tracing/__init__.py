"""Tracing for cadscope: joining the process's OpenTelemetry set-up, the env-var carrier, pinned span ids.

Usage in a process that starts CAD subprocesses::

    from cadscope.tracing import setup_tracing, inject_into_env, shutdown_tracing

    setup_tracing("cadscope-worker")            # joins a global SDK provider, or makes one
    env = inject_into_env({"PATH": "/usr/bin"}) # TRACEPARENT/TRACESTATE/BAGGAGE
    ...
    shutdown_tracing(5000)                      # before os._exit: bounded, drops counted

The standard ``OTEL_*`` variables apply (``OTEL_TRACES_EXPORTER``,
``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SDK_DISABLED`` ...);
``CADSCOPE_TRACES_FILE`` also writes OTLP/JSON lines. Celery task spans come
from opentelemetry-instrumentation-celery (:func:`instrument_celery`).
"""

from __future__ import annotations

from ._carrier import EnvGetter, EnvSetter, extract_from_env, inject_into_env, normalise_key
from ._celery import instrument_celery, uninstrument_celery
from ._ids import PinnableIdGenerator, pinnable_tracer, pinned_ids, pinned_span_id
from ._journal import JournalReaper, SpanJournal, journal_note, read_journal
from ._logging import JsonFormatter, configure_json_logging, job_id_var
from ._otlpjson import OTLPJsonFileSpanExporter, spans_to_otlp_json
from ._processor import BoundedBatchSpanProcessor
from ._setup import (
    add_span_processor,
    flush_tracing,
    get_tracer_provider,
    sdk_disabled,
    setup_tracing,
    shutdown_tracing,
    traces_exporters,
)

__all__ = [
    "BoundedBatchSpanProcessor",
    "EnvGetter",
    "EnvSetter",
    "JournalReaper",
    "JsonFormatter",
    "OTLPJsonFileSpanExporter",
    "PinnableIdGenerator",
    "SpanJournal",
    "add_span_processor",
    "configure_json_logging",
    "extract_from_env",
    "flush_tracing",
    "get_tracer_provider",
    "inject_into_env",
    "instrument_celery",
    "job_id_var",
    "journal_note",
    "normalise_key",
    "pinnable_tracer",
    "pinned_ids",
    "pinned_span_id",
    "read_journal",
    "sdk_disabled",
    "setup_tracing",
    "shutdown_tracing",
    "spans_to_otlp_json",
    "traces_exporters",
    "uninstrument_celery",
]
