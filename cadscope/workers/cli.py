"""``cadscope``: run the whole pipeline on one machine, run a worker, read a trace.

cadscope run [--jobs N] [--engine auto|freecad|ocp|all] [--concurrency C] [--broker URL] [--out DIR]
cadscope worker [celery worker options...]
cadscope api [--host H] [--port P] [--workers N]
cadscope trace traces.jsonl [--job ID]
cadscope exec [--out DIR] [--engine-name N] -- ARGV...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ._exec import add_exec_parser, cmd_exec

__all__ = ["main", "worker_command"]

_OP_SPANS = (
    "occt.boolean",
    "occt.feature",
    "a4.solve",
    "a4.lcs_resolution",
    "document.recompute",
    "topology.hash",
    "export",
    "material.apply_property",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))] if ordered else 0.0


def worker_command(queue: str, concurrency: int, *extra: str) -> list[str]:
    """``celery worker`` (prefork) on ``queue``, named after it, as run by ``cadscope run``."""
    return [
        sys.executable, "-m", "celery", "-A", "cadscope.workers.app", "worker", "--pool", "prefork",
        "--concurrency", str(concurrency), "-Q", queue, "-n", f"{queue}@%h", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", *extra,
    ]  # fmt: skip


def _pick_engines(choice: str) -> list[str]:
    from ..freecad_bridge import discover_engines

    found = discover_engines()
    engines: list[str]
    if choice == "all":
        engines = [name for name in ("freecad", "ocp") if name in found]
    elif choice == "auto":
        engines = ["freecad"] if "freecad" in found else ["ocp"] if "ocp" in found else []
    else:
        engines = [choice] if choice in found else []
    if not engines:
        raise SystemExit(f"cadscope: no engine available for --engine {choice} (found: {sorted(found) or 'none'})")
    return engines


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    proc.kill()
    raise SystemExit(f"cadscope: the worker did not become ready (exit {proc.poll()}); log tail:\n{tail}")


def _progress_line(done: int, total: int, outcomes: Counter[str], stages: Counter[str]) -> str:
    """``[####....] 5/14 ok=4 script_error=1 | stages validate:6 generate:5 ...`` (jobs past each stage)."""
    width = 30
    filled = int(width * done / max(total, 1))
    counts = " ".join(f"{k}={v}" for k, v in sorted(outcomes.items()))
    order = ("validate", "generate", "assemble", "export", "validate_export")
    per_stage = " ".join(f"{name}:{stages[name]}" for name in order if stages[name])
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {counts} | stages {per_stage}   "


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback
                return
        except OSError:
            time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise SystemExit(f"cadscope: the API did not come up (exit {proc.poll()}); log tail:\n{tail}")


class _Api:
    """The few calls ``cadscope run`` makes to the API, over plain HTTP."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token

    def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - loopback
            self.url + path, data=data, method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return json.load(response)  # type: ignore[no-any-return]

    def submit(self, spec: dict[str, Any]) -> str:
        return str(self._call("POST", "/v1/jobs", spec)["job_id"])

    def status(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}")


def cmd_run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    if out.exists() and not args.keep_out:
        # Only what a previous run wrote: --out may be a folder with other files.
        for name in (
            "jobs",
            "broker",
            "metrics",
            "progress",
            "workers",
            "traces.jsonl",
            "metrics.prom",
            "summary.json",
            "worker.log",
            "api.log",
        ):
            target = out / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    broker = args.broker or os.environ.get("CELERY_BROKER_URL") or "embedded"
    engines = _pick_engines(args.engine)
    run_id = uuid.uuid4().hex[:8]
    queue = f"cadscope-run-{run_id}"
    metrics_port = args.metrics_port or _free_port()
    ready = out / f".ready-{run_id}"
    from ._config import EMBEDDED, broker_settings

    embedded = broker in (EMBEDDED, "filesystem://")
    backend = broker_settings(broker, out)["result_backend"]
    env = {
        **os.environ,
        # Celery's CLI reads these itself, so they hold real URLs only.
        "CELERY_BROKER_URL": "filesystem://" if embedded else broker,
        "CELERY_RESULT_BACKEND": backend,
        "CADSCOPE_DATA_DIR": str(out),
        "CADSCOPE_TRACES_FILE": str(out / "traces.jsonl"),
        "PROMETHEUS_MULTIPROC_DIR": str(out / "metrics"),
        "CADSCOPE_METRICS_PORT": str(metrics_port),
        "CADSCOPE_READY_FILE": str(ready),
        # The workload's deliberately failing jobs use fault injection.
        "CADSCOPE_ALLOW_FAULTS": "1",
    }
    from . import _workload

    where = "embedded broker (kombu filesystem transport, no server)" if embedded else broker.split("@")[-1]
    print(f"cadscope run: {args.jobs} jobs on {', '.join(engines)} via {where}; output in {out}", file=sys.stderr)

    token = uuid.uuid4().hex
    api_port = args.api_port or _free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    api_env = {k: v for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    api_env.update({"CADSCOPE_API_TOKEN": token, "CADSCOPE_QUEUE": queue})
    log = out / "worker.log"
    worker = subprocess.Popen(  # noqa: S603
        worker_command(queue, args.concurrency), stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    api = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "cadscope.workers.cli", "api", "--port", str(api_port)],
        stdout=(out / "api.log").open("wb"), stderr=subprocess.STDOUT, env=api_env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    expected_failures: dict[str, bool] = {}
    specs = _workload.workload(args.jobs, engines)
    try:
        _wait_for(ready, worker, 90, log)
        _wait_http(f"{api_url}/health/live", api, 60, out / "api.log")
        client = _Api(api_url, token)
        pending: dict[str, dict[str, Any]] = {}
        for spec in specs:
            job_id = client.submit(spec)
            pending[job_id] = spec
            expected_failures[job_id] = bool(spec.get("expect_failure"))
        outcomes: Counter[str] = Counter()
        stages_done: dict[str, set[str]] = {}  # per job: the stages it has finished
        shown = ""
        deadline = time.monotonic() + args.timeout
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                body = client.status(job_id)
                stages_done[job_id] = {s["stage"] for s in body.get("stages", [])}
                if body.get("state") == "finished":
                    results[job_id] = {**body, "stages": body.get("timings") or {}}
                    outcomes[body.get("outcome") or "unknown"] += 1
                    del pending[job_id]
            line = _progress_line(
                len(results), len(specs), outcomes, Counter(s for v in stages_done.values() for s in v)
            )
            if line != shown:
                sys.stderr.write("\r" + line)
                sys.stderr.flush()
                shown = line
            time.sleep(0.3)
        sys.stderr.write("\n")
        for job_id in pending:
            results[job_id] = {"job_id": job_id, "status": "failed", "outcome": "lost",
                               "error_message": f"no result within {args.timeout} s"}  # fmt: skip
        metrics_text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read()  # noqa: S310
        (out / "metrics.prom").write_bytes(metrics_text)
        if args.keep_serving:
            print(
                f"serving: API {api_url} (Authorization: Bearer {token}), API metrics {api_url}/metrics, "
                f"worker metrics http://127.0.0.1:{metrics_port}/metrics; Ctrl-C to stop",
                file=sys.stderr,
            )
            try:
                while worker.poll() is None and api.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    finally:
        for proc in (api, worker):  # the API first: nothing new reaches the worker
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # warm shutdown: children flush their spans
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    summary = _summarise(results, expected_failures, out / "traces.jsonl", specs)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary, sys.stdout)
    unexpected = summary["jobs"]["unexpected_failures"]
    if unexpected:
        print(f"cadscope run: {unexpected} job(s) that should have succeeded failed", file=sys.stderr)
    return 1 if unexpected else 0


def _summarise(
    results: dict[str, dict[str, Any]], expected: dict[str, bool], traces: Path, specs: list[dict[str, Any]]
) -> dict[str, Any]:
    from ..tracing._waterfall import read_otlp_json, traces_by_job

    by_engine: dict[tuple[str, str, str], dict[str, Any]] = {}
    stage_times: dict[tuple[str, str], list[float]] = defaultdict(list)
    engine_of: dict[str, tuple[str, str, str]] = {}
    succeeded = failed = expected_failures = unexpected = unexpected_successes = 0
    for job_id, result in results.items():
        engine = result.get("engine") or {}
        key = (engine.get("engine", "unknown"), engine.get("freecad_version", "?"), engine.get("occt_version", "?"))
        engine_of[job_id] = key
        row = by_engine.setdefault(
            key,
            {
                "engine": key[0],
                "freecad_version": key[1],
                "occt_version": key[2],
                "jobs": 0,
                "outcomes": Counter(),
                "peak_rss_bytes": 0,
            },
        )
        row["jobs"] += 1
        row["outcomes"][result.get("outcome", "unknown")] += 1
        row["peak_rss_bytes"] = max(row["peak_rss_bytes"], int(result.get("peak_rss_bytes") or 0))
        ok = result.get("status") == "succeeded"
        succeeded += ok
        failed += not ok
        if expected.get(job_id):
            expected_failures += 1
            unexpected_successes += ok
        elif not ok:
            unexpected += 1
        for stage, seconds in (result.get("stages") or {}).items():
            stage_times[(key[0], "stage:" + stage)].append(seconds)
        if "duration_s" in result:
            stage_times[(key[0], "job")].append(result["duration_s"])
    if traces.exists():
        with traces.open() as lines:
            for job_id, spans in traces_by_job(read_otlp_json(lines)).items():
                engine_key = engine_of.get(job_id)
                if engine_key is None:
                    continue
                for span in spans:
                    if span.name in _OP_SPANS:
                        stage_times[(engine_key[0], span.name)].append(span.duration_s)
    stages: dict[str, dict[str, Any]] = defaultdict(dict)
    for (engine, name), values in sorted(stage_times.items()):
        stages[name][engine] = {
            "count": len(values),
            "p50_s": round(_quantile(values, 0.5), 6),
            "p95_s": round(_quantile(values, 0.95), 6),
        }
    return {
        "jobs": {
            "submitted": len(specs),
            "succeeded": succeeded,
            "failed": failed,
            "expected_failures": expected_failures,
            "unexpected_failures": unexpected,
            "unexpected_successes": unexpected_successes,
        },
        "engines": [{**row, "outcomes": dict(row["outcomes"])} for row in by_engine.values()],
        "stages": stages,
        "results": [
            {k: r.get(k) for k in ("job_id", "status", "outcome", "error_type", "error_message", "duration_s")}
            for r in results.values()
        ],
    }


def _print_summary(summary: dict[str, Any], out: Any) -> None:
    jobs = summary["jobs"]
    out.write(
        f"\njobs: {jobs['submitted']} submitted, {jobs['succeeded']} succeeded, {jobs['failed']} failed "
        f"({jobs['expected_failures']} expected)\n\n"
    )
    out.write(f"{'engine':<8} {'FreeCAD':<8} {'OCCT':<7} {'jobs':>4}  {'peak RSS':>9}  outcomes\n")
    for row in summary["engines"]:
        outcomes = " ".join(f"{k}={v}" for k, v in sorted(row["outcomes"].items()))
        out.write(
            f"{row['engine']:<8} {row['freecad_version']:<8} {row['occt_version']:<7} {row['jobs']:>4}  "
            f"{row['peak_rss_bytes'] / 2**20:>6.0f} MiB  {outcomes}\n"
        )
    engines = sorted({e for per in summary["stages"].values() for e in per})
    out.write(f"\n{'stage / operation':<26}" + "".join(f"{e + ' p50':>13}{e + ' p95':>13}" for e in engines) + "\n")
    for name, per in summary["stages"].items():
        cells = "".join(
            f"{per[e]['p50_s'] * 1000:>10.1f} ms{per[e]['p95_s'] * 1000:>10.1f} ms"
            if e in per
            else f"{'-':>13}{'-':>13}"
            for e in engines
        )
        out.write(f"{name:<26}{cells}\n")


def cmd_worker(args: argparse.Namespace, extra: list[str]) -> int:
    argv = [sys.executable, "-m", "celery", "-A", "cadscope.workers.app", "worker", "--pool", "prefork", *extra]
    os.execv(sys.executable, argv)  # noqa: S606 - replaces this process with the worker
    return 0  # pragma: no cover


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Server processes (--workers N) share it: wiped before they start, as
        # prometheus_client asks, so no earlier run's files are summed in. It must
        # be the API's own directory; a worker wipes its own at its start.
        from ..metrics import enable_multiprocess

        enable_multiprocess(os.environ["PROMETHEUS_MULTIPROC_DIR"], wipe=True)
    uvicorn.run("cadscope.api:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level=args.log_level, access_log=False)  # fmt: skip
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from ..tracing._waterfall import read_otlp_json, render_waterfall, traces_by_job

    with open(args.file) as lines:
        jobs = traces_by_job(read_otlp_json(lines))
    if not jobs:
        print(f"cadscope trace: no job traces in {args.file}", file=sys.stderr)
        return 1
    if args.job is None:
        for job_id, spans in sorted(jobs.items()):
            engine = next((str(s.attributes["cad.engine"]) for s in spans if "cad.engine" in s.attributes), "")
            status = "ERROR" if any(s.status_code == 2 for s in spans) else "ok"
            print(f"{job_id}  {len(spans):4d} spans  trace {spans[0].trace_id}  {status:5} {engine}")
        print("\n(cadscope trace FILE --job ID draws one)", file=sys.stderr)
        return 0
    if args.job not in jobs:
        print(f"cadscope trace: no trace for job {args.job!r}", file=sys.stderr)
        return 1
    render_waterfall(jobs[args.job], sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cadscope", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline on this machine on a built-in workload")
    run.add_argument("--jobs", type=int, default=14)
    run.add_argument("--engine", choices=["auto", "freecad", "ocp", "all"], default="all")
    run.add_argument("--concurrency", type=int, default=2)
    run.add_argument("--broker", help="Celery broker URL (default: $CELERY_BROKER_URL, else the embedded broker)")
    run.add_argument("--out", default="cadscope-out")
    run.add_argument("--timeout", type=float, default=900, help="seconds to wait for the whole workload")
    run.add_argument("--metrics-port", type=int, default=0, help="worker /metrics port (default: a free one)")
    run.add_argument("--api-port", type=int, default=0, help="API port (default: a free one)")
    run.add_argument("--keep-serving", action="store_true", help="leave the worker and /metrics up afterwards")
    run.add_argument("--keep-out", action="store_true", help="do not clear a previous run's output first")
    sub.add_parser("worker", help="start a prefork Celery worker (other options go to celery worker)")
    api = sub.add_parser("api", help="serve the HTTP API (uvicorn); token from CADSCOPE_API_TOKEN[_FILE]")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1)
    api.add_argument("--log-level", default="warning")
    trace_cmd = sub.add_parser("trace", help="draw a job's trace from an OTLP/JSON file")
    trace_cmd.add_argument("file")
    trace_cmd.add_argument("--job")
    add_exec_parser(sub)
    args, extra = parser.parse_known_args(argv)
    if argv is None:
        # `cadscope trace ... | head` closes the pipe early: exit quietly, like cat.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if args.command == "worker":
        return cmd_worker(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "run":
        return cmd_run(args)
    if args.command == "api":
        return cmd_api(args)
    if args.command == "exec":
        return cmd_exec(args)
    return cmd_trace(args)


if __name__ == "__main__":
    sys.exit(main())
