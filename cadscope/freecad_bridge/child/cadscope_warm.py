"""A warm engine: a fork server that has imported the engine's modules and nothing else.

Standard library only. Started by the worker (``cadscope.freecad_bridge``'s
``WarmPool``) as ``freecadcmd cadscope_warm.py`` or ``python cadscope_warm.py``,
configured by environment variables (``freecadcmd`` reads its arguments as
files to open):

- ``CADSCOPE_WARM_SOCKET``: the path it listens on (a Unix ``SOCK_SEQPACKET``
  socket, bound under a temporary name and renamed into place once ready, so a
  successor takes over the path atomically);
- ``CADSCOPE_WARM_PRELOAD``: modules to import (comma-separated), or
  ``CADSCOPE_WARM_PRELOAD_FROM``: a script whose top-level ``import`` and
  ``from ... import`` of ``OCP`` modules are imported;
- ``CADSCOPE_WARM_EXE``: the engine executable, whose identity (inode, size,
  modification time) is checked before every fork; ``CADSCOPE_WARM_NAME``:
  the engine's name, in the server's title (``ps``: ``cadscope-warm freecad``;
  its keepers ``cadscope-keeper -- ARGV``, its jobs their own ``ARGV``);
- ``CADSCOPE_WARM_CONTROL_FD``: a pipe to its owner, one line each:
  ``ready rss=B``, ``forked n=N rss=B``, ``retire reason=R``;
- ``CADSCOPE_WARM_PARENT``, ``CADSCOPE_WARM_MAX_FORKS``,
  ``CADSCOPE_WARM_MAX_RSS_GROWTH``.

It dies with its owner (``PR_SET_PDEATHSIG``), has no thread, opens no
document and no telemetry pipe, and never runs job code. It asks to be
replaced (``retire``) after ``MAX_FORKS`` forks, when its RSS has grown by
more than ``MAX_RSS_GROWTH`` bytes, when a thread appears in it, or when the
engine executable on disk changes (it then refuses to fork: the versions it
would report are no longer those on disk); on SIGTERM it stops accepting,
answers for the jobs it started, and exits.

One request per connection: a JSON message ``{"argv", "env", "cwd", "limits",
"run_name"}`` with five fds (the telemetry pipe's write end, the keeper's
status pipe, stdout, stderr, a pidfd of the requesting process). It forks a
keeper (``_contain.Keeper``: subreaper, limits, group kill, peak memory, the
same status lines as a cold keeper) in a session of its own, and answers
``{"keeper": PID, "fork_s", "forks", "rss", "server"}`` with a pidfd of the
keeper, then ``{"exit": STATUS}`` once it has reaped it; or ``{"refused": REASON}``.
The keeper forks the job's process, which, before any job code runs, gets its
own process group, the parent-death signal, the limits, its working
directory, its environment (``os.environ``, trace context included), stdin
from ``/dev/null``, stdout and stderr, the telemetry pipe on fd 3, and then
runs the job's script at this module's top level as the engine would have
(``freecadcmd`` names the module after the script's stem, ``python``
``__main__``).
"""

import ast
import errno
import importlib
import json
import os
import runpy
import select
import signal
import socket
import struct
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.dirname(_HERE))  # _contain, the keeper: appended, so nothing standard is shadowed

import _contain  # noqa: E402

_MAX_MESSAGE = 1 << 18
_PR_SET_NAME = 15
_FDS = 5
_REQUEST_TIMEOUT_S = 1.0  # a runner sends its request as it connects: a stalled one holds up no other for long


def _rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _set_title(name, argv):
    """This process's name (``comm``) and command line as ``ps`` and ``/proc`` show them.

    The command line is rewritten in place, within the memory the kernel gave
    it at exec (``arg_start`` to ``arg_end``), as ``setproctitle`` does; a
    longer one is cut. A process forked from the server then shows its job's
    script, not the server's."""
    import ctypes

    try:
        if name:
            _contain._LIBC.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
        if argv:
            with open("/proc/self/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48 and 49)
            size = end - start
            data = b"\0".join(a.encode() for a in argv) + b"\0"
            data = data[: size - 1] + b"\0" if len(data) > size else data.ljust(size, b"\0")
            if start and size > 0:
                ctypes.memmove(start, data, size)
    except (OSError, ValueError, IndexError):
        pass  # a title is for people: the job runs without it


def _threads():
    return len(os.listdir("/proc/self/task"))


def _identity(path):
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _ocp_modules(script):
    """The OCP modules ``script`` imports at its top level."""
    with open(script) as handle:
        tree = ast.parse(handle.read())
    names = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("OCP"):
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(a.name for a in node.names if a.name.startswith("OCP"))
    return names


def _ppid(pid):
    with open("/proc/%d/stat" % pid, "rb") as file:
        stat = file.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def _pidfd_pid(fd):
    with open("/proc/self/fdinfo/%d" % fd) as file:
        for line in file:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise ValueError("not a pidfd")


class _WarmKeeper(_contain.Keeper):
    """A keeper whose engine is a fork of this warm process, set up then handed back as JobReady."""

    def __init__(self, options, request, fds, engine_fds, keep_fds):
        super().__init__(options, keep_fds=keep_fds, parent_fd=fds["parent"])
        self.request = request
        self.fds = fds
        self.engine_fds = engine_fds

    def environment(self):
        return {k.encode(): v.encode() for k, v in self.request["env"].items()}

    def kept_fds(self):
        return (self.fds["parent"], *self.engine_fds)

    def launch(self, env, ready_w):
        request = self.request
        os.chdir(request["cwd"] or "/")
        null = os.open(os.devnull, os.O_RDONLY)
        # Every fd above all of its targets first, so no dup2 overwrites a source still needed.
        high = max(null, *self.fds.values(), *self.engine_fds) + 1
        moved = [
            os.dup2(fd, high + i, inheritable=False)
            for i, fd in enumerate((null, self.fds["stdout"], self.fds["stderr"], self.fds["telemetry"]))
        ]
        for target, fd in enumerate(moved[:3]):
            os.dup2(fd, target, inheritable=True)
        telemetry = moved[3]
        os.set_inheritable(telemetry, True)
        # ready_w closes too: its end tells the keeper the job is set up. The
        # engine's own fds (opened while its modules were imported) stay.
        _contain._close_all_but({0, 1, 2, telemetry, *self.engine_fds})
        environ = dict(request["env"])
        environ["CADSCOPE_TELEMETRY_FD"] = str(telemetry)
        os.environ.clear()
        os.environ.update(environ)
        script = request["argv"][1]
        sys.argv = list(request["argv"][1:])
        # As the interpreter does at its start: the script's folder, then PYTHONPATH.
        extra = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[0:0] = [os.path.dirname(os.path.abspath(script)), *extra]
        _set_title(os.path.basename(request["argv"][0]), request["argv"])
        raise _contain.JobReady(request)


class Server:
    def __init__(self):
        env = os.environ
        self.path = env["CADSCOPE_WARM_SOCKET"]
        self.exe = env["CADSCOPE_WARM_EXE"]
        self.name = env.get("CADSCOPE_WARM_NAME", "engine")
        self.control = int(env["CADSCOPE_WARM_CONTROL_FD"])
        self.parent = int(env["CADSCOPE_WARM_PARENT"])
        self.max_forks = int(env.get("CADSCOPE_WARM_MAX_FORKS", "0")) or None
        self.max_growth = int(env.get("CADSCOPE_WARM_MAX_RSS_GROWTH", "0")) or None
        self.identity = _identity(self.exe)
        self.preload_names = env.get("CADSCOPE_WARM_PRELOAD", "")
        self.preload_from = env.get("CADSCOPE_WARM_PRELOAD_FROM")
        self.forks = 0
        self.keepers = {}  # keeper pid -> its connection
        self.retiring = None
        self.listener = None
        self.base_rss = 0
        self.engine_fds = set()

    def say(self, line):
        try:
            os.write(self.control, (line + "\n").encode())
        except OSError:
            pass

    def retire(self, reason):
        if self.retiring is None:
            self.retiring = reason
            self.say("retire reason=%s" % reason)

    def preload(self):
        names = [n for n in self.preload_names.split(",") if n]
        script = self.preload_from
        if script:
            names += _ocp_modules(script)
        for name in names:
            importlib.import_module(name)

    def serve(self):
        _contain.prctl(_contain.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self.parent:
            os._exit(1)
        for name in list(os.environ):
            if name.startswith("CADSCOPE_WARM_"):
                del os.environ[name]
        self.preload()
        _set_title("cadscope-warm", ["cadscope-warm", self.name])
        self.engine_fds = {int(fd) for fd in os.listdir("/proc/self/fd")} - {0, 1, 2, self.control}
        self.engine_fds = {fd for fd in self.engine_fds if _is_open(fd)}
        if _threads() != 1:
            self.say("retire reason=threads")  # a fork would copy a thread's locks, not the thread
            os._exit(3)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        signal.set_wakeup_fd(wake_w)
        for signum in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(signum, lambda *_: None)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        staging = "%s.%d" % (self.path, os.getpid())
        listener.bind(staging)
        listener.listen(64)
        os.replace(staging, self.path)
        self.listener = listener
        self.base_rss = _rss_bytes()
        self.say("ready rss=%d" % self.base_rss)
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        stopping = False
        while not (stopping and not self.keepers):
            for fd, _mask in poller.poll(1000 if stopping else None):
                if fd == wake_r:
                    try:
                        signals = os.read(wake_r, 256)
                    except BlockingIOError:
                        signals = b""
                    if signal.SIGTERM in signals and not stopping:
                        stopping = True
                        poller.unregister(listener.fileno())
                        listener.close()  # the path may be a successor's now: left alone
                    self.reap()
                elif fd == listener.fileno() and not stopping:
                    try:
                        conn, _ = listener.accept()
                    except OSError:
                        continue
                    self.handle(conn, (listener, wake_r, wake_w))  # returns in this process only
            self.reap()
        os._exit(0)

    def reap(self):
        while self.keepers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.keepers.pop(pid, None)
            if conn is not None:
                self.send(conn, {"exit": status})
                conn.close()

    @staticmethod
    def send(conn, message, fds=()):
        try:
            socket.send_fds(conn, [json.dumps(message).encode()], list(fds))
        except OSError:
            pass  # the runner is gone; its keeper sees it and kills the job

    def refuse(self, conn, reason):
        self.send(conn, {"refused": reason})
        conn.close()

    def handle(self, conn, own):
        conn.settimeout(_REQUEST_TIMEOUT_S)
        try:
            data, fds, _flags, _addr = socket.recv_fds(conn, _MAX_MESSAGE, _FDS)
        except OSError:
            conn.close()
            return
        try:
            request = json.loads(data)
            if len(fds) != _FDS:
                raise ValueError("expected %d fds, got %d" % (_FDS, len(fds)))
        except ValueError:
            for fd in fds:
                os.close(fd)
            self.refuse(conn, "bad_request")
            return
        names = dict(zip(("telemetry", "status", "stdout", "stderr", "parent"), fds, strict=True))
        if not self.trusted(conn, request, names["parent"]):
            for fd in fds:
                os.close(fd)
            self.refuse(conn, "forbidden")
            return
        reason = self.health()
        if reason is not None:
            for fd in fds:
                os.close(fd)
            self.retire(reason)
            self.refuse(conn, reason)
            return
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()  # nothing of this process's output may be written twice
            except Exception:  # noqa: BLE001
                pass
        _contain._LIBC.fflush(None)  # nor of the engine's (C stdio, and C++ streams synced with it)
        started = time.monotonic()
        try:
            pid = os.fork()
        except OSError:
            pid = -1
        if pid == 0:
            self.become_keeper(request, names, conn, own)  # never returns; JobReady in the job
        for fd in fds:
            os.close(fd)  # the keeper has them
        if pid < 0:
            self.refuse(conn, "fork_failed")
            return
        fork_s = time.monotonic() - started
        pidfd = os.pidfd_open(pid)  # before any reaping: the pid is this keeper's
        self.forks += 1
        rss = _rss_bytes()
        reply = {"keeper": pid, "fork_s": fork_s, "forks": self.forks, "rss": rss, "server": os.getpid()}
        self.send(conn, reply, [pidfd])
        os.close(pidfd)
        self.keepers[pid] = conn
        self.say("forked n=%d rss=%d" % (self.forks, rss))
        if self.max_forks is not None and self.forks >= self.max_forks:
            self.retire("max_forks")

    def trusted(self, conn, request, pidfd):
        """Only the owner (the worker's main process) and its children (the pool processes) may
        start a job, and the pidfd a request sends must be the sender's own: a job (a process of
        the same user, which can reach this socket) must not start a keeper with limits, a
        session or a watched process of its own choosing."""
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            peer = struct.unpack("3i", creds)[0]
            if request.get("parent") != peer:
                return False
            if peer != self.parent and _ppid(peer) != self.parent:
                return False
            return _pidfd_pid(pidfd) == peer
        except (OSError, ValueError):
            return False

    def health(self):
        """Why this process must not fork another job, if it must not."""
        if self.retiring is not None:
            return self.retiring
        try:
            if _identity(self.exe) != self.identity:
                return "engine_changed"
        except OSError:
            return "engine_changed"
        if _threads() != 1:
            return "threads"
        if self.max_growth is not None and _rss_bytes() - self.base_rss > self.max_growth:
            return "rss"
        return None

    def become_keeper(self, request, fds, conn, own):
        """In the forked keeper: the server's own fds closed, a session of its own, then keep."""
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, signal.SIGTERM):
                signal.signal(signum, signal.SIG_DFL)
            # Sockets detached before their fds are closed: a socket object that
            # is collected later must not close a number the job reuses.
            for other in (conn, own[0], *self.keepers.values()):
                other.detach()
            self.keepers.clear()
            _contain._close_all_but({0, 1, 2, *self.engine_fds, *fds.values()})
            os.setsid()
            _set_title("cadscope-keep", ["cadscope-keeper", "--", *request["argv"]])
            limits = request.get("limits") or {}
            argv = ["--parent", str(int(request.get("parent", 0))), "--status-fd", str(fds["status"])]
            for option in ("memory", "cpu", "file-size", "processes"):
                if limits.get(option) is not None:
                    argv += ["--" + option, str(int(limits[option]))]
            options = _contain.Options([*argv, "--", *request["argv"]])
            os.set_inheritable(fds["status"], False)
            _contain.keep(lambda keep_fds: _WarmKeeper(options, request, fds, self.engine_fds, keep_fds))
        except _contain.JobReady:
            raise
        except BaseException as exc:  # noqa: BLE001 - a keeper that cannot start says so and goes
            code = exc.errno if isinstance(exc, OSError) and exc.errno else 0
            try:
                os.write(fds["status"], b"failed errno=%d\n" % code)
            except OSError:
                pass
        os._exit(127)


def _serve():
    try:
        Server().serve()
    except _contain.JobReady as ready:
        return ready.args[0]
    except OSError as exc:
        sys.stderr.write("cadscope_warm: %s\n" % exc)
        os._exit(2 if exc.errno != errno.EADDRINUSE else 4)
    os._exit(0)


_job = _serve()
# Here only in a job's process: the job's script runs as its engine would run it.
del _serve
_script = _job["argv"][1]
_path = os.environ.get("PYTHONPATH", "").split(os.pathsep)
if _path[0] and os.path.abspath(_path[0]) == _HERE:
    # What this folder's sitecustomize does at a cold engine's start (the
    # engine's own sitecustomize ran at this process's start).
    if os.environ.get("CADSCOPE_TELEMETRY_FD") and os.environ.get("CADSCOPE_AUTO") != "0":
        try:
            import cadscope_auto

            cadscope_auto.bootstrap()
        except Exception:  # noqa: BLE001 - as the sitecustomize: the job runs, instrumented or not
            pass
runpy.run_path(_script, run_name=_job.get("run_name") or "__main__")
