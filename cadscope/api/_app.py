"""The HTTP front door: enqueue jobs, report status, stream progress, tell the truth about health."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Gauge, generate_latest
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from ..ai import AllProvidersFailed, ProviderChain, SyntheticCheck, chain_from_env
from ..freecad_bridge import JobSpec
from ..freecad_bridge.schema_docs import openapi_job_schema, shipped_job_schema
from ..metrics import default_observability, enable_multiprocess, multiprocess_registry
from ..tracing import configure_json_logging, setup_tracing, shutdown_tracing
from ..workers import app as celery_app
from ..workers import configure_app, run_job
from ..workers._config import WorkerSettings, shadow_selected, shadow_settings
from ..workers._progress import PROGRESS_TTL_S, TERMINAL, ProgressService, progress_store
from ..workers._tasks import publish_shadow
from ._health import health_score, run_checks
from ._queue import QueueCollector
from ._red import REDMiddleware

__all__ = ["ApiSettings", "create_app"]

log = logging.getLogger("cadscope.api")

_JOB_ID = re.compile(r"^job-[0-9a-f]{20}$|^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_ARTIFACT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\.(step|stl|brep|iges|obj)$")
_IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# A field name echoed in a 422 only when it looks like one: any other key is the
# client's text (markup, control characters, megabytes) and is not sent back.
_SAFE_LOC = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_JSON_DEPTH = 32  # a job spec nests 8 deep; bounded work for anything deeper
STREAM_POLL_S = 0.5
STREAM_KEEPALIVE_S = 10.0
# A finished job whose result the backend does not hold yet (its last event can come first).
_NOT_STORED = object()


@dataclass(frozen=True)
class ApiSettings:
    token: str | None
    allow_anonymous: bool = False
    broker_url: str | None = None
    data_dir: Path = field(default_factory=lambda: WorkerSettings.from_env().data_dir)
    queue: str = "cadscope"
    max_body_bytes: int = 1 << 20
    publish_timeout_s: float = 5.0
    check_timeout_s: float = 1.0
    prometheus_url: str | None = None
    ai_chain: ProviderChain | None = field(default=None, compare=False)  # None: chain_from_env()
    ai_synthetic_interval_s: float | None = None
    max_streams: int = 100  # event streams open at once, per server process
    stream_timeout_s: float = 3600.0
    # Shadow runs (CADSCOPE_SHADOW_FRACTION, _QUEUE, _ENGINE): a copy of this fraction of
    # the jobs goes to the candidate pool; its result is never the client's.
    shadow_fraction: float = 0.0
    shadow_queue: str | None = None
    shadow_engine: str | None = None

    @classmethod
    def from_env(cls) -> ApiSettings:
        token = os.environ.get("CADSCOPE_API_TOKEN")
        token_file = os.environ.get("CADSCOPE_API_TOKEN_FILE")
        if not token and token_file:
            token = Path(token_file).read_text().strip()
        return cls(
            token=token or None,
            allow_anonymous=os.environ.get("CADSCOPE_API_ALLOW_ANONYMOUS") == "1",
            broker_url=os.environ.get("CELERY_BROKER_URL"),
            queue=os.environ.get("CADSCOPE_QUEUE", "cadscope"),
            max_body_bytes=int(os.environ.get("CADSCOPE_API_MAX_BODY", str(1 << 20))),
            prometheus_url=os.environ.get("CADSCOPE_PROMETHEUS_URL") or None,
            ai_synthetic_interval_s=float(os.environ.get("CADSCOPE_AI_SYNTHETIC_INTERVAL_S", "0")) or None,
            max_streams=int(os.environ.get("CADSCOPE_API_MAX_STREAMS", "100")),
            **shadow_settings(os.environ),
        )


def _problem(status: int, detail: Any, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=dict(headers or {}))


def _public_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Field errors without the client's own text: a location names a field only
    when it looks like a field name, a message is pydantic's, bounded."""
    errors = []
    for error in exc.errors(include_input=False, include_url=False)[:50]:
        loc = [part if isinstance(part, int) or _SAFE_LOC.fullmatch(part) else "(unrecognised key)"
               for part in error["loc"]]  # fmt: skip
        msg = "".join(ch for ch in str(error["msg"])[:300] if ch.isprintable())
        errors.append({"loc": loc, "msg": msg, "type": error["type"]})
    return errors


def _too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


# What a submission publishes (the payload, extra response fields), or the error to answer.
_Built = tuple[dict[str, Any], dict[str, Any]] | JSONResponse


def _fingerprint(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def job_id_for(idempotency_key: str) -> str:
    """The job id a submission with this ``Idempotency-Key`` gets (the same for every retry)."""
    return f"job-{hashlib.sha256(idempotency_key.encode()).hexdigest()[:20]}"


@lru_cache(maxsize=1)
def _streams_gauge() -> Gauge:
    return Gauge("cadscope_api_event_streams", "Event streams open on the API.", multiprocess_mode="livesum")


class _CountedStream(StreamingResponse):
    """An event stream that gives its slot back however it ends: finished, the
    client gone (Starlette cancels it), or never started."""

    def __init__(self, release: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    """The API app (``uvicorn --factory cadscope.api:create_app``).

    Fails at setup, not at the first request, when no token is configured and
    anonymous use was not asked for explicitly.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Before any metric is made: this server process's files named by pid and start time.
        enable_multiprocess(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    settings = settings or ApiSettings.from_env()
    if not settings.token and not settings.allow_anonymous:
        raise ValueError("set CADSCOPE_API_TOKEN or CADSCOPE_API_TOKEN_FILE (or CADSCOPE_API_ALLOW_ANONYMOUS=1)")
    configure_app(celery_app, settings.broker_url)
    store = progress_store(celery_app.conf.broker_url, settings.data_dir)
    events = ProgressService(store)
    queue_collector = QueueCollector(
        celery_app.conf.broker_url, settings.queue, dict(celery_app.conf.broker_transport_options or {})
    )

    scraped: list[CollectorRegistry] = [REGISTRY]  # what /metrics serves; set per server process

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Per server process (after uvicorn forks its workers).
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        configure_json_logging("cadscope-api")
        observability = default_observability()
        observability.zero_event_counters()  # its first dropped span must alert too
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # One collector per server process: it remembers the values it served
            # and the files it could not read, which a collector per scrape forgets.
            scraped[0] = multiprocess_registry(on_unreadable=observability.record_metrics_file_unreadable)[0]
        provider = setup_tracing("cadscope-api", on_drop=observability.record_spans_dropped)
        instrumentor = CeleryInstrumentor()
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=provider)
        synthetic.start()
        yield
        synthetic.stop()
        shutdown_tracing(5000)  # bounded: a hung collector cannot hold the API's exit

    chain = settings.ai_chain or chain_from_env()
    synthetic = SyntheticCheck(chain, settings.ai_synthetic_interval_s)

    app = FastAPI(title="cadscope", version="0.1.0", lifespan=lifespan)
    app.add_middleware(REDMiddleware)
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, excluded_urls="/health/.*,/metrics", exclude_spans=["receive", "send"])

    def authorised(request: Request) -> None:
        if settings.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        expected = settings.token.encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise HTTPException(401, "unauthorized", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(HTTPException)
    async def http_errors(_: Request, exc: HTTPException) -> JSONResponse:
        return _problem(exc.status_code, exc.detail, exc.headers)

    def idempotency(request: Request) -> tuple[str, str]:
        key = request.headers.get("idempotency-key")
        if key is None:
            key = uuid.uuid4().hex
        elif not _IDEMPOTENCY_KEY.fullmatch(key):
            raise HTTPException(422, [{"loc": ["header", "Idempotency-Key"], "type": "value_error",
                                       "msg": "1 to 128 characters: letters, digits, '.', '_', ':', '-'"}])  # fmt: skip
        return key, job_id_for(key)

    def store_down(exc: Exception, job_id: str, key: str) -> JSONResponse:
        log.warning("submission store unavailable", extra={"job_id": job_id, "error": type(exc).__name__})
        return _problem(503, {"msg": "the job store is unavailable; nothing was enqueued, retry later",
                              "job_id": job_id, "idempotency_key": key}, headers={"Retry-After": "5"})  # fmt: skip

    async def enqueue(
        request: Request,
        fingerprint: str,
        build: Callable[[], Awaitable[_Built]],
    ) -> JSONResponse:
        """Publish once per ``Idempotency-Key``: a retry gets the same job, and publishes
        the same payload again only while the earlier publish is in doubt (the worker
        runs a job id at most once to its end)."""
        key, job_id = idempotency(request)
        span = trace.get_current_span()
        span.set_attribute("cad.job_id", job_id)
        try:
            known = await run_in_threadpool(store.submission, job_id)
        except Exception as exc:  # noqa: BLE001 - the same store the worker dedupes with
            return store_down(exc, job_id, key)
        if known is None:
            built = await build()
            if isinstance(built, JSONResponse):
                return built
            record: dict[str, Any] = {"fingerprint": fingerprint, "payload": built[0], "extra": built[1]}
            try:
                known = await run_in_threadpool(store.claim_submission, job_id, record, PROGRESS_TTL_S)
            except Exception as exc:  # noqa: BLE001
                return store_down(exc, job_id, key)
            known = known or record
        known = dict(known)
        if known.get("fingerprint") != fingerprint:
            return _problem(409, {"msg": "this Idempotency-Key was used for a different request", "job_id": job_id})
        if known.get("response"):
            span.set_attribute("cad.idempotent_replay", True)
            return JSONResponse(known["response"], status_code=202, headers=dict(known.get("headers") or {}))
        payload: dict[str, Any] = known["payload"]
        extra: dict[str, Any] = known.get("extra") or {}

        shadowed = shadow_selected(job_id, settings.shadow_fraction)

        def publish() -> None:
            # No retries behind the client's back; the client retries with its key.
            kwargs: dict[str, Any] = {"job_id": job_id, **({"shadowed": True} if shadowed else {})}
            run_job.apply_async(args=[payload], kwargs=kwargs, task_id=job_id, queue=settings.queue,
                                retry=False)  # fmt: skip

        def publish_the_shadow() -> None:
            assert settings.shadow_engine is not None and settings.shadow_queue is not None
            try:
                publish_shadow(payload, job_id, settings.shadow_engine, settings.shadow_queue,
                               span.get_span_context())  # fmt: skip
            except Exception:  # noqa: BLE001 - a shadow never fails its primary
                log.warning("shadow not published", extra={"job_id": job_id}, exc_info=True)

        try:
            await asyncio.wait_for(run_in_threadpool(publish), timeout=settings.publish_timeout_s)
        except Exception as exc:  # noqa: BLE001 - any broker failure is a 503, never a hang
            log.warning("enqueue failed", extra={"job_id": job_id, "error": type(exc).__name__})
            span.set_attribute("error.type", "broker_unavailable")
            # A publish cut off by the timeout may still reach the broker: say so, and how
            # to retry without a twin.
            return _problem(503, {"msg": "the job queue did not confirm the job; it may still be enqueued. Retry "
                                         "with the same Idempotency-Key: you get this job, never a second one",
                                  "job_id": job_id, "idempotency_key": key},
                            headers={"Retry-After": "5", "Idempotency-Key": key})  # fmt: skip
        if shadowed:
            # After the primary is confirmed, outside its deadline: a slow shadow queue never turns
            # an enqueued job into a 503.
            try:
                await asyncio.wait_for(run_in_threadpool(publish_the_shadow), timeout=settings.publish_timeout_s)
            except Exception:  # noqa: BLE001 - a shadow never fails its primary
                log.warning("shadow not published", extra={"job_id": job_id})
        context = span.get_span_context()
        headers = {"Idempotency-Key": key}
        if context.is_valid:
            headers["traceparent"] = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
        body = {"job_id": job_id, "status": "queued", "status_url": f"/v1/jobs/{job_id}",
                "events_url": f"/v1/jobs/{job_id}/events", "idempotency_key": key, **extra}  # fmt: skip
        try:
            await run_in_threadpool(store.update_submission, job_id, {**known, "response": body, "headers": headers},
                                    PROGRESS_TTL_S)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - enqueued all the same; a retry publishes a twin the worker drops
            log.warning("submission record not updated", extra={"job_id": job_id, "error": type(exc).__name__})
        await run_in_threadpool(events.publish, job_id, "job.submitted", job_name=payload.get("name"),
                                engine=payload.get("engine"))  # fmt: skip
        return JSONResponse(body, status_code=202, headers=headers)

    async def read_json(request: Request) -> Any:
        """The body as JSON, or the 413/422 response to send instead."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
            return _problem(413, f"body larger than {settings.max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_body_bytes:
                return _problem(413, f"body larger than {settings.max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            return _problem(422, [{"loc": ["body"], "msg": "body is not valid JSON", "type": "json_invalid"}])
        if _too_deep(data):
            return _problem(422, [{"loc": ["body"], "msg": f"JSON nested deeper than {MAX_JSON_DEPTH} levels",
                                   "type": "json_too_deep"}])  # fmt: skip
        return data

    # The body is read and validated by hand (bounded size and depth first); the OpenAPI page
    # still shows the job's schema, from the same models.
    job_body, job_components = openapi_job_schema()

    @app.post("/v1/jobs", status_code=202, dependencies=[Depends(authorised)], openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": job_body}}}})  # fmt: skip
    async def submit(request: Request) -> JSONResponse:
        data = await read_json(request)
        if isinstance(data, JSONResponse):
            return data

        async def build() -> _Built:
            try:
                spec = JobSpec.model_validate(data)
            except ValidationError as exc:
                return _problem(422, _public_errors(exc))
            return spec.model_dump(mode="json"), {}

        return await enqueue(request, _fingerprint(data), build)

    @app.get("/v1/schema/job")
    async def job_schema() -> JSONResponse:
        """The JSON Schema of a job (``POST /v1/jobs``'s body), as shipped in the package."""
        return JSONResponse(shipped_job_schema(), media_type="application/schema+json")

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = default_openapi()
            document.setdefault("components", {}).setdefault("schemas", {}).update(job_components)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]

    @app.post("/v1/prompts", status_code=202, dependencies=[Depends(authorised)])
    async def submit_prompt(request: Request) -> JSONResponse:
        """The ai_prompt flow: ``{"prompt": "...", "engine": "auto"}`` → the
        provider chain → a validated job spec → the same queue as ``/v1/jobs``."""
        data = await read_json(request)
        if isinstance(data, JSONResponse):
            return data
        if not isinstance(data, dict):
            return _problem(422, [{"loc": ["body"], "msg": "a JSON object", "type": "model_type"}])
        unknown = [key for key in data if key not in ("prompt", "engine")]
        if unknown:
            return _problem(422, [{"loc": ["body", key if _SAFE_LOC.fullmatch(key) else "(unrecognised key)"],
                                   "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}
                                  for key in unknown[:10]])  # fmt: skip
        prompt = data.get("prompt")
        engine = data.get("engine", "auto")
        if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > 4000:
            return _problem(422, [{"loc": ["body", "prompt"], "msg": "a prompt of 1 to 4000 characters",
                                   "type": "value_error"}])  # fmt: skip
        if not isinstance(engine, str) or engine not in ("auto", "freecad", "ocp"):
            return _problem(422, [{"loc": ["body", "engine"], "msg": "auto, freecad or ocp", "type": "value_error"}])

        async def build() -> _Built:
            # Only for a key not seen before: a retry never asks the providers again.
            try:
                result = await run_in_threadpool(chain.generate, prompt)
            except AllProvidersFailed as exc:
                attempts = [{"provider": a.provider, "outcome": a.outcome, "detail": a.message} for a in exc.attempts]
                if exc.refused:
                    return _problem(422, {"msg": "no provider could turn this prompt into a job", "attempts": attempts})
                return _problem(503, {"msg": "no AI provider available; nothing was enqueued", "attempts": attempts},
                                headers={"Retry-After": "10"})  # fmt: skip
            spec = result.spec.model_copy(update={"engine": engine}) if engine != "auto" else result.spec
            try:
                spec = JobSpec.model_validate(spec.model_dump(mode="json"))  # engine/format compatibility
            except ValidationError as exc:
                return _problem(422, _public_errors(exc))
            failovers = sum(1 for a in result.attempts if a.outcome != "ok")
            return spec.model_dump(mode="json"), {"provider": result.provider, "model": result.model,
                                                  "failovers": failovers}  # fmt: skip

        return await enqueue(request, _fingerprint({"prompt": prompt, "engine": engine}), build)

    def _known(job_id: str) -> list[tuple[str, dict[str, Any]]]:
        if not _JOB_ID.fullmatch(job_id):
            raise HTTPException(404, "no such job")
        found = store.read(job_id)
        if not found:
            raise HTTPException(404, "no such job")
        return found

    @app.get("/v1/jobs/{job_id}", dependencies=[Depends(authorised)])
    async def status(job_id: str) -> JSONResponse:
        found = await run_in_threadpool(_known, job_id)
        kinds = [event for _, event in found]
        finished = next((e for e in kinds if e.get("type") == TERMINAL), None)
        state = (
            "finished" if finished else ("running" if any(e["type"] != "job.submitted" for e in kinds) else "queued")
        )
        body: dict[str, Any] = {
            "job_id": job_id,
            "state": state,
            "stages": [{"stage": e.get("stage"), "seconds": e.get("seconds")} for e in kinds
                       if e.get("type") == "stage.finished"],
            "submitted_at": next((e["ts"] for e in kinds if e.get("type") == "job.submitted"), None),
        }  # fmt: skip
        result = await run_in_threadpool(_result, job_id, True) if finished else None
        if result is _NOT_STORED:
            # The job's last event is out, its result not stored yet: finished only with its result,
            # so that a client never reads a success without its artifacts.
            body["state"] = "running"
        elif finished:
            body.update({k: finished.get(k) for k in ("status", "outcome", "error_type", "duration_s")})
            if isinstance(result, dict):
                for key in (
                    "artifacts",
                    "manifest",
                    "engine",
                    "error_message",
                    "errors",
                    "trace_id",
                    "peak_rss_bytes",
                    "expect_failure",
                    "role",
                ):
                    if result.get(key) is not None:
                        body[key] = result[key]
                body["timings"] = result.get("stages") or {}
        return JSONResponse(body)

    def _result(job_id: str, tell_not_stored: bool = False) -> Any:
        handle = run_job.AsyncResult(job_id)
        try:
            if not handle.ready():
                return _NOT_STORED if tell_not_stored else None
            return handle.get(timeout=2, propagate=False)
        except Exception:  # noqa: BLE001 - a status page must not fail for the result backend
            return None

    @app.get("/v1/jobs/{job_id}/artifacts/{name}", dependencies=[Depends(authorised)])
    async def artifact(job_id: str, name: str) -> Response:
        await run_in_threadpool(_known, job_id)
        if not _ARTIFACT.fullmatch(name):
            raise HTTPException(404, "no such artifact")
        result = await run_in_threadpool(_result, job_id)
        listed = {a["name"]: a for a in (result or {}).get("artifacts", [])} if isinstance(result, dict) else {}
        root = (settings.data_dir / "jobs" / job_id).resolve()
        path = (root / name).resolve()
        if name not in listed or path.parent != root or not path.is_file():
            raise HTTPException(404, "no such artifact")
        return FileResponse(path, filename=name, headers={"X-Content-SHA256": listed[name]["sha256"]})

    # Event streams are async and read the store without blocking (a short read on a few
    # threads of their own, then a sleep): however many follow, the other routes keep the
    # server's thread pool. Beyond max_streams a new one is refused with 503.
    stream_reads = anyio.CapacityLimiter(4)
    open_streams = [0]

    def release_stream() -> None:
        open_streams[0] -= 1
        _streams_gauge().dec()

    @app.get("/v1/jobs/{job_id}/events", dependencies=[Depends(authorised)])
    async def stream(job_id: str, request: Request) -> Response:
        await run_in_threadpool(_known, job_id)
        if open_streams[0] >= settings.max_streams:
            return _problem(503, f"too many event streams open ({settings.max_streams}); retry later",
                            headers={"Retry-After": "10"})  # fmt: skip
        after = request.headers.get("last-event-id", "0")
        after = after if re.fullmatch(r"[0-9]+(-[0-9]+)?", after) else "0"
        open_streams[0] += 1
        _streams_gauge().inc()

        async def sse() -> AsyncIterator[bytes]:
            cursor = after
            deadline = time.monotonic() + settings.stream_timeout_s
            quiet_since = time.monotonic()
            while time.monotonic() < deadline:
                try:
                    found = await anyio.to_thread.run_sync(store.read, job_id, cursor, 0, limiter=stream_reads)
                except Exception as exc:  # noqa: BLE001 - the store is down: end the stream, the client resumes
                    log.warning("event stream read failed", extra={"job_id": job_id, "error": type(exc).__name__})
                    return
                for entry_id, event in found:
                    cursor = entry_id
                    yield f"id: {entry_id}\nevent: {event.get('type')}\ndata: {json.dumps(event)}\n\n".encode()
                    if event.get("type") == TERMINAL:
                        return
                if found:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= STREAM_KEEPALIVE_S:
                    # A comment line: a client that left is noticed at this write at the latest.
                    yield b": keep-alive\n\n"
                    quiet_since = time.monotonic()
                await asyncio.sleep(STREAM_POLL_S)

        return _CountedStream(release_stream, sse(), media_type="text/event-stream",
                              headers={"Cache-Control": "no-store"})  # fmt: skip

    def broker_ping() -> bool:
        with celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=settings.check_timeout_s)
        return True

    async def checks(detailed: bool) -> tuple[list[Any], dict[str, Any], list[Any]]:
        store_ping = getattr(store, "ping", None)
        return await run_checks(broker_ping, store.workers, store_ping if detailed else None,
                                settings.prometheus_url if detailed else None, settings.check_timeout_s)  # fmt: skip

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        results, _workers, _alerts = await checks(detailed=False)
        ok = all(check.ok for check in results)
        return JSONResponse(
            {
                "status": "ready" if ok else "not_ready",
                "checks": {c.name: c.public(False) for c in results},
                # Reported, not required: /v1/jobs works with every AI provider down.
                "ai_providers": chain.states(),
            },
            status_code=200 if ok else 503,
        )

    @app.get("/health/detailed", dependencies=[Depends(authorised)])
    async def detailed() -> JSONResponse:
        results, found_workers, alerts = await checks(detailed=True)
        now = time.time()
        return JSONResponse({
            "status": "ready" if all(c.ok for c in results if c.name != "prometheus") else "not_ready",
            "score": health_score(results, alerts),
            "score_rule": "see cadscope.api._health (100 minus broker 50, workers 30, engines 10, store 10, alerts)",
            "checks": {c.name: c.public(True) for c in results},
            "workers": [
                {"node": node, "engines": info.get("engines", []), "concurrency": info.get("concurrency"),
                 "heartbeat_age_s": round(now - float(info.get("ts", now)), 1)}
                for node, info in sorted(found_workers.items())
            ],
            "ai_providers": [
                {"provider": p.name, "model": p.model, "circuit": chain.breakers[p.name].state,
                 "synthetic": synthetic.last.get(p.name)}
                for p in chain.providers
            ],
            "alerts": alerts,
        })  # fmt: skip

    @app.get("/metrics")
    async def metrics() -> Response:
        text = await run_in_threadpool(generate_latest, scraped[0])
        queue = CollectorRegistry()
        queue.register(queue_collector)
        text += await run_in_threadpool(generate_latest, queue)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    return app
