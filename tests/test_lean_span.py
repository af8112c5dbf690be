"""The task span (cadscope.tracing._lean) against the SDK's span: the same calls give the same exported span.

Each comparison runs three ways: the SDK's span, the lean span, and the
deferred lean span (its parent given as W3C headers, its ids and sampling
decision made when first asked for).
"""

from __future__ import annotations

import io
import logging
import threading
import time

import pytest
from opentelemetry import context, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import default_getter
from opentelemetry.sdk.trace import RandomIdGenerator, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    ParentBasedTraceIdRatio,
    StaticSampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from cadscope.tracing import JsonFormatter, pinned_span_id
from cadscope.tracing._ids import PinnableIdGenerator
from cadscope.tracing._lean import (
    LeanSpan,
    _sampled_w3c_child,
    deferring_tracer,
    drops_unsampled_remote,
    start_deferred_span,
    start_lean_span,
)
from cadscope.tracing._processor import BoundedBatchSpanProcessor

REMOTE = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
                     trace_flags=TraceFlags(TraceFlags.SAMPLED))  # fmt: skip
END = time.time_ns() + 10**12  # one end time for both spans, later than either start


def _tracer(**provider_args):
    exporter = InMemorySpanExporter()
    provider = TracerProvider(**provider_args)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("cadscope.celery", "1.0"), exporter


def _headers(parent):
    if parent is None:
        return {}
    return {"traceparent": f"00-{parent.trace_id:032x}-{parent.span_id:016x}-{parent.trace_flags:02x}"}


def _start(lean, tracer, parent=REMOTE, attributes=None):
    """``lean``: False for the SDK's span, True for the lean one, "deferred" for the deferred one,
    "deferred-plain" for the deferred one whose caller vouches for its attributes (the task span's)."""
    ctx = trace.set_span_in_context(NonRecordingSpan(parent)) if parent is not None else context.Context()
    attributes = {"celery.task_name": "cad.job", "celery.retries": 2} if attributes is None else attributes
    if lean in ("deferred", "deferred-plain"):
        plain = lean == "deferred-plain"
        span = start_deferred_span(tracer, "run/cad.job", _headers(parent), SpanKind.CONSUMER,
                                   dict(attributes) if plain else attributes, plain=plain)  # fmt: skip
        assert span.deferred
        return span
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
    [None, SpanLimits(max_span_attributes=3), SpanLimits(max_span_attributes=1),
     SpanLimits(max_attribute_length=4, max_event_attributes=1)],
    ids=["default-limits", "three-attributes", "fewer-than-given", "short-values"],
)  # fmt: skip
@pytest.mark.parametrize("lean", [True, "deferred", "deferred-plain"], ids=["lean", "deferred", "deferred-plain"])
def test_same_calls_same_exported_span_as_the_sdk(limits, lean, caplog):
    args = {"span_limits": limits} if limits else {}
    with caplog.at_level(logging.WARNING):
        sdk, ours = _exported(False, **args), _exported(lean, **args)
    assert _facts(ours) == _facts(sdk)
    assert ours.context.span_id != sdk.context.span_id and ours.context.is_valid
    assert ours.start_time is not None and ours.start_time <= ours.end_time
    assert "on ended span" in caplog.text


def test_ok_is_final_as_in_the_sdk():
    for lean in (False, True, "deferred", "deferred-plain"):
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
    sdk, lean, deferred = (_start(mode, tracer, parent) for mode in (False, True, "deferred"))
    assert deferred.is_recording()  # until resolved
    assert lean.is_recording() is sdk.is_recording() is recording
    assert isinstance(lean, LeanSpan) is recording
    for ours in (lean, deferred):
        assert ours.get_span_context().trace_flags == sdk.get_span_context().trace_flags
        if parent is not None:
            assert ours.get_span_context().trace_id == parent.trace_id
            if isinstance(ours, LeanSpan):
                assert ours.parent == parent
    assert deferred.is_recording() is recording  # resolved by get_span_context()
    for span in (sdk, lean, deferred):
        span.end()
    assert len(exporter.get_finished_spans()) == (3 if recording else 0)


@pytest.mark.parametrize("sampler", [None, ParentBased(TraceIdRatioBased(0.0))], ids=["sampled", "dropped"])
def test_a_deferred_span_resolved_at_its_end_follows_the_sampler(sampler):
    args = {"sampler": sampler} if sampler else {}
    tracer, exporter = _tracer(**args)
    span = _start("deferred", tracer, parent=None)
    span.set_attribute("celery.state", "SUCCESS")
    span.end()  # the SimpleSpanProcessor asks for the context: resolved here
    assert not span.deferred
    assert len(exporter.get_finished_spans()) == (0 if sampler else 1)


@pytest.mark.parametrize(
    "sampler, drops",
    [
        (None, True),  # the SDK's default: ParentBased(ALWAYS_ON)
        (ParentBasedTraceIdRatio(0.5), True),
        (ALWAYS_OFF, True),
        (StaticSampler(Decision.DROP), True),
        (ALWAYS_ON, False),
        (TraceIdRatioBased(1.0), False),
        (ParentBased(ALWAYS_ON, remote_parent_not_sampled=ALWAYS_ON), False),
        (ParentBased(ALWAYS_ON, remote_parent_not_sampled=StaticSampler(Decision.RECORD_ONLY)), False),
        (ParentBased(ALWAYS_ON, remote_parent_not_sampled=TraceIdRatioBased(0.0)), False),  # drops too; not said: eager
    ],
    ids=[
        "default",
        "parentbased-ratio",
        "always-off",
        "static-drop",
        "always-on",
        "ratio-1",
        "records-unsampled",
        "record-only",
        "ratio-0-delegate",
    ],
)
def test_only_samplers_that_drop_every_unsampled_remote_child_are_said_to(sampler, drops):
    """Where it says "drops", the SDK's own span for an unsampled remote parent does not record."""
    args = {"sampler": sampler} if sampler else {}
    tracer, _ = _tracer(**args)
    assert drops_unsampled_remote(tracer.sampler) is drops
    unsampled = SpanContext(REMOTE.trace_id, REMOTE.span_id, is_remote=True, trace_flags=TraceFlags(0))
    if drops:
        assert not _start(False, tracer, unsampled).is_recording()


@pytest.mark.parametrize("flags", [0, 2], ids=["unsampled", "unsampled-random-flag"])
def test_a_span_known_to_drop_records_nothing_and_resolves_as_the_sdks(flags):
    """``recording=False``: nothing is recorded or handed to the processor,
    no ids are made until asked for, and then they are what the SDK's span
    for the same parent gets (trace id, flags, trace state; a new span id)."""
    tracer, exporter = _tracer()
    parent = SpanContext(REMOTE.trace_id, REMOTE.span_id, is_remote=True, trace_flags=TraceFlags(flags),
                         trace_state=TraceState([("vendor", "x")]))  # fmt: skip
    sdk = _start(False, tracer, parent)
    headers = {**_headers(parent), "tracestate": "vendor=x"}
    span = start_deferred_span(tracer, "run/cad.job", headers, SpanKind.CONSUMER, {"a": 1}, recording=False)
    assert not span.is_recording()
    _script(span, ValueError("ignored"))
    assert span.deferred  # nothing asked: no ids made
    ours, theirs = span.get_span_context(), sdk.get_span_context()
    assert ours.is_valid and not ours.is_remote and ours.span_id != REMOTE.span_id
    for field in ("trace_id", "trace_flags", "trace_state"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert span.parent == parent
    sdk.end()
    assert exporter.get_finished_spans() == ()


def test_only_the_sdks_tracer_and_samplers_defer():
    class Custom(ParentBased):
        pass

    assert deferring_tracer(_tracer()[0]) is not None
    assert deferring_tracer(_tracer(sampler=ParentBased(TraceIdRatioBased(0.5)))[0]) is not None
    assert deferring_tracer(_tracer(sampler=Custom(ALWAYS_ON))[0]) is None
    assert deferring_tracer(trace.NoOpTracer()) is None


@pytest.mark.parametrize("lean", [True, "deferred"], ids=["lean", "deferred"])
def test_children_and_logs_see_the_task_span_as_current(lean):
    tracer, exporter = _tracer()
    span = _start(lean, tracer)
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
    for lean in (False, True, "deferred", "deferred-plain"):
        tracer, exporter = _tracer(span_limits=SpanLimits(max_span_attributes=2))
        span = _start(lean, tracer)  # two attributes already
        span.set_attribute("celery.retries", 3)  # replaces one: fits
        span.set_attribute("celery.state", "SUCCESS")  # a third: over the limit
        span.end()
        [finished] = exporter.get_finished_spans()
        exported.append((dict(finished.attributes), finished.dropped_attributes))
    assert exported[3] == exported[2] == exported[1] == exported[0]
    assert exported[0] == ({"celery.retries": 3, "celery.state": "SUCCESS"}, 1)


@pytest.mark.parametrize(
    "limits", [SpanLimits(max_span_attributes=1), SpanLimits(max_attribute_length=4)], ids=["count", "length"]
)
def test_attributes_given_at_start_are_bounded_there_as_the_sdk_does(limits):
    """Nothing set after the start: what the span was started with must already be within the limits."""
    exported = []
    for lean in (False, True, "deferred", "deferred-plain"):
        tracer, exporter = _tracer(span_limits=limits)
        _start(lean, tracer).end()
        [finished] = exporter.get_finished_spans()
        exported.append((dict(finished.attributes), finished.dropped_attributes))
    assert exported[3] == exported[2] == exported[1] == exported[0]
    assert exported[0][0] in ({"celery.retries": 2}, {"celery.task_name": "cad.", "celery.retries": 2})


def test_attributes_given_at_start_that_are_not_plain_are_kept_as_the_sdk_keeps_them():
    """A list becomes a tuple and a value of no attribute type is not kept as it is, at the start, as in the SDK."""
    exported = []
    for lean in (False, True, "deferred"):
        tracer, exporter = _tracer()
        _start(lean, tracer, attributes={"cad.parts": [1, 2], "cad.bad": object(), "cad.ok": "yes"}).end()
        [finished] = exporter.get_finished_spans()
        exported.append(dict(finished.attributes))
    assert exported[2] == exported[1] == exported[0]
    assert exported[0]["cad.parts"] == (1, 2) and exported[0]["cad.ok"] == "yes" and exported[0].get("cad.bad") is None


def test_a_tracer_that_is_not_the_sdks_starts_its_own_span():
    tracer = trace.NoOpTracer()
    span = _start(True, tracer)
    assert not isinstance(span, LeanSpan) and not span.is_recording()


def test_a_deferred_span_resolved_inside_a_pinned_id_leaves_the_pin_to_the_child():
    """The replay pins the id of the span it is about to start; if that start is
    what resolves the task span, the task span must take a fresh id."""
    tracer, exporter = _tracer(id_generator=PinnableIdGenerator())
    task = _start("deferred", tracer)
    with pinned_span_id(0x1234):
        child = tracer.start_span("cad.stage", context=trace.set_span_in_context(task))
    child.end()
    task.end()
    assert child.get_span_context().span_id == 0x1234
    assert task.get_span_context().span_id != 0x1234 and child.parent.span_id == task.get_span_context().span_id


@pytest.mark.timeout(10)
def test_a_log_line_written_while_resolving_does_not_deadlock():
    """A malformed tracestate makes the propagator log a warning while the span
    resolves; the JSON formatter then asks the current span, this one, for its
    ids. It gets none for that line, and resolving completes."""
    tracer, exporter = _tracer()
    headers = {**_headers(REMOTE), "tracestate": "a=1,b="}
    span = start_deferred_span(tracer, "run/cad.job", headers, SpanKind.CONSUMER, {})
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("test"))
    logger = logging.getLogger("opentelemetry.trace.span")
    logger.addHandler(handler)
    token = context.attach(trace.set_span_in_context(span))
    try:
        resolved = span.get_span_context()
    finally:
        context.detach(token)
        logger.removeHandler(handler)
    assert resolved.trace_id == REMOTE.trace_id and resolved.is_valid
    assert "w3c identifiers" in stream.getvalue() and "trace_id" not in stream.getvalue()


def test_the_batch_processor_resolves_deferred_spans_on_its_export_thread(monkeypatch):
    """Deferred spans are queued unresolved, resolved by the export thread, and
    the ones the sampler drops are neither exported nor counted as dropped."""
    exporter = InMemorySpanExporter()
    processor = BoundedBatchSpanProcessor(exporter, max_queue_size=3, schedule_delay_millis=60_000)
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.5)))
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("cadscope.celery")
    spans = [_start("deferred", tracer, parent=None) for _ in range(40)]
    for span in spans[:3]:
        span.end()
    assert all(span.deferred for span in spans[:3])  # queued as they are
    assert processor.force_flush(5000)
    resolved_by = set()
    original = LeanSpan._resolve

    def spy(self):
        resolved_by.add(threading.current_thread().name)
        return original(self)

    monkeypatch.setattr(LeanSpan, "_resolve", spy)
    for span in spans[3:]:
        span.end()  # the queue holds 3: most of these are over its bound
    processor.force_flush(5000)
    assert not any(span.deferred for span in spans[:3])
    exported = {s.context.span_id for s in exporter.get_finished_spans()}
    sampled = {s.context.span_id for s in spans if s.context.trace_flags.sampled}
    assert exported <= sampled and 0 < len(sampled) < len(spans)
    # over the bound: only the sampled ones count as dropped (resolved on the caller's thread to know)
    assert processor.dropped["queue_full"] == len(sampled - exported)
    assert "cadscope-span-export" in resolved_by
    provider.shutdown()


class _OwnTraceContext(TraceContextTextMapPropagator):
    """Reads the same headers as the W3C propagator, and keeps no trace state."""

    def extract(self, carrier, context=None, getter=default_getter):
        extracted = super().extract(carrier, context, getter)
        parent = trace.get_current_span(extracted).get_span_context()
        if not parent.is_valid:
            return extracted
        plain = SpanContext(parent.trace_id, parent.span_id, True, parent.trace_flags)
        return trace.set_span_in_context(NonRecordingSpan(plain), context)


_TP = "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"


class _SameIds(RandomIdGenerator):
    """Every new trace gets the same id: a sampler that decides on the trace id decides the same for
    the SDK's span and ours."""

    def generate_trace_id(self):
        return 0x5B8EFFF798038103D269B633813FC60C


@pytest.fixture(params=["compiled", "python"])
def w3c_reading(request, monkeypatch):
    """Each test of reading a sampled traceparent twice: compiled (``_wirec.sampled_w3c_child``), where it
    was built, and in Python."""
    from cadscope.tracing import _lean

    if request.param == "compiled" and _lean._W3C_CHILD is None:
        pytest.skip("cadscope.tracing._wirec was not built here (CI requires it: test_the_compiled_modules_are_built)")
    if request.param == "python":
        monkeypatch.setattr(_lean, "_W3C_CHILD", None)
    return request.param


@pytest.fixture
def textmap():
    """Set the global propagator for one test; the one before it is put back."""
    before = propagate.get_global_textmap()
    yield propagate.set_global_textmap
    propagate.set_global_textmap(before)


@pytest.mark.parametrize(
    "headers, read_directly",
    [
        ({"traceparent": f"00-{_TP}-01"}, True),
        ({"traceparent": f"00-{_TP}-03"}, True),  # the random-trace-id flag too
        ({"traceparent": f"cc-{_TP}-01"}, True),  # a later version, at version 00's length
        ({"traceparent": f"00-{_TP}-01", "tracestate": "vendor=x,other=y"}, True),
        ({"traceparent": f"00-{_TP}-01", "tracestate": "a=1,b="}, True),  # malformed: the propagator drops it
        ({"traceparent": f"00-{_TP}-01", "tracestate": ""}, True),
        ({"traceparent": f"00-{_TP.upper()}-01"}, False),  # refused by the propagator: a new trace
        ({"traceparent": f"00-{'0' * 32}-b7ad6b7169203331-01"}, False),
        ({"traceparent": f"00-0af7651916cd43dd8448eb211c80319c-{'0' * 16}-01"}, False),
        ({"traceparent": f"ff-{_TP}-01"}, False),
        ({"traceparent": f"00-{_TP}-00"}, False),  # unsampled
        ({"traceparent": f" 00-{_TP}-1"}, False),  # not version 00's form
        ({}, False),
    ],
    ids=[
        "sampled",
        "random-flag",
        "version-cc",
        "tracestate",
        "bad-tracestate",
        "empty-tracestate",
        "upper-case",
        "zero-trace-id",
        "zero-span-id",
        "version-ff",
        "unsampled",
        "odd-form",
        "none",
    ],  # fmt: skip
)
@pytest.mark.parametrize(
    "propagator, sampler, direct",
    [
        (None, None, True),  # the defaults: tracecontext,baggage and parentbased_always_on
        (TraceContextTextMapPropagator(), ALWAYS_ON, True),
        (None, ParentBasedTraceIdRatio(0.5), True),  # a sampled remote parent: always sampled
        (None, ParentBased(TraceIdRatioBased(0.5), remote_parent_sampled=ALWAYS_OFF), False),
        (None, TraceIdRatioBased(1.0), False),
        (_OwnTraceContext(), None, False),  # the same headers, read another way
        (CompositePropagator([W3CBaggagePropagator(), _OwnTraceContext()]), None, False),
        (CompositePropagator([TraceContextTextMapPropagator(), _OwnTraceContext()]), None, False),  # the last wins
    ],
    ids=[
        "defaults",
        "tracecontext-always-on",
        "parentbased-ratio",
        "remote-sampled-dropped",
        "ratio-1",
        "own-propagator",
        "own-composite",
        "w3c-then-own",
    ],  # fmt: skip
)
def test_a_deferred_span_read_off_its_traceparent_resolves_as_the_sdks(
    headers, read_directly, propagator, sampler, direct, textmap, w3c_reading
):
    """The deferred task span reads a sampled ``traceparent`` itself, skipping the propagator and the
    sampler, only where they would decide the same; wherever it does or not, it gets what the SDK's
    span started from the propagator's context gets: trace id, flags, trace state, parent, recording."""
    if propagator is not None:
        textmap(propagator)
    tracer, exporter = _tracer(id_generator=_SameIds(), **({"sampler": sampler} if sampler else {}))
    assert (_sampled_w3c_child(tracer, headers) is not None) is (read_directly and direct)
    extracted = propagate.extract(headers)
    sdk = tracer.start_span("run/cad.job", context=extracted, kind=SpanKind.CONSUMER)
    span = start_deferred_span(tracer, "run/cad.job", headers, SpanKind.CONSUMER, {})
    ours, theirs = span.get_span_context(), sdk.get_span_context()
    recording = sdk.is_recording()
    assert span.is_recording() is recording
    assert ours.is_valid and not ours.is_remote and ours.span_id != theirs.span_id
    assert (ours.trace_id, ours.trace_flags, ours.trace_state) == (theirs.trace_id, theirs.trace_flags,
                                                                   theirs.trace_state)  # fmt: skip
    parent = trace.get_current_span(extracted).get_span_context()
    assert span.parent == (parent if parent.is_valid else None)
    if span.parent is not None:
        assert span.parent.trace_state == parent.trace_state and span.parent.is_remote
    span.end()
    sdk.end()
    assert len(exporter.get_finished_spans()) == (2 if recording else 0)


class _CountedIds(RandomIdGenerator):
    """Span ids 1, 2, 3, ...: the same sequence for two tracers."""

    def __init__(self) -> None:
        self.last = 0

    def generate_span_id(self) -> int:
        self.last += 1
        return self.last


def test_the_compiled_traceparent_reading_is_the_pythons():
    """``_wirec.sampled_w3c_child`` against the Python path over well-formed and hostile ``traceparent``
    and ``tracestate`` headers: the same child and parent contexts field for field (ids, flags, trace
    state, remoteness, validity, type), or None for both, and the same count of span ids taken."""
    from cadscope.tracing import _lean

    compiled = _lean._W3C_CHILD
    if compiled is None:
        pytest.skip("cadscope.tracing._wirec was not built here (CI requires it: test_the_compiled_modules_are_built)")
    tp = "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"
    traceparents = [
        f"00-{tp}-01", f"00-{tp}-03", f"00-{tp}-ff", f"cc-{tp}-01", f"fe-{tp}-05", f"00-{tp}-00", f"00-{tp}-02",
        f"ff-{tp}-01", f"00-{tp.upper()}-01", f"00-{'0' * 32}-b7ad6b7169203331-01",
        f"00-0af7651916cd43dd8448eb211c80319c-{'0' * 16}-01", f"00-{'f' * 32}-{'f' * 16}-01",
        f"00-{tp}-0g", f"0g-{tp}-01", f"00_{tp}-01", f"00-{tp}_01", f"00-{tp[:32]}_{tp[33:]}-01",
        f"00-{tp[:-1]}é-01", f"00-{tp[:-1]}\u0663-01", f"00-{tp[:-1]}\U0001f600-01", f"00-{tp}-01 ",
        f" 00-{tp}-1", f"00-{tp}-1", "", "x" * 55, "\x00" * 55,
    ]  # fmt: skip
    states = [None, "vendor=x,other=y", "a=1,b=", "", "k=" + "v" * 300]
    tracers = {}
    for way in ("compiled", "python"):
        tracers[way], _ = _tracer(id_generator=_CountedIds())
    read = 0
    for traceparent in traceparents:
        for state in states:
            carrier = {"traceparent": traceparent, **({"tracestate": state} if state is not None else {})}
            got = {}
            for way in ("compiled", "python"):
                _lean._W3C_CHILD = compiled if way == "compiled" else None
                try:
                    got[way] = _sampled_w3c_child(tracers[way], carrier)
                finally:
                    _lean._W3C_CHILD = compiled
            if got["python"] is None:
                assert got["compiled"] is None, carrier
                continue
            read += 1
            for ours, theirs in zip(got["compiled"], got["python"], strict=True):
                assert type(ours) is type(theirs) is SpanContext
                assert tuple(ours) == tuple(theirs), carrier
                assert [type(field) for field in ours] == [type(field) for field in theirs]
                assert ours.trace_state == theirs.trace_state and ours.is_valid is theirs.is_valid
    assert read == 6 * len(states)  # the six sampled, well-formed headers, with each trace state
    assert tracers["compiled"].id_generator.last == tracers["python"].id_generator.last == read
