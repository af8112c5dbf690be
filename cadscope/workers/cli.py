"""``cadscope``: run the whole pipeline on one machine, run a worker, read a trace.

cadscope run [--jobs N] [--engine auto|freecad|ocp|all] [--concurrency C] [--broker URL] [--out DIR]
cadscope run --baseline ENGINE[@OCCT_VERSION] --candidate ENGINE[@OCCT_VERSION] [--jobs N] [--out DIR]
cadscope worker [celery worker options...]
cadscope api [--host H] [--port P] [--workers N]
cadscope trace traces.jsonl [--job ID]
cadscope exec [--out DIR] [--engine-name N] -- ARGV...
cadscope compare RUN_DIR --baseline SELECTOR --candidate SELECTOR | BASE_DIR CAND_DIR | --prometheus URL ...
cadscope doctor [--broker URL] [--timeout S]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import psutil

import cadscope

from ..compare._cli import add_compare_parser, cmd_compare
from ._doctor import add_doctor_parser, cmd_doctor
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
    # -P: the current folder is not put on sys.path, so a folder named ``cadscope``
    # there (a clone, from its parent folder) cannot shadow the installed package.
    return [
        sys.executable, "-P", "-m", "celery", "-A", "cadscope.workers.app", "worker", "--pool", "prefork",
        "--concurrency", str(concurrency), "-Q", queue, "-n", f"{queue}@%h", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", *extra,
    ]  # fmt: skip


class CliError(Exception):
    """A user's mistake or an unreachable dependency: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, not the usage block
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _scheme_known(url: str) -> None:
    from kombu import Connection

    try:
        Connection(url).transport_cls  # noqa: B018 - KeyError for an unknown scheme
    except KeyError:
        known = "redis://, rediss://, amqp:// or embedded"
        raise CliError(f"unknown broker scheme in {redacted_url(url)!r} (use {known})") from None
    except ImportError as exc:
        raise CliError(f"the broker {redacted_url(url)!r} needs a module that is not installed ({exc.name})") from None
    except ValueError as exc:
        raise CliError(f"bad broker URL {redacted_url(url)!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a transport module that fails to load (kombu's kafka does)
        raise CliError(f"the broker {redacted_url(url)!r} cannot be used: its transport failed to load "
                       f"({type(exc).__name__})") from None  # fmt: skip


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text) if text != "0" else 0
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a port: {value}")
    return value


def redacted_url(url: str) -> str:
    """``url`` without its password, fit for an error message or a log line."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return url.split("@")[-1]


def check_broker(url: str, timeout_s: float = 8.0) -> None:
    """Fail fast, naming the broker (never its password), when its scheme is unknown
    or it does not answer: Celery itself would retry for minutes and then dump its log."""
    from kombu import Connection

    _scheme_known(url)
    shown = redacted_url(url)
    connection = Connection(url, connect_timeout=3)
    try:
        if type(connection.transport).__module__.endswith("filesystem"):
            return
        connection.ensure_connection(
            max_retries=2, interval_start=0.5, interval_step=0.5, interval_max=1, timeout=timeout_s
        )
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the same answer to a user
        reason = str(exc).replace(url, shown).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CliError(f"cannot reach the broker at {shown}: {reason}") from None
    finally:
        connection.release()


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
        raise CliError(f"no engine available for --engine {choice} (found: {sorted(found) or 'none'})")
    return engines


def _pool(text: str, option: str) -> tuple[str, str | None]:
    """An ``ENGINE[@OCCT_VERSION]`` that exists on this host, as (engine, version or None)."""
    from ..freecad_bridge import discover_engines
    from ._config import parse_engine

    try:
        name, version = parse_engine(text)
    except ValueError as exc:
        raise CliError(f"{option}: {exc}") from None
    found = discover_engines()
    if (name if version is None else f"{name}@{version}") not in found:
        raise CliError(f"{option} {text}: no such engine here (found: {', '.join(sorted(found)) or 'none'})")
    return name, version


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise CliError(f"the worker did not become ready within {timeout:g} s (exit {proc.poll()}); see {log}")


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
    raise CliError(f"the API did not come up within {timeout:g} s (exit {proc.poll()}); see {log}")


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
        try:
            return self._call("GET", f"/v1/jobs/{job_id}")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # a shadow job its worker has not taken yet
                return {"job_id": job_id, "state": "unknown"}
            raise


class _Stop(Exception):
    """SIGTERM to ``cadscope run``: stop as Ctrl-C does."""


def _raise_stop(signum: int, _frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def cmd_run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    broker = args.broker or os.environ.get("CELERY_BROKER_URL") or "embedded"
    from ._config import EMBEDDED, broker_settings

    embedded = broker in (EMBEDDED, "filesystem://")
    if (args.baseline is None) != (args.candidate is None):
        raise CliError("--baseline and --candidate go together")
    if args.baseline is not None:
        baseline = _pool(args.baseline, "--baseline")
        _pool(args.candidate, "--candidate")
        engines = [baseline[0]]
    else:
        engines = _pick_engines(args.engine)
    if not embedded:
        check_broker(broker)
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
            "results.jsonl",
            "metrics-candidate.prom",
            "worker.log",
            "candidate-worker.log",
            "metrics-candidate",
            "api.log",
        ):
            target = out / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        for stale in out.glob(".ready-*"):  # a worker's ready marker that a killed run left behind
            stale.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:8]
    queue = f"cadscope-run-{run_id}"
    metrics_port = args.metrics_port or _free_port()
    ready = out / f".ready-{run_id}"
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

    where = "embedded broker (kombu filesystem transport, no server)" if embedded else redacted_url(broker)
    on = ", ".join(engines) if args.baseline is None else f"{args.baseline}, shadowed on {args.candidate}"
    print(f"cadscope run: {args.jobs} jobs on {on} via {where}; output in {out}", file=sys.stderr)

    token = uuid.uuid4().hex
    api_port = args.api_port or _free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    api_env = {k: v for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    api_env.update({"CADSCOPE_API_TOKEN": token, "CADSCOPE_QUEUE": queue})
    workers_env = [(queue, env, out / "worker.log", ready)]
    if args.baseline is not None:
        # Two pools, a worker pinned to each: the baseline's takes the jobs, the API sends
        # every job's shadow to the candidate's queue.
        shadow_queue = f"{queue}-candidate"
        candidate_ready = out / f".ready-{run_id}-candidate"
        candidate_env = {**env, "CADSCOPE_ENGINE": args.candidate, "CADSCOPE_READY_FILE": str(candidate_ready),
                         "PROMETHEUS_MULTIPROC_DIR": str(out / "metrics-candidate"),
                         "CADSCOPE_METRICS_PORT": str(_free_port())}  # fmt: skip
        env["CADSCOPE_ENGINE"] = args.baseline
        api_env.update({"CADSCOPE_SHADOW_FRACTION": "1", "CADSCOPE_SHADOW_QUEUE": shadow_queue,
                        "CADSCOPE_SHADOW_ENGINE": args.candidate})  # fmt: skip
        workers_env.append((shadow_queue, candidate_env, out / "candidate-worker.log", candidate_ready))
    # SIGTERM (a service manager, `kill`) stops the run as Ctrl-C does: the API and the
    # worker are stopped and the summary is written, rather than leaving both running.
    previous_term = signal.signal(signal.SIGTERM, _raise_stop)
    # The children run in the output folder, not the user's: Celery puts its working
    # folder on sys.path, where a folder named ``cadscope`` (a clone, seen from its
    # parent folder) would shadow the installed package.
    pool_workers = [
        subprocess.Popen(  # noqa: S603
            worker_command(name, args.concurrency),
            stdout=path.open("wb"),
            stderr=subprocess.STDOUT,
            env=environ,
            stdin=subprocess.DEVNULL,
            cwd=out,
        )  # fmt: skip
        for name, environ, path, _ready in workers_env
    ]
    worker = pool_workers[0]
    api = subprocess.Popen(  # noqa: S603
        [sys.executable, "-P", "-m", "cadscope.workers.cli", "api", "--port", str(api_port)],
        stdout=(out / "api.log").open("wb"), stderr=subprocess.STDOUT, env=api_env, stdin=subprocess.DEVNULL,
        cwd=out,
    )  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    expected_failures: dict[str, bool] = {}
    specs = _workload.workload(args.jobs, engines, None if args.baseline is None else baseline[1])
    pending: dict[str, dict[str, Any]] = {}
    names: dict[str, str] = {}  # job id -> workload job name
    interrupted = ""
    gone = ""  # a worker or the API that exited before the workload was done
    watched = [("API", api, out / "api.log")]
    watched += [("worker", proc, path) for proc, (_n, _e, path, _r) in zip(pool_workers, workers_env, strict=True)]
    # The workers' pool processes and engines, as last seen: a worker killed outright leaves them
    # running its jobs; they are stopped with the run.
    descendants: dict[int, psutil.Process] = {}
    unanswered = 0  # status reads in a row the API did not answer
    try:
        for proc, (_name, _environ, path, ready_path) in zip(pool_workers, workers_env, strict=True):
            _wait_for(ready_path, proc, 90, path)
        _wait_http(f"{api_url}/health/live", api, 60, out / "api.log")
        client = _Api(api_url, token)
        for spec in specs:
            job_id = client.submit(spec)
            pending[job_id] = spec
            names[job_id] = spec["name"]
            expected_failures[job_id] = bool(spec.get("expect_failure"))
            if args.baseline is not None:
                shadow_id = f"{job_id[:56]}-shadow"
                pending[shadow_id] = spec
                names[shadow_id] = spec["name"]
                expected_failures[shadow_id] = bool(spec.get("expect_failure"))
        outcomes: Counter[str] = Counter()
        stages_done: dict[str, set[str]] = {}  # per job: the stages it has finished
        finished_at: dict[str, float] = {}
        shown = ""
        deadline = time.monotonic() + args.timeout
        while pending and time.monotonic() < deadline:
            # Read after a death is noticed, once: a job stored just before it still counts.
            exited = next(((what, proc, log) for what, proc, log in watched if proc.poll() is not None), None)
            if exited is not None:
                gone = _exit_message(*exited)
                if exited[1] is api:
                    break
            _track_descendants(pool_workers, descendants)
            try:
                bodies = [(job_id, client.status(job_id)) for job_id in list(pending)]
                unanswered = 0
            except (OSError, http.client.HTTPException, ValueError) as exc:
                if api.poll() is None and unanswered < 20:
                    unanswered += 1
                    time.sleep(0.3)
                    continue
                if api.poll() is None:
                    raise CliError(f"the API at {api_url} stopped answering: {exc}; see {out / 'api.log'}") from exc
                gone = _exit_message("API", api, out / "api.log")
                break
            for job_id, body in bodies:
                stages_done[job_id] = {s["stage"] for s in body.get("stages", [])}
                if body.get("state") == "finished":
                    # The job's last event can come a moment before its result is stored: wait
                    # for the result (its engine) a little before taking the job without it.
                    seen = finished_at.setdefault(job_id, time.monotonic())
                    if "engine" not in body and body.get("status") == "succeeded" and time.monotonic() - seen < 10:
                        continue
                    results[job_id] = {**body, "stages": body.get("timings") or {}}
                    outcomes[body.get("outcome") or "unknown"] += 1
                    del pending[job_id]
            line = _progress_line(
                len(results), len(names), outcomes, Counter(s for v in stages_done.values() for s in v)
            )
            if line != shown:
                sys.stderr.write("\r" + line)
                sys.stderr.flush()
                shown = line
            if gone:
                break
            time.sleep(0.3)
        sys.stderr.write("\n")
        scrapes = [(metrics_port, out / "metrics.prom")]
        if len(workers_env) > 1:  # the candidate pool's worker: its own exposition
            scrapes.append((int(workers_env[1][1]["CADSCOPE_METRICS_PORT"]), out / "metrics-candidate.prom"))
        for port, path in scrapes:
            try:
                path.write_bytes(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read())  # noqa: S310
            except OSError as exc:
                if not gone:
                    raise CliError(f"the worker's metrics at port {port} could not be read: {exc}") from exc
        if args.keep_serving and not gone:
            print(
                f"serving: API {api_url} (Authorization: Bearer {token}), API metrics {api_url}/metrics, "
                f"worker metrics http://127.0.0.1:{metrics_port}/metrics; Ctrl-C to stop",
                file=sys.stderr,
            )
            try:
                while worker.poll() is None and api.poll() is None:
                    time.sleep(1)
            except (KeyboardInterrupt, _Stop):
                pass
    except (KeyboardInterrupt, _Stop) as exc:
        interrupted = "SIGINT" if isinstance(exc, KeyboardInterrupt) else str(exc)
        sys.stderr.write(f"\ncadscope run: {interrupted}: stopping the API and the worker\n")
    finally:
        # A second signal while stopping must not cut the stop short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for proc in (api, *pool_workers):  # the API first: nothing new reaches the workers
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # warm shutdown: children flush their spans
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for orphan in descendants.values():  # what a worker that died left running
            with contextlib.suppress(psutil.Error):
                orphan.kill()
        ready.unlink(missing_ok=True)  # the worker removes it at its shutdown; not if it was killed
        signal.signal(signal.SIGTERM, previous_term)
    for job_id in pending:
        if job_id not in results:
            message = f"stopped by {interrupted}" if interrupted else gone or f"no result within {args.timeout} s"
            outcome = "interrupted" if interrupted else "lost"
            results[job_id] = {"job_id": job_id, "status": "failed", "outcome": outcome, "error_message": message}
    summary = _summarise(results, expected_failures, out / "traces.jsonl", specs)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_results(out / "results.jsonl", results, names)
    _print_summary(summary, sys.stdout)
    unexpected = summary["jobs"]["unexpected_failures"]
    lost = bool(gone and pending)  # an exit after the last job was read lost nothing
    if lost:
        print(f"cadscope run: {gone}", file=sys.stderr)
    if unexpected:
        print(f"cadscope run: {unexpected} job(s) that should have succeeded failed", file=sys.stderr)
    if interrupted and pending:
        return 130 if interrupted == "SIGINT" else 143
    return 1 if unexpected or lost else 0


def _exit_message(what: str, proc: subprocess.Popen[bytes], log: Path) -> str:
    return f"the {what} exited with status {proc.returncode} before the workload was done; see {log}"


def _track_descendants(workers: list[subprocess.Popen[bytes]], seen: dict[int, psutil.Process]) -> None:
    """Add the live workers' descendants to ``seen`` (psutil checks a pid is not reused before a kill)."""
    for worker in workers:
        if worker.poll() is not None:
            continue
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(worker.pid).children(recursive=True):
                seen.setdefault(child.pid, child)


def _write_results(path: Path, results: dict[str, dict[str, Any]], names: dict[str, str]) -> None:
    """``results.jsonl``: a line per job, primary and shadow, with its engine and its manifest."""
    with path.open("w") as lines:
        for job_id, result in results.items():
            engine = result.get("engine") or {}
            record = {
                "job_id": job_id,
                "name": names.get(job_id),
                "engine": engine.get("engine"),
                "freecad_version": engine.get("freecad_version"),
                "occt_version": engine.get("occt_version"),
                "role": result.get("role") or ("shadow" if job_id.endswith("-shadow") else "primary"),
                "outcome": result.get("outcome"),
                "error_message": result.get("error_message"),
                "manifest": result.get("manifest"),
            }
            lines.write(json.dumps(record) + "\n")


def _engine_labels(results: dict[str, dict[str, Any]]) -> dict[str, str]:
    """A column name per job: the engine's, or with its OCCT version (``ocp@7.9.3``) where two
    versions of one engine ran, and ``/shadow`` where one pool ran both roles."""

    def parts(result: dict[str, Any]) -> tuple[str, str, str]:
        engine = result.get("engine") or {}
        role = result.get("role") or "primary"
        return str(engine.get("engine", "unknown")), str(engine.get("occt_version", "?")), str(role)

    combos = {parts(r) for r in results.values()}
    by_name = {name for name, _, _ in combos}
    pools = {(name, version) for name, version, _ in combos}
    labels = {}
    for job_id, result in results.items():
        name, version, role = parts(result)
        label = name if len(by_name) == len(pools) else f"{name}@{version}"
        if len(pools) < len(combos) and role == "shadow":
            label += "/shadow"
        labels[job_id] = label
    return labels


def _summarise(
    results: dict[str, dict[str, Any]], expected: dict[str, bool], traces: Path, specs: list[dict[str, Any]]
) -> dict[str, Any]:
    from ..tracing._waterfall import read_otlp_json, traces_by_job

    by_engine: dict[tuple[str, str, str], dict[str, Any]] = {}
    stage_times: dict[tuple[str, str], list[float]] = defaultdict(list)
    engine_of: dict[str, tuple[str, str, str]] = {}
    succeeded = failed = expected_failures = unexpected = unexpected_successes = 0
    labels = _engine_labels(results)
    for job_id, result in results.items():
        engine = result.get("engine") or {}
        key = (labels[job_id], engine.get("freecad_version", "?"), engine.get("occt_version", "?"))
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
    if os.environ.get("CELERY_BROKER_URL") and "-b" not in extra and not any(a.startswith("--broker") for a in extra):
        _scheme_known(os.environ["CELERY_BROKER_URL"])
    argv = [sys.executable, "-m", "celery", "-A", "cadscope.workers.app", "worker", "--pool", "prefork", *extra]
    os.execv(sys.executable, argv)  # noqa: S606 - replaces this process with the worker
    return 0  # pragma: no cover


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from ..api import ApiSettings

    try:
        settings = ApiSettings.from_env()
    except OSError as exc:
        raise CliError(f"cannot read CADSCOPE_API_TOKEN_FILE: {exc.strerror} ({exc.filename})") from None
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if not settings.token and not settings.allow_anonymous:
        raise CliError("no API token: set CADSCOPE_API_TOKEN or CADSCOPE_API_TOKEN_FILE "
                       "(or CADSCOPE_API_ALLOW_ANONYMOUS=1 to run without one)")  # fmt: skip
    if settings.broker_url:
        _scheme_known(settings.broker_url)
    made = _api_metrics_dir(args.workers)
    try:
        uvicorn.run("cadscope.api:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                    log_level=args.log_level, access_log=False)  # fmt: skip
    finally:
        if made:
            shutil.rmtree(made, ignore_errors=True)
    return 0


def _api_metrics_dir(workers: int) -> str | None:
    """One multiprocess directory for the API's server processes, so that every scrape, whichever
    process serves it, sums them all: one process's registry alone makes counters jump back.

    ``PROMETHEUS_MULTIPROC_DIR`` when set, wiped first as prometheus_client asks (no earlier run's
    files summed in; so it must be the API's own: a worker wipes its own at its start). With
    several processes and none set, a temporary one, returned to be removed at exit. A thread of
    this process (uvicorn's supervisor) compacts the files of server processes that are gone, as
    a worker's main process does: their counts are kept, their live gauges dropped, so a killed
    one leaves no request or event stream open on the dashboards for ever.
    """
    from ..metrics import CompactingMultiProcessCollector, enable_multiprocess

    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    made = None
    if not path:
        if workers <= 1:
            return None  # one process: its own registry is the whole truth
        path = made = tempfile.mkdtemp(prefix="cadscope-api-metrics-")
    path = enable_multiprocess(path, wipe=True)
    collector = CompactingMultiProcessCollector(None, path)

    def compact_gone_processes() -> None:
        while True:
            time.sleep(2)
            try:
                collector.compact()
            except Exception:  # noqa: BLE001 - tried again on the next pass; never takes the API down
                logging.getLogger("cadscope.api").exception("metrics compaction failed")

    threading.Thread(target=compact_gone_processes, name="cadscope-api-compaction", daemon=True).start()
    return made


def cmd_trace(args: argparse.Namespace) -> int:
    from ..tracing._waterfall import read_otlp_json, render_waterfall, traces_by_job

    try:
        with open(args.file) as lines:
            jobs = traces_by_job(read_otlp_json(lines))
    except FileNotFoundError:
        raise CliError(f"no such file: {args.file}") from None
    except IsADirectoryError:
        raise CliError(f"{args.file} is a folder; give the traces file in it (traces.jsonl)") from None
    except PermissionError:
        raise CliError(f"cannot read {args.file}: permission denied") from None
    except UnicodeDecodeError:
        raise CliError(f"{args.file} is not text: expected OTLP/JSON lines") from None
    except ValueError as exc:
        raise CliError(f"{args.file}: {exc}; expected OTLP/JSON lines") from None
    except (KeyError, TypeError, AttributeError):
        raise CliError(f"{args.file} is JSON but not OTLP/JSON trace lines") from None
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
    parser = _Parser(prog="cadscope", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cadscope {cadscope.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    examples = argparse.RawDescriptionHelpFormatter
    run = sub.add_parser("run", help="run the whole pipeline on this machine on a built-in workload",
                         formatter_class=examples, epilog="example:\n  cadscope run --jobs 14 --engine all --out "
                         "cadscope-out\n  cadscope run --broker redis://127.0.0.1:6379/0 --keep-serving")  # fmt: skip
    run.add_argument("--jobs", type=_positive_int, default=14)
    run.add_argument("--engine", choices=["auto", "freecad", "ocp", "all"], default="all")
    run.add_argument("--concurrency", type=_positive_int, default=2)
    run.add_argument("--broker", help="Celery broker URL (default: $CELERY_BROKER_URL, else the embedded broker)")
    run.add_argument("--out", default="cadscope-out")
    run.add_argument("--timeout", type=_positive_float, default=900, help="seconds to wait for the whole workload")
    run.add_argument("--metrics-port", type=_port, default=0, help="worker /metrics port (default: a free one)")
    run.add_argument("--api-port", type=_port, default=0, help="API port (default: a free one)")
    run.add_argument("--keep-serving", action="store_true", help="leave the worker and /metrics up afterwards")
    run.add_argument("--keep-out", action="store_true", help="do not clear a previous run's output first")
    run.add_argument(
        "--baseline",
        metavar="ENGINE[@OCCT_VERSION]",
        help="run the workload on this engine as primary (with --candidate; e.g. ocp@8.0.1)",
    )
    run.add_argument("--candidate", metavar="ENGINE[@OCCT_VERSION]",
                     help="and every job again on this engine as a shadow run, into the same --out")  # fmt: skip
    sub.add_parser("worker", help="start a prefork Celery worker (other options go to celery worker)",
                   formatter_class=examples, epilog="example:\n  CELERY_BROKER_URL=redis://127.0.0.1:6379/0 "
                   "cadscope worker -Q cadscope --concurrency 4")  # fmt: skip
    api = sub.add_parser("api", help="serve the HTTP API (uvicorn); token from CADSCOPE_API_TOKEN[_FILE]",
                         formatter_class=examples, epilog="example:\n  CADSCOPE_API_TOKEN=$(openssl rand -hex 16) "
                         "cadscope api --host 0.0.0.0 --port 8000 --workers 2")  # fmt: skip
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=_port, default=8000)
    api.add_argument("--workers", type=_positive_int, default=1)
    api.add_argument("--log-level", default="warning")
    trace_cmd = sub.add_parser("trace", help="draw a job's trace from an OTLP/JSON file", formatter_class=examples,
                               epilog="example:\n  cadscope trace cadscope-out/traces.jsonl            (list the jobs)"
                               "\n  cadscope trace cadscope-out/traces.jsonl --job ID   (draw one)")  # fmt: skip
    trace_cmd.add_argument("file")
    trace_cmd.add_argument("--job")
    add_exec_parser(sub)
    add_compare_parser(sub)
    add_doctor_parser(sub)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "worker":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "worker":
            return cmd_worker(args, extra)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "api":
            return cmd_api(args)
        if args.command == "exec":
            return cmd_exec(args)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "doctor":
            return cmd_doctor(args)
        if argv is None:
            # `cadscope trace ... | head` closes the pipe early: exit quietly, like cat. Only
            # here: a server (the API) must get EPIPE as an error on a socket its peer closed
            # (a Redis restart, an idle timeout), not die of the signal.
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        return cmd_trace(args)
    except CliError as exc:
        print(f"cadscope {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
