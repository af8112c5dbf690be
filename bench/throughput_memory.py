"""Throughput and memory of a real cadscope worker.

Throughput: the workload's succeeding templates (plate, assembly, grid,
housing, profile) on one engine, run (a) by a bare loop of the same CAD
subprocesses, two at a time, no Celery, no telemetry (the physical limit of
this machine) and (b) through the API's path minus HTTP: published to Redis,
run by a prefork ``celery worker`` with two pool processes and everything
instrumented. Jobs per minute, same jobs, same order, in one run; the two
runners alternate over several rounds (one worker, started once) and the
ratio is the median of the rounds' own ratios. Each round also gives the
jobs' own time, summed, and the share of the two slots' time a job was
running, so that a slow round shows whether its jobs were slower (the VM,
or work inside the task) or the gaps between them longer (dispatch).

Memory: the same kind of worker runs N tiny jobs; the RSS of the worker's main
process and of each pool process is read after 10 jobs and at checkpoints up
to N (default 1,000). Pool processes live as long as Celery lets them (no
``--max-tasks-per-child``): growth shows up instead of being recycled away.

    python bench/throughput_memory.py [--jobs 20] [--rounds 3] [--memory-jobs 1000] [--write FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import queue as queue_mod
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import redis
from _common import publish

from cadscope.freecad_bridge import JobSpec, build_env, discover_engines
from cadscope.freecad_bridge._engines import _engine_home
from cadscope.freecad_bridge._schema import material_library_path
from cadscope.workers import app, configure_app, run_job
from cadscope.workers._workload import ASSEMBLY, GRID, HOUSING, PLATE, PROFILE
from cadscope.workers.cli import worker_command

TINY = {
    "name": "tiny",
    "parts": [{"name": "p", "steps": [{"kind": "box", "name": "b", "length": 5, "width": 5, "height": 5}]}],
    "exports": [{"format": "brep", "of": "p", "name": "p", "validate_determinism": False}],
}


SLOTS = 2  # jobs at a time, in the bare loop and in the worker's pool


def slots_busy(jobs_s: float, wall_s: float) -> float:
    """The share of the slots' time a job was running: the jobs' own time over ``SLOTS`` x the wall time."""
    return jobs_s / (SLOTS * wall_s)


def mixed(engine: str, count: int) -> list[dict]:
    templates = [PLATE, ASSEMBLY, GRID, HOUSING, PROFILE]
    jobs = []
    for i in range(count):
        spec = copy.deepcopy(templates[i % len(templates)])
        spec["engine"] = engine
        for export in spec["exports"]:
            if engine == "ocp" and export["format"] == "obj":
                export["format"] = "stl"
        jobs.append(spec)
    return jobs


def bare_loop(engine_name: str, specs: list[dict], workdir: Path, parallel: int = SLOTS) -> tuple[float, float]:
    """Wall time of the loop, and the CAD processes' wall times summed."""
    engine = discover_engines()[engine_name]
    todo: queue_mod.Queue[tuple[int, dict]] = queue_mod.Queue()
    for item in enumerate(specs):
        todo.put(item)
    failures: list[str] = []
    job_s: list[float] = []

    def run() -> None:
        while True:
            try:
                index, spec = todo.get_nowait()
            except queue_mod.Empty:
                return
            out = workdir / f"bare-{index}"
            work = out / ".cadscope"
            work.mkdir(parents=True)
            job = JobSpec.model_validate(spec)
            payload = {"job": {**job.model_dump(mode="json"), "job_id": f"bare-{index}"},
                       "material_library": material_library_path()}  # fmt: skip
            (work / "job.json").write_text(json.dumps(payload))
            env = build_env(extra={"CADSCOPE_JOB": str(work / "job.json"), "CADSCOPE_OUT": str(out),
                                   "HOME": _engine_home()})  # fmt: skip
            began = time.perf_counter()
            proc = subprocess.run(list(engine.argv), env=env, cwd=work, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            job_s.append(time.perf_counter() - began)
            if proc.returncode != 0:
                failures.append(spec["name"])

    started = time.perf_counter()
    threads = [threading.Thread(target=run) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"bare runs failed: {failures}")
    return time.perf_counter() - started, sum(job_s)


class Worker:
    def __init__(self, broker: str, data: Path, concurrency: int = SLOTS) -> None:
        self.queue = f"bench-{uuid.uuid4().hex[:8]}"
        data.mkdir(parents=True)
        ready = data / "ready"
        env = {**os.environ, "CELERY_BROKER_URL": broker, "CELERY_RESULT_BACKEND": broker,
               "CADSCOPE_DATA_DIR": str(data), "PROMETHEUS_MULTIPROC_DIR": str(data / "metrics"),
               "CADSCOPE_METRICS_PORT": "0", "CADSCOPE_READY_FILE": str(ready),
               "CADSCOPE_TRACES_FILE": str(data / "traces.jsonl")}  # fmt: skip
        self.log = (data / "worker.log").open("wb")
        self.proc = subprocess.Popen(worker_command(self.queue, concurrency), env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 120
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start; see {data / 'worker.log'}")
            time.sleep(0.05)

    def run(self, specs: list[dict]) -> list[dict]:
        handles = [run_job.apply_async(args=[s], queue=self.queue) for s in specs]
        results = [h.get(timeout=600) for h in handles]
        bad = [r for r in results if r["status"] != "succeeded"]
        if bad:
            raise RuntimeError(f"{len(bad)} job(s) failed: {bad[0]}")
        return results

    def rss_mib(self) -> tuple[float, list[float]]:
        main = psutil.Process(self.proc.pid)
        children = [c for c in main.children() if "celery" in " ".join(c.cmdline())]
        return main.memory_info().rss / 2**20, sorted(c.memory_info().rss / 2**20 for c in children)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", default="freecad")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-jobs", type=int, default=1000)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--write")
    args = parser.parse_args()
    configure_app(app, args.broker)
    redis.Redis.from_url(args.broker).ping()
    lines = [f"\n### Throughput and memory ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
             f"{os.cpu_count()} cores, Python {platform.python_version()}, engine {args.engine})\n"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        specs = mixed(args.engine, args.jobs)
        worker = Worker(args.broker, Path(tmp) / "w1")
        bare_s: list[float] = []
        celery_s: list[float] = []
        # Where a round's time went: the jobs' own wall times summed (the CAD
        # processes in the bare loop; the task body, CAD process included, in
        # the worker), and the share of the two slots' time a job was running.
        bare_jobs: list[float] = []
        celery_jobs: list[float] = []
        try:
            worker.run(copy.deepcopy(specs[:2]))  # warm-up: first imports in each pool process
            # Alternate the two runners, round after round: a VM's speed drifts
            # from minute to minute, and a ratio of runs minutes apart measures it.
            for r in range(args.rounds):
                for runner in ("bare", "worker") if r % 2 == 0 else ("worker", "bare"):
                    if runner == "bare":
                        wall, jobs = bare_loop(args.engine, specs, Path(tmp) / f"bare-{r}")
                        bare_s.append(wall)
                        bare_jobs.append(jobs)
                    else:
                        started = time.perf_counter()
                        results = worker.run(copy.deepcopy(specs))
                        celery_s.append(time.perf_counter() - started)
                        celery_jobs.append(sum(result["duration_s"] for result in results))
                print(f"round {r + 1}: bare {bare_s[-1]:.1f} s (jobs {bare_jobs[-1]:.1f} s, slots busy "
                      f"{slots_busy(bare_jobs[-1], bare_s[-1]):.2f}), cadscope worker {celery_s[-1]:.1f} s (jobs "
                      f"{celery_jobs[-1]:.1f} s, slots busy {slots_busy(celery_jobs[-1], celery_s[-1]):.2f}), "
                      f"ratio {bare_s[-1] / celery_s[-1]:.3f}", flush=True)  # fmt: skip
        finally:
            worker.stop()
        ratios = [b / c for b, c in zip(bare_s, celery_s, strict=True)]

        def busy(jobs: list[float], walls: list[float]) -> float:
            return statistics.median(slots_busy(j, w) for j, w in zip(jobs, walls, strict=True))

        bare_med, celery_med = statistics.median(bare_s), statistics.median(celery_s)
        lines += [
            f"Mixed workload, {len(specs)} jobs (plate, assembly, grid, housing, profile), two at a time; "
            f"{args.rounds} rounds, the two runners alternating. The jobs' own time is the CAD processes' wall "
            "times summed in the bare loop, and the task bodies' (`duration_s`, the CAD process included) in "
            f"the worker; slots busy is that time over the two slots' ({SLOTS} x the wall time):\n",
            "| runner | wall time (median) | range | jobs per minute (median) | ratio to bare (median of rounds) "
            "| rounds' ratios | the jobs' own time, summed (median) | slots busy (median) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| bare loop of CAD subprocesses (no Celery, no telemetry) | {bare_med:.1f} s "
            f"| {min(bare_s):.1f}–{max(bare_s):.1f} s | {len(specs) / bare_med * 60:.1f} | 1.000 | "
            f"| {statistics.median(bare_jobs):.1f} s | {busy(bare_jobs, bare_s):.2f} |",
            f"| cadscope worker (Redis, prefork -c 2, all telemetry) | {celery_med:.1f} s "
            f"| {min(celery_s):.1f}–{max(celery_s):.1f} s | {len(specs) / celery_med * 60:.1f} "
            f"| **{statistics.median(ratios):.3f}** | {min(ratios):.3f}–{max(ratios):.3f} "
            f"| {statistics.median(celery_jobs):.1f} s | {busy(celery_jobs, celery_s):.2f} |",
            "",
        ]

        if args.memory_jobs < 10:
            print("\n".join(lines))
            return 0
        worker = Worker(args.broker, Path(tmp) / "w2")
        rows = []
        try:
            done, checkpoints = 0, sorted({10, *(c for c in (100, 250, 500, 1000, 2000) if c <= args.memory_jobs),
                                           args.memory_jobs})  # fmt: skip
            for checkpoint in checkpoints:
                batch = checkpoint - done
                for start in range(0, batch, 50):
                    worker.run([{**TINY, "engine": args.engine} for _ in range(min(50, batch - start))])
                done = checkpoint
                main_rss, pool = worker.rss_mib()
                rows.append((done, main_rss, pool))
                print(f"after {done} jobs: main {main_rss:.1f} MiB, pool {pool}", flush=True)
        finally:
            worker.stop()
    base_main, base_pool = rows[0][1], max(rows[0][2])
    lines += [
        f"Worker RSS running tiny jobs ({args.engine}), no pool recycling:\n",
        "| jobs done | main process | largest pool process | growth since 10 jobs (main / pool) |",
        "| --- | --- | --- | --- |",
    ]
    for done, main_rss, pool in rows:
        lines.append(f"| {done} | {main_rss:.1f} MiB | {max(pool):.1f} MiB | "
                     f"{main_rss - base_main:+.1f} / {max(pool) - base_pool:+.1f} MiB |")  # fmt: skip
    publish("\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
