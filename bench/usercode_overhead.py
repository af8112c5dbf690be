"""What auto-instrumentation costs the user's own CAD code, in FreeCAD's Python and in OCP's.

- **per call**: a cheap C++ method (FreeCAD's ``Shape.isNull``, OCP's
  ``gp_Pnt.X``) called bare and through the wrapper cadscope puts on FreeCAD's
  and OCP's entry points, inside a process started by the runner with its
  telemetry pipe: past the span budget (an observation, the steady state of a
  loop), as a span, and as a span recording peak memory (what booleans,
  features, meshing and exports do). Best of 5 × N calls; the figure is
  (wrapped - bare) per call. Target: at most 5 µs for the steady state.
- **a script**: a plain script (no cadscope import) making 10,000 wrapped
  calls, run through the runner with auto-instrumentation and without it,
  interleaved: FreeCAD extrudes a face 10,000 times (``Shape.extrude``, the
  cheapest FreeCAD call wrapped, about 50 µs), OCP makes 10,000 prisms
  (``BRepPrimAPI_MakePrism``, about 60 µs each, after importing OCP). The
  figure is the ratio of the child's CPU time (``wait4``), median of paired
  rounds with a 95 % interval. Target: at most 1.02.
- **the same, in one process**: the mixed script's work in alternate units
  of ten calls (nine extrusions and a cut), with the instrumentation at work
  and paused (``cadscope_auto.paused()``: each wrapper calls its original at
  once), after the span budget is spent: each unit's two sides, run one
  after the other, make a pair, and the figure is the median of the pairs'
  ratios, with its 95 % interval. This is what the
  instrumentation does per call (timing, attributes, the observation); a
  paused wrapper's own cost is in the per-call figure. Where the machine is
  shared this is the figure to read: the two processes' CPU times above move
  with their neighbours. (Switching between ``instrument()`` and
  ``uninstrument()`` instead charges the type caches it invalidates, and the
  collector runs its allocations start, to the instrumented side.)

    python bench/usercode_overhead.py [--rounds 5] [--calls 10000] [--write FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import paired, publish

from cadscope.freecad_bridge import RunLimits, child_path, discover_engines, run
from cadscope.freecad_bridge._engines import USER_CODE_READ_BATCH_S

PER_CALL = r"""
import json, os, sys, time
import cadscope_auto
engine = sys.argv[-1] if sys.argv[-1] in ("freecad", "ocp") else os.environ["BENCH_ENGINE"]
N = int(os.environ["BENCH_N"])
if engine == "freecad":
    import Part
    target = Part.makeBox(1, 1, 1)
    bare = Part.Shape.__dict__["isNull"]
    def install(site):
        assert cadscope_auto._wrap_c_method(Part.Shape, "isNull", "bench", cadscope_auto._site_call(site)) is None
    def remove():
        label, undo = cadscope_auto._state.undo.pop()
        undo()
    call = lambda: target.isNull()
else:
    from OCP.gp import gp_Pnt
    target = gp_Pnt(1, 2, 3)
    bare = gp_Pnt.X
    def install(site):
        gp_Pnt.X = cadscope_auto._function_wrapper(bare, site)
    def remove():
        gp_Pnt.X = bare
    call = lambda: target.X()

def best(fn):
    times = []
    for _ in range(7):
        start = time.process_time_ns()
        for _ in range(N):
            fn()
        times.append((time.process_time_ns() - start) / N / 1000)
    return min(times)

# Spans past the budget are not what a loop makes: the runner reads its pipe in
# batches, and so many events would wait on a full pipe. Here they go to a pipe
# of their own, drained by another process as fast as it fills.
import fcntl, subprocess
read_end, write_end = os.pipe()
fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, 1 << 20)
drain = subprocess.Popen(["cat"], stdin=read_end, stdout=subprocess.DEVNULL)
os.close(read_end)
cadscope_auto._probe._fd = write_end
results = {"bare": best(call)}
for mode in ("observation", "span", "span+memory"):
    site = cadscope_auto._Site("occt.feature", lambda a, k: {"cad.feature": "bench"},
                               memory=(lambda attrs: "bench") if mode == "span+memory" else None)
    install(site)
    if mode == "observation":
        cadscope_auto._state.per_name["occt.feature"] = cadscope_auto.SPANS_PER_OPERATION
        results[mode] = best(call)
    else:
        cadscope_auto.SPANS_PER_OPERATION = 10**9
        cadscope_auto.MAX_SPANS = 10**9
        results[mode] = best(call)
        cadscope_auto.SPANS_PER_OPERATION = 100
        cadscope_auto._state.per_name["occt.feature"] = 0
    remove()
cadscope_auto._probe.flush()
os.close(write_end)
cadscope_auto._probe._fd = None
drain.wait()
with open(os.environ["BENCH_OUT"], "w") as out:
    json.dump(results, out)
"""

# A part built from many small pieces: per ten wrapped calls, nine extrusions
# (about 50 µs each) and one cut (a few ms).
FREECAD_SCRIPT = """
import FreeCAD, Part
face = Part.makePlane(10, 10)
block = Part.makeBox(10, 10, 10)
for i in range({calls}):
    if i % 10 == 9:
        block.cut(Part.makeCylinder(1 + i % 3, 20, FreeCAD.Vector(5, 5, -5)))
    else:
        face.extrude(FreeCAD.Vector(0, 0, 1 + i % 7))
"""

OCP_SCRIPT = """
from OCP.BRepAlgoAPI import BRepAlgoAPI_Cut
from OCP.BRepBuilderAPI import BRepBuilderAPI_MakeFace
from OCP.BRepPrimAPI import BRepPrimAPI_MakeBox, BRepPrimAPI_MakeCylinder, BRepPrimAPI_MakePrism
from OCP.gp import gp_Ax2, gp_Dir, gp_Pln, gp_Pnt, gp_Vec
face = BRepBuilderAPI_MakeFace(gp_Pln(), 0, 10, 0, 10).Face()
block = BRepPrimAPI_MakeBox(10, 10, 10).Shape()
for i in range({calls}):
    if i % 10 == 9:
        tool = BRepPrimAPI_MakeCylinder(gp_Ax2(gp_Pnt(5, 5, -5), gp_Dir(0, 0, 1)), 1 + i % 3, 20).Shape()
        BRepAlgoAPI_Cut(block, tool).Shape()
    else:
        BRepPrimAPI_MakePrism(face, gp_Vec(0, 0, 1 + i % 7))
"""

# The same work in one process, in alternate units of ten calls (nine
# extrusions and a cut) with the instrumentation at work and paused (the
# wrappers then call the originals at once): both sides share the same moments
# of a busy machine. What a paused wrapper still costs (its frame, the method
# lookup) is in the per-call figure.
INTERLEAVED = r"""
import json, os, sys, time
import cadscope_auto
engine, units = sys.argv[-2], int(sys.argv[-1])
if engine == "freecad":
    import FreeCAD, Part
    face, block = Part.makePlane(10, 10), Part.makeBox(10, 10, 10)
    def unit(k):
        for i in range(9):
            face.extrude(FreeCAD.Vector(0, 0, 1 + i % 7))
        block.cut(Part.makeCylinder(1 + k % 3, 20, FreeCAD.Vector(5, 5, -5)))
else:
    from OCP.BRepAlgoAPI import BRepAlgoAPI_Cut
    from OCP.BRepBuilderAPI import BRepBuilderAPI_MakeFace
    from OCP.BRepPrimAPI import BRepPrimAPI_MakeBox, BRepPrimAPI_MakeCylinder, BRepPrimAPI_MakePrism
    from OCP.gp import gp_Ax2, gp_Dir, gp_Pln, gp_Pnt, gp_Vec
    face = BRepBuilderAPI_MakeFace(gp_Pln(), 0, 10, 0, 10).Face()
    block = BRepPrimAPI_MakeBox(10, 10, 10).Shape()
    def unit(k):
        for i in range(9):
            BRepPrimAPI_MakePrism(face, gp_Vec(0, 0, 1 + i % 7))
        tool = BRepPrimAPI_MakeCylinder(gp_Ax2(gp_Pnt(5, 5, -5), gp_Dir(0, 0, 1)), 1 + k % 3, 20).Shape()
        BRepAlgoAPI_Cut(block, tool).Shape()
for k in range(120):  # the spans of the budget, spent first: the steady state is measured
    unit(k)
times = {"bare": [], "auto": []}
for k in range(units):
    for side in (("auto", "bare") if k % 2 else ("bare", "auto")):
        if side == "bare":
            with cadscope_auto.paused():
                start = time.thread_time_ns()
                unit(k)
                times[side].append(time.thread_time_ns() - start)
        else:
            start = time.thread_time_ns()
            unit(k)
            times[side].append(time.thread_time_ns() - start)
with open(os.environ["BENCH_OUT"], "w") as out:
    json.dump(times, out)
"""

# The worst case: only the cheapest call wrapped, ten thousand times.
FREECAD_CHEAPEST = """
import FreeCAD, Part
face = Part.makePlane(10, 10)
for i in range({calls}):
    face.extrude(FreeCAD.Vector(0, 0, 1 + i % 7))
"""

OCP_CHEAPEST = """
from OCP.BRepBuilderAPI import BRepBuilderAPI_MakeFace
from OCP.BRepPrimAPI import BRepPrimAPI_MakePrism
from OCP.gp import gp_Pln, gp_Vec
face = BRepBuilderAPI_MakeFace(gp_Pln(), 0, 10, 0, 10).Face()
for i in range({calls}):
    BRepPrimAPI_MakePrism(face, gp_Vec(0, 0, 1 + i % 7))
"""

SCRIPTS = {
    ("freecad", "mixed"): FREECAD_SCRIPT,
    ("ocp", "mixed"): OCP_SCRIPT,
    ("freecad", "cheapest"): FREECAD_CHEAPEST,
    ("ocp", "cheapest"): OCP_CHEAPEST,
}


def _argv(engine: str, script: Path) -> list[str]:
    info = discover_engines()[engine]
    return [info.argv[0], str(script)]


def _auto_env() -> dict[str, str]:
    return {"PYTHONPATH": child_path()}


def per_call(engine: str, work: Path, n: int) -> dict[str, float]:
    script = work / f"per_call_{engine}.py"
    script.write_text(PER_CALL)
    out = work / f"per_call_{engine}.json"
    env = {**_auto_env(), "BENCH_N": str(n), "BENCH_OUT": str(out), "BENCH_ENGINE": engine}
    limits = RunLimits(timeout_s=600, read_batch_s=USER_CODE_READ_BATCH_S)
    result = run(_argv(engine, script) + [engine], limits=limits, env=env, stderr_path=str(work / "stderr.log"),
                 require_manifest=False)  # fmt: skip
    if not result.ok or not out.exists():
        raise SystemExit(f"per-call benchmark failed on {engine}: {result.outcome} {result.error_message}\n"
                         f"{result.stderr_tail}")  # fmt: skip
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def script_ratio(engine: str, kind: str, work: Path, calls: int, rounds: int) -> dict[str, object]:
    script = work / f"script_{engine}_{kind}.py"
    script.write_text(SCRIPTS[(engine, kind)].format(calls=calls))
    argv = _argv(engine, script)
    cpu = {"bare": [], "auto": []}  # type: dict[str, list[float]]
    wall = {"bare": [], "auto": []}  # type: dict[str, list[float]]
    observed = []
    for index in range(rounds + 1):  # the first round warms the page cache, and is dropped
        order = ("bare", "auto") if index % 2 else ("auto", "bare")
        for side in order:
            env = _auto_env() if side == "auto" else {}
            limits = RunLimits(timeout_s=900, read_batch_s=USER_CODE_READ_BATCH_S)
            result = run(argv, limits=limits, env=env, stderr_path=str(work / "stderr.log"),
                         require_manifest=side == "auto")  # fmt: skip
            if not result.ok:
                raise SystemExit(f"{engine} {side} run failed: {result.outcome} {result.error_message}")
            if index == 0:
                continue
            cpu[side].append(result.cpu_s)
            wall[side].append(result.duration_s)
            if side == "auto":
                observed.append(result.events)
    return {
        "cpu": paired(cpu["auto"], cpu["bare"]),
        "wall": paired(wall["auto"], wall["bare"]),
        "bare_cpu_s": statistics.median(cpu["bare"]),
        "auto_cpu_s": statistics.median(cpu["auto"]),
        "events": statistics.median(observed),
    }


def interleaved(engine: str, work: Path, units: int) -> dict[str, Any]:
    script = work / f"interleaved_{engine}.py"
    script.write_text(INTERLEAVED)
    out = work / f"interleaved_{engine}.json"
    argv = _argv(engine, script) + [engine, str(units)]
    limits = RunLimits(timeout_s=1800, read_batch_s=USER_CODE_READ_BATCH_S)
    result = run(argv, limits=limits, env={**_auto_env(), "BENCH_OUT": str(out)}, stderr_path=str(work / "stderr.log"),
                 require_manifest=False)  # fmt: skip
    if not result.ok or not out.exists():
        raise SystemExit(f"interleaved benchmark failed on {engine}: {result.outcome} {result.error_message}\n"
                         f"{result.stderr_tail}")  # fmt: skip
    times = json.loads(out.read_text())
    # Each unit's two sides ran the same work one after the other: their ratio,
    # median over the units, leaves out what the machine did to both.
    ratio = paired(times["auto"], times["bare"])
    bare = statistics.median(times["bare"])
    return {"bare_ms": bare / 1e6, "ratio": ratio, "per_call_us": (ratio[0] - 1) * bare / 10 / 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--n", type=int, default=20_000, help="calls per timing loop of the per-call figure")
    parser.add_argument("--engines", default="freecad,ocp")
    parser.add_argument("--write")
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e in discover_engines()]
    if not engines:
        raise SystemExit("no engine found (freecadcmd, or OCP in this Python)")
    lines = [
        f"\n### Auto-instrumentation of user code ({time.strftime('%Y-%m-%d')})\n",
        f"\nMachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, load "
        f"average {os.getloadavg()[0]:.1f} at the start (a shared machine). "
        f"`python bench/usercode_overhead.py --rounds {args.rounds} --calls {args.calls}`.\n",
        "\n| engine | bare call | + observation (past the budget) | + span | + span with peak memory |\n",
        "| --- | --- | --- | --- | --- |\n",
    ]
    with tempfile.TemporaryDirectory(prefix="cadscope-bench-") as tmp:
        work = Path(tmp)
        ratios = []
        for engine in engines:
            costs = per_call(engine, work, args.n)
            bare = costs["bare"]
            cells = " | ".join(f"+{costs[m] - bare:.2f} µs" for m in ("observation", "span", "span+memory"))
            lines.append(f"| {engine} | {bare:.2f} µs | {cells} |\n")
        units = max(args.calls // 10, 1)
        lines.append(
            f"\n| engine, one process, {units:,} units of 10 calls each side, past the span budget | unit, paused "
            "(median) | at work ÷ paused, paired [95 %] | added per call |\n| --- | --- | --- | --- |\n"
        )
        for engine in engines:
            r = interleaved(engine, work, units)
            ratio = r["ratio"]
            lines.append(
                f"| {engine}, 9 extrusions + 1 cut | {r['bare_ms']:.3f} ms | "
                f"**{ratio[0]:.4f}** [{ratio[1]:.4f}–{ratio[2]:.4f}] | {r['per_call_us']:+.2f} µs |\n"
            )
        lines.append(
            f"\n| engine, script of {args.calls:,} wrapped calls | bare CPU | instrumented CPU | "
            "CPU ratio [95 %] | wall ratio [95 %] | telemetry lines |\n| --- | --- | --- | --- | --- | --- |\n"
        )
        for kind in ("mixed", "cheapest"):
            for engine in engines:
                r = script_ratio(engine, kind, work, args.calls, args.rounds)
                cpu, wall = r["cpu"], r["wall"]
                ratios.append(cpu[0])  # type: ignore[index]
                label = "9 extrusions + 1 cut per 10" if kind == "mixed" else "extrusions only (worst case)"
                lines.append(
                    f"| {engine}, {label} | {r['bare_cpu_s']:.3f} s | {r['auto_cpu_s']:.3f} s | "
                    f"**{cpu[0]:.4f}** [{cpu[1]:.4f}–{cpu[2]:.4f}] | "  # type: ignore[index]
                    f"{wall[0]:.4f} [{wall[1]:.4f}–{wall[2]:.4f}] | {r['events']:.0f} |\n"  # type: ignore[index]
                )
    publish("".join(lines), args.write)


if __name__ == "__main__":
    sys.exit(main())
