"""The open-span journal: a dead process's open spans, closed by a survivor at the time of its death.

A span is exported when it ends. A process killed mid-job (SIGKILL, the
OOM killer, Celery's hard time limit) never ends its open spans: the task
span, the flow and stage spans, the CAD subprocess span and the CAD child's
spans it was replaying. Their children, exported on the processor's
schedule, are then orphans in the trace, and the killed attempt is missing.

:class:`SpanJournal` is a span processor: it appends an open span's ids,
parent, name, kind, start time and attributes to a file of this process's own
(``journal_<pid>-<start ticks>.log``), and a line that ends it when it ends.
Appends go straight to the kernel (``os.write`` on an ``O_APPEND`` file), so
they survive the process's death; the file is bounded (rewritten with only the
open spans when it grows past ``max_bytes``); a write that fails (a full disk)
is counted and the job goes on: only that span's recovery is lost. Spans that
are not sampled are not journaled.

Most spans end within milliseconds (a short task, an OCCT call), and a span
that ended needs no journal. A span is therefore written once it has been open
for ``delay_s`` (a thread of the journal's looks every half ``delay_s``, so
within one and a half ``delay_s`` of its start), or at
once when a child of it starts: a child can end and be exported while its
parent is open, so a parent is in the journal before any child can be
exported, and a death leaves no orphan. A span that ends sooner, with no child
started, never reaches the file. What a death within ``delay_s`` of a
childless span's start loses is that span alone; ``delay_s=0`` journals every
span as it starts.

:class:`JournalReaper` runs in a survivor (the worker's main process). It
watches every journal's process (a pidfd each) and, when one dies, exports
every span still open in its journal, with the ids, parent and attributes it
was opened with, ended at the time of death, with ERROR status and
``error.type`` set to the cause (the signal's name, or ``worker_lost``).
:meth:`JournalReaper.recover` does the same, at start, for journals left by
a worker that died whole; their end is its last heartbeat, and the spans say
the end is an estimate (``cadscope.span.end_estimated``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import select
import signal
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from ._ids import pinnable_tracer, pinned_ids

__all__ = ["JournalReaper", "SpanJournal", "journal_identifier", "journal_note", "read_journal"]

log = logging.getLogger(__name__)

_JOURNAL = re.compile(r"^journal_([0-9]+(?:-[0-9]+)?)\.log$")
HEARTBEAT = "heartbeat"
MAX_ATTRIBUTES = 64
# A span is journaled once open this long (or when a child of it starts): most spans end sooner.
DEFAULT_DELAY_S = 0.5
MAX_STRING = 1024
ErrorCallback = Callable[[str], None]


def _start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def journal_identifier(pid: int | None = None) -> str:
    """``<pid>-<start ticks>`` of a process (this one by default): a name no later process reuses."""
    pid = os.getpid() if pid is None else pid
    ticks = _start_ticks(pid)
    return f"{pid}-{ticks}" if ticks is not None else str(pid)


def _alive(identifier: str) -> bool:
    """Whether the process named ``identifier`` (``<pid>-<start ticks>``) is running (a zombie is not)."""
    pid_text, _, ticks = identifier.partition("-")
    if not pid_text.isdigit() or (ticks and not ticks.isdigit()):
        return False
    found = _start_ticks(int(pid_text))
    if found is None:
        return False
    if ticks and found != int(ticks):
        return False
    try:
        with open(f"/proc/{pid_text}/stat", "rb") as file:
            stat = file.read()
        return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z"
    except OSError:
        return False


def _plain(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    """Attributes a journal line can carry: primitives and sequences of them, strings bounded."""
    out: dict[str, Any] = {}
    for key, value in (attributes or {}).items():
        if len(out) >= MAX_ATTRIBUTES:
            break
        if isinstance(value, str):
            out[key] = value[:MAX_STRING]
        elif isinstance(value, (bool, int, float)):
            out[key] = value
        elif isinstance(value, (tuple, list)) and all(isinstance(item, (str, bool, int, float)) for item in value):
            out[key] = [item[:MAX_STRING] if isinstance(item, str) else item for item in value][:MAX_ATTRIBUTES]
    return out


_journals: weakref.WeakSet[SpanJournal] = weakref.WeakSet()
# One encoder for every line: json.dumps with options builds a new one a call.
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


def journal_note(span: trace.Span, attributes: Mapping[str, Any]) -> None:
    """Record ``attributes``, set on ``span`` after its start, in every journal of this process
    that holds the span open (a no-op where there is none)."""
    for journal in list(_journals):
        journal.note(span, attributes)


class SpanJournal(SpanProcessor):
    """Journals this process's open, sampled spans in ``directory`` (see the module's docstring).

    ``owner`` names the survivor that reads the journal (its heartbeat gives
    the end time of spans recovered after both died). ``on_error(reason)`` is
    called for each write that failed (``disk_full``, ``io_error``)."""

    def __init__(
        self,
        directory: str,
        *,
        owner: str | None = None,
        max_bytes: int = 4 << 20,
        on_error: ErrorCallback | None = None,
        delay_s: float = DEFAULT_DELAY_S,
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.owner = owner
        self.max_bytes = max_bytes
        self.on_error = on_error
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self._pid = -1
        self._fd = -1
        self._open: dict[int, bytes] = {}  # span id -> its start line (written)
        self._pending: dict[int, tuple[float, Span]] = {}  # span id -> (monotonic start, span), not yet written
        self._written = 0
        self._failing = False
        self._flusher_pid = -1
        self._stopped = threading.Event()
        os.register_at_fork(after_in_child=self._forked)
        _journals.add(self)

    def _forked(self) -> None:
        # The parent's open spans, file and thread are the parent's: a child journals its own.
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # the parent's journal, inherited: not this process's to write
        self._lock = threading.Lock()
        self._pid, self._fd, self._open, self._pending, self._written = -1, -1, {}, {}, 0
        self._flusher_pid = -1
        self._stopped = threading.Event()

    @property
    def path(self) -> str:
        return os.path.join(self.directory, f"journal_{journal_identifier()}.log")

    def _ensure_file(self) -> None:
        if self._pid == os.getpid() and self._fd >= 0:
            return
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"journal_{journal_identifier()}.log")
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._pid = os.getpid()
        header = json.dumps({"owner": self.owner, "pid": self._pid}, separators=(",", ":"))
        self._write(b"#" + header.encode() + b"\n")

    def _write(self, data: bytes) -> None:
        os.write(self._fd, data)
        self._written += len(data)

    def _failed(self, exc: OSError) -> None:
        reason = "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "io_error"
        if not self._failing:
            log.error("span journal write failed (%s): spans opened now cannot be closed after a death", exc)
        self._failing = True
        if self.on_error is not None:
            with contextlib.suppress(Exception):
                self.on_error(reason)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        context = span.get_span_context()
        if not context.trace_flags.sampled:
            return
        parent = span.parent
        try:
            with self._lock:
                if parent is not None and parent.span_id in self._pending:
                    # The child can end and be exported while its parent is open: the parent first.
                    self._write_pending(parent.span_id)
                if self.delay_s > 0:
                    self._pending[context.span_id] = (time.monotonic(), span)
                    if self._flusher_pid != os.getpid():
                        self._start_flusher()
                else:
                    self._journal(span)
        except OSError as exc:
            self._failed(exc)

    def _journal(self, span: Span) -> None:
        """Write ``span``'s start line (the lock held)."""
        try:
            line = self._start_line(span)
        except Exception:  # noqa: BLE001 - a span processor must never fail the span it is told about
            log.warning("span journal: could not record a span", exc_info=True)
            return
        if line is None:
            return
        self._ensure_file()
        self._open[span.get_span_context().span_id] = line
        self._write(line)
        self._failing = False
        if self._written > self.max_bytes:
            self._rewrite()

    def _write_pending(self, span_id: int) -> None:
        entry = self._pending.pop(span_id, None)
        if entry is not None:
            self._journal(entry[1])

    def flush(self, older_than_s: float = 0.0) -> None:
        """Journal now the open spans started at least ``older_than_s`` ago that are not yet."""
        cutoff = time.monotonic() - older_than_s
        try:
            with self._lock:
                for span_id in [key for key, (started, _) in self._pending.items() if started <= cutoff]:
                    self._write_pending(span_id)  # in the order they started: parents first
        except OSError as exc:
            self._failed(exc)

    def _start_flusher(self) -> None:
        self._flusher_pid = os.getpid()
        threading.Thread(target=self._flush_loop, name="cadscope-span-journal", daemon=True).start()

    def _flush_loop(self) -> None:
        stopped, pid = self._stopped, os.getpid()
        # Every half delay: a span is journaled at most one and a half delays after its start.
        while not stopped.wait(self.delay_s / 2) and os.getpid() == pid:
            self.flush(self.delay_s)

    @staticmethod
    def _start_line(span: Span) -> bytes | None:
        context = span.get_span_context()
        if not context.trace_flags.sampled:
            return None
        parent = span.parent
        scope = span.instrumentation_scope
        kind = span.kind
        record = {
            "t": format(context.trace_id, "032x"),
            "s": format(context.span_id, "016x"),
            "p": format(parent.span_id, "016x") if parent is not None else "",
            "r": bool(parent.is_remote) if parent is not None else False,
            "f": int(context.trace_flags),
            "ts": context.trace_state.to_header() if context.trace_state else "",
            "n": span.name,
            "k": kind.value if isinstance(kind, SpanKind) else int(kind),
            "st": span.start_time,
            "a": _plain(span.attributes),
            "sc": scope.name if scope is not None else "",
            "sv": (scope.version or "") if scope is not None else "",
        }
        return b"+" + _encode(record).encode() + b"\n"

    def note(self, span: trace.Span, attributes: Mapping[str, Any]) -> None:
        """Record attributes set on an open span after its start (a CAD child's pid), so a
        recovered span carries them too."""
        context = span.get_span_context()
        if not context.trace_flags.sampled:
            return
        line = b"=" + _encode({"s": format(context.span_id, "016x"), "a": _plain(attributes)}).encode() + b"\n"
        try:
            with self._lock:
                self._write_pending(context.span_id)
                if context.span_id not in self._open:
                    return
                self._ensure_file()
                self._open[context.span_id] += line
                self._write(line)
        except OSError as exc:
            self._failed(exc)

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        try:
            with self._lock:
                if self._pending.pop(context.span_id, None) is not None:
                    return  # never written: nothing to take back
                if self._open.pop(context.span_id, None) is None or self._pid != os.getpid():
                    return
                self._write(b"-" + format(context.span_id, "016x").encode() + b"\n")
                if not self._open and self._written > self.max_bytes // 4:
                    self._rewrite()
        except OSError as exc:
            self._failed(exc)

    def _rewrite(self) -> None:
        """The journal again with only the open spans (the lock held): bounded by what is open."""
        path = os.path.join(self.directory, f"journal_{journal_identifier()}.log")
        temporary = path + ".tmp"
        header = b"#" + json.dumps({"owner": self.owner, "pid": self._pid}, separators=(",", ":")).encode() + b"\n"
        data = header + b"".join(self._open.values())
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        os.close(self._fd)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._written = len(data)

    def shutdown(self) -> None:
        """Close this process's journal; removed when no span is left open in it."""
        self._stopped.set()
        with self._lock:
            if self._pid != os.getpid() or self._fd < 0:
                return
            os.close(self._fd)
            self._fd = -1
            if not self._open:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, f"journal_{journal_identifier()}.log"))

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


# -- the survivor -------------------------------------------------------------------------------


def read_journal(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A journal's header and the spans still open in it, in the order they were opened. Lines cut
    short by the death (the last one) and lines that do not parse are skipped."""
    header: dict[str, Any] = {}
    spans: dict[str, dict[str, Any]] = {}
    with open(path, "rb") as file:
        for raw in file:
            if not raw.endswith(b"\n") or len(raw) < 2:
                continue
            kind, body = raw[:1], raw[1:-1]
            try:
                if kind == b"#":
                    header = json.loads(body)
                elif kind == b"+":
                    record = json.loads(body)
                    spans[record["s"]] = record
                elif kind == b"=":
                    update = json.loads(body)
                    if update.get("s") in spans and isinstance(update.get("a"), dict):
                        spans[update["s"]]["a"].update(update["a"])
                elif kind == b"-":
                    spans.pop(body.decode("ascii"), None)
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                continue
    return header, list(spans.values())


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "worker_lost"


class JournalReaper:
    """Closes the spans that dead processes left open in the journals of ``directory``.

    ``on_recovered(cause, count)`` is called for each dead process whose
    spans were closed. Call :meth:`recover` once at start (journals of a
    worker that died whole), then :meth:`start` to watch this worker's
    processes; :meth:`beat` writes the heartbeat that dates a whole worker's
    death (the watcher thread does it every ``heartbeat_s``).
    """

    def __init__(
        self,
        directory: str,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        owner: str | None = None,
        heartbeat_s: float = 1.0,
        on_recovered: Callable[[str, int], None] | None = None,
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.owner = owner or journal_identifier()
        self.heartbeat_s = heartbeat_s
        self.on_recovered = on_recovered
        self._provider = tracer_provider
        self._watched: dict[str, int] = {}  # identifier -> pidfd
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.recovered = 0
        os.makedirs(self.directory, exist_ok=True)

    def _heartbeat_path(self, owner: str) -> str:
        return os.path.join(self.directory, f"{HEARTBEAT}_{owner}")

    def beat(self) -> None:
        """Write ``now`` as the last moment this survivor (and its processes) were known alive."""
        path = self._heartbeat_path(self.owner)
        with contextlib.suppress(OSError):
            with open(path + ".tmp", "w") as file:
                file.write(str(time.time_ns()))
            os.replace(path + ".tmp", path)

    def _last_alive(self, owner: str | None, journal: str) -> int:
        """The last moment a dead process was known alive: its owner's heartbeat or its journal's
        last write, whichever is later."""
        moments = []
        with contextlib.suppress(OSError):
            moments.append(os.stat(journal).st_mtime_ns)
        if owner:
            with contextlib.suppress(OSError, ValueError):
                with open(self._heartbeat_path(owner)) as file:
                    moments.append(int(file.read().strip()))
        return max(moments) if moments else time.time_ns()

    def recover(self) -> int:
        """Close the open spans of every journal whose process is dead and was not this worker's
        (a worker that died whole, found by the next one on the same directory). Returns spans closed."""
        closed = 0
        for name in sorted(os.listdir(self.directory)):
            match = _JOURNAL.match(name)
            if not match or _alive(match.group(1)):
                continue
            path = os.path.join(self.directory, name)
            try:
                header, spans = read_journal(path)
            except OSError:
                continue
            end = self._last_alive(header.get("owner"), path)
            closed += self._close(spans, end, "worker_restart", estimated=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for name in os.listdir(self.directory):
            if name.startswith(HEARTBEAT + "_") and name != f"{HEARTBEAT}_{self.owner}":
                owner = name[len(HEARTBEAT) + 1 :]
                if not owner.endswith(".tmp") and not _alive(owner):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.directory, name))
        return closed

    def _close(self, spans: list[dict[str, Any]], end_ns: int, cause: str, *, estimated: bool = False) -> int:
        count = 0
        for record in reversed(spans):  # innermost first
            try:
                self._emit(record, end_ns, cause, estimated)
                count += 1
            except Exception:  # noqa: BLE001 - one bad record must not keep the others from closing
                log.warning("could not close a recovered span", exc_info=True)
        if count:
            self.recovered += count
            log.warning("closed %d span(s) left open by a dead process (%s)", count, cause)
            if self.on_recovered is not None:
                with contextlib.suppress(Exception):
                    self.on_recovered(cause, count)
        return count

    def _emit(self, record: Mapping[str, Any], end_ns: int, cause: str, estimated: bool) -> None:
        trace_id, span_id = int(record["t"], 16), int(record["s"], 16)
        flags = TraceFlags(int(record.get("f", 1)))
        state = TraceState.from_header([record["ts"]]) if record.get("ts") else TraceState()
        context: Context = Context()
        if record.get("p"):
            parent = SpanContext(trace_id, int(record["p"], 16), bool(record.get("r")), flags, state)
            context = trace.set_span_in_context(NonRecordingSpan(parent))
        attributes = dict(record.get("a") or {})
        attributes["error.type"] = cause
        attributes["cadscope.span.recovered"] = True
        if estimated:
            attributes["cadscope.span.end_estimated"] = True
        start = int(record["st"])
        tracer = pinnable_tracer(record.get("sc") or "cadscope.journal", self._provider, record.get("sv") or None)
        with pinned_ids(trace_id, span_id):
            span = tracer.start_span(
                str(record["n"]), context=context, kind=SpanKind(int(record.get("k", 0))),
                attributes=attributes, start_time=start,
            )  # fmt: skip
        span.set_status(Status(StatusCode.ERROR, f"the process running this span died ({cause})"))
        span.end(end_time=max(end_ns, start))

    # -- watching this worker's processes --------------------------------------------------

    def start(self) -> None:
        """Watch the journals' processes on a daemon thread, and beat the heartbeat."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cadscope-journal-reaper", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for fd in self._watched.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._watched.clear()

    def _scan(self) -> None:
        for name in os.listdir(self.directory):
            match = _JOURNAL.match(name)
            if not match or match.group(1) in self._watched:
                continue
            identifier = match.group(1)
            pid_text, _, ticks = identifier.partition("-")
            pid = int(pid_text)
            if pid == os.getpid():
                continue
            if _start_ticks(pid) is None or (ticks and _start_ticks(pid) != int(ticks)):
                self._watched[identifier] = -1
                self._reap(identifier, -1, time.time_ns())  # gone, and reaped: no status left to ask
                continue
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                fd = -1  # no pidfd here: its liveness is asked on every pass instead
            if fd >= 0 and ticks and _start_ticks(pid) != int(ticks):  # reused between the two checks
                os.close(fd)
                fd = -1
            self._watched[identifier] = fd
            # Dead before it was seen: with a pidfd the poll below reaps it, once the kernel has its
            # status. A zombie leader whose other threads are still exiting is not waitable yet, and
            # asked now would read as ``worker_lost``; its pidfd turns readable when it is.
            if fd < 0 and not _alive(identifier):
                self._reap(identifier, fd, time.time_ns())

    def _cause(self, fd: int) -> str:
        """The dead process's signal, asked of the kernel without reaping it (its parent, billiard,
        does that); ``worker_lost`` when it exited or was already reaped."""
        if fd < 0:
            return "worker_lost"
        try:
            info = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except (OSError, AttributeError):
            return "worker_lost"
        if info is not None and info.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
            return _signal_name(info.si_status)
        return "worker_lost"

    def _reap(self, identifier: str, fd: int, died_ns: int) -> None:
        cause = self._cause(fd)
        if fd >= 0:
            os.close(fd)
        self._watched[identifier] = -2  # done; its file is gone below
        path = os.path.join(self.directory, f"journal_{identifier}.log")
        try:
            _header, spans = read_journal(path)
        except FileNotFoundError:
            return  # it closed its journal itself: nothing was left open
        except OSError:
            log.warning("journal of a dead process unreadable: %s", path, exc_info=True)
            return
        self._close(spans, died_ns, cause)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def _run(self) -> None:
        next_beat = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                self.beat()
                next_beat = now + self.heartbeat_s
            try:
                self._scan()
                by_fd = {fd: identifier for identifier, fd in self._watched.items() if fd >= 0}
                poller = select.poll()
                for fd in by_fd:
                    poller.register(fd, select.POLLIN)
                for fd, _event in poller.poll(100):
                    self._reap(by_fd[fd], fd, time.time_ns())
                for identifier, fd in list(self._watched.items()):
                    if fd == -1 and not _alive(identifier):
                        self._reap(identifier, -1, time.time_ns())
                # Forget the dead whose journals are gone (a name is never reused: start ticks).
                self._watched = {
                    identifier: fd
                    for identifier, fd in self._watched.items()
                    if fd != -2 or os.path.exists(os.path.join(self.directory, f"journal_{identifier}.log"))
                }
            except Exception:  # noqa: BLE001 - the reaper must outlive any one bad journal
                log.exception("journal reaper failed; going on")
                self._stop.wait(0.5)
