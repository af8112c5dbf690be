"""A batch span processor whose queue, flush and shutdown are all bounded, and whose drops are counted.

Why not the SDK's ``BatchSpanProcessor``: it drops spans when its queue is
full but says so only in a log line, and its ``force_flush`` has run the
export on the caller's thread without regard to its timeout
(open-telemetry/opentelemetry-python#4568). A Celery pool process flushes in
``worker_process_shutdown``; with a collector that accepts connections and
never answers, it would sit there for the exporter's whole retry budget.

Here the caller never runs an export: ``on_end`` appends to a bounded queue,
``force_flush`` and ``shutdown`` wait with a deadline, and every span that is
not exported is counted by reason through ``on_drop(reason, count)``:

- ``queue_full``: the exporter fell behind and the queue was at its bound;
- ``export_failed``: the exporter returned FAILURE (after its own retries);
- ``shutdown``: still queued when shutdown's deadline passed, or ended after it.

It is an ordinary ``SpanProcessor`` (only its public interface is used, on
any span type) and follows the standard ``OTEL_BSP_*`` variables and
defaults. After a fork, the child starts a queue and an export thread of its
own on first use: the parent's thread does not exist there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable

from opentelemetry.context import Context
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

__all__ = ["BoundedBatchSpanProcessor", "DropCallback"]

log = logging.getLogger(__name__)

DropCallback = Callable[[str, int], None]


def _env_int(name: str, default: int) -> int:
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


_processors: weakref.WeakSet[BoundedBatchSpanProcessor] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A lock another thread of the parent held at the fork stays held in the child: give each
    # processor a new one; its queue and thread start again on first use (_ensure_thread).
    for processor in list(_processors):
        processor._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class BoundedBatchSpanProcessor(SpanProcessor):
    """Exports sampled spans in batches on a thread of its own; never blocks the caller past a deadline."""

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue_size: int | None = None,
        max_export_batch_size: int | None = None,
        schedule_delay_millis: int | None = None,
        export_timeout_millis: int | None = None,
        on_drop: DropCallback | None = None,
    ) -> None:
        self.exporter = exporter
        self.max_queue_size = max_queue_size or _env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        batch = max_export_batch_size or _env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        self.max_export_batch_size = min(batch, self.max_queue_size)
        self.schedule_delay = (schedule_delay_millis or _env_int("OTEL_BSP_SCHEDULE_DELAY", 5000)) / 1000
        self.export_timeout_millis = export_timeout_millis or _env_int("OTEL_BSP_EXPORT_TIMEOUT", 30000)
        self.on_drop = on_drop
        self.dropped: dict[str, int] = {"queue_full": 0, "export_failed": 0, "shutdown": 0}
        self._pid = -1
        self._closed = False
        self._lock = threading.Lock()
        _processors.add(self)
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        """Start the queue and the export thread in this process (again after a fork)."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._queue: deque[ReadableSpan] = deque()
            self._wake = threading.Event()
            self._flushes: list[threading.Event] = []
            self._exporting = False
            self._thread = threading.Thread(target=self._run, name="cadscope-span-export", daemon=True)
            self._pid = os.getpid()
            self._closed = False
            self._thread.start()

    # SpanProcessor -------------------------------------------------------

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        self._ensure_thread()
        with self._lock:
            if self._closed:
                reason = "shutdown"
            elif len(self._queue) >= self.max_queue_size:
                reason = "queue_full"
            else:
                self._queue.append(span)
                if len(self._queue) >= self.max_export_batch_size:
                    self._wake.set()
                return
        self._drop(reason, 1)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export what is queued now; False if that took longer than the timeout
        (the export goes on in the background and the caller goes on)."""
        self._ensure_thread()
        done = threading.Event()
        with self._lock:
            if self._closed:
                return False
            if not self._queue and not self._exporting:
                return True
            self._flushes.append(done)
        self._wake.set()
        return done.wait(timeout_millis / 1000)

    def shutdown(self, timeout_millis: int | None = None) -> None:
        """Flush within the deadline (``OTEL_BSP_EXPORT_TIMEOUT`` by default: the
        provider passes none), then stop. Spans still queued are counted as
        dropped; a hung exporter is left to its daemon thread."""
        if self._pid != os.getpid() or self._closed:
            return
        if timeout_millis is None:
            timeout_millis = self.export_timeout_millis
        deadline = time.monotonic() + timeout_millis / 1000
        self.force_flush(timeout_millis)
        with self._lock:
            self._closed = True
            left = len(self._queue)
            self._queue.clear()
        self._wake.set()
        if left:
            self._drop("shutdown", left)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        closer = threading.Thread(target=self.exporter.shutdown, name="cadscope-exporter-shutdown", daemon=True)
        closer.start()
        closer.join(max(0.0, deadline - time.monotonic()))

    # The export thread ---------------------------------------------------

    def _drop(self, reason: str, count: int) -> None:
        with self._lock:
            self.dropped[reason] += count
        log.debug("dropped %d span(s): %s", count, reason)
        if self.on_drop is not None:
            try:
                self.on_drop(reason, count)
            except Exception:  # a metrics hiccup must not take the export thread down
                log.exception("span drop callback failed")

    def _take(self, drain: bool) -> tuple[list[ReadableSpan], list[threading.Event]]:
        """The next batch: a full one, or with ``drain`` or a flush waiting, whatever is queued.
        Flushes are released once the queue they waited for is exported."""
        with self._lock:
            if len(self._queue) < self.max_export_batch_size and not (drain or self._flushes):
                return [], []
            count = min(self.max_export_batch_size, len(self._queue))
            batch = [self._queue.popleft() for _ in range(count)]
            self._exporting = bool(batch)
            flushes: list[threading.Event] = []
            if not self._queue and not batch:
                flushes, self._flushes = self._flushes, []
            return batch, flushes

    def _run(self) -> None:
        pid = os.getpid()
        while not self._closed and self._pid == pid:
            # Woken because a batch is full: export full batches and let the rest
            # fill the next one. The schedule delay, a flush and shutdown send everything.
            drain = not self._wake.wait(self.schedule_delay)
            self._wake.clear()
            while not self._closed:
                batch, flushes = self._take(drain)
                if batch:
                    self._export(batch)
                    with self._lock:
                        self._exporting = False
                    continue
                for done in flushes:
                    done.set()
                break

    def _export(self, batch: list[ReadableSpan]) -> None:
        try:
            with suppress_instrumentation():  # an instrumented HTTP client must not trace the export
                result = self.exporter.export(batch)
        except Exception:
            log.exception("span export raised")
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self._drop("export_failed", len(batch))
