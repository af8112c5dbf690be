"""bench/_noop_app.py's app ($BENCH_MODE), with the pool's task thread timed step by step (bench/task_steps.py).

In each pool process, after a warm-up, it adds up the task thread's CPU time
(``time.thread_time_ns``) for: the whole cycle from one ``task_prerun`` to the
next (everything the thread does per task), cadscope's ``task_prerun`` and
``task_postrun`` handlers, and the task's body. Every ``FLUSH_EVERY`` tasks it
writes the totals to ``$BENCH_STEPS_DIR/<pid>.json``, so a worker that is
terminated mid-count still leaves what it measured.

The timers cost CPU themselves: one clock read a task for the cycle and two
for each timed step (seven with cadscope's handlers, three for bare Celery).
One read's cost is measured here once and written beside the totals.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _noop_app import app
from celery import signals

__all__ = ["app", "timed"]

WARM_UP = int(os.environ.get("BENCH_STEPS_WARM_UP", "200"))
FLUSH_EVERY = 250

_totals = {"tasks": 0, "cycle": 0, "prerun": 0, "postrun": 0, "body": 0}
_state: dict[str, float] = {"seen": 0, "last": 0, "clock": 0.0}


def timed(step: str, fn: Callable[..., Any], totals: dict[str, int]) -> Callable[..., Any]:
    """``fn`` with its thread CPU time added to ``totals[step]`` on every call."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[step] += time.thread_time_ns() - started

    return wrapper


def _clock_read_ns() -> float:
    n = 2000
    started = time.perf_counter_ns()
    for _ in range(n):
        time.thread_time_ns()
    return (time.perf_counter_ns() - started) / n


@signals.task_prerun.connect(weak=False)  # connected at import: called before cadscope's own handler
def _cycle(**_: Any) -> None:
    now = time.thread_time_ns()
    _state["seen"] += 1
    if _state["seen"] <= max(WARM_UP, 1):  # the first cycle has no start: it is always warm-up
        for step in ("prerun", "postrun", "body"):
            _totals[step] = 0  # the steps count from the first cycle that does
    else:
        _totals["cycle"] += now - _state["last"]
        _totals["tasks"] += 1
        if _totals["tasks"] % FLUSH_EVERY == 0:
            out = Path(os.environ["BENCH_STEPS_DIR"]) / f"{os.getpid()}.json"
            out.write_text(json.dumps({**_totals, "clock_read_ns": _state["clock"]}))
    _state["last"] = now


@signals.worker_process_init.connect(weak=False)
def _wrap(**_: Any) -> None:
    # Connected after cadscope's own worker_process_init receiver (the worker app is imported
    # first), so its task-tracing handlers exist here.
    _state["clock"] = _clock_read_ns()
    if os.environ.get("BENCH_MODE") == "cadscope":
        from cadscope.tracing import _celery

        tracing = _celery._installed
        assert tracing is not None, "cadscope's task tracing is not installed in this pool process"
        tracing.disconnect()
        tracing.on_prerun = timed("prerun", tracing.on_prerun, _totals)  # type: ignore[method-assign]
        tracing.on_postrun = timed("postrun", tracing.on_postrun, _totals)  # type: ignore[method-assign]
        tracing.connect()
    task = app.tasks["bench.noop"]
    task.run = timed("body", task.run, _totals)
