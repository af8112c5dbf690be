"""What the job's keeper costs, against the start it replaced, paired in one run.

The keeper (``cadscope/freecad_bridge/_contain.py``) stands between the runner
and the engine for the whole job: this interpreter (``-I -S``) that marks
itself a child subreaper, sets the limits, forks and execs the engine, samples
its peak address space and, at the end, kills and reaps what the job left. It
replaced ``setpriv --pdeathsig KILL -- ARGV`` with ``RLIMIT_AS``/``RLIMIT_CPU``
set by ``prlimit()`` after the spawn. Each round runs the same command both
ways, in alternating order:

- ``keeper``: as the runner starts a CAD process now (``_keeper_argv``, with
  the default limits and its status pipe read to its end);
- ``setpriv``: as the runner started it before.

for ``true`` (the start alone) and each engine's standard job (the plate of
``cadscope.workers._workload``; the probe is a no-op without a telemetry
pipe). Figures: the paired differences, keeper minus setpriv, in wall time
and in CPU time (the process and everything it reaped), medians with 95 %
bootstrap intervals, and the CPU difference over the job's own CPU time.

    python bench/containment_cost.py [--runs 30] [--write FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import bootstrap, publish

from cadscope.freecad_bridge import RunLimits, build_env, discover_engines
from cadscope.freecad_bridge._engines import _engine_home
from cadscope.freecad_bridge._runner import _keeper_argv
from cadscope.freecad_bridge._schema import material_library_path
from cadscope.workers._workload import PLATE

LIMITS = RunLimits(timeout_s=300, memory_bytes=2 << 30)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def keeper(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    status_r, status_w = os.pipe()
    wall, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.Popen(
        _keeper_argv(argv, LIMITS, status_w, env),
        env=env,
        pass_fds=(status_w,),
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(status_w)
    while os.read(status_r, 4096):
        pass
    os.close(status_r)
    if proc.wait() != 0:
        raise RuntimeError(f"keeper run failed: {proc.returncode}")
    return time.perf_counter() - wall, _children_cpu() - cpu


def setpriv(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.Popen(
        [shutil.which("setpriv") or "setpriv", "--pdeathsig", "KILL", "--", *argv],
        env=env,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert LIMITS.memory_bytes is not None
    resource.prlimit(proc.pid, resource.RLIMIT_AS, (LIMITS.memory_bytes, LIMITS.memory_bytes))
    if proc.wait() != 0:
        raise RuntimeError(f"setpriv run failed: {proc.returncode}")
    return time.perf_counter() - wall, _children_cpu() - cpu


def compare(argv: list[str], env: dict[str, str], runs: int) -> dict[str, list[float]]:
    keeper(argv, env), setpriv(argv, env)  # warm-up
    out: dict[str, list[float]] = {"wall": [], "cpu": [], "base_cpu": [], "base_wall": []}
    for i in range(runs):
        order = (keeper, setpriv) if i % 2 == 0 else (setpriv, keeper)
        measured = {start: start(argv, env) for start in order}
        (kw, kc), (sw, sc) = measured[keeper], measured[setpriv]
        out["wall"].append(kw - sw)
        out["cpu"].append(kc - sc)
        out["base_wall"].append(sw)
        out["base_cpu"].append(sc)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30, help="rounds per engine (ten times as many for `true`)")
    parser.add_argument("--write", help="append a results section to this Markdown file")
    args = parser.parse_args()
    true = shutil.which("true") or "/bin/true"
    cases: list[tuple[str, list[str], dict[str, str], int]] = [("`true`", [true], build_env(), args.runs * 10)]
    work = Path(tempfile.mkdtemp(prefix="bench-contain-"))
    try:
        for name, engine in sorted(discover_engines().items()):
            if "@" in name:
                continue  # a pool name of an engine listed under its kind too
            out = work / name
            (out / ".cadscope").mkdir(parents=True)
            job = out / ".cadscope" / "job.json"
            payload = {"job": {**PLATE, "engine": name, "job_id": "bench"}, "material_library": material_library_path()}
            job.write_text(json.dumps(payload))
            env = build_env(extra={"CADSCOPE_JOB": str(job), "CADSCOPE_OUT": str(out), "HOME": _engine_home()})
            cases.append((f"{name} ({engine.freecad_version} / {engine.occt_version}), plate job", list(engine.argv),
                          env, args.runs))  # fmt: skip
        lines = [
            f"### The job's keeper against `setpriv` ({time.strftime('%Y-%m-%d')})",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{platform.platform()}. Paired rounds, alternating which start goes first; keeper minus setpriv, "
            "median [95 % bootstrap interval].",
            "",
            "| command | rounds | setpriv: wall, CPU (median) | keeper adds, wall | keeper adds, CPU "
            "| CPU added / CPU |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for label, argv, env, runs in cases:
            measured = compare(argv, env, runs)
            wall, cpu = bootstrap(measured["wall"]), bootstrap(measured["cpu"])
            base_wall, base_cpu = statistics.median(measured["base_wall"]), statistics.median(measured["base_cpu"])
            lines.append(
                f"| {label} | {runs} | {base_wall * 1000:.1f} ms, {base_cpu * 1000:.1f} ms "
                f"| {wall[0] * 1000:+.1f} ms [{wall[1] * 1000:+.1f}, {wall[2] * 1000:+.1f}] "
                f"| {cpu[0] * 1000:+.1f} ms [{cpu[1] * 1000:+.1f}, {cpu[2] * 1000:+.1f}] "
                f"| {cpu[0] / base_cpu:+.2%} |"
            )
            print(lines[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    publish("\n" + "\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
