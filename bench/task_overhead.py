"""Task overhead: a no-op Celery task over Redis, prefork worker, three stacks, interleaved.

bare (plain Celery) vs. upstream (opentelemetry-instrumentation-celery, the
SDK's batch processor with the OTLP gRPC exporter, a prometheus_client counter
and histogram in multiprocess mode) vs. cadscope (its worker app as deployed:
the same upstream Celery instrumentation, cadscope's processors and journal,
the catalogue's task metrics, compaction, the journal reaper). See
bench/_noop_app.py. Target: cadscope's throughput at least upstream's.

Each round pre-fills a queue with N messages while no worker runs, starts a
prefork worker, and times from its ``worker_ready`` to the queue drained and
every message acknowledged (late ack). Worker-side CPU (main process and pool
processes, user + system) over the same interval, divided by N, is the
microseconds per task. An OTLP gRPC endpoint in this process takes the spans
and only counts them (``_common.NullCollector``). Stacks are interleaved and
rounds repeated; a VM's speed drifts from minute to minute, so each stack's
ratio to bare is the median of the rounds' own ratios, each against bare
Celery run beside it, with its 95 % bootstrap interval and their range.

    python bench/task_overhead.py [--tasks 2000] [--rounds 3] [--write FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import psutil
import redis
from _common import NullCollector, bootstrap, publish

HERE = Path(__file__).resolve().parent

MODES = ("bare", "upstream", "cadscope")
# Every message carries a W3C trace context, as the fleet's do (the API's
# publisher span injects it): the consumer span continues that trace.
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class _Cpu(NamedTuple):
    """CPU seconds, cumulative: the worker's main process, its pool processes'
    task threads (the thread that runs each task), their other threads (span
    export, gRPC), and the broker's server when it runs on this machine."""

    main: float
    pool_task: float
    pool_other: float
    broker: float


def _cpu(proc: psutil.Process, broker: psutil.Process | None) -> _Cpu:
    main = task = other = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            threads = p.threads() if p.pid != proc.pid else []
        except psutil.NoSuchProcess:
            continue
        used = t.user + t.system + t.children_user + t.children_system
        if p.pid == proc.pid:
            main += used
            continue
        # A pool process's task runs on its main thread, whose id is the process id. The process's
        # total less that thread is every other thread's, including threads that have already exited.
        own = sum(th.user_time + th.system_time for th in threads if th.id == p.pid)
        task += own
        other += used - own
    used_by_broker = 0.0
    if broker is not None:
        with contextlib.suppress(psutil.Error):
            b = broker.cpu_times()
            used_by_broker = b.user + b.system
    return _Cpu(main, task, other, used_by_broker)


def _local_broker(client: redis.Redis) -> psutil.Process | None:
    """The redis-server process behind ``client`` if it runs here (its CPU is read, nothing else)."""
    try:
        pid = int(client.info("server")["process_id"])
        server = psutil.Process(pid)
        return server if "redis" in server.name() else None
    except (redis.RedisError, KeyError, ValueError, psutil.Error):
        return None


class Round(NamedTuple):
    rate: float  # tasks a second
    worker_us: float  # worker CPU a task, main process and pool
    pool_us: float  # of which the pool processes
    pool_task_us: float  # of which the pool processes' task threads
    broker_us: float | None  # the broker's CPU a task, when it runs on this machine


def start_worker(mode: str, queue: str, broker: str, endpoint: str, concurrency: int, tmp: str,
                 app: str = "_noop_app", extra_env: dict[str, str] | None = None,
                 ) -> subprocess.Popen[bytes]:  # fmt: skip
    """A prefork worker of ``app`` (a module in bench/, ``$BENCH_MODE=mode``) consuming ``queue``;
    its metrics and data go under ``tmp``, its spans to the OTLP ``endpoint``."""
    env = {**os.environ, "BENCH_MODE": mode, "BENCH_BROKER": broker, "PYTHONPATH": str(HERE), **(extra_env or {})}
    env.update(
        PROMETHEUS_MULTIPROC_DIR=str(Path(tmp) / "metrics"),
        CADSCOPE_DATA_DIR=tmp,
        CADSCOPE_METRICS_PORT="0",
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_EXPORTER_OTLP_INSECURE="true",
    )
    Path(env["PROMETHEUS_MULTIPROC_DIR"]).mkdir(exist_ok=True)
    command = [sys.executable, "-m", "celery", "-A", app, "worker", "--pool", "prefork",
               "--concurrency", str(concurrency), "-Q", queue, "--loglevel", "WARNING",
               "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip
    return subprocess.Popen(command, env=env, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def fill_queue(broker: str, queue: str, tasks: int, sampled: float = 1.0) -> None:
    """Publish ``tasks`` no-op messages to ``queue``, each with a W3C trace context. A ``sampled`` fraction
    of them, evenly spread, carry the sampled flag, as after head sampling at the API; the rest do not."""
    from celery import Celery

    producer = Celery("bench-fill", broker=broker)
    producer.conf.update(task_serializer="json")
    unsampled = TRACEPARENT[:-2] + "00"
    for i in range(tasks):
        traceparent = TRACEPARENT if int((i + 1) * sampled) > int(i * sampled) else unsampled
        producer.send_task("bench.noop", queue=queue, headers={"traceparent": traceparent})
    producer.close()
    if redis.Redis.from_url(broker).llen(queue) < tasks:
        raise RuntimeError(f"{queue}: fewer than {tasks} messages queued")


def run_round(mode: str, tasks: int, broker: str, endpoint: str, concurrency: int, app: str = "_noop_app",
              extra_env: dict[str, str] | None = None) -> Round:  # fmt: skip
    """One round: fill a queue, run a worker of ``app`` (a module in bench/) until it is drained."""
    client = redis.Redis.from_url(broker)
    server = _local_broker(client)
    client.flushdb()
    queue = f"bench-{mode}-{os.getpid()}"
    with tempfile.TemporaryDirectory() as tmp:
        fill_queue(broker, queue, tasks)
        assert client.llen(queue) == tasks
        worker = start_worker(mode, queue, broker, endpoint, concurrency, tmp, app, extra_env)
        proc = psutil.Process(worker.pid)
        try:
            # The clock starts when the first message leaves the queue, the same way for every mode.
            deadline = time.monotonic() + 60
            while client.llen(queue) == tasks:
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise RuntimeError(f"{mode}: worker did not start: {worker.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
                time.sleep(0.001)
            started, cpu0 = time.perf_counter(), _cpu(proc, server)
            left_at_start = client.llen(queue) + client.hlen("unacked")
            deadline = time.monotonic() + 300
            while client.llen(queue) or client.hlen("unacked"):
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise RuntimeError(f"{mode}: queue not drained ({client.llen(queue)} queued, "
                                       f"{client.hlen('unacked')} unacknowledged)")  # fmt: skip
                time.sleep(0.002)
            elapsed, cpu1 = time.perf_counter() - started, _cpu(proc, server)
        finally:
            worker.terminate()
            worker.wait(60)
    done = left_at_start
    if done < tasks // 2:
        raise RuntimeError(f"{mode}: {tasks - done} of {tasks} tasks ran before the clock started; "
                           "this machine is too busy for the round to be timed (raise --tasks)")  # fmt: skip
    used = _Cpu(*(b - a for a, b in zip(cpu0, cpu1, strict=True)))
    pool = used.pool_task + used.pool_other
    return Round(
        rate=done / elapsed,
        worker_us=(used.main + pool) / done * 1e6,
        pool_us=pool / done * 1e6,
        pool_task_us=used.pool_task / done * 1e6,
        broker_us=used.broker / done * 1e6 if server is not None else None,
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--write")
    args = parser.parse_args()
    results: dict[str, list[Round]] = {m: [] for m in MODES}
    with NullCollector() as receiver:
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else reversed(MODES):
                results[mode].append(run_round(mode, args.tasks, args.broker, receiver.endpoint, args.concurrency))
                got = results[mode][-1]
                print(f"round {r + 1} {mode:9s} {got.rate:8.0f} tasks/s {got.worker_us:8.0f} µs CPU/task "
                      f"({got.pool_us:.0f} in the pool)", flush=True)  # fmt: skip

    def median(mode: str, field: str) -> float:
        return statistics.median(getattr(got, field) for got in results[mode])

    bare = results["bare"]
    lines = [
        f"\n### Task overhead: no-op task, prefork -c {args.concurrency}, Redis, {args.tasks} tasks x "
        f"{args.rounds} rounds ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()})\n",
        "| stack | throughput (median) | range | ratio to bare (median of rounds) [95 %] | rounds' ratios "
        "| worker CPU per task | extra vs bare | of which in the pool processes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in MODES:
        rates = [got.rate for got in results[mode]]
        ratios = [got.rate / b.rate for got, b in zip(results[mode], bare, strict=True)]
        ratio, low, high = bootstrap(ratios)
        lines.append(
            f"| {mode} | {statistics.median(rates):.0f} tasks/s | {min(rates):.0f}–{max(rates):.0f} "
            f"| **{ratio:.3f}** [{low:.3f}–{high:.3f}] | {min(ratios):.3f}–{max(ratios):.3f} "
            f"| {median(mode, 'worker_us'):.0f} µs | {median(mode, 'worker_us') - median('bare', 'worker_us'):+.0f} µs "
            f"| {median(mode, 'pool_us') - median('bare', 'pool_us'):+.0f} µs |"
        )
    # The same rounds read as CPU: which threads and processes run each stack's added microseconds.
    lines += [
        "",
        "| stack | pool task threads, extra | pool other threads, extra | worker main process, extra "
        "| broker CPU per task |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mode in MODES:
        task_thread = median(mode, "pool_task_us") - median("bare", "pool_task_us")
        other = median(mode, "pool_us") - median(mode, "pool_task_us")
        other -= median("bare", "pool_us") - median("bare", "pool_task_us")
        main_process = median(mode, "worker_us") - median(mode, "pool_us")
        main_process -= median("bare", "worker_us") - median("bare", "pool_us")
        brokers = [got.broker_us for got in results[mode] if got.broker_us is not None]
        broker_cpu = f"{statistics.median(brokers):.0f} µs" if brokers else "n/a (not on this machine)"
        lines.append(f"| {mode} | {task_thread:+.0f} µs | {other:+.0f} µs | {main_process:+.0f} µs | {broker_cpu} |")
    publish("\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
