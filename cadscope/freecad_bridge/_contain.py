"""The job's keeper: the one process between the runner and a CAD engine.

Standard library only, run by the worker's own interpreter
(``python -I -S -c "...; _contain.main(sys.argv[1:])" OPTIONS -- ARGV``, or
``python -I -S _contain.py OPTIONS -- ARGV``), never imported by the worker.
A warm engine's fork server (``child/cadscope_warm.py``) imports it and forks
the same keeper for each job, whose engine is then a fork set up for the job
(``Keeper.launch``) instead of an exec. It stays for the whole job and

- marks itself a child subreaper (``PR_SET_CHILD_SUBREAPER``): a process the
  engine starts stays in the keeper's subtree, even one that calls
  ``setsid()`` or forks twice and lets its parent exit, and comes back to the
  keeper, not to init, when its parent dies;
- starts the engine (fork, then exec) in a process group of its own, with the
  job's limits set between the two (``RLIMIT_AS``, ``_CPU``, ``_FSIZE``,
  ``_NPROC``: a descendant cannot fork before they apply) and
  ``PR_SET_PDEATHSIG`` so that the engine dies with its keeper, and the
  environment the runner gave the keeper, as given (``/proc/self/environ``:
  Python's start-up adds ``LC_CTYPE`` to its own ``os.environ`` under a C
  locale);
- forwards SIGTERM to the engine's group; SIGUSR1, or the death of the
  process that started it (a pidfd, so no signal can be missed), kills every
  process of the job at once;
- samples the engine's peak address space (``VmPeak``; more often near the
  limit) as evidence that it ran into its memory limit, which a death by
  SIGSEGV does not tell;
- once the engine has exited, kills every process left in its subtree and
  reaps it, so that nothing the job started outlives it, then writes its
  report on the status fd and exits as the engine did: the same exit code, or
  the same signal.

Status fd, one line each, ``key=value`` separated by spaces:
``started pid=N`` once the engine has exec'd (or ``failed errno=N``), then
``ended status=S maxrss=KB cpu=SECONDS vmpeak=BYTES leftovers=N swept=0|1``:
the engine's wait status; the peak RSS and the CPU time of every process of
the job (the keeper's own excluded); the processes killed after the engine's
exit; whether the sweep finished (every process of the job reaped).
"""

from __future__ import annotations

import ctypes
import os
import resource
import select
import signal
import sys
import time

TYPE_CHECKING = False  # typing's own costs the keeper's start an import
if TYPE_CHECKING:
    from collections.abc import Callable

_LIBC = ctypes.CDLL(None, use_errno=True)  # None: the process itself (libc is mapped)


def prctl(option: int, value: int) -> int:
    return int(_LIBC.prctl(option, value, 0, 0, 0))


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
# Between samples of the engine's VmPeak; near the limit an allocation is
# refused soon and the last sample before the death is the evidence.
SAMPLE_S = 0.25
SAMPLE_NEAR_LIMIT_S = 0.02
NEAR_LIMIT = 0.75
# A process in uninterruptible sleep does not die at SIGKILL: the sweep gives up after this.
SWEEP_S = 5.0


class Options:
    def __init__(self, argv: list[str]) -> None:
        self.parent = 0
        self.status_fd = -1
        self.limits: dict[int, int] = {}
        self.processes: int | None = None
        self.memory: int | None = None
        split = argv.index("--")
        options, self.argv = argv[:split], argv[split + 1 :]
        for name, value in zip(options[::2], options[1::2], strict=True):
            number = int(value)
            if name == "--parent":
                self.parent = number
            elif name == "--status-fd":
                self.status_fd = number
            elif name == "--memory":
                self.memory = number
                self.limits[resource.RLIMIT_AS] = number
            elif name == "--cpu":
                self.limits[resource.RLIMIT_CPU] = number
            elif name == "--file-size":
                self.limits[resource.RLIMIT_FSIZE] = number
            elif name == "--processes":
                self.processes = number
            else:
                raise SystemExit(f"_contain: unknown option {name}")


def _user_tasks(uid: int) -> int:
    """Processes and threads of ``uid`` in this pid namespace: what RLIMIT_NPROC counts."""
    tasks = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    tasks += max(os.stat(f"/proc/{entry}/task").st_nlink - 2, 1)
            except OSError:
                pass
    return tasks


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (read from /proc: a kernel without
    CONFIG_PROC_CHILDREN has no ``/proc/PID/task/TID/children``)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    fields = stat.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != b"Z":
                found.append(int(entry))
    return found


def _close_all_but(keep: set[int]) -> None:
    low = 0
    for fd in sorted(keep):
        if low < fd:  # never an empty range: os.closerange(0, 0) closes every fd (its end - 1 read unsigned)
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _vm_peak(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmPeak:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class JobReady(BaseException):  # noqa: N818 - not an error: the way out of the keeper's code
    """Raised in a warm job's process once it is set up: its caller runs the job's code.

    A ``BaseException``, so no ``except Exception`` between the keeper and the
    fork server's top level can stop it."""


class Keeper:
    """Starts the engine (``launch``: exec) and keeps it. ``parent_fd``: a pidfd
    of the process the job belongs to, when that process is not the keeper's
    parent (a keeper forked by a warm fork server)."""

    def __init__(self, options: Options, keep_fds: tuple[int, ...] = (), parent_fd: int | None = None) -> None:
        self.options = options
        self.keep_fds = keep_fds
        self.parent_fd = parent_fd
        self.pid = os.getpid()
        self.engine = 0
        self.status: int | None = None
        self.vm_peak = 0
        self.leftovers = 0
        self.swept = False

    def report(self, line: str) -> None:
        try:
            os.write(self.options.status_fd, (line + "\n").encode())
        except OSError:
            pass  # the runner is gone: the job is killed anyway

    # -- start -------------------------------------------------------------

    def start(self) -> bool:
        if prctl(PR_SET_CHILD_SUBREAPER, 1) != 0:
            self.report("failed errno=0")
            return False
        if self.options.processes is not None:
            uid = os.getuid()
            # The kernel counts every process and thread of the user: allow the job
            # this many beyond what the user runs now. Root is exempt from the limit.
            if uid != 0:
                total = _user_tasks(uid) + self.options.processes
                self.options.limits[resource.RLIMIT_NPROC] = total
        env = self.environment()
        ready_r, ready_w = os.pipe()  # close-on-exec: EOF means the exec happened
        engine = os.fork()
        if engine == 0:
            os.close(ready_r)
            self._exec(env, ready_w)  # returns only by JobReady, in a warm job's process
            os._exit(127)
        os.close(ready_w)
        self.engine = engine
        # The engine has its inherited fds (the telemetry pipe); the keeper keeps
        # none of them, so a pipe's end is where its data ends once the job is reaped.
        _close_all_but({0, 1, 2, ready_r, self.options.status_fd, *self.keep_fds, *self.kept_fds()})
        failure = os.read(ready_r, 16)
        os.close(ready_r)
        if failure:
            os.waitpid(engine, 0)
            self.report(f"failed errno={int(failure)}")
            return False
        self.report(f"started pid={engine}")
        return True

    def environment(self) -> dict[bytes, bytes]:
        """The engine's environment: the keeper's own, as the runner gave it."""
        with open("/proc/self/environ", "rb") as handle:
            environ = handle.read().split(b"\0")
        return dict(item.split(b"=", 1) for item in environ if b"=" in item)

    def kept_fds(self) -> tuple[int, ...]:
        """Fds the keeper keeps open once the engine runs, beyond its own."""
        return (self.parent_fd,) if self.parent_fd is not None else ()

    def launch(self, env: dict[bytes, bytes], ready_w: int) -> None:
        """In the engine's process, set up: become the engine (exec; ``ready_w``
        is close-on-exec, so its end tells the keeper the exec happened)."""
        os.execve(self.options.argv[0], self.options.argv, env)

    def _exec(self, env: dict[bytes, bytes], ready_w: int) -> None:
        """In the forked child: its own group, death with the keeper, limits, exec."""
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(signum, signal.SIG_DFL)  # Python ignores SIGPIPE and SIGXFSZ; an engine must not
            os.setpgid(0, 0)
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != self.pid:  # the keeper died before prctl took effect
                os._exit(137)
            for which, value in self.options.limits.items():
                # RLIMIT_CPU: the soft limit sends SIGXCPU, the hard one a second later SIGKILL.
                hard = value + 1 if which == resource.RLIMIT_CPU else value
                resource.setrlimit(which, (value, hard))
            self.launch(env, ready_w)
        except JobReady:
            raise
        except OSError as exc:
            os.write(ready_w, str(exc.errno or 0).encode())
        except BaseException:
            os.write(ready_w, b"0")
        os._exit(127)

    # -- supervise -----------------------------------------------------------

    def supervise(self, wakeup: int) -> None:
        """Until the engine exits, its keeper's parent dies or the runner says kill."""
        engine_fd = os.pidfd_open(self.engine)
        poller = select.poll()
        poller.register(wakeup, select.POLLIN)
        poller.register(engine_fd, select.POLLIN)
        if self.parent_fd is not None:
            parent_fd, parent_ok = self.parent_fd, True
        else:
            try:
                parent_fd = os.pidfd_open(self.options.parent)
            except OSError:
                parent_fd = -1
            parent_ok = parent_fd >= 0 and os.getppid() == self.options.parent
        if not parent_ok:
            self.kill_all()  # the runner died before the keeper could watch it
            return
        poller.register(parent_fd, select.POLLIN)
        limit = self.options.memory
        while self.status is None:
            interval = SAMPLE_S if limit is None or self.vm_peak < NEAR_LIMIT * limit else SAMPLE_NEAR_LIMIT_S
            events = poller.poll(interval * 1000)
            self.vm_peak = max(self.vm_peak, _vm_peak(self.engine))
            for fd, _mask in events:
                if fd == wakeup:
                    for signum in os.read(wakeup, 64):
                        if signum == signal.SIGTERM:
                            self._signal_engine_group(signal.SIGTERM)
                        elif signum == signal.SIGUSR1:
                            self.kill_all()
                            return
                    self.reap()
                elif fd == parent_fd:
                    self.kill_all()
                    return
                elif fd == engine_fd:
                    self.reap()

    def _signal_engine_group(self, signum: int) -> None:
        try:
            os.killpg(self.engine, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def reap(self) -> None:
        """Reap whatever has exited: the engine (its status), or orphans it left."""
        while True:
            try:
                pid, status, _rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.engine:
                self.status = status

    def kill_all(self) -> None:
        self._signal_engine_group(signal.SIGKILL)
        if self.status is None:
            _pid, self.status, _rusage = os.wait4(self.engine, 0)

    def sweep(self) -> None:
        """Kill and reap every process left in the subtree, level by level: killing a
        process hands its children to the keeper, the next round finds them."""
        self._signal_engine_group(signal.SIGKILL)
        signalled: set[int] = set()
        deadline = time.monotonic() + SWEEP_S
        while True:
            try:
                pid, _status, _rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                self.swept = True
                break
            if pid:
                continue
            if time.monotonic() > deadline:
                break
            for child in _children(self.pid):
                if child not in signalled:
                    signalled.add(child)
                    try:
                        os.kill(child, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.001)
        self.leftovers = len(signalled)

    def end(self) -> None:
        assert self.status is not None
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.report(
            f"ended status={self.status} maxrss={children.ru_maxrss} "
            f"cpu={children.ru_utime + children.ru_stime:.6f} vmpeak={self.vm_peak} "
            f"leftovers={self.leftovers} swept={int(self.swept)}"
        )
        os.close(self.options.status_fd)
        if os.WIFSIGNALED(self.status):
            # Die of the engine's signal, so the runner's wait status is the engine's.
            signum = os.WTERMSIG(self.status)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            signal.set_wakeup_fd(-1)
            if signum not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
            os.kill(self.pid, signum)
            os._exit(128 + signum)
        os._exit(os.waitstatus_to_exitcode(self.status))


def main(argv: list[str]) -> None:
    options = Options(argv)
    os.set_inheritable(options.status_fd, False)
    keep(lambda keep_fds: Keeper(options, keep_fds=keep_fds))


def keep(make: Callable[[tuple[int, ...]], Keeper]) -> None:
    """Start a keeper (``make(its own fds)``), keep its job to the end, exit as the engine did.

    Never returns in the keeper; in a warm job's process, raises ``JobReady``."""
    wakeup_r, wakeup_w = os.pipe()
    os.set_blocking(wakeup_w, False)
    signal.set_wakeup_fd(wakeup_w)
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGCHLD):
        signal.signal(signum, lambda *_: None)  # the wakeup fd carries them to the loop
    keeper = make((wakeup_r, wakeup_w))
    if not keeper.start():
        os._exit(127)
    try:
        keeper.supervise(wakeup_r)
    finally:
        if keeper.status is None:
            keeper.kill_all()
        keeper.sweep()
    keeper.end()


if __name__ == "__main__":
    main(sys.argv[1:])
