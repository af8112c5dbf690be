"""What the runner's read window costs the worker: the standard job at several ``read_batch_s``.

The runner leaves the telemetry pipe alone for ``RunLimits.read_batch_s``
after each read that empties it, so the child's events pile up and are read
and replayed in batches; the child's exit still wakes it at once. A read
costs the worker more than the events it brings, mostly on cold caches:
between reads the CAD process has had the cores. This script runs the
standard job fully instrumented (as ``job_overhead.py`` does: spans through
the bounded batch processor over OTLP/gRPC to a collector in another
process, metrics in multiprocess mode) with each window in turn, interleaved
and in alternating order, and reports per window the reads per job and the
CPU of the thread that ran the job, paired against the first window.

    python bench/read_window.py [--engine freecad] [--runs 24] [--windows 0.1,0.25,0.5,1.0] [--write bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import bootstrap, paired, publish
from job_overhead import WorkerTelemetry, instrumented_run

from cadscope.freecad_bridge import JobSpec, RunLimits, _runner, discover_engines
from cadscope.workers._workload import PLATE


class _CountingReader(_runner._LineReader):
    """The runner's line reader, counting the reads (``feed`` calls) of the run in progress."""

    reads = 0

    def feed(self, chunk: bytes) -> None:
        _CountingReader.reads += 1
        super().feed(chunk)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", default="freecad")
    parser.add_argument("--runs", type=int, default=24)
    parser.add_argument("--windows", default="0.1,0.25,0.5,1.0", help="read_batch_s values; the first is the base")
    parser.add_argument("--write", help="append a results section to this Markdown file")
    args = parser.parse_args()
    windows = [float(w) for w in args.windows.split(",")]
    engine = discover_engines().get(args.engine)
    if engine is None:
        raise SystemExit(f"engine {args.engine!r} is not installed here")
    job = JobSpec.model_validate(dict(PLATE, engine=args.engine))

    stack = contextlib.ExitStack()
    telemetry = WorkerTelemetry.start(stack)
    provider, obs = telemetry.provider, telemetry.obs
    _runner._LineReader = _CountingReader  # type: ignore[misc] - the runner builds its reader by this name
    root = Path(tempfile.mkdtemp(prefix="bench-window-"))
    reads: dict[float, list[int]] = {w: [] for w in windows}
    own: dict[float, list[float]] = {w: [] for w in windows}
    wall: dict[float, list[float]] = {w: [] for w in windows}
    try:
        instrumented_run(engine, job, root / "warm", obs, provider)
        for i in range(args.runs):
            for w in windows if i % 2 == 0 else windows[::-1]:
                out = root / f"{i}-{w}"
                _CountingReader.reads = 0
                run = instrumented_run(engine, job, out, obs, provider, RunLimits(timeout_s=300, read_batch_s=w))
                reads[w].append(_CountingReader.reads)
                own[w].append(run.own)
                wall[w].append(run.wall)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    telemetry.stop(stack)

    base = windows[0]
    lines = [
        f"### Read window: the standard {args.engine} job at several `read_batch_s` ({time.strftime('%Y-%m-%d')}; "
        f"`python bench/read_window.py --runs {args.runs}`)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{engine.name} ({engine.freecad_version} / {engine.occt_version}). {args.runs} runs per window, "
        "interleaved in alternating order. Worker CPU: the thread that ran the job (the export thread's "
        "share is the same for every window and is left out). Paired: run i at a window against run i at "
        f"{base} s; median [95 % bootstrap interval].",
        "",
        "| `read_batch_s` | reads per job (median, range) | job wall (median) | worker CPU per job (median) "
        f"| worker CPU vs {base} s, paired | wall ratio vs {base} s, paired |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for w in windows:
        saved = bootstrap([a - b for a, b in zip(own[w], own[base], strict=True)])
        ratio = paired(wall[w], wall[base])
        lines.append(
            f"| {w:g} s | {statistics.median(reads[w]):g} ({min(reads[w])}–{max(reads[w])}) "
            f"| {statistics.median(wall[w]) * 1000:.0f} ms | {statistics.median(own[w]) * 1000:.2f} ms "
            f"| **{saved[0] * 1000:+.2f} ms** [{saved[1] * 1000:+.2f}, {saved[2] * 1000:+.2f}] "
            f"| {ratio[0]:.3f} [{ratio[1]:.3f}–{ratio[2]:.3f}] |"
        )
        print(lines[-1], flush=True)
    publish("\n" + "\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
