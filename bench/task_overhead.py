"""Task overhead: a no-op Celery task over Redis, prefork worker, three stacks.

bare (plain Celery) vs. upstream (opentelemetry-instrumentation-celery + SDK
batch processor + OTLP gRPC + a prometheus_client counter and histogram) vs.
cadscope (its worker app as deployed). See bench/_noop_app.py.

Each round pre-fills a queue with N messages while no worker runs, starts a
prefork worker, and times from its ``worker_ready`` to the queue drained and
every message acknowledged (late ack). Worker-side CPU (main process and pool
children, user + system) over the same interval, divided by N, is the
microseconds per task. An OTLP gRPC endpoint in this process takes the spans
and only counts them (``_common.NullCollector``): export costs the worker what
it costs, while a collector's own work, which runs elsewhere in a fleet, is not
charged to the 2 cores under test. Modes are interleaved, rounds repeated.
A VM's speed drifts from minute to minute (seen here: bare Celery at 336 and
then 485 tasks/s in one run), so the ratio to bare is the median of the
rounds' own ratios, each stack against bare Celery run beside it, with its
95 % bootstrap interval and the range of those ratios. A target is met when
the interval's lower end clears it; an interval that straddles it says the
rounds were too few, or too noisy, to tell.

The pool processes' CPU is the instrumentation's own. The main process's CPU
per task rises with any slowdown of the pool, instrumented or not: its event
loop wakes more often per task while it waits (upstream's stack, which does
nothing in the main process, shows the same rise).
bench/task_cpu.py isolates the pool process's share with less noise.

For a no-op task the main process is the busiest: it reads Redis, hands each
message to a pool process over a pipe and acks it, about 600 of the 710 µs a
task that bare Celery spends here. The 2 cores are not saturated, and each
task's run in the pool lies on the path from one message to the next
(prefetch 1, late ack). So what the instrumentation adds in the pool before
the task returns (span start and end, metrics) can lower throughput; the
export thread's work, off that path, should matter less. By how much is
another matter.

Read one run's median with care. On 2-core VMs, medians of 8-15 rounds
moved by up to 0.09 between runs of the same code (cadscope 0.888 and then
0.984 on one VM, 2026-11-23). That is more than the 0.05 the target is
about. Control tasks that only burn CPU in the pool showed the same scatter:
100 and 150 µs gave 1.02 and 0.99 of bare in one run, and 150 µs gave 0.93
in the next. The pool's added CPU per task is the steadier figure. A
variant that kept one worker per stack and stopped it (``SIGSTOP``) between
short turns fit 25 rounds in 4 minutes. Its intervals were no narrower, and
one of its runs hung, so it was not kept.

    python bench/task_overhead.py [--tasks 2000] [--rounds 3] [--write bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import redis
from _common import NullCollector, bootstrap, publish

HERE = Path(__file__).resolve().parent

MODES = ("bare", "upstream", "cadscope")
# Every message carries a W3C trace context, as the fleet's do (the API's
# publisher span injects it): the consumer span continues that trace.
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _cpu(proc: psutil.Process) -> tuple[float, float]:
    """CPU seconds of (the worker's main process, its pool processes)."""
    main = pool = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        used = t.user + t.system + t.children_user + t.children_system
        if p.pid == proc.pid:
            main += used
        else:
            pool += used
    return main, pool


def run_round(mode: str, tasks: int, broker: str, endpoint: str, concurrency: int) -> tuple[float, float, float]:
    client = redis.Redis.from_url(broker)
    client.flushdb()
    queue = f"bench-{mode}-{os.getpid()}"
    env = {**os.environ, "BENCH_MODE": mode, "BENCH_BROKER": broker, "PYTHONPATH": str(HERE)}
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(HERE))
        os.environ["BENCH_MODE"], os.environ["BENCH_BROKER"] = "bare", broker
        import _noop_app  # the bare app is enough to publish

        for _ in range(tasks):
            _noop_app.noop.apply_async(queue=queue, headers={"traceparent": TRACEPARENT})
        assert client.llen(queue) == tasks
        env.update(
            PROMETHEUS_MULTIPROC_DIR=str(Path(tmp) / "metrics"),
            CADSCOPE_DATA_DIR=tmp,
            CADSCOPE_METRICS_PORT="0",
            OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
            OTEL_EXPORTER_OTLP_INSECURE="true",
        )
        Path(env["PROMETHEUS_MULTIPROC_DIR"]).mkdir()
        command = [sys.executable, "-m", "celery", "-A", "_noop_app", "worker", "--pool", "prefork",
                   "--concurrency", str(concurrency), "-Q", queue, "--loglevel", "WARNING",
                   "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip
        worker = subprocess.Popen(command, env=env, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        proc = psutil.Process(worker.pid)
        try:
            # The clock starts when the first message leaves the queue, the same way for every mode.
            deadline = time.monotonic() + 60
            while client.llen(queue) == tasks:
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise RuntimeError(f"{mode}: worker did not start: {worker.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
                time.sleep(0.001)
            started, cpu0 = time.perf_counter(), _cpu(proc)
            left_at_start = client.llen(queue) + client.hlen("unacked")
            deadline = time.monotonic() + 300
            while client.llen(queue) or client.hlen("unacked"):
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise RuntimeError(f"{mode}: queue not drained ({client.llen(queue)} queued, "
                                       f"{client.hlen('unacked')} unacknowledged)")  # fmt: skip
                time.sleep(0.002)
            elapsed, cpu1 = time.perf_counter() - started, _cpu(proc)
        finally:
            worker.terminate()
            worker.wait(60)
    done = left_at_start
    main, pool = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    return done / elapsed, (main + pool) / done * 1e6, pool / done * 1e6


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--write")
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in MODES}
    with NullCollector() as receiver:
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else reversed(MODES):
                results[mode].append(run_round(mode, args.tasks, args.broker, receiver.endpoint, args.concurrency))
                rate, us, pool = results[mode][-1]
                print(f"round {r + 1} {mode:9s} {rate:8.0f} tasks/s {us:8.0f} µs CPU/task ({pool:.0f} in the pool)",
                      flush=True)  # fmt: skip
    bare_us = statistics.median(u for _, u, _ in results["bare"])
    bare_pool = statistics.median(p for _, _, p in results["bare"])
    lines = [
        f"\n### Task overhead: no-op task, prefork -c {args.concurrency}, Redis, {args.tasks} tasks x "
        f"{args.rounds} rounds ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()})\n",
        "| stack | throughput (median) | range | ratio to bare (median of rounds) [95 %] | rounds' ratios "
        "| worker CPU per task | extra vs bare | of which in the pool processes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in MODES:
        rates = [r for r, _, _ in results[mode]]
        us = statistics.median(u for _, u, _ in results[mode])
        pool = statistics.median(p for _, _, p in results[mode])
        rate = statistics.median(rates)
        ratios = [r / b for (r, _, _), (b, _, _) in zip(results[mode], results["bare"], strict=True)]
        ratio, low, high = bootstrap(ratios)
        lines.append(
            f"| {mode} | {rate:.0f} tasks/s | {min(rates):.0f}–{max(rates):.0f} "
            f"| **{ratio:.3f}** [{low:.3f}–{high:.3f}] | {min(ratios):.3f}–{max(ratios):.3f} "
            f"| {us:.0f} µs | {us - bare_us:+.0f} µs | {pool - bare_pool:+.0f} µs |"
        )
    publish("\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
