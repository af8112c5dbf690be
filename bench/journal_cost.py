"""What the open-span journal costs a span: the SDK's start and end with and without it, in one run.

Each round times N spans (a stage span's name and attributes) started and
ended through an SDK tracer whose provider has a processor that only queues,
then the same with :class:`~cadscope.tracing.SpanJournal` added, twice: as
deployed (a span that ends within the journal's delay, as most do, never
reaches the file) and with every span written (``delay_s=0``: what a span
open past the delay, or a parent, costs: a line on start and one on end).
Arms rotate; each figure is the median of the paired differences per span,
with its 95 % interval. Target: a few microseconds a span.

    python bench/journal_cost.py [--spans 20000] [--rounds 9] [--dir DIR] [--write FILE]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
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
    arms: dict[str, TracerProvider] = {}
    for arm, journal in (
        ("without", None),
        ("short", SpanJournal(os.path.join(directory, "short"))),
        ("written", SpanJournal(os.path.join(directory, "written"), delay_s=0)),
    ):
        provider = TracerProvider()
        provider.add_span_processor(Queueing())
        if journal is not None:
            provider.add_span_processor(journal)
        arms[arm] = provider
    results: dict[str, list[float]] = {arm: [] for arm in arms}
    for round_ in range(args.rounds):
        order = list(arms)
        for arm in order[round_ % 3 :] + order[: round_ % 3]:
            results[arm].append(per_span_us(arms[arm], args.spans))
    lines = [
        f"### The open-span journal's cost a span ({time.strftime('%Y-%m-%d')}, {args.rounds} rounds of "
        f"{args.spans:,} spans)",
        "",
        "| SDK span start + end | µs a span | added by the journal (median of paired differences, 95 % interval) |",
        "| --- | --- | --- |",
        f"| without the journal | {statistics.median(results['without']):.1f} | |",
    ]
    for arm, label in (("short", "a span that ends within the delay (most)"),
                       ("written", "a span written and ended (open past the delay, or a parent)")):  # fmt: skip
        added = bootstrap([j - b for j, b in zip(results[arm], results["without"], strict=True)])
        lines.append(f"| {label} | {statistics.median(results[arm]):.1f} | **{added[0]:.1f}** "
                     f"[{added[1]:.1f}–{added[2]:.1f}] |")  # fmt: skip
    publish("\n" + "\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
