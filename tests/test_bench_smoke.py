"""The benchmark scripts run (a smoke test: no timings are asserted here)."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO


def test_scrape_churn_runs_and_compaction_keeps_the_exposition(tmp_path):
    out = tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "scrape_churn.py"), "--dead", "0,20", "--write", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # The script asserts the exposition is byte-identical before and after compaction.
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 20 |")]
    assert rows and "| 28 | 9 |" in rows[0]  # 8 live + 20 dead files, then 8 live + 1 accumulator


def test_task_cpu_runs_and_every_span_reaches_the_collector(tmp_path):
    out = tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "task_cpu.py"), "--tasks", "300", "--rounds", "1", "--write", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # The script exits non-zero when a stack's collector did not receive every span.
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stacks = [line.split(" | ")[0].lstrip("| ") for line in out.read_text().splitlines() if " µs | " in line]
    assert stacks == ["bare", "upstream", "cadscope-sdk-span", "cadscope-upstream-encoder", "cadscope"]


def test_span_cost_runs_and_the_encoders_agree(tmp_path):
    out = tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "span_cost.py"), "--n", "1000", "--write", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # The script exits non-zero when cadscope's encoder and upstream's give different bytes.
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| task span") or "OTLP encoding" in line]
    assert len(rows) == 2
