"""Celery task spans from opentelemetry-instrumentation-celery, on the publisher and the worker.

cadscope does not make task spans of its own. Upstream's ``CeleryInstrumentor``
makes the PRODUCER span ``apply_async/<task>`` (and injects ``traceparent``
into the message headers) and, in the worker, the CONSUMER span
``run/<task>``, a child of the producer's: one trace from the request to the
deepest OCCT span. Every span goes through the provider's span processors,
``on_start`` and ``on_end``.

:func:`instrument_celery` instruments it unless it already is (a worker run
under ``opentelemetry-instrument`` instruments it itself): either way a task
run gets exactly one consumer span. :func:`uninstrument_celery` undoes only
what :func:`instrument_celery` did.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import signals
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor

__all__ = ["instrument_celery", "uninstrument_celery"]

_lock = threading.Lock()
_ours = False
_TRACE_HEADERS = ("traceparent", "tracestate", "baggage")


def _drop_trace_headers_that_are_not_text(task: Any = None, **_: Any) -> None:
    """A message's trace headers come from whoever can publish to the broker. The W3C propagators
    take strings only; before 0.63b0, opentelemetry-instrumentation-celery handed them whatever
    the message held, a number or a dict say, and its task-run handler then raised, leaving the
    task without a span. Such headers are removed from the request first: the task starts a new
    trace, as for any invalid header."""
    request = getattr(task, "request", None)
    for key in _TRACE_HEADERS:
        value = getattr(request, key, None)
        if value is not None and not isinstance(value, str):
            setattr(request, key, None)


def instrument_celery(tracer_provider: trace.TracerProvider | None = None) -> bool:
    """Instrument Celery (publishing and task runs) with ``tracer_provider`` (the global one by
    default), unless something else already has. Returns True if this call instrumented it.
    Call it after fork in a prefork pool process (``worker_process_init``), as upstream advises."""
    global _ours
    with _lock:
        # Connected first, so it runs before upstream's task-run handler whenever cadscope instruments.
        signals.task_prerun.connect(_drop_trace_headers_that_are_not_text, weak=False)
        instrumentor = CeleryInstrumentor()
        if instrumentor.is_instrumented_by_opentelemetry:
            return False
        instrumentor.instrument(tracer_provider=tracer_provider)
        _ours = True
        return True


def uninstrument_celery() -> None:
    """Undo :func:`instrument_celery`; an instrumentation someone else made is left in place."""
    global _ours
    with _lock:
        signals.task_prerun.disconnect(_drop_trace_headers_that_are_not_text)
        if _ours:
            CeleryInstrumentor().uninstrument()
            _ours = False
