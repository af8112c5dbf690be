"""Every cadscope metric, defined once: name, help, bounded labels, buckets.

Every CAD metric carries ``freecad_version`` and ``occt_version``, so every
dashboard and alert can be split by engine version. Label values are bounded: counts become
ranges, free text never becomes a label, an unknown value becomes ``other``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "ROLES",
    "ALLOWED_LABEL_VALUES",
    "Catalogue",
    "VERSION_LABELS",
    "bound",
    "bound_version",
    "doc_complexity",
    "file_size_range",
    "lcs_count_range",
    "solids_range",
]

VERSION_LABELS = ("freecad_version", "occt_version")
ROLES = ("primary", "shadow")
OTHER = "other"

# -- buckets, each with its reason ----------------------------------------------

# A whole job: 0.25 s for a small part up to many minutes for an assembly;
# 300 s is the ModelGenerationSlow threshold, so it is a bucket boundary.
FLOW_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
# One OCCT boolean or fillet: a millisecond for primitives, tens of seconds for
# meshes of thousands of faces; 30 s is the OCCTBooleanOperationSlow threshold.
OCCT_OP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Document, material and hashing steps: sub-millisecond to seconds.
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# The Assembly4 solve: 15 s is the Assembly4SolverSlow threshold.
SOLVER_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 15, 30, 60)
# Solver iterations: 200 is the Assembly4ExcessiveIterations threshold.
ITERATION_BUCKETS = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000)
# Exports: milliseconds for a BREP, a minute for a fine STL of a big assembly.
EXPORT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Process memory: FreeCAD starts near 80 MiB; 1.5 GiB is OCCTHighMemoryUsage ("1.5 GB", read in
# binary units: see infra/generate.py).
MEMORY_BUCKETS = (32 << 20, 64 << 20, 128 << 20, 256 << 20, 512 << 20, 1 << 30, 1536 << 20, 2 << 30, 4 << 30, 8 << 30)
# Time in the queue: from immediate to an hour of backlog.
QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
# Hosted model calls: seconds; 30 s is the provider latency alert's threshold.
AI_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)

# -- bounded label values ---------------------------------------------------------

#: Each kind of security violation and its one severity. The counter's series are
#: exactly these pairs, and the worker exposes each at 0 from its start
#: (``ModelObservability.zero_event_counters``); a new kind is added here only.
SECURITY_VIOLATION_SEVERITY: Mapping[str, str] = MappingProxyType(
    {"checksum_mismatch": "critical", "path_traversal": "high", "forbidden_address": "high"}
)

ALLOWED_LABEL_VALUES: dict[str, frozenset[str]] = {
    "flow_type": frozenset({"parametric", "ai_prompt", "upload", "script", "template"}),
    "status": frozenset({"success", "failure"}),
    "stage": frozenset(
        {"validate", "prepare", "engine", "generate", "assemble", "export", "validate_export", "collect"}
    ),
    "source": frozenset({"new", "file", "upload"}),
    "workbench": frozenset({"Part", "PartDesign", "Import", "Mesh", "Assembly4", "Material"}),
    "class": frozenset(
        {
            "Part::Box",
            "Part::Cylinder",
            "Part::Sphere",
            "Part::Cone",
            "Part::Torus",
            "Part::Feature",
            "Part::MultiFuse",
            "Part::Cut",
            "Part::MultiCommon",
            "Part::Fillet",
            "Part::Chamfer",
            "App::Part",
            "BRepPrimAPI_MakeBox",
            "BRepPrimAPI_MakeCylinder",
            "BRepPrimAPI_MakeSphere",
            "BRepPrimAPI_MakeCone",
            "BRepPrimAPI_MakeTorus",
            "BRepPrimAPI_MakePrism",
            "BRepAlgoAPI_Fuse",
            "BRepAlgoAPI_Cut",
            "BRepAlgoAPI_Common",
            "BRepFilletAPI_MakeFillet",
            "BRepFilletAPI_MakeChamfer",
            "TopoDS_Compound",
        }
    ),
    "operation": frozenset({"union", "cut", "common", "section", "general_fuse"}),
    # Fillet and chamfer, and what the user's own FreeCAD/OCP code runs (Part's and
    # PartDesign's features, as the auto-instrumentation names them).
    "feature": frozenset(
        {
            "fillet",
            "chamfer",
            "thickness",
            "offset",
            "extrude",
            "revolve",
            "loft",
            "sweep",
            "pad",
            "pocket",
            "hole",
            "groove",
            "revolution",
            "draft",
            "linear_pattern",
            "polar_pattern",
            "mirrored",
            "multi_transform",
            "additive_pipe",
            "additive_loft",
            "subtractive_pipe",
            "subtractive_loft",
        }
    ),
    "memory_operation": frozenset(
        {
            "boolean_union",
            "boolean_cut",
            "boolean_common",
            "boolean_complex",
            "fillet",
            "chamfer",
            "export_step",
            "export_stl",
            "export_brep",
            "export_iges",
            "export_obj",
            "process",
        }
    ),
    "solver": frozenset({"lcs_attachment", "newton_raphson"}),
    "library": frozenset({"standard"}),
    "result": frozenset({"hit", "miss", "error"}),
    "property": frozenset({"density"}),
    "appearance_type": frozenset({"color", "texture", "none"}),
    "scope": frozenset({"part", "assembly"}),
    "format": frozenset({"STEP", "STL", "BREP", "IGES", "OBJ", "GLB"}),
    "validation": frozenset({"pass", "fail"}),
    "reason": frozenset({"oom", "timeout", "crash", "killed"}),
    "engine": frozenset({"freecad", "ocp"}),
    "outcome": frozenset(
        {"ok", "script_error", "crash", "timeout", "oom", "killed", "bad_output", "resource_limit", "disk_full"}
    ),
    "task_outcome": frozenset({"success", "failure", "retry", "rejected", "lost", "dead_letter"}),
    "compatible": frozenset({"true", "false"}),
    "provider": frozenset({"local", "openai_compatible"}),
    "ai_outcome": frozenset(
        {"ok", "timeout", "rate_limited", "server_error", "unavailable", "invalid_output", "refused"}
    ),
    "token_kind": frozenset({"input", "output"}),
    "doc_source": frozenset({"store", "http"}),
    "doc_error": frozenset(
        {
            "not_found",
            "download_failed",
            "download_timeout",
            "too_large",
            "size_mismatch",
            "checksum_mismatch",
            "bad_uri",
            "load_failed",
        }
    ),
    "load_stage": frozenset({"download", "checksum", "load", "validate"}),
    "violation_type": frozenset(SECURITY_VIOLATION_SEVERITY),
    "span_drop_reason": frozenset({"queue_full", "export_failed", "shutdown"}),
    "metrics_file_action": frozenset({"left_out", "moved_aside"}),
    "accumulator_outcome": frozenset({"repaired", "previous", "lost"}),
    "fallback_reason": frozenset({"disk_full"}),
    # Why a job started a fresh engine process instead of forking a warm one.
    "cold_start_reason": frozenset(
        {
            "disabled",
            "job_option",
            "no_server",
            "unavailable",
            "max_forks",
            "rss",
            "engine_changed",
            "threads",
            "server_error",
            "fork_failed",
            "bad_request",
        }
    ),  # fmt: skip
    # Why a warm engine was replaced.
    "recycle_reason": frozenset({"max_forks", "rss", "engine_changed", "threads", "crash"}),
    "journal_error": frozenset({"disk_full", "io_error", "too_large"}),
    "duplicate_reason": frozenset({"finished", "running"}),
    "recovery_cause": frozenset(
        {"worker_lost", "worker_restart", "SIGKILL", "SIGTERM", "SIGSEGV", "SIGBUS", "SIGABRT", "SIGINT"}
    ),
    "rejected_reason": frozenset(
        {
            "not_an_object",
            "bad_attributes",
            "bad_result",
            "unknown_type",
            "bad_span_id",
            "duplicate_span_id",
            "bad_span",
            "too_many_spans",
            "end_without_start",
            "bad_metric",
            "line_too_long",
            "truncated_line",
            "too_many_events",
            "invalid_json",
            "handler_error",
            "pipe_held_open",
            "unknown_metric",
        }
    ),
}

_VERSION = re.compile(r"^(?:\d{1,3}\.\d{1,3}(?:\.\d{1,4})?|none)$")


def bound(label: str, value: object) -> str:
    """``value`` if it is one of ``label``'s allowed values, else ``other``."""
    text = str(value)
    return text if text in ALLOWED_LABEL_VALUES[label] else OTHER


def bound_version(value: object) -> str:
    """A version such as ``0.20.2`` or ``none``; anything else is ``other``."""
    text = str(value)
    return text if _VERSION.fullmatch(text) else OTHER


def _ranges(value: int, edges: Iterable[tuple[int, str]], last: str) -> str:
    for upper, name in edges:
        if value <= upper:
            return name
    return last


def solids_range(count: int) -> str:
    return _ranges(count, ((1, "1"), (2, "2"), (5, "3-5"), (10, "6-10"), (50, "11-50")), "51+")


def lcs_count_range(count: int) -> str:
    return _ranges(count, ((0, "0"), (5, "1-5"), (20, "6-20"), (50, "21-50")), "51+")


def file_size_range(size_bytes: int) -> str:
    return _ranges(
        size_bytes,
        ((100_000, "lt_100kb"), (1_000_000, "100kb_1mb"), (10_000_000, "1mb_10mb"), (100_000_000, "10mb_100mb")),
        "gt_100mb",
    )


def doc_complexity(object_count: int) -> str:
    return _ranges(object_count, ((9, "simple"), (49, "moderate"), (199, "complex")), "very_complex")


class Catalogue:
    """All metrics on one registry. Tests pass a fresh ``CollectorRegistry()``."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        v = VERSION_LABELS
        # Stage and operation durations also say whether the job was a primary or a shadow run.
        vr = (*VERSION_LABELS, "role")
        r = registry

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, registry=r, buckets=buckets)

        # Flow lifecycle
        self.generation_started = counter(
            "model_generation_started", "Model generation flows started.", ("flow_type", *v)
        )
        self.generation_completed = counter(
            "model_generation_completed", "Model generation flows finished, by status.", ("flow_type", "status", *v)
        )
        self.generation_duration = histogram(
            "model_generation_duration_seconds",
            "Wall time of a whole flow, failures included.",
            ("flow_type", "status", *v),
            FLOW_BUCKETS,
        )
        self.stage_duration = histogram(
            "model_generation_stage_duration_seconds",
            "Wall time of one stage of a flow.",
            ("flow_type", "stage", *vr),
            FLOW_BUCKETS,
        )
        self.active_flows = Gauge(
            "model_generation_active_flows",
            "Flows being processed now.",
            ("flow_type", *v),
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ai_provider_latency = histogram(
            "ai_provider_latency_seconds",
            "Latency of AI provider calls.",
            ("provider", "model", "operation"),
            AI_LATENCY_BUCKETS,
        )
        self.ai_provider_requests = counter(
            "ai_provider_requests", "AI provider calls by outcome.", ("provider", "model", "outcome")
        )
        self.ai_rate_limit_remaining = Gauge(
            "ai_provider_rate_limit_remaining_ratio",
            "Rate-limit headroom the provider reports (0-1).",
            ("provider",),
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.ai_failovers = counter(
            "ai_provider_failovers",
            "Prompts passed on to the next provider, by the provider that failed.",
            ("provider",),
        )
        self.ai_circuit_state = Gauge(
            "ai_provider_circuit_state",
            "Circuit breaker per provider: 0 closed, 1 half-open, 2 open (worst live process).",
            ("provider",),
            registry=r,
            multiprocess_mode="livemax",
        )
        self.ai_tokens = counter("ai_provider_tokens", "Tokens used by provider calls.", ("provider", "model", "kind"))
        self.ai_cost = counter(
            "ai_provider_cost_usd", "Estimated cost of provider calls (configured prices).", ("provider", "model")
        )
        self.ai_synthetic_ok = Gauge(
            "ai_provider_synthetic_ok",
            "Last synthetic check of the provider: 1 passed, 0 failed.",
            ("provider",),
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        # FreeCAD documents
        self.document_load = histogram(
            "freecad_document_load_seconds",
            "Time to create or load a document.",
            ("source", "workbench", *vr),
            FAST_BUCKETS,
        )
        self.recompute = histogram(
            "freecad_recompute_duration_seconds",
            "Document recompute time.",
            ("workbench", "doc_complexity", *vr),
            FAST_BUCKETS,
        )
        self.object_created = counter(
            "freecad_object_created", "Document objects created, by class.", ("class", "workbench", *v)
        )
        # OCCT
        self.occt_boolean = histogram(
            "occt_boolean_duration_seconds",
            "Duration of one OCCT boolean.",
            ("operation", "solids_range", *vr),
            OCCT_OP_BUCKETS,
        )
        self.occt_feature = histogram(
            "occt_feature_duration_seconds",
            "Duration of one OCCT fillet or chamfer.",
            ("feature", *vr),
            OCCT_OP_BUCKETS,
        )
        self.occt_memory = histogram(
            "occt_operation_memory_bytes",
            "Peak resident memory of the CAD process during one operation.",
            ("operation", *v),
            MEMORY_BUCKETS,
        )
        # Assembly4
        self.a4_solve = histogram(
            "a4_constraint_solve_duration_seconds", "Assembly4 placement solve time.", ("solver", *vr), SOLVER_BUCKETS
        )
        self.a4_lcs = histogram(
            "a4_lcs_resolution_duration_seconds",
            "Time to resolve local coordinate systems.",
            ("lcs_count_range", *vr),
            SOLVER_BUCKETS,
        )
        self.a4_iterations_total = counter(
            "a4_solver_iterations", "Solver iterations, summed over solves.", ("solver", *v)
        )
        self.a4_iterations = histogram(
            "a4_solver_iterations_per_solve",
            "Iterations of one solve (for the P95 > 200 alert).",
            ("solver", *v),
            ITERATION_BUCKETS,
        )
        # Materials
        self.material_access = counter(
            "material_library_access", "Material library lookups.", ("library", "result", *v)
        )
        self.material_property = histogram(
            "material_property_apply_duration_seconds",
            "Time to apply a material property.",
            ("property", *vr),
            FAST_BUCKETS,
        )
        self.material_appearance = histogram(
            "material_appearance_apply_duration_seconds",
            "Time to apply a material appearance.",
            ("appearance_type", *vr),
            FAST_BUCKETS,
        )
        # Topology and export
        self.topology_hash = histogram(
            "topology_hash_compute_duration_seconds", "Time to compute a topology hash.", ("scope", *vr), FAST_BUCKETS
        )
        self.export_validation = counter(
            "deterministic_export_validation", "Exports written twice and compared.", ("format", "result", *v)
        )
        self.export_duration = histogram(
            "export_duration_seconds", "Time to export one file.", ("format", "file_size_range", *vr), EXPORT_BUCKETS
        )
        # Workbenches
        self.workbench_invocations = counter(
            "freecad_workbench_invocations", "Workbench invocations.", ("workbench", *v)
        )
        self.workbench_compatibility = counter(
            "freecad_workbench_compatibility", "Workbench availability checks.", ("workbench", "compatible", *v)
        )
        # Worker and subprocess
        self.worker_restarts = counter(
            "freecad_worker_restarts", "CAD processes that died and had to be replaced.", ("reason", *v)
        )
        self.subprocess_outcomes = counter(
            "cadscope_subprocess_outcomes", "CAD subprocesses by classified outcome.", ("engine", "outcome", *v)
        )
        self.subprocess_peak_memory = histogram(
            "cadscope_subprocess_peak_memory_bytes",
            "Peak RSS of a CAD subprocess (wait4 ru_maxrss).",
            ("engine", *v),
            MEMORY_BUCKETS,
        )
        self.subprocess_cpu = counter(
            "cadscope_subprocess_cpu_seconds", "CPU time (user + system) of CAD subprocesses (wait4).", ("engine", *v)
        )
        self.shadow_comparisons = counter(
            "cadscope_shadow_comparisons",
            "Shadow runs compared with their primary as the later of the two completes, by result "
            "(match, geometry_mismatch, outcome_mismatch); versions are the shadow's.",
            ("result", *v),
        )
        self.telemetry_rejected = counter(
            "cadscope_telemetry_events_rejected", "Child telemetry events dropped, by reason.", ("reason",)
        )
        # Input documents (the upload flow: integrity and cache metrics in CAD terms)
        self.security_violations = counter(
            "cadscope_security_violations", "Security violations, by type and severity.", ("violation_type", "severity")
        )
        self.document_cache_hits = counter("cadscope_document_cache_hits", "Verified input documents found cached.", ())
        self.document_cache_misses = counter(
            "cadscope_document_cache_misses", "Input documents that had to be fetched.", ()
        )
        # Labelled so that only processes that touch the cache create a gauge file
        # (an unlabelled gauge makes one in every pool process at import).
        self.document_cache_entries = Gauge(
            "cadscope_document_cache_entries", "Documents in this host's cache.", ("cache",), registry=r,
            multiprocess_mode="livemostrecent",
        )  # fmt: skip
        self.document_cache_bytes = Gauge(
            "cadscope_document_cache_bytes", "Bytes held by this host's document cache.", ("cache",), registry=r,
            multiprocess_mode="livemostrecent",
        )  # fmt: skip
        self.document_load_attempts = counter(
            "cadscope_document_load_attempts", "Input document loads started, by source.", ("source",)
        )
        self.document_load_failures = counter(
            "cadscope_document_load_failures", "Input document loads that failed, by error type.",
            ("source", "error_type"),
        )  # fmt: skip
        self.document_load_stage = histogram(
            "cadscope_document_load_stage_seconds", "Time of each stage of loading an input document.",
            ("stage",), FAST_BUCKETS,
        )  # fmt: skip
        self.document_load_progress = Gauge(
            "cadscope_document_load_progress_ratio", "Progress of the current document load, per stage (0-1).",
            ("stage",), registry=r, multiprocess_mode="livemostrecent",
        )  # fmt: skip
        self.spans_dropped = counter(
            "cadscope_telemetry_spans_dropped",
            "Spans never exported, by reason (queue_full, export_failed, shutdown).",
            ("reason",),
        )
        self.metrics_files_unreadable = counter(
            "cadscope_metrics_files_unreadable",
            "Multiprocess metric files found unreadable: left out of scrapes (once a file), then moved aside.",
            ("action",),
        )
        self.metrics_accumulator = counter(
            "cadscope_metrics_accumulator_repairs",
            "Metric accumulators that failed their checksum: repaired, previous (last fold lost) or lost.",
            ("outcome",),
        )
        self.metrics_fallback = counter(
            "cadscope_metrics_fallback_processes",
            "Processes whose metric files went to the memory-backed fallback (no room on the data disk).",
            ("reason",),
        )
        self.worker_process_starts = counter(
            "cadscope_worker_process_starts", "Pool processes started and able to write metrics.", ()
        )
        self.journal_errors = counter(
            "cadscope_telemetry_journal_errors",
            "Open-span journal writes that failed, by reason: those spans cannot be closed after a death.",
            ("reason",),
        )
        self.spans_recovered = counter(
            "cadscope_telemetry_spans_recovered",
            "Spans a dead process left open, ended at its death and exported by a survivor, by cause.",
            ("cause",),
        )
        # Warm engines
        self.warm_hits = counter(
            "cadscope_warm_hits", "Jobs forked from a warm engine (no engine start-up).", ("engine", *v)
        )
        self.cold_starts = counter(
            "cadscope_cold_starts",
            "Jobs that started a fresh engine process, by reason (disabled, job_option, no_server, or why the "
            "warm engine could not serve: unavailable, max_forks, rss, engine_changed, ...).",
            ("engine", "reason", *v),
        )
        self.warm_recycles = counter(
            "cadscope_warm_recycles",
            "Warm engines replaced, by reason: max_forks, rss, engine_changed, threads, crash.",
            ("engine", "reason", *v),
        )
        self.warm_process_rss = Gauge(
            "cadscope_warm_process_rss_bytes",
            "Resident memory of the warm engine (fork server), as it last reported it.",
            ("engine", *v),
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.task_runtime = histogram(
            "cadscope_task_runtime_seconds",
            "Celery task run time, failures included.",
            ("task", "outcome"),
            FLOW_BUCKETS,
        )
        self.task_queue_wait = histogram(
            "cadscope_task_queue_wait_seconds",
            "Time from publish to the start of execution.",
            ("task",),
            QUEUE_WAIT_BUCKETS,
        )
        self.task_outcomes = counter(
            "cadscope_task_outcomes", "Celery task executions by outcome.", ("task", "outcome")
        )
        self.task_duplicates = counter(
            "cadscope_task_duplicates_dropped",
            "Deliveries of a job id dropped without running: the job had already run to its end (finished) "
            "or another delivery of it was running (running).",
            ("reason",),
        )
        self.attempts_lost = counter(
            "cadscope_task_attempts_lost", "Task attempts lost with their worker process (redelivered).", ("task",)
        )

    def task_finished(self, task: str, outcome: str, seconds: float) -> None:
        """Count one task run by outcome and observe its run time."""
        self.task_outcomes.labels(task, outcome).inc()
        self.task_runtime.labels(task, outcome).observe(seconds)

    #: The multiprocess files a process writes for this catalogue: reserved ahead of its first write
    #: (:func:`~cadscope.metrics.reserve_process_files`).
    FILE_KINDS = ("counter", "histogram", "gauge_livesum", "gauge_livemostrecent", "gauge_livemax")
