"""OTLP/HTTP (protobuf) span export with cadscope's encoding (:mod:`cadscope.tracing._otlpwire`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from ._otlpwire import encode_request

__all__ = ["OTLPWireHTTPSpanExporter"]

log = logging.getLogger(__name__)


class OTLPWireHTTPSpanExporter(HTTPSpanExporter):
    """Upstream's OTLP/HTTP (protobuf) span exporter, sending :func:`encode_request`'s bytes.

    Upstream's ``export()`` encodes inline, so this one is upstream's
    ``export()`` (opentelemetry-exporter-otlp-proto-http 1.45) with the
    encoder swapped: the same size limit, the same client (the
    ``OTEL_EXPORTER_OTLP_*`` settings, retries with backoff, compression,
    TLS) and the same exporter metrics. Where the upstream release installed
    lacks the parts it calls, every export is upstream's own, encoder
    included: slower, never wrong.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        client, metrics = getattr(self, "_client", None), getattr(self, "_metrics", None)
        self._wire = callable(getattr(client, "export", None)) and callable(getattr(metrics, "export_operation", None))

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self._wire or getattr(self, "_shutdown", False):
            return super().export(spans)  # type: ignore[no-any-return]
        with self._metrics.export_operation(len(spans)) as result:
            try:
                data = encode_request(spans)
            except Exception as error:  # noqa: BLE001 - as upstream: a batch that cannot be encoded is lost, logged
                log.error("Failed to encode span batch: %s", error)
                result.error = error
                return SpanExportResult.FAILURE
            limit = getattr(self, "_max_request_size", 0) or 0
            if 0 < limit < len(data):
                log.warning("Dropping span batch: serialized size %d bytes exceeds max_request_size %d bytes.",
                            len(data), limit)  # fmt: skip
                result.error = ValueError(f"span request of {len(data)} bytes exceeds max_request_size {limit}")
                return SpanExportResult.FAILURE
            sent = self._client.export(data)
            if not sent.success:
                result.error = sent.error
                status = getattr(sent, "status_code", None)
                result.error_attrs = {"http.response.status_code": status} if status is not None else None
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS
