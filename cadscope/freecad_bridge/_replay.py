"""Turn the child's probe events into real spans and observations.

A child's span is started, through the ordinary tracer API, when its
``start`` event arrives (so every span processor's ``on_start`` sees it while
it is open, as for any span of the worker's) and ended when its ``end`` event
does, with the child's own span id (a tracer with
:class:`~cadscope.tracing.PinnableIdGenerator`) and timestamps. A span the
child opened and never closed is ended by :meth:`Replayer.close_open` with
ERROR status and ``error.type``.

Every event is untrusted input: ids, names, attributes and timestamps are
checked and bounded (32 attributes an event, 256 characters a string, a
budget of open spans and of attribute bytes a run), and a bad event is
dropped and counted, never raised.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, Status, StatusCode

from ..tracing import pinned_span_id

__all__ = ["EventObserver", "Replayer"]

_SPAN_ID = re.compile(r"^[0-9a-f]{16}$")
# Span names are "area.operation", optionally with one qualifier: "cad.stage export".
_NAME = re.compile(r"^[a-z][a-z0-9_.]{0,63}(?: [a-z0-9_]{1,32})?$")
_METRIC = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
_ATTR_KEY = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
MAX_ATTRIBUTES = 32
MAX_STRING = 256
# Spans open at once, and attribute bytes over a run: what a hostile child can make the worker hold.
MAX_OPEN_SPANS = 1_000
MAX_ATTRIBUTE_BYTES = 4 << 20
# A child's clock is this host's clock; anything further off than this is garbage.
_CLOCK_SLACK_NS = 60 * 1_000_000_000


class EventObserver(Protocol):
    """What a runner's caller does with the child's telemetry (metrics, progress)."""

    def span_ended(
        self, name: str, attributes: Mapping[str, Any], duration_s: float, error_type: str | None
    ) -> None: ...

    def metric(self, name: str, value: float, attributes: Mapping[str, Any]) -> None: ...

    def progress(self, attributes: Mapping[str, Any]) -> None: ...


def clean_attributes(raw: Any) -> dict[str, Any] | None:
    """Primitive attributes under bounded keys; None if ``raw`` is not a mapping."""
    if not isinstance(raw, dict):
        return None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if len(out) >= MAX_ATTRIBUTES:
            break
        if not isinstance(key, str) or not _ATTR_KEY.fullmatch(key):
            continue
        if isinstance(value, str):
            out[key] = value[:MAX_STRING]
        elif isinstance(value, (bool, int, float)):
            out[key] = value
    return out


def _attribute_bytes(attributes: Mapping[str, Any]) -> int:
    return sum(len(key) + (len(value) if isinstance(value, str) else 8) for key, value in attributes.items())


class Replayer:
    """Re-emits one child's spans under ``parent`` (the subprocess span), through ``tracer``
    (give it a tracer from :func:`~cadscope.tracing.pinnable_tracer`, so the spans keep the
    child's ids)."""

    def __init__(
        self,
        tracer: trace.Tracer,
        parent: Span,
        observer: EventObserver | None = None,
        *,
        max_spans: int = 10_000,
        max_open_spans: int = MAX_OPEN_SPANS,
        max_attribute_bytes: int = MAX_ATTRIBUTE_BYTES,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        self._tracer = tracer
        self._parent = parent.get_span_context()
        self._recording = parent.is_recording()
        self._observer = observer
        self._max_spans = max_spans
        self._max_open = max_open_spans
        self._attribute_budget = max_attribute_bytes
        # span id -> (the live span or None when not recording, attributes, start)
        self._open: dict[str, tuple[Span | None, dict[str, Any], str, int]] = {}
        self._known: dict[str, SpanContext] = {}
        self._started = 0
        self._not_before = time.time_ns() - _CLOCK_SLACK_NS
        self.dropped: Counter[str] = Counter()
        self._on_drop = on_drop
        self.hello: dict[str, Any] = {}
        self.manifest: dict[str, Any] | None = None
        self.errors: list[tuple[str, str]] = []

    @property
    def open_spans(self) -> int:
        """Spans the child has opened and not yet ended."""
        return len(self._open)

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        if self._on_drop is not None:
            self._on_drop(reason)

    def _timestamp(self, value: Any) -> int | None:
        if type(value) is not int:
            return None
        if not self._not_before <= value <= time.time_ns() + _CLOCK_SLACK_NS:
            return None
        return value

    def handle(self, event: Any) -> None:
        """Dispatch one decoded JSON event; anything malformed is counted."""
        if not isinstance(event, dict):
            self.drop("not_an_object")
            return
        kind = event.get("t")
        if kind == "start":
            self._start(event)
        elif kind == "end":
            self._end(event)
        elif kind == "metric":
            self._metric(event)
        elif kind == "progress":
            attrs = clean_attributes(event.get("a"))
            if attrs is None:
                self.drop("bad_attributes")
            elif self._observer is not None:
                self._observer.progress(attrs)
        elif kind == "hello":
            attrs = clean_attributes(event.get("a"))
            if attrs is None:
                self.drop("bad_attributes")
            else:
                self.hello = attrs
        elif kind == "result":
            if isinstance(event.get("a"), dict) and self.manifest is None:
                self.manifest = event["a"]
            else:
                self.drop("bad_result")
        else:
            self.drop("unknown_type")

    def _spend(self, attributes: Mapping[str, Any]) -> bool:
        cost = _attribute_bytes(attributes)
        if cost > self._attribute_budget:
            self.drop("attribute_budget")
            return False
        self._attribute_budget -= cost
        return True

    def _start(self, event: dict[str, Any]) -> None:
        span_id, name = event.get("id"), event.get("n")
        start = self._timestamp(event.get("ts"))
        attrs = clean_attributes(event.get("a"))
        if not isinstance(span_id, str) or not _SPAN_ID.fullmatch(span_id) or span_id == "0" * 16:
            self.drop("bad_span_id")
            return
        if span_id in self._open or span_id in self._known:
            self.drop("duplicate_span_id")
            return
        if not isinstance(name, str) or not _NAME.fullmatch(name) or start is None or attrs is None:
            self.drop("bad_span")
            return
        if self._started >= self._max_spans:
            self.drop("too_many_spans")
            return
        if len(self._open) >= self._max_open:
            self.drop("too_many_open_spans")
            return
        if not self._spend(attrs):
            return
        self._started += 1
        # An unknown parent (garbage, or a span we dropped) hangs off the
        # subprocess span: the tree stays connected.
        parent_id = event.get("p")
        parent = self._known.get(parent_id, self._parent) if isinstance(parent_id, str) else self._parent
        span: Span | None = None
        if self._recording:
            with pinned_span_id(int(span_id, 16)):
                span = self._tracer.start_span(
                    name,
                    context=trace.set_span_in_context(NonRecordingSpan(parent)),
                    start_time=start,
                    attributes=attrs,
                )
            context = span.get_span_context()
        else:
            context = SpanContext(self._parent.trace_id, int(span_id, 16), False, self._parent.trace_flags)
        self._known[span_id] = context
        self._open[span_id] = (span, attrs, name, start)

    def _end(self, event: dict[str, Any]) -> None:
        span_id = event.get("id")
        opened = self._open.pop(span_id, None) if isinstance(span_id, str) else None
        if opened is None:
            self.drop("end_without_start")
            return
        span, attrs, name, start = opened
        end = self._timestamp(event.get("ts"))
        more = clean_attributes(event.get("a"))
        if end is None or more is None or not self._spend(more):
            self.drop("bad_span")
            end, more = time.time_ns(), {}
        end = max(end, start)
        attrs.update(more)
        error_type: str | None = None
        message = ""
        if event.get("s") == "error":
            raw_type = event.get("e")
            error_type = raw_type[:64] if isinstance(raw_type, str) and raw_type else "error"
            raw_message = event.get("m")
            message = raw_message[:MAX_STRING] if isinstance(raw_message, str) else ""
            self.errors.append((error_type, message))
        if span is not None:
            _finish(span, more, error_type, message, end)
        if self._observer is not None:
            self._observer.span_ended(name, attrs, (end - start) / 1e9, error_type)

    def _metric(self, event: dict[str, Any]) -> None:
        name, value = event.get("n"), event.get("v")
        attrs = clean_attributes(event.get("a"))
        if not isinstance(name, str) or not _METRIC.fullmatch(name) or attrs is None:
            self.drop("bad_metric")
            return
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < float("inf"):
            self.drop("bad_metric")  # NaN fails the range check too
            return
        if self._observer is not None:
            self._observer.metric(name, float(value), attrs)

    def close_open(self, error_type: str, end_ns: int | None = None) -> int:
        """End every span the child left open (crash, kill, timeout) as ERROR."""
        end_ns = end_ns or time.time_ns()
        count = 0
        message = f"span left open by the child ({error_type})"
        # Innermost first, so parents end after their children.
        for span_id in reversed(list(self._open)):
            span, attrs, name, start = self._open.pop(span_id)
            if span is not None:
                _finish(span, {}, error_type, message, max(end_ns, start))
            if self._observer is not None:
                self._observer.span_ended(name, attrs, max(end_ns - start, 0) / 1e9, error_type)
            count += 1
        return count


def _finish(span: Span, attributes: Mapping[str, Any], error_type: str | None, message: str, end: int) -> None:
    if attributes:
        span.set_attributes(attributes)
    if error_type is not None:
        span.set_attribute("error.type", error_type)
        span.set_status(Status(StatusCode.ERROR, message))
    span.end(end_time=end)
