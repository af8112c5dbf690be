"""What the instrumentation costs a CAD job, as ratios measured in one run.

1. Job overhead: the standard job on each engine, fully instrumented
   (``run_cad_job``: spans re-emitted through a batch processor, metrics,
   trace propagation, the probe writing to its pipe) vs. bare (the same engine
   script through ``subprocess.run`` with no telemetry pipe, so the probe is a
   no-op, and no spans or metrics). Runs are interleaved A/B so drift hits
   both sides alike; we report medians and the ratio of medians.
2. Probe cost: microseconds per event (a span is two events) in the child,
   in this Python and in FreeCAD's own, writing to a pipe a reader drains.

    python bench/job_overhead.py [--runs 15] [--write bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from cadscope.freecad_bridge import JobSpec, RunLimits, build_env, discover_engines, run_cad_job
from cadscope.freecad_bridge._engines import CHILD_DIR, _engine_home
from cadscope.freecad_bridge._schema import material_library_path
from cadscope.metrics import Catalogue, ModelObservability
from cadscope.tracing import PinnableIdGenerator
from cadscope.workers._workload import PLATE

PROBE_LOOP = textwrap.dedent(
    """
    import os, sys, threading, time
    sys.path.insert(0, {child!r})
    import cadscope_probe
    read_fd, write_fd = os.pipe()
    def drain():
        while os.read(read_fd, 1 << 16):
            pass
    threading.Thread(target=drain, daemon=True).start()
    probe = cadscope_probe.Probe(write_fd, "00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    n = {n}
    best = None
    for _ in range(5):
        start = time.perf_counter()
        for i in range(n):
            with probe.span("occt.boolean", {{"cad.boolean.operation": "cut", "cad.solids_count": 3}}) as s:
                s["cad.memory.peak_bytes"] = 123456789
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    print("PROBE_US_PER_EVENT", best / (2 * n) * 1e6)
    """
)


def probe_cost(python_argv: list[str], n: int = 20_000) -> float:
    script = PROBE_LOOP.format(child=str(CHILD_DIR), n=n)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(script)
    try:
        out = subprocess.run(
            [*python_argv, handle.name],
            capture_output=True,
            text=True,
            timeout=600,
            env=build_env(extra={"HOME": _engine_home()}),
        ).stdout
    finally:
        os.unlink(handle.name)
    for line in out.splitlines():
        if "PROBE_US_PER_EVENT" in line:
            return float(line.split()[-1])
    raise RuntimeError(f"probe benchmark printed nothing useful:\n{out[-2000:]}")


def bare_run(engine, job: JobSpec, out: Path) -> float:
    work = out / ".cadscope"
    work.mkdir(parents=True, exist_ok=True)
    payload = {"job": {**job.model_dump(mode="json"), "job_id": "bench"}, "material_library": material_library_path()}
    (work / "job.json").write_text(json.dumps(payload))
    env = build_env(extra={"CADSCOPE_JOB": str(work / "job.json"), "CADSCOPE_OUT": str(out), "HOME": _engine_home()})
    start = time.perf_counter()
    proc = subprocess.run(
        list(engine.argv),
        env=env,
        cwd=work,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or not any(out.glob("*.step")):
        raise RuntimeError("bare run failed")
    return elapsed


def instrumented_run(engine, job: JobSpec, out: Path, obs: ModelObservability, provider: TracerProvider) -> float:
    start = time.perf_counter()
    with provider.get_tracer("bench").start_as_current_span("task"):
        result = run_cad_job(
            job,
            out,
            engine=engine,
            job_id="bench",
            observability=obs,
            limits=RunLimits(timeout_s=300),
            tracer_provider=provider,
        )
    elapsed = time.perf_counter() - start
    if not result.ok:
        raise RuntimeError(f"instrumented run failed: {result.outcome} {result.error_message}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--write", help="append a results section to this Markdown file")
    args = parser.parse_args()

    engines = discover_engines()
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=PinnableIdGenerator())
    provider.add_span_processor(BatchSpanProcessor(exporter))
    obs = ModelObservability(Catalogue(CollectorRegistry()), tracer_provider=provider)
    lines = [
        f"### Job overhead and probe cost ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.platform()}. Runs per side: {args.runs}, interleaved A/B, after one warm-up each.",
        "",
        "| engine (FreeCAD / OCCT) | bare median | instrumented median | ratio | bare range | instrumented range |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, engine in sorted(engines.items()):
        spec = dict(PLATE, engine=name)
        job = JobSpec.model_validate(spec)
        bare, instrumented = [], []
        root = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        try:
            bare_run(engine, job, root / "warm-bare")
            instrumented_run(engine, job, root / "warm-inst", obs, provider)
            for i in range(args.runs):
                # Alternate which side goes first, so neither always runs on a warmer cache.
                order = (0, 1) if i % 2 == 0 else (1, 0)
                for side in order:
                    out = root / f"{i}-{side}"
                    if side == 0:
                        bare.append(bare_run(engine, job, out))
                    else:
                        instrumented.append(instrumented_run(engine, job, out, obs, provider))
                    shutil.rmtree(out)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        mb, mi = statistics.median(bare), statistics.median(instrumented)
        lines.append(
            f"| {name} ({engine.freecad_version} / {engine.occt_version}) | {mb * 1000:.1f} ms | {mi * 1000:.1f} ms | "
            f"**{mi / mb:.3f}** | {min(bare) * 1000:.0f}–{max(bare) * 1000:.0f} ms | "
            f"{min(instrumented) * 1000:.0f}–{max(instrumented) * 1000:.0f} ms |"
        )
        print(lines[-1], flush=True)
    provider.shutdown()

    lines += ["", "| probe, in the child's Python | µs per event (best of 5 × 20,000 spans) |", "| --- | --- |"]
    lines.append(f"| {sys.executable} ({platform.python_version()}) | **{probe_cost([sys.executable]):.2f}** |")
    if "freecad" in engines:
        lines.append(f"| freecadcmd (FreeCAD's Python) | **{probe_cost([engines['freecad'].argv[0]]):.2f}** |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with open(args.write, "a") as handle:
            handle.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
