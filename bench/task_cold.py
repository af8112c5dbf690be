"""Cold cache lines a task: what a no-op task reads from memory when every cache is cold, counted.

On a busy host (bench/task_side_by_side.py) cadscope's task path costs four to
five times what it costs in a warm loop (bench/task_cpu.py): +70-110 µs a task
on the pool's task threads against about +20 µs. Between two of a pool
process's tasks the other processes have run and left the caches to their own
data, so each task reads its code (3.11's bytecode is data), its objects and
the interpreter's from memory again. Fewer calls did not show there (RESULTS,
"Fewer calls a task", and "The collector, not the calls"): the side-by-side
figure moves by ±10 µs between runs of the same code, and a change worth less
than that cannot be seen in it.

Here the count is exact. Celery's own task tracer runs the task in a loop (as
bench/task_cpu.py, one process per stack) under ``valgrind --tool=cachegrind``,
which simulates the caches (32 KiB L1s, a 1 MiB last level) and counts every
instruction and miss. Before each task the loop writes a byte to every line
of a 2 MiB buffer, so the simulated caches hold nothing of the last task: each
line the task touches is a last-level miss, one read from memory. Each stack
runs twice, with 0 and with ``--tasks`` tasks after the same warm-up, and the
difference divided by the tasks is the task's own (the buffer's lines, the
same in every stack, included). ``gc.freeze()`` after the warm-up in every
stack leaves the cyclic collector's passes out: when one falls in a run
depends on the run's length, not on the task.

Each run is exact, but where Python's objects land (its hash seed: dict
layouts, which lines two objects share) moves a count by ±50 lines from one
run of the same code to the next, more than most single changes. So every
stack runs under several fixed hash seeds (``--seeds``, default 0-5), each
seed's count exact and repeatable, and the figure is their mean, with their
range; the runs go ``--jobs`` at a time (default: one a core).

Stacks: ``bare`` (Celery alone), ``app`` (cadscope's task class, set up as in
a worker, its runs not traced, a task that records nothing), ``metrics`` (the
same, the task recording its outcome and run-time metrics), ``cadscope`` (as a
worker runs it: the task span, deferred, its context, the metrics; the
span's export, resolved and encoded by cadscope's OTLP encoder on the export
thread, at a flush after the last task), and with ``--before REV`` the same
with cadscope's code at that revision (a git worktree).

    python bench/task_cold.py [--tasks 400] [--seeds 0,1,2,3,4,5] [--jobs 2] [--before REV] [--write bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import catalogue_noop, plain_noop, publish, revision_tree, task_request

HERE = Path(__file__).resolve().parent
STACKS = ("bare", "app", "metrics", "cadscope")
EVICT = 2 << 20  # twice the simulated last level
CACHES = ["--I1=32768,8,64", "--D1=32768,8,64", "--LL=1048576,16,64"]
EVENTS = {"Ir": r"I\s+refs:", "I1": r"I1\s+misses:", "LLi": r"LLi misses:", "Dr": r"D\s+refs:",
          "D1": r"D1\s+misses:", "LLd": r"LLd misses:"}  # fmt: skip


def child(stack: str, tasks: int, warm_up: int) -> None:
    """Set the stack up as a pool process would, warm it up, then run ``tasks`` tasks, each after the
    caches were filled with other data."""
    import gc

    from celery import Celery
    from celery.app.trace import build_tracer, setup_worker_optimizations

    flush = None
    task_class: dict[str, Any] = {}
    if stack != "bare":
        from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

        from cadscope.metrics import default_observability, enable_multiprocess
        from cadscope.tracing import TracedTask, flush_tracing, instrument_celery_worker, setup_tracing
        from cadscope.tracing._otlpwire import encode_request

        class Encoding(SpanExporter):
            """What the OTLP exporter does to a batch before its transport: encode it."""

            def export(self, spans: object) -> SpanExportResult:
                encode_request(spans)  # type: ignore[arg-type]
                return SpanExportResult.SUCCESS

        enable_multiprocess(tempfile.mkdtemp())
        provider = setup_tracing("bench-cold", exporters=[Encoding()],
                                 on_drop=default_observability().record_spans_dropped)  # fmt: skip
        flush, task_class = flush_tracing, {"task_cls": TracedTask}
    app = Celery("bench-cold", set_as_current=True, **task_class)
    app.conf.update(task_ignore_result=True, result_backend=None)
    noop = plain_noop(app) if stack in ("bare", "app") else catalogue_noop(app)
    if stack == "cadscope":
        instrument_celery_worker(provider, app=app)
    setup_worker_optimizations(app, "bench@host")
    trace_task = build_tracer(noop.name, app.tasks[noop.name], app=app, eager=False, propagate=False)
    evicting = bytearray(EVICT)
    line = b"\1" * (EVICT // 64)

    def run(first: int, n: int) -> None:
        for i in range(first, first + n):
            task_id = f"job-{i:08d}"
            request = task_request(task_id, noop.name)
            evicting[::64] = line  # a byte in every line: the last task's lines leave the caches
            trace_task(task_id, (), {}, request)

    run(0, warm_up)
    if flush is not None:
        flush()
    gc.freeze()
    run(warm_up, tasks)
    if flush is not None and tasks:
        flush()


def _counts(stack: str, tasks: int, warm_up: int, env: dict[str, str]) -> dict[str, int]:
    command = ["valgrind", "--tool=cachegrind", "--cache-sim=yes", *CACHES, "--cachegrind-out-file=/dev/null",
               sys.executable, __file__, "--child", stack, "--tasks", str(tasks),
               "--warm-up", str(warm_up)]  # fmt: skip
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{stack}: {out.stderr[-2000:]}")
    counts = {}
    for event, label in EVENTS.items():
        found = re.search(label + r"\s+([\d,]+)", out.stderr)
        if found is None:
            raise RuntimeError(f"{stack}: no {event} in cachegrind's summary")
        counts[event] = int(found.group(1).replace(",", ""))
    return counts


def per_task(stack: str, tasks: int, warm_up: int, env: dict[str, str]) -> dict[str, float]:
    """The events one task adds: a run of ``tasks`` less a run of none, divided by ``tasks``."""
    base, full = _counts(stack, 0, warm_up, env), _counts(stack, tasks, warm_up, env)
    return {event: (full[event] - base[event]) / tasks for event in EVENTS}


def per_task_seeds(stacks: dict[str, tuple[str, dict[str, str]]], seeds: list[int], tasks: int, warm_up: int,
                   jobs: int) -> dict[str, list[dict[str, float]]]:  # fmt: skip
    """:func:`per_task` of every stack (name -> (mode, environment)) under each hash seed, ``jobs`` at once."""
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        runs = {
            (name, seed): pool.submit(per_task, mode, tasks, warm_up, {**env, "PYTHONHASHSEED": str(seed)})
            for name, (mode, env) in stacks.items()
            for seed in seeds
        }  # fmt: skip
        return {name: [runs[name, seed].result() for seed in seeds] for name in stacks}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--warm-up", type=int, default=50)
    parser.add_argument("--seeds", default="0,1,2,3,4,5", help="comma-separated PYTHONHASHSEED values")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="cachegrind runs at once")
    parser.add_argument("--only", help="comma-separated stacks (bare always runs)")
    parser.add_argument("--before", metavar="REV", help="add 'cadscope at REV': cadscope's code at that revision")
    parser.add_argument("--write")
    parser.add_argument("--child", choices=STACKS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.tasks, args.warm_up)
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    stacks = [s for s in STACKS if not args.only or s == "bare" or s in args.only.split(",")]
    # The project's code (and bench/) first: with no OTLP endpoint the spans go to the encoding exporter only.
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_EXPORTER_OTLP")}
    envs = {stack: {**base_env, "PYTHONPATH": str(HERE), "CADSCOPE_TRACES_FILE": ""} for stack in stacks}
    if args.before:
        tree, rev = revision_tree(str(HERE), args.before)
        name = f"cadscope at {rev}"
        stacks.insert(stacks.index("cadscope") if "cadscope" in stacks else len(stacks), name)
        envs[name] = {**envs["bare"], "PYTHONPATH": f"{HERE}{os.pathsep}{tree}"}
    seeds = [int(seed) for seed in args.seeds.split(",")]
    modes = {stack: ("cadscope" if stack.startswith("cadscope") else stack, envs[stack]) for stack in stacks}
    runs = per_task_seeds(modes, seeds, args.tasks, args.warm_up, args.jobs)
    # Each stack's figures less bare Celery's under the same seed, then the mean over the seeds.
    added = {stack: [{e: run[e] - base[e] for e in EVENTS} for run, base in zip(runs[stack], runs["bare"], strict=True)]
             for stack in stacks}  # fmt: skip
    got = {stack: {e: statistics.mean(run[e] for run in runs[stack]) for e in EVENTS} for stack in stacks}
    for stack in stacks:
        counts = ", ".join(f"{event} {value:,.0f}" for event, value in got[stack].items())
        print(f"{stack:22s} {counts}", flush=True)
    bare = got["bare"]
    cold = {stack: c["LLi"] + c["LLd"] for stack, c in got.items()}
    lines = [
        f"\n### Cold cache lines a task: Celery's task tracer in a loop under cachegrind, the caches filled with "
        f"other data before each of {args.tasks} tasks, hash seeds {args.seeds} ({time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()}, Python {platform.python_version()}; `python bench/task_cold.py`)\n",
        "| stack | instructions | added | last-level misses (lines read from memory) | added | seeds' range "
        "| of which code | of which data | L1 misses, added |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stack, c in got.items():
        l1 = c["I1"] + c["D1"] - bare["I1"] - bare["D1"]
        per_seed = [run["LLi"] + run["LLd"] for run in added[stack]]
        lines.append(
            f"| {stack} | {c['Ir']:,.0f} | {c['Ir'] - bare['Ir']:+,.0f} | {cold[stack]:,.0f} "
            f"| **{cold[stack] - cold['bare']:+,.0f}** | {min(per_seed):+,.0f} to {max(per_seed):+,.0f} "
            f"| {c['LLi'] - bare['LLi']:+,.0f} | {c['LLd'] - bare['LLd']:+,.0f} | {l1:+,.0f} |"
        )
    lines.append(
        f"\nEvery stack's count includes the {EVICT // 64:,} lines of the buffer written before each task; "
        "the 'added' columns are the stack's less bare Celery's, the mean over the seeds, each seed's run "
        "against bare Celery's under the same seed ('seeds' range')."
    )
    if args.before:
        lines.append(
            f"`cadscope at {rev}`: cadscope's code at {args.before} ({rev}); `cadscope`: the code checked out."
        )
    publish("\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
