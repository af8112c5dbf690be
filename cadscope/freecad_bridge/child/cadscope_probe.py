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


def peak_rss_bytes():
    """This process's peak resident set size (VmHWM), or 0 where unknown."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def reset_peak_rss():
    """Reset VmHWM to the current RSS so the next reading is one operation's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


# One encoder, built once: json.dumps() with options builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


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
        data = (_encode(event) + "\n").encode()
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


class _SpanContext:
    __slots__ = ("_probe", "_span")

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
        return span

    def __exit__(self, exc_type, exc, tb):
        probe, span = self._probe, self._span
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
