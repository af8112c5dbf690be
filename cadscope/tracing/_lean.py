"""A recording span that costs a fraction of the SDK's, for the one span per Celery task.

The SDK's span is built to be shared between threads and extended by span
processors while it runs: a lock, bounded containers for attributes, events
and links, ``on_start`` and ``_on_ending`` calls into every processor, and at
``end()`` a copy of itself as a :class:`~opentelemetry.sdk.trace.ReadableSpan`
for ``on_end``. On this project's 2-core VMs that is about 80 us from
``start_span()`` to ``end()`` (bench/RESULTS.md, "One span, part by part"),
paid on every task by the pool process.

:func:`start_lean_span` takes the same decisions the SDK tracer takes, with
the tracer's own sampler, id generator, resource, scope and span limits,
and gives a span that keeps its data in plain fields and turns into one
``ReadableSpan`` at ``end()``, handed to the tracer's span processor. What it
leaves out, on purpose:

- processors see the span at its end only (``on_end``): ``on_start`` and
  ``_on_ending`` are not called. The SDK's own processors and cadscope's do
  nothing there; a processor that must see spans start needs the SDK span;
- links (a task run has a parent, not links); ``add_link`` is ignored with a
  debug log;
- the SDK's own tracer metrics (``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED``).

Attributes stay in a plain dict while every one is what the SDK's
``BoundedAttributes`` would keep unchanged (a primitive value under a
non-empty string key, within the count limit, no length limit set); the first
one that is not turns them into ``BoundedAttributes`` (type checks, limits,
the dropped count), as events' attributes always are.
A tracer that is not the SDK's gets its own ``start_span()``.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping
from time import time_ns
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util import types

__all__ = ["LeanSpan", "start_lean_span"]

log = logging.getLogger(__name__)

_UNSET = Status(StatusCode.UNSET)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_DEFAULT = TraceFlags(TraceFlags.DEFAULT)
_RANDOM = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)  # W3C Trace Context level 2; absent in older APIs
_PRIMITIVE = (str, bool, int, float)


def _within(count: int, limit: int | None) -> bool:
    return limit is None or count <= limit


def _as_is(key: object, value: object) -> bool:
    """Whether ``BoundedAttributes`` (with no length limit) would store this pair unchanged."""
    return type(key) is str and bool(key) and type(value) in _PRIMITIVE


class LeanSpan(trace.Span):
    """A recording span that is handed to the span processor once, at its end.

    Not shared between threads: Celery runs one task at a time in a pool
    process, and this span lives exactly as long as that task run.
    """

    __slots__ = ("_tracer", "_name", "_context", "_parent", "_kind", "_attributes", "_events", "_status",
                 "_start", "_end")  # fmt: skip

    def __init__(self, tracer: sdk_trace.Tracer, name: str, span_context: SpanContext, parent: SpanContext | None,
                 kind: SpanKind, attributes: dict[str, Any], start_time: int) -> None:  # fmt: skip
        self._tracer = tracer
        self._name = name
        self._context = span_context
        self._parent = parent
        self._kind = kind
        self._attributes: dict[str, Any] | BoundedAttributes = attributes
        self._events: BoundedList | None = None
        self._status = _UNSET
        self._start = start_time
        self._end: int | None = None

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end is None

    def _ended(self, what: str) -> bool:
        if self._end is not None:
            log.warning("%s on ended span.", what)
            return True
        return False

    def _bounded(self) -> BoundedAttributes:
        if not isinstance(self._attributes, BoundedAttributes):
            limits = self._tracer._span_limits
            self._attributes = BoundedAttributes(
                limits.max_span_attributes, self._attributes, max_value_len=limits.max_span_attribute_length,
                immutable=False,
            )  # fmt: skip
        return self._attributes

    def _set(self, key: str, value: types.AnyValue) -> None:
        attributes, limits = self._attributes, self._tracer._span_limits
        if (
            type(attributes) is dict
            and limits.max_span_attribute_length is None
            and _as_is(key, value)
            and (key in attributes or _within(len(attributes) + 1, limits.max_span_attributes))
        ):
            attributes[key] = value
        else:
            self._bounded()[key] = value

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if not self._ended("Setting attribute"):
            self._set(key, value)

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        if not self._ended("Setting attribute"):
            for key, value in attributes.items():
                self._set(key, value)

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        if self._ended("Adding event"):
            return
        limits = self._tracer._span_limits
        if self._events is None:
            self._events = BoundedList(limits.max_events)
        bounded = BoundedAttributes(
            limits.max_event_attributes, attributes, max_value_len=limits.max_attribute_length, immutable=True
        )
        self._events.append(sdk_trace.Event(name, bounded, timestamp))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        log.debug("links are not recorded on a task span")

    def update_name(self, name: str) -> None:
        if not self._ended("Updating name"):
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # The SDK's rules: OK is final, UNSET is ignored.
        if self._ended("Setting status") or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        elif description is not None:
            log.warning("Description %s ignored. Use either `Status` or `(StatusCode, Description)`", description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(self, exception: BaseException, attributes: types.Attributes = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:  # fmt: skip
        """The SDK's exception event: type, message, stack trace, escaped."""
        kind = type(exception)
        module = kind.__module__
        event: dict[str, Any] = {
            "exception.type": f"{module}.{kind.__qualname__}" if module and module != "builtins" else kind.__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(kind, exception, exception.__traceback__)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event.update(attributes)
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._ended("Calling end()"):
            return
        self._end = end_time if end_time is not None else time_ns()
        tracer = self._tracer
        tracer.span_processor.on_end(
            sdk_trace.ReadableSpan(
                self._name,
                context=self._context,
                parent=self._parent,
                resource=tracer.resource,
                attributes=self._attributes,
                events=self._events if self._events is not None else (),
                kind=self._kind,
                status=self._status,
                start_time=self._start,
                end_time=self._end,
                instrumentation_scope=tracer._instrumentation_scope,
            )
        )

    def __repr__(self) -> str:
        return f'LeanSpan(name="{self._name}", context={self._context})'


def start_lean_span(tracer: trace.Tracer, name: str, context: context_api.Context | None = None,
                    kind: SpanKind = SpanKind.INTERNAL, attributes: types.Attributes = None) -> trace.Span:  # fmt: skip
    """Start a span as ``tracer.start_span()`` would: a :class:`LeanSpan` with
    the SDK's tracer, that tracer's ``start_span()`` with any other."""
    if type(tracer) is not sdk_trace.Tracer:
        return tracer.start_span(name, context=context, kind=kind, attributes=attributes)
    is_enabled = getattr(tracer, "_is_enabled", None)
    current = trace.get_current_span(context).get_span_context()
    if is_enabled is not None and not is_enabled():
        return trace.NonRecordingSpan(current)
    parent: SpanContext | None = current
    if current.is_valid:
        trace_id, random = current.trace_id, current.trace_flags & _RANDOM
    else:
        parent, trace_id = None, tracer.id_generator.generate_trace_id()
        random = _RANDOM if _RANDOM and tracer.id_generator.is_trace_id_random() else 0
    sampling = tracer.sampler.should_sample(context, trace_id, name, kind, attributes, None)
    flags = TraceFlags((_SAMPLED if sampling.decision.is_sampled() else _DEFAULT) | random)
    span_context = SpanContext(
        trace_id, tracer.id_generator.generate_span_id(), is_remote=False, trace_flags=flags,
        trace_state=sampling.trace_state,
    )  # fmt: skip
    if not sampling.decision.is_recording():
        return trace.NonRecordingSpan(span_context)
    limits = tracer._span_limits
    initial: Mapping[str, Any] = sampling.attributes or {}
    span = LeanSpan(tracer, name, span_context, parent, kind, dict(initial), time_ns())
    if not (
        limits.max_span_attribute_length is None
        and _within(len(initial), limits.max_span_attributes)
        and all(_as_is(k, v) for k, v in initial.items())
    ):
        span._bounded()
    return span
