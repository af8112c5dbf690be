"""Helpers for tests of code that makes spans (public: users need them too)."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ._ids import PinnableIdGenerator

__all__ = ["InMemorySpanExporter", "in_memory_provider"]


def in_memory_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A provider that keeps finished spans in memory, with pinnable ids."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=PinnableIdGenerator())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter
