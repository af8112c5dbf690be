"""OTLP/gRPC span export with cadscope's encoding (:mod:`cadscope.tracing._otlpwire`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan

from ._otlpwire import encode_request

__all__ = ["OTLPWireSpanExporter"]

_EXPORT_PATH = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class _BytesTraceStub:
    """The TraceService client, taking the request already serialised."""

    def __init__(self, channel: Any) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        self.Export = channel.unary_unary(
            _EXPORT_PATH, request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString
        )


class OTLPWireSpanExporter(OTLPSpanExporter):
    """Upstream's OTLP/gRPC span exporter, sending :func:`encode_request`'s bytes.

    Everything else is upstream's: the ``OTEL_EXPORTER_OTLP_*`` settings,
    retries with backoff, reconnection on UNAVAILABLE, compression, TLS, its
    own metrics.
    """

    def _initialize_channel_and_stub(self) -> None:
        super()._initialize_channel_and_stub()
        self._client = _BytesTraceStub(self._channel)  # type: ignore[assignment]

    def _translate_data(self, data: Sequence[ReadableSpan]) -> bytes:  # type: ignore[override]
        return encode_request(data)
