"""The runner with real subprocesses: real freecadcmd, real OCP, real shell tools.

Every failure mode is classified from what really happens to the process; the
process group is checked in /proc afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry

from cadscope.freecad_bridge import DEFAULT_ENV_ALLOWLIST, JobSpec, RunLimits, run, run_cad_job
from cadscope.freecad_bridge._runner import _decode_event
from cadscope.metrics import Catalogue, ModelObservability
from cadscope.tracing.testing import in_memory_provider

from .conftest import Recorder

pytestmark = pytest.mark.slow

JOB = {
    "name": "bracket",
    "parts": [
        {
            "name": "plate",
            "material": "aluminium-6061",
            "lcs": {"top": {"position": [0, 0, 8]}},
            "steps": [
                {"kind": "box", "name": "base", "length": 60, "width": 40, "height": 8},
                {"kind": "cylinder", "name": "h1", "radius": 2.5, "height": 8, "placement": {"position": [6, 6, 0]}},
                {"kind": "cylinder", "name": "h2", "radius": 2.5, "height": 8, "placement": {"position": [54, 6, 0]}},
                {"kind": "boolean", "name": "drilled", "operation": "cut", "operands": ["base", "h1", "h2"]},
                {"kind": "fillet", "name": "rounded", "target": "drilled", "radius": 1, "edges": "vertical"},
            ],
        },
        {
            "name": "peg",
            "material": "brass-c360",
            "lcs": {"bottom": {}},
            "steps": [
                {"kind": "cylinder", "name": "c", "radius": 3, "height": 10},
                {"kind": "chamfer", "name": "ch", "target": "c", "size": 0.5, "edges": "top"},
            ],
        },
    ],
    "assembly": {
        "name": "asm",
        "instances": [
            {"name": "p", "part": "plate"},
            {"name": "k", "part": "peg", "attach": {"to": "p", "to_lcs": "top", "lcs": "bottom"}},
        ],
    },
    "exports": [
        {"format": "step", "of": "asm", "name": "asm"},
        {"format": "stl", "of": "plate", "name": "plate"},
        {"format": "brep", "of": "peg", "name": "peg"},
    ],
}
V = {
    "freecad": {"freecad_version": "0.20.2", "occt_version": "7.6.3"},
}


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(entry))
    return alive


def _group_gone(pgid: int, within: float = 1.0) -> bool:
    """SIGKILL is delivered asynchronously: allow the group a moment to finish dying."""
    deadline = time.monotonic() + within
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _run(engine, tmp_path, **update):
    registry = CollectorRegistry()
    provider, exporter = in_memory_provider()
    obs = ModelObservability(Catalogue(registry), tracer_provider=provider)
    job = JobSpec.model_validate({**JOB, **update})
    limits = RunLimits(
        timeout_s=update.get("timeout_s", 60),
        kill_grace_s=1,
        memory_bytes=(600 << 20) if engine.name == "freecad" else (1536 << 20),
    )
    with provider.get_tracer("test").start_as_current_span("task"):
        result = run_cad_job(
            job,
            tmp_path / "out",
            engine=engine,
            job_id="job-1",
            observability=obs,
            limits=limits,
            tracer_provider=provider,
        )
    return result, registry, exporter.get_finished_spans()


@pytest.mark.parametrize("engine_name", ["freecad", "ocp"])
def test_a_real_job_succeeds_with_artifacts_spans_and_metrics(engines, tmp_path, engine_name):
    engine = engines[engine_name]
    result, registry, spans = _run(engine, tmp_path)
    assert result.outcome == "ok", (result.error_message, result.run.stderr_tail)
    assert {a["name"] for a in result.artifacts} == {"asm.step", "plate.stl", "peg.brep"}
    for artifact in result.artifacts:
        assert (tmp_path / "out" / artifact["name"]).stat().st_size == artifact["size"]
    v = {"freecad_version": engine.freecad_version, "occt_version": engine.occt_version}
    get = registry.get_sample_value
    assert (
        get("occt_boolean_duration_seconds_count", {"role": "primary", "operation": "cut", "solids_range": "3-5", **v})
        == 1
    )
    assert get("occt_feature_duration_seconds_count", {"role": "primary", "feature": "fillet", **v}) == 1
    assert get("a4_solver_iterations_total", {"solver": "lcs_attachment", **v}) == 1
    assert get("material_library_access_total", {"library": "standard", "result": "miss", **v}) == 1
    assert get("material_library_access_total", {"library": "standard", "result": "hit", **v}) == 1
    assert get("cadscope_subprocess_outcomes_total", {"engine": engine_name, "outcome": "ok", **v}) == 1
    by_name = {s.name: s for s in spans}
    sub = by_name[f"cad.subprocess {engine_name}"]
    assert sub.attributes["cad.occt_version"] == engine.occt_version
    assert sub.attributes["cad.subprocess.peak_rss_bytes"] > 10 << 20
    boolean = by_name["occt.boolean"]
    stage = by_name["cad.stage generate"]
    assert boolean.parent.span_id == stage.context.span_id and stage.parent.span_id == sub.context.span_id
    assert (
        sub.start_time <= stage.start_time <= boolean.start_time <= boolean.end_time <= stage.end_time <= sub.end_time
    )
    assert len({s.context.trace_id for s in spans}) == 1


def test_both_engines_build_the_same_topology(engines, tmp_path):
    a, _, _ = _run(engines["freecad"], tmp_path / "a")
    b, _, _ = _run(engines["ocp"], tmp_path / "b")
    assert a.ok and b.ok
    for part in ("plate", "peg"):
        assert a.manifest["parts"][part]["topology_hash"] == b.manifest["parts"][part]["topology_hash"]
    assert a.manifest["assembly"]["topology_hash"] == b.manifest["assembly"]["topology_hash"]


@pytest.mark.parametrize(
    ("fault", "outcome", "restart_reason"),
    [
        ("raise", "script_error", None),
        ("segfault", "crash", "crash"),
        ("memory", "oom", "oom"),
        ("hang", "timeout", "timeout"),
        ("no_manifest", "bad_output", None),
    ],
)
def test_freecad_failures_are_classified_though_its_exit_code_lies(engines, tmp_path, fault, outcome, restart_reason):
    engine = engines["freecad"]
    result, registry, spans = _run(engine, tmp_path, fault=fault, timeout_s=3)
    assert result.outcome == outcome, (result.error_type, result.error_message)
    if fault in ("raise", "memory", "no_manifest"):
        assert result.run.exit_code == 0  # FreeCAD says "success" for all three
    assert _group_gone(result.run.pid)
    v = V["freecad"]
    assert (
        registry.get_sample_value("cadscope_subprocess_outcomes_total", {"engine": "freecad", "outcome": outcome, **v})
        == 1
    )
    if restart_reason:
        assert registry.get_sample_value("freecad_worker_restarts_total", {"reason": restart_reason, **v}) == 1
    sub = next(s for s in spans if s.name == "cad.subprocess freecad")
    assert sub.status.status_code is StatusCode.ERROR and sub.attributes["error.type"] == outcome
    if fault in ("segfault", "hang", "memory"):
        # The child's open spans were closed by the worker, with the outcome.
        injected = next(s for s in spans if s.name == "fault.inject")
        assert injected.status.status_code is StatusCode.ERROR


def test_hung_job_is_killed_as_a_group_at_its_timeout(tmp_path):
    script = tmp_path / "hang.sh"
    script.write_text("sleep 300 & sleep 300 & wait\n")
    started = time.monotonic()
    result = run(["/bin/sh", str(script)], limits=RunLimits(timeout_s=1, kill_grace_s=0.5))
    assert result.outcome == "timeout"
    assert time.monotonic() - started < 60  # killed at its timeout, not after its 300 s sleeps (however loaded)
    assert _group_gone(result.pid)


def test_a_grandchild_holding_the_pipe_cannot_keep_the_runner_waiting(tmp_path):
    # The child exits at once; its grandchild keeps the telemetry fd open.
    code = textwrap.dedent("""
        import os, sys, time
        if os.fork() == 0:
            time.sleep(300)
        fd = int(os.environ["CADSCOPE_TELEMETRY_FD"])
        os.write(fd, b'{"t":"result","a":{"artifacts":[]}}\\n')
    """)
    started = time.monotonic()
    result = run([sys.executable, "-c", code], limits=RunLimits(timeout_s=120))
    assert result.outcome == "ok"
    assert time.monotonic() - started < 60  # not kept waiting by the grandchild's 300 s, nor to the timeout
    assert _group_gone(result.pid)


def test_events_are_read_in_batches_and_the_childs_exit_ends_the_wait(tmp_path):
    # A 30 s batch window: events written apart still all arrive, and the
    # child's exit wakes the runner at once instead of at the window's end.
    code = textwrap.dedent("""
        import json, os, time
        fd = int(os.environ["CADSCOPE_TELEMETRY_FD"])
        for i in range(3):
            os.write(fd, (json.dumps({"t": "progress", "a": {"kind": "step", "done": i}}) + "\\n").encode())
            time.sleep(0.2)
        os.write(fd, b'{"t":"result","a":{"artifacts":[]}}\\n')
        time.sleep(0.2)
    """)
    recorder = Recorder()
    started = time.monotonic()
    result = run([sys.executable, "-c", code], limits=RunLimits(timeout_s=300, read_batch_s=200), observer=recorder)
    assert result.outcome == "ok"
    assert [event["done"] for event in recorder.progress_events] == [0, 1, 2]
    assert time.monotonic() - started < 60  # liveness against the 200 s window, not a speed target


def test_a_burst_larger_than_the_pipe_is_read_whole(tmp_path):
    # 4 MB of events in one go: the runner reads on while chunks come back full.
    code = textwrap.dedent("""
        import os
        fd = int(os.environ["CADSCOPE_TELEMETRY_FD"])
        line = b'{"t":"metric","n":"occt.memory","v":1,"a":{"operation":"%s"}}\\n' % (b"x" * 40)
        with os.fdopen(fd, "wb") as pipe:
            pipe.write(line * 40_000)
            pipe.write(b'{"t":"result","a":{"artifacts":[]}}\\n')
    """)
    recorder = Recorder()
    result = run([sys.executable, "-c", code], limits=RunLimits(timeout_s=120), observer=recorder)
    assert result.outcome == "ok"
    assert not result.dropped
    assert len(recorder.metrics) == 40_000
    assert result.events == 40_000 + 1


def test_secrets_in_the_workers_environment_never_reach_the_child(tmp_path, monkeypatch):
    monkeypatch.setenv("CADSCOPE_CANARY_SECRET", "canary-7f3a")
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://:hunter2@broker:6379/0")
    code = textwrap.dedent("""
        import os
        fd = int(os.environ["CADSCOPE_TELEMETRY_FD"])
        environ = open("/proc/self/environ", "rb").read()
        leaked = b"canary-7f3a" in environ or b"hunter2" in environ
        os.write(fd, ('{"t":"result","a":{"leaked":%s,"keys":%s}}\\n' % (
            "true" if leaked else "false", __import__("json").dumps(sorted(os.environ)))).encode())
    """)
    result = run([sys.executable, "-c", code], limits=RunLimits(timeout_s=30))
    assert result.outcome == "ok"
    assert result.manifest["leaked"] is False
    allowed = DEFAULT_ENV_ALLOWLIST | {"TRACEPARENT", "TRACESTATE", "BAGGAGE", "CADSCOPE_TELEMETRY_FD"}
    assert set(result.manifest["keys"]) <= allowed


@pytest.mark.parametrize(
    "line",
    [
        b'{"t":"start","id":"00f067aa0ba902b7","n":"occt.boolean","ts":1,"a":{"k":"v","n":1.5e3}}',
        b'{"t":"metric","v":NaN}', b'[1,2,{"a":null}]', b'"text"', b"123456789012345678901234567890", b"true",
        b'{"s":"\\u00e9\\ud83d\\ude00"}', b'{"a":1,"a":2}', b' \t{"a":1}\r',
    ],
)  # fmt: skip
def test_an_event_line_decodes_as_json_loads_decodes_it(line):
    assert repr(_decode_event(line)) == repr(json.loads(line))


@pytest.mark.parametrize(
    "line", [b"not json", b'{"a":1} {"b":2}', b'{"a":1}x', b'{"a":', b"", b" ", b'"\xff\xfe"', b"{'a':1}"]
)
def test_an_event_line_that_json_loads_refuses_is_refused(line):
    with pytest.raises(ValueError):
        json.loads(line)
    with pytest.raises(ValueError):
        _decode_event(line)


def test_an_event_nested_too_deep_is_refused_not_a_crash():
    with pytest.raises(RecursionError):
        _decode_event(b"[" * 100_000 + b"]" * 100_000)


def test_garbage_on_the_pipe_is_dropped_counted_and_bounded(tmp_path):
    code = textwrap.dedent("""
        import os
        fd = int(os.environ["CADSCOPE_TELEMETRY_FD"])
        w = lambda b: os.write(fd, b)
        w(b"not json\\n")
        w(b"x" * (3 << 20) + b"\\n")          # a 3 MB line
        w(b'{"t":"metric","n":"occt.memory","v":1,"a":{}}\\n' * 300)
        w(b'{"t":"whatever"}\\n')
        w(b'{"t":"result","a":{"artifacts":[]}}\\n')
    """)
    limits = RunLimits(timeout_s=30, max_line_bytes=1 << 20, max_events=100)
    result = run([sys.executable, "-c", code], limits=limits)
    assert result.outcome == "ok"  # the job's own outcome is unaffected
    assert result.dropped["invalid_json"] == 1
    assert result.dropped["line_too_long"] == 1
    # The budget of 100 lines: the bad JSON and the long line, then 98 metrics.
    assert result.dropped["too_many_events"] == 300 + 1 - (100 - 2)
    assert result.events == 1 + 1 + 300 + 1 + 1  # every line counted, dropped or not
    assert json.loads(json.dumps(result.manifest)) == {"artifacts": []}


def test_the_cad_process_dies_with_the_process_that_started_it(tmp_path):
    """A worker child killed by Celery's hard time limit must leave no CAD process."""
    pid_file = tmp_path / "child.pid"
    code = textwrap.dedent(f"""
        import sys
        from cadscope.freecad_bridge import RunLimits, run
        run([sys.executable, "-c", "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
             "time.sleep(300)"], limits=RunLimits(timeout_s=300))
    """)
    parent = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    assert _alive(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 1.0
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(child), "the CAD process outlived its worker"


def test_memory_limit_applies_to_the_engine_process(tmp_path):
    code = "import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0])"
    out = tmp_path / "out.txt"
    run(
        [sys.executable, "-c", code],
        limits=RunLimits(timeout_s=30, memory_bytes=900 << 20),
        stdout_path=str(out),
        require_manifest=False,
    )
    assert int(out.read_text()) == 900 << 20


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_an_exception_inside_the_runner_kills_the_group_and_ends_spans_with_error(tmp_path):
    """Celery's soft time limit raises inside the task, here inside poll(): the CAD
    process group must die with it and the child's open spans must end as ERROR."""
    import signal as signal_module

    class SoftTimeLimitExceeded(Exception):
        pass

    def on_alarm(*_):
        raise SoftTimeLimitExceeded()

    code = textwrap.dedent("""
        import os, time, json
        fd = int(os.environ["CADSCOPE_TELEMETRY_FD"])
        tp = os.environ["TRACEPARENT"].split("-")
        os.write(fd, (json.dumps({"t": "start", "id": "ab" * 8, "p": tp[2], "n": "occt.boolean",
                                  "ts": time.time_ns(), "a": {}}) + "\\n").encode())
        time.sleep(300)
    """)
    provider, exporter = in_memory_provider()
    previous = signal_module.signal(signal_module.SIGALRM, on_alarm)
    signal_module.alarm(2)
    started = time.monotonic()
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            run([sys.executable, "-c", code], limits=RunLimits(timeout_s=60), tracer_provider=provider)
    finally:
        signal_module.alarm(0)
        signal_module.signal(signal_module.SIGALRM, previous)
    assert time.monotonic() - started < 60  # the soft limit at 2 s, not the child's 300 s sleep
    spans = {s.name: s for s in exporter.get_finished_spans()}
    sub = spans["cad.subprocess"]
    assert sub.status.status_code is StatusCode.ERROR and sub.attributes["error.type"].endswith("SoftTimeLimitExceeded")
    assert spans["occt.boolean"].status.status_code is StatusCode.ERROR
    assert spans["occt.boolean"].attributes["error.type"] == "SoftTimeLimitExceeded"
    assert _group_gone(sub.attributes["process.pid"])
