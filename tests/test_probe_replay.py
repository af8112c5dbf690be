"""The child probe and the worker-side replay, including hostile input."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import StatusCode

from cadscope.freecad_bridge._replay import Replayer
from cadscope.tracing.testing import in_memory_provider

from .conftest import Recorder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cadscope" / "freecad_bridge" / "child"))
import cadscope_probe  # noqa: E402


def _probe_events(traceparent: str) -> list[dict]:
    read_fd, write_fd = os.pipe()
    probe = cadscope_probe.Probe(write_fd, traceparent)
    with probe.span("cad.stage generate", {"cad.stage": "generate"}):
        with probe.span("occt.boolean", {"cad.boolean.operation": "cut"}) as span:
            span["cad.solids_count"] = 3
        try:
            with probe.span("occt.feature", {"cad.feature": "fillet"}):
                raise ValueError("radius too large")
        except ValueError:
            pass
    probe.metric("occt.memory", 123, operation="fillet")
    probe.result({"artifacts": []})
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 65536):
        data += chunk
    os.close(read_fd)
    return [json.loads(line) for line in data.splitlines()]


def test_probe_rejects_invalid_traceparents():
    for bad in [
        "",
        "ff-" + "a" * 32 + "-" + "b" * 16 + "-01",
        "00-" + "0" * 32 + "-" + "b" * 16 + "-01",
        "00-" + "A" * 32 + "-" + "b" * 16 + "-01",
        "00-abc-def-01",
    ]:
        assert cadscope_probe._parse_traceparent(bad) is None, bad
    assert cadscope_probe._parse_traceparent("00-" + "a" * 32 + "-" + "b" * 16 + "-01") == ("a" * 32, "b" * 16)


class ApiOnlyTracer(trace.Tracer):
    """A tracer that is not the SDK's: the replay must fall back to start_span()."""

    def __init__(self, inner: trace.Tracer) -> None:
        self._inner = inner

    def start_span(self, *args, **kwargs):
        return self._inner.start_span(*args, **kwargs)

    def start_as_current_span(self, *args, **kwargs):
        return self._inner.start_as_current_span(*args, **kwargs)


@pytest.mark.parametrize("path", ["sdk_processor", "api_start_span"])
def test_probe_events_replay_as_spans_with_the_childs_ids(path):
    provider, exporter = in_memory_provider()
    tracer = provider.get_tracer("t", "1.2")
    recorder = Recorder()
    with tracer.start_as_current_span("cad.subprocess") as parent:
        ctx = parent.get_span_context()
        events = _probe_events(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01")
        replayer = Replayer(tracer if path == "sdk_processor" else ApiOnlyTracer(tracer), parent, recorder)
        for event in events:
            replayer.handle(event)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    starts = {e["n"]: e for e in events if e["t"] == "start"}
    for name in ("cad.stage generate", "occt.boolean", "occt.feature"):
        assert format(spans[name].context.span_id, "016x") == starts[name]["id"]
        assert spans[name].context.trace_id == ctx.trace_id
        assert spans[name].start_time == starts[name]["ts"]
    assert spans["cad.stage generate"].parent.span_id == ctx.span_id
    assert spans["occt.boolean"].parent.span_id == spans["cad.stage generate"].context.span_id
    assert spans["occt.boolean"].attributes["cad.solids_count"] == 3
    assert spans["occt.feature"].status.status_code is StatusCode.ERROR
    assert spans["occt.feature"].attributes["error.type"] == "ValueError"
    assert spans["occt.feature"].end_time >= spans["occt.feature"].start_time
    for span in spans.values():
        assert span.resource is provider.resource
        assert (span.instrumentation_scope.name, span.instrumentation_scope.version) == ("t", "1.2")
        assert span.context.trace_flags.sampled
    assert recorder.metrics == [("occt.memory", 123.0, {"operation": "fillet"})]
    assert replayer.manifest == {"artifacts": []}
    assert not replayer.dropped


def test_spans_left_open_are_closed_with_error():
    provider, exporter = in_memory_provider()
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("cad.subprocess") as parent:
        replayer = Replayer(tracer, parent, Recorder())
        now = time.time_ns()
        replayer.handle({"t": "start", "id": "a" * 16, "p": None, "n": "cad.stage generate", "ts": now, "a": {}})
        replayer.handle({"t": "start", "id": "b" * 16, "p": "a" * 16, "n": "occt.boolean", "ts": now + 1, "a": {}})
        assert replayer.close_open("crash") == 2
    spans = {s.name: s for s in exporter.get_finished_spans()}
    for name in ("cad.stage generate", "occt.boolean"):
        assert spans[name].status.status_code is StatusCode.ERROR
        assert spans[name].attributes["error.type"] == "crash"


def test_hostile_events_are_dropped_and_counted_never_raised():
    provider, exporter = in_memory_provider()
    tracer = provider.get_tracer("t")
    recorder = Recorder()
    now = time.time_ns()
    hostile = [
        [],
        "x",
        {"t": "nope"},
        {"t": "start", "id": "zz", "n": "a", "ts": now, "a": {}},
        {"t": "start", "id": "0" * 16, "n": "a", "ts": now, "a": {}},
        {"t": "start", "id": "c" * 16, "n": "Bad Name!", "ts": now, "a": {}},
        {"t": "start", "id": "d" * 16, "n": "ok.name", "ts": "yesterday", "a": {}},
        {"t": "start", "id": "e" * 16, "n": "ok.name", "ts": 1, "a": {}},
        {"t": "end", "id": "f" * 16, "ts": now},
        {"t": "metric", "n": "occt.memory", "v": float("nan"), "a": {}},
        {"t": "metric", "n": "occt.memory", "v": -1, "a": {}},
        {"t": "metric", "n": "occt.memory", "v": 1, "a": ["not", "a", "dict"]},
        {"t": "result", "a": "not a manifest"},
    ]
    with tracer.start_as_current_span("cad.subprocess") as parent:
        replayer = Replayer(tracer, parent, recorder)
        for event in hostile:
            replayer.handle(event)
        # Garbage parent ids hang off the subprocess span; attributes are bounded.
        replayer.handle(
            {
                "t": "start",
                "id": "1" * 16,
                "p": "not-a-parent",
                "n": "occt.boolean",
                "ts": now,
                "a": {"cad.x": "y" * 10_000, "Bad Key": 1, "cad.nested": {"a": 1}},
            }
        )
        replayer.handle({"t": "start", "id": "1" * 16, "n": "occt.boolean", "ts": now, "a": {}})
        replayer.handle({"t": "end", "id": "1" * 16, "ts": now + 5, "a": {}})
        # A parent id that is not even hashable hangs off the subprocess span too.
        replayer.handle({"t": "start", "id": "2" * 16, "p": ["x"], "n": "occt.feature", "ts": now, "a": {}})
        replayer.handle({"t": "end", "id": "2" * 16, "ts": now + 5, "a": {}})
    assert sum(replayer.dropped.values()) == len(hostile) + 1
    assert replayer.dropped["duplicate_span_id"] == 1
    assert replayer.manifest is None and recorder.metrics == []
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["occt.boolean"].parent.span_id == parent.get_span_context().span_id
    assert spans["occt.feature"].parent.span_id == parent.get_span_context().span_id
    assert dict(spans["occt.boolean"].attributes) == {"cad.x": "y" * 256}


def test_artifacts_are_verified_against_the_manifest(tmp_path):
    import hashlib

    from cadscope.freecad_bridge._engines import _verify_artifacts

    (tmp_path / "part.step").write_bytes(b"ISO-10303-21;")
    good = {"name": "part.step", "format": "step", "size": 13, "sha256": hashlib.sha256(b"ISO-10303-21;").hexdigest()}
    verified, problem = _verify_artifacts({"artifacts": [good]}, tmp_path)
    assert problem is None and verified[0]["size"] == 13
    for bad, expected in [
        ({**good, "sha256": "0" * 64}, "does not match"),
        ({**good, "size": 14}, "does not match"),
        ({**good, "name": "missing.step"}, "missing"),
        ({**good, "name": "../part.step"}, "unsafe"),
        ({**good, "name": ".cadscope"}, "unsafe"),
    ]:
        assert expected in _verify_artifacts({"artifacts": [bad]}, tmp_path)[1]
    assert _verify_artifacts({"artifacts": []}, tmp_path)[1] == "manifest lists no artifacts"


def test_replayed_spans_follow_their_parents_sampling_decision():
    exporter = InMemorySpanExporter()
    # What parentbased_traceidratio decides for most traces at a low ratio.
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("cad.subprocess") as parent:
        assert not parent.is_recording()
        recorder = Recorder()
        replayer = Replayer(tracer, parent, recorder)
        ctx = parent.get_span_context()
        for event in _probe_events(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-00"):
            replayer.handle(event)
    assert exporter.get_finished_spans() == ()
    # Metrics do not depend on sampling.
    assert [name for name, *_ in recorder.spans] == ["occt.boolean", "occt.feature", "cad.stage generate"]
