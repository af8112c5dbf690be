"""Warm engines: one fork server per engine executable, so a job skips the engine's start-up.

A :class:`WarmPool` (started once per worker host, by the worker's main
process) runs ``child/cadscope_warm.py`` in each engine: FreeCAD's
``freecadcmd`` with ``FreeCAD`` and ``Part`` imported, and
OCP's Python with the OCP modules ``engine_ocp.py`` imports. Each listens on a
Unix socket in the pool's directory (``$CADSCOPE_WARM_DIR``, which the pool
exports so that the processes it forks find it). The runner
(:func:`~cadscope.freecad_bridge.run` with ``warm=``) sends a job's argv,
environment, working directory and limits with its fds; the fork server forks
a keeper, the keeper forks the job's process, and everything the runner
promises for a cold job holds (see ``docs/warm.md``).

The pool replaces a fork server that asks for it (after ``max_forks`` forks,
RSS grown past ``max_rss_growth`` bytes, the engine executable changed on
disk, a thread in it) or that died, and looks at the engine executables every
second so that a changed engine is replaced before a job finds it: the
successor binds a temporary path and renames it over the old one, so a runner
connects to one or the other.
Recycles are counted (``cadscope_warm_recycles_total``, by reason).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..metrics import bound, bound_version

__all__ = ["WARM_DIR_ENV", "WarmPool", "WarmStart", "request_warm", "warm_socket_path"]

log = logging.getLogger("cadscope.freecad_bridge")

WARM_DIR_ENV = "CADSCOPE_WARM_DIR"
# request_warm's answer when the request went out and no answer came back.
IN_DOUBT = "in_doubt"
CHILD_DIR = Path(__file__).resolve().parent / "child"
_SERVER = CHILD_DIR / "cadscope_warm.py"
# What each engine's fork server imports: exactly the modules its job scripts import at
# their start, no more. Importing a module can change what later calls do: FreeCAD's
# ``Import`` applies the user's STEP preferences to OCCT when it loads (the schema of
# every STEP file ``Part`` writes after it), so a preloaded ``Import`` would make a
# warm job write other files than a cold one. ``engine_freecad.py`` loads Mesh and MeshPart at
# its start (its STL exports mesh with them).
_FREECAD_PRELOAD = "FreeCAD,Part,Mesh,MeshPart"
# How long a runner waits for a fork server's successor (a recycle) before it starts cold.
SUCCESSOR_WAIT_S = 5.0
# A fork server answers at once: it only forks. Past this it is stuck, and the job starts cold.
_REPLY_S = 10.0
# How long the owner waits for a fork server to import its engine.
_START_S = 60.0
_MAX_REPLY = 1 << 16
# How often the pool looks at the engine executables on disk.
_CHECK_S = 1.0
# How long after a fork server failed to start the pool tries again (an upgrade may be half done),
# doubled after each failure in a row, up to _RETRY_MAX times.
RETRY_S = 30.0
_RETRY_MAX = 16

# The owner's supervisor thread and the processes the owner forks (the worker's
# pool) both write metrics; a fork while the thread holds prometheus_client's
# value lock would leave the child deadlocked. The thread writes under this lock,
# and a fork waits for it.
_METRICS_LOCK = threading.Lock()
os.register_at_fork(
    before=_METRICS_LOCK.acquire, after_in_parent=_METRICS_LOCK.release, after_in_child=_METRICS_LOCK.release
)


def _kind(name: str) -> str:
    """The engine of a pool's name: ``ocp`` of ``ocp@8.0.1`` (engines side by side are keyed by
    pool; a socket is named by the engine and its executable, which tell them apart)."""
    return name.split("@", 1)[0]


def warm_socket_path(engine: str, executable: str, directory: str | None = None) -> str | None:
    """Where the fork server of ``engine`` run by ``executable`` listens (None: no pool here)."""
    directory = directory or os.environ.get(WARM_DIR_ENV)
    if not directory:
        return None
    # The path as given, not resolved: two venvs' ``bin/python`` link to one interpreter, and are
    # two engines (each its own site-packages, its own OCCT).
    digest = hashlib.sha256(os.path.abspath(executable).encode()).hexdigest()[:12]
    return os.path.join(directory, f"{engine}-{digest}.sock")


@dataclass
class WarmStart:
    """A job's keeper, forked by a fork server."""

    sock: socket.socket
    keeper_pid: int
    pidfd: int
    fork_s: float
    server_pid: int
    forks: int
    server_rss: int


def request_warm(
    path: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
    limits: Mapping[str, int | None],
    fds: Sequence[int],
    run_name: str,
    successor_wait_s: float = SUCCESSOR_WAIT_S,
) -> WarmStart | str:
    """Ask the fork server at ``path`` to start ``argv``; the start, or why it could not.

    ``fds``: the telemetry pipe's write end, the keeper's status pipe, stdout,
    stderr. A refusal because the server is being recycled, or a dead server's
    socket, is retried until its successor answers, within ``successor_wait_s``.
    """
    request = json.dumps(
        {
            "argv": list(argv),
            "env": dict(env),
            "cwd": cwd or os.getcwd(),  # as a cold engine would inherit it
            "limits": dict(limits),
            "parent": os.getpid(),
            "run_name": run_name,
        }  # fmt: skip
    ).encode()
    deadline = time.monotonic() + successor_wait_s
    while True:
        reason = _try_once(path, request, fds)
        if isinstance(reason, WarmStart):
            return reason
        if reason not in ("unavailable", "max_forks", "rss", "engine_changed", "threads") or (
            time.monotonic() >= deadline
        ):
            return reason
        time.sleep(0.05)  # a successor binds its path within its engine's import time


def _try_once(path: str, request: bytes, fds: Sequence[int]) -> WarmStart | str:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    own = os.pidfd_open(os.getpid())
    try:
        sock.settimeout(_REPLY_S)
        try:
            sock.connect(path)
            socket.send_fds(sock, [request], [*fds, own])
        except FileNotFoundError:
            sock.close()
            return "no_server"  # never started here, or its engine cannot run warm: no wait
        except ConnectionRefusedError:
            sock.close()
            return "unavailable"  # the fork server died: its successor is on its way
        except OSError:
            sock.close()
            return "server_error"
        try:
            data, got, _flags, _addr = socket.recv_fds(sock, _MAX_REPLY, 1)
        except OSError:
            # Sent and not answered: the server may have forked the job's keeper already, with
            # the job's pipes and folder. Starting it again cold would run it twice.
            sock.close()
            return IN_DOUBT
    finally:
        os.close(own)
    try:
        reply = json.loads(data) if data else {"refused": "server_error"}
    except ValueError:
        reply = {"refused": "server_error"}
    if "keeper" not in reply or len(got) != 1:
        for fd in got:
            os.close(fd)
        sock.close()
        return str(reply.get("refused", "server_error"))
    return WarmStart(
        sock=sock,
        keeper_pid=int(reply["keeper"]),
        pidfd=got[0],
        fork_s=float(reply.get("fork_s", 0.0)),
        server_pid=int(reply.get("server", 0)),
        forks=int(reply.get("forks", 0)),
        server_rss=int(reply.get("rss", 0)),
    )


def read_exit(start: WarmStart, timeout_s: float = 5.0) -> int | None:
    """The keeper's wait status, as its fork server reaped it (None: the server is gone)."""
    start.sock.settimeout(timeout_s)
    try:
        data = start.sock.recv(_MAX_REPLY)
        return int(json.loads(data)["exit"]) if data else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _versions(versions: Mapping[str, str]) -> tuple[str, str]:
    return bound_version(versions.get("freecad_version", "none")), bound_version(versions.get("occt_version", "none"))


def _identity(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class _Server:
    engine: str
    executable: str
    versions: dict[str, str]
    proc: subprocess.Popen[bytes]
    control: int
    pidfd: int
    path: str
    buffer: bytes = b""
    ready: bool = False
    retiring: str | None = None
    rss: int = 0
    forks: int = 0
    identity: tuple[int, int, int] = (0, 0, 0)
    lines: list[str] = field(default_factory=list)
    launched: float = field(default_factory=time.monotonic)

    def start_failure(self) -> str:
        """Why this server never got ready: its engine starts a thread when imported, or anything else."""
        return "threads" if any(line.startswith("retire reason=threads") for line in self.lines) else "start_failed"


class WarmPool:
    """The fork servers of one worker host, kept alive and recycled by a thread of their owner.

    ``engines``: engine or pool name (``ocp``, ``ocp@8.0.1``) -> (executable, versions dict with ``freecad_version`` and
    ``occt_version``). ``metrics``: a :class:`~cadscope.metrics.Catalogue` for
    recycles and the fork servers' RSS (none: not counted). The fork servers
    start with the environment a cold engine gets (the allowlist, FreeCAD's
    private HOME), updated with ``env``.
    """

    def __init__(
        self,
        engines: Mapping[str, tuple[str, Mapping[str, str]]],
        *,
        directory: str | None = None,
        max_forks: int = 1000,
        max_rss_growth: int = 64 << 20,
        metrics: Any = None,
        env: Mapping[str, str] | None = None,
        retry_s: float = RETRY_S,
    ) -> None:
        if max_forks < 1 or max_rss_growth < 1 or retry_s <= 0:
            raise ValueError("max_forks, max_rss_growth and retry_s must be positive")
        unknown = {name for name in engines if _kind(name) not in ("freecad", "ocp")}
        if unknown:
            raise ValueError(f"no warm engine named {sorted(unknown)}")
        self.engines = {name: (exe, dict(v)) for name, (exe, v) in engines.items()}
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="cadscope-warm-")
        self.max_forks = max_forks
        self.max_rss_growth = max_rss_growth
        self.metrics = metrics
        self.env = dict(env or {})
        self.servers: dict[str, _Server] = {}
        self.retired: list[_Server] = []
        self.recycles: list[tuple[str, str]] = []  # (engine, reason), in order
        self.unavailable: dict[str, str] = {}  # engine -> why it has no fork server
        self.retry_s = retry_s
        self._retry_at: dict[str, float] = {}  # engine -> when to try starting its fork server again
        self._failed_starts: dict[str, int] = {}  # engine -> fork servers in a row that failed to start
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None

    # -- life ---------------------------------------------------------------

    def start(self, wait_s: float = _START_S) -> WarmPool:
        """Start every fork server, wait until each is ready (or failed), export the directory."""
        for name in self.engines:
            self._launch(name)
        deadline = time.monotonic() + wait_s
        while any(not s.ready for s in self.servers.values()) and time.monotonic() < deadline:
            self._step(0.1)
        for name, server in list(self.servers.items()):
            if not server.ready:
                self._stop_server(server)
                del self.servers[name]
                self._no_server(name, server.start_failure(), server)
        os.environ[WARM_DIR_ENV] = self.directory
        self._thread = threading.Thread(target=self._supervise, name="cadscope-warm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop every fork server (jobs in flight finish: their keepers are their own)."""
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(10)
            self._thread = None
        with self._lock:
            for server in [*self.servers.values(), *self.retired]:
                self._stop_server(server)
            self.servers.clear()
            self.retired.clear()
        if os.environ.get(WARM_DIR_ENV) == self.directory:
            del os.environ[WARM_DIR_ENV]
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> WarmPool:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def socket_path(self, engine: str) -> str:
        path = warm_socket_path(_kind(engine), self.engines[engine][0], self.directory)
        assert path is not None
        return path

    def server_pid(self, engine: str) -> int | None:
        with self._lock:
            server = self.servers.get(engine)
            return server.proc.pid if server is not None and server.ready else None

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 30.0) -> bool:
        """Poll ``predicate`` until it holds or the deadline passes (for tests and the bench)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return predicate()

    # -- fork servers ---------------------------------------------------------

    def _launch(self, name: str) -> _Server | None:
        executable, versions = self.engines[name]
        control_r, control_w = os.pipe()
        # The environment a cold engine starts with: what an engine reads at its start
        # (the locale, FreeCAD's user settings under HOME) must be the same.
        from ._engines import _engine_home
        from ._runner import build_env

        env = {
            **build_env(extra={"HOME": _engine_home()}),
            **self.env,
            "CADSCOPE_WARM_SOCKET": self.socket_path(name),
            "CADSCOPE_WARM_EXE": executable,
            "CADSCOPE_WARM_NAME": name,
            "CADSCOPE_WARM_CONTROL_FD": str(control_w),
            "CADSCOPE_WARM_PARENT": str(os.getpid()),
            "CADSCOPE_WARM_MAX_FORKS": str(self.max_forks),
            "CADSCOPE_WARM_MAX_RSS_GROWTH": str(self.max_rss_growth),
        }
        if _kind(name) == "freecad":
            env["CADSCOPE_WARM_PRELOAD"] = _FREECAD_PRELOAD
        else:
            env["CADSCOPE_WARM_PRELOAD_FROM"] = str(CHILD_DIR / "engine_ocp.py")
        try:
            identity = _identity(executable)
            proc = subprocess.Popen(  # noqa: S603 - the engine's own executable and our script
                [executable, str(_SERVER)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                cwd=self.directory,
                pass_fds=(control_w,),
                start_new_session=True,
            )
        except OSError:
            os.close(control_r)
            os.close(control_w)
            self._no_server(name, "start_failed")
            return None
        finally:
            with contextlib.suppress(OSError):
                os.close(control_w)
        os.set_blocking(control_r, False)
        server = _Server(name, executable, versions, proc, control_r, os.pidfd_open(proc.pid), "", identity=identity)
        server.path = self.socket_path(name)
        self.servers[name] = server
        self.unavailable.pop(name, None)
        return server

    def _no_server(self, name: str, reason: str, failed: _Server | None = None) -> None:
        """No fork server will answer for ``name``: its socket path goes, so that a job starts cold at
        once (``no_server``) instead of retrying a dead server's socket for its successor. A server
        that failed to start is tried again after ``retry_s``; one whose engine starts threads, never."""
        self.unavailable[name] = reason
        if reason == "threads":
            log.warning("no fork server for %s: its engine starts a thread when imported; its jobs start cold", name)
        else:
            failures = self._failed_starts[name] = self._failed_starts.get(name, 0) + 1
            wait_s = self.retry_s * min(2 ** (failures - 1), _RETRY_MAX)
            self._retry_at[name] = time.monotonic() + wait_s
            log.warning("no fork server for %s (%s); its jobs start cold; trying again in %.0f s", name, reason, wait_s)
        path = self.socket_path(name)
        stale = [path] if failed is None else [path, f"{path}.{failed.proc.pid}"]  # and its staging name
        for leftover in stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)

    @staticmethod
    def _stop_server(server: _Server) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(server.pidfd, signal.SIGTERM)
        try:
            server.proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(server.pidfd, signal.SIGKILL)
            server.proc.wait()
        for fd in (server.control, server.pidfd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _count(self, server: _Server, reason: str) -> None:
        self.recycles.append((server.engine, reason))
        if self.metrics is not None:
            v = server.versions
            with _METRICS_LOCK:
                reason_label = bound("recycle_reason", reason)
                self.metrics.warm_recycles.labels(_kind(server.engine), reason_label, *_versions(v)).inc()

    def _set_rss(self, server: _Server) -> None:
        if self.metrics is not None:
            v = server.versions
            with _METRICS_LOCK:
                self.metrics.warm_process_rss.labels(_kind(server.engine), *_versions(v)).set(server.rss)

    def _supervise(self) -> None:
        while True:
            try:
                stop = self._step(_CHECK_S)
                if not stop:
                    self._check_engines()
            except Exception:  # noqa: BLE001 - the pool's thread must outlive any one surprise
                stop = False
                time.sleep(0.1)
            if stop:
                return

    def _check_engines(self) -> None:
        """Replace a fork server whose engine executable changed on disk, before a job finds out;
        try again to start one that failed to, once its time comes."""
        now = time.monotonic()
        for name, at in list(self._retry_at.items()):
            if now >= at:
                del self._retry_at[name]
                with self._lock:
                    if name not in self.servers:
                        self._launch(name)
        with self._lock:
            servers = list(self.servers.values())
            stuck = [s for s in servers if not s.ready and s.retiring is None and now - s.launched > _START_S]
            for server in stuck:  # a successor or a retry that never got ready: as one that failed
                del self.servers[server.engine]
        for server in stuck:
            self._stop_server(server)
            self._no_server(server.engine, "start_failed", server)
        servers = [s for s in servers if s not in stuck]
        for server in servers:
            if not server.ready or server.retiring is not None:
                continue
            try:
                changed = _identity(server.executable) != server.identity
            except OSError:
                changed = True
            if changed:
                self._retire(server, "engine_changed")

    def _step(self, timeout_s: float | None) -> bool:
        """One round: read the fork servers' lines, replace the retiring and the dead."""
        with self._lock:
            servers = [*self.servers.values(), *self.retired]
        poller = select.poll()
        poller.register(self._stop_r, select.POLLIN)
        by_fd: dict[int, _Server] = {}
        for server in servers:
            for fd in (server.control, server.pidfd):
                poller.register(fd, select.POLLIN)
                by_fd[fd] = server
        events = poller.poll(None if timeout_s is None else int(timeout_s * 1000))
        for fd, _mask in events:
            if fd == self._stop_r:
                return True
            server = by_fd[fd]
            if fd == server.control:
                self._read_lines(server)
            elif server.proc.poll() is not None:
                self._read_lines(server)
                self._gone(server)
        return False

    def _read_lines(self, server: _Server) -> None:
        while True:
            try:
                chunk = os.read(server.control, 4096)
            except (BlockingIOError, OSError):
                return
            if not chunk:
                return
            server.buffer += chunk
            *lines, server.buffer = server.buffer.split(b"\n")
            for raw in lines:
                line = raw.decode("ascii", "replace")
                server.lines.append(line)
                kind, _, rest = line.partition(" ")
                fields = dict(item.partition("=")[::2] for item in rest.split())
                if kind == "ready":
                    server.ready = True
                    self._failed_starts.pop(server.engine, None)
                    server.rss = int(fields.get("rss", 0))
                    self._set_rss(server)
                elif kind == "forked":
                    server.forks = int(fields.get("n", 0))
                    server.rss = int(fields.get("rss", 0))
                    self._set_rss(server)
                elif kind == "retire":
                    self._retire(server, fields.get("reason", "other"))

    def _retire(self, server: _Server, reason: str) -> None:
        if server.retiring is not None:
            return
        server.retiring = reason
        self._count(server, reason)
        if reason == "threads" and not server.ready:
            # The engine starts a thread when imported: it cannot be forked safely, ever.
            self.unavailable[server.engine] = "threads"
            return
        with self._lock:
            if self.servers.get(server.engine) is server:
                del self.servers[server.engine]
                self.retired.append(server)
                self._launch(server.engine)
        # The old one stops accepting once its successor holds the path (or at once if
        # none could start), and exits when its last job's keeper is reaped.
        threading.Thread(target=self._retire_when_replaced, args=(server,), daemon=True).start()

    def _retire_when_replaced(self, server: _Server) -> None:
        successor = self.servers.get(server.engine)
        deadline = time.monotonic() + _START_S
        while successor is not None and not successor.ready and time.monotonic() < deadline:
            if successor.proc.poll() is not None:
                break
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(server.pidfd, signal.SIGTERM)

    def _gone(self, server: _Server) -> None:
        """A fork server exited: reaped, and replaced unless it was retiring or the pool is stopping."""
        server.proc.wait()
        with self._lock:
            if server in self.retired:
                self.retired.remove(server)
                replace = False
            else:
                replace = self.servers.get(server.engine) is server
                if replace:
                    del self.servers[server.engine]
        for fd in (server.control, server.pidfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        if not replace:
            return
        if not server.ready:
            self._no_server(server.engine, server.start_failure(), server)
            return
        self._count(server, "crash")
        with self._lock:
            self._launch(server.engine)


@contextlib.contextmanager
def warm_pool(engines: Mapping[str, tuple[str, Mapping[str, str]]], **kwargs: Any) -> Iterator[WarmPool]:
    """A started :class:`WarmPool`, stopped on exit."""
    pool = WarmPool(engines, **kwargs).start()
    try:
        yield pool
    finally:
        pool.stop()
