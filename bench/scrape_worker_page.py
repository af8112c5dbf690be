"""Scrape cost of a worker's own page: upstream MultiProcessCollector vs. ours, same files.

`scrape_churn.py` measures many processes with few keys each (30 counter
families x 5 label sets). A worker's own page is the other shape: a few pool
processes, each with ~1,500 keys (the catalogue's histograms, bucket by
bucket, under two engines' version labels). This script makes that page the
real way, with `cadscope run` (the README's quick start workload, real CAD
jobs through real pool processes), then times `/metrics` over the files the
run left: upstream's collector, and ours, its first scrape (a fresh
collector, nothing parsed yet) and its later ones. Medians over alternating
scrapes, in one run; the two pages must be byte-identical.

    python bench/scrape_worker_page.py [--jobs 14] [--concurrency 2] [--write bench/RESULTS.md]
    python bench/scrape_worker_page.py --dir PROMETHEUS_MULTIPROC_DIR   # an existing directory
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from timeit import default_timer

from _common import publish
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from cadscope.metrics import CompactingMultiProcessCollector


def _run_workload(out: str, jobs: int, concurrency: int) -> str:
    """The metrics directory `cadscope run` leaves in ``out``."""
    command = [sys.executable, "-m", "cadscope.workers.cli", "run", "--out", out, "--jobs", str(jobs),
               "--concurrency", str(concurrency)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cadscope run failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return os.path.join(out, "metrics")


def _fresh_ms(path: str) -> tuple[float, bytes]:
    """A first scrape: a new collector, in this process, after the others (kept keys emptied)."""
    from cadscope.metrics import _multiprocess

    _multiprocess._parsed_keys.clear()
    registry = CollectorRegistry()
    CompactingMultiProcessCollector(registry, path=path)
    start = default_timer()
    page = generate_latest(registry)
    return (default_timer() - start) * 1000, page


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", help="measure this metrics directory instead of running the workload")
    parser.add_argument("--jobs", type=int, default=14)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--write")
    args = parser.parse_args()
    out = None if args.dir else tempfile.mkdtemp(prefix="worker-page-")
    try:
        path = args.dir or _run_workload(out, args.jobs, args.concurrency)  # type: ignore[arg-type]
        files = sorted(name for name in os.listdir(path) if name.endswith(".db"))
        upstream = CollectorRegistry()
        MultiProcessCollector(upstream, path=path)
        ours = CollectorRegistry()
        CompactingMultiProcessCollector(ours, path=path)
        expected = generate_latest(upstream)
        firsts = []
        for _ in range(5):
            first_ms, first_page = _fresh_ms(path)
            assert first_page == expected, "ours differs from upstream (first scrape)"
            firsts.append(first_ms)
        assert generate_latest(ours) == expected, "ours differs from upstream"  # and its keys are parsed
        times: dict[str, list[float]] = {"upstream": [], "ours": []}
        for _ in range(args.rounds):
            for name, registry in (("upstream", upstream), ("ours", ours)):
                start = default_timer()
                generate_latest(registry)
                times[name].append((default_timer() - start) * 1000)
        up, later, first = (statistics.median(x) for x in (times["upstream"], times["ours"], firsts))
        samples = sum(1 for line in expected.decode().splitlines() if line and not line.startswith("#"))
        run = f"`cadscope run --jobs {args.jobs} --concurrency {args.concurrency}`"
        source = f"`--dir {args.dir}`" if args.dir else run
        lines = [
            f"### A worker's own page ({time.strftime('%Y-%m-%d')}, {source}; medians of {args.rounds} "
            "alternating scrapes, first scrapes: median of 5)",
            "",
            "| files | samples | page | upstream | ours, first scrape | **ours, later scrapes** | "
            "first ÷ upstream | **later ÷ upstream** |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| {len(files)} | {samples:,} | {len(expected) / 1024:.0f} KiB | {up:.1f} ms | {first:.1f} ms | "
            f"**{later:.1f} ms** | {first / up:.3f} | **{later / up:.3f}** |",
        ]
        publish("\n" + "\n".join(lines) + "\n", args.write)
    finally:
        if out:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
