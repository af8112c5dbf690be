"""The bounded span processor: a slow, hung or failing exporter costs counted
spans, never the caller's time (unit level; the worker-level scenario with a
real gRPC collector that hangs is in test_reliability.py)."""

from __future__ import annotations

import threading
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cadscope.tracing._processor import BoundedBatchSpanProcessor


class HangingExporter(InMemorySpanExporter):
    """Accepts the first batch and then never returns until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def export(self, spans):  # type: ignore[no-untyped-def]
        self.entered.set()
        self.release.wait(30)
        return super().export(spans)


class FailingExporter(InMemorySpanExporter):
    def export(self, spans):  # type: ignore[no-untyped-def]
        return SpanExportResult.FAILURE


def _provider(processor: BoundedBatchSpanProcessor) -> TracerProvider:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(processor)
    return provider


def _end_spans(provider: TracerProvider, count: int) -> None:
    tracer = provider.get_tracer("test")
    for i in range(count):
        tracer.start_span(f"s{i}").end()


def test_every_span_is_exported_and_flush_waits_for_it():
    exporter = InMemorySpanExporter()
    processor = BoundedBatchSpanProcessor(exporter, max_queue_size=50, max_export_batch_size=7)
    _end_spans(_provider(processor), 40)
    assert processor.force_flush(5000)
    names = [s.name for s in exporter.get_finished_spans()]
    assert names == [f"s{i}" for i in range(40)]  # all of them, in order
    assert processor.dropped == {"queue_full": 0, "export_failed": 0, "shutdown": 0}


class RecordingExporter(InMemorySpanExporter):
    """Records batch sizes; each export takes ``delay`` seconds."""

    def __init__(self, delay: float = 0.0, gated: bool = False) -> None:
        super().__init__()
        self.delay = delay
        self.batches: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()  # with ``gated``: the first export waits for it
        if not gated:
            self.release.set()

    def export(self, spans):  # type: ignore[no-untyped-def]
        self.entered.set()
        self.release.wait(30)
        time.sleep(self.delay)
        self.batches.append(len(spans))
        return super().export(spans)


def test_spans_that_arrive_during_an_export_wait_to_fill_the_next_batch():
    # Woken by a full batch, the export thread sends full batches only. It used
    # to drain the queue instead, so spans that came in during an export went
    # out straight after it as a small batch: a stream of small batches (each a
    # round trip to the collector) under a steady load.
    exporter = RecordingExporter(gated=True)
    processor = BoundedBatchSpanProcessor(exporter, max_queue_size=100, max_export_batch_size=4,
                                          schedule_delay_millis=60_000)  # fmt: skip
    provider = _provider(processor)
    _end_spans(provider, 4)
    assert exporter.entered.wait(5)
    _end_spans(provider, 2)  # while the first batch is being exported: it waits for the release
    exporter.release.set()
    deadline = time.monotonic() + 30
    while not exporter.batches and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # room for a wrong second export of the two spans to show itself
    assert exporter.batches == [4]
    _end_spans(provider, 2)  # fills the next batch
    deadline = time.monotonic() + 5
    while len(exporter.batches) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    _end_spans(provider, 1)
    assert processor.force_flush(5000)  # a flush sends what is left
    assert exporter.batches == [4, 4, 1]
    assert [s.name for s in exporter.get_finished_spans()] == ["s0", "s1", "s2", "s3", "s0", "s1", "s0", "s1", "s0"]


def test_the_schedule_delay_sends_a_partial_batch():
    exporter = RecordingExporter()
    processor = BoundedBatchSpanProcessor(exporter, max_queue_size=100, max_export_batch_size=50,
                                          schedule_delay_millis=50)  # fmt: skip
    _end_spans(_provider(processor), 3)
    deadline = time.monotonic() + 5
    while not exporter.batches and time.monotonic() < deadline:
        time.sleep(0.01)
    assert exporter.batches == [3]


def test_hung_exporter_costs_counted_spans_not_the_callers_time():
    exporter = HangingExporter()
    drops: list[tuple[str, int]] = []
    processor = BoundedBatchSpanProcessor(
        exporter, max_queue_size=10, max_export_batch_size=5, schedule_delay_millis=10,
        on_drop=lambda reason, n: drops.append((reason, n)),
    )  # fmt: skip
    provider = _provider(processor)
    _end_spans(provider, 5)
    assert exporter.entered.wait(5)  # the first batch is stuck in export

    started = time.monotonic()
    _end_spans(provider, 100)  # the queue holds 10; 90 are dropped on the spot
    assert processor.dropped["queue_full"] == 90
    assert not processor.force_flush(200)  # gives up at its timeout ...
    processor.shutdown(300)  # ... and so does shutdown, counting what it leaves behind
    # Far below the exporter's 30 s hang: the caller gave up at its own timeouts.
    assert time.monotonic() - started < 20, "the caller waited on a hung exporter"
    assert processor.dropped == {"queue_full": 90, "export_failed": 0, "shutdown": 10}
    assert sum(n for _, n in drops) == 100 and {r for r, _ in drops} == {"queue_full", "shutdown"}

    _end_spans(provider, 3)  # after shutdown: counted, not queued
    assert processor.dropped["shutdown"] == 13
    exporter.release.set()


def test_spans_ended_by_threads_during_shutdown_are_exported_or_counted():
    """Threads ending spans while the processor shuts down: every span is exported or counted as
    dropped, none lost between the two."""
    exporter = RecordingExporter(delay=0.002)
    processor = BoundedBatchSpanProcessor(exporter, max_queue_size=100_000, max_export_batch_size=64)
    provider = _provider(processor)
    tracer = provider.get_tracer("test")
    ended = [0] * 4
    shut = threading.Event()

    def end_spans(index: int) -> None:
        # Until shutdown has returned, then 100 more: some end before it, some during, some after.
        after = 0
        while after < 100 and ended[index] < 200_000:
            tracer.start_span(f"s{ended[index]}").end()
            ended[index] += 1
            after += shut.is_set()

    threads = [threading.Thread(target=end_spans, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while min(ended) < 100 and time.monotonic() < deadline:  # every thread is ending spans
        time.sleep(0.001)
    processor.shutdown(50)  # its flush gives up while the threads go on
    shut.set()
    for thread in threads:
        thread.join()
    total = sum(ended)
    # An export begun before shutdown may still be finishing: wait for the books to balance.
    deadline = time.monotonic() + 30
    while len(exporter.get_finished_spans()) + sum(processor.dropped.values()) < total:
        assert time.monotonic() < deadline, "spans neither exported nor counted"
        time.sleep(0.01)
    assert len(exporter.get_finished_spans()) + sum(processor.dropped.values()) == total
    assert processor.dropped["shutdown"] >= 4 * 100  # every span ended after shutdown returned, at least


def test_failed_exports_are_counted():
    processor = BoundedBatchSpanProcessor(FailingExporter(), max_queue_size=100, max_export_batch_size=10)
    _end_spans(_provider(processor), 25)
    assert processor.force_flush(5000)
    assert processor.dropped["export_failed"] == 25


def test_unsampled_spans_are_neither_queued_nor_counted():
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    exporter = InMemorySpanExporter()
    processor = BoundedBatchSpanProcessor(exporter, max_queue_size=5)
    provider = TracerProvider(sampler=ALWAYS_OFF, shutdown_on_exit=False)
    provider.add_span_processor(processor)
    _end_spans(provider, 20)
    assert processor.force_flush(5000)
    assert exporter.get_finished_spans() == () and sum(processor.dropped.values()) == 0


FORKED = """
import os, sys
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from cadscope.tracing._processor import BoundedBatchSpanProcessor

exporter = InMemorySpanExporter()
processor = BoundedBatchSpanProcessor(exporter, schedule_delay_millis=60_000)
provider = TracerProvider()
provider.add_span_processor(processor)
provider.get_tracer("t").start_span("before the fork").end()
assert processor.force_flush(5000)
pid = os.fork()
if pid == 0:  # its export thread stayed in the parent: the child needs one of its own
    provider.get_tracer("t").start_span("in the child").end()
    flushed = processor.force_flush(5000)
    names = [s.name for s in exporter.get_finished_spans()]
    os._exit(0 if flushed and names == ["before the fork", "in the child"] else 1)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_exports_through_an_export_thread_of_its_own():
    """The fork is noticed by ``os.register_at_fork``, not by a pid read on every span."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FORKED], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "0", out.stderr
