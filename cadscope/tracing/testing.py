"""Helpers for tests of code that makes spans (public: users need them too)."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ._ids import PinnableIdGenerator

__all__ = ["InMemorySpanExporter", "OTLPReceiver", "in_memory_provider"]


def in_memory_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A provider that keeps finished spans in memory, with pinnable ids."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=PinnableIdGenerator())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


class OTLPReceiver:
    """A real OTLP/gRPC trace receiver on loopback, keeping what it receives.

    Speaks the collector's ``TraceService/Export`` protocol, so exporters under
    test use their real network path::

        with OTLPReceiver() as receiver:
            os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
            ...
            spans = receiver.wait_for(lambda spans: len(spans) >= 10, timeout=30)
    """

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.spans: list[dict[str, Any]] = []
        self.requests: list[Any] = []  # each ExportTraceServiceRequest as received
        self._server: Any = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> OTLPReceiver:
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        receiver = self

        class _Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC method name
                receiver._add(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Service(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=1)

    def _add(self, request: Any) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _any_value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        {
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "name": span.name,
                            "kind": span.kind,
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                            "status": span.status.code,
                            "attributes": {a.key: _any_value(a.value) for a in span.attributes},
                            "events": [e.name for e in span.events],
                            "resource": resource,
                        }
                    )
        with self._changed:
            self.requests.append(request)
            self.spans.extend(found)
            self._changed.notify_all()

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Block until ``predicate(spans)`` holds; return the spans (raise on timeout)."""
        import time

        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.spans):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"OTLP receiver: condition not met after {timeout} s ({len(self.spans)} spans)")
                self._changed.wait(remaining)
            return list(self.spans)


def _any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None
