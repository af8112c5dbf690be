"""Containment of a job's processes and the classification of its end, with real processes only.

Every test starts real processes: Python children that escape their session,
fork, write or allocate past a limit, and the two real engines (freecadcmd and
OCP's Python). Afterwards the process table is read in /proc.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from cadscope.freecad_bridge import JobSpec, RunLimits, run, run_cad_job
from cadscope.metrics import Catalogue, ModelObservability

from .conftest import Recorder, wait_until

# A grandchild that calls setsid() and closes the telemetry pipe: nothing but
# its ancestry ties it to the job. "daemon" forks once more and lets the
# middle process exit, so the last one is an orphan of a dead parent.
ESCAPE = textwrap.dedent("""
    import os, sys, time
    mode, pid_file = sys.argv[1], sys.argv[2]
    fd = int(os.environ["CADSCOPE_TELEMETRY_FD"])
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        os.close(fd)
        if mode == "daemon" and os.fork() != 0:
            os._exit(0)
        os.write(w, str(os.getpid()).encode())
        os.close(w)
        time.sleep(300)
        os._exit(0)
    os.close(w)
    escaped = os.read(r, 32).decode()
    with open(pid_file, "w") as handle:
        handle.write(escaped)
    os.write(fd, b'{"t":"result","a":{"artifacts":[]}}\\n')
    if mode == "hang":
        time.sleep(300)
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _cad_job(engine, out, spec, limits):
    registry = CollectorRegistry()
    obs = ModelObservability(Catalogue(registry))
    result = run_cad_job(JobSpec.model_validate(spec), out, engine=engine, observability=obs, limits=limits)
    return result, registry


def _ball(engine_name: str, radius: float, **options: object) -> dict:
    return {
        "name": "ball",
        "engine": engine_name,
        "parts": [{"name": "ball", "steps": [{"kind": "sphere", "name": "s", "radius": radius}]}],
        "exports": [{"format": "stl", "of": "ball", "name": "ball"}],
        "options": options,
    }


# A heavy STL of a small ball: ~12,000 triangles written as ASCII (~3 MB).
HEAVY_STL = {"linear_deflection": 0.01, "stl_format": "ascii"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exit", "daemon", "hang"])
def test_no_process_a_job_started_outlives_the_job(tmp_path, mode):
    """After the child's normal exit (``exit``, ``daemon``) and after the timeout kill
    (``hang``), a grandchild in a session of its own is gone when run() returns:
    not dying, gone (killed and reaped)."""
    pid_file = tmp_path / "escaped.pid"
    limits = RunLimits(timeout_s=1 if mode == "hang" else 30, kill_grace_s=0.5)
    result = run([sys.executable, "-c", ESCAPE, mode, str(pid_file)], limits=limits)
    escaped = int(pid_file.read_text())
    alive = _alive(escaped)
    if alive:
        os.kill(escaped, signal.SIGKILL)
    assert not alive, f"process {escaped}, started by the job, outlived it ({mode})"
    assert result.outcome == ("timeout" if mode == "hang" else "ok"), (result.outcome, result.error_message)
    assert not _alive(result.pid)
    assert result.leftovers >= 1  # the keeper found it after the engine's exit, and says so


@pytest.mark.slow
def test_a_jobs_processes_die_with_the_process_that_started_it(tmp_path):
    """The process that called run() is SIGKILLed (Celery's hard time limit kills a
    pool process so): the engine and a grandchild that left its session die too."""
    pid_file = tmp_path / "escaped.pid"
    code = textwrap.dedent(f"""
        import sys
        from cadscope.freecad_bridge import RunLimits, run
        run([sys.executable, "-c", {ESCAPE!r}, "hang", {str(pid_file)!r}], limits=RunLimits(timeout_s=300))
    """)
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        escaped = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), what="the grandchild's pid"))
    finally:
        parent.kill()
        parent.wait()
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not _alive(escaped), timeout=5, what="the grandchild's death")
    alive = _alive(escaped)
    if alive:
        os.kill(escaped, signal.SIGKILL)
    assert not alive, "a process of the job outlived the process that ran it"


@pytest.mark.slow
def test_the_whole_backlog_is_read_once_every_writer_is_dead(tmp_path):
    """A successful child's last ~220 kB of telemetry (two thousand progress events, then
    its manifest) are still in the pipe when it exits. The runner reads 64 KiB (~590
    events) at a time and the observer takes 2 ms an event (a progress store's round
    trip): more than a second a read, four in all. The interleaving is forced: the
    child writes one event, waits until the observer has it (the runner is reading),
    writes the rest at once (the runner sets the pipe to 1 MiB) and exits, so at least
    two reads are left when the runner sees the exit. Nothing is lost, and nothing
    counts as a held pipe."""
    go = tmp_path / "go"
    code = textwrap.dedent(f"""
        import json, os, time
        fd = int(os.environ["CADSCOPE_TELEMETRY_FD"])
        def line(i):
            event = {{"t": "progress", "a": {{"kind": "step", "done": i, "pad": "x" * 40}}}}
            return (json.dumps(event) + "\\n").encode()
        os.write(fd, line(0))
        deadline = time.monotonic() + 60
        while not os.path.exists({str(go)!r}) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.write(fd, b"".join(line(i) for i in range(1, 2001)) + b'{{"t":"result","a":{{"artifacts":[]}}}}\\n')
    """)

    class SlowRecorder(Recorder):
        def progress(self, attributes):  # type: ignore[no-untyped-def]
            go.touch()
            time.sleep(0.002)
            super().progress(attributes)

    recorder = SlowRecorder()
    result = run([sys.executable, "-c", code], limits=RunLimits(timeout_s=120), observer=recorder)
    assert result.outcome == "ok", (result.outcome, result.error_type, dict(result.dropped))
    assert not result.dropped
    assert [event["done"] for event in recorder.progress_events] == list(range(2001))
    assert result.manifest == {"artifacts": []}


@pytest.mark.slow
def test_the_file_size_and_process_limits_apply_and_are_named(tmp_path):
    """RLIMIT_FSIZE stops a write at the limit; RLIMIT_NPROC stops a fork bomb. The
    kernel does not apply RLIMIT_NPROC to root, so this runner runs as ``nobody``
    (uid 65534, which runs nothing else here); the fork bomb's processes are gone
    when run() returns."""
    big = tmp_path / "big.bin"
    writer = f"open({str(big)!r}, 'wb').write(b'x' * (3 << 20))"
    result = run([sys.executable, "-c", writer], limits=RunLimits(timeout_s=30, max_file_bytes=1 << 20),
                 require_manifest=False)  # fmt: skip
    assert (result.outcome, result.error_type) == ("resource_limit", "file_size_limit"), result.error_message
    assert big.stat().st_size == 1 << 20

    if os.getuid() != 0:
        pytest.skip("needs root to run the process-limit case as another user")
    # Not under tmp_path: pytest's folders are root's alone.
    work = Path(tempfile.mkdtemp(prefix="cadscope-nobody-"))
    os.chmod(work, 0o777)
    report = work / "report.json"
    bomb = textwrap.dedent("""
        import os, time
        children = 0
        while children < 500:
            if os.fork() == 0:
                time.sleep(300)
                os._exit(0)
            children += 1
    """)
    code = textwrap.dedent(f"""
        import json, sys
        from cadscope.freecad_bridge import RunLimits, run
        r = run([sys.executable, "-c", {bomb!r}], limits=RunLimits(timeout_s=60, max_processes=20),
                require_manifest=False)
        with open({str(report)!r}, "w") as out:
            json.dump({{"outcome": r.outcome, "error_type": r.error_type, "message": r.error_message}}, out)
    """)
    setpriv = shutil.which("setpriv")
    assert setpriv, "util-linux setpriv is needed to run as another user"
    as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    python, env = _python_for(as_nobody)
    try:
        subprocess.run([*as_nobody, python, "-c", code], cwd=work, env=env, check=True, timeout=120)
        outcome = json.loads(report.read_text())
    finally:
        shutil.rmtree(work)
    assert (outcome["outcome"], outcome["error_type"]) == ("resource_limit", "process_limit"), outcome
    left = subprocess.run(["pgrep", "-u", "65534"], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the fork bomb outlived the job: {left}"


@pytest.mark.slow
@pytest.mark.parametrize("engine_name", ["freecad", "ocp"])
def test_an_export_past_the_file_size_limit_is_named(engines, tmp_path, engine_name):
    """A real engine's STL export meets RLIMIT_FSIZE: whatever the engine makes of the
    failed write (FreeCAD ignores it and delivers a manifest), the file stops at the
    limit and the job is ``resource_limit``/``file_size_limit``, naming the file."""
    limits = RunLimits(timeout_s=120, memory_bytes=2 << 30, max_file_bytes=256 << 10)
    result, registry = _cad_job(engines[engine_name], tmp_path / "out", _ball(engine_name, 20, **HEAVY_STL), limits)
    assert (result.outcome, result.error_type) == ("resource_limit", "file_size_limit"), result.error_message
    assert "ball.stl" in result.error_message
    assert (tmp_path / "out" / "ball.stl").stat().st_size == 256 << 10
    assert result.artifacts == []


def _python_for(as_user: list[str]) -> tuple[str, dict[str, str]]:
    """An interpreter the other user can run, and start again from inside (the keeper
    is started with ``sys.executable``), that imports this checkout and its venv."""
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), *site])}
    check = (
        "import subprocess, sys, cadscope.freecad_bridge; subprocess.run([sys.executable, '-c', 'pass'], check=True)"
    )
    for python in (sys.executable, "/usr/bin/python3"):
        tried = subprocess.run([*as_user, python, "-c", check], env=env, capture_output=True, timeout=60)
        if tried.returncode == 0:
            return python, env
    pytest.skip("no Python here that the other user can run with this checkout's packages")


@pytest.mark.slow
def test_a_memory_error_through_run_is_oom():
    """A Python child's MemoryError outside any probe span: a traceback on stderr, exit 1."""
    code = "b = bytearray(1 << 30)"
    result = run([sys.executable, "-c", code], limits=RunLimits(timeout_s=30, memory_bytes=256 << 20),
                 require_manifest=False)  # fmt: skip
    assert (result.outcome, result.error_type) == ("oom", "MemoryError"), (result.outcome, result.error_type)


# Sizes at which each engine, given these limits, runs out of address space
# while it meshes and writes an STL: OCP dies of SIGSEGV, FreeCAD's mesher gives
# up without an exception and the job then fails on the missing file. FreeCAD's
# mesh (~2 million triangles) is one the schema's mesh budget refuses: the
# job is built past the schema, for the runner alone to meet the limit.
MEMORY_CASES = {
    "ocp": (1000, 0.1, 700 << 20),
    "freecad": (20_000, 0.1, 250 << 20),
}


@pytest.mark.slow
@pytest.mark.parametrize("engine_name", ["ocp", "freecad"])
def test_running_into_the_memory_limit_is_oom_however_the_engine_dies(engines, tmp_path, engine_name):
    radius, deflection, memory = MEMORY_CASES[engine_name]
    spec = _ball(engine_name, radius, linear_deflection=deflection)
    stl = JobSpec.model_validate(_ball(engine_name, 1)).exports
    job = JobSpec.model_validate({**spec, "exports": [{"format": "step", "of": "ball", "name": "ball"}]})
    job = job.model_copy(update={"exports": stl})
    registry = CollectorRegistry()
    result = run_cad_job(job, tmp_path / "out", engine=engines[engine_name],
                         observability=ModelObservability(Catalogue(registry)),
                         limits=RunLimits(timeout_s=120, memory_bytes=memory))  # fmt: skip
    assert result.outcome == "oom", (result.outcome, result.error_type, result.error_message, result.run.signal)
    v = {"freecad_version": engines[engine_name].freecad_version, "occt_version": engines[engine_name].occt_version}
    labels = {"engine": engine_name, "outcome": "oom", **v}
    assert registry.get_sample_value("cadscope_subprocess_outcomes_total", labels) == 1


@contextlib.contextmanager
def _small_disk(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path``, for the test alone (root only)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("engine_name", ["freecad", "ocp"])
def test_a_full_disk_is_disk_full_naming_the_path(engines, tmp_path, engine_name):
    """The job's folder is on a 1 MiB tmpfs of the test's own. The engine's STL export
    (several MB) runs out of space; then, with the disk full, a job cannot even
    write its job file. Both are ``disk_full`` with the path and the disk in the
    message, counted, and neither raises."""
    engine = engines[engine_name]
    limits = RunLimits(timeout_s=120, memory_bytes=2 << 30)
    with _small_disk(tmp_path / "disk", "1m") as disk:
        result, registry = _cad_job(engine, disk / "job", _ball(engine_name, 20, **HEAVY_STL), limits)
        assert result.outcome == "disk_full", (result.outcome, result.error_type, result.error_message)
        assert f"{disk / 'job'}" in result.error_message and f"mounted at {disk}" in result.error_message
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as filler:
            while True:
                filler.write(b"\0" * 4096)
                filler.flush()
        result, registry = _cad_job(engine, disk / "job2", _ball(engine_name, 20, **HEAVY_STL), limits)
        assert result.outcome == "disk_full", (result.outcome, result.error_type, result.error_message)
        assert f"{disk / 'job2'}" in result.error_message
        v = {"freecad_version": engine.freecad_version, "occt_version": engine.occt_version}
        labels = {"engine": engine_name, "outcome": "disk_full", **v}
        assert registry.get_sample_value("cadscope_subprocess_outcomes_total", labels) == 1


def test_the_schema_refuses_a_mesh_export_too_large_for_the_limits():
    """The issue's job (an OCP sphere of radius 10 m, to STL) ran out of its 2 GiB and died
    of SIGSEGV: the schema refuses it now, naming the export, and takes the same sphere
    as STEP. An assembly whose instances would write more than the written budget is
    refused too, though one instance of its part is cheap to mesh."""
    with pytest.raises(ValidationError) as refused:
        JobSpec.model_validate(_ball("ocp", 10_000))
    assert "export 'ball' (stl)" in str(refused.value)
    JobSpec.model_validate({**_ball("ocp", 10_000), "exports": [{"format": "step", "of": "ball", "name": "ball"}]})
    radius = 450  # ~45,000 triangles a ball at the default 0.1 mm deflection, 100 instances
    spec = {
        **_ball("auto", radius),
        "assembly": {"name": "heap", "instances": [{"name": f"b{i}", "part": "ball"} for i in range(100)]},
        "exports": [{"format": "stl", "of": "heap", "name": "heap"}, {"format": "stl", "of": "ball", "name": "one"}],
    }
    with pytest.raises(ValidationError) as refused:
        JobSpec.model_validate(spec)
    assert "export 'heap' (stl)" in str(refused.value) and "written" in str(refused.value)
    JobSpec.model_validate({**spec, "exports": spec["exports"][1:]})


# The largest sphere the mesh budget admits on each engine (to STL, the heaviest export), at
# the default deflection both engines mesh at.
LARGEST_BALL = {"freecad": 1500, "ocp": 1500}


@pytest.mark.slow
def test_the_largest_mesh_the_schema_admits_runs_within_the_default_limits(engines, tmp_path):
    """The largest sphere the mesh budget admits, exported to STL, on both engines at
    once (two jobs in one process, each under its own keeper): both succeed, with
    room to spare under the address-space limit run_cad_job gives a job by default."""
    for engine_name, radius in LARGEST_BALL.items():
        with pytest.raises(ValidationError):
            JobSpec.model_validate(_ball(engine_name, radius * 1.01))

    def largest(engine_name: str):  # type: ignore[no-untyped-def]
        job = JobSpec.model_validate(_ball(engine_name, LARGEST_BALL[engine_name]))
        obs = ModelObservability(Catalogue(CollectorRegistry()))
        return run_cad_job(job, tmp_path / engine_name, engine=engines[engine_name], observability=obs)

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(LARGEST_BALL, pool.map(largest, LARGEST_BALL), strict=True))
    for engine_name, result in results.items():
        assert result.outcome == "ok", (engine_name, result.outcome, result.error_type, result.error_message)
        assert result.run.peak_vm_bytes < 0.75 * (2 << 30), (engine_name, result.run.peak_vm_bytes)
