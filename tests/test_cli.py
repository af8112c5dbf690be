"""``cadscope run`` end to end (embedded broker and Redis) and ``cadscope trace``."""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import psutil
import pytest

from cadscope.tracing._waterfall import read_otlp_json, render_waterfall, traces_by_job
from cadscope.workers.cli import main

from .conftest import wait_until

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
    assert not list(out.glob(".ready-*")), "the worker's ready marker is removed with the run"

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
def test_run_on_the_embedded_broker_from_a_clones_parent_folder_and_stopped_by_sigterm(tmp_path, engines):
    """The installed ``cadscope`` command, run from a folder holding a clone named ``cadscope``
    (the editable install's own, here a link to it), with --keep-serving, then stopped by
    SIGTERM as a service manager would: the API answers (no clone shadows the package),
    SIGTERM stops the worker and the API and writes the summary, as Ctrl-C does."""
    out = tmp_path / "out"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "cadscope").symlink_to(Path(__file__).resolve().parent.parent, target_is_directory=True)
    command = Path(sys.executable).parent / "cadscope"
    stderr = tmp_path / "stderr.txt"
    env = {**os.environ, "CELERY_BROKER_URL": ""}
    run = subprocess.Popen(  # noqa: S603
        [str(command), "run", "--jobs", "6", "--engine", "all", "--out", str(out), "--keep-serving"],
        stdout=subprocess.PIPE, stderr=stderr.open("wb"), text=True, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: "serving:" in stderr.read_text() or run.poll() is not None, 600, interval=0.5,
                   what="the workload done and the run serving")  # fmt: skip
        assert run.poll() is None, stderr.read_text()[-3000:]
        children = psutil.Process(run.pid).children(recursive=True)
        assert len(children) >= 2  # the worker (and its pool) and the API
        assert not (out / "summary.json").exists()
        run.send_signal(signal.SIGTERM)
        stdout, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], [p.pid for p in alive]
    proc = subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr.read_text())
    _check_run(out, 6, proc)
    assert "embedded broker" in proc.stderr and "Traceback" not in proc.stderr
    assert "Internal Server Error" not in proc.stderr
    # The broker's files (queue, exchange tables, results) live under --out, never in the cwd.
    assert [p.name for p in cwd.iterdir()] == ["cadscope"]


@pytest.mark.slow
def test_run_ends_at_once_when_its_worker_dies(tmp_path, engines):
    """The worker killed outright in the middle of a run on the embedded broker: the run does
    not wait out its --timeout; the jobs left are lost, named with the worker's exit, in the
    results; the command says why in one line, exits 1, and leaves none of the dead worker's
    pool processes or engines running."""
    out = tmp_path / "out"
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as err:
        run = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "cadscope.workers.cli", "run", "--jobs", "20", "--engine", "freecad",
             "--out", str(out), "--timeout", "900"],
            stdout=subprocess.PIPE, stderr=err, text=True, stdin=subprocess.DEVNULL,
            env={**os.environ, "CELERY_BROKER_URL": "", "CADSCOPE_WARM": "0"},
        )  # fmt: skip
    descendants: list[psutil.Process] = []
    try:
        wait_until(lambda: re.search(r"\] [1-9][0-9]*/20 ", stderr.read_text()) or run.poll() is not None, 300,
                   interval=0.2, what="the first jobs done")  # fmt: skip
        assert run.poll() is None, stderr.read_text()[-3000:]
        descendants = psutil.Process(run.pid).children(recursive=True)
        worker = next(p for p in psutil.Process(run.pid).children() if "celery" in p.cmdline())
        worker.send_signal(signal.SIGKILL)
        run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    _gone, alive = psutil.wait_procs([p for p in descendants if p.pid != worker.pid], timeout=30)
    for process in alive:
        process.kill()
    assert alive == [], [(p.pid, p.cmdline()) for p in alive]
    text = stderr.read_text()
    assert run.returncode == 1, text[-3000:]
    assert "cadscope run: the worker exited with status -9 before the workload was done" in text
    assert "Traceback" not in text
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    lost = [r for r in results if r["outcome"] == "lost"]
    assert len(results) == 20 and lost, [r["outcome"] for r in results]
    assert all("the worker exited with status -9" in r["error_message"] for r in lost)


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


# -- a new user's mistakes: one clear line and a non-zero exit, never a traceback ----------------


def _one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _in_process(capsys, monkeypatch, *args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """``cadscope ARGS`` in this process, as a finished process: for mistakes refused before
    anything starts (a subprocess each costs seconds of interpreter and Celery start-up)."""
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_mistakes_are_one_clear_line_and_a_non_zero_exit(tmp_path, capsys, monkeypatch):
    not_json = tmp_path / "notes.txt"
    not_json.write_text("these are notes\n")
    other_json = tmp_path / "other.json"
    other_json.write_text("[1, 2, 3]\n")

    def cadscope(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return _in_process(capsys, monkeypatch, *args, env=env)  # type: ignore[no-any-return]

    _one_line_error(cadscope("trace", str(tmp_path / "missing.jsonl")), "no such file", "missing.jsonl")
    _one_line_error(cadscope("trace", str(tmp_path)), "is a folder")
    _one_line_error(cadscope("trace", str(not_json)), "notes.txt", "not JSON")
    _one_line_error(cadscope("trace", str(other_json)), "not OTLP/JSON")
    # `api` and `worker` in processes of their own: a mistake that slipped through would start a
    # server, or replace this process with a worker.
    # Side by side: each spends its time starting an interpreter.
    no_token = {"CADSCOPE_API_TOKEN": "", "CADSCOPE_API_TOKEN_FILE": "", "CADSCOPE_API_ALLOW_ANONYMOUS": ""}
    bad = {"CELERY_BROKER_URL": "ftp://broker:21"}
    cases = [
        (("api", "--port", "1"), no_token, ("CADSCOPE_API_TOKEN",)),
        (("api",), {"CADSCOPE_API_TOKEN_FILE": str(tmp_path / "nope")}, ("nope",)),
        (("api",), {**bad, "CADSCOPE_API_TOKEN": "t"}, ("unknown broker scheme",)),
        (("worker",), bad, ("unknown broker scheme",)),
    ]
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        done = [pool.submit(_cadscope, *args, env=env, timeout=120) for args, env, _ in cases]
    for future, (_, _, needles) in zip(done, cases, strict=True):
        _one_line_error(future.result(), *needles)
    _one_line_error(cadscope("run", "--broker", "ftp://broker:21", "--out", str(tmp_path / "o")),
                    "unknown broker scheme", "ftp://broker:21")  # fmt: skip
    _one_line_error(cadscope("run", "--broker", "kafka://broker:9092", "--out", str(tmp_path / "o")),
                    "kafka://broker:9092")  # fmt: skip
    for flag, value in (("--jobs", "-3"), ("--jobs", "0"), ("--concurrency", "-1"), ("--timeout", "-5")):
        _one_line_error(cadscope("run", flag, value, "--out", str(tmp_path / "o")), flag)
    assert not (tmp_path / "o").exists()  # refused before anything was started or written


def test_an_unreachable_broker_is_named_within_seconds_without_its_password(tmp_path):
    """Nothing listens on port 1: cadscope run says so at once, rather than after Celery's
    minutes of retries and a dump of its log."""
    line = _one_line_error(
        _cadscope("run", "--broker", "redis://user:hunter2@127.0.0.1:1/0", "--out", str(tmp_path / "o"), timeout=30),
        "cannot reach the broker", "127.0.0.1:1",
    )  # fmt: skip
    assert "hunter2" not in line
    assert not (tmp_path / "o").exists()


def test_trace_into_a_closed_pipe_exits_quietly():
    """`cadscope trace FILE | head -1`: SIGPIPE ends the listing quietly, as for cat (the
    default action is restored for `trace` only; a server must outlive a closed socket)."""
    big = "\n".join([(DATA / "freecad_job_trace.jsonl").read_text().strip()] * 2000)
    reader = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "cadscope.workers.cli", "trace", "/dev/stdin"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert reader.stdin is not None and reader.stdout is not None
    reader.stdin.write(big.encode())
    reader.stdin.close()
    reader.stdout.readline()
    reader.stdout.close()
    reader.wait(60)
    assert b"Traceback" not in reader.stderr.read()  # type: ignore[union-attr]


def test_version_is_the_packages():
    import cadscope

    done = subprocess.run([sys.executable, "-m", "cadscope.workers.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"cadscope {cadscope.__version__}"
