"""The task span (cadscope.tracing._lean) against the SDK's span: the same calls give the same exported span."""

from __future__ import annotations

import logging
import time

import pytest
from opentelemetry import context, trace
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from cadscope.tracing._lean import LeanSpan, start_lean_span

REMOTE = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
                     trace_flags=TraceFlags(TraceFlags.SAMPLED))  # fmt: skip
END = time.time_ns() + 10**12  # one end time for both spans, later than either start


def _tracer(**provider_args):
    exporter = InMemorySpanExporter()
    provider = TracerProvider(**provider_args)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("cadscope.celery", "1.0"), exporter


def _start(lean: bool, tracer, parent=REMOTE, attributes=None):
    ctx = trace.set_span_in_context(NonRecordingSpan(parent)) if parent is not None else context.Context()
    attributes = {"celery.task_name": "cad.job", "celery.retries": 2} if attributes is None else attributes
    if lean:
        return start_lean_span(tracer, "run/cad.job", ctx, SpanKind.CONSUMER, attributes)
    return tracer.start_span("run/cad.job", context=ctx, kind=SpanKind.CONSUMER, attributes=attributes)


def _script(span, error: BaseException) -> None:
    span.set_attribute("cad.parts", [1, 2])
    span.set_attribute("not.a.value", object())
    span.set_attributes({"cad.ok": True, "cad.volume": 1.5})
    span.add_event("stage", {"name": "fillet", "bad": {"nested": 1}}, timestamp=123)
    span.record_exception(error, {"cad.stage": "export"}, timestamp=456)
    span.set_status(StatusCode.ERROR, "export failed")
    span.set_status(Status(StatusCode.UNSET))  # ignored
    span.update_name("run/cad.job renamed")
    span.end(end_time=END)
    span.set_attribute("after.end", 1)  # ignored, with a warning
    span.end()  # ignored


def _exported(lean: bool, **provider_args):
    tracer, exporter = _tracer(**provider_args)
    try:
        raise ValueError("radius too large")
    except ValueError as exc:
        error = exc
    span = _start(lean, tracer)
    _script(span, error)
    [finished] = exporter.get_finished_spans()
    return finished


def _facts(span):
    return {
        "name": span.name,
        "kind": span.kind,
        "trace_id": span.context.trace_id,
        "flags": span.context.trace_flags,
        "parent": span.parent,
        "attributes": dict(span.attributes),
        "dropped_attributes": span.dropped_attributes,
        "events": [(e.name, dict(e.attributes), e.timestamp, e.dropped_attributes) for e in span.events],
        "status": (span.status.status_code, span.status.description),
        "end": span.end_time,
        "resource": span.resource,
        "scope": span.instrumentation_scope,
    }


@pytest.mark.parametrize(
    "limits",
    [None, SpanLimits(max_span_attributes=3), SpanLimits(max_attribute_length=4, max_event_attributes=1)],
    ids=["default-limits", "three-attributes", "short-values"],
)
def test_same_calls_same_exported_span_as_the_sdk(limits, caplog):
    args = {"span_limits": limits} if limits else {}
    with caplog.at_level(logging.WARNING):
        sdk, lean = _exported(False, **args), _exported(True, **args)
    assert _facts(lean) == _facts(sdk)
    assert lean.context.span_id != sdk.context.span_id and lean.context.is_valid
    assert lean.start_time is not None and lean.start_time <= lean.end_time
    assert "on ended span" in caplog.text


def test_ok_is_final_as_in_the_sdk():
    for lean in (False, True):
        tracer, exporter = _tracer()
        span = _start(lean, tracer)
        span.set_status(Status(StatusCode.OK))
        span.set_status(StatusCode.ERROR, "later")
        span.end()
        assert exporter.get_finished_spans()[0].status.status_code is StatusCode.OK


@pytest.mark.parametrize(
    "parent, sampler, recording",
    [
        (REMOTE, None, True),
        (SpanContext(REMOTE.trace_id, REMOTE.span_id, is_remote=True, trace_flags=TraceFlags(0)), None, False),
        (None, None, True),
        (None, ParentBased(TraceIdRatioBased(0.0)), False),
        (SpanContext(REMOTE.trace_id, REMOTE.span_id, True, TraceFlags(3)), ParentBased(ALWAYS_ON), True),
    ],
    ids=["sampled-parent", "unsampled-parent", "root", "root-ratio-0", "random-flag-parent"],
)
def test_sampling_and_trace_flags_follow_the_sdk(parent, sampler, recording):
    args = {"sampler": sampler} if sampler else {}
    tracer, exporter = _tracer(**args)
    sdk, lean = _start(False, tracer, parent), _start(True, tracer, parent)
    assert lean.is_recording() is sdk.is_recording() is recording
    assert isinstance(lean, LeanSpan) is recording
    assert lean.get_span_context().trace_flags == sdk.get_span_context().trace_flags
    if parent is not None:
        assert lean.get_span_context().trace_id == parent.trace_id
    sdk.end()
    lean.end()
    assert len(exporter.get_finished_spans()) == (2 if recording else 0)


def test_children_and_logs_see_the_task_span_as_current():
    tracer, exporter = _tracer()
    span = _start(True, tracer)
    token = context.attach(trace.set_span_in_context(span))
    try:
        with tracer.start_as_current_span("cad.stage export"):
            pass
        trace.get_current_span().set_attribute("error.type", "bad_output")
    finally:
        context.detach(token)
    span.end()
    child, task = exporter.get_finished_spans()
    assert child.parent.span_id == task.context.span_id and child.context.trace_id == REMOTE.trace_id
    assert task.attributes["error.type"] == "bad_output"


def test_plain_attributes_respect_the_count_limit_as_the_sdk_does():
    """Full: the SDK drops the oldest attribute for the newest, and counts it."""
    exported = []
    for lean in (False, True):
        tracer, exporter = _tracer(span_limits=SpanLimits(max_span_attributes=2))
        span = _start(lean, tracer)  # two attributes already
        span.set_attribute("celery.retries", 3)  # replaces one: fits
        span.set_attribute("celery.state", "SUCCESS")  # a third: over the limit
        span.end()
        [finished] = exporter.get_finished_spans()
        exported.append((dict(finished.attributes), finished.dropped_attributes))
    assert exported[1] == exported[0] == ({"celery.retries": 3, "celery.state": "SUCCESS"}, 1)


def test_a_tracer_that_is_not_the_sdks_starts_its_own_span():
    tracer = trace.NoOpTracer()
    span = _start(True, tracer)
    assert not isinstance(span, LeanSpan) and not span.is_recording()
