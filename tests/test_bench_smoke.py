"""The benchmark scripts run (a smoke test: no timings are asserted here)."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

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
    """Pids of processes of this checkout (by their working directory) whose command line names ``module``
    (a bench worker app left behind)."""
    found = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        if module in " ".join(process.info["cmdline"] or []) and str(process.info["cwd"] or "").startswith(str(REPO)):
            found.append(process.pid)
    return found


pytestmark = [pytest.mark.slow, pytest.mark.bench]


def test_scrape_churn_runs_and_compaction_keeps_every_count(tmp_path):
    # The script raises when compaction lost a count; it exits 1 when a target was missed, which a
    # smoke run on a busy machine may, so only the table is checked here.
    out = tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "scrape_churn.py"), "--live", "2", "--dead", "30", "--scrapes", "2",
         "--write", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO / "bench",
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    results = out.read_text()
    assert "| **scrape after compaction** (" in results and "| longest swap" in results
    assert _processes_running("time.sleep(3600)") == []


def test_task_overhead_runs_every_stack_and_leaves_no_worker_behind(tmp_path, redis_server):
    # Every stack's worker drains its queue (the script raises if one stops short) and is gone at the end.
    results = _bench(tmp_path, "task_overhead.py", "--tasks", "100", "--rounds", "1", "--broker", redis_server.url)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in results.splitlines() if " tasks/s | " in line}
    assert list(rows) == ["bare", "upstream", "cadscope"]
    assert "| **1.000** [1.000–1.000] |" in rows["bare"]
    assert _processes_running("_noop_app") == []


def test_journal_cost_runs_both_sides(tmp_path):
    results = _bench(tmp_path, "journal_cost.py", "--spans", "500", "--rounds", "2", "--dir", str(tmp_path / "j"))
    assert "| without the journal |" in results and "| a span that ends within the delay (most) |" in results
    assert "| a span written and ended (open past the delay, or a parent) |" in results


def test_job_overhead_runs_three_arms_on_every_engine(tmp_path, engines):
    # The script exits non-zero when a span did not reach its collector or a run failed.
    results = _bench(tmp_path, "job_overhead.py", "--runs", "1")
    rows = [line for line in results.splitlines() if line.startswith(("| freecad (", "| ocp ("))]
    assert len(rows) == 2 and all(row.count("**") == 8 for row in rows)  # four ratios a row
    assert "| probe, in the engine's Python |" in results
