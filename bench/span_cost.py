"""What one span costs the worker, part by part, ours vs. upstream's, in one process.

- **start → end**: a CONSUMER span with a task's attributes, from start to end
  (context attach/detach and one attribute set at the end included), through
  the SDK's ``start_span()`` vs. cadscope's lean task span
  (``cadscope.tracing._lean``), into a span processor that only queues.
- **resolve**: a deferred task span's ids and sampling decision, made on the
  export thread: through the global propagator and the tracer's sampler (the
  general path, forced) vs. read off a sampled ``traceparent`` where those
  would decide the same (the defaults); the two are checked to agree first.
  Each span has a trace id of its own, as each task has a request of its own.
- **encode**: the OTLP ``ExportTraceServiceRequest`` for a batch of 512 such
  spans (cadscope's lean task spans, as a worker exports them), upstream's
  encoder (``encode_spans(...).SerializeToString()``) vs. cadscope's
  (``cadscope.tracing._otlpwire.encode_request``); the two are checked to
  give the same bytes first. Each batch holds task ids the string cache has
  not seen, as a worker's do. Up to 6f00ed3 this row encoded the SDK's
  spans of the first part instead (the exporter below kept the first spans
  it was given), which take the encoder's general path.
- **compiled**: where ``cadscope.tracing._wirec`` was built, the direct
  reading of the ``traceparent`` and the encoding again, in Python vs. compiled.

Best of 5 repeats of N iterations, CPU time of this thread, as a ratio within
the same run. bench/task_cpu.py measures the same changes in Celery's task
loop, where caches are colder and every figure is larger.

    python bench/span_cost.py [--n 20000] [--write bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterator

from _common import publish
from opentelemetry import context, trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, Tracer, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from cadscope.tracing import PinnableIdGenerator, _lean, _otlpwire
from cadscope.tracing._lean import start_deferred_span, start_lean_span
from cadscope.tracing._otlpwire import encode_request
from cadscope.tracing._processor import BoundedBatchSpanProcessor

BATCH, BATCHES = 512, 20
PARENT = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
                     trace_flags=TraceFlags(TraceFlags.SAMPLED))  # fmt: skip
PARENT_HEADER = f"00-{PARENT.trace_id:032x}-{PARENT.span_id:016x}-01"


class _Keep(SpanExporter):
    def __init__(self, limit: int = 2048) -> None:
        self.spans: list[ReadableSpan] = []
        self.limit = limit

    def export(self, spans):  # type: ignore[no-untyped-def]
        lean = [span for span in spans if type(span) is _lean.LeanSpan]  # a task span, as a worker exports
        self.spans.extend(lean[: self.limit - len(self.spans)])
        return SpanExportResult.SUCCESS


def best_us(fn: Callable[[], object], n: int) -> float:
    fn()
    best = float("inf")
    for _ in range(5):
        started = time.thread_time()
        for _ in range(n):
            fn()
        best = min(best, (time.thread_time() - started) / n * 1e6)
    return best


@contextlib.contextmanager
def _resolving(direct: bool) -> Iterator[None]:
    """Deferred spans resolve by reading their ``traceparent`` (``direct``) or, forced, through the
    propagator and the sampler, as every deferred span did before."""
    saved = _lean._sampled_w3c_child
    if not direct:
        _lean._sampled_w3c_child = lambda tracer, carrier: None  # type: ignore[assignment]
    try:
        yield
    finally:
        _lean._sampled_w3c_child = saved


def _deferred(tracer: Tracer, traceparent: str) -> _lean.LeanSpan:
    return start_deferred_span(tracer, "run/cad.job", {"traceparent": traceparent}, SpanKind.CONSUMER, {})


def resolve_us(tracer: Tracer, n: int, direct: bool) -> float:
    """CPU per deferred span to resolve it, best of 5 × ``n`` spans."""
    best = float("inf")
    with _resolving(direct):
        for _ in range(5):
            spans = [_deferred(tracer, traceparent) for traceparent in _traceparents(n)]
            started = time.thread_time()
            for span in spans:
                span.get_span_context()
            best = min(best, (time.thread_time() - started) / n * 1e6)
    return best


def _traceparents(n: int) -> list[str]:
    return [f"00-{random.getrandbits(128) | 1:032x}-{random.getrandbits(64) | 1:016x}-01" for _ in range(n)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--write")
    args = parser.parse_args()

    keep = _Keep(limit=BATCH * BATCHES)
    provider = TracerProvider(id_generator=PinnableIdGenerator())
    provider.add_span_processor(BoundedBatchSpanProcessor(keep))
    tracer = provider.get_tracer("cadscope.celery")
    parent = trace.set_span_in_context(NonRecordingSpan(PARENT))
    counter = iter(range(10**9))

    def attributes() -> dict[str, str]:
        return {"celery.action": "run", "celery.task_name": "cad.job", "messaging.destination": "cadscope",
                "messaging.message.id": f"job-{next(counter):08d}"}  # fmt: skip

    def sdk_span() -> None:
        span = tracer.start_span("run/cad.job", context=parent, kind=SpanKind.CONSUMER, attributes=attributes())
        token = context.attach(trace.set_span_in_context(span, parent))
        span.set_attribute("celery.state", "SUCCESS")
        span.end()
        context.detach(token)

    def lean_span() -> None:
        span = start_lean_span(tracer, "run/cad.job", parent, SpanKind.CONSUMER, attributes())
        token = context.attach(trace.set_span_in_context(span, parent))
        span.set_attribute("celery.state", "SUCCESS")
        span.end()
        context.detach(token)

    sdk_us, lean_us = best_us(sdk_span, args.n), best_us(lean_span, args.n)
    deferring = _lean.deferring_tracer(tracer)
    if deferring is None or _lean._sampled_w3c_child(deferring, {"traceparent": PARENT_HEADER}) is None:
        raise SystemExit("a deferred span would not read its traceparent directly here")
    resolved = {}
    for direct in (False, True):  # the same header both ways: the same trace id, flags, trace state, parent
        with _resolving(direct):
            span = _deferred(deferring, PARENT_HEADER)
            ctx = span.get_span_context()
        resolved[direct] = (ctx.trace_id, ctx.trace_flags, ctx.trace_state, span.parent)
    if resolved[False] != resolved[True]:
        raise SystemExit(f"the two ways of resolving disagree: {resolved}")
    general_us, direct_us = resolve_us(deferring, args.n, False), resolve_us(deferring, args.n, True)
    direct_python_us = None
    if _lean._W3C_CHILD is not None:
        compiled_w3c, _lean._W3C_CHILD = _lean._W3C_CHILD, None
        try:
            direct_python_us = resolve_us(deferring, args.n, True)
        finally:
            _lean._W3C_CHILD = compiled_w3c
    provider.force_flush()
    for i in range(BATCH * BATCHES - len(keep.spans)):  # more spans to encode, if --n made too few
        lean_span()
        if i % 1000 == 999:
            provider.force_flush()
    provider.force_flush()
    if len(keep.spans) != BATCH * BATCHES:
        raise SystemExit(f"{len(keep.spans)} spans kept, {BATCH * BATCHES} expected")
    batches = [keep.spans[i : i + BATCH] for i in range(0, len(keep.spans), BATCH)]
    # Cycle through 20 batches: by the time a batch comes round again its task ids
    # have left cadscope's string cache (4,096 entries), so each id is new to it,
    # as in a worker; the values that repeat (task name, state) stay cached.
    ours, upstream = itertools.cycle(batches), itertools.cycle(batches)
    for batch in batches:
        if encode_request(batch) != encode_spans(batch).SerializeToString():
            raise SystemExit("the encoders disagree")
    rounds = max(BATCHES, args.n // 1000)
    upstream_us = best_us(lambda: encode_spans(next(upstream)).SerializeToString(), rounds) / BATCH
    ours_us = best_us(lambda: encode_request(next(ours)), rounds) / BATCH
    compiled = _otlpwire._LEAN_FIELD
    python_us = None
    if compiled is not None:
        _otlpwire._LEAN_FIELD = None
        try:
            python_us = best_us(lambda: encode_request(next(ours)), rounds) / BATCH
        finally:
            _otlpwire._LEAN_FIELD = compiled
    provider.shutdown()
    lines = [
        f"\n### One span, part by part ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; `python bench/span_cost.py`, best of 5 × {args.n})\n",
        "| part | upstream | cadscope | ratio |",
        "| --- | --- | --- | --- |",
        f"| task span, start → end (SDK span vs. lean span) | {sdk_us:.1f} µs | {lean_us:.1f} µs "
        f"| **{lean_us / sdk_us:.2f}** |",
        f"| deferred task span, resolved (propagator and sampler vs. the `traceparent` read directly) "
        f"| {general_us:.1f} µs | {direct_us:.1f} µs | **{direct_us / general_us:.2f}** |",
        f"| OTLP encoding, per span in a batch of 512 (same bytes, checked) | {upstream_us:.1f} µs | {ours_us:.1f} µs "
        f"| **{ours_us / upstream_us:.2f}** |",
    ]
    if direct_python_us is not None:
        ratio = direct_us / direct_python_us
        lines.append(f"| deferred task span, its `traceparent` read directly: in Python vs. compiled (`_wirec`) "
                     f"| {direct_python_us:.1f} µs | {direct_us:.1f} µs | **{ratio:.2f}** |")  # fmt: skip
    if python_us is not None:
        lines.append(f"| OTLP encoding, per span, cadscope's: in Python vs. compiled (`_wirec`) | {python_us:.1f} µs "
                     f"| {ours_us:.1f} µs | **{ours_us / python_us:.2f}** |")  # fmt: skip
    publish("\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
