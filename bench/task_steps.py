"""Where the pool's added CPU per task goes: cadscope's steps timed inside a real worker, and in a loop.

bench/task_overhead.py finds cadscope's pool processes spending 130-200 µs
more CPU per no-op task than bare Celery's, almost all of it on the task
thread; bench/task_cpu.py, which drives Celery's task tracer in a loop,
finds a third to two thirds of that, by VM. This script measures the
steps themselves where they run. A prefork worker (bench/_steps_app.py: the
same apps as task_overhead, with timers) drains a pre-filled queue, and each
pool process adds up its task thread's CPU time for:

- the whole cycle, from one task's ``task_prerun`` to the next's: receiving
  the message from the main process, Celery's tracer, the signals, the
  task, sending the result back;
- cadscope's task hooks: ``before_start`` (the task span's start, context
  attach; the W3C extract is deferred) and ``after_return`` (span end, the
  processor's queue, context detach);
- the task's body (cadscope's: the catalogue's task outcome counter and
  runtime histogram, multiprocess mode; bare Celery's: nothing);
- the cyclic garbage collector's runs on the task thread, by generation,
  and their CPU time (they run inside the steps above, when an allocation
  tips generation 0 over its threshold), and how often it runs on other
  threads (cadscope's export thread).

Then the same three steps run in a tight loop in a fresh process set up as a
pool process is (its ``worker_process_init``), with the same timers. The
ratio of the two says how much dearer a step is when it runs once between
other processes' work on 2 shared cores than when it runs back to back.

Each step's figure includes about one read of the thread CPU clock (its cost
here is in the table); the cycle has its clock reads taken out. Rounds
alternate the two modes; figures are medians over rounds.

    python bench/task_steps.py [--tasks 3000] [--rounds 5] [--loop 20000] [--write bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import NullCollector, publish
from task_overhead import TRACEPARENT, run_round

MODES = ("bare", "cadscope")
STEPS = ("prerun", "postrun", "body")
GC = ("gc0", "gc1", "gc2", "gc_elsewhere")  # collections per 1,000 tasks; "gc" is µs per task
LOOP_WARM_UP = 1000


def loop(n: int) -> dict[str, float]:
    """Runs in a fresh process ($BENCH_MODE=cadscope): the three steps back to back, µs each."""
    import _steps_app
    from celery import signals

    signals.worker_process_init.send(sender=None)  # what a pool process runs after fork
    from cadscope.tracing import _celery, flush_tracing

    tracing = _celery._installed
    assert tracing is not None and tracing.hooks
    task = _steps_app.app.tasks["bench.noop"]
    delivery = {"exchange": "", "routing_key": "cadscope", "priority": 0, "redelivered": False}
    task.push_request(traceparent=TRACEPARENT, delivery_info=delivery, retries=0)

    def run(count: int, offset: int) -> None:
        for i in range(offset, offset + count):
            task_id = f"job-{i:08d}"
            task.before_start(task_id, (), {})
            task.run()
            task.after_return("SUCCESS", None, task_id, (), {}, None)

    run(LOOP_WARM_UP, 0)
    totals = _steps_app._totals
    totals.update(dict.fromkeys(_steps_app.COUNTED, 0))
    run(n, LOOP_WARM_UP)
    flush_tracing()
    return {**{step: totals[step] / n / 1000 for step in (*STEPS, "gc")}, **{g: totals[g] / n * 1000 for g in GC}}


def in_worker(mode: str, args: argparse.Namespace, endpoint: str) -> dict[str, float]:
    """One round: a worker drains a queue; µs per task for the cycle and each step, over its pool processes."""
    with tempfile.TemporaryDirectory() as steps_dir:
        run_round(mode, args.tasks, args.broker, endpoint, args.concurrency, app="_steps_app",
                  extra_env={"BENCH_STEPS_DIR": steps_dir, "BENCH_STEPS_WARM_UP": str(args.warm_up)})  # fmt: skip
        reports = [json.loads(p.read_text()) for p in Path(steps_dir).glob("*.json")]
    tasks = sum(r["tasks"] for r in reports)
    if not tasks:
        raise SystemExit(f"{mode}: no pool process reported its steps (too few tasks for the warm-up?)")
    clock_us = statistics.median(r["clock_read_ns"] for r in reports) / 1000
    timed_steps = 3 if mode == "cadscope" else 1  # bare Celery has no cadscope handlers to time
    reads = 1 + 2 * timed_steps
    got = {step: sum(r[step] for r in reports) / tasks / 1000 for step in (*STEPS, "gc")}
    got.update({g: sum(r[g] for r in reports) / tasks * 1000 for g in GC})
    got["cycle"] = sum(r["cycle"] for r in reports) / tasks / 1000 - reads * clock_us
    got["clock"] = clock_us
    return got


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loop", type=int, default=20_000)
    parser.add_argument("--warm-up", type=int, default=200, help="tasks each pool process runs before it counts")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--write")
    parser.add_argument("--child-loop", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_loop:
        print(json.dumps(loop(args.child_loop)))
        return 0
    worker: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    loops: list[dict[str, float]] = []
    with NullCollector() as receiver, tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else reversed(MODES):
                worker[mode].append(in_worker(mode, args, receiver.endpoint))
                print(f"round {r + 1} {mode:9s} " + " ".join(f"{k} {v:.1f}" for k, v in worker[mode][-1].items()),
                      flush=True)  # fmt: skip
            metrics_dir = Path(tmp) / f"loop-{r}"
            metrics_dir.mkdir()
            env = {**os.environ, "BENCH_MODE": "cadscope", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                   "CADSCOPE_DATA_DIR": tmp, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                   "OTEL_EXPORTER_OTLP_INSECURE": "true"}  # fmt: skip
            out = subprocess.run([sys.executable, __file__, "--child-loop", str(args.loop)], env=env,
                                 capture_output=True, text=True, timeout=600, check=True)  # fmt: skip
            loops.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} loop      " + " ".join(f"{k} {v:.1f}" for k, v in loops[-1].items()), flush=True)

    def median(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    bare, cad = worker["bare"], worker["cadscope"]
    rest = {m: statistics.median(row["cycle"] - sum(row[s] for s in STEPS) for row in worker[m]) for m in MODES}
    names = {"prerun": "cadscope's `before_start` (span start, context)",
             "postrun": "cadscope's `after_return` (span end, processor queue)",
             "body": "the task's body (bare: nothing; cadscope: catalogue metrics)"}  # fmt: skip
    lines = [
        f"\n### The pool's task thread, step by step: no-op task, prefork -c {args.concurrency}, Redis, "
        f"{args.tasks} tasks x {args.rounds} rounds, loop of {args.loop} ({time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        "`python bench/task_steps.py`)\n",
        "| CPU per task on the pool's task thread | bare, in the worker | cadscope, in the worker "
        "| cadscope, tight loop | worker ÷ loop |",
        "| --- | --- | --- | --- | --- |",
        f"| whole cycle (one `task_prerun` to the next) | {median(bare, 'cycle'):.1f} µs "
        f"| {median(cad, 'cycle'):.1f} µs | | |",
    ]
    for step in STEPS:
        in_loop = median(loops, step)
        bare_cell = f"{median(bare, step):.1f} µs" if step == "body" else ""
        lines.append(f"| {names[step]} | {bare_cell} | {median(cad, step):.1f} µs | {in_loop:.1f} µs "
                     f"| {median(cad, step) / in_loop:.1f} |")  # fmt: skip
    lines += [
        f"| the rest of the cycle (billiard, Celery's tracer, signal dispatch) | {rest['bare']:.1f} µs "
        f"| {rest['cadscope']:.1f} µs | | |",
        f"| one read of the thread CPU clock (in each step's figure) | {median(bare, 'clock'):.2f} µs "
        f"| {median(cad, 'clock'):.2f} µs | | |",
        f"| the cyclic GC on the task thread (inside the steps above) | {median(bare, 'gc'):.2f} µs "
        f"| {median(cad, 'gc'):.2f} µs | {median(loops, 'gc'):.2f} µs | |",
    ]
    gcs = {"bare": bare, "cadscope": cad, "cadscope, tight loop": loops}
    lines += [
        "\n| cyclic GC runs per 1,000 tasks | generation 0 | generation 1 | generation 2 | on other threads |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {name} | " + " | ".join(f"{median(rows, g):.1f}" for g in GC) + " |" for name, rows in gcs.items()),
    ]
    publish("\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
