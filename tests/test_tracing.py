"""Env carrier, pinned ids, OTLP/JSON encoding, setup idempotence, JSON logs."""

from __future__ import annotations

import functools
import io
import json
import logging
import os

import pytest
from opentelemetry import baggage, context, trace
from opentelemetry.context import Context

from cadscope.tracing import (
    EnvGetter,
    JsonFormatter,
    extract_from_env,
    inject_into_env,
    job_id_var,
    normalise_key,
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


def test_setup_tracing_is_idempotent(monkeypatch):
    from cadscope.tracing import _setup

    monkeypatch.setattr(_setup, "_state", {"pid": None, "provider": None})
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    first = _setup.setup_tracing("svc", set_global=False)
    second = _setup.setup_tracing("svc", set_global=False)
    assert first is second
    assert first.resource.attributes["service.name"] == "svc"
    first.shutdown()


class _Stop(BaseException):
    """Leaves a task run the way SystemExit would: past every hook."""


@pytest.fixture(params=["signals", "hooks"])
def consumer_tracing(request):
    """Celery's own task tracer (``build_tracer``, what a pool child runs for each
    message, headers flattened into the request) with our consumer tracing:
    through Celery's task signals (an app of plain tasks), or through
    TracedTask's hooks (an app whose every task is one, as cadscope's is)."""
    from celery import Celery
    from celery.app.trace import build_tracer
    from celery.exceptions import Ignore, Reject, Retry
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    from cadscope.tracing import TracedTask, instrument_celery_worker, uninstrument_celery_worker

    provider, exporter = in_memory_provider()
    hooks = request.param == "hooks"
    app = Celery("consumer-tracing", set_as_current=False, **({"task_cls": TracedTask} if hooks else {}))
    seen = {}
    task = functools.partial(app.task, shared=False)  # this app's, not every later one's too

    @task(name="t.ok", bind=True)
    def ok(self):
        seen["current"] = trace.get_current_span().get_span_context()
        return 1

    @task(name="t.peek")
    def peek():
        current = trace.get_current_span()
        seen["deferred"] = getattr(current, "deferred", None)  # before anything asks for its ids
        seen["baggage"] = baggage.get_all()
        seen["context"] = current.get_span_context()
        seen["env"] = inject_into_env({})  # what a CAD child would be started with

    @task(name="t.values")
    def values():
        seen["values"] = dict(context.get_current())
        seen["span"] = trace.get_current_span()

    @task(name="t.boom")
    def boom():
        raise ValueError("no such part")

    @task(name="t.expected", throws=(KeyError,))
    def expected():
        raise KeyError("known")

    @task(name="t.retry")
    def retry():
        raise Retry("backing off", exc=ValueError("busy"))

    @task(name="t.ignore")
    def ignore():
        raise Ignore()

    @task(name="t.reject")
    def reject():
        raise Reject("malformed", requeue=False)

    @task(name="t.stop")
    def stop():
        raise _Stop()

    @task(name="t.nested")
    def nested():
        seen["outer"] = trace.get_current_span().get_span_context()
        ok.apply(task_id="job-inner")  # eager, in this run's thread
        seen["after_inner"] = trace.get_current_span().get_span_context()

    def run(task, headers=None, task_id="job-1"):
        request = {"id": task_id, "task": task.name, "retries": 0, "hostname": "w@h",
                   "delivery_info": {"routing_key": "cadscope", "exchange": ""}, **(headers or {})}  # fmt: skip
        build_tracer(task.name, task, app=app, eager=False, propagate=False)(task_id, (), {}, request)

    tasks = {"ok": ok, "values": values, "boom": boom, "expected": expected, "peek": peek, "retry": retry,
             "ignore": ignore, "reject": reject, "stop": stop, "nested": nested}  # fmt: skip

    # The hard case: opentelemetry-instrumentation-celery instrumented in the same
    # process too (auto-instrumentation; the test session's producer). Its consumer
    # handlers must give way, or every run would get two spans and a leaked context.
    upstream = CeleryInstrumentor()
    ours_to_undo = not upstream.is_instrumented_by_opentelemetry
    if ours_to_undo:
        upstream.instrument(tracer_provider=provider)
    instrument_celery_worker(provider, app=app)
    try:
        yield run, tasks, exporter, seen
    finally:
        uninstrument_celery_worker()
        if ours_to_undo:
            upstream.uninstrument()


def test_consumer_span_continues_the_publishers_trace(consumer_tracing):
    run, tasks, exporter, seen = consumer_tracing
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    before = trace.get_current_span()
    run(tasks["ok"], {"traceparent": parent})
    [span] = exporter.get_finished_spans()
    assert span.name == "run/t.ok" and span.kind is trace.SpanKind.CONSUMER
    assert f"{span.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert f"{span.parent.span_id:016x}" == "b7ad6b7169203331"  # a parent, not a link
    assert dict(span.attributes) == {
        "celery.action": "run",
        "celery.task_name": "t.ok",
        "messaging.message.id": "job-1",
        "messaging.destination": "cadscope",
        "celery.state": "SUCCESS",
    }
    assert seen["current"].span_id == span.context.span_id  # the task body runs inside the span
    assert trace.get_current_span() is before  # and the context is restored after it


@pytest.mark.parametrize("direct", [True, False], ids=["variable set directly", "through the API"])
def test_task_context_is_the_apis_whether_set_directly_or_not(consumer_tracing, monkeypatch, direct):
    """The task's span is made current by setting OpenTelemetry's context variable directly where
    the runtime context is the default one, else through ``context.attach``: either way the task
    runs in the context the API would give (what was current, plus its span), and what was
    current before is current again after it, the same object."""
    from opentelemetry.trace.propagation import _SPAN_KEY

    from cadscope.tracing import _celery

    run, tasks, exporter, seen = consumer_tracing
    assert _celery._installed is not None and _celery._installed._current is not None  # the default runtime
    if not direct:
        monkeypatch.setattr(_celery._installed, "_current", None)
    key = context.create_key("outer")
    token = context.attach(context.set_value(key, "kept"))
    try:
        before = context.get_current()
        run(tasks["values"], {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
        assert context.get_current() is before
    finally:
        context.detach(token)
    [span] = exporter.get_finished_spans()
    assert seen["values"] == {key: "kept", _SPAN_KEY: seen["span"]}
    assert seen["span"].get_span_context() == span.context


def test_task_context_goes_through_the_api_under_another_runtime_context(monkeypatch):
    """With a runtime context other than the API's default (``OTEL_PYTHON_CONTEXT``), or one
    that sets spans otherwise, the task tracing calls the API rather than a variable it does
    not use."""
    from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

    from cadscope.tracing._celery import _current_context_variable

    variable, key = _current_context_variable()
    assert variable is context._RUNTIME_CONTEXT._current_context and key.startswith("current-span")

    class Elsewhere(ContextVarsRuntimeContext):
        pass

    monkeypatch.setattr(context, "_RUNTIME_CONTEXT", Elsewhere())
    assert _current_context_variable() is None
    monkeypatch.setattr(context, "_RUNTIME_CONTEXT", ContextVarsRuntimeContext())
    assert _current_context_variable() is not None  # a new default: its own variable
    # An API that keeps the span under another key than the one read: the API's calls.
    monkeypatch.setattr(trace, "set_span_in_context", lambda span, context=None: Context({"elsewhere": span}))
    assert _current_context_variable() is None


def test_consumer_span_records_failures_but_not_declared_throws(consumer_tracing):
    run, tasks, exporter, _ = consumer_tracing
    run(tasks["boom"], task_id="job-2")
    run(tasks["expected"], task_id="job-3")
    failed, expected = exporter.get_finished_spans()
    assert failed.status.status_code is trace.StatusCode.ERROR
    assert failed.attributes["error.type"] == "ValueError"
    assert failed.attributes["celery.state"] == "FAILURE"
    assert [e.name for e in failed.events] == ["exception"]
    assert expected.status.status_code is trace.StatusCode.UNSET


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": "00-00000000000000000000000000000000-b7ad6b7169203331-01"},
        {"traceparent": "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        {"traceparent": "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01"},
        {"traceparent": ["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]},
        {"traceparent": 7, "tracestate": {"a": 1}, "baggage": ["x"]},
        {"traceparent": "0" * 100_000, "tracestate": ",".join(f"k{i}=v" for i in range(500))},
    ],
    ids=["zero-trace-id", "version-ff", "upper-case", "list", "non-strings", "huge"],
)
def test_hostile_headers_start_a_new_trace_and_never_raise(consumer_tracing, headers):
    run, tasks, exporter, seen = consumer_tracing
    run(tasks["ok"], headers)
    [span] = exporter.get_finished_spans()
    assert span.parent is None and span.context.is_valid
    assert span.attributes["celery.state"] == "SUCCESS"


SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED = SAMPLED[:-2] + "00"
ZERO_TRACE_ID = "00-" + "0" * 32 + UNSAMPLED[35:]  # invalid: the W3C propagator starts a new trace


@pytest.mark.parametrize(
    "headers, deferred, exported",
    [
        ({"traceparent": SAMPLED}, True, True),
        ({"traceparent": SAMPLED, "tracestate": "vendor=x"}, True, True),
        ({}, True, True),
        ({"traceparent": UNSAMPLED}, True, False),
        ({"traceparent": UNSAMPLED, "tracestate": "vendor=x"}, True, False),
        ({"traceparent": ZERO_TRACE_ID}, False, True),
        ({"traceparent": SAMPLED, "baggage": "tenant=acme"}, False, True),
        ({"traceparent": "01" + SAMPLED[2:] + "-future"}, False, True),
    ],
    ids=[
        "sampled",
        "tracestate",
        "no-parent",
        "unsampled",
        "unsampled-tracestate",
        "unsampled-invalid",
        "baggage",
        "future-version",
    ],
)
def test_consumer_span_is_deferred_only_where_nothing_is_lost(consumer_tracing, headers, deferred, exported):
    """A deferred span (ids made when first asked for) for a sampled or absent
    parent, and for a valid unsampled one, which the default sampler drops
    (nothing is exported, and the task still sees the parent's trace id).
    An invalid unsampled header starts a new trace, which the sampler
    records, so it goes the eager way, as do baggage, which must be in the
    task's context, and traceparents not of version 00's form."""
    run, tasks, exporter, seen = consumer_tracing
    run(tasks["peek"], headers)
    assert seen["deferred"] is deferred
    assert seen["baggage"] == ({"tenant": "acme"} if "baggage" in headers else {})
    if headers.get("traceparent") == UNSAMPLED:  # not recorded, but the trace goes on, unsampled, into a child
        ctx = seen["context"]
        assert ctx.is_valid and not ctx.trace_flags.sampled and f"{ctx.trace_id:032x}" == UNSAMPLED[3:35]
        assert seen["env"]["TRACEPARENT"] == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-00"
        assert seen["env"].get("TRACESTATE") == headers.get("tracestate")
    spans = exporter.get_finished_spans()
    assert len(spans) == int(exported)
    if exported:
        [span] = spans
        assert span.context.span_id == seen["context"].span_id
        if headers.get("traceparent", ZERO_TRACE_ID) == ZERO_TRACE_ID:  # none, or refused: a new trace
            assert span.parent is None
        else:
            assert f"{span.parent.span_id:016x}" == "b7ad6b7169203331"
            assert span.context.trace_state.get("vendor") == ("x" if "tracestate" in headers else None)


def test_an_unsampled_header_is_deferred_only_if_the_w3c_propagator_accepts_it():
    """Deferring an unsampled message's span bets that the parent is valid
    (a refused header starts a new trace, which the sampler may record), so
    the check must agree with the W3C propagator on every 55-character
    header: here, every one-character change of a valid one."""
    import random

    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from cadscope.tracing._celery import _deferrable

    def w3c_accepts(traceparent):
        extracted = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
        return trace.get_current_span(extracted).get_span_context().is_valid

    rng = random.Random(7)
    headers = {UNSAMPLED, ZERO_TRACE_ID, UNSAMPLED[:36] + "0" * 16 + "-00", "ff" + UNSAMPLED[2:], "01" + UNSAMPLED[2:]}
    for _ in range(400):
        at = rng.randrange(55)
        headers.add(UNSAMPLED[:at] + rng.choice("0af9AFgx- \t\n") + UNSAMPLED[at + 1 :])
    verdicts = set()
    for traceparent in headers:
        request = type("Request", (), {"traceparent": traceparent})()
        deferrable = _deferrable(request, True, drops_unsampled=True)
        assert (deferrable is not None) is w3c_accepts(traceparent), traceparent
        if deferrable is not None:
            assert deferrable == ({"traceparent": traceparent}, traceparent[-1] in "13579bdf")
        if traceparent[-1] not in "13579bdf":  # unsampled: eager where the sampler might record it
            assert _deferrable(request, True, drops_unsampled=False) is None
        verdicts.add(deferrable is not None)
    assert verdicts == {True, False}


def test_consumer_span_is_eager_with_a_propagator_that_is_not_w3c(consumer_tracing):
    from opentelemetry import propagate
    from opentelemetry.propagators.textmap import TextMapPropagator

    class B3Like(TextMapPropagator):
        def extract(self, carrier, context=None, getter=None):
            return context or Context()

        def inject(self, carrier, context=None, setter=None):
            return None

        @property
        def fields(self):
            return {"b3"}

    run, tasks, exporter, seen = consumer_tracing
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(B3Like())
    try:
        run(tasks["peek"], {"traceparent": SAMPLED})
    finally:
        propagate.set_global_textmap(previous)
    assert seen["deferred"] is False
    [span] = exporter.get_finished_spans()
    assert span.parent is None  # what this propagator extracts: nothing


def _path(request) -> str:
    return request.node.callspec.params["consumer_tracing"]


@pytest.mark.parametrize(
    "name, state",
    [("retry", "RETRY"), ("ignore", "IGNORED"), ("reject", "REJECTED")],
)
def test_runs_that_skip_after_return_still_end_their_span(consumer_tracing, name, state):
    """Celery calls no ``after_return`` for a retry, an ``Ignore`` (what
    ``Task.replace`` raises) or a ``Reject``; the span still ends, with the
    state, and the task's context is detached."""
    run, tasks, exporter, _ = consumer_tracing
    before = trace.get_current_span()
    run(tasks[name], {"traceparent": SAMPLED})
    [span] = exporter.get_finished_spans()
    assert span.attributes["celery.state"] == state
    assert f"{span.parent.span_id:016x}" == "b7ad6b7169203331"
    if state == "RETRY":
        assert span.attributes["celery.retry.reason"] == "backing off"
    assert span.status.status_code is trace.StatusCode.UNSET
    assert trace.get_current_span() is before


def test_a_run_that_leaves_past_every_hook_ends_its_span(consumer_tracing, request):
    """A BaseException (SystemExit, say) leaves the run past every hook;
    Celery re-raises it. The span ends, the context is detached, and on the
    hook path the exception is recorded."""
    run, tasks, exporter, _ = consumer_tracing
    before = trace.get_current_span()
    with pytest.raises(_Stop):
        run(tasks["stop"])
    [span] = exporter.get_finished_spans()
    assert trace.get_current_span() is before
    if _path(request) == "hooks":
        assert span.status.status_code is trace.StatusCode.ERROR
        assert span.attributes["error.type"] == "_Stop"
        assert "celery.state" not in span.attributes


def test_a_task_run_eagerly_inside_a_task_leaves_the_outer_span_open(consumer_tracing):
    run, tasks, exporter, seen = consumer_tracing
    run(tasks["nested"], task_id="job-outer")
    inner, outer = exporter.get_finished_spans()
    assert (inner.name, outer.name) == ("run/t.ok", "run/t.nested")
    # Its request carries no traceparent, so, as with the upstream instrumentation, a trace of its own.
    assert outer.context.span_id == seen["outer"].span_id != inner.context.span_id
    assert seen["after_inner"].span_id == outer.context.span_id  # the outer context is back
    assert "cadscope.span.ended_late" not in outer.attributes  # a nested run is not a leak
    assert outer.end_time >= inner.end_time


@pytest.mark.filterwarnings("ignore:Exception raised outside body:RuntimeWarning")  # Celery's report of it
def test_a_failure_outside_the_task_body_fails_its_span(consumer_tracing, request, monkeypatch):
    """The broker goes away as the result is stored, after the callbacks were
    sent: Celery signals an internal error and marks the task FAILURE, with no
    hook. On the hook path the span says so; the signal path's ends at
    ``task_postrun``, before Celery knows."""
    from kombu.exceptions import OperationalError

    run, tasks, exporter, _ = consumer_tracing

    def mark_as_done(*args, **kwargs):
        raise OperationalError("connection reset")

    monkeypatch.setattr(tasks["ok"].backend, "mark_as_done", mark_as_done)
    before = trace.get_current_span()
    run(tasks["ok"], task_id="job-4")
    [span] = exporter.get_finished_spans()
    assert trace.get_current_span() is before
    if _path(request) == "hooks":
        assert span.attributes["celery.state"] == "FAILURE"
        assert span.attributes["error.type"] == "OperationalError"
        assert span.status.status_code is trace.StatusCode.ERROR


def test_traced_tasks_keep_celerys_fast_path(consumer_tracing, request):
    """A worker's tracer calls ``task.run`` directly unless the task class has a ``__call__`` of its
    own; TracedTask wraps ``run`` instead, keeping the body's name, signature and ``__wrapped__``."""
    import inspect

    from celery.app.trace import task_has_custom

    _, tasks, _, _ = consumer_tracing
    for task in (tasks["ok"], tasks["boom"]):  # bound, and not
        real = task.app.tasks[task.name]
        assert not task_has_custom(real, "__call__")
        if _path(request) == "hooks":
            body = vars(type(real))["__wrapped__"]  # the task's function, as @app.task kept it
            body = getattr(body, "__func__", body)  # unbound: a staticmethod
            assert real.run.__wrapped__ is body and real.run.__name__ == body.__name__
    assert list(inspect.signature(tasks["ok"].app.tasks["t.ok"].run).parameters) == []


def test_traced_tasks_call_the_next_hooks_unless_they_are_celerys_empty_ones(monkeypatch):
    """TracedTask's ``before_start`` and ``after_return`` leave out ``super()``'s only where that is
    Celery's own ``Task`` hook and it does nothing: a mixin after TracedTask in the MRO, and a Celery
    hook that does something, are still called, with the task's span open."""
    from celery import Celery, Task
    from celery.app.trace import build_tracer

    from cadscope.tracing import TracedTask, instrument_celery_worker, uninstrument_celery_worker
    from cadscope.tracing._celery import _calls_next

    calls = []

    class Mixin(Task):
        def before_start(self, task_id, args, kwargs):
            calls.append(("mixin before_start", trace.get_current_span().is_recording()))
            super().before_start(task_id, args, kwargs)

    class Mixed(TracedTask, Mixin):  # MRO: TracedTask, Mixin, Task
        pass

    assert (Mixed._next_before_start, Mixed._next_after_return) == (True, False)
    assert (_calls_next(TracedTask, "before_start"), _calls_next(TracedTask, "after_return")) == (False, False)
    app = Celery("next-hooks", set_as_current=False, task_cls=Mixed)

    @app.task(name="t.mixed", shared=False)
    def mixed():
        return None

    assert app.tasks["t.mixed"]._next_after_return is False  # the app finalized: its task class made now

    def after_return(self, status, retval, task_id, args, kwargs, einfo):  # a Celery whose hook does something
        calls.append(("celery after_return", trace.get_current_span().is_recording()))

    monkeypatch.setattr(Task, "after_return", after_return)  # for task classes made from now on

    class Later(TracedTask):
        pass

    assert (Later._next_before_start, Later._next_after_return) == (False, True)

    @app.task(name="t.later", base=Later, shared=False)
    def later():
        return None

    provider, exporter = in_memory_provider()
    instrument_celery_worker(provider, app=app)
    try:
        for task in (mixed, later):
            request = {"id": f"job-{task.name}", "task": task.name, "retries": 0}
            build_tracer(task.name, task, app=app, eager=False, propagate=False)(request["id"], (), {}, request)
    finally:
        uninstrument_celery_worker()
    assert calls == [("mixin before_start", True), ("celery after_return", True)]
    assert sorted(span.name for span in exporter.get_finished_spans()) == ["run/t.later", "run/t.mixed"]


def test_the_hook_path_leaves_celerys_per_task_signals_without_receivers(consumer_tracing, request):
    """Celery sends ``task_prerun``/``task_postrun``/``task_success`` only if
    they have receivers; on the hook path none are ours, and the upstream
    instrumentation's, instrumented in this process, are disconnected."""
    from celery import signals

    if _path(request) == "hooks":
        assert not signals.task_prerun.receivers
        assert not signals.task_postrun.receivers
        assert not signals.task_success.receivers
    else:
        assert signals.task_prerun.receivers and signals.task_postrun.receivers


def _plain_and_traced_app(subclass_hooks: bool = False):
    from celery import Celery, Task

    from cadscope.tracing import TracedTask

    class Forgetful(TracedTask):
        def after_return(self, *args, **kwargs):  # no super(): cadscope's hook never runs
            return None

    def nothing() -> None:
        return None

    app = Celery("mixed", set_as_current=False, task_cls=TracedTask)
    traced = app.task(name="m.traced", shared=False)(nothing)
    other = app.task(name="m.other", shared=False, base=Forgetful if subclass_hooks else Task)(nothing)
    return app, traced, other


def _run(app, task, task_id):
    from celery.app.trace import build_tracer

    request = {"id": task_id, "task": task.name, "retries": 0, "delivery_info": {}}
    build_tracer(task.name, task, app=app, eager=False, propagate=False)(task_id, (), {}, request)


def test_an_app_with_a_task_of_another_class_is_traced_through_signals():
    """One task not a TracedTask: the signal path, which sees every task; the
    TracedTask ones still get one span each, not two."""
    from celery import signals

    from cadscope.tracing import instrument_celery_worker, uninstrument_celery_worker

    provider, exporter = in_memory_provider()
    app, traced, other = _plain_and_traced_app()
    instrument_celery_worker(provider, app=app)
    try:
        assert signals.task_prerun.receivers
        _run(app, traced, "a")
        _run(app, other, "b")
    finally:
        uninstrument_celery_worker()
    assert [s.name for s in exporter.get_finished_spans()] == ["run/m.traced", "run/m.other"]


def test_a_span_no_hook_ended_is_ended_late_when_its_thread_starts_the_next_task(caplog):
    """A subclass whose ``after_return`` does not call ``super()``: its span
    stays open, and its context attached, until the thread's next task
    starts; then it is ended, marked, and logged, not leaked."""
    from cadscope.tracing import instrument_celery_worker, uninstrument_celery_worker

    provider, exporter = in_memory_provider()
    app, traced, forgetful = _plain_and_traced_app(subclass_hooks=True)
    before = trace.get_current_span()
    instrument_celery_worker(provider, app=app)
    try:
        _run(app, forgetful, "f-1")
        assert exporter.get_finished_spans() == ()
        with caplog.at_level(logging.WARNING, logger="cadscope.tracing._celery"):
            _run(app, traced, "t-1")
    finally:
        uninstrument_celery_worker()
    late, ok = exporter.get_finished_spans()
    assert (late.name, late.attributes["cadscope.span.ended_late"]) == ("run/m.other", True)
    assert "cadscope.span.ended_late" not in ok.attributes and ok.parent is None  # not the leaked one's child
    assert "f-1" in caplog.text
    assert trace.get_current_span() is before


def test_a_task_running_on_another_thread_is_not_taken_for_a_leak():
    """Thread pools: one thread's task start must not end the span of a task
    still running on another thread."""
    import threading

    from celery import Celery

    from cadscope.tracing import TracedTask, instrument_celery_worker, uninstrument_celery_worker

    provider, exporter = in_memory_provider()
    app = Celery("threads", set_as_current=False, task_cls=TracedTask)
    running, release = threading.Event(), threading.Event()

    @app.task(name="th.slow", shared=False)
    def slow():
        running.set()
        assert release.wait(10)

    @app.task(name="th.quick", shared=False)
    def quick():
        return None

    instrument_celery_worker(provider, app=app)
    try:
        worker = threading.Thread(target=_run, args=(app, slow, "slow-1"))
        worker.start()
        assert running.wait(10)
        _run(app, quick, "quick-1")
        release.set()
        worker.join(10)
    finally:
        uninstrument_celery_worker()
    quick_span, slow_span = exporter.get_finished_spans()
    assert (quick_span.name, slow_span.name) == ("run/th.quick", "run/th.slow")
    assert "cadscope.span.ended_late" not in slow_span.attributes
    assert slow_span.attributes["celery.state"] == "SUCCESS"


def test_a_tracing_failure_in_a_hook_never_fails_the_task(monkeypatch, caplog):
    """Signal receivers' exceptions are caught by Celery; a hook's would fail
    the task, so the hook path catches its own, and logs them."""
    from celery.app.trace import build_tracer

    from cadscope.tracing import _celery, instrument_celery_worker, uninstrument_celery_worker

    provider, exporter = in_memory_provider()
    app, traced, _ = _plain_and_traced_app(subclass_hooks=True)  # every task a TracedTask: the hook path
    instrument_celery_worker(provider, app=app)
    try:
        assert _celery._installed is not None and _celery._installed.hooks

        def broken(*args, **kwargs):
            raise RuntimeError("tracer bug")

        monkeypatch.setattr(_celery._installed, "hook_start", broken)
        request = {"id": "x-1", "task": traced.name, "retries": 0, "delivery_info": {}}
        with caplog.at_level(logging.WARNING, logger="cadscope.tracing._celery"):
            info = build_tracer(traced.name, traced, app=app, eager=False, propagate=False)("x-1", (), {}, request)[1]
    finally:
        uninstrument_celery_worker()
    assert info is None  # no failure: the task succeeded
    assert "task tracing failed in hook_start" in caplog.text and "tracer bug" in caplog.text
    assert exporter.get_finished_spans() == ()
