"""``cadscope doctor``: one line per check, the real engines, a real broker that answers
or does not, a token that is reported and never printed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cadscope.workers._doctor import Check, _broker
from cadscope.workers.cli import main as cli_main

from .conftest import REPO, free_port

SECRET = "doctor-test-token-3f9a"


def _doctor(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("OTEL_", "CADSCOPE_", "CELERY_", "PROMETHEUS_"))}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "cadscope.workers.cli", "doctor", *args],
        capture_output=True, text=True, timeout=timeout, env={**base, **(env or {})}, cwd=REPO,
    )  # fmt: skip


def _lines(result: subprocess.CompletedProcess[str]) -> dict[str, list[str]]:
    by_name: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        level, name, message = line.split(None, 2)
        assert level in {"ok", "warn", "fail"}, line
        by_name.setdefault(name, []).append(f"{level} {message}")
    return by_name


def test_no_engine_and_no_broker_fail_in_one_line_each(tmp_path):
    """Engines that are not there (paths that do not exist) and a port nobody listens on."""
    port = free_port()
    result = _doctor("--broker", f"redis://:hunter2@127.0.0.1:{port}/0", "--timeout", "1", env={
        "CADSCOPE_FREECADCMD": str(tmp_path / "no-freecadcmd"), "CADSCOPE_OCP_PYTHON": str(tmp_path / "no-python"),
        "CADSCOPE_API_TOKEN_FILE": str(tmp_path / "missing-token"), "CADSCOPE_DATA_DIR": str(tmp_path)})  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = _lines(result)
    assert [line.split()[0] for line in lines["engine"]] == ["warn", "warn", "fail"], lines["engine"]
    assert lines["broker"][0].startswith(f"fail redis://:***@127.0.0.1:{port}/0 did not answer within 1 s")
    assert "hunter2" not in result.stdout
    assert lines["token"] == [f"fail CADSCOPE_API_TOKEN_FILE {tmp_path / 'missing-token'}: No such file or directory"]
    assert lines["metrics"][0].startswith(f"ok multiprocess dir {tmp_path / 'metrics'} (under CADSCOPE_DATA_DIR)")
    assert lines["traces"][0].startswith("warn spans are made but go nowhere")


def test_a_bad_timeout_or_broker_url_is_one_line(capsys):
    assert cli_main(["doctor", "--timeout", "0"]) == 2
    assert capsys.readouterr().err == "cadscope doctor: --timeout must be above 0\n"
    assert _broker("nosuch://x", 1.0) == Check("fail", "broker", "nosuch://x: not a broker URL cadscope can use "
                                                                 "(KeyError)")  # fmt: skip


@pytest.mark.slow
def test_real_engines_a_broker_that_answers_a_token_never_printed(redis_url, engines, tmp_path):
    env = {"CADSCOPE_API_TOKEN": SECRET, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
           "CADSCOPE_METRICS_PORT": "9999", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
           "CADSCOPE_TRACES_FILE": str(tmp_path / "traces.jsonl")}  # fmt: skip
    result = _doctor("--broker", redis_url, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert SECRET not in result.stdout + result.stderr
    lines = _lines(result)
    freecad, ocp = engines["freecad"], engines["ocp"]
    assert lines["engine"] == [
        f"ok {freecad.pool}: FreeCAD {freecad.freecad_version}, OCCT {freecad.occt_version} ({freecad.argv[0]})",
        f"ok {ocp.pool}: OCCT {ocp.occt_version} ({ocp.argv[0]})",
    ]
    assert lines["broker"] == [f"ok {redis_url} answers"]
    assert lines["token"] == ["ok API token set (CADSCOPE_API_TOKEN)"]
    assert lines["metrics"] == [f"ok multiprocess dir {tmp_path / 'prom'} (PROMETHEUS_MULTIPROC_DIR), "
                                "served at http://127.0.0.1:9999/metrics"]  # fmt: skip
    assert lines["traces"] == [f"ok OTLP grpc to http://127.0.0.1:4317; OTLP/JSON lines in {tmp_path / 'traces.jsonl'}"
                               " (CADSCOPE_TRACES_FILE)"]  # fmt: skip


@pytest.mark.slow
def test_a_broker_that_hangs_fails_within_the_timeout(redis_server):
    """A stopped redis-server (SIGSTOP): the connection is accepted and never answered."""
    redis_server.pause()
    result = _doctor("--broker", redis_server.url, "--timeout", "1",
                     env={"CADSCOPE_FREECADCMD": "/nonexistent", "CADSCOPE_OCP_PYTHON": "/nonexistent"},
                     timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert _lines(result)["broker"][0].startswith(f"fail {redis_server.url} did not answer within 1 s")
