"""A batch span processor whose queue, flush and shutdown are all bounded.

Why not the SDK's ``BatchSpanProcessor``: it drops spans when its queue is
full but only says so in a log line (its counter goes to the OTel metrics
API, which this project does not export), and its ``force_flush`` calls the
exporter on the caller's thread and ignores its timeout
(open-telemetry/opentelemetry-python#4568). With a collector that accepts
connections and never answers, a Celery pool child would then sit in
``worker_process_shutdown`` for the exporter's whole retry budget per batch.

Here the caller never runs an export: ``on_end`` is an append to a bounded
deque (a deferred task span, :func:`~cadscope.tracing._lean.start_deferred_span`,
is queued as it is and gets its ids and sampling decision on the export
thread; one that turns out unsampled is left out there, as it would have
been here), ``force_flush`` and ``shutdown`` wait on an event with a deadline, and
every span that is not exported is counted by reason through ``on_drop``:

- ``queue_full``: the exporter fell behind and the queue was at its bound;
- ``export_failed``: the exporter returned FAILURE (after its own retries);
- ``shutdown``: still queued when shutdown's deadline passed, or ended after it.

Settings follow the standard ``OTEL_BSP_*`` variables and defaults.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable

from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, attach, detach, set_value
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from ._lean import LeanSpan

__all__ = ["BoundedBatchSpanProcessor", "DropCallback"]

log = logging.getLogger(__name__)

DropCallback = Callable[[str, int], None]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw)
    except ValueError:
        return default
    return value if value > 0 else default


# Forks seen by this process: a span processor's thread and queue stay in the parent. Counted by
# os.register_at_fork, which every fork from Python runs (os.fork, multiprocessing's and billiard's),
# rather than asked of the kernel on every span (os.getpid).
_forks = 0


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)


def _sampled(span: ReadableSpan) -> bool:
    context = span.context
    return context is not None and context.trace_flags.sampled


class BoundedBatchSpanProcessor(SpanProcessor):
    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue_size: int | None = None,
        max_export_batch_size: int | None = None,
        schedule_delay_millis: int | None = None,
        on_drop: DropCallback | None = None,
    ) -> None:
        self.exporter = exporter
        self.max_queue_size = max_queue_size or _env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        batch = max_export_batch_size or _env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        self.max_export_batch_size = min(batch, self.max_queue_size)
        self.schedule_delay = (schedule_delay_millis or _env_int("OTEL_BSP_SCHEDULE_DELAY", 5000)) / 1000
        self.export_timeout_millis = _env_int("OTEL_BSP_EXPORT_TIMEOUT", 30000)
        self._on_drop = on_drop
        self.dropped: dict[str, int] = {"queue_full": 0, "export_failed": 0, "shutdown": 0}
        self._start()

    def _start(self) -> None:
        self._pid = os.getpid()
        self._forks = _forks
        self._lock = threading.Lock()
        self._queue: deque[ReadableSpan] = deque()
        self._wake = threading.Event()
        self._flushes: list[threading.Event] = []
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="cadscope-span-export", daemon=True)
        self._thread.start()

    # SpanProcessor -------------------------------------------------------

    def on_start(self, span: Span, parent_context: object = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        # Once per task on the pool's task thread: a LeanSpan's fields are read directly, and the
        # fork check is _ensure_thread's, inline.
        deferred = span._context is None if type(span) is LeanSpan else getattr(span, "deferred", False)
        if not deferred and not _sampled(span):
            return
        if self._forks != _forks:
            self._start()
        # No lock: a deque's append and popleft are atomic (the SDK's own batch processor relies on it
        # too), and a lock taken on every task cost ~47 cache lines read from memory on a busy host
        # (bench/RESULTS.md, "Task hooks without super()"). Threads that end spans at once may take
        # the queue one span past its bound each.
        queue = self._queue
        if self._closing:
            reason = "shutdown"
        elif len(queue) >= self.max_queue_size:
            reason = "queue_full"
        else:
            queue.append(span)
            if self._closing:  # shutdown began meanwhile: it counts the span if it took it from the queue
                self._unqueue(span, deferred)
            elif len(queue) >= self.max_export_batch_size and not self._wake.is_set():
                self._wake.set()
            return
        self._drop_span(reason, span, deferred)

    def _drop_span(self, reason: str, span: ReadableSpan, deferred: bool) -> None:
        """Count ``span`` as dropped, unless it is a deferred span that turns out unsampled: that one was
        never going to be exported, so it is no drop."""
        if not deferred or _sampled(span):
            self._drop(reason, 1)

    def _unqueue(self, span: ReadableSpan, deferred: bool) -> None:
        """Count ``span``, queued as shutdown began, as dropped if it is still in the queue: either this
        thread takes it out or shutdown (or the export thread) did, never both (``deque.remove`` and
        ``popleft`` are atomic)."""
        with self._lock:  # not beside _take's or shutdown's popleft: each takes what it counted len() of
            try:
                self._queue.remove(span)  # spans compare by identity: no Python code runs in between
            except ValueError:
                return
        self._drop_span("shutdown", span, deferred)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export what is queued now; False if that took longer than the timeout
        (the export goes on in the background and the caller goes on)."""
        self._ensure_thread()
        if self._closing:
            return False
        done = threading.Event()
        with self._lock:
            self._flushes.append(done)
        self._wake.set()
        return done.wait(timeout_millis / 1000)

    def shutdown(self, timeout_millis: int | None = None) -> None:
        """Flush within the deadline (``OTEL_BSP_EXPORT_TIMEOUT`` by default: the
        provider passes none), then stop. Spans still queued are counted as
        dropped; a hung exporter is left to its daemon thread."""
        if self._closing or self._pid != os.getpid():
            return
        if timeout_millis is None:
            timeout_millis = self.export_timeout_millis
        deadline = time.monotonic() + timeout_millis / 1000
        self.force_flush(timeout_millis)
        queued = []
        with self._lock:
            self._closing = True  # before the queue is emptied: on_end checks it after its append
            # One popleft at a time, not a swap or a clear(): a span appended meanwhile is either taken
            # here or left for on_end to take back out and count.
            while self._queue:
                queued.append(self._queue.popleft())
        self._wake.set()
        left = sum(1 for span in queued if _sampled(span))  # resolves deferred spans: outside the lock
        if left:
            self._drop("shutdown", left)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        closer = threading.Thread(target=self.exporter.shutdown, name="cadscope-exporter-shutdown", daemon=True)
        closer.start()
        closer.join(max(0.0, deadline - time.monotonic()))

    # The export thread ---------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._forks != _forks:  # forked: the export thread and the queue stayed in the parent
            self._start()

    def _drop(self, reason: str, count: int) -> None:
        self.dropped[reason] += count
        log.debug("dropped %d span(s): %s", count, reason)
        if self._on_drop is not None:
            try:
                self._on_drop(reason, count)
            except Exception:  # a metrics hiccup must not take the export thread down
                log.exception("span drop callback failed")

    def _take(self, drain: bool) -> tuple[list[ReadableSpan], list[threading.Event]]:
        """The next batch: a full one, or with ``drain`` or a flush waiting, whatever is queued."""
        with self._lock:
            if len(self._queue) < self.max_export_batch_size and not (drain or self._flushes):
                return [], []
            count = min(self.max_export_batch_size, len(self._queue))
            batch = [self._queue.popleft() for _ in range(count)]
            flushes = self._flushes if not self._queue else []
            if flushes:
                self._flushes = []
            return batch, flushes

    def _run(self) -> None:
        while not self._closing:
            # Woken because a batch is full: export full batches only and leave
            # the rest to fill the next one. Draining the queue each time sent a
            # stream of small batches while spans kept coming (818 exports of 13
            # spans on average in bench/task_cpu.py's loop), each paying the
            # exporter's fixed cost and contending with the caller for the GIL.
            # The schedule delay, a flush and shutdown send everything.
            drain = not self._wake.wait(self.schedule_delay)
            self._wake.clear()
            while not self._closing:
                batch, flushes = self._take(drain)
                if batch:
                    self._export(batch)
                for done in flushes:
                    done.set()
                if not batch:
                    break

    def _export(self, batch: list[ReadableSpan]) -> None:
        token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            batch = [span for span in batch if _sampled(span)]  # resolves deferred spans, here
            if not batch:
                return
            result = self.exporter.export(batch)
        except Exception:
            log.exception("span export raised")
            result = SpanExportResult.FAILURE
        finally:
            detach(token)
        if result is not SpanExportResult.SUCCESS:
            self._drop("export_failed", len(batch))
