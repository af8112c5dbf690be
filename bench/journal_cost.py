"""What the open-span journal costs a span: the SDK's start and end with and without it, in one run.

Each round times N spans (a stage span's name and attributes) started and
ended through an SDK tracer whose provider has a processor that only queues,
then the same with :class:`~cadscope.tracing.SpanJournal` added (appends to
its file on start and end, on the data directory's filesystem). Rounds
alternate; the figure is the median of the paired differences per span, with
its 95 % interval. Target: a few microseconds a span.

    python bench/journal_cost.py [--spans 20000] [--rounds 9] [--dir DIR] [--write FILE]
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time

from _common import bootstrap, publish
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider

from cadscope.tracing import SpanJournal


class Queueing(SpanProcessor):
    """What a batch processor does on a span's end: queue it, up to its queue's size (its export
    thread empties the queue; keeping every span would time the garbage collector instead)."""

    def __init__(self) -> None:
        self.spans: collections.deque[ReadableSpan] = collections.deque(maxlen=2048)

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


ATTRIBUTES = {"cad.stage": "export", "cad.job_id": "job-0123456789abcdef", "cad.flow_type": "parametric"}


def per_span_us(provider: TracerProvider, spans: int) -> float:
    tracer = provider.get_tracer("bench")
    with tracer.start_as_current_span("run/cadscope.run_job"):
        start = time.perf_counter()
        for _ in range(spans):
            tracer.start_span("cad.stage export", attributes=ATTRIBUTES).end()
        return (time.perf_counter() - start) / spans * 1e6


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spans", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--dir", help="where the journal is written (default: a temporary directory)")
    parser.add_argument("--write")
    args = parser.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="journal-cost-")
    bare, journaled = TracerProvider(), TracerProvider()
    bare.add_span_processor(Queueing())
    journaled.add_span_processor(Queueing())
    journaled.add_span_processor(SpanJournal(directory))
    without, with_journal = [], []
    for round_ in range(args.rounds):
        order = [(bare, without), (journaled, with_journal)]
        for provider, results in order if round_ % 2 == 0 else reversed(order):
            results.append(per_span_us(provider, args.spans))
    added = bootstrap([j - b for j, b in zip(with_journal, without, strict=True)])
    lines = [
        f"### The open-span journal's cost a span ({time.strftime('%Y-%m-%d')}, {args.rounds} rounds of "
        f"{args.spans:,} spans)",
        "",
        "| SDK span start + end | µs a span |",
        "| --- | --- |",
        f"| without the journal | {sorted(without)[len(without) // 2]:.1f} |",
        f"| with the journal | {sorted(with_journal)[len(with_journal) // 2]:.1f} |",
        f"| **added by the journal** (median of paired differences, 95 % interval) | **{added[0]:.1f}** "
        f"[{added[1]:.1f}–{added[2]:.1f}] |",
    ]
    publish("\n" + "\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
