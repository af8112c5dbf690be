"""The consumer side of Celery tracing, lean: one CONSUMER span per task run.

opentelemetry-instrumentation-celery stays on the publishing side (the API and
the CLI): its PRODUCER span ``apply_async/<task>`` injects ``traceparent`` into
the message headers. In the worker, its ``task_prerun``/``task_postrun``
handlers cost about twice what this module does per task (bench/RESULTS.md,
"Task overhead"), mostly in attributes that every span then carries through
export: the ``repr()`` of ``delivery_info``, ``reply_to``, ``timelimit``,
``hostname`` (already on the resource as ``host.name``), a conversation id
equal to the message id, plus a no-op duration histogram we never export.

This module keeps what a trace reader uses, under the same names, so queries
written against upstream keep working:

- span ``run/<task name>``, kind CONSUMER, child of the publisher's span
  (a parent, not a link: one trace from the request to the deepest OCCT span);
- ``celery.action="run"``, ``celery.task_name``, ``messaging.message.id``,
  ``messaging.destination`` (the routing key), ``celery.retries`` when > 0,
  ``celery.state`` at the end;
- ERROR status and an exception event on failure (unless the task declares the
  exception in ``throws``), ``celery.retry.reason`` on retry.

Header values that are not strings are ignored rather than coerced, so a
hostile message cannot feed lists or numbers into the W3C propagator; invalid
``traceparent`` values start a new trace, as the W3C spec says.

The span is a :class:`~cadscope.tracing._lean.LeanSpan`: the same exported
span as the SDK's for the same calls, at about half the cost. Where nothing
would be lost, it is deferred (:func:`~cadscope.tracing._lean.start_deferred_span`):
the task thread keeps the message's ``traceparent``/``tracestate`` and the
span gets its ids and sampling decision when first asked for: by the task
(a child span, a log line) or else on the span processor's export thread.
That is when the propagator is W3C's, the message carries no baggage, its
``traceparent`` (if any) has version 00's form with the sampled flag set, and
the tracer is the SDK's with one of its own samplers. Every other message
takes the eager path (an unsampled task thus gets its non-recording span at
once and never reaches the span queue).

If opentelemetry-instrumentation-celery is also instrumented in the process
(``opentelemetry-instrument celery worker``, say), its consumer handlers are
disconnected while ours are connected, so a task run gets one span, not two
nested ones; its publisher handlers stay.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from opentelemetry import context, propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode

from ._lean import deferring_tracer, start_deferred_span, start_lean_span

__all__ = ["instrument_celery_worker", "uninstrument_celery_worker"]

log = logging.getLogger(__name__)


class _RequestGetter(Getter[Any]):
    """Reads propagation headers off a Celery request (headers become attributes)."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        value = getattr(carrier, key, None)
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Any) -> list[str]:
        return []


_GETTER = _RequestGetter()
_W3C_FIELDS = frozenset({"traceparent", "tracestate", "baggage"})
_ODD_HEX = frozenset("13579bdf")  # the last flags digit of a traceparent whose sampled bit is set


def _deferrable(request: Any, w3c: bool) -> dict[str, str] | None:
    """The message's span context headers, if its span may be deferred: the
    propagator is W3C's (trace context and baggage, or either), the message
    carries no baggage (which must be in the task's context from the start),
    and its ``traceparent``, if any, is a version-00 one with the sampled flag
    (an unsampled task gets its non-recording span at once, and never
    reaches the span queue)."""
    if not w3c or isinstance(getattr(request, "baggage", None), str):
        return None
    traceparent = getattr(request, "traceparent", None)
    if not isinstance(traceparent, str):
        return {}
    if len(traceparent) != 55 or traceparent[-1] not in _ODD_HEX:
        return None
    tracestate = getattr(request, "tracestate", None)
    if isinstance(tracestate, str):
        return {"traceparent": traceparent, "tracestate": tracestate}
    return {"traceparent": traceparent}


def _upstream_consumer_handlers() -> list[tuple[Any, Any]]:
    """opentelemetry-instrumentation-celery's task-run handlers, if it is instrumented here."""
    try:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
    except ImportError:
        return []
    upstream = CeleryInstrumentor()  # a singleton
    if not upstream.is_instrumented_by_opentelemetry:
        return []
    names = (("task_prerun", "_trace_prerun"), ("task_postrun", "_trace_postrun"),
             ("task_failure", "_trace_failure"), ("task_retry", "_trace_retry"))  # fmt: skip
    return [
        (getattr(signals, signal), getattr(upstream, method)) for signal, method in names if hasattr(upstream, method)
    ]


class _WorkerTracing:
    def __init__(self, tracer_provider: trace.TracerProvider | None) -> None:
        self._tracer = trace.get_tracer("cadscope.celery", tracer_provider=tracer_provider)
        # task id -> (span, context token); one entry per task running in this process.
        self._live: dict[str, tuple[trace.Span, object]] = {}
        self._displaced: list[tuple[Any, Any]] = []
        self._textmap: object = None
        self._w3c = False

    def connect(self) -> None:
        for signal, handler in _upstream_consumer_handlers():
            if signal.disconnect(handler):
                self._displaced.append((signal, handler))
        signals.task_prerun.connect(self.on_prerun, weak=False)
        signals.task_postrun.connect(self.on_postrun, weak=False)
        signals.task_failure.connect(self.on_failure, weak=False)
        signals.task_retry.connect(self.on_retry, weak=False)

    def disconnect(self) -> None:
        signals.task_prerun.disconnect(self.on_prerun)
        signals.task_postrun.disconnect(self.on_postrun)
        signals.task_failure.disconnect(self.on_failure)
        signals.task_retry.disconnect(self.on_retry)
        for signal, handler in self._displaced:
            signal.connect(handler, weak=False)
        self._displaced.clear()
        self._live.clear()

    def on_prerun(self, task_id: str | None = None, task: Any = None, **_: Any) -> None:
        if task is None or not task_id:
            return
        request = task.request
        attributes: dict[str, Any] = {
            "celery.action": "run",
            "celery.task_name": task.name,
            "messaging.message.id": task_id,
        }
        delivery = getattr(request, "delivery_info", None)
        if isinstance(delivery, dict) and isinstance(delivery.get("routing_key"), str):
            attributes["messaging.destination"] = delivery["routing_key"]
        retries = getattr(request, "retries", 0)
        if isinstance(retries, int) and retries > 0:
            attributes["celery.retries"] = retries
        textmap = propagate.get_global_textmap()
        if textmap is not self._textmap:  # set at startup, and by tests
            self._textmap, self._w3c = textmap, textmap.fields <= _W3C_FIELDS
        sdk_tracer = deferring_tracer(self._tracer)
        carrier = _deferrable(request, self._w3c) if sdk_tracer is not None else None
        span: trace.Span
        if carrier is not None and sdk_tracer is not None:
            span = start_deferred_span(sdk_tracer, f"run/{task.name}", carrier, SpanKind.CONSUMER, attributes)
            token = context.attach(trace.set_span_in_context(span))
        else:
            parent = propagate.extract(request, getter=_GETTER)
            span = start_lean_span(self._tracer, f"run/{task.name}", parent, SpanKind.CONSUMER, attributes)
            token = context.attach(trace.set_span_in_context(span, parent))
        self._live[task_id] = (span, token)

    def on_postrun(self, task_id: str | None = None, state: str | None = None, **_: Any) -> None:
        entry = self._live.pop(task_id, None) if task_id else None
        if entry is None:
            return
        span, token = entry
        if state is not None:
            span.set_attribute("celery.state", str(state))
        span.end()
        try:
            context.detach(token)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - a foreign context change must not fail the task
            log.debug("context detach failed", exc_info=True)

    def on_failure(self, task_id: str | None = None, exception: BaseException | None = None,
                   sender: Any = None, **_: Any) -> None:  # fmt: skip
        entry = self._live.get(task_id) if task_id else None
        if entry is None or not entry[0].is_recording():
            return
        span = entry[0]
        throws = getattr(sender, "throws", ())
        if exception is not None and throws and isinstance(exception, tuple(throws)):
            return  # an expected exception: Celery logs it at INFO, we do not call it an error
        if exception is not None:
            span.record_exception(exception)
            span.set_attribute("error.type", type(exception).__qualname__)
        span.set_status(Status(StatusCode.ERROR, str(exception) if exception is not None else None))

    def on_retry(self, request: Any = None, reason: Any = None, **_: Any) -> None:
        task_id = getattr(request, "id", None)
        entry = self._live.get(task_id) if isinstance(task_id, str) else None
        if entry is not None and entry[0].is_recording():
            entry[0].set_attribute("celery.retry.reason", str(reason))


_installed: _WorkerTracing | None = None


def instrument_celery_worker(tracer_provider: trace.TracerProvider | None = None) -> None:
    """Trace every task this process runs (idempotent; call after fork, in
    ``worker_process_init``, once the tracer provider exists)."""
    global _installed
    if _installed is None:
        _installed = _WorkerTracing(tracer_provider)
        _installed.connect()


def uninstrument_celery_worker() -> None:
    global _installed
    if _installed is not None:
        _installed.disconnect()
        _installed = None
