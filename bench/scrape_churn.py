"""Scrape cost vs. fleet churn: upstream MultiProcessCollector vs. ours, same files.

8 live processes and 0 / 100 / 1,000 / 10,000 dead ones, each with 30 counter
families x 5 label sets (150 samples), as DESIGN.md measured upstream. Live
pids are real sleeping processes; dead pids are pids that do not exist. Each
figure: median of 5 scrapes (collect + text exposition), in one run.

Two columns separate what compaction gives from what cadscope's reader
gives: upstream's collector over the files as the fleet left them, the same
collector over the compacted directory, and ours over that directory.

    python bench/scrape_churn.py [--write bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
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
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

from cadscope.metrics import CompactingMultiProcessCollector

FAMILIES, LABEL_SETS, LIVE = 30, 5, 8
DEAD_PID_BASE = 40_000_000  # above any pid_max: never a live process


def write_process(path: str, pid: int) -> None:
    store = MmapedDict(os.path.join(path, f"counter_{pid}.db"))
    for family in range(FAMILIES):
        name = f"cad_family_{family}"
        for label in range(LABEL_SETS):
            key = json.dumps([name, name + "_total", {"op": f"op{label}"}, "help"], sort_keys=True)
            store.write_value(key, float(pid % 7 + 1), 0.0)
    store.close()


def scrape_ms(registry: CollectorRegistry, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = default_timer()
        generate_latest(registry)
        times.append(default_timer() - start)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write")
    parser.add_argument("--dead", default="0,100,1000,10000")
    parser.add_argument("--live", type=int, default=LIVE, help="live processes (issue 7's target: 64)")
    args = parser.parse_args()
    live = args.live
    sleepers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"]) for _ in range(live)]
    rows = []
    try:
        for dead in (int(x) for x in args.dead.split(",")):
            path = tempfile.mkdtemp(prefix="churn-")
            try:
                for proc in sleepers:
                    write_process(path, proc.pid)
                for index in range(dead):
                    write_process(path, DEAD_PID_BASE + index)
                upstream = CollectorRegistry()
                MultiProcessCollector(upstream, path=path)
                upstream_ms = scrape_ms(upstream)
                before = generate_latest(upstream)
                ours = CollectorRegistry()
                collector = CompactingMultiProcessCollector(ours, path=path)
                files_before = len(os.listdir(path))
                start = default_timer()
                collector.compact()
                compact_ms = (default_timer() - start) * 1000
                ours_ms = scrape_ms(ours)
                # Compaction must not change a single exposed value.
                assert generate_latest(ours) == before, "compaction changed the exposition"
                upstream_compacted = CollectorRegistry()
                MultiProcessCollector(upstream_compacted, path=path)
                upstream_compacted_ms = scrape_ms(upstream_compacted)
                assert generate_latest(upstream_compacted) == before, "the readers disagree"
                rows.append(
                    (dead, files_before, len(os.listdir(path)), upstream_ms, upstream_compacted_ms, ours_ms, compact_ms)
                )
                print(rows[-1], flush=True)
            finally:
                shutil.rmtree(path)
    finally:
        for proc in sleepers:
            proc.kill()
    lines = [
        f"### Scrape cost vs. fleet churn ({time.strftime('%Y-%m-%d')}, {live} live processes, "
        f"{FAMILIES} families x {LABEL_SETS} label sets each, median of 5 scrapes)",
        "",
        "| dead processes | files before | files after compaction | upstream scrape | upstream, compacted files | "
        "ours (compacted) | ratio ours/upstream | ours/upstream, compacted files | one-off compaction |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dead, before, after, up, up_compacted, ours_ms, compact_ms in rows:
        lines.append(f"| {dead:,} | {before:,} | {after} | {up:.1f} ms | {up_compacted:.1f} ms | "
                     f"**{ours_ms:.1f} ms** | {ours_ms / up:.3f} | {ours_ms / up_compacted:.3f} | "
                     f"{compact_ms:.0f} ms |")  # fmt: skip
    publish("\n" + "\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
