"""bench/_noop_app.py's app ($BENCH_MODE), with the pool's task thread timed step by step (bench/task_steps.py).

In each pool process, after a warm-up, it adds up the task thread's CPU time
(``time.thread_time_ns``) for: the whole cycle from one ``task_prerun`` to the
next (everything the thread does per task), cadscope's task hooks
(``before_start``, ``after_return``), the task's body, and the cyclic garbage
collector's runs on that thread (``gc.callbacks``: they happen inside the
other steps, whichever allocation tips a generation over). Every ``FLUSH_EVERY`` tasks it
writes the totals to ``$BENCH_STEPS_DIR/<pid>.json``, so a worker that is
terminated mid-count still leaves what it measured.

The timers cost CPU themselves: one clock read a task for the cycle and two
for each timed step (seven with cadscope's handlers, three for bare Celery).
One read's cost is measured here once and written beside the totals.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _noop_app import app
from celery import signals

__all__ = ["app", "timed"]

WARM_UP = int(os.environ.get("BENCH_STEPS_WARM_UP", "200"))
FLUSH_EVERY = 250

COUNTED = ("prerun", "postrun", "body", "gc", "gc0", "gc1", "gc2", "gc_elsewhere")  # reset after the warm-up
_totals = {"tasks": 0, "cycle": 0, **dict.fromkeys(COUNTED, 0)}
_state: dict[str, float] = {"seen": 0, "last": 0, "clock": 0.0, "gc_started": 0}


def timed(step: str, fn: Callable[..., Any], totals: dict[str, int]) -> Callable[..., Any]:
    """``fn`` with its thread CPU time added to ``totals[step]`` on every call."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[step] += time.thread_time_ns() - started

    return wrapper


def _collected(phase: str, info: dict[str, int]) -> None:
    """A ``gc.callbacks`` entry: the cyclic collector's runs on the task thread, by generation, and their
    CPU time; runs on other threads (cadscope's export thread) are only counted."""
    if threading.get_ident() != threading.main_thread().ident:
        _totals["gc_elsewhere"] += phase == "stop"
        return
    now = time.thread_time_ns()
    if phase == "start":
        _state["gc_started"] = now
    else:
        _totals["gc"] += now - int(_state["gc_started"])
        _totals[f"gc{info['generation']}"] += 1


gc.callbacks.append(_collected)


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
        for step in COUNTED:
            _totals[step] = 0  # the steps count from the first cycle that does
    else:
        _totals["cycle"] += now - _state["last"]
        _totals["tasks"] += 1
        if _totals["tasks"] % FLUSH_EVERY == 0:
            out = Path(os.environ["BENCH_STEPS_DIR"]) / f"{os.getpid()}.json"
            out.write_text(json.dumps({**_totals, "clock_read_ns": _state["clock"]}))
    _state["last"] = now


def _time_the_task_class() -> None:
    """Time the task's body and cadscope's hooks where Celery's tracer finds them: on the
    task's class. A prefork child builds its tracers before ``worker_process_init``, taking
    the hooks and ``run`` that the class has then, so this runs at import, before the fork."""
    task = app.tasks["bench.noop"]
    cls = type(task)
    cls.run = staticmethod(timed("body", task.run, _totals))  # type: ignore[method-assign]
    if os.environ.get("BENCH_MODE") == "cadscope":
        cls.before_start = timed("prerun", cls.before_start, _totals)  # type: ignore[method-assign]
        cls.after_return = timed("postrun", cls.after_return, _totals)  # type: ignore[method-assign]


_time_the_task_class()


@signals.worker_process_init.connect(weak=False)
def _check(**_: Any) -> None:
    # Connected after cadscope's own worker_process_init receiver (the worker app is imported
    # first), so its task tracing is installed here.
    _state["clock"] = _clock_read_ns()
    if os.environ.get("BENCH_MODE") == "cadscope":
        from cadscope.tracing import _celery

        tracing = _celery._installed
        assert tracing is not None and tracing.hooks, "cadscope's task hooks are not tracing this pool process"
