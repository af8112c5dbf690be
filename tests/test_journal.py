"""The open-span journal and its reaper, with real processes, signals and a full filesystem."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from cadscope.tracing import JournalReaper, SpanJournal, journal_note, read_journal
from cadscope.tracing.testing import in_memory_provider

from .conftest import wait_until


def _journal_files(directory) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(name for name in os.listdir(directory) if name.startswith("journal_"))


def test_open_spans_are_journaled_with_their_updates_and_forgotten_when_they_end(tmp_path):
    journal = SpanJournal(str(tmp_path))
    provider, _ = in_memory_provider()
    provider.add_span_processor(journal)
    tracer = provider.get_tracer("cad", "1.0")
    with tracer.start_as_current_span("cad.flow parametric", attributes={"cad.job_id": "j1"}):
        with tracer.start_as_current_span("cad.subprocess freecad", kind=trace.SpanKind.INTERNAL) as sub:
            journal_note(sub, {"process.pid": 4321})
            tracer.start_span("occt.boolean").end()
            [path] = _journal_files(tmp_path)
            header, spans = read_journal(str(tmp_path / path))
            assert header["pid"] == os.getpid()
            assert [s["n"] for s in spans] == ["cad.flow parametric", "cad.subprocess freecad"]
            flow, subprocess_span = spans
            assert subprocess_span["p"] == flow["s"] and subprocess_span["a"]["process.pid"] == 4321
            assert flow["a"] == {"cad.job_id": "j1"} and flow["sc"] == "cad" and flow["sv"] == "1.0"
    assert read_journal(str(tmp_path / path))[1] == []
    journal.shutdown()
    assert _journal_files(tmp_path) == []  # nothing open: removed


def test_the_journal_is_bounded_by_the_spans_open(tmp_path):
    journal = SpanJournal(str(tmp_path), max_bytes=20_000, delay_s=0)  # every span written as it starts
    provider, _ = in_memory_provider()
    provider.add_span_processor(journal)
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("outer"):
        for _ in range(2_000):
            tracer.start_span("short", attributes={"cad.payload": "x" * 200}).end()
        [path] = _journal_files(tmp_path)
        assert os.path.getsize(tmp_path / path) < 30_000  # rewritten with what is open, again and again
        assert [s["n"] for s in read_journal(str(tmp_path / path))[1]] == ["outer"]


def test_a_span_that_ends_soon_with_no_child_never_reaches_the_file(tmp_path):
    journal = SpanJournal(str(tmp_path), delay_s=3600)
    provider, _ = in_memory_provider()
    provider.add_span_processor(journal)
    tracer = provider.get_tracer("t")
    for _ in range(100):
        tracer.start_span("run/bench.noop").end()
    assert _journal_files(tmp_path) == []
    journal.shutdown()


def test_a_parent_is_journaled_before_any_child_of_it_can_end_and_the_rest_once_open_long_enough(tmp_path):
    """A child can be exported while its parent is open: the parent must be in the journal by then, or a
    death would leave the child an orphan. A childless span is journaled by the journal's thread once
    open ``delay_s`` (forced here with ``flush``; the thread is the same call on a timer)."""
    journal = SpanJournal(str(tmp_path), delay_s=3600)
    provider, _ = in_memory_provider()
    provider.add_span_processor(journal)
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("run/cadscope.run_job"):
        with tracer.start_as_current_span("cad.flow parametric"):
            [path] = _journal_files(tmp_path)
            assert [s["n"] for s in read_journal(str(tmp_path / path))[1]] == ["run/cadscope.run_job"]
            with tracer.start_as_current_span("cad.stage engine"):
                open_now = [s["n"] for s in read_journal(str(tmp_path / path))[1]]
                assert open_now == ["run/cadscope.run_job", "cad.flow parametric"]
                journal.flush()
                open_now = [s["n"] for s in read_journal(str(tmp_path / path))[1]]
                assert open_now == ["run/cadscope.run_job", "cad.flow parametric", "cad.stage engine"]
    assert read_journal(str(tmp_path / path))[1] == []
    journal.shutdown()


def test_the_journals_thread_writes_a_span_open_past_the_delay(tmp_path):
    journal = SpanJournal(str(tmp_path), delay_s=0.05)
    provider, _ = in_memory_provider()
    provider.add_span_processor(journal)
    with provider.get_tracer("t").start_as_current_span("cad.subprocess freecad"):
        wait_until(lambda: _journal_files(tmp_path), 30)
        [path] = _journal_files(tmp_path)
        assert [s["n"] for s in read_journal(str(tmp_path / path))[1]] == ["cad.subprocess freecad"]
    journal.shutdown()


def test_unsampled_spans_are_not_journaled(tmp_path):
    journal = SpanJournal(str(tmp_path))
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(journal)
    with provider.get_tracer("t").start_as_current_span("dropped"):
        assert _journal_files(tmp_path) == []


def test_a_full_disk_degrades_the_journal_counted_never_the_job(tmp_path):
    """A real filesystem with no room left (a 1 MiB tmpfs of the test's own, filled up)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.fail(f"this test needs to mount a tmpfs (root): {done.stderr.decode().strip()}")
    try:
        errors: list[str] = []
        journal = SpanJournal(str(mount / "journal"), on_error=errors.append, delay_s=0)
        provider, exporter = in_memory_provider()
        provider.add_span_processor(journal)
        tracer = provider.get_tracer("t")
        with tracer.start_as_current_span("before"):
            pass
        filler = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(filler, b"\0" * 65536)
        except OSError:
            pass
        finally:
            os.close(filler)
        for _ in range(50):
            with tracer.start_as_current_span("during", attributes={"cad.payload": "y" * 500}):
                pass
        assert len(exporter.get_finished_spans()) == 51  # every span still ended and exported
        assert errors and set(errors) == {"disk_full"}
        journal.shutdown()
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


DYING = textwrap.dedent(
    """
    import os, signal, sys, time
    from opentelemetry.trace import SpanKind
    from cadscope.tracing import SpanJournal, journal_note
    from cadscope.tracing.testing import in_memory_provider
    provider, _ = in_memory_provider()
    provider.add_span_processor(SpanJournal(sys.argv[1], owner="test-owner"))
    tracer = provider.get_tracer("cadscope.workers")
    with tracer.start_as_current_span("run/cadscope.run_job", kind=SpanKind.CONSUMER) as run:
        with tracer.start_as_current_span("cad.subprocess freecad") as sub:
            journal_note(sub, {"process.pid": 999})
            tracer.start_span("document.create").end()
            print(format(run.get_span_context().trace_id, "032x"), flush=True)
            time.sleep(60)
    """
)


def test_the_reaper_ends_a_dead_processs_open_spans_at_its_death(tmp_path):
    provider, exporter = in_memory_provider()
    reaper = JournalReaper(str(tmp_path), provider, heartbeat_s=0.1)
    reaper.start()
    child = subprocess.Popen([sys.executable, "-c", DYING, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        trace_id = int(child.stdout.readline(), 16)
        died = time.time_ns()
        child.send_signal(signal.SIGKILL)
        spans = wait_until(lambda: len(exporter.get_finished_spans()) == 2 and exporter.get_finished_spans(), 10)
    finally:
        reaper.stop()
        child.wait()
    by_name = {span.name: span for span in spans}
    run, sub = by_name["run/cadscope.run_job"], by_name["cad.subprocess freecad"]
    assert run.context.trace_id == sub.context.trace_id == trace_id and run.parent is None  # the root, its trace id
    assert sub.parent.span_id == run.context.span_id and run.kind is trace.SpanKind.CONSUMER
    for span in spans:
        # The test process is the child's parent and nothing else reaps it: the kernel still has its status.
        assert span.attributes["error.type"] == "SIGKILL" and span.status.status_code is trace.StatusCode.ERROR
        assert abs(span.end_time - died) < 1_000_000_000 and span.attributes["cadscope.span.recovered"] is True
    assert sub.attributes["process.pid"] == 999
    assert sub.end_time <= run.end_time
    assert _journal_files(tmp_path) == []


# The main thread leaves (the kernel's exit of one thread, not of the process) while another
# thread lives on: the process's leader is a zombie, and the process is not dead yet.
LEADER_GONE = DYING.replace(
    "        time.sleep(60)",
    """        import ctypes, threading
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        ctypes.CDLL(None).syscall(60, 0)  # SYS_exit on x86_64""",
)
assert LEADER_GONE != DYING


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the exit system call's number is x86_64's")
def test_a_process_seen_while_its_leader_is_a_zombie_is_reaped_with_its_signal(tmp_path):
    """The reaper first meets the journal while the process's main thread has exited and another
    thread runs (its /proc state reads Z, but the kernel has no exit status yet): it must wait for
    the death, not close the spans then as ``worker_lost``."""
    provider, exporter = in_memory_provider()
    reaper = JournalReaper(str(tmp_path), provider, heartbeat_s=0.1)
    child = subprocess.Popen([sys.executable, "-c", LEADER_GONE, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        int(child.stdout.readline(), 16)

        def leader_zombie_with_a_live_thread() -> bool:
            stat = open(f"/proc/{child.pid}/stat", "rb").read()
            state = stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3]
            return state == b"Z" and len(os.listdir(f"/proc/{child.pid}/task")) > 1

        wait_until(leader_zombie_with_a_live_thread, 30, what="the main thread gone, another alive")
        reaper._scan()  # the interleaving forced: the journal first seen now
        assert exporter.get_finished_spans() == ()
        died = time.time_ns()
        child.send_signal(signal.SIGKILL)
        reaper.start()
        spans = wait_until(lambda: len(exporter.get_finished_spans()) == 2 and exporter.get_finished_spans(), 30)
    finally:
        reaper.stop()
        child.kill()
        child.wait()
    for span in spans:
        assert span.attributes["error.type"] == "SIGKILL", span.attributes
        assert span.end_time >= died


def test_journals_of_a_worker_that_died_whole_are_closed_at_its_last_heartbeat(tmp_path):
    """No survivor on the host: the next reaper on the directory finds the journal, dated by the
    dead owner's heartbeat (here 2 s before the death, for the test to tell the moments apart)."""
    child = subprocess.Popen([sys.executable, "-c", DYING, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    child.stdout.readline()
    beat = time.time_ns()
    (tmp_path / "heartbeat_test-owner").write_text(str(beat))
    os.utime(next(tmp_path.glob("journal_*.log")), ns=(beat - 5_000_000_000, beat - 5_000_000_000))
    child.kill()
    child.wait()
    provider, exporter = in_memory_provider()
    reaper = JournalReaper(str(tmp_path), provider)
    assert reaper.recover() == 2
    spans = exporter.get_finished_spans()
    assert {span.end_time for span in spans} == {beat}
    assert all(span.attributes["cadscope.span.end_estimated"] is True for span in spans)
    assert all(span.attributes["error.type"] == "worker_restart" for span in spans)
    assert _journal_files(tmp_path) == [] and not (tmp_path / "heartbeat_test-owner").exists()
