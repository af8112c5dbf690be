"""The compiled part of the export thread's work per task span (``_wirec``), where there is one.

``cadscope.tracing._wirec`` (``_wirec.c``, built by ``setup.py``; optional) encodes a task
span as OTLP (:mod:`._otlpwire`) and reads its sampled ``traceparent`` (:mod:`._lean`), what a
worker's export thread does for every task: 9.5 µs a span in Python, 2.8 compiled
(bench/RESULTS.md, "The export thread's work, compiled"). Each has a Python path that gives
the same result, and takes it where the module was not built (no C compiler), where
``CADSCOPE_COMPILED=0`` turns it off, or where the API's ``SpanContext`` is no longer the
tuple the module reads and makes.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

from opentelemetry.trace import SpanContext, TraceFlags
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

from .._compiled import compiled_wanted

__all__ = ["wirec"]

log = logging.getLogger(__name__)


def wirec() -> ModuleType | None:
    """``_wirec``, or None where the Python paths must do its work."""
    return _loaded() if compiled_wanted() else None


@functools.cache
def _loaded() -> ModuleType | None:
    """``_wirec`` if it was built and reads SpanContext as the API makes it: checked once a process,
    for :mod:`._otlpwire` and :mod:`._lean` both."""
    try:
        from . import _wirec
    except ImportError:
        return None
    # SpanContext.__new__ makes tuple.__new__(cls, (trace_id, span_id, is_remote, flags, state, is_valid)).
    probe = SpanContext(3, 5, is_remote=True, trace_flags=TraceFlags(1), trace_state=None)
    if not (isinstance(probe, tuple) and tuple(probe) == (3, 5, True, TraceFlags(1), DEFAULT_TRACE_STATE, True)):
        log.warning("SpanContext is not the tuple cadscope's compiled span encoding reads; encoding in Python")
        return None
    return _wirec
