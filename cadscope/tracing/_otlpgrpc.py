"""OTLP/gRPC span export with cadscope's encoding (:mod:`cadscope.tracing._otlpwire`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan

from ._otlpwire import encode_request

__all__ = ["CHANNEL_OPTIONS", "OTLPWireSpanExporter"]

_EXPORT_PATH = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

# gRPC's BDP probing sizes a receiver's flow-control window: on receiving data, the
# receiver pings and times the ack. An exporter receives nothing but short
# responses, so there is nothing to size; yet each response set off a ping and
# its timer on gRPC's event-engine threads: they used 9.4 ms of CPU an export
# with it, 5.6 without (bench/RESULTS.md, "BDP probing off"). The window a
# collector grants for the requests is the collector's to size, and unchanged.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (("grpc.http2.bdp_probe", 0),)


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
    own metrics. Its channel also takes :data:`CHANNEL_OPTIONS` (BDP probing
    off) where ``channel_options`` does not set them.
    """

    def _initialize_channel_and_stub(self) -> None:
        given = getattr(self, "_channel_options", None) or ()
        names = {name for name, _ in given}
        self._channel_options = tuple(o for o in CHANNEL_OPTIONS if o[0] not in names) + tuple(given)
        super()._initialize_channel_and_stub()
        self._client = _BytesTraceStub(self._channel)  # type: ignore[assignment]

    def _translate_data(self, data: Sequence[ReadableSpan]) -> bytes:  # type: ignore[override]
        return encode_request(data)
