"""Env carrier, pinned ids, OTLP/JSON encoding, JSON logs, joining the user's set-up, Celery task spans."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor

from cadscope.tracing import (
    EnvGetter,
    JsonFormatter,
    extract_from_env,
    inject_into_env,
    job_id_var,
    normalise_key,
    pinned_ids,
    pinned_span_id,
    spans_to_otlp_json,
)
from cadscope.tracing.testing import in_memory_provider


def test_normalise_key_follows_env_carrier_spec():
    assert normalise_key("traceparent") == "TRACEPARENT"
    assert normalise_key("x-b3.sampled") == "X_B3_SAMPLED"


def test_inject_writes_upper_case_keys_into_a_copy_only():
    provider, _ = in_memory_provider()
    before = dict(os.environ)
    with provider.get_tracer("t").start_as_current_span("parent") as span:
        env = inject_into_env({"PATH": "/usr/bin", "TRACEPARENT": "00-stale"})
        context = span.get_span_context()
    # Flags: sampled, and (W3C level 2, SDK >= 1.4x) maybe the "random" bit.
    assert env["TRACEPARENT"][:-3] == f"00-{context.trace_id:032x}-{context.span_id:016x}"
    assert int(env["TRACEPARENT"][-2:], 16) & 0x01
    assert "traceparent" not in env and env["PATH"] == "/usr/bin"
    assert dict(os.environ) == before
    with pytest.raises(ValueError):
        inject_into_env(os.environ)


def test_extract_round_trips_through_the_environment_carrier():
    provider, _ = in_memory_provider()
    with provider.get_tracer("t").start_as_current_span("parent") as span:
        env = inject_into_env({})
    extracted = trace.get_current_span(extract_from_env(env)).get_span_context()
    assert extracted.trace_id == span.get_span_context().trace_id
    assert extracted.span_id == span.get_span_context().span_id
    assert EnvGetter().get({"TRACEPARENT": "x"}, "traceparent") == ["x"]


def test_pinned_span_id_is_used_once():
    provider, exporter = in_memory_provider()
    tracer = provider.get_tracer("t")
    with pinned_span_id(0x1234):
        tracer.start_span("pinned").end()
    tracer.start_span("random").end()
    pinned, random_ = exporter.get_finished_spans()
    assert pinned.context.span_id == 0x1234
    assert random_.context.span_id != 0x1234


def test_otlp_json_uses_hex_ids_and_integer_enums():
    provider, exporter = in_memory_provider()
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("parent", kind=trace.SpanKind.SERVER):
        with tracer.start_as_current_span("child", attributes={"cad.solids_count": 3}):
            pass
    message = spans_to_otlp_json(exporter.get_finished_spans())
    spans = message["resourceSpans"][0]["scopeSpans"][0]["spans"]
    by_name = {s["name"]: s for s in spans}
    assert len(by_name["child"]["traceId"]) == 32 and int(by_name["child"]["traceId"], 16)
    assert by_name["child"]["parentSpanId"] == by_name["parent"]["spanId"]
    assert by_name["parent"]["kind"] == 2  # SPAN_KIND_SERVER as an integer


def test_json_log_lines_carry_trace_and_job_and_survive_crlf():
    provider, _ = in_memory_provider()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("test"))
    logger = logging.getLogger("cadscope.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    token = job_id_var.set("job-1")
    try:
        with provider.get_tracer("t").start_as_current_span("s") as span:
            logger.warning('part name\r\n{"forged": true}', extra={"part": "a\nb"})
    finally:
        job_id_var.reset(token)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["job_id"] == "job-1"
    assert record["trace_id"] == f"{span.get_span_context().trace_id:032x}"
    assert record["message"].startswith("part name\r\n")
    assert record["part"] == "a\nb"


def test_pinned_ids_give_a_root_span_its_trace_id_too():
    provider, exporter = in_memory_provider()
    with pinned_ids(0xABC, 0x1234):
        provider.get_tracer("t").start_span("root").end()
    [span] = exporter.get_finished_spans()
    assert (span.context.trace_id, span.context.span_id, span.parent) == (0xABC, 0x1234, None)


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter: the API's global provider can be set once a process."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True, timeout=60
    )


def test_an_installed_provider_is_kept_and_joined_never_replaced():
    """A user's own SDK provider, installed before cadscope starts, stays the global one; cadscope
    adds its processors to it (its file exporter here) and leaves the user's processors and
    resource in place; a second setup changes nothing."""
    done = _python(
        """
        import json, tempfile, os
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider, SpanProcessor
        from cadscope.tracing import setup_tracing, shutdown_tracing
        seen = []
        class Recording(SpanProcessor):
            def on_start(self, span, parent_context=None): seen.append(("start", span.name))
            def on_end(self, span): seen.append(("end", span.name))
        mine = TracerProvider(resource=Resource.create({"service.name": "users-app", "team": "cad"}))
        mine.add_span_processor(Recording())
        trace.set_tracer_provider(mine)
        path = os.path.join(tempfile.mkdtemp(), "spans.jsonl")
        joined = setup_tracing("cadscope-worker", traces_file=path)
        again = setup_tracing("cadscope-worker")
        with trace.get_tracer("x").start_as_current_span("job"):
            pass
        shutdown_tracing(5000)
        line = json.loads(open(path).read().splitlines()[0])
        attrs = {a["key"]: a["value"]["stringValue"] for a in line["resourceSpans"][0]["resource"]["attributes"]}
        print(json.dumps({"same": joined is mine and again is mine and trace.get_tracer_provider() is mine,
                          "seen": seen, "resource": attrs}))
        """
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["same"] is True
    assert out["seen"] == [["start", "job"], ["end", "job"]]
    assert out["resource"]["service.name"] == "users-app" and out["resource"]["team"] == "cad"


def test_otel_traces_exporter_console_prints_and_none_exports_nothing():
    code = """
        from opentelemetry import trace
        from cadscope.tracing import setup_tracing, shutdown_tracing
        provider = setup_tracing("svc")
        with trace.get_tracer("t").start_as_current_span("the-job-span"):
            pass
        shutdown_tracing(5000)
        print("provider", type(provider).__name__, provider.resource.attributes["service.name"])
        """
    console = _python(code, {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "from-env"})
    assert console.returncode == 0, console.stderr
    assert '"name": "the-job-span"' in console.stdout
    assert "provider TracerProvider from-env" in console.stdout  # OTEL_SERVICE_NAME wins over the default
    both = _python(code, {"OTEL_TRACES_EXPORTER": "console,none"})
    assert both.returncode == 0 and "the-job-span" not in both.stdout
    unknown = _python(code, {"OTEL_TRACES_EXPORTER": "nosuch"})
    assert unknown.returncode != 0 and "no span exporter named 'nosuch'" in unknown.stderr


def test_otel_sdk_disabled_makes_nothing_and_breaks_nothing():
    done = _python(
        """
        from opentelemetry import trace
        from cadscope.tracing import inject_into_env, setup_tracing, shutdown_tracing, flush_tracing
        assert setup_tracing("svc") is None
        with trace.get_tracer("t").start_as_current_span("s") as span:
            assert not span.is_recording()
            assert inject_into_env({}) == {}
        assert flush_tracing(100) is True
        shutdown_tracing(100)
        print("ok", type(trace.get_tracer_provider()).__name__)
        """,
        {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "ProxyTracerProvider"]


class _Recording(SpanProcessor):
    def __init__(self) -> None:
        self.started: list[str] = []
        self.ended: list[str] = []

    def on_start(self, span, parent_context=None):  # type: ignore[no-untyped-def]
        self.started.append(span.name)

    def on_end(self, span):  # type: ignore[no-untyped-def]
        self.ended.append(span.name)


@pytest.fixture
def celery_run():
    """Celery's own task tracer (``build_tracer``: what a pool process runs for each message,
    headers flattened into the request), with Celery instrumented by cadscope."""
    from celery import Celery
    from celery.app.trace import build_tracer
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    from cadscope.tracing import instrument_celery, uninstrument_celery

    provider, exporter = in_memory_provider()
    recording = _Recording()
    provider.add_span_processor(recording)
    app = Celery("consumer-tracing", set_as_current=False)
    seen: dict[str, object] = {}

    @app.task(name="t.ok", shared=False)
    def ok():
        seen["current"] = trace.get_current_span().get_span_context()
        seen["env"] = inject_into_env({})
        return 1

    @app.task(name="t.boom", shared=False)
    def boom():
        raise ValueError("no such part")

    def run(task, headers=None, task_id="job-1"):  # type: ignore[no-untyped-def]
        request = {"id": task_id, "task": task.name, "retries": 0, "hostname": "w@h",
                   "delivery_info": {"routing_key": "cadscope", "exchange": ""}, **(headers or {})}  # fmt: skip
        build_tracer(task.name, task, app=app, eager=False, propagate=False)(task_id, (), {}, request)

    already = CeleryInstrumentor().is_instrumented_by_opentelemetry
    if already:  # the test session's producer instrumented it: start from a clean state
        CeleryInstrumentor().uninstrument()
    assert instrument_celery(provider) is True
    try:
        yield run, {"ok": ok, "boom": boom}, exporter, recording, seen
    finally:
        uninstrument_celery()
        if already:
            CeleryInstrumentor().instrument()


PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_the_task_span_is_upstreams_child_of_the_publisher_and_seen_by_every_processor(celery_run):
    run, tasks, exporter, recording, seen = celery_run
    run(tasks["ok"], {"traceparent": PARENT})
    [span] = exporter.get_finished_spans()
    assert span.name == "run/t.ok" and span.kind is trace.SpanKind.CONSUMER
    assert span.instrumentation_scope.name == "opentelemetry.instrumentation.celery"
    assert f"{span.context.trace_id:032x}" == PARENT[3:35]
    assert f"{span.parent.span_id:016x}" == PARENT[36:52]  # a parent, not a link
    assert span.attributes["celery.action"] == "run" and span.attributes["celery.state"] == "SUCCESS"
    assert seen["current"].span_id == span.context.span_id  # the body runs inside the span
    assert seen["env"]["TRACEPARENT"][3:52] == f"{span.context.trace_id:032x}-{span.context.span_id:016x}"
    assert recording.started == recording.ended == ["run/t.ok"]  # on_start too, unlike a private span type


def test_a_failing_task_fails_its_span(celery_run):
    run, tasks, exporter, _recording, _seen = celery_run
    run(tasks["boom"])
    [span] = exporter.get_finished_spans()
    assert span.status.status_code is trace.StatusCode.ERROR
    assert [event.name for event in span.events] == ["exception"]


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": "00-00000000000000000000000000000000-b7ad6b7169203331-01"},
        {"traceparent": "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        {"traceparent": "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01"},
        {"traceparent": 7, "tracestate": {"a": 1}, "baggage": ["x"]},
        {"traceparent": "0" * 100_000, "tracestate": ",".join(f"k{i}=v" for i in range(500))},
    ],
    ids=["zero-trace-id", "version-ff", "upper-case", "non-strings", "huge"],
)
def test_hostile_headers_start_a_new_trace_and_never_raise(celery_run, headers):
    run, tasks, exporter, _recording, seen = celery_run
    run(tasks["ok"], headers)
    [span] = exporter.get_finished_spans()
    assert span.parent is None and span.context.is_valid
    assert span.attributes["celery.state"] == "SUCCESS"


def test_instrumenting_where_something_already_did_adds_no_second_span():
    """A worker run under ``opentelemetry-instrument`` has Celery instrumented before cadscope
    starts: cadscope leaves it, and uninstrumenting leaves it too."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    from cadscope.tracing import instrument_celery, uninstrument_celery

    upstream = CeleryInstrumentor()
    was = upstream.is_instrumented_by_opentelemetry
    if not was:
        upstream.instrument()
    try:
        assert instrument_celery() is False
        uninstrument_celery()
        assert upstream.is_instrumented_by_opentelemetry
    finally:
        if not was:
            upstream.uninstrument()
