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
    """A real OTLP trace receiver on loopback, keeping what it receives.

    Speaks the collector's ``TraceService/Export`` protocol over gRPC
    (``endpoint``) and OTLP/HTTP with protobuf bodies, gzip or not
    (``http_endpoint``, the base URL: exporters add ``/v1/traces``), so
    exporters under test use their real network path::

        with OTLPReceiver() as receiver:
            os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
            ...
            spans = receiver.wait_for(lambda spans: len(spans) >= 10, timeout=30)

    ``requests`` holds every request as received, ``transports`` the
    transport each came by (``"grpc"`` or ``"http"``).
    """

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.spans: list[dict[str, Any]] = []
        self.requests: list[Any] = []  # each ExportTraceServiceRequest as received
        self.transports: list[str] = []
        self._server: Any = None
        self._http: Any = None
        self.port = 0
        self.http_port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> OTLPReceiver:
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        receiver = self

        class _Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC method name
                receiver._add(request, "grpc")
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Service(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self._start_http()
        return self

    def _start_http(self) -> None:
        import gzip
        import http.server
        import threading

        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        receiver = self

        class _Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, answer = 200, trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                try:
                    if self.path != "/v1/traces":
                        status, answer = 404, b""
                    else:
                        if self.headers.get("Content-Encoding") == "gzip":
                            body = gzip.decompress(body)
                        receiver._add(trace_service_pb2.ExportTraceServiceRequest.FromString(body), "http")
                except Exception:  # noqa: BLE001 - a body that is not a request: the client's error
                    status, answer = 400, b""
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, name="otlp-http-receiver", daemon=True).start()

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=1)
        self._http.shutdown()
        self._http.server_close()

    def _add(self, request: Any, transport: str) -> None:
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
                            "links": [(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                            "resource": resource,
                        }
                    )
        with self._changed:
            self.requests.append(request)
            self.transports.append(transport)
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
