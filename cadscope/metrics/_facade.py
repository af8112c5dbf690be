"""The model-generation observability helpers as one facade: spans plus metrics.

Each ``observe_*`` context manager opens a span, times its body with a
monotonic clock, records the metric in ``finally`` and re-raises the body's
exception unchanged. Each ``record_*`` method records an already measured
value; the worker uses them for the CAD child's operations, whose durations
the child measured itself. Telemetry never raises into a job: a failure inside
recording is logged and swallowed.

Engine versions label every CAD metric. They come from the engine at run
time; set them for a block with :meth:`ModelObservability.engine_versions`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable, Iterator
from timeit import default_timer
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ._catalogue import (
    ALLOWED_LABEL_VALUES,
    ROLES,
    SECURITY_VIOLATION_SEVERITY,
    Catalogue,
    bound,
    bound_version,
    doc_complexity,
    file_size_range,
    lcs_count_range,
    solids_range,
)

__all__ = ["ModelObservability", "default_observability"]

log = logging.getLogger("cadscope.metrics")

_versions: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar(
    "cadscope_engine_versions", default=("unknown", "unknown")
)
# "primary" or "shadow": the role label of stage and operation durations.
_role: contextvars.ContextVar[str] = contextvars.ContextVar("cadscope_role", default="primary")


class _never_raise:  # lower case, as contextlib.suppress: read as a with statement
    """Log and swallow an exception from recording: telemetry must not break the job.

    A class, not a ``@contextmanager`` generator: the worker records every
    operation a CAD child reports through it, and the generator cost 0.8 us a
    call against 0.3 when measured."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if kind is None or not issubclass(kind, Exception):
            return False
        log.error("recording %s failed", self.what, exc_info=(kind, exc, tb))  # type: ignore[arg-type]
        return True


class ModelObservability:
    """The ``model_observability`` helpers, over a :class:`Catalogue`."""

    def __init__(self, catalogue: Catalogue | None = None, tracer_provider: trace.TracerProvider | None = None):
        self.metrics = catalogue if catalogue is not None else Catalogue()
        self._tracer_provider = tracer_provider

    @property
    def _tracer(self) -> trace.Tracer:
        return trace.get_tracer("cadscope.metrics", tracer_provider=self._tracer_provider)

    # -- versions ---------------------------------------------------------------

    @contextlib.contextmanager
    def engine_versions(self, freecad_version: str, occt_version: str) -> Iterator[None]:
        token = _versions.set((bound_version(freecad_version), bound_version(occt_version)))
        try:
            yield
        finally:
            _versions.reset(token)

    @staticmethod
    @contextlib.contextmanager
    def role(role: str) -> Iterator[None]:
        """Label the stage and operation durations recorded in the block ``primary`` or ``shadow``."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        token = _role.set(role)
        try:
            yield
        finally:
            _role.reset(token)

    @staticmethod
    def current_role() -> str:
        """``primary`` or ``shadow``: the role set by :meth:`role` (``primary`` outside it)."""
        return _role.get()

    @staticmethod
    def versions() -> dict[str, str]:
        freecad, occt = _versions.get()
        return {"freecad_version": freecad, "occt_version": occt}

    @contextlib.contextmanager
    def _timed_span(
        self, name: str, attributes: dict[str, Any], record: Callable[[dict[str, Any]], None] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Span + monotonic timer around the body; then ``record(outcome)``.

        ``outcome`` is the dict the body sees (it may add keys such as
        ``iterations``); ``duration`` and ``error`` are set before ``record``
        runs, in ``finally``, so failures are measured too.
        """
        outcome: dict[str, Any] = {"error": None}
        start = default_timer()
        with self._tracer.start_as_current_span(name, attributes=attributes, record_exception=True) as span:
            try:
                yield outcome
            except BaseException as exc:
                outcome["error"] = exc
                span.set_attribute("error.type", type(exc).__qualname__)
                span.set_status(Status(StatusCode.ERROR, str(exc)[:256]))
                raise
            finally:
                outcome["duration"] = max(default_timer() - start, 0)
                if record is not None:
                    with _never_raise(name):
                        record(outcome)

    # -- flows and stages ---------------------------------------------------------

    @contextlib.contextmanager
    def observe_model_generation(
        self, flow_type: str, job_id: str, user_id: int | str | None = None
    ) -> Iterator[dict[str, Any]]:
        """A whole flow: started/completed counters, duration, active gauge, span.

        A shadow run (``role("shadow")``) gets its span only: the flow counters are what
        the job success SLO reads, and a shadow is not a job anyone asked for."""
        m, v, flow = self.metrics, self.versions(), bound("flow_type", flow_type)
        counted = _role.get() == "primary"
        attributes: dict[str, Any] = {"cad.flow_type": flow, "cad.job_id": job_id, "cad.role": _role.get()}
        if user_id is not None:
            attributes["enduser.id"] = str(user_id)
        if counted:
            with _never_raise("flow start"):
                m.generation_started.labels(flow, *v.values()).inc()
                m.active_flows.labels(flow, *v.values()).inc()
        status = "failure"
        try:
            with self._timed_span(f"cad.flow {flow}", attributes) as outcome:
                yield outcome
                status = "failure" if outcome.get("failed") else "success"
        finally:
            if counted:
                with _never_raise("flow end"):
                    m.active_flows.labels(flow, *v.values()).dec()
                    m.generation_completed.labels(flow, status, *v.values()).inc()
                    m.generation_duration.labels(flow, status, *v.values()).observe(outcome["duration"])

    @contextlib.contextmanager
    def observe_stage(self, flow_type: str, stage: str) -> Iterator[dict[str, Any]]:
        def record(outcome: dict[str, Any]) -> None:
            self.record_stage(flow_type, stage, outcome["duration"])

        with self._timed_span(f"cad.stage {stage}", {"cad.stage": stage}, record) as outcome:
            yield outcome

    def record_stage(self, flow_type: str, stage: str, duration_seconds: float) -> None:
        with _never_raise("stage"):
            self.metrics.stage_duration.labels(
                bound("flow_type", flow_type), bound("stage", stage), *_versions.get(), _role.get()
            ).observe(duration_seconds)

    # -- documents -----------------------------------------------------------------

    @contextlib.contextmanager
    def observe_document_operation(
        self,
        document_id: str,
        operation: str,
        workbench: str = "Part",
        source: str = "new",
        object_count: int = 0,
    ) -> Iterator[dict[str, Any]]:
        attributes = {"cad.document.id": document_id, "cad.document.operation": operation}

        def record(outcome: dict[str, Any]) -> None:
            if operation == "recompute":
                self.record_recompute(workbench, outcome.get("object_count", object_count), outcome["duration"])
            else:
                self.record_document_load(source, workbench, outcome["duration"])

        with self._timed_span(f"document.{operation}", attributes, record) as outcome:
            yield outcome

    def record_document_load(self, source: str, workbench: str, duration_seconds: float) -> None:
        with _never_raise("document load"):
            self.metrics.document_load.labels(
                bound("source", source), bound("workbench", workbench), *_versions.get(), _role.get()
            ).observe(duration_seconds)

    def record_recompute(self, workbench: str, object_count: int, duration_seconds: float) -> None:
        with _never_raise("recompute"):
            self.metrics.recompute.labels(
                bound("workbench", workbench), doc_complexity(int(object_count)), *_versions.get(), _role.get()
            ).observe(duration_seconds)

    def record_object_created(self, cls: str, workbench: str, count: float = 1) -> None:
        with _never_raise("object created"):
            self.metrics.object_created.labels(
                bound("class", cls), bound("workbench", workbench), *_versions.get()
            ).inc(count)

    # -- OCCT ------------------------------------------------------------------------

    @contextlib.contextmanager
    def observe_occt_boolean(self, operation: str, solids_count: int) -> Iterator[dict[str, Any]]:
        attributes = {"cad.boolean.operation": operation, "cad.solids_count": solids_count}

        def record(outcome: dict[str, Any]) -> None:
            self.record_occt_boolean(operation, solids_count, outcome["duration"])

        with self._timed_span("occt.boolean", attributes, record) as outcome:
            yield outcome

    def record_occt_boolean(self, operation: str, solids_count: int, duration_seconds: float) -> None:
        with _never_raise("boolean"):
            self.metrics.occt_boolean.labels(
                bound("operation", operation), solids_range(int(solids_count)), *_versions.get(), _role.get()
            ).observe(duration_seconds)

    @contextlib.contextmanager
    def observe_occt_feature(self, feature: str, edges_count: int = 0) -> Iterator[dict[str, Any]]:
        def record(outcome: dict[str, Any]) -> None:
            self.record_occt_feature(feature, outcome["duration"])

        attributes = {"cad.feature": feature, "cad.edges_count": edges_count}
        with self._timed_span("occt.feature", attributes, record) as outcome:
            yield outcome

    def record_occt_feature(self, feature: str, duration_seconds: float) -> None:
        with _never_raise("feature"):
            self.metrics.occt_feature.labels(bound("feature", feature), *_versions.get(), _role.get()).observe(
                duration_seconds
            )

    def record_occt_memory(self, operation: str, memory_bytes: float) -> None:
        with _never_raise("memory"):
            self.metrics.occt_memory.labels(bound("memory_operation", operation), *_versions.get()).observe(
                memory_bytes
            )

    # -- Assembly4 -------------------------------------------------------------------------

    @contextlib.contextmanager
    def observe_assembly4_solver(
        self, solver_type: str, constraints_count: int = 0, lcs_count: int = 0
    ) -> Iterator[dict[str, Any]]:
        """Yields a dict; set ``context["iterations"]`` as the solver runs."""
        attributes = {
            "cad.a4.solver": solver_type,
            "cad.a4.constraints_count": constraints_count,
            "cad.lcs_count": lcs_count,
        }

        def record(outcome: dict[str, Any]) -> None:
            self.record_assembly4_solve(solver_type, outcome["duration"], outcome["iterations"])

        with self._timed_span("a4.solve", attributes, record) as outcome:
            outcome["iterations"] = 0
            try:
                yield outcome
            finally:
                trace.get_current_span().set_attribute("cad.a4.iterations", int(outcome["iterations"]))

    def record_assembly4_solve(self, solver_type: str, duration_seconds: float, iterations: float | None) -> None:
        with _never_raise("a4 solve"):
            solver, v = bound("solver", solver_type), _versions.get()
            self.metrics.a4_solve.labels(solver, *v, _role.get()).observe(duration_seconds)
            if iterations is not None:
                self.record_assembly4_iterations(solver_type, iterations)

    def record_assembly4_iterations(self, solver_type: str, iterations: float) -> None:
        with _never_raise("a4 iterations"):
            solver, v = bound("solver", solver_type), _versions.get()
            self.metrics.a4_iterations_total.labels(solver, *v).inc(iterations)
            self.metrics.a4_iterations.labels(solver, *v).observe(iterations)

    def record_lcs_resolution(self, lcs_count: int, duration_seconds: float) -> None:
        with _never_raise("lcs"):
            self.metrics.a4_lcs.labels(lcs_count_range(int(lcs_count)), *_versions.get(), _role.get()).observe(
                duration_seconds
            )

    # -- materials ---------------------------------------------------------------------------

    def record_material_library_access(self, library: str, result: str) -> None:
        with _never_raise("material access"):
            self.metrics.material_access.labels(
                bound("library", library), bound("result", result), *_versions.get()
            ).inc()

    @contextlib.contextmanager
    def observe_material_property_application(
        self, property_type: str, material_count: int = 1, library: str = "standard"
    ) -> Iterator[dict[str, Any]]:
        attributes = {"cad.material.property": property_type, "cad.material.count": material_count}

        def record(outcome: dict[str, Any]) -> None:
            self.record_material_property(property_type, outcome["duration"])

        with self._timed_span("material.apply_property", attributes, record) as outcome:
            yield outcome

    def record_material_property(self, property_type: str, duration_seconds: float) -> None:
        with _never_raise("material property"):
            self.metrics.material_property.labels(
                bound("property", property_type), *_versions.get(), _role.get()
            ).observe(duration_seconds)

    def record_material_appearance(self, appearance_type: str, duration_seconds: float) -> None:
        with _never_raise("material appearance"):
            self.metrics.material_appearance.labels(
                bound("appearance_type", appearance_type), *_versions.get(), _role.get()
            ).observe(duration_seconds)

    # -- topology and export -----------------------------------------------------------------

    def record_topology_hash(self, scope: str, duration_seconds: float) -> None:
        with _never_raise("topology hash"):
            self.metrics.topology_hash.labels(bound("scope", scope), *_versions.get(), _role.get()).observe(
                duration_seconds
            )

    @contextlib.contextmanager
    def observe_export(self, format: str, file_size: int | None = None) -> Iterator[dict[str, Any]]:  # noqa: A002
        """Yields a dict; set ``context["file_size"]`` once the file is written."""

        def record(outcome: dict[str, Any]) -> None:
            self.record_export(format, outcome["file_size"], outcome["duration"])

        with self._timed_span("export", {"cad.export.format": format.upper()}, record) as outcome:
            outcome["file_size"] = file_size or 0
            yield outcome

    def record_export(self, format: str, file_size: int, duration_seconds: float) -> None:  # noqa: A002
        with _never_raise("export"):
            self.metrics.export_duration.labels(
                bound("format", format.upper()), file_size_range(int(file_size)), *_versions.get(), _role.get()
            ).observe(duration_seconds)

    def record_export_validation(self, format: str, result: str, file_size: int | None = None) -> None:  # noqa: A002
        with _never_raise("export validation"):
            self.metrics.export_validation.labels(
                bound("format", format.upper()), bound("validation", result), *_versions.get()
            ).inc()

    # -- workbenches, AI providers -------------------------------------------------------------

    def record_workbench_invocation(self, workbench: str) -> None:
        with _never_raise("workbench"):
            self.metrics.workbench_invocations.labels(bound("workbench", workbench), *_versions.get()).inc()

    def record_workbench_compatibility(self, workbench: str, compatible: bool) -> None:
        with _never_raise("workbench compatibility"):
            self.metrics.workbench_compatibility.labels(
                bound("workbench", workbench), "true" if compatible else "false", *_versions.get()
            ).inc()

    def record_ai_provider_request(self, provider: str, model: str, outcome: str) -> None:
        with _never_raise("ai request"):
            self.metrics.ai_provider_requests.labels(
                bound("provider", provider), model[:64], bound("ai_outcome", outcome)
            ).inc()

    def set_ai_rate_limit_remaining(self, provider: str, ratio: float) -> None:
        with _never_raise("ai rate limit"):
            self.metrics.ai_rate_limit_remaining.labels(bound("provider", provider)).set(max(0.0, min(1.0, ratio)))

    # -- input documents (upload flow) --------------------------------------------------------

    def record_security_violation(self, violation_type: str) -> None:
        """Count one violation; its severity is the kind's own (``SECURITY_VIOLATION_SEVERITY``)."""
        with _never_raise("security violation"):
            kind = bound("violation_type", violation_type)
            self.metrics.security_violations.labels(kind, SECURITY_VIOLATION_SEVERITY.get(kind, "critical")).inc()

    def record_document_cache(self, *, hit: bool) -> None:
        with _never_raise("document cache"):
            (self.metrics.document_cache_hits if hit else self.metrics.document_cache_misses).inc()

    def set_document_cache(self, entries: int, size_bytes: int) -> None:
        with _never_raise("document cache size"):
            self.metrics.document_cache_entries.labels("documents").set(entries)
            self.metrics.document_cache_bytes.labels("documents").set(size_bytes)

    def record_document_load_attempt(self, source: str) -> None:
        with _never_raise("document load"):
            self.metrics.document_load_attempts.labels(bound("doc_source", source)).inc()

    def record_document_load_failure(self, source: str, error_type: str) -> None:
        with _never_raise("document load failure"):
            self.metrics.document_load_failures.labels(
                bound("doc_source", source), bound("doc_error", error_type)
            ).inc()

    def record_document_load_stage(self, stage: str, seconds: float) -> None:
        with _never_raise("document load stage"):
            self.metrics.document_load_stage.labels(bound("load_stage", stage)).observe(max(0.0, seconds))

    def set_document_load_progress(self, stage: str, ratio: float) -> None:
        with _never_raise("document load progress"):
            self.metrics.document_load_progress.labels(bound("load_stage", stage)).set(max(0.0, min(1.0, ratio)))

    def record_spans_dropped(self, reason: str, count: int) -> None:
        """The span processor's ``on_drop`` callback (see ``setup_tracing``)."""
        with _never_raise("spans dropped"):
            self.metrics.spans_dropped.labels(bound("span_drop_reason", reason)).inc(count)

    def zero_event_counters(self) -> None:
        """Expose, at 0, the labelled counters that alert on a single event
        (``increase(...) > 0``): security violations, unreadable metric files,
        dropped spans. A series that first appears at 1 has no increase to
        Prometheus, so without its 0 the first event on a host would not alert.
        Called in the worker's main process at start; its file keeps the zeros
        while pool processes count the events in theirs."""
        with _never_raise("zero event counters"):
            m = self.metrics
            for kind, severity in sorted(SECURITY_VIOLATION_SEVERITY.items()):
                m.security_violations.labels(kind, severity)
            for action in sorted(ALLOWED_LABEL_VALUES["metrics_file_action"]):
                m.metrics_files_unreadable.labels(action)
            for reason in sorted(ALLOWED_LABEL_VALUES["span_drop_reason"]):
                m.spans_dropped.labels(reason)
            for outcome in sorted(ALLOWED_LABEL_VALUES["accumulator_outcome"]):
                m.metrics_accumulator.labels(outcome)
            for reason in sorted(ALLOWED_LABEL_VALUES["journal_error"]):
                m.journal_errors.labels(reason)
            for reason in sorted(ALLOWED_LABEL_VALUES["duplicate_reason"]):
                m.task_duplicates.labels(reason)

    def record_metrics_file_unreadable(self, action: str) -> None:
        """The multiprocess collector's ``on_unreadable`` callback (the worker's main process)."""
        with _never_raise("metrics file unreadable"):
            self.metrics.metrics_files_unreadable.labels(bound("metrics_file_action", action)).inc()

    def record_metrics_accumulator(self, outcome: str) -> None:
        """The multiprocess collector's ``on_accumulator`` callback: a copy that failed its checksum."""
        with _never_raise("metrics accumulator"):
            self.metrics.metrics_accumulator.labels(bound("accumulator_outcome", outcome)).inc()

    def record_metrics_fallback(self, reason: str) -> None:
        """:func:`~cadscope.metrics.reserve_process_files`'s ``on_fallback`` callback."""
        with _never_raise("metrics fallback"):
            self.metrics.metrics_fallback.labels(bound("fallback_reason", reason)).inc()

    def record_duplicate_dropped(self, reason: str) -> None:
        """A delivery of a job id dropped without running (see ``workers._progress.claim_run``)."""
        with _never_raise("duplicate dropped"):
            self.metrics.task_duplicates.labels(bound("duplicate_reason", reason)).inc()

    def record_journal_error(self, reason: str) -> None:
        """The open-span journal's ``on_error`` callback."""
        with _never_raise("journal error"):
            self.metrics.journal_errors.labels(bound("journal_error", reason)).inc()

    def record_spans_recovered(self, cause: str, count: int) -> None:
        """Spans of a dead process closed by a survivor (:class:`~cadscope.tracing.JournalReaper`)."""
        with _never_raise("spans recovered"):
            self.metrics.spans_recovered.labels(bound("recovery_cause", cause)).inc(count)

    def record_ai_failover(self, provider: str) -> None:
        with _never_raise("ai failover"):
            self.metrics.ai_failovers.labels(bound("provider", provider)).inc()

    def set_ai_circuit_state(self, provider: str, value: int) -> None:
        with _never_raise("ai circuit"):
            self.metrics.ai_circuit_state.labels(bound("provider", provider)).set(value)

    def record_ai_usage(self, provider: str, model: str, input_tokens: int, output_tokens: int, cost: float) -> None:
        with _never_raise("ai usage"):
            p, m = bound("provider", provider), model[:64]
            self.metrics.ai_tokens.labels(p, m, "input").inc(max(0, input_tokens))
            self.metrics.ai_tokens.labels(p, m, "output").inc(max(0, output_tokens))
            self.metrics.ai_cost.labels(p, m).inc(max(0.0, cost))

    def set_ai_synthetic(self, provider: str, ok: bool) -> None:
        with _never_raise("ai synthetic"):
            self.metrics.ai_synthetic_ok.labels(bound("provider", provider)).set(1 if ok else 0)

    def record_ai_provider_latency(self, provider: str, model: str, operation: str, latency_seconds: float) -> None:
        # model and operation come from configuration, never from requests.
        with _never_raise("ai latency"):
            self.metrics.ai_provider_latency.labels(bound("provider", provider), model[:64], operation[:64]).observe(
                latency_seconds
            )


@functools.lru_cache(maxsize=1)
def default_observability() -> ModelObservability:
    """The process-wide facade on the default registry, created on first use.

    In a prefork worker that is in the main process at start, after the
    multiprocess switch, to expose the event counters at 0
    (:meth:`ModelObservability.zero_event_counters`). Pool processes inherit it
    across the fork, and their values go to files of their own: prometheus_client's
    multiprocess values notice the fork.
    """
    return ModelObservability()
