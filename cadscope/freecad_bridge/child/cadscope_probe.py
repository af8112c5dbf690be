"""Child-side probe: W3C span ids and JSON-lines events over an inherited pipe.

Standard library only. This module runs inside FreeCAD's own Python (Debian's
3.11.2 here) or inside a bare ``python`` with OCP, never inside the worker, and
it must not need the OpenTelemetry SDK.

The worker passes:

- ``TRACEPARENT`` / ``TRACESTATE`` / ``BAGGAGE``: the subprocess span's context
  (OpenTelemetry env-carrier spec);
- ``CADSCOPE_TELEMETRY_FD``: the write end of a pipe the worker reads.

Wire format, one JSON object per line (keys kept short: this is a hot path):

- ``{"t": "start", "id", "p", "n", "ts", "a"}``: a span opened;
- ``{"t": "end", "id", "ts", "a", "s", "e", "m"}``: it closed (status ``ok`` or
  ``error``, error type, message);
- ``{"t": "metric", "n", "v", "a"}``: a counter or observation without a span;
- ``{"t": "hello", "a"}``: engine and versions, sent first;
- ``{"t": "progress", "a"}``: a progress event for the job's stream;
- ``{"t": "result", "a"}``: the result manifest, sent last. No manifest, no
  success: FreeCAD exits 0 after an uncaught exception.

Without a pipe the probe is a no-op, so an engine script runs by hand too.

Spans can be opened and closed by hand (``start()``/``end()``) or written
after the fact with both timestamps (``emit()``), for work whose start was
only known once it ended. ``observe()`` is a metric event that is buffered and
written with the next span event or ``flush()``: for calls too frequent to be
spans each, one write carries many.
"""

from __future__ import annotations

import json
import os
import random
import re
import time

__all__ = ["Probe", "peak_rss_bytes", "reset_peak_rss"]

_TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def _parse_traceparent(value):
    """Return (trace_id, span_id) of a valid version-00 traceparent, else None."""
    match = _TRACEPARENT_RE.match((value or "").strip())
    if not match:
        return None
    trace_id, span_id, _flags = match.groups()
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id


# -- test fault: slower operations -----------------------------------------------------------
# ``CADSCOPE_TEST_SLOWDOWN="occt.boolean=3,export=2"`` stretches every span of those names
# (opened with ``span()``) to that many times its real duration, by sleeping before it ends:
# a regression of known size on one operation, for the tests of ``cadscope compare``. The
# worker never passes this variable (the child's environment is an allowlist): only a wrapper
# that starts the engine itself sets it.
def _parse_slowdown(text):
    factors = {}
    for item in (text or "").split(","):
        name, _, factor = item.partition("=")
        try:
            if name.strip() and float(factor) > 1:
                factors[name.strip()] = float(factor)
        except ValueError:
            pass
    return factors


_SLOWDOWN = _parse_slowdown(os.environ.get("CADSCOPE_TEST_SLOWDOWN"))


def _stretch(name, started):
    factor = _SLOWDOWN.get(name)
    if factor:
        time.sleep(max(time.perf_counter() - started, 0.0) * (factor - 1))


class _ProcFiles:
    """``/proc/self/status`` and ``/proc/self/clear_refs``, opened once per process.

    Opening them costs more than using them (5 and 9 us a call against 0.3
    and 3), and an operation's memory is read twice per operation. An fd of
    ``/proc/self/...`` names the process that opened it, so a forked child
    opens its own.
    """

    pid = None
    status = None
    clear_refs = None

    @classmethod
    def fds(cls):
        pid = os.getpid()
        if cls.pid != pid:
            cls.pid = pid
            cls.status = cls.clear_refs = None
            try:
                cls.status = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
                cls.clear_refs = os.open("/proc/self/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
            except OSError:
                pass
        return cls.status, cls.clear_refs


def peak_rss_bytes():
    """This process's peak resident set size (VmHWM), or 0 where unknown."""
    status = _ProcFiles.fds()[0]
    try:
        data = os.pread(status, 8192, 0)
        start = data.index(b"VmHWM:") + 6
        return int(data[start : data.index(b"kB", start)]) * 1024
    except (OSError, TypeError, ValueError):
        return 0


def reset_peak_rss():
    """Reset VmHWM to the current RSS so the next reading is one operation's peak."""
    clear_refs = _ProcFiles.fds()[1]
    try:
        os.write(clear_refs, b"5")
    except (OSError, TypeError):
        pass


# One encoder, built once: json.dumps() with options builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


OBSERVATIONS_PER_WRITE = 64
_LINE_CACHE_SIZE = 1024


def _set_status(event, error):
    if error is None:
        event["s"] = "ok"
    else:
        event["s"] = "error"
        event["e"] = type(error).__name__
        event["m"] = str(error)[:512]


def _new_span_id():
    """16 hex digits, never all zero; random as the OpenTelemetry SDK's ids are
    (``random.getrandbits``, seeded from the OS), without a syscall per span."""
    span_id = 0
    while not span_id:
        span_id = random.getrandbits(64)
    return f"{span_id:016x}"


class _Span(dict):
    """Attributes of an open span; set more with ``span[key] = value``."""

    __slots__ = ("span_id", "name")


class Probe:
    """Emits span and metric events for the worker to re-emit.

    ``span()`` nests: the innermost open span is the parent of the next one,
    and the outermost one is a child of ``TRACEPARENT``.
    """

    def __init__(self, fd=None, traceparent=None):
        self._fd = fd
        parsed = _parse_traceparent(traceparent)
        self.trace_id = parsed[0] if parsed else None
        self._stack = [parsed[1]] if parsed else [None]
        self.enabled = fd is not None
        self._pending = []
        self._lines = {}

    @classmethod
    def from_env(cls, environ=None):
        env = os.environ if environ is None else environ
        fd = env.get("CADSCOPE_TELEMETRY_FD")
        try:
            fd_number = int(fd) if fd else None
        except ValueError:
            fd_number = None
        return cls(fd_number, env.get("TRACEPARENT"))

    def _send(self, event):
        if self._fd is None:
            return
        if self._pending:  # buffered observations go first, in the same write
            self._pending.append(_encode(event) + "\n")
            self.flush()
        else:
            self._write((_encode(event) + "\n").encode())

    def _write(self, data):
        if self._fd is None:
            return
        try:
            # One write per line: the worker never sees half an event from us
            # unless we die mid-write, and then it drops the fragment.
            written = os.write(self._fd, data)
            if written < len(data):  # a line larger than the pipe's free space
                view = memoryview(data)[written:]
                while view:
                    view = view[os.write(self._fd, view) :]
        except OSError:
            # The worker stopped listening (killed, timed out): the CAD work
            # goes on, telemetry is what gives way.
            self._fd = None

    def hello(self, **attrs):
        self._send({"t": "hello", "a": attrs})

    def metric(self, name, value=1, **attrs):
        self._send({"t": "metric", "n": name, "v": value, "a": attrs})

    def progress(self, **attrs):
        self._send({"t": "progress", "a": attrs})

    def result(self, manifest):
        self._send({"t": "result", "a": manifest})

    def span(self, name, attrs=None):
        return _SpanContext(self, name, attrs)

    # -- spans by hand, buffered observations ----------------------------------

    def start(self, name, attrs=None):
        """Open a span as a child of the innermost open one; returns its id."""
        span_id = _new_span_id()
        if self._fd is not None:
            self._send(
                {"t": "start", "id": span_id, "p": self._stack[-1], "n": name, "ts": time.time_ns(), "a": attrs or {}}
            )
        self._stack.append(span_id)
        return span_id

    def end(self, span_id, attrs=None, error=None):
        """Close a span from ``start()``; ``error`` is the exception that ended it, if any."""
        stack = self._stack
        if stack[-1] == span_id:
            stack.pop()
        elif span_id in stack:
            stack.remove(span_id)
        if self._fd is None:
            return
        event = {"t": "end", "id": span_id, "ts": time.time_ns(), "a": attrs or {}}
        _set_status(event, error)
        self._send(event)

    def emit(self, name, attrs, start_ns, end_ns, error=None, parent=None):
        """A finished span, both events at once (wall-clock ns), under ``parent``
        or the innermost open span."""
        if self._fd is None:
            return None
        span_id = _new_span_id()
        end = {"t": "end", "id": span_id, "ts": end_ns, "a": {}}
        _set_status(end, error)
        start = {"t": "start", "id": span_id, "p": parent or self._stack[-1], "n": name, "ts": start_ns, "a": attrs}
        pending = self._pending
        pending.append(_encode(start) + "\n")
        pending.append(_encode(end) + "\n")
        if len(pending) >= OBSERVATIONS_PER_WRITE:
            self.flush()
        return span_id

    def observe(self, name, value, attrs, key=None):
        """A metric event, buffered: written with the next span event, ``flush()``,
        or once the buffer holds ``OBSERVATIONS_PER_WRITE`` of them.

        The same name and attributes recur call after call, so the line around
        the value is encoded once and kept (up to ``_LINE_CACHE_SIZE`` of them),
        under ``key`` if given (the caller knows the two never change), else
        under the name and attributes."""
        if self._fd is None:
            return
        try:
            if key is None:
                key = (name, *attrs.items())
            parts = self._lines.get(key)
        except TypeError:  # an unhashable value: encode the whole line
            key, parts = None, None
        if parts is None or type(value) not in (int, float):
            line = _encode({"t": "metric", "n": name, "v": 0, "a": attrs})
            if key is not None and len(self._lines) < _LINE_CACHE_SIZE:
                head, _, tail = line.partition(',"v":0,')
                self._lines[key] = (head + ',"v":', "," + tail + "\n")
            line = _encode({"t": "metric", "n": name, "v": value, "a": attrs}) + "\n"
        else:
            line = parts[0] + repr(value) + parts[1]
        pending = self._pending
        pending.append(line)
        if len(pending) >= OBSERVATIONS_PER_WRITE:
            self.flush()

    def flush(self):
        pending = self._pending
        if pending:
            self._pending = []
            self._write("".join(pending).encode())  # each line ends with its newline


class _SpanContext:
    __slots__ = ("_probe", "_span", "_started")

    def __init__(self, probe, name, attrs):
        self._probe = probe
        span = _Span(attrs or ())
        span.name = name
        span.span_id = _new_span_id()
        self._span = span

    def __enter__(self):
        probe, span = self._probe, self._span
        probe._send(
            {
                "t": "start",
                "id": span.span_id,
                "p": probe._stack[-1],
                "n": span.name,
                "ts": time.time_ns(),
                "a": dict(span),
            }
        )
        probe._stack.append(span.span_id)
        self._started = time.perf_counter()
        return span

    def __exit__(self, exc_type, exc, tb):
        probe, span = self._probe, self._span
        if _SLOWDOWN:
            _stretch(span.name, self._started)
        end = {"t": "end", "id": span.span_id, "ts": time.time_ns(), "a": dict(span)}
        if exc_type is None:
            end["s"] = "ok"
        else:
            end["s"] = "error"
            end["e"] = exc_type.__name__
            end["m"] = str(exc)[:512]
        probe._stack.pop()
        probe._send(end)
        return False
