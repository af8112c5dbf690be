"""Run any argv as a contained, traced subprocess (DESIGN rules 2-5).

- The child's environment is built from an allowlist, plus the trace context
  (``TRACEPARENT``/``TRACESTATE``/``BAGGAGE``) and the telemetry pipe's fd.
- Own session and process group; on timeout the group gets SIGTERM, then
  SIGKILL after a grace period; after the child exits, whatever is left of its
  group is killed too (a grandchild holding the pipe cannot keep us waiting).
- ``PR_SET_PDEATHSIG``: the child dies with the thread that started it, so a
  worker killed by Celery's hard time limit leaves no FreeCAD behind. It is set
  by util-linux's ``setpriv --pdeathsig KILL`` as an exec wrapper, because a
  ``preexec_fn`` forces a full ``fork()`` of the worker instead of ``vfork()``:
  4.5 ms more per job (bench/RESULTS.md). Without ``setpriv``, a ``preexec_fn``.
- ``RLIMIT_AS``/``RLIMIT_CPU`` set with ``prlimit()`` on the new pid before the
  wrapper has exec'd the engine; stdin closed; peak memory from ``wait4()``'s
  ``ru_maxrss``.
- One thread: ``poll()`` over the pipe and a pidfd. Lines are bounded in length
  and count; anything malformed is dropped and counted.
- A classified outcome. FreeCAD's exit code lies (0 after an uncaught
  exception), so success means the child delivered its result manifest.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ..tracing import inject_into_env, journal_note, pinnable_tracer
from ._replay import EventObserver, Replayer

__all__ = [
    "DEFAULT_ENV_ALLOWLIST",
    "OUTCOMES",
    "RunLimits",
    "RunResult",
    "run",
]

OUTCOMES = ("ok", "script_error", "crash", "timeout", "oom", "killed", "bad_output")

# What a CAD process needs to start, and nothing that could carry a secret.
DEFAULT_ENV_ALLOWLIST = frozenset(
    {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "HOME", "USER", "LOGNAME", "PYTHONHASHSEED"}
)
TELEMETRY_FD_ENV = "CADSCOPE_TELEMETRY_FD"
_MEMORY_ERRORS = ("MemoryError", "OutOfMemory", "bad_alloc", "Standard_OutOfMemory")
_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE}
_PR_SET_PDEATHSIG = 1
_READ_CHUNK = 1 << 16
_PIPE_BYTES = 1 << 20
# The C scanner under json.loads, without its wrapping (set in JSONDecoder.__init__; typeshed omits it).
_SCAN = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _decode_event(line: bytes) -> Any:
    """One event line as ``json.loads`` reads it, in half the time.

    The probe writes one compact ASCII JSON value a line. ``json.loads`` on
    bytes first guesses the encoding and matches whitespace before and after
    the value with regular expressions, which on a short line costs as much as
    the parse: 2.3 us a line against 1.1 here, over the standard job's
    126-byte lines (bench/RESULTS.md, "Replay"). Raises ValueError for
    anything that is not exactly one JSON value in UTF-8, as ``json.loads``
    would (RecursionError for a value nested too deep)."""
    text = line.decode().strip(" \t\r")
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:
        raise ValueError("not a JSON value") from None
    if end != len(text):
        raise ValueError("extra data after a JSON value")
    return value


@dataclass(frozen=True)
class RunLimits:
    """Containment of one subprocess. ``None`` means no limit."""

    timeout_s: float = 300.0
    kill_grace_s: float = 2.0
    memory_bytes: int | None = None
    cpu_seconds: int | None = None
    max_line_bytes: int = 1 << 20
    max_events: int = 200_000
    max_spans: int = 10_000
    stderr_tail_bytes: int = 4096
    # After a read that empties the pipe, leave it this long before reading
    # again (the child's exit still wakes us at once). A read costs the
    # worker far more on cold caches than the events it brings: on the
    # standard FreeCAD job, 0.5 s instead of 0.1 s cut the worker's CPU by
    # 1.5-2.1 ms of 7-9 (two reads instead of five; bench/read_window.py).
    # Progress events arrive up to this much later. 0 reads every write.
    read_batch_s: float = 0.5


@dataclass
class RunResult:
    outcome: str
    pid: int
    exit_code: int | None
    signal: int | None
    duration_s: float
    peak_rss_bytes: int
    cpu_s: float
    manifest: dict[str, Any] | None
    hello: dict[str, Any]
    error_type: str | None = None
    error_message: str = ""
    dropped: Counter[str] = field(default_factory=Counter)
    stderr_tail: str = ""
    events: int = 0  # telemetry lines the child wrote, dropped ones included

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


_SETPRIV = shutil.which("setpriv")


def _with_pdeathsig(argv: Sequence[str]) -> list[str] | None:
    """``argv`` behind ``setpriv --pdeathsig KILL``; None without ``setpriv``."""
    return None if _SETPRIV is None else [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]


def _apply_limits(pid: int, limits: RunLimits) -> None:
    if limits.memory_bytes is not None:
        resource.prlimit(pid, resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    if limits.cpu_seconds is not None:
        # The soft limit sends SIGXCPU; the hard one a second later, SIGKILL.
        resource.prlimit(pid, resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))


def _preexec(limits: RunLimits, parent_pid: int) -> Callable[[], None]:
    """The fallback where ``setpriv`` is missing (costs a full fork)."""
    libc = _libc()

    def setup() -> None:  # runs in the child between fork and exec
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(137)
        if limits.memory_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        if limits.cpu_seconds is not None:
            # The soft limit sends SIGXCPU; the hard one a second later, SIGKILL.
            resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))

    return setup


def build_env(
    allowlist: Iterable[str] = DEFAULT_ENV_ALLOWLIST,
    extra: Mapping[str, str] | None = None,
    source: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A fresh environment: allowlisted keys of ``source`` plus ``extra``."""
    source = os.environ if source is None else source
    env = {key: source[key] for key in allowlist if key in source}
    env.update(extra or {})
    return env


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _classify(
    timed_out: bool,
    status: int,
    replayer: Replayer,
    rusage_maxrss: int,
    limits: RunLimits,
    require_manifest: bool,
) -> tuple[str, str | None, str]:
    signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    last_error = replayer.errors[-1] if replayer.errors else None
    memory_error = next((e for e in replayer.errors if any(m in e[0] for m in _MEMORY_ERRORS)), None)
    if timed_out:
        return "timeout", "timeout", f"killed after its {limits.timeout_s:g} s timeout"
    if signum == signal.SIGXCPU:
        return "timeout", "cpu_limit", "CPU time limit exceeded"
    if memory_error is not None:
        return "oom", memory_error[0], memory_error[1]
    near_limit = limits.memory_bytes is not None and rusage_maxrss >= 0.9 * limits.memory_bytes
    if signum == signal.SIGKILL and near_limit:
        return "oom", "oom_kill", "killed by SIGKILL at its memory limit"
    if replayer.manifest is not None or (not require_manifest and code == 0):
        return "ok", None, ""
    if last_error is not None:
        return "script_error", last_error[0], last_error[1]
    if signum in _CRASH_SIGNALS:
        return "crash", signal.Signals(signum).name, f"died of {signal.Signals(signum).name}"
    if signum is not None:
        return "killed", signal.Signals(signum).name, f"killed by {signal.Signals(signum).name}"
    if code:
        # FreeCAD turns SIGSEGV into exit status 1 with no Python exception.
        return "crash", f"exit_{code}", f"exited with status {code} without reporting an error"
    return "bad_output", "no_manifest", "exited 0 without delivering a result manifest"


def run(
    argv: Sequence[str],
    *,
    limits: RunLimits = RunLimits(),
    env: Mapping[str, str] | None = None,
    env_allowlist: Iterable[str] = DEFAULT_ENV_ALLOWLIST,
    cwd: str | None = None,
    stdout_path: str | None = None,
    stderr_path: str | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    span_name: str = "cad.subprocess",
    attributes: Mapping[str, Any] | None = None,
    observer: EventObserver | None = None,
    on_drop: Callable[[str], None] | None = None,
    require_manifest: bool = True,
    record_argv: bool = False,
) -> RunResult:
    """Run ``argv`` contained and traced; never raises for the child's failures.

    ``env`` is added to the allowlisted environment (``env_allowlist`` keys of
    ``os.environ``); the trace context and the telemetry fd are added last.
    ``observer`` receives the child's finished spans, metric events and
    progress events. The command line is recorded on the span only with
    ``record_argv=True``: job arguments may be private.
    """
    tracer = pinnable_tracer("cadscope.freecad_bridge", tracer_provider)  # the child's spans keep its ids
    span_attributes: dict[str, Any] = {"process.executable.name": os.path.basename(argv[0])}
    if record_argv:
        span_attributes["process.command_args"] = list(argv)
    span_attributes.update(attributes or {})
    with tracer.start_as_current_span(span_name, attributes=span_attributes, end_on_exit=False) as span:
        try:
            result = _run_in_span(
                argv,
                span,
                tracer,
                limits,
                env,
                env_allowlist,
                cwd,
                stdout_path,
                stderr_path,
                observer,
                on_drop,
                require_manifest,
            )
        except BaseException as exc:
            span.record_exception(exc)
            span.set_attribute("error.type", type(exc).__qualname__)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.end()
            raise
        if result.exit_code is not None:
            span.set_attribute("process.exit.code", result.exit_code)
        if result.signal is not None:
            span.set_attribute("process.exit.signal", result.signal)
        span.set_attribute("cad.subprocess.outcome", result.outcome)
        span.set_attribute("cad.subprocess.peak_rss_bytes", result.peak_rss_bytes)
        span.set_attribute("cad.subprocess.cpu_seconds", round(result.cpu_s, 6))
        for key in ("engine", "freecad_version", "occt_version"):
            if key in result.hello:
                span.set_attribute(f"cad.{key}", result.hello[key])
        span.set_attribute("cad.telemetry.events", result.events)
        if result.dropped:
            span.set_attribute("cad.telemetry.dropped", sum(result.dropped.values()))
        if not result.ok:
            span.set_attribute("error.type", result.outcome)
            span.set_status(Status(StatusCode.ERROR, result.error_message[:256]))
        span.end()
    return result


def _run_in_span(
    argv: Sequence[str],
    span: trace.Span,
    tracer: trace.Tracer,
    limits: RunLimits,
    env: Mapping[str, str] | None,
    env_allowlist: Iterable[str],
    cwd: str | None,
    stdout_path: str | None,
    stderr_path: str | None,
    observer: EventObserver | None,
    on_drop: Callable[[str], None] | None,
    require_manifest: bool,
) -> RunResult:
    child_env = build_env(env_allowlist, env)
    inject_into_env(child_env, trace.set_span_in_context(span, otel_context.get_current()))
    read_fd, write_fd = os.pipe()
    try:
        # Room for the events of one read_batch_s window, so a chatty child
        # does not stall on a full pipe while we leave it to fill.
        fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size or the user's quota: 64 KiB it is
    child_env[TELEMETRY_FD_ENV] = str(write_fd)
    stdout = open(stdout_path or os.devnull, "wb")  # noqa: SIM115 - closed below
    stderr = open(stderr_path, "w+b") if stderr_path else subprocess.DEVNULL  # noqa: SIM115
    replayer = Replayer(tracer, span, observer, max_spans=limits.max_spans, on_drop=on_drop)
    started = time.monotonic()
    wrapped = _with_pdeathsig(argv)
    if wrapped is not None:
        command, preexec = wrapped, None
    else:
        command, preexec = list(argv), _preexec(limits, os.getpid())
    try:
        proc = subprocess.Popen(  # noqa: S603 - argv is the caller's, never a shell
            command,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=child_env,
            cwd=cwd,
            pass_fds=(write_fd,),
            start_new_session=True,
            preexec_fn=preexec,  # noqa: PLW1509 - only without setpriv
        )
    except OSError:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
        stdout.close()
    span.set_attribute("process.pid", proc.pid)  # known now, whatever happens next
    journal_note(span, {"process.pid": proc.pid})  # so the span says which process, if this one dies
    if preexec is None:
        try:
            _apply_limits(proc.pid, limits)
        except ProcessLookupError:
            pass  # already gone: _supervise reaps and classifies it
        except BaseException:
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
            os.close(read_fd)
            raise
    reader = _LineReader(replayer, limits)
    try:
        status, rusage, timed_out = _supervise(proc, read_fd, reader, limits, started)
    except BaseException as exc:
        replayer.close_open(type(exc).__name__)
        raise
    finally:
        os.close(read_fd)
    duration = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it ourselves
    maxrss = rusage.ru_maxrss * 1024
    outcome, error_type, message = _classify(timed_out, status, replayer, maxrss, limits, require_manifest)
    replayer.close_open(outcome if outcome != "ok" else "unclosed")
    tail = b""
    if stderr_path:
        assert not isinstance(stderr, int)
        stderr.seek(max(0, os.fstat(stderr.fileno()).st_size - limits.stderr_tail_bytes))
        tail = stderr.read()
        stderr.close()
    return RunResult(
        outcome=outcome,
        pid=proc.pid,
        exit_code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        duration_s=duration,
        peak_rss_bytes=maxrss,
        cpu_s=rusage.ru_utime + rusage.ru_stime,
        manifest=replayer.manifest if outcome == "ok" else None,
        hello=replayer.hello,
        error_type=error_type,
        error_message=message,
        dropped=replayer.dropped,
        stderr_tail=tail.decode("utf-8", "replace"),
        events=reader.events,
    )


class _LineReader:
    """Splits the pipe into bounded lines and feeds the replayer."""

    def __init__(self, replayer: Replayer, limits: RunLimits) -> None:
        self.replayer = replayer
        self._limits = limits
        self._buffer = bytearray()
        self._discarding = False
        self.events = 0

    def feed(self, chunk: bytes) -> None:
        if self._discarding:
            # Inside an over-long line: skip to its end without buffering it.
            newline = chunk.find(b"\n")
            if newline < 0:
                return
            chunk = chunk[newline + 1 :]
            self._discarding = False
        buffer = self._buffer
        buffer += chunk
        start = 0
        while True:
            newline = buffer.find(b"\n", start)
            if newline < 0:
                break
            if newline - start > self._limits.max_line_bytes:
                self.events += 1
                self.replayer.drop("line_too_long")
            else:
                self._line(bytes(buffer[start:newline]))
            start = newline + 1
        del buffer[:start]
        if len(buffer) > self._limits.max_line_bytes:
            self.events += 1
            self.replayer.drop("line_too_long")
            buffer.clear()
            self._discarding = True

    def finish(self) -> None:
        if self._buffer and not self._discarding:
            self.replayer.drop("truncated_line")
        self._buffer.clear()

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        self.events += 1
        # Past the budget only the result manifest still counts: a flood of
        # events must not turn a good job into a failed one.
        if self.events > self._limits.max_events and not line.startswith(b'{"t":"result"'):
            self.replayer.drop("too_many_events")
            return
        try:
            event = _decode_event(line)
        except (ValueError, RecursionError):
            self.replayer.drop("invalid_json")
            return
        try:
            self.replayer.handle(event)
        except Exception:  # noqa: BLE001 - telemetry never fails the job
            self.replayer.drop("handler_error")


def _supervise(
    proc: subprocess.Popen[bytes], read_fd: int, reader: _LineReader, limits: RunLimits, started: float
) -> tuple[int, Any, bool]:
    os.set_blocking(read_fd, False)
    pidfd = os.pidfd_open(proc.pid)
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    replayer = reader.replayer
    deadline = started + limits.timeout_s
    kill_at: float | None = None
    timed_out = False
    exited: tuple[int, Any] | None = None
    pipe_open = True
    drain_until: float | None = None
    resume_read_at: float | None = None  # set while the pipe is left to fill
    try:
        while pipe_open:
            now = time.monotonic()
            if resume_read_at is not None and (now >= resume_read_at or exited is not None):
                poller.modify(read_fd, select.POLLIN)
                resume_read_at = None
            if exited is None:
                if not timed_out and now >= deadline:
                    timed_out = True
                    _kill_group(proc.pid, signal.SIGTERM)
                    kill_at = now + limits.kill_grace_s
                if kill_at is not None and now >= kill_at:
                    _kill_group(proc.pid, signal.SIGKILL)
                    kill_at = None
                wake = kill_at if kill_at is not None else (None if timed_out else deadline)
                if resume_read_at is not None:
                    wake = resume_read_at if wake is None else min(wake, resume_read_at)
            else:
                assert drain_until is not None
                if now >= drain_until:
                    replayer.drop("pipe_held_open")
                    break
                wake = drain_until
            timeout_ms = None if wake is None else max(0, int((wake - now) * 1000) + 1)
            for fd, _mask in poller.poll(timeout_ms):
                if fd == pidfd and exited is None:
                    _pid, status, rusage = os.wait4(proc.pid, 0)
                    exited = (status, rusage)
                    poller.unregister(pidfd)
                    # The leader is gone; whatever it left in its group goes too,
                    # so no grandchild can hold the pipe (or the machine) hostage.
                    _kill_group(proc.pid, signal.SIGKILL)
                    drain_until = time.monotonic() + 1.0
                elif fd == read_fd:
                    try:
                        chunk = os.read(read_fd, _READ_CHUNK)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        if exc.errno != errno.EINTR:
                            pipe_open = False
                        continue
                    if chunk:
                        reader.feed(chunk)
                        if len(chunk) < _READ_CHUNK and exited is None and limits.read_batch_s > 0:
                            # Drained: let the next events accumulate. A full
                            # chunk means a backlog, read on at once. POLLHUP
                            # still wakes us when the child closes its end.
                            poller.modify(read_fd, 0)
                            resume_read_at = time.monotonic() + limits.read_batch_s
                    else:
                        pipe_open = False
                        poller.unregister(read_fd)
    except BaseException:
        # Celery's soft time limit (or any other exception) lands here, in the
        # middle of poll(): the CAD process group must not outlive the task.
        if exited is None:
            _kill_group(proc.pid, signal.SIGKILL)
            os.wait4(proc.pid, 0)
        raise
    else:
        reader.finish()
        if exited is None:
            # The pipe closed first (the child closed its fd): wait for the exit,
            # still honouring the deadline.
            status, rusage, late = _wait_with_deadline(proc, pidfd, deadline, limits)
            _kill_group(proc.pid, signal.SIGKILL)
            return status, rusage, timed_out or late
        return exited[0], exited[1], timed_out
    finally:
        os.close(pidfd)


def _wait_with_deadline(
    proc: subprocess.Popen[bytes], pidfd: int, deadline: float, limits: RunLimits
) -> tuple[int, Any, bool]:
    timed_out = False
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    remaining = deadline - time.monotonic()
    if not poller.poll(max(0, int(remaining * 1000))):
        timed_out = True
        _kill_group(proc.pid, signal.SIGTERM)
        if not poller.poll(int(limits.kill_grace_s * 1000)):
            _kill_group(proc.pid, signal.SIGKILL)
    _pid, status, rusage = os.wait4(proc.pid, 0)
    return status, rusage, timed_out
