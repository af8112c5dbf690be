"""Span ids chosen ahead: the child's own ids for its re-emitted spans, a dead process's for its journal.

A CAD child makes its span ids itself (it has no SDK), and a journal records
the ids of spans a process opened; both are re-emitted later through the
ordinary tracer API (``start_span``/``end``), so every span processor sees
them. The SDK's public extension point for ids is its ``IdGenerator``:
:class:`PinnableIdGenerator` hands out a pinned span id once, and delegates
everything else to the generator it wraps. :func:`pinnable_tracer` gives a
tracer of cadscope's own that uses one, without touching the provider or
any other tracer.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from opentelemetry import trace
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

__all__ = ["PinnableIdGenerator", "pinnable_tracer", "pinned_ids", "pinned_span_id"]

_local = threading.local()


class PinnableIdGenerator(IdGenerator):
    """``delegate``'s ids (random by default), except inside :func:`pinned_span_id` or
    :func:`pinned_ids` on the same thread."""

    def __init__(self, delegate: IdGenerator | None = None) -> None:
        self.delegate = delegate if delegate is not None else RandomIdGenerator()

    def generate_span_id(self) -> int:
        pinned = getattr(_local, "span_id", None)
        if pinned is not None:
            _local.span_id = None
            return int(pinned)
        return self.delegate.generate_span_id()

    def generate_trace_id(self) -> int:
        pinned = getattr(_local, "trace_id", None)
        if pinned is not None:
            _local.trace_id = None
            return int(pinned)
        return self.delegate.generate_trace_id()


@contextlib.contextmanager
def pinned_span_id(span_id: int) -> Iterator[None]:
    """The next span started on this thread by a tracer with a :class:`PinnableIdGenerator`
    gets ``span_id`` (any other tracer makes its own)."""
    _local.span_id = span_id
    try:
        yield
    finally:
        _local.span_id = None


@contextlib.contextmanager
def pinned_ids(trace_id: int, span_id: int) -> Iterator[None]:
    """As :func:`pinned_span_id`, and a root span started there gets ``trace_id`` too (a span
    with a parent takes its parent's trace id, and asks for none)."""
    _local.trace_id, _local.span_id = trace_id, span_id
    try:
        yield
    finally:
        _local.trace_id = _local.span_id = None


def pinnable_tracer(
    name: str, tracer_provider: trace.TracerProvider | None = None, version: str | None = None
) -> trace.Tracer:
    """A tracer of ``tracer_provider`` (the global one by default) whose span ids can be pinned.

    The tracer is a new object of cadscope's own: its id generator wraps the
    provider's, which stays as it is for every other tracer. A tracer that is
    not the SDK's (a vendor's, or the API's no-op) is returned unchanged; its
    spans then get ids of their own, and the tree stays connected through
    their parents.
    """
    tracer = trace.get_tracer(name, version, tracer_provider)
    if isinstance(tracer, sdk_trace.Tracer) and not isinstance(tracer.id_generator, PinnableIdGenerator):
        tracer.id_generator = PinnableIdGenerator(tracer.id_generator)
    return tracer
