"""What the telemetry, and everything the runner adds, cost a CAD job: interleaved A/B/C runs in one process.

The standard job (a plate with holes and fillets, exported to STEP and STL)
on each engine, three ways, interleaved (the order rotates from one triple to
the next, so drift hits every arm alike):

- **bare**: the engine's script through ``subprocess.run``, with no telemetry
  pipe (the probe is a no-op), no containment, no artifact check, no spans,
  no metrics;
- **runner, telemetry off**: ``run_cad_job`` as a worker calls it, with its
  containment (own session, limits, parent-death signal), the child's pipe
  (it carries the result manifest) and the artifact check (sha256), but a
  tracer provider that records nothing and metrics in process memory;
- **runner, telemetry on**: the same, as a worker runs it: spans re-emitted and
  exported over OTLP/gRPC (``--protocol http`` for OTLP/HTTP) to a collector
  in another process through the bounded batch processor, metrics in
  prometheus_client's multiprocess files.

Figures: *telemetry alone* is on / off; *everything the runner adds* is on /
bare. Each is the median of the paired ratios (triple i against itself) with
a 95 % bootstrap interval, for wall time and for CPU time (this process and
its reaped children, the CAD process included; the export thread and the
transport's threads are in this process). Target: telemetry at most 1 % of a
FreeCAD job's wall time. A probe event's cost in each engine's own Python is
measured too (target: 20 µs).

    python bench/job_overhead.py [--runs 60] [--protocol grpc|http] [--write FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path
from typing import NamedTuple

from _common import NullCollectorProcess, NullHTTPCollectorProcess, paired, publish
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from prometheus_client import CollectorRegistry

from cadscope.freecad_bridge import EngineInfo, JobSpec, RunLimits, build_env, discover_engines, run_cad_job
from cadscope.freecad_bridge._engines import CHILD_DIR, _engine_home
from cadscope.freecad_bridge._schema import material_library_path
from cadscope.metrics import Catalogue, ModelObservability, enable_multiprocess
from cadscope.tracing import BoundedBatchSpanProcessor, PinnableIdGenerator
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


def probe_cost(python: str, n: int = 20_000) -> float:
    """Microseconds a probe event (a span is two) costs in ``python``, writing to a pipe a reader drains."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(PROBE_LOOP.format(child=str(CHILD_DIR), n=n))
    try:
        out = subprocess.run([python, handle.name], capture_output=True, text=True, timeout=600,
                             env=build_env(extra={"HOME": _engine_home()})).stdout  # fmt: skip
    finally:
        os.unlink(handle.name)
    for line in out.splitlines():
        if "PROBE_US_PER_EVENT" in line:
            return float(line.split()[-1])
    raise RuntimeError(f"probe benchmark printed nothing useful:\n{out[-2000:]}")


class Run(NamedTuple):
    wall: float  # s
    cpu: float  # s: this process (every thread) and its reaped children


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(run) -> Run:  # type: ignore[no-untyped-def]
    wall, cpu = time.perf_counter(), _cpu()
    run()
    return Run(time.perf_counter() - wall, _cpu() - cpu)


def bare(engine: EngineInfo, job: JobSpec, out: Path) -> None:
    work = out / ".cadscope"
    work.mkdir(parents=True, exist_ok=True)
    payload = {"job": {**job.model_dump(mode="json"), "job_id": "bench"}, "material_library": material_library_path()}
    (work / "job.json").write_text(json.dumps(payload))
    env = build_env(extra={"CADSCOPE_JOB": str(work / "job.json"), "CADSCOPE_OUT": str(out), "HOME": _engine_home()})
    proc = subprocess.run(list(engine.argv), env=env, cwd=work, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    if proc.returncode != 0 or not any(out.glob("*.step")):
        raise RuntimeError("bare run failed")


def runner(engine: EngineInfo, job: JobSpec, out: Path, obs: ModelObservability, provider: TracerProvider) -> None:
    with provider.get_tracer("bench").start_as_current_span("task"):
        result = run_cad_job(job, out, engine=engine, job_id="bench", observability=obs,
                             limits=RunLimits(timeout_s=300), tracer_provider=provider)  # fmt: skip
    if not result.ok or result.manifest is None:
        raise RuntimeError(f"run failed: {result.outcome} {result.error_message}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=60, help="triples per engine")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--write", help="append a results section to this Markdown file")
    args = parser.parse_args()
    engines = {name: info for name, info in discover_engines().items() if "@" not in name}  # one per kind
    metrics_dir = tempfile.mkdtemp(prefix="bench-metrics-")
    with contextlib.ExitStack() as stack:
        # Telemetry on: spans to a collector in another process, metrics in multiprocess files.
        sink = stack.enter_context(NullHTTPCollectorProcess() if args.protocol == "http" else NullCollectorProcess())
        if args.protocol == "http":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPExporter

            exporter = HTTPExporter(endpoint=sink.endpoint + "/v1/traces")
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=sink.endpoint, insecure=True)
        processor = BoundedBatchSpanProcessor(exporter)
        on = TracerProvider(id_generator=PinnableIdGenerator())
        on.add_span_processor(processor)
        off = TracerProvider(sampler=ALWAYS_OFF)  # records nothing, exports nothing
        off_obs = ModelObservability(Catalogue(CollectorRegistry()), tracer_provider=off)  # process memory
        enable_multiprocess(metrics_dir)
        on_obs = ModelObservability(Catalogue(CollectorRegistry()), tracer_provider=on)

        rows = []
        for name, engine in sorted(engines.items()):
            job = JobSpec.model_validate(dict(PLATE, engine=name))
            root = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
            arms = {
                "bare": lambda out, e=engine, j=job: bare(e, j, out),
                "off": lambda out, e=engine, j=job: runner(e, j, out, off_obs, off),
                "on": lambda out, e=engine, j=job: runner(e, j, out, on_obs, on),
            }
            runs: dict[str, list[Run]] = {arm: [] for arm in arms}
            try:
                for arm, call in arms.items():  # one warm-up each
                    call(root / f"warm-{arm}")
                order = list(arms)
                for i in range(args.runs):
                    for arm in order[i % 3 :] + order[: i % 3]:
                        out = root / f"{i}-{arm}"
                        runs[arm].append(_timed(lambda c=arms[arm], o=out: c(o)))
                        shutil.rmtree(out)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            rows.append((name, engine, runs))
            print(name, {arm: statistics.median(r.wall for r in rs) for arm, rs in runs.items()}, flush=True)
        on.force_flush()
        probe_us = {name: probe_cost(engine.argv[0]) for name, engine in sorted(engines.items())}
    shutil.rmtree(metrics_dir, ignore_errors=True)
    if any(processor.dropped.values()) or sink.spans <= 0:  # the count arrives as the collector stops
        raise SystemExit(f"spans were lost on the way to the collector: {processor.dropped}, {sink.spans}")

    def ratio(a: list[Run], b: list[Run], field: str) -> str:
        median, low, high = paired([getattr(r, field) for r in a], [getattr(r, field) for r in b])
        return f"**{median:.4f}** [{low:.4f}–{high:.4f}]"

    lines = [
        f"### Job overhead ({time.strftime('%Y-%m-%d')}, spans over OTLP/{args.protocol.upper()}, "
        f"{args.runs} interleaved triples per engine)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. "
        "Ratios: median of paired ratios [95 % bootstrap interval].",
        "",
        "| engine (FreeCAD / OCCT) | bare | runner, telemetry off | runner, telemetry on "
        "| **telemetry alone**, wall | telemetry alone, CPU | everything the runner adds, wall | ..., CPU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, engine, runs in rows:
        medians = {arm: statistics.median(r.wall for r in rs) * 1000 for arm, rs in runs.items()}
        lines.append(
            f"| {name} ({engine.freecad_version} / {engine.occt_version}) | {medians['bare']:.1f} ms "
            f"| {medians['off']:.1f} ms | {medians['on']:.1f} ms "
            f"| {ratio(runs['on'], runs['off'], 'wall')} | {ratio(runs['on'], runs['off'], 'cpu')} "
            f"| {ratio(runs['on'], runs['bare'], 'wall')} | {ratio(runs['on'], runs['bare'], 'cpu')} |"
        )
    lines += ["", "| probe, in the engine's Python | µs per event (best of 5 × 20,000 spans) |", "| --- | --- |"]
    for name, engine in sorted(engines.items()):
        lines.append(f"| {name}: `{engine.argv[0]}` | **{probe_us[name]:.2f}** |")
    publish("\n" + "\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
