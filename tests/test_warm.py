"""Warm engines: jobs forked from a fork server per engine, with real freecadcmd and real OCP.

Every job here is a real engine process; the fork servers are the real
``child/cadscope_warm.py`` in FreeCAD's Python and in the OCP venv's Python.
Processes are checked in /proc; spans through an in-memory exporter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from cadscope.freecad_bridge import JobSpec, RunLimits, WarmPool, run, run_cad_job
from cadscope.freecad_bridge._warm import WARM_DIR_ENV
from cadscope.metrics import Catalogue, ModelObservability
from cadscope.tracing.testing import in_memory_provider
from cadscope.workers._workload import PLATE

from .conftest import REPO, normalised, wait_until

pytestmark = pytest.mark.slow


def _normalised_digest(path: Path) -> str:
    return hashlib.sha256(normalised(path)).hexdigest()


def _versions(engines: Any) -> dict[str, tuple[str, dict[str, str]]]:
    return {
        name: (info.argv[0], {"freecad_version": info.freecad_version, "occt_version": info.occt_version})
        for name, info in engines.items()
        if "@" not in name  # the default engine of each kind; "ocp@8.0.1" names the same one
    }


@pytest.fixture(scope="module")
def pool(engines):  # type: ignore[no-untyped-def]
    with WarmPool(_versions(engines)) as started:
        assert set(started.servers) == {"freecad", "ocp"}, started.unavailable
        yield started


@pytest.fixture
def warm_env(pool, monkeypatch):  # type: ignore[no-untyped-def]
    """The pool's directory as a worker's processes see it."""
    monkeypatch.setenv(WARM_DIR_ENV, pool.directory)
    monkeypatch.delenv("CADSCOPE_WARM", raising=False)
    return pool


def _job(engine: Any, out: Path, spec: dict[str, Any], **kwargs: Any) -> tuple[Any, CollectorRegistry, list[Any]]:
    registry = CollectorRegistry()
    provider, exporter = in_memory_provider()
    obs = ModelObservability(Catalogue(registry), tracer_provider=provider)
    with provider.get_tracer("test").start_as_current_span("task"):
        result = run_cad_job(
            JobSpec.model_validate(spec), out, engine=engine, observability=obs, tracer_provider=provider, **kwargs
        )
    return result, registry, list(exporter.get_finished_spans())


def _shape(spans: list[Any]) -> Counter[tuple[str, str]]:
    """The span tree as (name, parent's name) pairs, with their counts."""
    by_id = {s.context.span_id: s for s in spans}
    return Counter(
        (s.name, by_id[s.parent.span_id].name if s.parent and s.parent.span_id in by_id else "") for s in spans
    )


def _subprocess_span(spans: list[Any]) -> Any:
    return next(s for s in spans if s.name.startswith("cad.subprocess"))


# -- same results --------------------------------------------------------------------------------


@pytest.mark.parametrize("engine_name", ["freecad", "ocp"])
def test_warm_and_cold_jobs_give_the_same_artifacts_and_span_tree(engines, warm_env, tmp_path, engine_name):
    engine = engines[engine_name]
    spec = {**PLATE, "engine": engine_name}
    warm, warm_registry, warm_spans = _job(engine, tmp_path / "warm", spec)
    cold, cold_registry, cold_spans = _job(engine, tmp_path / "cold", {**spec, "cold_start": True})
    assert (warm.outcome, cold.outcome) == ("ok", "ok"), (warm.error_message, cold.error_message)
    assert (warm.run.start, cold.run.start, cold.run.cold_reason) == ("warm", "cold", None)

    # The same files: byte for byte where the engine writes deterministically
    # (STL), else once the STEP header's wall-clock stamps are set aside.
    assert [(a["name"], a["size"]) for a in warm.artifacts] == [(a["name"], a["size"]) for a in cold.artifacts]
    for a, b in zip(warm.artifacts, cold.artifacts, strict=True):
        if a["name"].endswith(".stl"):
            assert a["sha256"] == b["sha256"]
        else:
            assert _normalised_digest(tmp_path / "warm" / a["name"]) == _normalised_digest(
                tmp_path / "cold" / b["name"]
            )
    assert warm.manifest is not None and cold.manifest is not None
    assert warm.manifest["parts"] == cold.manifest["parts"]  # volumes, topology hashes

    # The same span tree; the start says how, with the fork's own time.
    assert _shape(warm_spans) == _shape(cold_spans)
    ws, cs = _subprocess_span(warm_spans), _subprocess_span(cold_spans)
    assert (ws.attributes["cad.start"], cs.attributes["cad.start"]) == ("warm", "cold")
    assert cs.attributes["cad.start.reason"] == "job_option"
    assert 0 < ws.attributes["cad.warm.fork_s"] < 5
    assert ws.attributes["cad.warm.server_pid"] == warm_env.server_pid(engine_name)
    assert ws.attributes["process.pid"] == warm.run.pid != warm_env.server_pid(engine_name)

    v = {"freecad_version": engine.freecad_version, "occt_version": engine.occt_version}
    assert warm_registry.get_sample_value("cadscope_warm_hits_total", {"engine": engine_name, **v}) == 1
    assert (
        cold_registry.get_sample_value(
            "cadscope_cold_starts_total", {"engine": engine_name, "reason": "job_option", **v}
        )
        == 1
    )
    assert warm_registry.get_sample_value("cadscope_warm_process_rss_bytes", {"engine": engine_name, **v}) > 10 << 20


def test_the_switch_and_the_fallback_are_counted_with_their_reason(engines, warm_env, tmp_path, monkeypatch):
    engine = engines["ocp"]
    spec = {**PLATE, "engine": "ocp", "exports": [{"format": "brep", "of": "plate", "name": "plate"}]}
    v = {"engine": "ocp", "freecad_version": engine.freecad_version, "occt_version": engine.occt_version}
    monkeypatch.setenv("CADSCOPE_WARM", "0")
    result, registry, spans = _job(engine, tmp_path / "off", spec)
    assert (result.outcome, result.run.start) == ("ok", "cold")
    assert registry.get_sample_value("cadscope_cold_starts_total", {**v, "reason": "disabled"}) == 1
    assert _subprocess_span(spans).attributes["cad.start.reason"] == "disabled"
    monkeypatch.delenv("CADSCOPE_WARM")
    # A directory where no fork server listens: cold at once, said so.
    monkeypatch.setenv(WARM_DIR_ENV, str(tmp_path))
    result, registry, spans = _job(engine, tmp_path / "none", spec)
    assert (result.outcome, result.run.start, result.run.cold_reason) == ("ok", "cold", "no_server")
    assert registry.get_sample_value("cadscope_cold_starts_total", {**v, "reason": "no_server"}) == 1
    assert _subprocess_span(spans).attributes["cad.start.reason"] == "no_server"


# -- isolation -----------------------------------------------------------------------------------

_PROBE_SCRIPT = """
import json, os, sys, time
sys.path.insert(0, {child!r})
from cadscope_probe import Probe
here, name, other = {here!r}, sys.argv[1] if len(sys.argv) > 1 else {name!r}, {other!r}
open(os.path.join(here, name + ".ready"), "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(os.path.join(here, other + ".ready")) and time.monotonic() < deadline:
    time.sleep(0.01)
probe = Probe.from_env()
with probe.span("job.work", {{"job.name": name}}):
    print(json.dumps({{"traceparent": os.environ.get("TRACEPARENT"), "pid": os.getpid()}}))
probe.result({{"name": name}})
"""


@pytest.mark.parametrize("engine_name", ["freecad", "ocp"])
def test_two_concurrent_warm_jobs_keep_their_own_trace(engines, pool, tmp_path, engine_name):
    """Each job waits until the other has started, so both run at once in two forks of one server."""
    from cadscope.freecad_bridge import child_path

    provider, exporter = in_memory_provider()
    tracer = provider.get_tracer("test")
    results: dict[str, Any] = {}
    parents: dict[str, Any] = {}

    def one(name: str, other: str) -> None:
        script = tmp_path / f"{name}.py"
        script.write_text(_PROBE_SCRIPT.format(child=child_path(), here=str(tmp_path), name=name, other=other))
        with tracer.start_as_current_span(f"task {name}") as parent:
            parents[name] = parent.get_span_context()
            results[name] = run(
                [engines[engine_name].argv[0], str(script)],
                warm=pool.socket_path(engine_name),
                run_name=name,
                tracer_provider=provider,
                stdout_path=str(tmp_path / f"{name}.out"),
                stderr_path=str(tmp_path / f"{name}.err"),
                limits=RunLimits(timeout_s=90),
            )

    threads = [threading.Thread(target=one, args=pair) for pair in (("a", "b"), ("b", "a"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    spans = exporter.get_finished_spans()
    for name in ("a", "b"):
        result = results[name]
        assert (result.outcome, result.start) == ("ok", "warm"), (result.error_message, result.stderr_tail)
        assert result.manifest == {"name": name}
        trace_id = parents[name].trace_id
        printed = json.loads((tmp_path / f"{name}.out").read_text().strip().splitlines()[-1])
        assert printed["traceparent"].split("-")[1] == f"{trace_id:032x}"
        (work,) = [s for s in spans if s.name == "job.work" and s.attributes["job.name"] == name]
        assert work.context.trace_id == trace_id
        subprocess_span = next(s for s in spans if s.context.span_id == work.parent.span_id)
        assert subprocess_span.parent.span_id == parents[name].span_id
    assert results["a"].warm["server_pid"] == results["b"].warm["server_pid"]
    assert results["a"].pid != results["b"].pid


_LEAK = {
    "freecad": """
import os, sys, FreeCAD, Part
Part.cadscope_leak = 1
sys.modules["cadscope_leak_module"] = sys
FreeCAD.newDocument("Leaked")
os.environ["CADSCOPE_LEAK"] = "1"
os.chdir("/")
""",
    "ocp": """
import os, sys, OCP.gp
OCP.gp.cadscope_leak = 1
sys.modules["cadscope_leak_module"] = sys
os.environ["CADSCOPE_LEAK"] = "1"
os.chdir("/")
""",
}
_LOOK = """
import json, os, sys
{engine_import}
print(json.dumps({{"leak": hasattr({module}, "cadscope_leak"), "module": "cadscope_leak_module" in sys.modules,
    "env": os.environ.get("CADSCOPE_LEAK"), "cwd": os.getcwd(), "documents": {documents}}}))
"""


@pytest.mark.parametrize("engine_name", ["freecad", "ocp"])
def test_a_job_that_changes_global_state_leaves_the_next_unaffected(engines, pool, tmp_path, engine_name):
    exe = engines[engine_name].argv[0]
    leak, look = tmp_path / "leak.py", tmp_path / "look.py"
    leak.write_text(_LEAK[engine_name])
    if engine_name == "freecad":
        look.write_text(_LOOK.format(engine_import="import FreeCAD, Part", module="Part",
                                     documents="sorted(FreeCAD.listDocuments())"))  # fmt: skip
    else:
        look.write_text(_LOOK.format(engine_import="import OCP.gp", module="OCP.gp", documents="[]"))
    common = {"warm": pool.socket_path(engine_name), "require_manifest": False, "cwd": str(tmp_path)}
    first = run([exe, str(leak)], run_name="leak", **common)
    second = run([exe, str(look)], run_name="look", stdout_path=str(tmp_path / "look.out"), **common)
    assert (first.outcome, first.start, second.outcome, second.start) == ("ok", "warm", "ok", "warm"), (
        first.stderr_tail,
        second.stderr_tail,
    )
    assert first.warm["server_pid"] == second.warm["server_pid"]
    seen = json.loads((tmp_path / "look.out").read_text().strip().splitlines()[-1])
    assert seen == {"leak": False, "module": False, "env": None, "cwd": str(tmp_path), "documents": []}


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


_GRANDCHILD = """
import subprocess
child = subprocess.Popen(["/bin/sleep", "300"], start_new_session=True)
open({pidfile!r}, "w").write(str(child.pid))
"""


def test_timeout_crash_oom_and_a_grandchild_leave_the_next_job_unaffected(engines, warm_env, tmp_path):
    """Each failure on the warm FreeCAD engine, then a plain job: warm, from the same server, ok."""
    engine = engines["freecad"]
    server = warm_env.server_pid("freecad")
    small = {**PLATE, "engine": "freecad", "exports": [{"format": "brep", "of": "plate", "name": "plate"}]}
    limits = RunLimits(timeout_s=60, kill_grace_s=1, memory_bytes=900 << 20)
    cases = {
        "timeout": ({**small, "fault": "hang"}, dataclasses.replace(limits, timeout_s=3), "timeout"),
        "crash": ({**small, "fault": "segfault"}, limits, "crash"),
        "oom": ({**small, "fault": "memory"}, limits, "oom"),
    }
    for name, (spec, case_limits, outcome) in cases.items():
        failed, _registry, _spans = _job(engine, tmp_path / name, spec, limits=case_limits)
        assert (failed.outcome, failed.run.start) == (outcome, "warm"), (name, failed.error_message)
        assert not _alive(failed.run.pid)
        after, _registry, _spans = _job(engine, tmp_path / f"{name}-after", small, limits=limits)
        assert (after.outcome, after.run.start, after.run.warm["server_pid"]) == ("ok", "warm", server), name
        assert after.manifest is not None

    pidfile = tmp_path / "grandchild.pid"
    script = tmp_path / "grandchild.py"
    script.write_text(_GRANDCHILD.format(pidfile=str(pidfile)))
    result = run([engine.argv[0], str(script)], warm=warm_env.socket_path("freecad"), run_name="grandchild",
                 require_manifest=False, cwd=str(tmp_path))  # fmt: skip
    assert (result.outcome, result.start) == ("ok", "warm"), result.stderr_tail
    assert result.leftovers >= 1
    assert not _alive(int(pidfile.read_text()))
    after, _registry, _spans = _job(engine, tmp_path / "grandchild-after", small, limits=limits)
    assert (after.outcome, after.run.start, after.run.warm["server_pid"]) == ("ok", "warm", server)
    assert warm_env.server_pid("freecad") == server  # no job's failure touched the fork server


# -- user code -----------------------------------------------------------------------------------

_SCRIPT = """
import FreeCAD, Part
import cadscope_child as cadscope
p = cadscope.parameters()
plate = Part.makeBox(p["length"], p["width"], 4)
plate = plate.cut(Part.makeCylinder(2, 10, FreeCAD.Vector(10, p["width"] / 2, -1)))
plate.exportStep("plate.step")
cadscope.result({"volume": plate.Volume})
"""

_TEMPLATE = """
import FreeCAD, Part, Spreadsheet
doc = FreeCAD.newDocument("bracket")
sheet = doc.addObject("Spreadsheet::Sheet", "Params")
sheet.set("B1", "40"); sheet.setAlias("B1", "Length")
plate = doc.addObject("Part::Box", "Plate")
plate.setExpression("Length", "Params.Length")
hole = doc.addObject("Part::Cylinder", "Hole")
hole.Radius, hole.Height = 3, 50
hole.Placement.Base.z = -10
bracket = doc.addObject("Part::Cut", "Bracket")
bracket.Base, bracket.Tool = plate, hole
doc.recompute()
doc.saveAs(%r)
"""


def test_script_and_template_jobs_run_warm_with_the_cold_spans(engines, warm_env, tmp_path):
    engine = engines["freecad"]
    script = tmp_path / "plate.py"
    script.write_text(_SCRIPT)
    digest = hashlib.sha256(_SCRIPT.encode()).hexdigest()
    spec = {"name": "plate", "engine": "freecad", "parameters": {"length": 40, "width": 20},
            "script": {"uri": "store://scripts/plate.py", "sha256": digest},
            "outputs": [{"name": "plate", "format": "step"}]}  # fmt: skip
    runs = {}
    for start in ("warm", "cold"):
        runs[start] = _job(engine, tmp_path / f"script-{start}", {**spec, "cold_start": start == "cold"},
                           input_path=script)  # fmt: skip
    (warm, _r, warm_spans), (cold, _c, cold_spans) = runs["warm"], runs["cold"]
    assert (warm.outcome, warm.run.start, cold.outcome, cold.run.start) == ("ok", "warm", "ok", "cold"), (
        warm.error_message,
        warm.run.stderr_tail,
    )
    assert warm.manifest["result"]["volume"] == pytest.approx(40 * 20 * 4 - math.pi * 4 * 4, rel=1e-6)
    assert _shape(warm_spans) == _shape(cold_spans)
    assert any(s.name == "occt.boolean" for s in warm_spans)  # the user's Part.cut, auto-instrumented

    template = tmp_path / "bracket.FCStd"
    subprocess.run([engine.argv[0], "-c", _TEMPLATE % str(template)], check=True, capture_output=True, timeout=120)
    digest = hashlib.sha256(template.read_bytes()).hexdigest()
    spec = {"name": "bracket", "template": {"uri": "store://templates/bracket.FCStd", "sha256": digest},
            "parameters": {"Params.Length": 60},
            "exports": [{"format": "step", "of": "Bracket", "name": "bracket"}]}  # fmt: skip
    warm, _r, warm_spans = _job(engine, tmp_path / "template-warm", spec, input_path=template)
    cold, _c, cold_spans = _job(engine, tmp_path / "template-cold", {**spec, "cold_start": True}, input_path=template)
    assert (warm.outcome, warm.run.start, cold.outcome) == ("ok", "warm", "ok"), (
        warm.error_message,
        cold.error_message,
    )
    assert warm.manifest["parts"] == cold.manifest["parts"]
    assert _shape(warm_spans) == _shape(cold_spans)


# -- recycling -----------------------------------------------------------------------------------


def _brep_job(engine: Any, out: Path) -> Any:
    spec = {**PLATE, "engine": engine.name, "exports": [{"format": "brep", "of": "plate", "name": "plate"}]}
    result, _registry, _spans = _job(engine, out, spec)
    return result


def test_a_fork_server_is_replaced_after_n_forks_and_after_its_crash(engines, tmp_path, monkeypatch):
    registry = CollectorRegistry()
    catalogue = Catalogue(registry)
    engine = engines["ocp"]
    with WarmPool(_versions({"ocp": engine}), max_forks=2, metrics=catalogue) as small:
        monkeypatch.setenv(WARM_DIR_ENV, small.directory)
        results = [_brep_job(engine, tmp_path / f"job{i}") for i in range(3)]
        assert [(r.outcome, r.run.start) for r in results] == [("ok", "warm")] * 3
        first, third = results[0].run.warm, results[2].run.warm
        assert results[1].run.warm["server_pid"] == first["server_pid"] != third["server_pid"]
        assert (first["forks"], third["forks"]) == (1, 1)
        assert ("ocp", "max_forks") in small.recycles
        v = {"engine": "ocp", "freecad_version": "none", "occt_version": engine.occt_version}
        assert registry.get_sample_value("cadscope_warm_recycles_total", {**v, "reason": "max_forks"}) == 1
        wait_until(lambda: not _alive(first["server_pid"]), 30, what="the retired server's exit")

        # A fork server killed outright: counted, replaced, and the next job still warm.
        os.kill(third["server_pid"], signal.SIGKILL)
        wait_until(lambda: ("ocp", "crash") in small.recycles, 30, what="the crash noticed")
        wait_until(lambda: small.server_pid("ocp") not in (None, third["server_pid"]), 60, what="the successor")
        after = _brep_job(engine, tmp_path / "after-crash")
        assert (after.outcome, after.run.start) == ("ok", "warm")
        assert after.run.warm["server_pid"] != third["server_pid"]
        assert registry.get_sample_value("cadscope_warm_recycles_total", {**v, "reason": "crash"}) == 1


def _wrapped(real: Any, wrapper: Path) -> tuple[Any, Path]:
    """``real`` run through a shell script at ``wrapper`` (an engine on disk the test can change)."""
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {real.argv[0]} "$@"\n')
    wrapper.chmod(0o755)
    return dataclasses.replace(real, argv=(str(wrapper), *real.argv[1:])), wrapper


def _replace(script: Path, text: str) -> None:
    """A new executable in one rename, as a package manager installs one (never seen half written)."""
    staged = script.with_name(script.name + ".new")
    staged.write_text(text)
    staged.chmod(0o755)
    os.replace(staged, script)


def test_a_fork_server_is_replaced_when_its_engine_executable_changes(engines, tmp_path, monkeypatch):
    """The engine is a wrapper of the OCP venv's Python whose modification time the test changes,
    as a package upgrade would."""
    real = engines["ocp"]
    engine, wrapper = _wrapped(real, tmp_path / "bin" / "ocp-python")
    with WarmPool(_versions({"ocp": engine})) as pool:
        monkeypatch.setenv(WARM_DIR_ENV, pool.directory)
        before = _brep_job(engine, tmp_path / "before")
        stat = wrapper.stat()
        os.utime(wrapper, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        # The pool looks at the executable every second and replaces the server before a job comes.
        wait_until(lambda: pool.recycles, 30, what="the change noticed")
        wait_until(lambda: pool.server_pid("ocp") not in (None, before.run.warm["server_pid"]), 60,
                   what="the successor")  # fmt: skip
        after = _brep_job(engine, tmp_path / "after")
        assert [(r.outcome, r.run.start) for r in (before, after)] == [("ok", "warm")] * 2
        assert before.run.warm["server_pid"] != after.run.warm["server_pid"]
        assert pool.recycles == [("ocp", "engine_changed")]


def test_a_successor_that_cannot_start_sends_jobs_cold_at_once(engines, tmp_path, monkeypatch):
    """The engine is a wrapper of the OCP venv's Python that, once rewritten (as a broken upgrade
    would leave it), refuses to run the fork server but still runs jobs: the old server retires,
    its successor fails, and a job must not spend the successor wait on the dead server's socket;
    once the engine is mended, the pool starts a fork server again of itself."""
    real = engines["ocp"]
    engine, wrapper = _wrapped(real, tmp_path / "bin" / "ocp-python")
    with WarmPool(_versions({"ocp": engine}), retry_s=1.0) as pool:
        monkeypatch.setenv(WARM_DIR_ENV, pool.directory)
        before = _brep_job(engine, tmp_path / "before")
        assert (before.outcome, before.run.start) == ("ok", "warm")
        working = wrapper.read_text()
        _replace(wrapper, f'#!/bin/sh\ncase "$1" in *cadscope_warm.py) exit 1;; esac\nexec {real.argv[0]} "$@"\n')
        wait_until(lambda: pool.unavailable.get("ocp") == "start_failed", 60, what="the successor's failure")
        wait_until(lambda: not _alive(before.run.warm["server_pid"]), 30, what="the retired server's exit")
        assert not [p.name for p in Path(pool.directory).iterdir() if p.name.startswith("ocp-")]
        after = _brep_job(engine, tmp_path / "after")
        assert (after.outcome, after.run.start, after.run.cold_reason) == ("ok", "cold", "no_server")
        assert pool.recycles == [("ocp", "engine_changed")]

        _replace(wrapper, working)
        wait_until(lambda: pool.server_pid("ocp") is not None, 60, what="a fork server again")
        mended = _brep_job(engine, tmp_path / "mended")
        assert (mended.outcome, mended.run.start) == ("ok", "warm")
        assert "ocp" not in pool.unavailable


def test_the_pool_refuses_bad_settings():
    with pytest.raises(ValueError, match="max_forks"):
        WarmPool({}, max_forks=0)
    with pytest.raises(ValueError, match="no warm engine"):
        WarmPool({"blender": ("/bin/true", {})})


def test_no_fork_server_outlives_its_pool(engines):
    pool = WarmPool(_versions(engines)).start()
    pids = [pool.server_pid(name) for name in ("freecad", "ocp")]
    directory = pool.directory
    pool.stop()
    assert all(pid is not None and not _alive(pid) for pid in pids)
    assert not os.path.exists(directory)
    assert os.environ.get(WARM_DIR_ENV) != directory


# -- the worker ----------------------------------------------------------------------------------


def _fork_servers_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid and cmdline.startswith(b"cadscope-warm\0") and _alive(int(entry)):
                found.append(int(entry))
    return found


def test_the_worker_runs_jobs_warm_and_stops_its_fork_servers(producer, start_worker, otlp_receiver, engines):
    from .test_pipeline import SMALL, _submit, _worker_env

    worker = start_worker(env=_worker_env(otlp_receiver), concurrency=2)
    servers = _fork_servers_of(worker.proc.pid)
    assert len(servers) == 2, servers  # FreeCAD's and OCP's, children of the worker's main process
    submitted = {name: _submit(producer, {**SMALL, "engine": name}, worker.queue) for name in ("freecad", "ocp")}
    for name, (_job_id, trace_id, handle) in submitted.items():
        assert handle.get(timeout=180)["status"] == "succeeded"

        def subprocess_span(spans, trace_id=trace_id, name=name):
            return [s for s in spans if s["trace_id"] == trace_id and s["name"] == f"cad.subprocess {name}"]

        (span,) = subprocess_span(otlp_receiver.wait_for(subprocess_span, timeout=60))
        assert span["attributes"]["cad.start"] == "warm"
        assert span["attributes"]["cad.warm.server_pid"] in servers
    text = worker.scrape()
    for name in ("freecad", "ocp"):
        assert re.search(rf'^cadscope_warm_hits_total{{engine="{name}",[^}}]*}} 1\.0$', text, re.M), name
        assert re.search(rf'^cadscope_warm_process_rss_bytes{{engine="{name}",[^}}]*}} [1-9]', text, re.M), name
    assert worker.stop() == 0
    assert not [pid for pid in servers if _alive(pid)]


_RUNNER = """
import sys
from cadscope.freecad_bridge import RunLimits, run
exe, script, socket_path = sys.argv[1:4]
run([exe, script], warm=socket_path, run_name="hang", require_manifest=False, limits=RunLimits(timeout_s=300))
"""
_HANG = """
import os, subprocess, time
child = subprocess.Popen(["/bin/sleep", "300"], start_new_session=True)
open({pidfile!r}, "w").write("%d %d" % (os.getpid(), child.pid))
time.sleep(300)
"""


@pytest.mark.parametrize("engine_name", ["freecad", "ocp"])
def test_a_warm_jobs_processes_die_with_the_process_that_started_it(engines, pool, tmp_path, engine_name):
    """The process running ``run()`` (a pool process, here a Python of the test's own) is SIGKILLed
    while its warm job and the job's own child run: both die, and the fork server lives on."""
    import sys

    pidfile = tmp_path / "pids"
    script = tmp_path / "hang.py"
    script.write_text(_HANG.format(pidfile=str(pidfile)))
    runner = subprocess.Popen(  # noqa: S603
        [sys.executable, "-c", _RUNNER, engines[engine_name].argv[0], str(script), pool.socket_path(engine_name)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    try:
        wait_until(lambda: pidfile.exists() and pidfile.read_text().count(" ") == 1, 60, what="the job running")
        job, grandchild = map(int, pidfile.read_text().split())
        assert _alive(job) and _alive(grandchild)
        runner.kill()
        runner.wait(10)
        wait_until(lambda: not _alive(job) and not _alive(grandchild), 10, what="the job's processes gone")
    finally:
        runner.kill()
        runner.wait()
    assert _alive(pool.server_pid(engine_name))


_SPAN_THEN_HANG = """
import json, os, time
fd = int(os.environ["CADSCOPE_TELEMETRY_FD"])
tp = os.environ["TRACEPARENT"].split("-")
os.write(fd, (json.dumps({"t": "start", "id": "ab" * 8, "p": tp[2], "n": "occt.boolean",
                          "ts": time.time_ns(), "a": {}}) + "\\n").encode())
time.sleep(300)
"""


def test_an_exception_inside_the_runner_kills_a_warm_job_and_ends_its_spans(engines, pool, tmp_path):
    """Celery's soft time limit raised inside poll() (here by SIGALRM): the warm job's group dies,
    its open span ends as ERROR, and the fork server is untouched."""
    from opentelemetry.trace import StatusCode

    class SoftTimeLimitExceeded(Exception):
        pass

    def on_alarm(*_: object) -> None:
        raise SoftTimeLimitExceeded()

    script = tmp_path / "hang.py"
    script.write_text(_SPAN_THEN_HANG)
    provider, exporter = in_memory_provider()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(3)
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            run([engines["ocp"].argv[0], str(script)], warm=pool.socket_path("ocp"), limits=RunLimits(timeout_s=60),
                tracer_provider=provider)  # fmt: skip
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    sub = spans["cad.subprocess"]
    assert sub.status.status_code is StatusCode.ERROR and sub.attributes["error.type"].endswith("SoftTimeLimitExceeded")
    assert spans["occt.boolean"].attributes["error.type"] == "SoftTimeLimitExceeded"
    wait_until(lambda: not _alive(sub.attributes["process.pid"]), 5, what="the warm job gone")
    assert _alive(pool.server_pid("ocp"))


@pytest.mark.bench
def test_the_warm_engines_benchmark_runs(tmp_path):
    """A smoke run of ``bench/warm_engines.py`` (no timing is asserted): its tables are written."""
    import sys

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "results.md"
    proc = subprocess.run(  # noqa: S603
        [sys.executable, str(repo / "bench" / "warm_engines.py"), "--pairs", "1", "--skip", "throughput",
         "--memory-jobs", "10", "--write", str(out)],
        capture_output=True, text=True, timeout=600, cwd=repo / "bench",
        env={**os.environ, "PYTHONPATH": str(repo)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    assert "| freecad | standard (plate, STEP + STL) |" in text and "| ocp | plate, STEP only |" in text
    assert "| 10 | " in text and "growth since 10 jobs" in text


_FOREIGN = textwrap.dedent(
    """
    import os, sys
    from cadscope.freecad_bridge._warm import request_warm
    r, w = os.pipe()
    print(request_warm(sys.argv[1], ["/bin/true"], {}, "/", {}, (w, w, 1, 2), "__main__", successor_wait_s=0))
    """
)


@pytest.mark.slow
def test_only_the_owner_and_its_children_may_start_a_job(pool, tmp_path):
    """A job runs as the worker's user and can reach the fork server's socket: a process that is not
    the pool's owner nor one of its children (here a grandchild, behind a shell) is refused, so no job
    can start a keeper with limits, a session or a watched process of its own choosing."""
    script = tmp_path / "foreign.py"
    script.write_text(_FOREIGN)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shell = f'"{sys.executable}" "{script}" "{pool.socket_path("ocp")}"; true'  # sh stays the parent
    done = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "forbidden"
    child = subprocess.run([sys.executable, str(script), pool.socket_path("ocp")], capture_output=True, text=True,
                           env=env, timeout=60)  # fmt: skip
    assert child.stdout.strip().startswith("WarmStart("), child.stdout + child.stderr  # a child of the owner: served
