"""``cadscope exec``: any command, once, outside Celery, as a contained, traced, auto-instrumented subprocess.

    cadscope exec [--out DIR] [--engine-name N] [--timeout S] -- freecadcmd my_macro.py
    cadscope exec -- python my_ocp_script.py

The command runs through the runner the workers use (own process group,
allowlisted environment, trace context, telemetry pipe), with cadscope's
child folder first on ``PYTHONPATH``: a Python it starts (FreeCAD's or any
other) turns auto-instrumentation on, so the script's FreeCAD and OCP calls
become spans and the catalogue's metrics without a change to it. Afterwards ``DIR``
holds ``traces.jsonl`` (OTLP/JSON), ``metrics.prom``, ``summary.json`` and the
command's ``stdout.log``/``stderr.log``; the waterfall and the classified
outcome are printed, and the exit status is non-zero when the command failed.
FreeCAD's exit code lies (0 after an uncaught exception), so failure is
judged as the workers judge it: the run's root span must end without an
error and the child must deliver its manifest; a non-zero exit fails it too.
With ``OTEL_EXPORTER_OTLP_ENDPOINT`` set the spans also go to that collector.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["add_exec_parser", "cmd_exec"]

_OUTPUTS = ("traces.jsonl", "metrics.prom", "summary.json", "stdout.log", "stderr.log")
# FreeCAD prints this (on stderr) for an exception in a macro it ran with exit status 0;
# a ``.py`` script's exception is seen in the process itself, a ``.FCMacro``'s only here.
_FREECAD_SCRIPT_ERROR = "Exception while processing file:"
_MEASURED = ("occt.boolean", "occt.feature", "occt.mesh", "document.recompute", "document.load",
             "document.create", "export")  # fmt: skip


def add_exec_parser(sub: Any) -> None:
    """Register ``cadscope exec`` on the CLI's subcommand parsers."""
    parser = sub.add_parser(
        "exec",
        help="run one command (freecadcmd my_macro.py, python my_ocp_script.py) traced and auto-instrumented",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  cadscope exec --out traced -- freecadcmd my_part.py\n  cadscope trace traced/traces.jsonl",
    )
    parser.add_argument("--out", default="cadscope-exec", help="folder for traces.jsonl, metrics.prom, summary.json")
    parser.add_argument("--engine-name", help="engine label (default: freecad for freecadcmd, else the program)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the command's group is killed")
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="-- ARGV...")


class _Recorded:
    """Keeps the child's telemetry until its versions are known (from its hello,
    which may come late), then hands it to the metrics."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def span_ended(self, name: str, attributes: Mapping[str, Any], duration_s: float, error_type: str | None) -> None:
        self.calls.append(("span_ended", (name, dict(attributes), duration_s, error_type)))

    def metric(self, name: str, value: float, attributes: Mapping[str, Any]) -> None:
        self.calls.append(("metric", (name, value, dict(attributes))))

    def progress(self, attributes: Mapping[str, Any]) -> None:
        self.calls.append(("progress", (dict(attributes),)))

    def replay(self, target: Any) -> None:
        for method, args in self.calls:
            getattr(target, method)(*args)

    def operations(self) -> dict[str, dict[str, Any]]:
        """Per measured operation: calls, how many were spans, and their durations."""
        durations: dict[str, list[float]] = defaultdict(list)
        spans: dict[str, int] = defaultdict(int)
        for method, args in self.calls:
            if method == "span_ended" and args[0] in _MEASURED:
                durations[args[0]].append(args[2])
                spans[args[0]] += 1
            elif method == "metric" and args[0].endswith(".ns") and args[0][:-3] in _MEASURED:
                durations[args[0][:-3]].append(args[1] / 1e9)
        out = {}
        for name, values in sorted(durations.items()):
            ordered = sorted(values)
            out[name] = {
                "calls": len(values),
                "spans": spans[name],
                "total_s": round(sum(values), 6),
                "p50_s": round(ordered[len(ordered) // 2], 6),
                "p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 6),
            }
        return out


def _fail(message: str, status: int = 2) -> int:
    print(f"cadscope exec: {message}", file=sys.stderr)
    return status


def _default_engine_name(program: str) -> str:
    name = os.path.basename(program).lower()
    if "freecad" in name:
        return "freecad"
    if name.startswith("python"):
        return "python"
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)[:32] or "command"


def cmd_exec(args: argparse.Namespace) -> int:
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode
    from prometheus_client import CollectorRegistry, generate_latest

    from ..freecad_bridge import RunLimits, auto_instrumentation_env, run
    from ..freecad_bridge._engines import USER_CODE_READ_BATCH_S, ChildTelemetry
    from ..metrics import Catalogue, ModelObservability, bound
    from ..tracing import setup_tracing, shutdown_tracing
    from ..tracing._waterfall import read_otlp_json, render_waterfall

    command = list(args.argv)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        return _fail("no command given (cadscope exec [--out DIR] -- freecadcmd my_macro.py)")
    if args.timeout <= 0:
        return _fail("--timeout must be positive")
    program = shutil.which(command[0])
    if program is None:
        return _fail(f"command not found: {command[0]}", 127)
    engine_name = args.engine_name or _default_engine_name(command[0])
    if not engine_name.replace("_", "").isalnum() or not engine_name[0].isalpha() or len(engine_name) > 32:
        return _fail(f"--engine-name {engine_name!r}: letters, digits and '_', starting with a letter")
    out = Path(args.out).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in _OUTPUTS:
            (out / name).unlink(missing_ok=True)
    except OSError as exc:
        return _fail(f"cannot use --out {args.out}: {exc.strerror or exc}")

    registry = CollectorRegistry()
    obs = ModelObservability(Catalogue(registry))
    provider = setup_tracing("cadscope-exec", traces_file=str(out / "traces.jsonl"), on_drop=obs.record_spans_dropped)
    tracer = trace.get_tracer("cadscope.exec", tracer_provider=provider)
    job_id = f"exec-{uuid.uuid4().hex[:12]}"
    recorded = _Recorded()
    env = auto_instrumentation_env(os.environ.get("PYTHONPATH"))
    started = time.time()
    try:
        with tracer.start_as_current_span(
            "cadscope exec", attributes={"cad.job_id": job_id, "process.executable.name": os.path.basename(program)}
        ) as root:
            trace_id = format(root.get_span_context().trace_id, "032x")
            try:
                result = run(
                    [program, *command[1:]],
                    limits=RunLimits(timeout_s=args.timeout, read_batch_s=USER_CODE_READ_BATCH_S),
                    env=env,
                    cwd=os.getcwd(),
                    stdout_path=str(out / "stdout.log"),
                    stderr_path=str(out / "stderr.log"),
                    tracer_provider=provider,
                    span_name=f"cad.subprocess {engine_name}",
                    attributes={"cad.engine": engine_name, "cad.job_id": job_id},
                    observer=recorded,
                    on_drop=lambda reason: obs.metrics.telemetry_rejected.labels(
                        bound("rejected_reason", reason)
                    ).inc(),
                )
            except OSError as exc:
                root.set_status(Status(StatusCode.ERROR, str(exc)))
                return _fail(f"cannot run {command[0]}: {exc.strerror or exc}", 126)
            outcome, error_type, message, note = _judge(result, program)
            if outcome != "ok":
                root.set_attribute("error.type", outcome)
                root.set_status(Status(StatusCode.ERROR, message[:256]))
            root.set_attribute("cad.exec.outcome", outcome)
    finally:
        shutdown_tracing(5000)

    hello = result.hello
    engine = str(hello.get("engine") or engine_name)
    versions = (str(hello.get("freecad_version", "none")), str(hello.get("occt_version", "unknown")))
    with obs.engine_versions(*versions):
        recorded.replay(ChildTelemetry(obs, "script"))
        labels = obs.versions().values()
        obs.metrics.subprocess_outcomes.labels(bound("engine", engine), bound("outcome", outcome), *labels).inc()
        obs.metrics.subprocess_peak_memory.labels(bound("engine", engine), *labels).observe(result.peak_rss_bytes)
        obs.record_occt_memory("process", result.peak_rss_bytes)
    (out / "metrics.prom").write_bytes(generate_latest(registry))

    spans = []
    if (out / "traces.jsonl").exists():
        with (out / "traces.jsonl").open() as lines:
            spans = [s for s in read_otlp_json(lines) if s.trace_id == trace_id]
    manifest = result.manifest or {}
    summary = {
        "job_id": job_id,
        "trace_id": trace_id,
        "program": os.path.basename(program),
        "outcome": outcome,
        "error_type": error_type,
        "error_message": message,
        "exit_code": result.exit_code,
        "signal": result.signal,
        "started": started,
        "duration_s": round(result.duration_s, 6),
        "cpu_s": round(result.cpu_s, 6),
        "peak_rss_bytes": result.peak_rss_bytes,
        "engine": engine,
        "freecad_version": versions[0],
        "occt_version": versions[1],
        "spans": len(spans),
        "operations": recorded.operations(),
        "exports": manifest.get("exports", []),
        "result": manifest.get("result", {}),
        "telemetry": {"events": result.events, "dropped": dict(result.dropped)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    render_waterfall(spans, sys.stdout)
    if note:
        print(f"note: {note}", file=sys.stderr)
    head = f"{outcome} in {result.duration_s:.2f} s ({engine} {versions[0]} / OCCT {versions[1]}), {len(spans)} spans"
    if outcome == "ok":
        print(f"cadscope exec: {head}; output in {out}")
        return 0
    print(f"cadscope exec: {head}: {error_type}: {message}")
    if result.stderr_tail.strip():
        tail = result.stderr_tail.strip().splitlines()[-12:]
        print("stderr (last lines):\n  " + "\n  ".join(tail), file=sys.stderr)
    if result.signal is not None:
        return 128 + result.signal
    return result.exit_code or 1


def _judge(result: Any, program: str) -> tuple[str, str | None, str, str]:
    """The runner's classification, plus what only a one-off command adds: a
    non-zero exit fails it even with a manifest, and a command that sent no
    telemetry at all (not a Python, or one that never started) is judged by
    its exit status alone."""
    outcome, error_type, message, note = result.outcome, result.error_type, result.error_message, ""
    if outcome == "bad_output" and error_type == "no_manifest" and result.events == 0:
        note = "the command sent no telemetry (not a Python cadscope could instrument): judged by its exit status"
        if result.exit_code == 0:
            return "ok", None, "", note
        return "script_error", f"exit_{result.exit_code}", f"exited with status {result.exit_code}", note
    if outcome == "ok" and result.exit_code not in (0, None):
        return "script_error", f"exit_{result.exit_code}", f"exited with status {result.exit_code}", note
    if outcome == "ok" and "freecad" in os.path.basename(program).lower():
        line = next((ln for ln in result.stderr_tail.splitlines() if _FREECAD_SCRIPT_ERROR in ln), None)
        if line is not None:
            return "script_error", "freecad_script_error", line.strip()[:256], note
    return outcome, error_type, message, note
