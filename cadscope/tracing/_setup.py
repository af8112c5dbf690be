"""Joining the process's OpenTelemetry set-up, or making one: once per process, flushed before exit.

cadscope is a layer in someone else's process. If an SDK ``TracerProvider``
is already the global one (the application's, ``opentelemetry-instrument``'s,
a vendor distro's), cadscope keeps it, adds its own span processors to it,
and leaves its exporters, sampler, resource and limits as they are: the
``OTEL_*`` variables were that set-up's to read. Otherwise cadscope makes
one, reading the standard variables as the SDK documents them:
``OTEL_SDK_DISABLED``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER(_ARG)``, ``OTEL_SPAN_*`` limits, ``OTEL_BSP_*`` and
``OTEL_EXPORTER_OTLP_*``; and ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``,
``none`` or any exporter registered under the SDK's
``opentelemetry_traces_exporter`` entry points, several comma-separated).
Where ``OTEL_TRACES_EXPORTER`` is not set, OTLP is used only where an
endpoint is: a worker on a laptop must not spend its time retrying
``localhost:4317``.
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter

from ._ids import PinnableIdGenerator
from ._otlpjson import OTLPJsonFileSpanExporter
from ._processor import BoundedBatchSpanProcessor, DropCallback

__all__ = [
    "add_span_processor",
    "flush_tracing",
    "get_tracer_provider",
    "sdk_disabled",
    "setup_tracing",
    "shutdown_tracing",
    "traces_exporters",
]

log = logging.getLogger(__name__)

TRACES_FILE_ENV = "CADSCOPE_TRACES_FILE"
_ENTRY_POINTS = "opentelemetry_traces_exporter"
# gRPC sends a BDP ping after each response it receives; an exporter receives only short
# responses, and each ping kept gRPC's threads busy after every export.
_GRPC_CHANNEL_OPTIONS = (("grpc.http2.bdp_probe", 0),)

_lock = threading.Lock()
_state: dict[str, Any] = {"provider": None, "owned": False, "processors": []}


def sdk_disabled() -> bool:
    """``OTEL_SDK_DISABLED`` as the SDK reads it (``true``, any case)."""
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def _protocol() -> str:
    return (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    ).strip()


def _load_exporter(name: str) -> SpanExporter:
    """An exporter by its ``OTEL_TRACES_EXPORTER`` name, through the SDK's entry points."""
    if name == "otlp":
        name = "otlp_proto_http" if _protocol().startswith("http") else "otlp_proto_grpc"
    found = [point for point in entry_points(group=_ENTRY_POINTS) if point.name == name]
    if not found:
        raise ValueError(f"OTEL_TRACES_EXPORTER: no span exporter named {name!r} is installed")
    exporter_class = found[0].load()
    if name == "otlp_proto_grpc" and "channel_options" in inspect.signature(exporter_class).parameters:
        return exporter_class(channel_options=_GRPC_CHANNEL_OPTIONS)  # type: ignore[no-any-return]
    return exporter_class()  # type: ignore[no-any-return]


def traces_exporters() -> list[SpanExporter]:
    """The exporters the standard variables ask for (see the module's docstring); raises ``ValueError``
    for a name no installed package provides."""
    raw = os.environ.get("OTEL_TRACES_EXPORTER")
    if raw is None:
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        names = ["otlp"] if endpoint else []
    else:
        names = [name.strip().lower() for name in raw.split(",") if name.strip()]
        if "none" in names:
            names = []
    exporters = []
    for name in dict.fromkeys(names):  # once each, in order
        exporters.append(_load_exporter(name))
    return exporters


def _resource(service_name: str, attributes: Mapping[str, Any] | None) -> Resource:
    """cadscope's defaults, under what the standard variables say (``OTEL_SERVICE_NAME`` and
    ``OTEL_RESOURCE_ATTRIBUTES`` win, as the specification asks)."""
    host = socket.gethostname()
    defaults: dict[str, Any] = {
        "service.name": service_name,
        "service.instance.id": f"{host}:{os.getpid()}",
        "host.name": host,
    }
    defaults.update(attributes or {})
    return Resource.create(defaults).merge(OTELResourceDetector().detect())


def setup_tracing(
    service_name: str,
    *,
    resource_attributes: Mapping[str, Any] | None = None,
    traces_file: str | None = None,
    exporters: Sequence[SpanExporter] = (),
    processors: Sequence[SpanProcessor] = (),
    on_drop: DropCallback | None = None,
    tracer_provider: TracerProvider | None = None,
) -> TracerProvider | None:
    """Join this process's tracer provider, or make one; once per process.

    The provider is ``tracer_provider``, else the global one if it is the
    SDK's, else a new one made from the standard variables and set as the
    global provider. To it are added, each behind a
    :class:`BoundedBatchSpanProcessor` (``OTEL_BSP_*``; spans not exported are
    counted through ``on_drop(reason, count)``): the exporters
    ``OTEL_TRACES_EXPORTER`` names (only for a provider cadscope made), an
    OTLP/JSON-lines file when ``traces_file`` or ``$CADSCOPE_TRACES_FILE`` is
    set, and ``exporters``. ``processors`` are added as they are.

    Idempotent: later calls return the same provider and add nothing, in a
    forked child too (it shares its parent's provider; the processors start
    their threads again there). With ``OTEL_SDK_DISABLED=true`` nothing is
    made and None is returned; every span is then the API's no-op span.
    """
    with _lock:
        if _state["provider"] is not None:
            return _state["provider"]  # type: ignore[no-any-return]
        if sdk_disabled():
            log.info("OTEL_SDK_DISABLED is true: no tracing")
            return None
        provider = tracer_provider
        owned = False
        if provider is None:
            current = trace.get_tracer_provider()
            if isinstance(current, TracerProvider):
                provider = current
            else:
                provider = TracerProvider(
                    resource=_resource(service_name, resource_attributes), id_generator=PinnableIdGenerator()
                )
                owned = True
        chosen: list[SpanExporter] = list(traces_exporters()) if owned else []
        path = traces_file or os.environ.get(TRACES_FILE_ENV)
        if path:
            chosen.append(OTLPJsonFileSpanExporter(path))
        chosen.extend(exporters)
        added: list[SpanProcessor] = [BoundedBatchSpanProcessor(exporter, on_drop=on_drop) for exporter in chosen]
        added.extend(processors)
        for processor in added:
            provider.add_span_processor(processor)
        if owned:
            trace.set_tracer_provider(provider)
        else:
            log.info("joined the process's tracer provider; its exporters and sampler are left as they are")
        _state.update(provider=provider, owned=owned, processors=added)
        return provider


def add_span_processor(processor: SpanProcessor) -> bool:
    """Add ``processor`` to the provider :func:`setup_tracing` chose; False when there is none."""
    provider = get_tracer_provider()
    if provider is None:
        return False
    with _lock:
        provider.add_span_processor(processor)
        _state["processors"].append(processor)
    return True


def get_tracer_provider() -> TracerProvider | None:
    """The provider :func:`setup_tracing` chose in this process (or its parent), or None."""
    return _state["provider"]  # type: ignore[no-any-return]


def flush_tracing(timeout_millis: int = 5000) -> bool:
    """Export what every processor of the provider holds, within ``timeout_millis``.
    Billiard's pool processes leave through ``os._exit``, so ``atexit`` never runs:
    call this from ``worker_process_shutdown``."""
    provider = get_tracer_provider()
    if provider is None:
        return True
    return _within(timeout_millis, provider.force_flush, timeout_millis)


def shutdown_tracing(timeout_millis: int = 5000) -> None:
    """Flush, then stop cadscope's processors, within ``timeout_millis`` in all; spans that could
    not be exported by then are counted as dropped (reason ``shutdown``). A provider cadscope made
    is shut down too; one it joined is left to its owner, flushed."""
    provider = get_tracer_provider()
    if provider is None:
        return
    deadline = time.monotonic() + timeout_millis / 1000

    def left() -> int:
        return max(0, int((deadline - time.monotonic()) * 1000))

    flush_tracing(timeout_millis)
    for processor in _state["processors"]:
        if isinstance(processor, BoundedBatchSpanProcessor):
            _within(left(), processor.shutdown, left())
        else:
            _within(left(), processor.shutdown)
    if _state["owned"]:
        _within(left(), provider.shutdown)
    _state.update(provider=None, owned=False, processors=[])


def _within(timeout_millis: int, call: Any, *args: Any) -> bool:
    """``call(*args)`` on a daemon thread, waited for at most ``timeout_millis``: a processor of
    someone else's may not honour a deadline. False if it did not return (True) in time."""
    result: list[Any] = []

    def target() -> None:
        try:
            result.append(call(*args))
        except Exception:  # noqa: BLE001 - flushing must not fail the caller's exit
            log.warning("tracing flush or shutdown failed", exc_info=True)
            result.append(False)

    thread = threading.Thread(target=target, name="cadscope-tracing-flush", daemon=True)
    thread.start()
    thread.join(timeout_millis / 1000)
    return bool(result and result[0] is not False)
