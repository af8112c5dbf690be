"""``cadscope run`` end to end (embedded broker and Redis) and ``cadscope trace``."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from cadscope.tracing._waterfall import read_otlp_json, render_waterfall, traces_by_job
from cadscope.workers.cli import main

DATA = Path(__file__).resolve().parent / "data"


def _cadscope(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "cadscope.workers.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def _check_run(out: Path, jobs: int, proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["jobs"]["submitted"] == jobs
    assert summary["jobs"]["succeeded"] + summary["jobs"]["failed"] == jobs
    assert summary["jobs"]["failed"] == summary["jobs"]["expected_failures"]
    assert summary["jobs"]["unexpected_successes"] == 0
    pairs = {(e["engine"], e["freecad_version"], e["occt_version"]) for e in summary["engines"]}
    assert ("freecad", "0.20.2", "7.6.3") in pairs and any(p[0] == "ocp" and p[1] == "none" for p in pairs)
    assert sum(e["jobs"] for e in summary["engines"]) == jobs
    assert summary["stages"]["occt.boolean"]["freecad"]["count"] >= 1

    with (out / "traces.jsonl").open() as lines:
        by_job = traces_by_job(read_otlp_json(lines))
    assert len(by_job) == jobs
    for job_id, spans in by_job.items():
        assert len({s.trace_id for s in spans}) == 1, job_id
        ids = {s.span_id for s in spans}
        roots = [s for s in spans if s.parent_span_id not in ids]
        assert [(r.name, r.kind) for r in roots] == [("POST /v1/jobs", 2)], job_id  # one tree from the SERVER span
        children = defaultdict(list)
        for span in spans:
            children[span.parent_span_id].append(span.name)
        names = {s.name for s in spans}
        assert "run/cadscope.run_job" in names and any(n.startswith("cad.subprocess") for n in names), job_id

    metrics = (out / "metrics.prom").read_text()
    check = subprocess.run(["promtool", "check", "metrics"], input=metrics, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert 'freecad_version="0.20.2",occt_version="7.6.3"' in metrics
    assert 'freecad_version="none",occt_version="8.0.' in metrics
    artifacts = list((out / "jobs").glob("*/*.step"))
    assert artifacts, "exported CAD files are in the output folder"


@pytest.mark.slow
def test_run_on_the_embedded_broker(tmp_path, engines):
    out = tmp_path / "out"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: "" for k in ("CELERY_BROKER_URL",)}
    proc = _cadscope("run", "--jobs", "6", "--engine", "all", "--out", str(out), env=env, cwd=cwd)
    _check_run(out, 6, proc)
    assert "embedded broker" in proc.stderr
    # The broker's files (queue, exchange tables, results) live under --out, never in the cwd.
    assert list(cwd.iterdir()) == []


@pytest.mark.slow
def test_run_over_redis_with_expected_failures(tmp_path, engines, redis_url):
    out = tmp_path / "out"
    # 8 jobs on two engines reach the deliberately failing fillet template.
    proc = _cadscope("run", "--jobs", "8", "--engine", "all", "--broker", redis_url, "--out", str(out))
    _check_run(out, 8, proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["jobs"]["expected_failures"] == 2
    assert "redis" not in proc.stderr.split("via", 1)[1].split(";")[0] or "127.0.0.1" in proc.stderr


def test_trace_renders_a_known_file(capsys):
    with (DATA / "freecad_job_trace.jsonl").open() as lines:
        spans = traces_by_job(read_otlp_json(lines))["job-5b83558b-0000"]
    out = io.StringIO()
    render_waterfall(spans, out)
    text = out.getvalue().splitlines()
    assert text[0].startswith("trace ace95b08ea4993857e14ad43e43a4e43  20 spans")
    assert text[1].startswith("cadscope.submit")
    names = [line.split()[0] for line in text[1:]]
    assert names.index("cad.subprocess") < names.index("occt.boolean")
    boolean = next(line for line in text if line.strip().startswith("occt.boolean"))
    assert "boolean.operation=cut" in boolean and "solids_count=5" in boolean and " ms " in boolean
    indent = {line.split()[0]: len(line) - len(line.lstrip()) for line in text[1:]}
    assert indent["occt.boolean"] > indent["cad.subprocess"] > indent["run/cadscope.run_job"]
    assert main(["trace", str(DATA / "freecad_job_trace.jsonl"), "--job", "job-5b83558b-0000"]) == 0
    assert "occt.feature" in capsys.readouterr().out
    assert main(["trace", str(DATA / "freecad_job_trace.jsonl"), "--job", "nope"]) == 1


def test_promtool_is_installed():
    assert shutil.which("promtool"), "CI installs Debian's prometheus package"
