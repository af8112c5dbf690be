"""The CAD job task: validate → engine (generate, assemble, export, validate_export) → collect."""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from functools import lru_cache
from timeit import default_timer
from typing import Any

from celery import Task
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Status, StatusCode
from pydantic import ValidationError

from ..freecad_bridge import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_PROCESSES,
    EngineUnavailable,
    JobSpec,
    RunLimits,
    discover_engines,
    pick_engine,
    run_cad_job,
)
from ..freecad_bridge._documents import DocumentCache, DocumentError, fetch_document
from ..metrics import ModelObservability, default_observability
from ..tracing import job_id_var
from ._app import PUBLISHED_AT_HEADER, app, progress
from ._config import WorkerSettings, parse_engine, shadow_selected
from ._progress import PROGRESS_TTL_S, claim_run

__all__ = ["TASK_NAME", "publish_shadow", "run_job", "shadow_spec"]

log = logging.getLogger("cadscope.workers")

TASK_NAME = "cadscope.run_job"
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@lru_cache(maxsize=1)
def _settings() -> WorkerSettings:
    return WorkerSettings.from_env()


def _published_at(task: Task) -> float | None:
    request = task.request
    value = getattr(request, PUBLISHED_AT_HEADER, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(PUBLISHED_AT_HEADER)
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _default_versions() -> tuple[str, str]:
    engines = discover_engines()
    info = engines.get("freecad") or engines.get("ocp")
    return (info.freecad_version, info.occt_version) if info else ("unknown", "unknown")


def _failure(job_id: str, outcome: str, error_type: str, message: str, **extra: Any) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "status": "failed",
        "outcome": outcome,
        "error_type": error_type,
        "error_message": message,
        **extra,
    }


def shadow_spec(spec: dict[str, Any], candidate: str) -> dict[str, Any]:
    """The primary's job spec for the candidate engine (``ENGINE[@OCCT_VERSION]``)."""
    from ._workload import for_engine

    name, version = parse_engine(candidate)
    return {**for_engine(spec, name), "occt_version": version}


def publish_shadow(spec: Any, job_id: str, candidate: str, queue: str, primary: trace.SpanContext | None) -> str:
    """Send a shadow of job ``job_id`` to the candidate pool's ``queue``; return its job id.

    The shadow is a trace of its own, linked to the primary's (a span link, not a
    parent: its duration is not part of the primary's journey), and its result is
    kept under its own id (``<job_id>-shadow``), never the primary's."""
    shadow_id = f"{job_id[:56]}-shadow"
    tracer = trace.get_tracer("cadscope.workers")
    links: list[Link] = []
    traceparent = None
    if primary is not None and primary.is_valid:
        links.append(Link(primary, {"cad.role": "primary"}))
        traceparent = f"00-{primary.trace_id:032x}-{primary.span_id:016x}-{int(primary.trace_flags):02x}"
    with tracer.start_as_current_span("cad.shadow publish", context=Context(), links=links) as span:
        span.set_attributes({"cad.role": "shadow", "cad.job_id": shadow_id, "cad.primary_job_id": job_id})
        run_job.apply_async(
            args=[shadow_spec(spec, candidate) if isinstance(spec, dict) else spec],
            kwargs={"job_id": shadow_id, "role": "shadow", "primary_traceparent": traceparent,
                    "primary_job_id": job_id},
            task_id=shadow_id, queue=queue, retry=False,
        )  # fmt: skip
    return shadow_id


@app.task(name=TASK_NAME, bind=True)
def run_job(
    self: Task,
    spec: Any,
    job_id: str | None = None,
    role: str = "primary",
    primary_traceparent: str | None = None,
    shadowed: bool = False,
    primary_job_id: str | None = None,
) -> dict[str, Any]:
    """Run one CAD job. Returns a JSON result; a failed job is a result with
    ``status="failed"`` and a classified ``outcome``, not a task exception.

    ``role="shadow"``: a copy of a primary job on a candidate engine, linked to the
    primary's trace (``primary_traceparent``) and named by ``primary_job_id``; ``shadowed``: an API already sent
    this primary's shadow, so the worker's own shadow fraction leaves it alone."""
    role = "shadow" if role == "shadow" else "primary"
    with default_observability().role(role):
        result = _run_task(self, spec, job_id, role, primary_traceparent)
    if isinstance(result, dict) and (role == "shadow" or shadowed):
        try:
            _compare_with_twin(result, role, primary_job_id)
        except Exception:  # noqa: BLE001 - a comparison never fails the job
            log.warning("shadow comparison failed", exc_info=True)
    settings = _settings()
    primary_id = result.get("job_id") if isinstance(result, dict) else None
    if role == "primary" and not shadowed and primary_id and shadow_selected(primary_id, settings.shadow_fraction):
        assert settings.shadow_engine is not None and settings.shadow_queue is not None  # checked at start-up
        try:
            publish_shadow(spec, primary_id, settings.shadow_engine, settings.shadow_queue,
                           trace.get_current_span().get_span_context())  # fmt: skip
        except Exception:  # noqa: BLE001 - a shadow never fails its primary
            log.warning("shadow not published", exc_info=True)
    return result


def _run_task(self: Task, spec: Any, job_id: str | None, role: str, primary_traceparent: str | None) -> dict[str, Any]:
    started = default_timer()
    obs = default_observability()
    m = obs.metrics
    job_id = job_id if isinstance(job_id, str) and _JOB_ID.fullmatch(job_id) else str(self.request.id)
    published = _published_at(self)
    # At most once to its end: a twin delivery is dropped before it counts as an attempt.
    earlier = claim_run(progress(), job_id, None if published is None else repr(published),
                        _settings().visibility_timeout)  # fmt: skip
    if earlier is not None:
        return earlier
    token = job_id_var.set(job_id)
    if published is not None:
        m.task_queue_wait.labels(TASK_NAME).observe(max(time.time() - published, 0.0))
    span = trace.get_current_span()
    span.set_attribute("cad.job_id", job_id)
    span.set_attribute("cad.role", role)
    primary = _span_context(primary_traceparent)
    if primary is not None:
        span.add_link(primary, {"cad.role": "primary"})
    span.set_attribute("process.pid", os.getpid())  # which pool process ran it (the resource is the worker's)
    dead, attempt = _count_delivery(job_id, span)
    if dead is not None:
        job_id_var.reset(token)
        m.task_outcomes.labels(TASK_NAME, "dead_letter").inc()
        progress().finish(job_id, result=dead, **{k: dead.get(k) for k in ("status", "outcome", "error_type")})
        return dead
    try:
        result = _run(obs, spec, job_id, started, attempt)
        result["role"] = role
    except Exception as exc:
        m.task_finished(TASK_NAME, "failure", max(default_timer() - started, 0))
        progress().finish(job_id, status="failed", outcome="task_error", error_type=type(exc).__name__)
        raise
    finally:
        job_id_var.reset(token)
    progress().finish(
        job_id, result=result, **{k: result.get(k) for k in ("status", "outcome", "error_type", "duration_s")}
    )
    outcome = "success" if result["status"] == "succeeded" else "failure"
    m.task_finished(TASK_NAME, outcome, max(default_timer() - started, 0))
    return result


def _count_delivery(job_id: str, span: trace.Span) -> tuple[dict[str, Any] | None, int]:
    """Count this delivery; link the attempts lost before it; dead-letter a poison job.

    A pool process killed mid-job (OOM, hard time limit, a crash) does not end
    its spans; the worker's main process ends them at its death from the
    span journal, the task span of that attempt among them. Each delivery
    records its task span's context with its start, so the next one can link
    to the attempt that was lost, count it, and, past
    ``CADSCOPE_MAX_DELIVERIES``, refuse to run the job again. Returns the dead-letter result
    (or None) and this delivery's number (0 when the store could not count it).
    """
    now = time.time()
    context = span.get_span_context()
    traceparent = f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
    try:
        attempts = progress().store.record_attempt(job_id, now, traceparent if context.is_valid else None)
    except Exception:  # noqa: BLE001 - without the store we cannot count: run the job
        log.warning("delivery count unavailable", exc_info=True)
        return None, 0
    attempt = len(attempts)
    span.set_attribute("cad.attempt", attempt)
    if attempt == 1:
        return None, attempt
    m = default_observability().metrics
    for number, (_started, lost) in enumerate(attempts[:-1], 1):
        lost_context = _span_context(lost)
        if lost_context is not None:
            span.add_link(lost_context, {"cad.attempt": number, "cad.attempt.lost": True})
        if number < attempt - 1:
            continue  # counted by the delivery after it
        m.attempts_lost.labels(TASK_NAME).inc()
        progress().publish(job_id, "attempt.lost", attempt=number)
    log.warning("earlier attempt lost with its worker", extra={"attempt": attempt})
    max_deliveries = _settings().max_deliveries
    if attempt <= max_deliveries:
        return None, attempt
    span.set_attribute("error.type", "dead_letter")
    span.set_status(Status(StatusCode.ERROR, f"dead-lettered after {attempt - 1} lost attempts"))
    log.error("job dead-lettered", extra={"attempts": attempt - 1})
    return _failure(
        job_id, "dead_letter", "dead_letter",
        f"the job killed its worker on {attempt - 1} deliveries (limit {max_deliveries}); not run again",
    ), attempt  # fmt: skip


_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def _span_context(traceparent: str | None) -> trace.SpanContext | None:
    match = _TRACEPARENT.fullmatch(traceparent or "")
    if match is None:
        return None
    context = trace.SpanContext(
        int(match.group(1), 16), int(match.group(2), 16), True, trace.TraceFlags(int(match.group(3), 16))
    )
    return context if context.is_valid else None


def _run(obs: ModelObservability, spec: Any, job_id: str, started: float, attempt: int = 1) -> dict[str, Any]:
    # Validate before anything else: versions label the flow, and they depend
    # on the engine the job asks for.
    validate_start = default_timer()
    try:
        job = JobSpec.model_validate(spec)
        engine = pick_engine(job.engine, _served_engines(), job.formats(), job.options, job.occt_version)
        problem: dict[str, Any] | None = None
    except ValidationError as exc:
        job, engine = None, None
        errors = [{"loc": ".".join(map(str, e["loc"])), "msg": e["msg"]} for e in exc.errors()[:20]]
        problem = {"error_type": "invalid_spec", "message": "job spec is invalid", "errors": errors}
    except EngineUnavailable as exc:
        job, engine = None, None
        problem = {"error_type": "engine_unavailable", "message": str(exc)}
    if job is not None and job.fault and not _settings().allow_faults:
        job, engine = None, None
        problem = {"error_type": "faults_disabled", "message": "fault injection is off on this worker"}
    if job is not None and job.fault == "hang_in_export" and attempt > 1:
        job = job.model_copy(update={"fault": None})  # a first-delivery fault: this delivery runs plainly
    validate_seconds = max(default_timer() - validate_start, 0)
    flow_type = (
        job.flow_type if job else (spec.get("flow_type", "parametric") if isinstance(spec, dict) else "parametric")
    )
    versions = (engine.freecad_version, engine.occt_version) if engine else _default_versions()

    events = progress()
    events.publish_stage(job_id, "validate", "finished", seconds=round(validate_seconds, 6))
    with obs.engine_versions(*versions), obs.observe_model_generation(flow_type, job_id) as flow:
        obs.record_stage(flow_type, "validate", validate_seconds)
        if problem is not None or job is None or engine is None:
            assert problem is not None
            flow["failed"] = True
            trace.get_current_span().set_attribute("error.type", problem["error_type"])
            log.warning("job rejected", extra={"error_type": problem["error_type"]})
            return _failure(
                job_id, "rejected", problem["error_type"], problem["message"], errors=problem.get("errors", [])
            )
        span = trace.get_current_span()
        span.set_attributes(
            {
                "cad.engine": engine.name,
                "cad.freecad_version": engine.freecad_version,
                "cad.occt_version": engine.occt_version,
                "cad.job_name": job.name,
                **job.options.as_attributes(),
            }
        )
        out_dir = _settings().data_dir / "jobs" / job_id
        # Leave the CAD process time to be killed before Celery's own soft limit.
        timeout = min(job.timeout_s, max(_settings().soft_time_limit - 5, 1))
        deadline = time.monotonic() + timeout  # the input's download and the engine share the job's time
        if job.fault == "kill_worker":
            os.kill(os.getpid(), signal.SIGKILL)  # a poison job, for the reliability tests
        if job.fault == "hang_unresponsive":
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # billiard's soft-limit signal
        input_path = None
        stored = job.stored_document()  # an input document, or the user's script or template
        if stored is not None:
            settings = _settings()
            cache = DocumentCache(settings.document_cache or settings.data_dir / "document-cache",
                                  settings.document_cache_bytes)  # fmt: skip
            events.publish_stage(job_id, "prepare", "started")
            try:
                with obs.observe_stage(flow_type, "prepare"):
                    input_path = fetch_document(
                        stored, cache=cache, store_root=settings.document_store or settings.data_dir / "store",
                        observability=obs, deadline=deadline,
                        on_progress=lambda stage, ratio: events.publish(
                            job_id, "document.progress", stage=stage, ratio=round(ratio, 3)),
                    )  # fmt: skip
            except DocumentError as exc:
                flow["failed"] = True
                span.set_attribute("error.type", exc.error_type)
                log.warning("input document rejected", extra={"error_type": exc.error_type})
                return _failure(job_id, "rejected", exc.error_type, str(exc))
            events.publish_stage(job_id, "prepare", "finished")
            timeout = max(deadline - time.monotonic(), 1.0)
        events.publish_stage(job_id, "engine", "started", engine=engine.name)
        with obs.observe_stage(flow_type, "engine"):
            cad = run_cad_job(
                job,
                out_dir,
                engine=engine,
                job_id=job_id,
                observability=obs,
                limits=RunLimits(
                    timeout_s=timeout,
                    memory_bytes=_memory_limit(),
                    max_file_bytes=int(os.environ.get("CADSCOPE_CAD_MAX_FILE_BYTES", DEFAULT_MAX_FILE_BYTES)),
                    max_processes=int(os.environ.get("CADSCOPE_CAD_MAX_PROCESSES", DEFAULT_MAX_PROCESSES)),
                ),
                on_progress=lambda attributes: events.publish_child_event(job_id, attributes),
                input_path=input_path,
            )
        for stage, seconds in cad.stages.items():
            events.publish_stage(job_id, stage, "finished", seconds=round(seconds, 6))
        events.publish_stage(job_id, "engine", "finished", outcome=cad.outcome)
        with obs.observe_stage(flow_type, "collect"):
            result = {
                "job_id": job_id,
                "status": "succeeded" if cad.ok else "failed",
                "outcome": cad.outcome,
                "error_type": cad.error_type,
                "error_message": cad.error_message,
                "engine": engine.as_dict(),
                "expect_failure": job.expect_failure,
                "artifacts": cad.artifacts,
                "out_dir": str(out_dir),
                "stages": {k: round(v, 6) for k, v in cad.stages.items()},
                "duration_s": round(max(default_timer() - started, 0), 6),
                "peak_rss_bytes": cad.run.peak_rss_bytes,
                "manifest": cad.manifest,
                "trace_id": format(trace.get_current_span().get_span_context().trace_id, "032x"),
            }
        if not cad.ok:
            flow["failed"] = True
            span.set_attribute("error.type", cad.outcome)
            log.warning("job failed", extra={"outcome": cad.outcome, "error_type": cad.error_type})
        else:
            log.info("job succeeded", extra={"engine": engine.name, "artifacts": len(cad.artifacts)})
        return result


# What "the same geometry" means between a primary and its shadow.
GEOMETRY_TOLERANCES = {"volume_rel": 1e-6, "area_rel": 1e-6, "position_abs": 1e-3, "facets_rel": 0.05}


def geometry_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """How two manifests' geometry differs beyond ``GEOMETRY_TOLERANCES`` (empty: the same)."""
    t = GEOMETRY_TOLERANCES
    found: list[str] = []
    parts_a, parts_b = (a.get("geometry") or {}).get("parts") or {}, (b.get("geometry") or {}).get("parts") or {}
    if set(parts_a) != set(parts_b):
        return [f"parts differ: {sorted(set(parts_a) ^ set(parts_b))}"]
    for name, x in parts_a.items():
        y = parts_b[name]
        for key, rel in (("volume", t["volume_rel"]), ("area", t["area_rel"])):
            if abs(x[key] - y[key]) > rel * max(abs(x[key]), abs(y[key]), 1e-9):
                found.append(f"{name}.{key} {x[key]:.6g} != {y[key]:.6g}")
        for key in ("bbox", "center_of_mass"):
            if any(abs(p - q) > t["position_abs"] for p, q in zip(x[key], y[key], strict=True)):
                found.append(f"{name}.{key} {x[key]} != {y[key]}")
        found += [f"{name}.{k} {x[k]} != {y[k]}" for k in ("valid", "solids", "shells", "faces", "edges", "vertices")
                  if x[k] != y[k]]  # fmt: skip
    meshes_a, meshes_b = (a.get("geometry") or {}).get("meshes") or {}, (b.get("geometry") or {}).get("meshes") or {}
    for name in set(meshes_a) & set(meshes_b):
        p, q = meshes_a[name]["facets"], meshes_b[name]["facets"]
        if abs(p - q) > t["facets_rel"] * max(p, q):
            found.append(f"{name}.facets {p} != {q}")
    return found


def _compare_with_twin(result: dict[str, Any], role: str, primary_job_id: str | None = None) -> None:
    """Compare a shadow with its primary once both are done, once.

    Each side's result is in the progress store before it gets here (``finish``), so of two
    sides finishing at the same instant at least one finds the other's; a claim taken once the
    verdict is made keeps the other, and a side delivered again, from counting the pair twice.
    Every result is compared, a rejected or failed one too (by its outcome)."""
    job_id = str(result.get("job_id") or "")
    if role == "shadow":
        twin_id = primary_job_id or job_id.removesuffix("-shadow")
        primary_id = twin_id
    else:
        twin_id = f"{job_id[:56]}-shadow"
        primary_id = job_id
    store = progress().store
    twin = store.finished(twin_id)
    if twin is None:
        return  # the twin compares when it completes
    primary, shadow = (twin, result) if role == "shadow" else (result, twin)
    if primary.get("outcome") != shadow.get("outcome"):
        verdict, differences = "outcome_mismatch", [f"outcome {primary.get('outcome')} != {shadow.get('outcome')}"]
    elif primary.get("manifest") and shadow.get("manifest"):
        differences = geometry_differences(primary["manifest"], shadow["manifest"])
        verdict = "geometry_mismatch" if differences else "match"
    else:
        verdict, differences = "match", []
    if not store.claim_once(primary_id, "shadow-compared", PROGRESS_TTL_S):
        return  # compared already: by the twin, or by an earlier delivery of this side
    span = trace.get_current_span()
    span.set_attribute("cad.shadow.comparison", verdict)
    if differences:
        span.set_attribute("cad.shadow.differences", differences[:20])
    engine = shadow.get("engine") or {}  # none for a shadow rejected before it ran: versions "other"
    obs = default_observability()
    with obs.engine_versions(str(engine.get("freecad_version")), str(engine.get("occt_version"))):
        obs.metrics.shadow_comparisons.labels(verdict, *obs.versions().values()).inc()
    progress().publish(primary_id, "shadow.compared", result=verdict, differences=differences[:20])
    log.info("shadow compared", extra={"result": verdict, "differences": len(differences)})


def _served_engines() -> dict[str, Any]:
    """The engines this worker runs: all it found, or only the pool it is pinned to (``CADSCOPE_ENGINE``)."""
    engines = discover_engines()
    pinned = _settings().engine
    if pinned is None:
        return dict(engines)
    name, version = parse_engine(pinned)
    info = engines.get(name if version is None else f"{name}@{version}")
    return {} if info is None else {name: info, info.pool: info}


def _memory_limit() -> int:
    return int(os.environ.get("CADSCOPE_CAD_MEMORY_LIMIT", str(2 << 30)))
