"""Warm engines against cold starts: job latency, worker throughput, the fork server's memory.

Three figures, each from one paired run:

- **Job wall time, warm / cold**: the standard job (``PLATE``: a plate with
  holes and fillets, exported to STEP and STL) and a lighter one (the same
  plate, STEP only) through ``run_cad_job``, warm and cold interleaved (the
  order alternates pair by pair, so drift hits both alike), on each engine.
  The ratio is the median of the paired ratios with its 95 % bootstrap
  interval. Target: at most 0.5 for the standard job on each engine. The
  per-job peak RSS (``wait4``) and the start (request to the job's first
  line of code) are reported too.
- **Worker throughput, warm / cold**: the mixed workload (plate, assembly,
  grid, housing, profile, both engines in turn) through a real prefork
  ``celery worker`` (two pool processes, every telemetry on), one worker
  with warm engines and one with ``CADSCOPE_WARM=0``, rounds alternating;
  then the same parts with their exact exports only (short jobs: FreeCAD's
  STL export of the assembly alone is most of the mixed workload's time).
  Jobs per minute; the ratio is the median of the rounds' ratios. Target: at
  least 1.5.
- **Fork server memory**: a warm pool runs ``--memory-jobs`` tiny jobs per
  engine (default 1,000); the fork servers' RSS is read in ``/proc`` at
  checkpoints. Target: growth at most 10 MiB.

    python bench/warm_engines.py [--pairs 12] [--jobs 20] [--rounds 2] [--memory-jobs 1000]
                                 [--broker redis://127.0.0.1:6379/14] [--write FILE]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
from _common import paired, publish
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from prometheus_client import CollectorRegistry
from throughput_memory import TINY, Worker, mixed

from cadscope.freecad_bridge import JobSpec, WarmPool, discover_engines, run_cad_job
from cadscope.freecad_bridge._warm import WARM_DIR_ENV
from cadscope.metrics import Catalogue, ModelObservability
from cadscope.workers import app, configure_app
from cadscope.workers._workload import PLATE

STEP_ONLY = {**PLATE, "exports": [{"format": "step", "of": "plate", "name": "plate"}]}


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _pool(engines: dict[str, Any], **kwargs: Any) -> WarmPool:
    return WarmPool(
        {
            n: (e.argv[0], {"freecad_version": e.freecad_version, "occt_version": e.occt_version})
            for n, e in engines.items()
        },
        **kwargs,
    ).start()


def job_latency(engines: dict[str, Any], pairs: int, workdir: Path) -> list[str]:
    obs = ModelObservability(Catalogue(CollectorRegistry()))
    provider = TracerProvider(sampler=ALWAYS_OFF)
    lines = [
        f"Job wall time through `run_cad_job`, {pairs} warm/cold pairs each, interleaved (order alternating):\n",
        "| engine | job | cold (median) | warm (median) | warm / cold (median of pairs, 95 % CI) "
        "| start cold / warm (median) | job peak RSS cold / warm (median) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    pool = _pool(engines)
    try:
        for name, engine in engines.items():
            for label, spec in (("standard (plate, STEP + STL)", PLATE), ("plate, STEP only", STEP_ONLY)):
                walls: dict[str, list[float]] = {"warm": [], "cold": []}
                starts: dict[str, list[float]] = {"warm": [], "cold": []}
                rss: dict[str, list[float]] = {"warm": [], "cold": []}
                for i in range(pairs + 1):  # the first pair warms the file cache, not counted
                    for how in ("warm", "cold") if i % 2 == 0 else ("cold", "warm"):
                        job = JobSpec.model_validate({**spec, "engine": name, "cold_start": how == "cold"})
                        began = time.perf_counter()
                        result = run_cad_job(job, workdir / f"{name}-{len(label)}-{how}-{i}", engine=engine,
                                             observability=obs, tracer_provider=provider)  # fmt: skip
                        wall = time.perf_counter() - began
                        if not result.ok or result.run.start != how:
                            raise RuntimeError(
                                f"{name} {how}: {result.outcome} {result.run.start} {result.error_message}"
                            )
                        if i:
                            walls[how].append(wall)
                            starts[how].append(result.run.start_s)
                            rss[how].append(result.run.peak_rss_bytes / 2**20)
                ratio, low, high = paired(walls["warm"], walls["cold"])
                med = statistics.median
                lines.append(
                    f"| {name} | {label} | {med(walls['cold']):.3f} s | {med(walls['warm']):.3f} s "
                    f"| **{ratio:.2f}** ({low:.2f}–{high:.2f}) | {med(starts['cold']) * 1000:.0f} / "
                    f"{med(starts['warm']) * 1000:.0f} ms | {med(rss['cold']):.0f} / {med(rss['warm']):.0f} MiB |"
                )
                print(lines[-1], flush=True)
    finally:
        pool.stop()
    return [*lines, ""]


def short(engine: str, count: int) -> list[dict]:
    """The mixed workload's parts with their exact exports only (STEP, BREP, IGES): short
    parametric jobs, where the engine's start is a large share of the job."""
    jobs = []
    for spec in mixed(engine, count):
        spec["exports"] = [e for e in spec["exports"] if e["format"] in ("step", "brep", "iges")]
        if spec["exports"]:
            jobs.append(spec)
    return jobs


def worker_throughput(broker: str, jobs: int, rounds: int, workdir: Path, kind: str = "mixed") -> list[str]:
    configure_app(app, broker)
    redis.Redis.from_url(broker).ping()
    make = mixed if kind == "mixed" else short
    specs = [s for pair in zip(make("freecad", jobs // 2), make("ocp", jobs - jobs // 2), strict=False) for s in pair]
    walls: dict[str, list[float]] = {"warm": [], "cold": []}
    workers: dict[str, Worker] = {}
    saved = os.environ.get("CADSCOPE_WARM")
    try:
        for how in ("warm", "cold"):
            os.environ["CADSCOPE_WARM"] = "1" if how == "warm" else "0"
            workers[how] = Worker(broker, workdir / f"worker-{how}")
            workers[how].run(copy.deepcopy(specs[:2]))  # first imports in each pool process
        for r in range(rounds):
            for how in ("warm", "cold") if r % 2 == 0 else ("cold", "warm"):
                began = time.perf_counter()
                workers[how].run(copy.deepcopy(specs))
                walls[how].append(time.perf_counter() - began)
                print(f"round {r + 1} {how}: {walls[how][-1]:.1f} s, {len(specs) / walls[how][-1] * 60:.1f} jobs/min",
                      flush=True)  # fmt: skip
    finally:
        for worker in workers.values():
            worker.stop()
        if saved is None:
            os.environ.pop("CADSCOPE_WARM", None)
        else:
            os.environ["CADSCOPE_WARM"] = saved
    ratios = [c / w for w, c in zip(walls["warm"], walls["cold"], strict=True)]
    per_min = {how: len(specs) / statistics.median(walls[how]) * 60 for how in walls}
    return [
        f"{'Mixed workload' if kind == 'mixed' else 'Short jobs (the same parts, STEP/BREP/IGES exports only)'} "
        f"through a real worker (Redis, prefork -c 2, all telemetry), {len(specs)} jobs "
        f"(plate, assembly, grid, housing, profile; FreeCAD and OCP in turn), {rounds} rounds alternating:\n",
        "| worker | jobs per minute (median) | warm / cold (median of rounds) | rounds' ratios |",
        "| --- | --- | --- | --- |",
        f"| cold (`CADSCOPE_WARM=0`) | {per_min['cold']:.1f} | | |",
        f"| warm (default) | {per_min['warm']:.1f} | **{statistics.median(ratios):.2f}** "
        f"| {', '.join(f'{r:.2f}' for r in ratios)} |",
        "",
    ]


def server_memory(engines: dict[str, Any], count: int, workdir: Path) -> list[str]:
    obs = ModelObservability(Catalogue(CollectorRegistry()))
    provider = TracerProvider(sampler=ALWAYS_OFF)
    pool = _pool(engines, max_forks=count + 100)
    saved = os.environ.get(WARM_DIR_ENV)
    rows = []
    try:
        pids = {name: pool.server_pid(name) for name in engines}
        checkpoints = sorted({10, *(c for c in (100, 250, 500, 1000) if c <= count), count})
        done = 0

        def one(name: str, index: int) -> None:
            job = JobSpec.model_validate({**TINY, "engine": name})
            result = run_cad_job(job, workdir / f"tiny-{name}-{index}", engine=engines[name], observability=obs,
                                 tracer_provider=provider)  # fmt: skip
            if not result.ok or result.run.start != "warm":
                raise RuntimeError(f"tiny {name}: {result.outcome} {result.run.start} {result.error_message}")

        with ThreadPoolExecutor(2) as executor:
            for checkpoint in checkpoints:
                list(executor.map(one, [n for _ in range(checkpoint - done) for n in engines],
                                  range(done * len(engines), checkpoint * len(engines))))  # fmt: skip
                done = checkpoint
                rows.append((done, {name: _rss_mib(pid) for name, pid in pids.items() if pid}))
                print(f"after {done} jobs per engine: {rows[-1][1]}", flush=True)
                for name, pid in pids.items():
                    assert pool.server_pid(name) == pid, "a fork server was replaced during the run"
    finally:
        pool.stop()
        if saved is not None:
            os.environ[WARM_DIR_ENV] = saved
    names = sorted(engines)
    lines = [
        f"Fork server RSS over {count} tiny jobs per engine (two at a time, no recycling):\n",
        "| jobs per engine | " + " | ".join(names) + " | growth since 10 jobs |",
        "| --- | " + " | ".join("---" for _ in names) + " | --- |",
    ]
    base = rows[0][1]
    for done, rss in rows:
        growth = " / ".join(f"{rss[n] - base[n]:+.1f}" for n in names)
        lines.append(f"| {done} | " + " | ".join(f"{rss[n]:.1f} MiB" for n in names) + f" | {growth} MiB |")
    return [*lines, ""]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory-jobs", type=int, default=1000)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--skip", action="append", default=[], choices=["latency", "throughput", "memory"])
    parser.add_argument("--write")
    args = parser.parse_args()
    engines = {name: info for name, info in discover_engines().items() if "@" not in name}  # one per kind
    lines = [f"\n### Warm engines ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
             f"Python {platform.python_version()})\n"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if "latency" not in args.skip:
            lines += job_latency(engines, args.pairs, Path(tmp) / "latency")
        if "throughput" not in args.skip:
            lines += worker_throughput(args.broker, args.jobs, args.rounds, Path(tmp) / "throughput")
            lines += worker_throughput(args.broker, args.jobs, args.rounds, Path(tmp) / "short", kind="short")
        if "memory" not in args.skip:
            lines += server_memory(engines, args.memory_jobs, Path(tmp) / "memory")
    publish("\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
