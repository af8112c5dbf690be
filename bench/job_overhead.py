"""What the instrumentation costs a CAD job, as ratios measured in one run.

1. Job overhead: the standard job on each engine, fully instrumented as a
   worker runs it (``run_cad_job``: spans re-emitted through the bounded batch
   processor and exported over OTLP/gRPC, or OTLP/HTTP with ``--protocol
   http``, to a collector in another process, on the processor's own
   schedule; metrics in multiprocess mode; trace
   propagation, the probe writing to its pipe, the contained runner and the
   manifest check) vs. bare (the same engine script through
   ``subprocess.run`` with no telemetry pipe, so the probe is a no-op, and no
   spans or metrics). Both sides write the job file inside their timing.
   Runs are interleaved A/B, alternating which goes first, so drift hits both
   sides alike. On a 2-core VM one run scatters by +-10 %, so the figure is
   the median of the *paired* ratios (run i instrumented / run i bare) with a
   95 % bootstrap interval, for wall time and for CPU time (this process,
   its threads and its reaped children: the CAD process included).
2. CPU accounted: the A/B ratios carry the CAD process's own scatter (on a
   busy VM its CPU time varies by 10-15 % from run to run), which no
   affordable number of runs resolves to 1 %. The added cost is measured
   part by part instead, each without that scatter: the worker's own CPU per
   job (paired differences, with an interval), the probe's cost per event
   times the events the job's child wrote, and the CPU that the job's keeper
   (``_contain.py``) adds to a process start. Their sum over the bare job's CPU
   time is "all cadscope adds". "Telemetry alone" is issue 7's comparison,
   the same job with instrumentation off: it keeps the containment
   (the keeper) and the worker's sha256 check of the artifacts, which
   belong to the job, not to its telemetry. The check is timed where it runs,
   inside ``run_cad_job`` just after the child's exit. Up to 1cefb31
   (2026-12-02) it was timed again after each run, on warm caches, where it
   cost ~25 % less (both are in the table), and the difference was charged
   to telemetry. Either
   bounds the wall-time cost too: the worker's share runs beside the CAD
   process, on the critical path only before the spawn and after the exit.
   The worker's side of a run is the CPU of the thread that runs it, as in a
   pool process, plus its share of what telemetry runs in other threads,
   measured per thread over the whole benchmark (``/proc/self/task``), which
   ends with a flush: all of the processor's export thread (OTLP encoding and
   the gRPC calls) shared out over the instrumented runs, and gRPC's own
   threads, which burn CPU by the second whether spans flow or not (~0.8 ms
   a second here), at their rate times each instrumented run's wall time, as
   a worker running jobs back to back pays them. The processor exports as a
   worker's does, every 5 s or 512 spans, so a job shares an export with the
   jobs around it (flushing after every run, as this script did up to
   2026-11-23, charged each FreeCAD job a whole gRPC call: ~1.3 ms here,
   most of it a cold CPU's, against ~0.3 ms back to back).
3. Probe cost: microseconds per event (a span is two events) in each
   engine's own Python, writing to a pipe a reader drains.

    python bench/job_overhead.py [--runs 100] [--write bench/RESULTS.md]
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
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, NamedTuple

from _common import NullCollectorProcess, NullHTTPCollectorProcess, bootstrap, other_threads_cpu, paired, publish
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from prometheus_client import CollectorRegistry

from cadscope.freecad_bridge import JobSpec, RunLimits, _engines, build_env, discover_engines, run_cad_job
from cadscope.freecad_bridge._engines import CHILD_DIR, _engine_home, _verify_artifacts
from cadscope.freecad_bridge._runner import _keeper_argv
from cadscope.freecad_bridge._schema import material_library_path
from cadscope.metrics import Catalogue, ModelObservability, enable_multiprocess
from cadscope.tracing import PinnableIdGenerator
from cadscope.tracing._otlpwire import OTLPWireHTTPSpanExporter, OTLPWireSpanExporter
from cadscope.tracing._processor import BoundedBatchSpanProcessor
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


class WorkerTelemetry(NamedTuple):
    """The telemetry as a worker runs it: spans through the bounded batch processor and OTLP/gRPC or
    OTLP/HTTP (cadscope's encoder) to a collector in another process, metrics in multiprocess (mmap) mode."""

    sink: NullCollectorProcess
    processor: BoundedBatchSpanProcessor
    provider: TracerProvider
    obs: ModelObservability

    @classmethod
    def start(cls, stack: contextlib.ExitStack, protocol: str = "grpc") -> WorkerTelemetry:
        enable_multiprocess(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-metrics-")))
        exporter: SpanExporter
        if protocol == "http":
            sink: NullCollectorProcess = stack.enter_context(NullHTTPCollectorProcess())
            exporter = OTLPWireHTTPSpanExporter(endpoint=sink.endpoint)
        else:
            sink = stack.enter_context(NullCollectorProcess())
            exporter = OTLPWireSpanExporter(endpoint=sink.endpoint, insecure=True)
        processor = BoundedBatchSpanProcessor(exporter)
        provider = TracerProvider(id_generator=PinnableIdGenerator())
        provider.add_span_processor(processor)
        return cls(
            sink, processor, provider, ModelObservability(Catalogue(CollectorRegistry()), tracer_provider=provider)
        )

    def stop(self, stack: contextlib.ExitStack) -> None:
        """Flush and close; exits non-zero if a span was lost on the way to the collector."""
        self.provider.shutdown()
        stack.close()
        if any(self.processor.dropped.values()) or self.sink.spans <= 0:
            raise SystemExit(
                f"spans were lost on the way to the collector: {self.processor.dropped}, {self.sink.spans} received"
            )


def _cpu() -> tuple[float, float]:
    """(this thread: the worker's share of a run; with the reaped children: the whole run)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    mine = time.thread_time()
    return mine, mine + children.ru_utime + children.ru_stime


_checks: list[float] = []  # thread CPU of each artifact check run_cad_job made, in order


def _timed_check(manifest: Any, out_dir: Path) -> Any:
    """``run_cad_job``'s artifact check, timed in place (the benchmark's own probe)."""
    started = time.thread_time()
    try:
        return _verify_artifacts(manifest, out_dir)
    finally:
        _checks.append(time.thread_time() - started)


_engines._verify_artifacts = _timed_check  # run_cad_job looks it up when it calls it


class Run(NamedTuple):
    wall: float  # s
    cpu: float  # s, the worker's side and the CAD process
    own: float  # s, the worker's side alone: the thread that ran the job (instrumented: plus other threads' share)
    events: int = 0  # telemetry lines the child wrote
    check: float = 0.0  # s, the worker's sha256 check of the artifacts, where run_cad_job runs it
    recheck: float = 0.0  # s, the same check timed again after the run (warm caches)


def _since(wall: float, cpu: tuple[float, float]) -> Run:
    mine, total = _cpu()
    return Run(time.perf_counter() - wall, total - cpu[1], mine - cpu[0])


def bare_run(engine, job: JobSpec, out: Path) -> Run:
    start, cpu = time.perf_counter(), _cpu()
    work = out / ".cadscope"
    work.mkdir(parents=True, exist_ok=True)
    payload = {"job": {**job.model_dump(mode="json"), "job_id": "bench"}, "material_library": material_library_path()}
    (work / "job.json").write_text(json.dumps(payload))
    env = build_env(extra={"CADSCOPE_JOB": str(work / "job.json"), "CADSCOPE_OUT": str(out), "HOME": _engine_home()})
    proc = subprocess.run(
        list(engine.argv),
        env=env,
        cwd=work,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    measured = _since(start, cpu)
    if proc.returncode != 0 or not any(out.glob("*.step")):
        raise RuntimeError("bare run failed")
    return measured


def instrumented_run(
    engine, job: JobSpec, out: Path, obs: ModelObservability, provider: TracerProvider, limits: RunLimits | None = None
) -> Run:
    checks = len(_checks)
    start, cpu = time.perf_counter(), _cpu()
    with provider.get_tracer("bench").start_as_current_span("task"):
        result = run_cad_job(
            job,
            out,
            engine=engine,
            job_id="bench",
            observability=obs,
            limits=limits or RunLimits(timeout_s=300),
            tracer_provider=provider,
        )
    measured = _since(start, cpu)
    if not result.ok or result.manifest is None:
        raise RuntimeError(f"instrumented run failed: {result.outcome} {result.error_message}")
    if len(_checks) == checks:
        raise RuntimeError("run_cad_job's artifact check was not timed in place: is it still _verify_artifacts?")
    recheck = time.thread_time()
    _verify_artifacts(result.manifest, out)
    recheck = time.thread_time() - recheck
    return measured._replace(events=result.run.events, check=sum(_checks[checks:]), recheck=recheck)


def wrapper_cost(runs: int = 300) -> float:
    """CPU seconds that starting a process under the job's keeper adds (``true`` with and without)."""
    true = shutil.which("true") or "/bin/true"
    env = build_env()
    extra = []
    for _ in range(runs):
        cpu = []
        for keeper in (False, True):
            before = _cpu()[1]
            if keeper:  # exactly as the runner starts a CAD process
                status_r, status_w = os.pipe()
                argv = _keeper_argv([true], RunLimits(), status_w, env)
                subprocess.run(argv, check=True, env=env, pass_fds=(status_w,), start_new_session=True)
                os.close(status_w)
                os.close(status_r)
            else:
                subprocess.run([true], check=True, env=env)
            cpu.append(_cpu()[1] - before)
        extra.append(cpu[1] - cpu[0])
    return statistics.median(extra)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--write", help="append a results section to this Markdown file")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc",
                        help="the span export's transport: OTLP/gRPC or OTLP/HTTP (protobuf)")  # fmt: skip
    args = parser.parse_args()

    engines = discover_engines()
    stack = contextlib.ExitStack()
    instrumentation = WorkerTelemetry.start(stack, args.protocol)
    processor, provider, obs = instrumentation.processor, instrumentation.provider, instrumentation.obs
    # Each engine's own Python runs the probe (the OCP engine runs in this one).
    probe_us = {name: probe_cost([engine.argv[0]]) for name, engine in sorted(engines.items())}
    wrapper_s = wrapper_cost()
    lines = [
        f"### Job overhead and probe cost ({time.strftime('%Y-%m-%d')}, spans over OTLP/{args.protocol.upper()})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.platform()}. Runs per side: {args.runs}, interleaved A/B, after one warm-up each. "
        "Ratios: median of paired ratios [95 % bootstrap interval].",
        "",
        "| engine (FreeCAD / OCCT) | bare wall median | instrumented wall median | wall ratio | CPU ratio "
        "| bare wall range | instrumented wall range |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    accounted = [
        "",
        "| engine | job CPU, bare (median) | worker's CPU per job, bare → instrumented | added by the worker "
        "[95 %] | of which the artifact check (timed again after) | of which other threads: export + the transport's "
        "| probe, in the CAD process "
        "| the keeper, beside the CAD process | **all cadscope adds** | **telemetry alone** |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, engine in sorted(engines.items()):
        spec = dict(PLATE, engine=name)
        job = JobSpec.model_validate(spec)
        bare: list[Run] = []
        instrumented: list[Run] = []
        root = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        try:
            bare_run(engine, job, root / "warm-bare")
            instrumented_run(engine, job, root / "warm-inst", obs, provider)
            provider.force_flush()
            threads, started = other_threads_cpu(), time.perf_counter()
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
            provider.force_flush()  # the last spans encoded and sent, by the export thread
            elapsed = time.perf_counter() - started
            used = {tid: cpu - threads.get(tid, 0.0) for tid, cpu in other_threads_cpu().items()}
            export = used.pop(processor._thread.native_id or -1, 0.0) / args.runs
            grpc_rate = sum(used.values()) / elapsed  # gRPC's threads (and any other), CPU s per s
            instrumented = [
                r._replace(cpu=r.cpu + export + grpc_rate * r.wall, own=r.own + export + grpc_rate * r.wall)
                for r in instrumented
            ]
        finally:
            shutil.rmtree(root, ignore_errors=True)
        bare_wall, inst_wall = [r.wall for r in bare], [r.wall for r in instrumented]
        wall = paired(inst_wall, bare_wall)
        cpu = paired([r.cpu for r in instrumented], [r.cpu for r in bare])
        lines.append(
            f"| {name} ({engine.freecad_version} / {engine.occt_version}) "
            f"| {statistics.median(bare_wall) * 1000:.1f} ms | {statistics.median(inst_wall) * 1000:.1f} ms "
            f"| **{wall[0]:.3f}** [{wall[1]:.3f}–{wall[2]:.3f}] | **{cpu[0]:.3f}** [{cpu[1]:.3f}–{cpu[2]:.3f}] "
            f"| {min(bare_wall) * 1000:.0f}–{max(bare_wall) * 1000:.0f} ms "
            f"| {min(inst_wall) * 1000:.0f}–{max(inst_wall) * 1000:.0f} ms |"
        )
        print(lines[-1], flush=True)
        # The A/B ratios carry the CAD process's own scatter. The worker's
        # added CPU, paired, does not; the CAD process's added CPU is its
        # events times the probe's cost per event plus the keeper's start.
        job_cpu = statistics.median(r.cpu for r in bare)
        worker = bootstrap([i.own - b.own for i, b in zip(instrumented, bare, strict=True)])
        events = statistics.median(r.events for r in instrumented)
        probe_s = events * probe_us[name] / 1e6
        check = statistics.median(r.check for r in instrumented)
        recheck = statistics.median(r.recheck for r in instrumented)
        everything = [1 + (w + probe_s + wrapper_s) / job_cpu for w in worker]
        # "Instrumentation off" keeps the job's containment and its artifact check.
        telemetry = [1 + (w - check + probe_s) / job_cpu for w in worker]
        accounted.append(
            f"| {name} | {job_cpu * 1000:.0f} ms "
            f"| {statistics.median(r.own for r in bare) * 1000:.1f} → "
            f"{statistics.median(r.own for r in instrumented) * 1000:.1f} ms "
            f"| {worker[0] * 1000:+.1f} ms [{worker[1] * 1000:+.1f}, {worker[2] * 1000:+.1f}] "
            f"| {check * 1000:.1f} ms ({recheck * 1000:.1f} ms) "
            f"| {export * 1000:.1f} + {grpc_rate * statistics.median(inst_wall) * 1000:.1f} ms "
            f"| {events:.0f} events × {probe_us[name]:.1f} µs = {probe_s * 1000:.2f} ms "
            f"| {wrapper_s * 1000:.2f} ms | **{everything[0]:.4f}** [{everything[1]:.4f}–{everything[2]:.4f}] "
            f"| **{telemetry[0]:.4f}** [{telemetry[1]:.4f}–{telemetry[2]:.4f}] |"
        )
        print(accounted[-1], flush=True)
    instrumentation.stop(stack)

    lines += accounted
    lines += ["", "| probe, in the child's Python | µs per event (best of 5 × 20,000 spans) |", "| --- | --- |"]
    for name, engine in sorted(engines.items()):
        lines.append(f"| {name}: `{engine.argv[0]}` | **{probe_us[name]:.2f}** |")
    publish("\n" + "\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
