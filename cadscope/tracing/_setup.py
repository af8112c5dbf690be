"""Tracer provider setup: once per process, after fork, flushed before exit."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter

from ._ids import PinnableIdGenerator
from ._otlpjson import OTLPJsonFileSpanExporter
from ._processor import BoundedBatchSpanProcessor, DropCallback

__all__ = ["flush_tracing", "get_tracer_provider", "setup_tracing", "shutdown_tracing"]

TRACES_FILE_ENV = "CADSCOPE_TRACES_FILE"

_lock = threading.Lock()
_state: dict[str, Any] = {"pid": None, "provider": None, "bounded": []}


def _otlp_exporter() -> SpanExporter | None:
    """An OTLP exporter if the standard variables ask for one; none otherwise.

    No endpoint set means no network export: a worker on a laptop must not
    spend its time retrying ``localhost:4317``.
    """
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint or os.environ.get("OTEL_TRACES_EXPORTER", "otlp") == "none":
        return None
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if protocol.startswith("http"):
        from ._otlphttp import OTLPWireHTTPSpanExporter

        return OTLPWireHTTPSpanExporter()
    from ._otlpgrpc import OTLPWireSpanExporter

    return OTLPWireSpanExporter()


def setup_tracing(
    service_name: str,
    *,
    resource_attributes: Mapping[str, Any] | None = None,
    traces_file: str | None = None,
    exporters: Sequence[SpanExporter] = (),
    processors: Sequence[SpanProcessor] = (),
    set_global: bool = True,
    on_drop: DropCallback | None = None,
) -> TracerProvider:
    """Create this process's tracer provider, once.

    Exporters: OTLP when ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` is set (the
    standard ``OTEL_*`` variables apply), an OTLP/JSON-lines file when
    ``traces_file`` or ``$CADSCOPE_TRACES_FILE`` is set, and any ``exporters``
    given, each behind a :class:`BoundedBatchSpanProcessor` (``OTEL_BSP_*``):
    a slow or dead collector costs queued spans, counted through
    ``on_drop(reason, count)``, never the caller's time.
    ``processors`` are added as they are (tests pass a ``SimpleSpanProcessor``).

    Idempotent per process: a second call returns the same provider; after a
    fork the child gets a provider of its own.
    """
    with _lock:
        if _state["pid"] == os.getpid() and _state["provider"] is not None:
            return _state["provider"]  # type: ignore[no-any-return]
        attributes: dict[str, Any] = {
            "service.name": service_name,
            "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
            "host.name": socket.gethostname(),
            "process.pid": os.getpid(),
        }
        attributes.update(resource_attributes or {})
        provider = TracerProvider(resource=Resource.create(attributes), id_generator=PinnableIdGenerator())
        chosen: list[SpanExporter] = list(exporters)
        otlp = _otlp_exporter()
        if otlp is not None:
            chosen.append(otlp)
        path = traces_file or os.environ.get(TRACES_FILE_ENV)
        if path:
            chosen.append(OTLPJsonFileSpanExporter(path))
        bounded = [BoundedBatchSpanProcessor(exporter, on_drop=on_drop) for exporter in chosen]
        for processor in [*bounded, *processors]:
            provider.add_span_processor(processor)
        if set_global:
            _set_global(provider)
        _state.update(pid=os.getpid(), provider=provider, bounded=bounded)
        return provider


def _set_global(provider: TracerProvider) -> None:
    # The API refuses to replace a global provider once set; after a fork the
    # child inherits the parent's "already set" flag with the parent's provider,
    # whose batch threads did not survive the fork. Reset it for this process.
    from opentelemetry.util._once import Once

    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    trace.set_tracer_provider(provider)


def get_tracer_provider() -> TracerProvider | None:
    """This process's provider from :func:`setup_tracing`, or None."""
    if _state["pid"] == os.getpid():
        return _state["provider"]  # type: ignore[no-any-return]
    return None


def flush_tracing(timeout_millis: int = 5000) -> bool:
    """Export what is queued. Billiard children leave through ``os._exit``, so
    ``atexit`` never runs: call this from ``worker_process_shutdown``."""
    provider = get_tracer_provider()
    return provider.force_flush(timeout_millis) if provider is not None else True


def shutdown_tracing(timeout_millis: int = 5000) -> None:
    """Flush and stop within ``timeout_millis`` in all (the SDK's
    ``TracerProvider.shutdown`` takes no deadline); spans that could not be
    exported by then are counted as dropped (reason ``shutdown``)."""
    provider = get_tracer_provider()
    if provider is None:
        return
    deadline = time.monotonic() + timeout_millis / 1000
    for processor in _state["bounded"]:
        processor.shutdown(max(0, int((deadline - time.monotonic()) * 1000)))
    provider.shutdown()  # the others; ours are already closed
    _state.update(pid=None, provider=None, bounded=[])
