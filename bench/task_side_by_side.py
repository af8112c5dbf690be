"""Task overhead on a busy host: every stack at once, so that all of them see the same VM in the same seconds.

bench/task_overhead.py runs one stack at a time on an otherwise idle host. On
this project's 2-core VMs its rounds' ratios scatter by ±0.15, and its
medians moved by up to 0.09 between runs of the same code, because the VM's
speed drifts from one second to the next (bare Celery's CPU per task moved
1.7x within one run). That is more than the 0.05 that issue 7's target is
about, so no change smaller than that can be seen there.

Here the stacks run side by side. Each has a redis-server of its own (so
the broker's CPU per task is its own too) and a prefork worker draining a
queue whose messages arrive, all stacks at once, when every worker waits on
its broker. Together they keep the cores busy. Every ``--window`` seconds
the script reads, for every stack within a few milliseconds of the others,
the tasks acknowledged and the CPU used by each thread of its worker (main
process and pool processes) and of its redis-server, in nanoseconds
(``schedstat``). For each window and stack, against bare Celery in the same
window:

- the **CPU cost ratio**: bare's host CPU per task (worker and broker)
  divided by the stack's. Where CPU is what limits a host (a fleet run
  hot), this is the throughput the stack keeps;
- the stack's **added CPU per task**, split into the pool's task threads,
  the pool's other threads (span export, gRPC), the worker's main process
  and the broker;
- the **share**: the stack's tasks acknowledged divided by bare's. This is
  reported, but it is not a cost. Linux shares the CPU between runnable
  threads, so a dearer stack, runnable more often, takes more than an equal
  part of the host, and its share overstates what it keeps.

A control stack, ``burn``, is bare Celery whose task burns a known amount of
its thread's CPU (``--burn-us``). Each run thus shows how closely the method
recovers a known cost.

What it gave on the first VM it ran on (bench/RESULTS.md): intervals about
half as wide as task_overhead.py's (±0.045 against ±0.08), not the
tenfold hoped for. The windows still differ, mostly in the worker's main
process, whose CPU per task moves with how often its event loop wakes. And
a busy host is not an idle one: every stack's CPU per task roughly doubles
(bare Celery 2,600-3,000 µs against ~1,300), the instrumentation's with it.

What this does not measure: an idle host's throughput. There the path from
one message to the next sets a no-op task's rate, and CPU spent off that
path (the export thread) costs nothing. That is task_overhead.py's figure.

    python bench/task_side_by_side.py [--rounds 3] [--windows 10] [--window 2] [--tasks 8000] [--write bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import psutil
import redis
from _common import NullCollector, bootstrap, publish
from task_overhead import _Cpu, fill_queue, start_worker

STACKS = ("bare", "upstream", "cadscope", "burn")
PARTS = ("main", "pool_task", "pool_other", "broker")  # _Cpu's fields


@dataclass
class _Stack:
    mode: str
    server: subprocess.Popen[bytes]
    url: str
    queue: str
    tasks: int = 0
    worker: subprocess.Popen[bytes] | None = None

    @property
    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


class _Sample(NamedTuple):
    done: int  # tasks acknowledged since the queue was filled
    threads: dict[tuple[str, int], int]  # (part, thread id) -> ns on a CPU so far
    queued: int  # messages still waiting in the queue


def _threads_ns(pid: int) -> dict[int, int]:
    """Each live thread's time on a CPU, ns (``/proc/<pid>/task/<tid>/schedstat``). ``/proc/<pid>/stat``'s
    CPU times, which psutil reads, count in ticks of 10 ms: ±4 % of a 2-second window's CPU per stack."""
    threads = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
                    threads[int(tid)] = int(stat.read().split()[0])
    return threads


def _cpu_ns(worker: psutil.Process, broker: psutil.Process) -> dict[tuple[str, int], int]:
    """Every thread of the worker's main process, its pool processes and the broker, by the part it belongs to:
    a pool process's task runs on its main thread, whose id is the process id."""
    parts = {("main", tid): ns for tid, ns in _threads_ns(worker.pid).items()}
    with contextlib.suppress(psutil.Error):
        for child in worker.children(recursive=True):
            for tid, ns in _threads_ns(child.pid).items():
                parts["pool_task" if tid == child.pid else "pool_other", tid] = ns
    parts.update({("broker", tid): ns for tid, ns in _threads_ns(broker.pid).items()})
    return parts


def _used(before: dict[tuple[str, int], int], after: dict[tuple[str, int], int]) -> _Cpu:
    """CPU seconds per part between two readings. A thread that started in between counts from zero; one
    that ended in between loses its last moments (the pool's threads live as long as their process)."""
    seconds = dict.fromkeys(PARTS, 0.0)
    for (part, tid), ns in after.items():
        seconds[part] += (ns - before.get((part, tid), 0)) / 1e9
    return _Cpu(**seconds)


class Window(NamedTuple):
    done: int
    cpu: _Cpu  # seconds used over the window

    @property
    def host_us(self) -> float:
        """Host CPU per task: worker (main process and pool) and broker, µs."""
        return sum(self.cpu) / self.done * 1e6

    def part_us(self, part: str) -> float:
        return getattr(self.cpu, part) / self.done * 1e6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _redis_server(directory: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A redis-server of this run's own (never the shared one), stopped by its pid on the way out."""
    port = _free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", directory],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis.from_url(url, socket_connect_timeout=0.5).ping():
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {port} did not start")
            time.sleep(0.05)
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(10)


def _sample(stack: _Stack, proc: psutil.Process, server: psutil.Process) -> _Sample:
    client = stack.client
    queued = client.llen(stack.queue)
    pending = queued + client.hlen("unacked")
    return _Sample(stack.tasks - pending, _cpu_ns(proc, server), queued)


def _consuming(client: redis.Redis) -> bool:
    """Whether a worker is waiting on this broker for a message (a client blocked in ``BRPOP``)."""
    return any(c.get("cmd") == "brpop" for c in client.client_list())


def run_round(stacks: list[_Stack], tasks: int, windows: int, window_s: float, warm_up_s: float, endpoint: str,
              concurrency: int, burn_us: float) -> dict[str, list[Window]]:  # fmt: skip
    """Fill every queue, start every worker, read ``windows`` windows with all of them busy.

    Workers take seconds to start, some more than others (cadscope's app imports more). So the messages
    wait under another name until every worker is waiting on its broker, then move into the queues
    (``RENAME``, one atomic step per stack) and all stacks start within milliseconds of each other."""
    for stack in stacks:
        stack.client.flushdb()
        fill_queue(stack.url, f"{stack.queue}-staged", tasks)
        stack.tasks = tasks
    got: dict[str, list[Window]] = {stack.mode: [] for stack in stacks}
    with tempfile.TemporaryDirectory() as tmp:
        procs: dict[str, psutil.Process] = {}
        try:
            for stack in stacks:
                home = Path(tmp) / stack.mode
                home.mkdir()
                stack.worker = start_worker(stack.mode, stack.queue, stack.url, endpoint, concurrency, str(home),
                                            extra_env={"BENCH_BURN_US": str(burn_us)})  # fmt: skip
                procs[stack.mode] = psutil.Process(stack.worker.pid)
            servers = {stack.mode: psutil.Process(stack.server.pid) for stack in stacks}
            deadline = time.monotonic() + 60
            for stack in stacks:
                while not _consuming(stack.client):
                    if time.monotonic() > deadline or stack.worker.poll() is not None:  # type: ignore[union-attr]
                        err = stack.worker.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
                        raise RuntimeError(f"{stack.mode}: worker did not start: {err}")
                    time.sleep(0.05)
            for stack in stacks:
                stack.client.rename(f"{stack.queue}-staged", stack.queue)
            time.sleep(warm_up_s)
            order = list(stacks)
            before = {s.mode: _sample(s, procs[s.mode], servers[s.mode]) for s in order}
            for w in range(windows):
                time.sleep(window_s)
                order.reverse()  # who is read first alternates, so the few ms between reads even out
                after = {s.mode: _sample(s, procs[s.mode], servers[s.mode]) for s in order}
                for stack in stacks:
                    b, a = before[stack.mode], after[stack.mode]
                    if a.queued == 0 or stack.worker.poll() is not None:  # type: ignore[union-attr]
                        raise RuntimeError(f"{stack.mode}: its queue ran dry or its worker stopped in window "
                                           f"{w + 1}; raise --tasks")  # fmt: skip
                    if a.done <= b.done:
                        raise RuntimeError(f"{stack.mode}: no task acknowledged in window {w + 1}")
                    got[stack.mode].append(Window(a.done - b.done, _used(b.threads, a.threads)))
                before = after
        finally:
            for stack in stacks:
                if stack.worker is not None:
                    stack.worker.terminate()
            for stack in stacks:
                if stack.worker is not None:
                    try:
                        stack.worker.wait(60)
                    except subprocess.TimeoutExpired:
                        stack.worker.kill()
                        stack.worker.wait(10)
                    stack.worker = None
    return got


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--window", type=float, default=2.0, help="seconds")
    parser.add_argument("--warm-up", type=float, default=2.0, help="seconds between every worker busy and window 1")
    parser.add_argument("--tasks", type=int, default=8000, help="messages per stack and round")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--burn-us", type=float, default=100.0, help="the control task's CPU, µs")
    parser.add_argument("--write")
    args = parser.parse_args()

    windows: dict[str, list[Window]] = {mode: [] for mode in STACKS}
    round_ratios: dict[str, list[float]] = {mode: [] for mode in STACKS}
    with tempfile.TemporaryDirectory() as data, NullCollector() as receiver, contextlib.ExitStack() as servers:
        stacks = []
        for mode in STACKS:
            proc, url = servers.enter_context(_redis_server(tempfile.mkdtemp(dir=data)))
            stacks.append(_Stack(mode, proc, url, f"bench-{mode}-{os.getpid()}"))
        for r in range(args.rounds):
            # Workers start in a rotated order each round: none is always the first to warm up.
            turn = r % len(stacks)
            rotated = stacks[turn:] + stacks[:turn]
            got = run_round(rotated, args.tasks, args.windows, args.window, args.warm_up, receiver.endpoint,
                            args.concurrency, args.burn_us)  # fmt: skip
            for mode in STACKS:
                ratios = [b.host_us / w.host_us for w, b in zip(got[mode], got["bare"], strict=True)]
                round_ratios[mode].append(statistics.median(ratios))
                windows[mode] += got[mode]
                host_us = statistics.median(w.host_us for w in got[mode])
                rate = sum(w.done for w in got[mode]) / (args.windows * args.window)
                print(f"round {r + 1} {mode:9s} {host_us:7.0f} µs host CPU/task, cost ratio "
                      f"{round_ratios[mode][-1]:.3f}, {rate:5.0f} tasks/s", flush=True)  # fmt: skip
        spans = receiver.spans
    if spans == 0:
        raise RuntimeError("no span reached the collector: the instrumented stacks did not export")

    bare = windows["bare"]
    lines = [
        f"\n### Task overhead on a busy host: {len(STACKS)} stacks side by side, no-op task, prefork -c "
        f"{args.concurrency}, a redis-server each, {args.rounds} rounds x {args.windows} windows of {args.window:g} s "
        f"({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; `python bench/task_side_by_side.py`)\n",
        f"Control: `burn` is bare Celery whose task burns {args.burn_us:g} µs of thread CPU. Per window and stack, "
        "against bare Celery in the same window; medians over all windows [95 % bootstrap], and the range of "
        "the rounds' medians.\n",
        "| stack | host CPU per task (worker + broker) | added vs bare [95 %] | **CPU cost ratio** (bare ÷ stack) "
        "[95 %] | rounds' medians | share (tasks ÷ bare's) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode in STACKS:
        mine = windows[mode]
        added = bootstrap([w.host_us - b.host_us for w, b in zip(mine, bare, strict=True)])
        ratio = bootstrap([b.host_us / w.host_us for w, b in zip(mine, bare, strict=True)])
        share = statistics.median(w.done / b.done for w, b in zip(mine, bare, strict=True))
        lines.append(
            f"| {mode} | {statistics.median(w.host_us for w in mine):.0f} µs "
            f"| {added[0]:+.0f} µs [{added[1]:+.0f}, {added[2]:+.0f}] "
            f"| **{ratio[0]:.3f}** [{ratio[1]:.3f}–{ratio[2]:.3f}] "
            f"| {min(round_ratios[mode]):.3f}–{max(round_ratios[mode]):.3f} | {share:.3f} |"
        )
    lines += [
        "",
        "| stack, added vs bare per task (median of windows) | pool task threads | pool other threads "
        "| worker main process | broker |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mode in STACKS[1:]:
        cells = [
            statistics.median(w.part_us(part) - b.part_us(part) for w, b in zip(windows[mode], bare, strict=True))
            for part in ("pool_task", "pool_other", "main", "broker")  # the header's order
        ]
        lines.append(f"| {mode} | " + " | ".join(f"{c:+.0f} µs" for c in cells) + " |")
    lines.append(f"\nSpans received by the null collector: {spans}.")
    publish("\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
