"""Run any argv as a contained, traced subprocess (DESIGN rules 2-5).

- The child's environment is built from an allowlist, plus the trace context
  (``TRACEPARENT``/``TRACESTATE``/``BAGGAGE``) and the telemetry pipe's fd.
- The engine runs under a keeper (``_contain.py``, started with this
  interpreter): a child subreaper, so every process the job starts stays in
  its subtree, even one that calls ``setsid()``; it sets the limits
  (``RLIMIT_AS``, ``_CPU``, ``_FSIZE``, ``_NPROC``) between its fork and the
  engine's exec, kills the engine with ``PR_SET_PDEATHSIG`` if it dies, and
  kills everything when the process that started it dies (a worker killed by
  Celery's hard time limit leaves no FreeCAD behind). After the engine's exit
  it kills and reaps whatever the job left, so no process of the job outlives
  it. The runner starts the keeper with ``vfork()``, as ``subprocess`` does
  without a ``preexec_fn``; a ``preexec_fn`` would force a full ``fork()`` of
  the worker.
- Or, with ``warm=``, a warm engine (``_warm.py``) forks the keeper and the
  keeper forks the engine's process, set up for the job before its code
  runs; the runner watches and signals the keeper through a pidfd, and gets
  its wait status from the fork server. Should the warm engine not answer,
  the job starts cold, and says why.
- The engine has its own process group; on timeout it gets SIGTERM, then,
  after a grace period, the whole job SIGKILL. Stdin closed; the engine's
  peak memory from ``wait4()``'s ``ru_maxrss``, its peak address space
  sampled, both reported by the keeper on a status pipe of their own.
- One thread: ``poll()`` over the telemetry pipe, the status pipe and a pidfd.
  Lines are bounded in length and count; anything malformed is dropped and
  counted. Once the keeper has reaped every process of the job, no writer of
  the pipe is left and it is read to its end, however long the replay takes.
- A classified outcome. FreeCAD's exit code lies (0 after an uncaught
  exception), so success means the child delivered its result manifest; a
  failure is classified from the evidence (signals, the child's errors and
  stderr, peak memory against the limit).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ..tracing import inject_into_env, journal_note, pinnable_tracer
from ._replay import EventObserver, Replayer
from ._warm import IN_DOUBT, WarmStart, read_exit, request_warm

__all__ = [
    "DEFAULT_ENV_ALLOWLIST",
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_MAX_PROCESSES",
    "OUTCOMES",
    "RunLimits",
    "RunResult",
    "run",
]

OUTCOMES = (
    "ok",
    "script_error",
    "crash",
    "timeout",
    "oom",
    "killed",
    "bad_output",
    "resource_limit",
    "disk_full",
)

# What a CAD process needs to start, and nothing that could carry a secret.
DEFAULT_ENV_ALLOWLIST = frozenset(
    {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "HOME", "USER", "LOGNAME", "PYTHONHASHSEED"}
)
# An engine runs in 2-3 tasks (threads included) here; OCCT's thread pool takes
# one thread a core. Room for a 128-core host, and a fork bomb stops early.
DEFAULT_MAX_PROCESSES = 256
# Twice the largest mesh export the job schema lets through (its mesh budget:
# about 1 GiB of ASCII STL) and far below a disk: a runaway writer stops here.
DEFAULT_MAX_FILE_BYTES = 2 << 30
TELEMETRY_FD_ENV = "CADSCOPE_TELEMETRY_FD"
# The keeper runs from its compiled module (a script is compiled at every start),
# appended to the path: nothing of the standard library can be shadowed.
_KEEPER = (
    f"import sys; sys.path.append({str(Path(__file__).resolve().parent)!r}); "
    "import _contain; _contain.main(sys.argv[1:])"
)
_MEMORY_ERRORS = ("MemoryError", "OutOfMemory", "bad_alloc", "Standard_OutOfMemory")
# What an engine or its stderr says when it meets a limit or a full disk.
_MEMORY_TEXT = (*_MEMORY_ERRORS, "Cannot allocate memory", "out of memory")
_FILE_SIZE_TEXT = ("File too large", "EFBIG")
_DISK_TEXT = ("No space left on device", "ENOSPC", "Disk quota exceeded")
_PROCESS_TEXT = ("Resource temporarily unavailable", "can't start new thread")
# Peak memory this close to the limit is the limit: RLIMIT_AS refuses an
# allocation at VmPeak + its size, and the engine may then die any way at all.
_NEAR_VM_PEAK = 0.95
_NEAR_RSS = 0.9
_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE}
_READ_CHUNK = 1 << 16
_PIPE_BYTES = 1 << 20
# After SIGUSR1 the keeper kills and reaps the job within its sweep's bound (5 s);
# past this the runner kills the keeper, and the engine dies with it (PR_SET_PDEATHSIG).
_KEEPER_BACKSTOP_S = 7.0
# Only when the keeper could not vouch that every process of the job is gone: how
# long a writer may keep the telemetry pipe open after the engine's exit.
_DRAIN_S = 1.0
# The C scanner under json.loads, without its wrapping (set in JSONDecoder.__init__; typeshed omits it).
_SCAN = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _decode_event(line: bytes) -> Any:
    """One event line as ``json.loads`` reads it, in half the time.

    The probe writes one compact ASCII JSON value a line. ``json.loads`` on
    bytes first guesses the encoding and matches whitespace before and after
    the value with regular expressions, which on a short line costs as much as
    the parse: 2.3 us a line against 1.1 here, over the standard job's
    126-byte lines. Raises ValueError for
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
    # Processes and threads the job may have at once (RLIMIT_NPROC over what
    # the worker's user runs at the job's start; the kernel exempts root).
    max_processes: int | None = DEFAULT_MAX_PROCESSES
    # The largest file the job may write, logs included (RLIMIT_FSIZE).
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES
    max_line_bytes: int = 1 << 20
    max_events: int = 200_000
    max_spans: int = 10_000
    stderr_tail_bytes: int = 4096
    # After a read that empties the pipe, leave it this long before reading
    # again (the child's exit still wakes us at once). A read costs the
    # worker far more on cold caches than the events it brings: on the
    # standard FreeCAD job, 0.5 s instead of 0.1 s cut the worker's CPU by
    # 1.5-2.1 ms of 7-9 (two reads instead of five).
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
    peak_vm_bytes: int = 0  # the engine's peak address space, sampled (VmPeak)
    leftovers: int = 0  # processes of the job still alive at the engine's exit, then killed
    start: str = "cold"  # warm: forked by a warm engine; cold: a fresh engine process
    cold_reason: str | None = None  # why a job asked to start warm started cold
    start_s: float = 0.0  # from the request to the job's code about to run
    warm: dict[str, Any] = field(default_factory=dict)  # the fork server: pid, forks, rss, fork_s

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


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


def _resolve(executable: str, env: Mapping[str, str]) -> str:
    """``executable`` as ``subprocess`` finds it: a path as given, a name on the child's PATH."""
    if os.path.dirname(executable):
        return executable
    for directory in os.get_exec_path(env):
        candidate = os.path.join(directory, executable)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), executable)


def _keeper_argv(argv: Sequence[str], limits: RunLimits, status_fd: int, env: Mapping[str, str]) -> list[str]:
    """The command that starts ``argv`` under its keeper, with these limits."""
    command = [sys.executable, "-I", "-S", "-c", _KEEPER, "--parent", str(os.getpid()), "--status-fd", str(status_fd)]
    for option, value in (
        ("--memory", limits.memory_bytes),
        ("--cpu", limits.cpu_seconds),
        ("--file-size", limits.max_file_bytes),
        ("--processes", limits.max_processes),
    ):
        if value is not None:
            command += [option, str(int(value))]
    return [*command, "--", _resolve(argv[0], env), *argv[1:]]


class _Keeper:
    """The runner's side of one keeper: its process, its status pipe, its report."""

    def __init__(self, proc: subprocess.Popen[bytes], status_fd: int) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.pidfd = os.pidfd_open(proc.pid)
        self.status_fd = status_fd
        os.set_blocking(status_fd, False)
        self.engine_pid: int | None = None
        self.started_at: float | None = None  # when the engine was running
        self.report: dict[str, str] = {}
        self.exec_errno: int | None = None
        self._buffer = b""

    def read_status(self) -> None:
        while True:
            try:
                chunk = os.read(self.status_fd, 4096)
            except BlockingIOError:
                return
            if not chunk:
                return
            self._buffer += chunk
            *lines, self._buffer = self._buffer.split(b"\n")
            for line in lines:
                kind, _, rest = line.decode("ascii", "replace").partition(" ")
                fields = dict(item.partition("=")[::2] for item in rest.split())
                if kind == "started":
                    self.engine_pid = int(fields["pid"])
                    self.started_at = time.monotonic()
                elif kind == "failed":
                    self.exec_errno = int(fields.get("errno", "0"))
                elif kind == "ended":
                    self.report = fields

    @property
    def swept(self) -> bool:
        """Whether the keeper killed and reaped every process of the job."""
        return self.report.get("swept") == "1"

    def terminate(self) -> None:
        """SIGTERM to the engine's group, through the keeper."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to every process of the job, through the keeper."""
        self._signal(signal.SIGUSR1)

    def force_kill(self) -> None:
        """The keeper itself, should it not have done its work: its engine dies with it."""
        self._signal(signal.SIGKILL)
        if self.engine_pid is not None:
            _kill_group(self.engine_pid, signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        try:
            os.kill(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def reap(self) -> tuple[int, Any]:
        _pid, status, rusage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        self.read_status()
        return status, rusage

    def close(self) -> None:
        os.close(self.pidfd)
        os.close(self.status_fd)


class _NoUsage:
    """The resource usage of a keeper that is not this process's child: unknown."""

    ru_maxrss = 0
    ru_utime = 0.0
    ru_stime = 0.0


class _WarmKeeper(_Keeper):
    """A keeper a warm engine forked: watched through the pidfd it sent, signalled through
    it, its wait status from the fork server that reaped it."""

    def __init__(self, start: WarmStart, status_fd: int) -> None:
        self.start = start
        self.pid = start.keeper_pid
        self.pidfd = start.pidfd
        self.status_fd = status_fd
        os.set_blocking(status_fd, False)
        self.engine_pid = None
        self.started_at = None
        self.report = {}
        self.exec_errno = None
        self._buffer = b""

    def _signal(self, sig: int) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            pass

    def reap(self) -> tuple[int, Any]:
        status = read_exit(self.start)
        self.read_status()
        if status is None:  # the fork server is gone: the keeper's report, or a death by SIGKILL
            status = int(self.report["status"]) if self.report else signal.SIGKILL
        return status, _NoUsage()

    def close(self) -> None:
        super().close()
        self.start.sock.close()


@dataclass(frozen=True)
class _Evidence:
    """What the job left behind to classify its end by."""

    status: int
    timed_out: bool
    max_rss: int
    vm_peak: int
    stderr_tail: str


def _mentions(text: str, markers: Sequence[str]) -> str | None:
    """The first line of ``text`` naming one of ``markers`` (case-insensitive), stripped."""
    lowered = [marker.lower() for marker in markers]
    for line in reversed(text.splitlines()):
        if any(marker in line.lower() for marker in lowered):
            return line.strip()[:512]
    return None


def _classify(
    evidence: _Evidence, replayer: Replayer, limits: RunLimits, require_manifest: bool
) -> tuple[str, str | None, str]:
    status = evidence.status
    signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    last_error = replayer.errors[-1] if replayer.errors else None
    memory_error = next((e for e in replayer.errors if any(m in e[0] for m in _MEMORY_ERRORS)), None)
    # What the engine said last: its last error as the probe saw it, then its stderr.
    said = "\n".join([*(f"{e[0]}: {e[1]}" for e in replayer.errors[-1:]), evidence.stderr_tail])
    if evidence.timed_out:
        return "timeout", "timeout", f"killed after its {limits.timeout_s:g} s timeout"
    if signum == signal.SIGXCPU:
        return "timeout", "cpu_limit", "CPU time limit exceeded"
    if memory_error is not None:
        return "oom", memory_error[0], memory_error[1]
    if replayer.manifest is not None or (not require_manifest and code == 0):
        return "ok", None, ""
    if signum == signal.SIGXFSZ or (limits.max_file_bytes is not None and _mentions(said, _FILE_SIZE_TEXT)):
        message = f"a file reached the job's file size limit ({limits.max_file_bytes} bytes)"
        return "resource_limit", "file_size_limit", message
    if line := _mentions(said, _DISK_TEXT):
        return "disk_full", "ENOSPC", line
    if line := _mentions(said, _MEMORY_TEXT):
        return "oom", "MemoryError" if "MemoryError" in line else "memory_error", line
    limit = limits.memory_bytes
    if limit is not None and (evidence.vm_peak >= _NEAR_VM_PEAK * limit or evidence.max_rss >= _NEAR_RSS * limit):
        how = f"died of {signal.Signals(signum).name}" if signum is not None else f"exited with status {code}"
        if signum is None and last_error is not None:
            how = f"failed with {last_error[0]}: {last_error[1]}"
        return (
            "oom",
            "memory_limit",
            (
                f"ran into its memory limit of {limit} bytes (peak address space {evidence.vm_peak}, "
                f"peak RSS {evidence.max_rss}), then {how}"
            ),
        )
    if limits.max_processes is not None and (line := _mentions(said, _PROCESS_TEXT)):
        return "resource_limit", "process_limit", f"reached its limit of {limits.max_processes} processes: {line}"
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
    warm: str | None = None,
    run_name: str = "__main__",
) -> RunResult:
    """Run ``argv`` contained and traced; never raises for the child's failures.

    ``warm``: the socket of a warm engine (a fork server of ``argv[0]``) to fork
    the job from instead of starting ``argv[0]``; ``argv[1]`` is then the script
    it runs (as module ``run_name``). Should the warm engine be unavailable or
    refuse, the job starts cold (``RunResult.cold_reason`` says why).

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
                warm,
                run_name,
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
        span.set_attribute("cad.start", result.start)
        span.set_attribute("cad.subprocess.start_s", round(result.start_s, 6))
        if result.cold_reason is not None:
            span.set_attribute("cad.start.reason", result.cold_reason)
        for key, value in result.warm.items():
            span.set_attribute(f"cad.warm.{key}", value)
        span.set_attribute("cad.subprocess.peak_rss_bytes", result.peak_rss_bytes)
        span.set_attribute("cad.subprocess.cpu_seconds", round(result.cpu_s, 6))
        for key in ("engine", "freecad_version", "occt_version"):
            if key in result.hello:
                span.set_attribute(f"cad.{key}", result.hello[key])
        if result.peak_vm_bytes:
            span.set_attribute("cad.subprocess.peak_vm_bytes", result.peak_vm_bytes)
        if result.leftovers:
            span.set_attribute("cad.subprocess.leftovers", result.leftovers)  # killed when the engine was done
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
    warm: str | None,
    run_name: str,
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
    status_r, status_w = os.pipe()
    child_env[TELEMETRY_FD_ENV] = str(write_fd)
    replayer = Replayer(tracer, span, observer, max_spans=limits.max_spans, on_drop=on_drop)
    started = time.monotonic()
    warm_start: WarmStart | str | None = None
    try:
        command = _keeper_argv(argv, limits, status_w, child_env)
        with open(stdout_path or os.devnull, "wb") as stdout:
            # Without a path, stderr still goes to a file, unnamed, for the tail
            # the outcome is classified by (a MemoryError's traceback, say).
            stderr: IO[bytes] = open(stderr_path, "w+b") if stderr_path else tempfile.TemporaryFile()  # noqa: SIM115
            if warm is not None:
                fds = (write_fd, status_w, stdout.fileno(), stderr.fileno())
                warm_start = request_warm(
                    warm, command[command.index("--") + 1 :], child_env, cwd, _warm_limits(limits), fds, run_name
                )
                if warm_start == IN_DOUBT:
                    raise OSError(errno.EIO, "the warm engine took the job and did not answer; not started again")
            try:
                if isinstance(warm_start, WarmStart):
                    proc = None
                else:
                    proc = subprocess.Popen(  # noqa: S603 - argv is the caller's, never a shell
                        command,
                        stdin=subprocess.DEVNULL,
                        stdout=stdout,
                        stderr=stderr,
                        env=child_env,
                        cwd=cwd,
                        pass_fds=(write_fd, status_w),
                        start_new_session=True,
                    )
            except BaseException:
                stderr.close()
                raise
    except BaseException:
        os.close(read_fd)
        os.close(status_r)
        raise
    finally:
        os.close(write_fd)
        os.close(status_w)
    keeper: _Keeper
    if isinstance(warm_start, WarmStart):
        keeper = _WarmKeeper(warm_start, status_r)
    else:
        assert proc is not None
        keeper = _Keeper(proc, status_r)
    span.set_attribute("process.pid", keeper.pid)  # known now, whatever happens next; the engine's once it runs
    journal_note(span, {"process.pid": keeper.pid})  # so the span says which process, if this one dies
    reader = _LineReader(replayer, limits)
    try:
        status, rusage, timed_out = _supervise(keeper, span, read_fd, reader, limits, started)
    except BaseException as exc:
        replayer.close_open(type(exc).__name__)
        stderr.close()
        raise
    finally:
        os.close(read_fd)
        keeper.close()
    duration = time.monotonic() - started
    if keeper.exec_errno is not None:
        stderr.close()
        code = keeper.exec_errno
        if not code:
            raise OSError(f"the keeper could not start {argv[0]}: see the job's stderr")
        raise OSError(code, os.strerror(code), argv[0])
    stderr.seek(max(0, os.fstat(stderr.fileno()).st_size - limits.stderr_tail_bytes))
    tail = stderr.read().decode("utf-8", "replace")
    stderr.close()
    report = keeper.report
    if report:
        # The engine's own status, and its job's CPU and peak RSS without the keeper's.
        status = int(report["status"])
        max_rss, cpu = int(report["maxrss"]) * 1024, float(report["cpu"])
    else:  # the keeper itself was killed: what it reaped shows in its own usage
        max_rss, cpu = rusage.ru_maxrss * 1024, rusage.ru_utime + rusage.ru_stime
    vm_peak = int(report.get("vmpeak", 0))
    evidence = _Evidence(status, timed_out, max_rss, vm_peak, tail)
    outcome, error_type, message = _classify(evidence, replayer, limits, require_manifest)
    replayer.close_open(outcome if outcome != "ok" else "unclosed")
    return RunResult(
        outcome=outcome,
        pid=keeper.engine_pid or keeper.pid,
        exit_code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        duration_s=duration,
        peak_rss_bytes=max_rss,
        cpu_s=cpu,
        manifest=replayer.manifest if outcome == "ok" else None,
        hello=replayer.hello,
        error_type=error_type,
        error_message=message,
        dropped=replayer.dropped,
        stderr_tail=tail,
        events=reader.events,
        peak_vm_bytes=vm_peak,
        leftovers=int(report.get("leftovers", 0)),
        start="warm" if isinstance(warm_start, WarmStart) else "cold",
        cold_reason=warm_start if isinstance(warm_start, str) else None,
        start_s=(keeper.started_at - started) if keeper.started_at is not None else 0.0,
        warm=(
            {
                "server_pid": warm_start.server_pid,
                "forks": warm_start.forks,
                "server_rss_bytes": warm_start.server_rss,
                "fork_s": round(warm_start.fork_s, 6),
            }
            if isinstance(warm_start, WarmStart)
            else {}
        ),
    )


def _warm_limits(limits: RunLimits) -> dict[str, int | None]:
    """The limits a warm engine's keeper sets, as the cold keeper's options name them."""
    return {
        "memory": limits.memory_bytes,
        "cpu": limits.cpu_seconds,
        "file-size": limits.max_file_bytes,
        "processes": limits.max_processes,
    }


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
    keeper: _Keeper, span: trace.Span, read_fd: int, reader: _LineReader, limits: RunLimits, started: float
) -> tuple[int, Any, bool]:
    """Read the pipe and enforce the deadline until the keeper has exited and the pipe is read.

    On timeout: SIGTERM to the engine's group, after the grace period SIGKILL
    to every process of the job (both through the keeper), and should the
    keeper not be done within its backstop, SIGKILL to the keeper.
    """
    os.set_blocking(read_fd, False)
    poller = select.poll()
    for fd in (read_fd, keeper.pidfd, keeper.status_fd):
        poller.register(fd, select.POLLIN)
    replayer = reader.replayer
    stage = 0  # of the escalation: 1 SIGTERM sent, 2 every process killed, 3 the keeper killed
    due: float | None = started + limits.timeout_s  # when the next stage is
    exited: tuple[int, Any] | None = None
    status_open = pipe_open = True
    drain_until: float | None = None  # set when a writer may have survived the keeper
    resume_read_at: float | None = None  # set while the pipe is left to fill
    noted: list[int | None] = [None]  # the engine's pid, once noted in the span journal
    try:
        while pipe_open or exited is None:
            now = time.monotonic()
            if resume_read_at is not None and (now >= resume_read_at or exited is not None):
                poller.modify(read_fd, select.POLLIN)
                resume_read_at = None
            wake: float | None
            if exited is None:
                if due is not None and now >= due:
                    stage += 1
                    if stage == 1:
                        keeper.terminate()
                        due = now + limits.kill_grace_s
                    elif stage == 2:
                        keeper.kill()
                        due = now + _KEEPER_BACKSTOP_S
                    else:
                        keeper.force_kill()
                        due = None
                wake = due
            elif drain_until is not None:
                if now >= drain_until:
                    replayer.drop("pipe_held_open")
                    break
                wake = drain_until
            else:
                wake = None  # every writer is dead: the pipe ends where its data does
            if resume_read_at is not None:
                wake = resume_read_at if wake is None else min(wake, resume_read_at)
            timeout_ms = None if wake is None else max(0, int((wake - now) * 1000) + 1)
            for fd, mask in poller.poll(timeout_ms):
                if fd == keeper.status_fd and status_open:
                    keeper.read_status()
                    if keeper.engine_pid is not None and keeper.engine_pid != noted[0]:
                        span.set_attribute("process.pid", keeper.engine_pid)
                        journal_note(span, {"process.pid": keeper.engine_pid})
                        noted[0] = keeper.engine_pid
                    if mask & (select.POLLHUP | select.POLLERR):
                        poller.unregister(fd)
                        status_open = False
                elif fd == keeper.pidfd and exited is None:
                    exited = keeper.reap()
                    poller.unregister(fd)
                    if status_open:
                        poller.unregister(keeper.status_fd)
                        status_open = False
                    if not keeper.swept:
                        # The keeper was killed before it could vouch for the job's
                        # processes: kill the engine's group, read what comes in time.
                        if keeper.engine_pid is not None:
                            _kill_group(keeper.engine_pid, signal.SIGKILL)
                        drain_until = time.monotonic() + _DRAIN_S
                elif fd == read_fd and pipe_open:
                    try:
                        chunk = os.read(read_fd, _READ_CHUNK)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        if exc.errno != errno.EINTR:
                            pipe_open, resume_read_at = False, None
                            poller.unregister(read_fd)
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
                        pipe_open, resume_read_at = False, None
                        poller.unregister(read_fd)
    except BaseException:
        # Celery's soft time limit (or any other exception) lands here, in the
        # middle of poll(): no process of the job may outlive the task.
        if exited is None:
            _stop(keeper)
        raise
    reader.finish()
    assert exited is not None
    return exited[0], exited[1], stage > 0


def _stop(keeper: _Keeper) -> None:
    """Every process of the job killed and the keeper reaped, now, within the backstop."""
    keeper.kill()
    poller = select.poll()
    poller.register(keeper.pidfd, select.POLLIN)
    if not poller.poll(int(_KEEPER_BACKSTOP_S * 1000)):
        keeper.force_kill()
    keeper.reap()
