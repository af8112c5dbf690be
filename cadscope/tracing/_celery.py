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

from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor

__all__ = ["instrument_celery", "uninstrument_celery"]

_lock = threading.Lock()
_ours = False


def instrument_celery(tracer_provider: trace.TracerProvider | None = None) -> bool:
    """Instrument Celery (publishing and task runs) with ``tracer_provider`` (the global one by
    default), unless something else already has. Returns True if this call instrumented it.
    Call it after fork in a prefork pool process (``worker_process_init``), as upstream advises."""
    global _ours
    with _lock:
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
        if _ours:
            CeleryInstrumentor().uninstrument()
            _ours = False
