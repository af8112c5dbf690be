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
and gives a span that keeps its data in plain fields and is itself the
``ReadableSpan`` handed to the tracer's span processor at ``end()`` (it
refuses every change after that, so no copy is needed). What it leaves out,
on purpose:

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

:func:`start_deferred_span` goes one step further, for a span whose parent
arrives as W3C headers (a Celery message's): it keeps the headers and makes
the span's ids and sampling decision only when something first asks for
them. A task that starts spans of its own, or logs with a trace id, asks at
once, on its own thread, and its span is then the one
:func:`start_lean_span` would have given. A task that does neither (most of
a fleet's short tasks) leaves it to the first reader after ``end()``:
:class:`~cadscope.tracing._processor.BoundedBatchSpanProcessor` does it on
its export thread, a batch at a time, where the code is warm, rather than
once per task between other processes' work (bench/RESULTS.md, "Deferred
task span"). The decision is the same either way: it depends on the
headers, the trace id and the sampler, and is only offered to the SDK's own
samplers, which decide on those alone and give back the attributes they are
given. A span whose decision turns out "drop" stops recording and is never
handed to a processor, as the SDK's non-recording span.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from collections.abc import Callable, Mapping
from time import time_ns
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import propagate, trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import sampling as sdk_sampling
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import DEFAULT_TRACE_STATE
from opentelemetry.util import types

from ._compiled import wirec
from ._ids import PinnableIdGenerator

__all__ = [
    "LeanSpan",
    "accepts_traceparent",
    "deferring_tracer",
    "drops_unsampled_remote",
    "sdk_sampler",
    "start_deferred_span",
    "start_lean_span",
]

log = logging.getLogger(__name__)

_UNSET = Status(StatusCode.UNSET)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_DEFAULT = TraceFlags(TraceFlags.DEFAULT)
_RANDOM = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)  # W3C Trace Context level 2; absent in older APIs
_PRIMITIVE = (str, bool, int, float)
# A deferred span is resolved once, by whichever thread asks first. Reentrant:
# resolving may log (a malformed tracestate), and a JSON log line asks the
# current span, this one, for its ids.
_RESOLVING = threading.RLock()
_TRACEPARENT = re.compile("[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO_TRACE_ID, _ZERO_SPAN_ID = "0" * 32, "0" * 16
_ODD_HEX = frozenset("13579bdf")  # the last flags digit of a traceparent whose sampled bit is set


def _as_is(key: object, value: object) -> bool:
    """Whether ``BoundedAttributes`` (with no length limit) would store this pair unchanged."""
    return type(key) is str and bool(key) and type(value) in _PRIMITIVE


class LeanSpan(trace.Span, sdk_trace.ReadableSpan):
    """A recording span that is handed to the span processor once, at its end, as itself.

    Not shared between threads while it runs: Celery runs one task at a time
    in a pool process, and this span lives exactly as long as that task run.
    A deferred span (``_context`` None until resolved) may be resolved by
    another thread after ``end()``; resolving takes a lock.
    """

    # What every span starts with, read from the class until a span changes it: fewer stores per task.
    _resolving = False
    _recording = True
    _events: tuple[()] | BoundedList = ()
    _links = ()
    _status = _UNSET
    _end_time: int | None = None
    _instrumentation_info = None

    def __init__(self, tracer: sdk_trace.Tracer, name: str, span_context: SpanContext | None,
                 parent: SpanContext | None, kind: SpanKind, attributes: dict[str, Any], start_time: int,
                 carrier: dict[str, str] | None = None) -> None:  # fmt: skip
        self._tracer = tracer
        self._name = name
        self._context: SpanContext | None = span_context
        self._parent = parent
        self._carrier = carrier  # a deferred span's propagation headers, until resolved
        self._kind = kind
        self._attributes: dict[str, Any] | BoundedAttributes = attributes
        self._start_time = start_time
        self._resource = tracer.resource
        self._instrumentation_scope = tracer._instrumentation_scope

    # The ids, made when first asked for if deferred ----------------------

    @property
    def deferred(self) -> bool:
        """Whether the ids and sampling decision are still to be made."""
        return self._context is None

    def _resolve(self) -> SpanContext:
        with _RESOLVING:
            if self._context is not None:
                return self._context
            if self._resolving:  # asked again, on this thread, while resolving
                return trace.INVALID_SPAN_CONTEXT
            self._resolving = True
            try:
                known = _sampled_w3c_child(self._tracer, self._carrier or {})
                if known is not None:
                    span_context, self._parent = known  # recording, as it was started
                else:
                    parent_context = propagate.extract(self._carrier or {}, context=context_api.Context())
                    span_context, parent, sampling = _decide(
                        self._tracer, parent_context, self._name, self._kind, self._attributes, pin=False
                    )
                    self._parent, self._recording = parent, sampling.decision.is_recording()
            except Exception:  # a sampler or propagator that raises: this span is lost, the task is not
                span_context, self._recording = trace.INVALID_SPAN_CONTEXT, False
                self._context = span_context  # before logging: a JSON log line asks this span for its ids
                log.exception("could not resolve the deferred span %r", self._name)
            finally:
                self._resolving = False
            self._context, self._carrier = span_context, None
            return span_context

    def get_span_context(self) -> SpanContext:
        return self._context if self._context is not None else self._resolve()

    @property
    def context(self) -> SpanContext:
        return self._context if self._context is not None else self._resolve()

    @property
    def parent(self) -> SpanContext | None:
        if self._context is None:
            self._resolve()
        return self._parent

    def is_recording(self) -> bool:
        return self._end_time is None and self._recording

    # Recording -----------------------------------------------------------

    def _ended(self, what: str) -> bool:
        """True if a change must be ignored: with a warning after ``end()``, silently when not recording."""
        if self._end_time is not None:
            log.warning("%s on ended span.", what)
            return True
        return not self._recording

    def _bounded(self) -> BoundedAttributes:
        if not isinstance(self._attributes, BoundedAttributes):
            limits = self._tracer._span_limits
            self._attributes = BoundedAttributes(
                limits.max_span_attributes, self._attributes, max_value_len=limits.max_span_attribute_length,
                immutable=False,
            )  # fmt: skip
        return self._attributes

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self._end_time is not None or not self._recording:  # _ended(), inline: once per task
            self._ended("Setting attribute")  # warns after end()
            return
        attributes, limits = self._attributes, self._tracer._span_limits
        most = limits.max_span_attributes
        if (
            type(attributes) is dict
            and limits.max_span_attribute_length is None
            and type(key) is str  # _as_is(), inline
            and key
            and type(value) in _PRIMITIVE
            and (key in attributes or most is None or len(attributes) < most)
        ):
            attributes[key] = value
        else:
            self._bounded()[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        if not self._ended("Setting attribute"):
            for key, value in attributes.items():
                self.set_attribute(key, value)

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        if self._ended("Adding event"):
            return
        limits = self._tracer._span_limits
        if not isinstance(self._events, BoundedList):
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
        if self._end_time is not None:
            log.warning("Calling end() on ended span.")
            return
        self._end_time = end_time if end_time is not None else time_ns()
        if self._recording:  # False only for a deferred span resolved to "drop": no processor sees it
            self._tracer.span_processor.on_end(self)

    def __repr__(self) -> str:
        return f'LeanSpan(name="{self._name}", context={self._context})'


def _decide(tracer: sdk_trace.Tracer, context: context_api.Context | None, name: str, kind: SpanKind,
            attributes: types.Attributes, pin: bool = True,
            ) -> tuple[SpanContext, SpanContext | None, sdk_sampling.SamplingResult]:  # fmt: skip
    """The SDK tracer's decisions for a new span: its context, its parent, the sampler's result.

    ``pin=False`` takes a fresh span id even inside :func:`~cadscope.tracing.pinned_span_id`:
    a deferred span resolved there must not take the id pinned for the span about to start.
    """
    current = trace.get_current_span(context).get_span_context()
    parent: SpanContext | None = current
    if current.is_valid:
        trace_id, random = current.trace_id, current.trace_flags & _RANDOM
    else:
        parent, trace_id = None, tracer.id_generator.generate_trace_id()
        random = _RANDOM if _RANDOM and tracer.id_generator.is_trace_id_random() else 0
    sampling = tracer.sampler.should_sample(context, trace_id, name, kind, attributes, None)
    flags = TraceFlags((_SAMPLED if sampling.decision.is_sampled() else _DEFAULT) | random)
    span_id = _new_span_id(tracer, pin)
    span_context = SpanContext(trace_id, span_id, is_remote=False, trace_flags=flags, trace_state=sampling.trace_state)
    return span_context, parent, sampling


def _span_ids(tracer: sdk_trace.Tracer, pin: bool) -> Callable[[], int]:
    """What gives a span id from the tracer's generator; ``pin=False``: one that passes over an id pinned for
    the span about to start."""
    generator = tracer.id_generator
    if not pin and isinstance(generator, PinnableIdGenerator):
        return generator.generate_unpinned_span_id
    return generator.generate_span_id


def _new_span_id(tracer: sdk_trace.Tracer, pin: bool) -> int:
    """A span id from the tracer's generator; ``pin=False`` passes over an id pinned for the span about to start."""
    return _span_ids(tracer, pin)()


def accepts_traceparent(traceparent: str) -> bool:
    """Whether the W3C propagator extracts a valid parent from this 55-character ``traceparent``
    (version 00's length): lower-case hex fields, a version other than ``ff``, ids not all zero."""
    return (
        _TRACEPARENT.fullmatch(traceparent) is not None
        and not traceparent.startswith("ff")
        and traceparent[3:35] != _ZERO_TRACE_ID
        and traceparent[36:52] != _ZERO_SPAN_ID
    )


# (global propagator, sampler) -> whether _sampled_w3c_child may decide for them; one entry, the last asked.
_KNOWN: tuple[object, object, bool] = (None, None, False)


def _w3c_only(textmap: object) -> bool:
    """Whether ``textmap`` is the SDK's W3C trace-context propagator, alone or composed with the W3C
    baggage one (the default, ``OTEL_PROPAGATORS=tracecontext,baggage``); not a subclass, not another
    propagator that reads the same headers."""
    if type(textmap) is TraceContextTextMapPropagator:
        return True
    if type(textmap) is not CompositePropagator:
        return False
    kinds = {type(p) for p in getattr(textmap, "_propagators", ())}
    return TraceContextTextMapPropagator in kinds and kinds <= {TraceContextTextMapPropagator, W3CBaggagePropagator}


def _remote_parent_sampler(sampler: object, sampled: bool) -> object:
    """The sampler that decides for a child of a remote parent with this sampled flag: ``ParentBased``'s
    delegate (read off the SDK's private fields; None where missing), any other sampler itself."""
    if isinstance(sampler, sdk_sampling.ParentBased):
        return getattr(sampler, "_remote_parent_sampled" if sampled else "_remote_parent_not_sampled", None)
    return sampler


def _samples_sampled_remote(sampler: object) -> bool:
    """Whether ``sampler`` records and samples every span whose parent is remote and sampled, with the
    parent's trace state and no attributes of its own: the SDK's ``ALWAYS_ON``, or its ``ParentBased``
    (every ``parentbased_*`` of ``OTEL_TRACES_SAMPLER``) with the default ``remote_parent_sampled``."""
    if not sdk_sampler(sampler):
        return False
    decides = _remote_parent_sampler(sampler, sampled=True)
    return (
        type(decides) is sdk_sampling.StaticSampler
        and getattr(decides, "_decision", None) is sdk_sampling.Decision.RECORD_AND_SAMPLE
    )


def _sampled_w3c_child(tracer: sdk_trace.Tracer, carrier: Mapping[str, str]) -> tuple[SpanContext, SpanContext] | None:
    """The span context and parent that ``propagate.extract`` and :func:`_decide` give a new span whose
    ``carrier`` holds a valid, sampled version-00-length ``traceparent``, read off the header directly;
    None where that is not known without them (another propagator or sampler, another header).

    A deferred task span is resolved a batch at a time on the export thread: through the propagator
    and the sampler that cost 14 µs a span in a loop, this 6-9 µs (bench/RESULTS.md, "Resolving the
    deferred span"; ``bench/span_cost.py``)."""
    global _KNOWN
    traceparent = carrier.get("traceparent")
    if type(traceparent) is not str or len(traceparent) != 55 or traceparent[-1] not in _ODD_HEX:
        return None
    textmap, sampler = propagate.get_global_textmap(), tracer.sampler
    known = _KNOWN
    if known[0] is not textmap or known[1] is not sampler:
        known = _KNOWN = (textmap, sampler, _w3c_only(textmap) and _samples_sampled_remote(sampler))
    if not known[2]:
        return None
    header = carrier.get("tracestate")
    compiled = _W3C_CHILD
    if compiled is not None:  # the same, compiled
        return compiled(traceparent, header, _trace_state, _span_ids(tracer, pin=False))
    if not accepts_traceparent(traceparent):
        return None
    trace_id, flags = int(traceparent[3:35], 16), int(traceparent[53:55], 16)
    state = _trace_state(header) if header is not None else None
    parent = SpanContext(trace_id, int(traceparent[36:52], 16), is_remote=True, trace_flags=TraceFlags(flags),
                         trace_state=state)  # fmt: skip
    child = SpanContext(trace_id, _new_span_id(tracer, pin=False), is_remote=False,
                        trace_flags=TraceFlags(_SAMPLED | (flags & _RANDOM)),
                        trace_state=parent.trace_state)  # fmt: skip
    return child, parent


def _trace_state(header: str) -> TraceState:
    """A ``tracestate`` header's TraceState, as the W3C propagator reads it."""
    return TraceState.from_header([header])


def _compiled_w3c_child() -> Callable[..., tuple[SpanContext, SpanContext] | None] | None:
    """``_wirec.sampled_w3c_child``, configured: :func:`_sampled_w3c_child`'s reading of the header
    and its two SpanContexts, compiled (the export thread does it for every task span: 4.1 µs in
    Python, bench/span_cost.py); None where there is no compiled module (:func:`._compiled.wirec`)."""
    module = wirec()
    if module is None:
        return None
    module.configure_w3c(SpanContext, tuple(TraceFlags(n) for n in range(256)), DEFAULT_TRACE_STATE, _RANDOM)
    w3c_child: Callable[..., tuple[SpanContext, SpanContext] | None] = module.sampled_w3c_child
    return w3c_child


_W3C_CHILD = _compiled_w3c_child()


def _enabled(tracer: sdk_trace.Tracer) -> bool:
    """The SDK tracer's own on/off switch (``_is_enabled``; absent in older SDKs: on)."""
    is_enabled = getattr(tracer, "_is_enabled", None)
    return is_enabled is None or bool(is_enabled())


def _bound_if_needed(span: LeanSpan, plain: bool = False) -> LeanSpan:
    """``span`` with its attributes bounded if the tracer's limits, or a pair (unless the caller
    vouches for every pair: ``plain``), need it."""
    limits = span._tracer._span_limits
    attributes, most = span._attributes, limits.max_span_attributes
    if not (
        limits.max_span_attribute_length is None
        and (most is None or len(attributes) <= most)
        and (plain or all(_as_is(k, v) for k, v in attributes.items()))
    ):
        span._bounded()
    return span


def start_lean_span(tracer: trace.Tracer, name: str, context: context_api.Context | None = None,
                    kind: SpanKind = SpanKind.INTERNAL, attributes: types.Attributes = None) -> trace.Span:  # fmt: skip
    """Start a span as ``tracer.start_span()`` would: a :class:`LeanSpan` with
    the SDK's tracer, that tracer's ``start_span()`` with any other."""
    if type(tracer) is not sdk_trace.Tracer:
        return tracer.start_span(name, context=context, kind=kind, attributes=attributes)
    if not _enabled(tracer):
        return trace.NonRecordingSpan(trace.get_current_span(context).get_span_context())
    span_context, parent, sampling = _decide(tracer, context, name, kind, attributes)
    if not sampling.decision.is_recording():
        return trace.NonRecordingSpan(span_context)
    initial: Mapping[str, Any] = sampling.attributes or {}
    return _bound_if_needed(LeanSpan(tracer, name, span_context, parent, kind, dict(initial), time_ns()))


def deferring_tracer(tracer: trace.Tracer) -> sdk_trace.Tracer | None:
    """``tracer`` if :func:`start_deferred_span` can defer with it (the SDK's,
    enabled, with one of the SDK's own samplers), else None."""
    if type(tracer) is not sdk_trace.Tracer:
        return None
    if _enabled(tracer) and sdk_sampler(tracer.sampler):
        return tracer
    return None


def sdk_sampler(sampler: object) -> bool:
    """Whether ``sampler`` is one of the SDK's own, which decide on a span's ids and parent alone and
    give back the attributes they are given: the samplers a deferred span is offered to."""
    return type(sampler).__module__ == sdk_sampling.__name__


def drops_unsampled_remote(sampler: sdk_sampling.Sampler) -> bool:
    """Whether ``sampler`` drops every span whose parent is remote and not
    sampled, whatever its trace id: the SDK's ``ALWAYS_OFF``, or its
    ``ParentBased`` (every ``parentbased_*`` of ``OTEL_TRACES_SAMPLER``) with
    the default ``remote_parent_not_sampled``. Read off the SDK's private
    fields; where they are missing, False (the eager path)."""
    decides = _remote_parent_sampler(sampler, sampled=False)
    return (
        isinstance(decides, sdk_sampling.StaticSampler)
        and getattr(decides, "_decision", None) is sdk_sampling.Decision.DROP
    )


def start_deferred_span(tracer: sdk_trace.Tracer, name: str, carrier: dict[str, str],
                        kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping[str, Any] | None = None,
                        recording: bool = True, plain: bool = False) -> LeanSpan:  # fmt: skip
    """A :class:`LeanSpan` whose parent is what the global propagator extracts
    from ``carrier`` and whose ids and sampling decision are made when first
    asked for. Only for a tracer :func:`deferring_tracer` gives, and a carrier that
    holds nothing but the span's own context (no baggage).

    ``recording=False`` is for a decision known to be "drop" before it is
    made (a valid unsampled parent and a sampler that
    :func:`drops_unsampled_remote`): the span records nothing and no
    processor sees it, as the SDK's non-recording span; its ids are still
    made, the same way, if something asks for them.

    ``plain=True`` says that ``attributes`` is a dict of the caller's own, given
    away (the span keeps it), every key a non-empty str and every value a str,
    bool, int or float: then only the tracer's limits are checked, not each
    pair (the Celery task span, once per task)."""
    kept = attributes if plain and type(attributes) is dict else dict(attributes or {})
    span = LeanSpan(tracer, name, None, None, kind, kept, time_ns(), carrier)
    if not recording:
        span._recording = False
    return _bound_if_needed(span, plain=kept is attributes)  # the caller's own dict: vouched for
