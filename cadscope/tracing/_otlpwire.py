"""OTLP trace export requests written straight to protobuf wire bytes.

The OTLP exporters' encoder (``opentelemetry.exporter.otlp.proto.common``)
builds a tree of protobuf objects, one per span, attribute and value, and then
serialises it: on this project's 2-core VMs that costs about 90 us a span,
more than the span's own life in the SDK (bench/RESULTS.md, "One span, part
by part"; ``bench/span_cost.py``).
Every span a worker records passes through it on the export thread, which
shares the cores with the CAD jobs and the Celery pool.

:func:`encode_request` writes the same message, field for field, straight
into bytes. It follows upstream's encoder exactly, so that a collector cannot
tell the two apart (tests/test_otlpwire.py parses both and compares them,
bytes included, over spans with every value type, events, links, remote
parents, trace state, several resources and scopes):

- spans grouped by resource, then by instrumentation scope, in order of first
  appearance, with the scope message present even when empty;
- span ``flags`` with the "has is_remote" bit and, for a remote parent, the
  "is remote" bit; links carry their own context's bits and no trace state;
- an attribute whose value cannot be encoded (an int outside int64, a string
  with lone surrogates, an unknown type) is logged and left out, the rest of
  the span is kept.

A task span of the common shape (:func:`_lean_span`'s, every attribute a str,
bool, int or float, the UNSET status) is written by ``_wirec``, the same
encoding compiled (:mod:`._compiled`): 5.3 µs a span in Python, 0.8 compiled
(``bench/span_cost.py``). It gives None for any other span, which the Python
encoder writes.

Differs from upstream in one way only: a span or event name, or a status
message, that is not valid UTF-8 is sent with the bad characters replaced,
where upstream's encoder raises and loses the whole batch.

:class:`OTLPWireSpanExporter` is the OTLP/gRPC exporter (its configuration,
retries, compression and TLS all unchanged) sending these bytes, and
:class:`OTLPWireHTTPSpanExporter` the OTLP/HTTP one
(``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf``). Each lives in a module of
its own (``_otlpgrpc``, ``_otlphttp``), importable from here too, so that a
process imports only its protocol's client: each of upstream's costs a
process 0.15-0.25 s to import. Over HTTP an export is the
calling thread's work alone; gRPC's client keeps threads of its own busy for
seconds after every call. With its BDP probing off (``_otlpgrpc.CHANNEL_OPTIONS``)
they cost about three quarters of what the call itself does, at the span
processor's 5 s schedule; with it on, more than the call (bench/RESULTS.md,
"OTLP over HTTP" and "BDP probing off"; ``bench/export_cost.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from struct import Struct
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

from ._compiled import wirec
from ._lean import _UNSET, LeanSpan

if TYPE_CHECKING:
    from ._otlpgrpc import OTLPWireSpanExporter
    from ._otlphttp import OTLPWireHTTPSpanExporter

__all__ = ["OTLPWireHTTPSpanExporter", "OTLPWireSpanExporter", "encode_request"]

log = logging.getLogger(__name__)

_FIXED64 = Struct("<Q").pack
_FIXED32 = Struct("<I").pack
_DOUBLE = Struct("<d").pack
_SMALL = [bytes((n,)) for n in range(128)]
_INT64 = (-(1 << 63), (1 << 63) - 1)
_U64 = (1 << 64) - 1
_KIND = {SpanKind.INTERNAL: 1, SpanKind.SERVER: 2, SpanKind.CLIENT: 3, SpanKind.PRODUCER: 4, SpanKind.CONSUMER: 5}
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200


def _varint(n: int) -> bytes:
    if n < 128:
        return _SMALL[n]
    out = bytearray()
    while n >= 128:
        out.append((n & 127) | 128)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    n = len(payload)
    return tag + (_SMALL[n] if n < 128 else _varint(n)) + payload


def _text(value: str) -> bytes:
    return value.encode("utf-8", "replace")


def _any_value(value: Any) -> bytes:
    """An AnyValue message (every member of its oneof is sent, zero included).
    Raises on a value that cannot be encoded, as upstream does."""
    kind = type(value)
    if kind is str:
        return _field(b"\x0a", value.encode("utf-8"))
    if kind is int:
        if not _INT64[0] <= value <= _INT64[1]:
            raise ValueError(f"Value out of range: {value}")
        return b"\x18" + _varint(value & _U64)
    if kind is float:
        return b"\x21" + _DOUBLE(value)
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    # Subclasses and containers, in upstream's order of checks.
    if value is None:
        return b""
    if isinstance(value, bool):
        return _any_value(bool(value))
    if isinstance(value, str):
        return _any_value(str(value))
    if isinstance(value, int):
        return _any_value(int(value))
    if isinstance(value, float):
        return _any_value(float(value))
    if isinstance(value, bytes):
        return _field(b"\x3a", bytes(value))
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join([_field(b"\x0a", _any_value(v)) for v in value]))
    if isinstance(value, Mapping):
        return _field(b"\x32", b"".join([_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items()]))
    raise TypeError(f"Invalid type {type(value)} of value {value}")


def _key_value(key: str, value: Any) -> bytes:
    encoded = _field(b"\x12", _any_value(value))
    return _field(b"\x0a", key.encode("utf-8")) + encoded if key else encoded


# (tag, key, value) -> encoded field, for string values: most repeat from span
# to span (task names, states, stage names). Cleared when full.
_STRINGS: dict[tuple[bytes, str, str], bytes] = {}
_STRINGS_MAX = 4096


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> list[bytes]:
    out = []
    if attributes:
        for key, value in attributes.items():
            cached = (tag, key, value) if type(value) is str else None
            encoded = _STRINGS.get(cached) if cached is not None else None  # type: ignore[arg-type]
            if encoded is None:
                try:
                    encoded = _field(tag, _key_value(key, value))
                except Exception as error:  # noqa: BLE001 - upstream's rule: lose the attribute, keep the span
                    log.exception("Failed to encode key %s: %s", key, error)
                    continue
                if cached is not None:
                    if len(_STRINGS) >= _STRINGS_MAX:
                        _STRINGS.clear()
                    _STRINGS[cached] = encoded
            out.append(encoded)
    return out


def _flags(context: Any) -> bytes:
    """Span flags (fixed32): whether the parent's (or link's) context is remote is known, and its value."""
    return _FIXED32(_HAS_IS_REMOTE | _IS_REMOTE if context and context.is_remote else _HAS_IS_REMOTE)


def _head(context: Any, parent: Any, name: str, kind: SpanKind, start_time: int | None, end_time: int | None,
          attributes: Mapping[str, Any] | None) -> list[bytes]:  # fmt: skip
    """A span's fields from its ids to its attributes (1-9), in order."""
    assert context is not None
    out = [b"\x0a\x10", context.trace_id.to_bytes(16, "big"), b"\x12\x08", context.span_id.to_bytes(8, "big")]
    state = context.trace_state
    if state:
        out.append(_field(b"\x1a", _text(",".join([f"{k}={v}" for k, v in state.items()]))))
    if parent:
        out += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    if name:
        out.append(_field(b"\x2a", _text(name)))
    out += (b"\x30", _SMALL[_KIND[kind]])
    if start_time:
        out += (b"\x39", _FIXED64(start_time))
    if end_time:
        out += (b"\x41", _FIXED64(end_time))
    out += _attributes(b"\x4a", attributes)
    return out


def _status(status: Any) -> bytes:
    """The Status message (field 15), sent even when empty, as upstream does."""
    body = []
    if status.description:
        body.append(_field(b"\x12", _text(status.description)))
    if status.status_code.value:
        body += (b"\x18", _SMALL[status.status_code.value])
    return _field(b"\x7a", b"".join(body))


def _lean_span(span: LeanSpan) -> bytes:
    """:func:`_span` for a cadscope task span, resolved, with a plain attribute dict, no events and
    no links (every task that does not fail): its fields read directly. The general path reads them through
    the ReadableSpan properties, a dozen calls and four copies a span (``MappingProxyType``,
    ``tuple``), on the export thread of every pool process (bench/RESULTS.md, "Task hooks without
    super()"). The same bytes (tests/test_otlpwire.py)."""
    parent = span._parent
    out = _head(span._context, parent, span._name, span._kind, span._start_time, span._end_time, span._attributes)
    out += (_status(span._status), b"\x85\x01", _flags(parent))
    return b"".join(out)


def _span(span: ReadableSpan) -> bytes:
    if (
        type(span) is LeanSpan
        and span._context is not None  # resolved: a deferred span's ids are made by its properties
        and type(span._attributes) is dict
        and not span._events
        and not span._links
    ):
        return _lean_span(span)
    parent = span.parent
    out = _head(span.context, parent, span.name, span.kind, span.start_time, span.end_time, span.attributes)
    if span.dropped_attributes:
        out += (b"\x50", _varint(span.dropped_attributes))
    for event in span.events:
        body = [b"\x09", _FIXED64(event.timestamp)] if event.timestamp else []
        if event.name:
            body.append(_field(b"\x12", _text(event.name)))
        body += _attributes(b"\x1a", event.attributes)
        if event.dropped_attributes:
            body += (b"\x20", _varint(event.dropped_attributes))
        out.append(_field(b"\x5a", b"".join(body)))
    if span.dropped_events:
        out += (b"\x60", _varint(span.dropped_events))
    for link in span.links:
        body = [b"\x0a\x10", link.context.trace_id.to_bytes(16, "big"), b"\x12\x08",
                link.context.span_id.to_bytes(8, "big")]  # fmt: skip
        body += _attributes(b"\x22", link.attributes)
        if link.dropped_attributes:
            body += (b"\x28", _varint(link.dropped_attributes))
        body += (b"\x35", _flags(link.context))
        out.append(_field(b"\x6a", b"".join(body)))
    if span.dropped_links:
        out += (b"\x70", _varint(span.dropped_links))
    if span.status is not None:
        out.append(_status(span.status))
    out += (b"\x85\x01", _flags(parent))
    return b"".join(out)


def _compiled() -> Callable[[ReadableSpan], bytes | None] | None:
    """``_wirec.lean_span_field``, configured: a task span's ``_field(b"\\x12", _lean_span(span))``, or None
    for a span it does not write; None where there is no compiled module (:func:`._compiled.wirec`)."""
    module = wirec()
    if module is None:
        return None
    module.configure(LeanSpan, _UNSET, DEFAULT_TRACE_STATE, dict(_KIND))
    field: Callable[[ReadableSpan], bytes | None] = module.lean_span_field
    return field


_LEAN_FIELD = _compiled()


def _scope(scope: Any) -> bytes:
    if scope is None:
        return b""
    out = []
    if scope.name:
        out.append(_field(b"\x0a", _text(scope.name)))
    if scope.version:
        out.append(_field(b"\x12", _text(scope.version)))
    out += _attributes(b"\x1a", scope.attributes)
    return b"".join(out)


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """An ``ExportTraceServiceRequest`` holding ``spans``, serialised."""
    # Resource -> scope -> encoded spans. Resources and scopes are grouped by
    # equality, as upstream does, but hashed once per object, not once per span
    # (a Resource's hash is a JSON dump of its attributes).
    groups: dict[Any, dict[Any, list[bytes]]] = {}
    seen: dict[tuple[int, int], list[bytes]] = {}
    compiled = _LEAN_FIELD
    for span in spans:
        key = (id(span.resource), id(span.instrumentation_scope))
        bucket = seen.get(key)
        if bucket is None:
            scopes = groups.setdefault(span.resource, {})
            bucket = seen[key] = scopes.setdefault(span.instrumentation_scope or None, [])
        field = compiled(span) if compiled is not None else None
        bucket.append(field if field is not None else _field(b"\x12", _span(span)))
    out = []
    for resource, scopes in groups.items():
        body = [_field(b"\x0a", b"".join(_attributes(b"\x0a", resource.attributes)))]
        for scope, encoded in scopes.items():
            scope_spans = [_field(b"\x0a", _scope(scope)), *encoded]
            if scope is not None and scope.schema_url:
                scope_spans.append(_field(b"\x1a", _text(scope.schema_url)))
            body.append(_field(b"\x12", b"".join(scope_spans)))
        if resource.schema_url:
            body.append(_field(b"\x1a", _text(resource.schema_url)))
        out.append(_field(b"\x0a", b"".join(body)))
    return b"".join(out)


def __getattr__(name: str) -> Any:
    """The exporters, imported on first use (PEP 562): each pulls in its protocol's client."""
    if name == "OTLPWireSpanExporter":
        from ._otlpgrpc import OTLPWireSpanExporter

        return OTLPWireSpanExporter
    if name == "OTLPWireHTTPSpanExporter":
        from ._otlphttp import OTLPWireHTTPSpanExporter

        return OTLPWireHTTPSpanExporter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
