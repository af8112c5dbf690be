"""The benchmark scripts run (a smoke test: no timings are asserted here)."""

from __future__ import annotations

import re
import subprocess
import sys

import psutil

from .conftest import REPO


def _bench(tmp_path, script: str, *args: str) -> str:
    """Run ``bench/<script>`` and return the results section it wrote; it must exit 0."""
    out = tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args, "--write", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out.read_text()


def _processes_running(module: str) -> list[int]:
    """Pids of processes whose command line names ``module`` (a bench worker app left behind)."""
    return [p.pid for p in psutil.process_iter(["cmdline"]) if module in " ".join(p.info["cmdline"] or [])]


def test_scrape_churn_runs_and_compaction_keeps_the_exposition(tmp_path):
    # The script exits non-zero unless the exposition is byte-identical before and after compaction.
    results = _bench(tmp_path, "scrape_churn.py", "--dead", "0,20")
    rows = [line for line in results.splitlines() if line.startswith("| 20 |")]
    assert rows and "| 28 | 9 |" in rows[0]  # 8 live + 20 dead files, then 8 live + 1 accumulator


CATALOGUE_CHILD = """
import sys
from cadscope.metrics import ModelObservability, enable_multiprocess
enable_multiprocess(sys.argv[1])
obs = ModelObservability()
for versions in (("0.20.2", "7.6.3"), ("none", "8.0.1")):
    with obs.engine_versions(*versions):
        obs.record_occt_boolean("union", 4, 0.02)
        obs.record_export("step", 20_000, 0.01)
        obs.record_stage("parametric", "export", 0.03)
"""


def test_scrape_worker_page_runs_and_the_pages_agree(tmp_path):
    # The script exits non-zero unless ours and upstream's pages are byte-identical.
    metrics = tmp_path / "metrics"
    for _ in range(2):  # two processes' files, written by cadscope's catalogue
        subprocess.run([sys.executable, "-c", CATALOGUE_CHILD, str(metrics)], check=True)
    results = _bench(tmp_path, "scrape_worker_page.py", "--dir", str(metrics), "--rounds", "3")
    row = [line for line in results.splitlines() if line.startswith("| ") and " ms |" in line]
    assert len(row) == 1 and row[0].startswith("| 4 |"), results  # a counter and a histogram file each


def test_task_cpu_runs_and_every_span_reaches_the_collector(tmp_path):
    # The script exits non-zero when a stack's collector did not receive every span.
    results = _bench(tmp_path, "task_cpu.py", "--tasks", "300", "--rounds", "1")
    stacks = [line.split(" | ")[0].lstrip("| ") for line in results.splitlines() if " µs | " in line]
    assert stacks == ["bare", "signals", "metrics", "upstream", "cadscope-sdk-span", "cadscope-upstream-encoder",
                      "cadscope-eager", "cadscope-signals", "cadscope-no-export", "cadscope"]  # fmt: skip
    assert "| **all** (cadscope − bare) |" in results
    assert "| deferring the task span (cadscope-signals − cadscope-eager) |" in results
    assert "| the task's hooks, not Celery's signals (cadscope − cadscope-signals) |" in results


def test_span_cost_runs_and_the_encoders_agree(tmp_path):
    # The script exits non-zero when cadscope's encoder and upstream's give different bytes, or when the
    # two ways of resolving a deferred span disagree.
    results = _bench(tmp_path, "span_cost.py", "--n", "1000")
    from cadscope.tracing import _otlpwire

    parts = ("| task span", "| deferred task span", "| OTLP encoding")
    rows = [line for line in results.splitlines() if line.startswith(parts)]
    compiled = [line for line in rows if "in Python vs. compiled (`_wirec`)" in line]
    assert len(rows) - len(compiled) == 3
    assert len(compiled) == (2 if _otlpwire._LEAN_FIELD is not None else 0)  # where built, both again, compiled


def test_task_overhead_runs_every_stack_and_leaves_no_worker_behind(tmp_path, redis_server):
    # Every stack's worker drains its queue (the script raises if one stops short) and is gone at the end.
    results = _bench(tmp_path, "task_overhead.py", "--tasks", "100", "--rounds", "1", "--broker", redis_server.url)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in results.splitlines() if " tasks/s | " in line}
    assert list(rows) == ["bare", "upstream", "cadscope"]
    assert "| **1.000** [1.000–1.000] |" in rows["bare"]
    assert _processes_running("_noop_app") == []


def test_task_steps_times_cadscope_handlers_inside_the_worker(tmp_path, redis_server):
    # The timers must reach the pool processes: cadscope's handlers and the task body each get a figure.
    results = _bench(tmp_path, "task_steps.py", "--tasks", "600", "--rounds", "1", "--loop", "500", "--warm-up", "20",
                     "--broker", redis_server.url)  # fmt: skip
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in results.splitlines()
            if line.startswith("| ") and " µs" in line}  # fmt: skip
    prerun = rows["cadscope's `before_start` (span start, context)"]
    in_worker, in_loop = (float(cell.removesuffix(" µs")) for cell in prerun[1:3])
    assert in_worker > 0 and in_loop > 0
    assert float(rows["whole cycle (one `task_prerun` to the next)"][0].removesuffix(" µs")) > 0
    # The collector's runs are counted for each side: three rows of four counts per 1,000 tasks.
    gc_rows = results.split("| cyclic GC runs per 1,000 tasks |")[1].splitlines()[2:5]
    assert [row.split(" | ")[0].lstrip("| ") for row in gc_rows] == ["bare", "cadscope", "cadscope, tight loop"]
    assert all(float(cell) >= 0 for row in gc_rows for cell in row.rstrip(" |").split(" | ")[1:5])
    assert _processes_running("_steps_app") == []


def test_task_side_by_side_recovers_the_control_cost_and_stops_what_it_started(tmp_path):
    # The control task burns 1,000 µs of its thread's CPU: the pool's task threads must show at least half
    # of that over bare Celery's, or the windows are not reading the pool's CPU. The script's own
    # redis-servers and workers are gone at the end; the shared Redis is never touched.
    servers_before = set(_processes_running("redis-server"))
    results = _bench(tmp_path, "task_side_by_side.py", "--rounds", "1", "--windows", "2", "--window", "1",
                     "--warm-up", "0.5", "--tasks", "2500", "--burn-us", "1000")  # fmt: skip
    costs, parts = results.split("| stack, added vs bare per task")

    def rows(table: str) -> dict[str, list[str]]:
        return {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in table.splitlines()
                if line.startswith("| ") and " µs" in line}  # fmt: skip

    assert list(rows(costs)) == ["bare", "upstream", "cadscope", "cadscope, task signals",
                                 "cadscope, 10% of traces sampled", "cadscope, OTLP/HTTP", "burn"]  # fmt: skip
    assert float(rows(parts)["burn"][0].removesuffix(" µs")) >= 500  # the pool task threads' added CPU a task
    received = re.search(r"null collectors: (\d+) over gRPC, (\d+) over HTTP", results)
    assert received and int(received[1]) > 0 and int(received[2]) > 0  # each transport's stacks exported
    assert _processes_running("_noop_app") == []
    assert set(_processes_running("redis-server")) == servers_before


def test_read_window_batches_the_childs_events_into_fewer_reads(tmp_path):
    # Window 0 reads at every write; a 30 s window reads the first write, then everything at the exit.
    results = _bench(tmp_path, "read_window.py", "--runs", "1", "--windows", "0,30")
    reads = {line.split(" | ")[0].lstrip("| "): float(line.split(" | ")[1].split()[0])
             for line in results.splitlines() if line.startswith("| ") and " ms | " in line}  # fmt: skip
    assert list(reads) == ["0 s", "30 s"]
    assert reads["30 s"] <= 3 < reads["0 s"]


def test_export_cost_runs_every_exporter_against_its_receiver(tmp_path):
    # The script exits non-zero when an export fails: each exporter reached its receiver, over gRPC or HTTP.
    results = _bench(tmp_path, "export_cost.py", "--rounds", "1", "--exports", "2", "--every", "0.2", "--spans", "20")
    rows = [line.split(" | ")[0].lstrip("| ") for line in results.splitlines() if " ms** [" in line]
    assert rows == ["cadscope gRPC", "cadscope gRPC, BDP", "upstream gRPC", "upstream HTTP", "cadscope HTTP"]
    assert _processes_running("export_cost.py") == []  # the HTTP sink and every child are gone


def test_task_side_by_side_runs_a_revision_beside_the_checkout_and_removes_its_worktree(tmp_path):
    # --before adds "cadscope at REV", its worker importing cadscope from a worktree of REV; --only keeps
    # bare and the stacks named. The worktree is gone afterwards.
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip
    trees_before = subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True).stdout
    results = _bench(tmp_path, "task_side_by_side.py", "--rounds", "1", "--windows", "2", "--window", "1",
                     "--warm-up", "0.5", "--tasks", "2500", "--only", "burn", "--before", "HEAD")  # fmt: skip
    costs = results.split("| stack, added vs bare per task")[0]
    names = [line.split(" | ")[0].lstrip("| ") for line in costs.splitlines()
             if line.startswith("| ") and " µs" in line]  # fmt: skip
    assert names == ["bare", f"cadscope at {head}", "burn"]
    received = re.search(r"null collectors: (\d+) over gRPC", results)
    assert received and int(received[1]) > 0  # the revision's worker traced and exported its tasks
    trees_after = subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True).stdout
    assert trees_after == trees_before
    assert _processes_running("_noop_app") == []


def test_task_cold_counts_what_cadscope_adds_to_a_task(tmp_path):
    # Exact counts (cachegrind), less a run of no tasks: what a run's start and end do moves a short
    # run's figures by a few thousand instructions a task, never by cadscope's task path (~180,000).
    results = _bench(tmp_path, "task_cold.py", "--tasks", "100", "--warm-up", "10", "--only", "cadscope",
                     "--seeds", "3,7")  # fmt: skip
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in results.splitlines()
            if line.startswith("| ") and not line.startswith(("| stack", "| ---"))}  # fmt: skip
    assert list(rows) == ["bare", "cadscope"]
    added = {stack: int(cells[1].replace(",", "")) for stack, cells in rows.items()}
    assert added["bare"] == 0 and added["cadscope"] > 50_000
    lines = {stack: int(cells[3].strip("* ").replace(",", "")) for stack, cells in rows.items()}
    assert lines["cadscope"] > 300  # the lines its task path reads, over bare Celery's
    low, high = (int(n.replace(",", "")) for n in rows["cadscope"][4].split(" to "))  # each seed's, against bare's
    assert 300 < low <= lines["cadscope"] <= high
