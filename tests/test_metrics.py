"""The catalogue: the model-generation metric names, version labels, bounded label values, helpers."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from cadscope.metrics import (
    ALLOWED_LABEL_VALUES,
    SECURITY_VIOLATION_SEVERITY,
    Catalogue,
    ModelObservability,
    bound,
    bound_version,
    doc_complexity,
    file_size_range,
    lcs_count_range,
    solids_range,
)
from cadscope.tracing.testing import in_memory_provider

# The model-generation metric families (exposition names) and their labels.
SEED_003 = {
    "model_generation_started_total": {"flow_type"},
    "model_generation_completed_total": {"flow_type", "status"},
    "model_generation_stage_duration_seconds": {"flow_type", "stage"},
    "ai_provider_latency_seconds": {"provider", "model", "operation"},
    "freecad_document_load_seconds": {"source", "workbench"},
    "freecad_recompute_duration_seconds": {"workbench", "doc_complexity"},
    "freecad_object_created_total": {"class", "workbench"},
    "occt_boolean_duration_seconds": {"operation", "solids_range"},
    "occt_feature_duration_seconds": {"feature"},
    "occt_operation_memory_bytes": {"operation"},
    "a4_constraint_solve_duration_seconds": {"solver"},
    "a4_lcs_resolution_duration_seconds": {"lcs_count_range"},
    "a4_solver_iterations_total": {"solver"},
    "material_library_access_total": {"library", "result"},
    "material_property_apply_duration_seconds": {"property"},
    "material_appearance_apply_duration_seconds": {"appearance_type"},
    "topology_hash_compute_duration_seconds": {"scope"},
    "deterministic_export_validation_total": {"format", "result"},
    "export_duration_seconds": {"format", "file_size_range"},
    "freecad_workbench_invocations_total": {"workbench"},
    "freecad_workbench_compatibility_total": {"workbench", "compatible"},
}
NOT_CAD = {"ai_provider_latency_seconds"}
ROLE_LABELLED = {name for name in SEED_003 if name.endswith("_seconds") and name not in NOT_CAD}


def _labels_of(registry: CollectorRegistry) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for collector in registry._collector_to_names:  # noqa: SLF001 - test introspection
        for name in registry._collector_to_names[collector]:  # noqa: SLF001
            found[name] = set(collector._labelnames)  # noqa: SLF001
    return found


def test_every_seed_metric_exists_with_its_labels_plus_versions():
    labels = _labels_of((registry := CollectorRegistry()) and (Catalogue(registry), registry)[1])
    for name, seed_labels in SEED_003.items():
        assert name in labels, name
        expected = seed_labels if name in NOT_CAD else seed_labels | {"freecad_version", "occt_version"}
        if name in ROLE_LABELLED:  # a duration of a stage or operation: primary or shadow run
            expected = expected | {"role"}
        assert labels[name] == expected, name


def test_ranges_and_bounds():
    assert [solids_range(n) for n in (1, 2, 4, 7, 30, 500)] == ["1", "2", "3-5", "6-10", "11-50", "51+"]
    assert [lcs_count_range(n) for n in (0, 3, 10, 40, 99)] == ["0", "1-5", "6-20", "21-50", "51+"]
    assert file_size_range(50_000) == "lt_100kb" and file_size_range(5 * 10**9) == "gt_100mb"
    assert doc_complexity(3) == "simple" and doc_complexity(500) == "very_complex"
    assert bound("operation", "union") == "union"
    assert bound("operation", "'; DROP TABLE") == "other"
    assert bound_version("0.20.2") == "0.20.2" and bound_version("none") == "none"
    assert bound_version("7.6.3\n") == "other" and bound_version("x" * 100) == "other"


def test_helpers_record_with_engine_versions_and_bounded_labels():
    registry = CollectorRegistry()
    provider, exporter = in_memory_provider()
    obs = ModelObservability(Catalogue(registry), tracer_provider=provider)
    v = {"freecad_version": "0.20.2", "occt_version": "7.6.3"}
    with obs.engine_versions("0.20.2", "7.6.3"):
        with obs.observe_model_generation("parametric", job_id="j1"):
            assert registry.get_sample_value("model_generation_active_flows", {"flow_type": "parametric", **v}) == 1
            with obs.observe_occt_boolean("union", solids_count=5):
                pass
            with obs.observe_assembly4_solver("lcs_attachment", constraints_count=3, lcs_count=4) as ctx:
                ctx["iterations"] = 250
            with obs.observe_export("step") as export:
                export["file_size"] = 2_048_000
        obs.record_object_created("Hostile::Class<script>", "Part")
        with pytest.raises(KeyError):
            with obs.observe_model_generation("evil_flow", job_id="j2"):
                raise KeyError("the job's own exception is re-raised unchanged")
    get = registry.get_sample_value
    assert get("model_generation_completed_total", {"flow_type": "parametric", "status": "success", **v}) == 1
    assert get("model_generation_completed_total", {"flow_type": "other", "status": "failure", **v}) == 1
    assert get("model_generation_active_flows", {"flow_type": "parametric", **v}) == 0
    assert (
        get(
            "occt_boolean_duration_seconds_count", {"role": "primary", "operation": "union", "solids_range": "3-5", **v}
        )
        == 1
    )
    assert get("a4_solver_iterations_total", {"solver": "lcs_attachment", **v}) == 250
    assert get("a4_solver_iterations_per_solve_bucket", {"solver": "lcs_attachment", "le": "200.0", **v}) == 0
    assert (
        get("export_duration_seconds_count", {"role": "primary", "format": "STEP", "file_size_range": "1mb_10mb", **v})
        == 1
    )
    assert get("freecad_object_created_total", {"class": "other", "workbench": "Part", **v}) == 1
    names = {s.name for s in exporter.get_finished_spans()}
    assert {"cad.flow parametric", "occt.boolean", "a4.solve", "export", "cad.flow other"} <= names
    failed = next(s for s in exporter.get_finished_spans() if s.name == "cad.flow other")
    assert failed.attributes["error.type"] == "KeyError"


def test_recording_never_raises_into_the_job(caplog):
    obs = ModelObservability(Catalogue(CollectorRegistry()))
    with caplog.at_level("ERROR", logger="cadscope.metrics"):
        obs.record_occt_boolean("union", "not a number", 1.0)  # type: ignore[arg-type]
        obs.record_export("STEP", None, 1.0)  # type: ignore[arg-type]
    # Swallowed, but said: which recording, and the error with its traceback.
    assert [r.getMessage() for r in caplog.records] == ["recording boolean failed", "recording export failed"]
    assert all(r.exc_info and r.exc_info[0] in (ValueError, TypeError) for r in caplog.records)


def test_exposition_has_help_and_bucket_boundaries_at_alert_thresholds():
    registry = CollectorRegistry()
    obs = ModelObservability(Catalogue(registry))
    with obs.engine_versions("0.20.2", "7.6.3"):
        obs.record_occt_boolean("cut", 2, 31.0)
        obs.record_assembly4_solve("lcs_attachment", 16.0, 201)
        obs.record_occt_memory("fillet", 1.6e9)
    text = generate_latest(registry).decode()
    assert "# HELP occt_boolean_duration_seconds" in text
    for boundary in ('le="30.0"', 'le="15.0"', 'le="200.0"', 'le="1.610612736e+09"'):
        assert boundary in text, boundary


def test_every_event_an_alert_counts_lands_on_a_series_exposed_at_zero():
    """An alert on ``increase(...) > 0`` sees a host's first event only if the
    series was there at 0 before it: each event must land on a zeroed series."""
    registry = CollectorRegistry()
    obs = ModelObservability(Catalogue(registry))
    # every family whose alert is `increase(...[5m]) > 0` or a rate of it (infra/generate.py)
    ALERTED_ON_ONE_EVENT = {  # noqa: N806
        "cadscope_security_violations_total",
        "cadscope_telemetry_spans_dropped_total",
        "cadscope_metrics_files_unreadable_total",
    }
    obs.zero_event_counters()

    def counts() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect()
            for s in family.samples
            if s.name in ALERTED_ON_ONE_EVENT
        }

    zeroed = counts()
    assert zeroed and set(zeroed.values()) == {0.0}
    for kind in SECURITY_VIOLATION_SEVERITY:
        obs.record_security_violation(kind)
    for reason in ALLOWED_LABEL_VALUES["span_drop_reason"]:
        obs.record_spans_dropped(reason, 1)
    for action in ALLOWED_LABEL_VALUES["metrics_file_action"]:
        obs.record_metrics_file_unreadable(action)
    after = counts()
    assert set(after) == set(zeroed), "an event made a series that was not exposed at 0"
    assert set(after.values()) == {1.0}, "a zeroed series no event can reach"


def test_task_finished_writes_what_the_childrens_own_calls_write():
    """``task_finished`` writes the count, sum and bucket itself (the children's wrappers
    skipped): every sample must be what ``labels().inc()`` and ``labels().observe()`` give,
    on bucket bounds, between them, below the first and past the last, and for NaN."""
    from cadscope.metrics._catalogue import FLOW_BUCKETS

    ours, theirs = Catalogue(CollectorRegistry()), Catalogue(CollectorRegistry())
    runs = [0.0, -1.0, 0.049, 1e9, float("inf"), float("nan")]
    runs += list(FLOW_BUCKETS) + [b * 1.0001 for b in FLOW_BUCKETS]
    for i, seconds in enumerate(runs):
        outcome = ("success", "failure")[i % 2]
        ours.task_finished("run_job", outcome, seconds)
        theirs.task_outcomes.labels("run_job", outcome).inc()
        theirs.task_runtime.labels("run_job", outcome).observe(seconds)

    def samples(catalogue):
        return sorted(
            (s.name, tuple(sorted(s.labels.items())), repr(s.value))  # repr: NaN equals NaN
            for family in (catalogue.task_outcomes, catalogue.task_runtime)
            for metric in family.collect()
            for s in metric.samples
            if not s.name.endswith("_created")
        )

    assert samples(ours) == samples(theirs)
    success = (("outcome", "success"), ("task", "run_job"))
    assert ("cadscope_task_runtime_seconds_count", success, "17.0") in samples(ours)
