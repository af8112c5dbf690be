"""What ``cadscope compare`` costs on 100,000 spans: its time, and its memory against one copy of the durations.

A run folder's ``traces.jsonl`` is written first (not measured) through the SDK's batch processor
and cadscope's OTLP/JSON exporter, as a worker writes it: jobs of 20 spans each (a flow, its
subprocess, five stages, thirteen operations) on two OCCT versions, with lognormal durations.
Then, in this process, the comparison runs as ``cadscope compare RUN_DIR --baseline ...
--candidate ...`` does (read both sides, compare, render the table), timed; again under
``tracemalloc`` for its peak allocation, set against the size of the durations it holds (8 bytes
each); and the whole command once in a fresh process, imports included, for its wall time and
peak RSS. Targets: at most 5 s; memory about one copy of the durations.

    python bench/compare_cost.py [--spans 100000] [--write FILE]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from _common import publish
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from cadscope.compare import SideData, compare_sides, parse_selector, read_run_folder, render_table
from cadscope.tracing import OTLPJsonFileSpanExporter

SPANS_A_JOB = 20
OPERATIONS = [
    ("occt.boolean", {"cad.boolean.operation": "cut"}, -4.0),
    ("occt.boolean", {"cad.boolean.operation": "union"}, -4.2),
    ("occt.feature", {"cad.feature": "fillet"}, -3.5),
    ("occt.feature", {"cad.feature": "chamfer"}, -5.0),
    ("document.recompute", {}, -6.0),
    ("document.create", {"cad.document.source": "new"}, -7.0),
    ("topology.hash", {}, -5.5),
    ("material.apply_property", {}, -8.0),
    ("material.apply_appearance", {}, -8.5),
    ("export", {"cad.export.format": "STEP"}, -4.0),
    ("export", {"cad.export.format": "STL"}, -3.0),
    ("a4.solve", {}, -7.5),
    ("a4.lcs_resolution", {}, -9.0),
]
STAGES = ("validate", "generate", "export", "validate_export", "collect")


def write_traces(path: Path, spans: int) -> None:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPJsonFileSpanExporter(path), max_queue_size=1 << 16))
    tracer = provider.get_tracer("bench")
    rng = random.Random(1)
    t = 1_700_000_000_000_000_000
    for job in range(spans // SPANS_A_JOB):
        occt = "7.9.3" if job % 2 else "8.0.1"
        labels = {"cad.job_id": f"job-{job:08d}", "cad.engine": "ocp", "cad.occt_version": occt,
                  "cad.freecad_version": "none"}  # fmt: skip
        flow = tracer.start_span("cad.flow parametric", start_time=t, attributes=labels)
        ctx = trace.set_span_in_context(flow)
        sub = tracer.start_span("cad.subprocess ocp", ctx, start_time=t,
                                attributes={**labels, "cad.subprocess.outcome": "ok"})  # fmt: skip
        sub_ctx = trace.set_span_in_context(sub)
        now = t
        for stage in STAGES:
            duration = int(rng.lognormvariate(-4, 0.5) * 1e9)
            tracer.start_span("cad.stage", sub_ctx, start_time=now, attributes={"cad.stage": stage}).end(now + duration)
            now += duration
        for name, attributes, mu in OPERATIONS:
            duration = int(rng.lognormvariate(mu, 0.5) * 1e9)
            tracer.start_span(name, sub_ctx, start_time=now, attributes=attributes).end(now + duration)
            now += duration
        sub.end(now)
        flow.end(now + 1000)
        t = now + 1_000_000
    provider.shutdown()


def compare_once(run: Path) -> tuple[float, int]:
    """What the command does in process; returns its seconds and how many durations it held."""
    start = time.perf_counter()
    base = SideData(parse_selector("occt_version=7.9.3"), "7.9.3")
    cand = SideData(parse_selector("occt_version=8.0.1"), "8.0.1")
    read_run_folder(run, [base, cand])
    report = compare_sides(base, cand)
    render_table(report, io.StringIO())
    seconds = time.perf_counter() - start
    held = sum(len(values) for side in (base, cand) for values in side.raw.values())
    return seconds, held


def _child_peak(lines: list[str]) -> tuple[int, object]:
    """Run Python ``lines`` in a fresh interpreter; its peak resident memory (KiB) and exit status."""
    script = "\n".join(["status = 0", *lines, "import sys",
                        "peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]",
                        "print('PEAK', peak, file=sys.stderr)", "sys.exit(status)"])  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    peak = next((int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK ")), 0)
    if not peak:
        print(proc.stderr, file=sys.stderr)
    return peak, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spans", type=int, default=100_000)
    parser.add_argument("--write")
    args = parser.parse_args()
    run = Path(tempfile.mkdtemp(prefix="compare-cost-"))
    write_traces(run / "traces.jsonl", args.spans)
    size_mb = (run / "traces.jsonl").stat().st_size / 1e6
    cpu_start = time.process_time()
    seconds, held = compare_once(run)
    cpu = time.process_time() - cpu_start
    tracemalloc.start()
    compare_once(run)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    durations_bytes = held * 8
    command = ["compare", str(run), "--baseline", "occt_version=7.9.3", "--candidate", "occt_version=8.0.1"]
    # Each child reports its own peak (VmHWM belongs to the process image: unlike ru_maxrss it
    # starts again at exec, so this process's size does not count).
    idle_kib, _ = _child_peak(["import cadscope.workers.cli, cadscope.compare._report, cadscope.compare._render"])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    command_kib, status = _child_peak(
        ["import runpy, sys", f"sys.argv = {['cadscope', *command]!r}",
         "try:\n    runpy.run_module('cadscope.workers.cli', run_name='__main__')\nexcept SystemExit as exc:\n"
         "    status = exc.code"]
    )  # fmt: skip
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    command_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if status not in (0, 1):
        return 2
    # On a loaded machine wall time is the machine's; the CPU time is the comparison's.
    met = min(seconds, cpu) <= 5 and min(wall, command_cpu) <= 5
    lines = [
        f"### `cadscope compare` on {args.spans:,} spans ({time.strftime('%Y-%m-%d')}; traces.jsonl {size_mb:.1f} MB, "
        f"{held:,} durations compared; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)",
        "",
        "| figure | value | target |",
        "| --- | --- | --- |",
        f"| read, compare, table (in process): wall, CPU | **{seconds:.2f} s**, {cpu:.2f} s CPU | <= 5 s |",
        f"| the whole command, fresh process, imports included: wall, CPU | {wall:.2f} s, {command_cpu:.2f} s CPU "
        f"| <= 5 s |",
        f"| peak allocation (tracemalloc) / durations held ({durations_bytes / 1e6:.2f} MB) | **{peak / 1e6:.2f} MB**, "
        f"{peak / durations_bytes:.1f}x | about 1x |",
        f"| the command's peak RSS above its imports' ({idle_kib / 1024:.0f} MiB) | "
        f"{(command_kib - idle_kib) / 1024:.1f} MiB | about the durations |",
    ]
    publish("\n" + "\n".join(lines) + "\n", args.write)
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
