"""A killed process leaves a complete, connected trace whose times are true.

Real prefork workers on Redis, real ``freecadcmd`` jobs that do their work and then hang inside
their export stage on their first delivery (``fault: hang_in_export``), an OTLP receiver. The
pool process running a job is SIGKILLed once its first spans have been exported, or late in the
job; or the worker's main process is SIGKILLed and a new worker starts on the same data
directory. Each time:

- the job's trace is one tree under one root with no orphan;
- every span lies inside its parent's window (1 ms; the queue wait between publisher and
  consumer excepted);
- the killed attempt's open spans (its task span, flow, stages, ``cad.subprocess`` with the
  killed FreeCAD pid, and the CAD child's own open spans) are exported by the survivor, ERROR,
  with ``error.type``, ended within 1 s of the measured time of death;
- the redelivered attempt succeeds and links to the lost one; no CAD process survives.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import psutil
import pytest

from cadscope.tracing import read_journal
from cadscope.workers import run_job
from cadscope.workers._workload import PLATE

from .conftest import wait_until

pytestmark = pytest.mark.slow

MS = 1_000_000
HANGING = {**PLATE, "engine": "freecad", "fault": "hang_in_export", "timeout_s": 60}


def _otlp(receiver) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true"}


def _cad_process(worker) -> psutil.Process:  # type: ignore[no-untyped-def]
    def find() -> psutil.Process | None:
        for process in psutil.Process(worker.proc.pid).children(recursive=True):
            try:
                if process.name().startswith("freecadcmd"):  # the engine itself, not its keeper
                    return process
            except psutil.NoSuchProcess:
                pass
        return None

    return wait_until(find, 60, what="the CAD process")  # type: ignore[no-any-return]


def _pool_process_of(worker, cad: psutil.Process) -> psutil.Process:  # type: ignore[no-untyped-def]
    """The pool process (a child of the worker's main process) that runs ``cad``: its ancestor for a
    cold job; for a warm one (forked by a fork server) the process its keeper holds a pidfd of."""
    pools = [p for p in psutil.Process(worker.proc.pid).children() if p.name() != "cadscope-warm"]  # not a fork server
    for pool in pools:
        if cad.pid in {p.pid for p in pool.children(recursive=True)}:
            return pool
    for keeper in (cad, cad.parent()):  # ``cad`` may be the keeper itself
        for info in Path(f"/proc/{keeper.pid}/fdinfo").iterdir():
            for line in info.read_text().splitlines():
                if line.startswith("Pid:") and int(line.split()[1]) in {p.pid for p in pools}:
                    return psutil.Process(int(line.split()[1]))
    raise AssertionError("no pool process runs the CAD process")


def _submit(producer, queue: str):  # type: ignore[no-untyped-def]
    job_id = f"job-death-{uuid.uuid4().hex[:8]}"
    with producer.start_as_current_span("POST /v1/jobs") as root:
        handle = run_job.apply_async(args=[HANGING], kwargs={"job_id": job_id}, task_id=job_id, queue=queue)
    return handle, format(root.get_span_context().trace_id, "032x")


def _exported(receiver, trace_id: str, name: str, count: int = 1) -> None:  # type: ignore[no-untyped-def]
    receiver.wait_for(lambda spans: sum(s["trace_id"] == trace_id and s["name"] == name for s in spans) >= count, 60)


def _complete_trace(receiver, trace_id: str) -> list[dict]:  # type: ignore[no-untyped-def, type-arg]
    """The job's spans once both attempts are in: the lost one closed, the second one finished."""

    def complete(spans) -> bool:  # type: ignore[no-untyped-def]
        mine = [s for s in spans if s["trace_id"] == trace_id]
        runs = [s for s in mine if s["name"] == "run/cadscope.run_job"]
        return len(runs) == 2 and any(s["name"] == "cad.stage collect" for s in mine)

    try:
        return [s for s in receiver.wait_for(complete, 90) if s["trace_id"] == trace_id]
    except TimeoutError:
        names = sorted((s["name"], s["attributes"].get("cadscope.span.recovered", False)) for s in receiver.spans
                       if s["trace_id"] == trace_id)  # fmt: skip
        raise AssertionError(f"the job's trace is not complete: {names}") from None


def _assert_one_true_tree(spans: list[dict]) -> None:  # type: ignore[type-arg]
    by_id = {s["span_id"]: s for s in spans}
    assert len(by_id) == len(spans), "a span exported twice"
    roots = [s for s in spans if s["parent_span_id"] in ("", "0" * 16)]
    assert [r["name"] for r in roots] == ["POST /v1/jobs"]
    orphans = [s["name"] for s in spans if s not in roots and s["parent_span_id"] not in by_id]
    assert orphans == []
    for span in spans:
        parent = by_id.get(span["parent_span_id"])
        if parent is None or (span["kind"] == 5 and parent["kind"] == 4):  # CONSUMER under PRODUCER: queue wait
            continue
        assert parent["start"] - MS <= span["start"], (span["name"], parent["name"])
        assert span["end"] <= parent["end"] + MS, (span["name"], parent["name"], span["end"] - parent["end"])


def _assert_the_lost_attempt(
    spans: list[dict],  # type: ignore[type-arg]
    died_ns: int,
    causes: set[str],
    cad_pid: int,
    child_open: set[str],
) -> None:
    recovered = [s for s in spans if s["attributes"].get("cadscope.span.recovered")]
    names = {s["name"] for s in recovered}
    expected = {"run/cadscope.run_job", "cad.flow parametric", "cad.stage engine", "cad.subprocess freecad"}
    assert expected | child_open <= names, names
    for span in recovered:
        assert span["status"] == 2 and span["attributes"]["error.type"] in causes, span
        assert abs(span["end"] - died_ns) < 1_000_000_000, (span["name"], (span["end"] - died_ns) / 1e9)
    subprocess_span = next(s for s in recovered if s["name"] == "cad.subprocess freecad")
    assert subprocess_span["attributes"]["process.pid"] == cad_pid
    lost = next(s for s in recovered if s["name"] == "run/cadscope.run_job")
    second = next(s for s in spans if s["name"] == "run/cadscope.run_job" and s is not lost)
    assert second["attributes"]["cad.attempt"] == 2 and "cadscope.span.recovered" not in second["attributes"]
    assert (lost["trace_id"], lost["span_id"]) in second["links"]


@pytest.mark.parametrize(
    "marker, child_open",
    # Early, the CAD child may be between two of its spans; late, it hangs inside these two.
    [("document.create", set()), ("export", {"cad.stage export", "fault.inject"})],
    ids=["after-the-first-export", "late"],
)
def test_a_killed_pool_process_leaves_one_connected_trace_with_true_times(
    producer, start_worker, otlp_receiver, engines, marker, child_open
):
    worker = start_worker(env=_otlp(otlp_receiver), concurrency=1)
    handle, trace_id = _submit(producer, worker.queue)
    # A first batch out, the job's ancestors still open; late: every export done, the child hanging.
    _exported(otlp_receiver, trace_id, marker, len(HANGING["exports"]) if marker == "export" else 1)
    _journaled(worker, child_open)
    cad = _cad_process(worker)
    pool = _pool_process_of(worker, cad)
    died = time.time_ns()
    pool.kill()
    pool.wait(10)
    wait_until(lambda: not cad.is_running() or cad.status() == psutil.STATUS_ZOMBIE, 30, what="CAD process gone")
    result = handle.get(timeout=180)
    assert result["status"] == "succeeded"
    spans = _complete_trace(otlp_receiver, trace_id)
    _assert_one_true_tree(spans)
    # The signal's name where the kernel still held the exit status when the main process asked;
    # worker_lost where billiard had reaped the process first.
    _assert_the_lost_attempt(spans, died, {"SIGKILL", "worker_lost"}, cad.pid, child_open)
    text = worker.scrape()
    assert re.search(r"^cadscope_task_attempts_lost_total\{[^}]*\} 1\.0$", text, re.M)
    assert re.search(r'^cadscope_telemetry_spans_recovered_total\{cause="(SIGKILL|worker_lost)"\} [1-9]', text, re.M)


def _journaled(worker, names: set[str]) -> None:  # type: ignore[no-untyped-def]
    """Wait until the worker's journals hold ``names`` open: a span with no child is journaled once
    it has been open for the journal's delay (a shorter one, lost at a death, is not promised)."""

    def open_names() -> set[str]:
        found: set[str] = set()
        for path in (worker.data_dir / "journal").glob("journal_*.log"):
            found |= {span["n"] for span in read_journal(str(path))[1]}
        return found

    wait_until(lambda: names <= open_names(), 30, what=f"{sorted(names)} journaled")


def test_a_worker_killed_whole_is_closed_by_the_next_one_on_its_data_directory(
    producer, start_worker, otlp_receiver, engines
):
    limits = {"CADSCOPE_TASK_TIME_LIMIT": "20", "CADSCOPE_TASK_SOFT_TIME_LIMIT": "15",
              "CADSCOPE_VISIBILITY_TIMEOUT": "21"}  # fmt: skip
    first = start_worker(env={**_otlp(otlp_receiver), **limits}, concurrency=1)
    handle, trace_id = _submit(producer, first.queue)
    _exported(otlp_receiver, trace_id, "export", len(HANGING["exports"]))
    _journaled(first, {"cad.stage export", "fault.inject"})
    cad = _cad_process(first)
    everyone = [psutil.Process(first.proc.pid), *psutil.Process(first.proc.pid).children(recursive=True)]
    died = time.time_ns()
    first.proc.kill()  # the main process: no survivor on this host until the next worker starts
    psutil.wait_procs(everyone, timeout=10)
    assert not cad.is_running() or cad.status() == psutil.STATUS_ZOMBIE, "the CAD process outlived its worker"
    # Redis hands the unacknowledged job to a worker once the visibility timeout has passed.
    time.sleep(int(limits["CADSCOPE_VISIBILITY_TIMEOUT"]) + 1)
    start_worker(env={**_otlp(otlp_receiver), **limits}, concurrency=1, queue=first.queue, data_dir=first.data_dir)
    result = handle.get(timeout=120)
    assert result["status"] == "succeeded"
    spans = _complete_trace(otlp_receiver, trace_id)
    _assert_one_true_tree(spans)
    _assert_the_lost_attempt(spans, died, {"worker_restart"}, cad.pid, {"cad.stage export", "fault.inject"})
    recovered = [s for s in spans if s["attributes"].get("cadscope.span.recovered")]
    # Ended at the dead worker's last heartbeat: before the kill, by at most its period (1 s).
    assert all(s["attributes"]["cadscope.span.end_estimated"] is True for s in recovered)
    assert all(s["end"] <= died for s in recovered)
