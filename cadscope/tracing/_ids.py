"""An id generator that can be told the next span id.

Child spans are re-emitted with the ids the child chose, so the child's
stderr and the trace agree. With the SDK's tracer the replay builds those
spans from the child's ids itself; this generator is for the other path,
spans started through ``start_span()``, where the SDK's public extension
point for ids is the provider's ``IdGenerator``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

__all__ = ["PinnableIdGenerator", "pinned_span_id"]

_local = threading.local()


class PinnableIdGenerator(RandomIdGenerator):
    """Random ids, except inside :func:`pinned_span_id` on the same thread."""

    def generate_span_id(self) -> int:
        pinned = getattr(_local, "span_id", None)
        if pinned is not None:
            _local.span_id = None
            return pinned
        return super().generate_span_id()

    def generate_unpinned_span_id(self) -> int:
        """A random span id, leaving a pinned one for the span it was pinned for."""
        return super().generate_span_id()


@contextlib.contextmanager
def pinned_span_id(span_id: int) -> Iterator[None]:
    """The next span started on this thread gets ``span_id`` (if the provider
    uses :class:`PinnableIdGenerator`; otherwise a fresh random one)."""
    _local.span_id = span_id
    try:
        yield
    finally:
        _local.span_id = None
