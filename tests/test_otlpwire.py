"""cadscope's OTLP trace encoder against upstream's: the same bytes, and the real gRPC path."""

from __future__ import annotations

import enum
import gzip
import http.server
import logging
import os
import random
import subprocess
import sys
import threading

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from cadscope.tracing._otlpwire import OTLPWireHTTPSpanExporter, OTLPWireSpanExporter, encode_request
from cadscope.tracing.testing import OTLPReceiver


class Colour(enum.IntEnum):
    RED = 3


def _context(rng: random.Random, remote: bool = False, state: TraceState | None = None) -> SpanContext:
    return SpanContext(rng.getrandbits(128) or 1, rng.getrandbits(64) or 1, is_remote=remote,
                       trace_flags=TraceFlags(rng.choice([0, 1, 3])), trace_state=state)  # fmt: skip


def _value(rng: random.Random):  # noqa: ANN202 - every attribute value type OTLP has
    return rng.choice(
        [
            "", "part.step", "ünïcødé ✓ 部品", "x" * 300, "line\nbreak\x00nul",
            True, False, 0, 1, -1, 127, 128, 2**63 - 1, -(2**63), 300, -300,
            0.0, -0.0, 1.5, -2.25e-300, float("inf"), 1e308,
            b"", b"\x00\xffbytes",
            (), ("a", "b"), (1, 2, 3), (True, False), (1.5, 2.5), ["list", "of", "str"], ("mixed", 1, None),
            {"k": 1, "n": {"deep": "x"}}, None, Colour.RED,
        ]
    )  # fmt: skip


def _attributes(rng: random.Random, n: int) -> dict:
    return {f"attr.{i}.{rng.randrange(1000)}": _value(rng) for i in range(n)}


def _spans(seed: int, count: int = 60) -> list[ReadableSpan]:
    rng = random.Random(seed)
    resources = [
        Resource.create({"service.name": "cadscope-worker", "host.name": "h1", "process.pid": 7}),
        Resource({"service.name": "other"}, schema_url="https://opentelemetry.io/schemas/1.21.0"),
        Resource({}),
    ]
    scopes = [
        InstrumentationScope("cadscope.celery", "0.1"),
        InstrumentationScope("cadscope.freecad", None, "https://opentelemetry.io/schemas/1.21.0"),
        InstrumentationScope("", None),
        None,
    ]
    states = [None, TraceState([("vendor", "x"), ("other", "y=z")])]
    spans = []
    for _ in range(count):
        start = rng.choice([0, 1_700_000_000_000_000_000 + rng.randrange(10**12)])
        spans.append(
            ReadableSpan(
                rng.choice(["run/cad.job", "occ.boolean fuse", "", "部品.export", "a" * 200]),
                context=_context(rng, state=rng.choice(states)),
                parent=rng.choice([None, _context(rng), _context(rng, remote=True)]),
                resource=rng.choice(resources),
                attributes=_attributes(rng, rng.randrange(0, 12)),
                events=[
                    Event(
                        rng.choice(["exception", "", "retry"]),
                        _attributes(rng, rng.randrange(0, 4)),
                        rng.choice([None, start + 5]),
                    )
                    for _ in range(rng.randrange(0, 3))
                ],  # fmt: skip
                links=[
                    Link(_context(rng, remote=rng.random() < 0.5), _attributes(rng, rng.randrange(0, 3)))
                    for _ in range(rng.randrange(0, 2))
                ],  # fmt: skip
                kind=rng.choice(list(SpanKind)),
                status=rng.choice(
                    [
                        Status(StatusCode.UNSET),
                        Status(StatusCode.OK),
                        Status(StatusCode.ERROR, rng.choice([None, "", "fillet failed: radius 3.0"])),
                    ]
                ),  # fmt: skip
                start_time=start or None,
                end_time=(start + rng.randrange(10**9)) if start else None,
                instrumentation_scope=rng.choice(scopes),
            )
        )
    # The same resource as another object: upstream groups by equality, not identity.
    same = Resource.create({"service.name": "cadscope-worker", "host.name": "h1", "process.pid": 7})
    spans.append(ReadableSpan("copy", context=_context(rng), resource=same, instrumentation_scope=scopes[0]))
    return spans


@pytest.mark.parametrize("seed", range(8))
def test_bytes_are_upstreams_bytes(seed):
    spans = _spans(seed)
    ours = encode_request(spans)
    assert ours == encode_spans(spans).SerializeToString()
    # And a collector reads back every span.
    parsed = ExportTraceServiceRequest.FromString(ours)
    assert sum(len(s.spans) for r in parsed.resource_spans for s in r.scope_spans) == len(spans)


@pytest.fixture(params=["compiled", "python"])
def task_span_encoding(request, monkeypatch):
    """Each test of task span encoding twice: with the compiled task span encoding (``_wirec``),
    where it was built, and with the Python encoder alone."""
    from cadscope.tracing import _otlpwire

    if request.param == "compiled" and _otlpwire._LEAN_FIELD is None:
        pytest.skip("cadscope.tracing._wirec was not built here (CI requires it: test_the_compiled_modules_are_built)")
    if request.param == "python":
        monkeypatch.setattr(_otlpwire, "_LEAN_FIELD", None)
    return request.param


@pytest.mark.parametrize("seed", range(4))
def test_task_spans_read_directly_are_upstreams_bytes(seed, task_span_encoding):
    """cadscope's task spans (LeanSpan), which the encoder reads field by field where they have a
    plain attribute dict and neither events nor links: the same bytes as upstream's encoder,
    deferred and eager spans, every status, remote and local parents, trace state, attributes of
    every type (some beyond what a plain dict keeps), events (the general path)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from cadscope.tracing import _lean

    rng = random.Random(seed)
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "cadscope-worker"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("cadscope.celery", "0.1")
    for i in range(40):
        attributes = {"celery.action": "run", "messaging.message.id": f"job-{i}", **_attributes(rng, rng.randrange(4))}
        traceparent = f"00-{rng.getrandbits(128) or 1:032x}-{rng.getrandbits(64) or 1:016x}-01"
        headers = {"traceparent": traceparent, **({"tracestate": "vendor=x,other=y"} if rng.random() < 0.3 else {})}
        if rng.random() < 0.5:
            span = _lean.start_deferred_span(tracer, rng.choice(["run/cad.job", "", "部品"]), headers,
                                             SpanKind.CONSUMER, attributes)  # fmt: skip
        else:
            span = _lean.start_lean_span(tracer, "run/cad.job", None, rng.choice(list(SpanKind)), attributes)
        span.set_attribute("celery.state", rng.choice(["SUCCESS", "FAILURE"]))
        status = rng.choice([None, Status(StatusCode.OK), StatusCode.ERROR, Status(StatusCode.ERROR, "no fillet")])
        if status is not None:
            span.set_status(status)
        if rng.random() < 0.1:
            span.add_event("retry", {"n": 1})
        span.end()
    spans = exporter.get_finished_spans()
    assert len(spans) == 40 and all(type(span) is _lean.LeanSpan for span in spans)
    assert any(type(span._attributes) is dict and not span._events for span in spans)  # the direct path taken
    assert encode_request(spans) == encode_spans(spans).SerializeToString()
    # A deferred span not yet resolved (no processor asked for its ids): ours resolves it too.
    deferred = _lean.start_deferred_span(tracer, "run/cad.job", {"traceparent": f"00-{1:032x}-{2:016x}-01"},
                                         SpanKind.CONSUMER, {"celery.action": "run"})  # fmt: skip
    deferred._end_time = deferred._start_time + 1  # ended without a processor seeing it
    assert deferred.deferred
    ours = encode_request([deferred])
    assert not deferred.deferred and ours == encode_spans([deferred]).SerializeToString()


def _task_span(
    tracer, attributes: dict, name: str = "run/cad.job", parent: str | None = None, state: str | None = None
):
    from cadscope.tracing import _lean

    traceparent = parent or f"00-{random.getrandbits(128) | 1:032x}-{random.getrandbits(64) | 1:016x}-01"
    headers = {"traceparent": traceparent, **({"tracestate": state} if state is not None else {})}
    span = _lean.start_deferred_span(tracer, name, headers, SpanKind.CONSUMER, attributes)
    span.get_span_context()  # resolved, as the export thread does before encoding
    span._end_time = span._start_time + 1000
    return span


def test_the_compiled_task_span_encoding_writes_the_pythons_bytes_or_declines():
    """``_wirec.lean_span_field`` against ``_field(b"\\x12", _span(span))`` over task spans of every shape:
    the same bytes for those it writes (attribute values of each scalar type and edge value, names and
    values of 0, 127, 128 and 20,000 bytes, a span past 16 KiB, an empty key, non-ASCII text, local
    and remote parents, and none), and None, leaving them to the Python encoder, for the rest (an int
    past int64, a lone surrogate in a key, a value or the name, a str subclass, a container, trace
    state, a status set, an event, an unresolved span, an SDK span)."""
    from opentelemetry.sdk.trace import TracerProvider

    from cadscope.tracing import _lean, _otlpwire

    compiled = _otlpwire._LEAN_FIELD
    if compiled is None:
        pytest.skip("cadscope.tracing._wirec was not built here (CI requires it: test_the_compiled_modules_are_built)")
    tracer = TracerProvider(resource=Resource.create({"service.name": "cadscope-worker"})).get_tracer("c", "1")

    class Text(str):
        pass

    written = [
        {"celery.action": "run", "messaging.message.id": "job-1"},
        {},
        {"": "empty key", "k": ""},
        {"i": 0, "j": 1, "k": -1, "l": 127, "m": 128, "n": 2**63 - 1, "o": -(2**63), "p": 300, "q": -300},
        {"f": 0.0, "g": -0.0, "h": 1.5, "inf": float("inf"), "nan": float("nan"), "tiny": -2.25e-300},
        {"t": True, "u": False},
        {"ünï": "ünïcødé ✓ 部品", "x127": "x" * 127, "x128": "x" * 128, "big": "y" * 20_000},
        {f"k{i}": "v" * 300 for i in range(60)},  # a span past 16 KiB: a 3-byte length
    ]
    declined = [
        {"huge": 2**63},
        {"neg": -(2**63) - 1},
        {"bad": "a\ud800b"},
        {"a\udfff": 1},
        {"sub": Text("x")},
        {"seq": ("a", "b")},
        {"none": None},
        {"bytes": b"x"},
    ]
    seen = 0
    for attributes in written:
        for name in ("run/cad.job", "", "部品", "n" * 128):
            span = _task_span(tracer, {}, name=name)
            span._attributes = dict(attributes)  # as given, whatever the span's own rules would keep
            assert compiled(span) == _otlpwire._field(b"\x12", _otlpwire._span(span)), (attributes.keys(), name)
            seen += 1
    # Eager task spans: no parent, a local one, a remote one.
    for parent in (None, SpanContext(5, 6, is_remote=False), SpanContext(5, 7, is_remote=True)):
        span = _lean.LeanSpan(tracer, "run/x", SpanContext(5, 8, is_remote=False), parent, SpanKind.INTERNAL,
                              {"a": 1}, 1_700_000_000_000_000_000)  # fmt: skip
        span._end_time = span._start_time + 5
        assert compiled(span) == _otlpwire._field(b"\x12", _otlpwire._span(span))
        seen += 1
    assert seen == 4 * len(written) + 3
    for attributes in declined:
        span = _task_span(tracer, {})
        span._attributes = dict(attributes)
        assert compiled(span) is None, attributes
    assert compiled(_task_span(tracer, {}, name="stage \ud800")) is None
    assert compiled(_task_span(tracer, {}, state="vendor=x")) is None
    errored = _task_span(tracer, {})
    errored._status = Status(StatusCode.ERROR, "no fillet")
    assert compiled(errored) is None
    with_event = _task_span(tracer, {})
    with_event._end_time = None
    with_event.add_event("retry", {"n": 1})
    with_event._end_time = with_event._start_time + 1
    assert compiled(with_event) is None
    unresolved = _lean.start_deferred_span(tracer, "run/x", {"traceparent": f"00-{1:032x}-{2:016x}-01"})
    assert compiled(unresolved) is None and unresolved.deferred  # not resolved by the compiled encoder
    assert compiled(ReadableSpan("s", context=SpanContext(1, 2, is_remote=False))) is None
    # And whatever either writes, a collector reads back with every span.
    spans = [_task_span(tracer, dict(a)) for a in written + declined]
    parsed = ExportTraceServiceRequest.FromString(encode_request(spans))
    assert sum(len(s.spans) for r in parsed.resource_spans for s in r.scope_spans) == len(spans)


def test_the_compiled_modules_are_built():
    """CI sets CADSCOPE_REQUIRE_COMPILED=1: there the compiled modules (``setup.py``) must have been built
    and taken up, or the tests of them would only skip. Elsewhere (no compiler) they may be missing."""
    from cadscope.metrics import _values
    from cadscope.tracing import _lean, _otlpwire

    if os.environ.get("CADSCOPE_REQUIRE_COMPILED") != "1":
        pytest.skip("CADSCOPE_REQUIRE_COMPILED is not set")
    assert _otlpwire._LEAN_FIELD is not None
    assert _lean._W3C_CHILD is not None
    assert _values.compiled_observe is not None


def test_cadscope_compiled_0_turns_the_compiled_modules_off(monkeypatch):
    from cadscope.metrics import _values
    from cadscope.tracing import _lean, _otlpwire

    monkeypatch.setenv("CADSCOPE_COMPILED", "0")
    assert _otlpwire._compiled() is None and _lean._compiled_w3c_child() is None
    assert _values._compiled_observe() is None


def test_an_attribute_that_cannot_be_encoded_is_dropped_and_the_span_kept(caplog):
    context = SpanContext(1, 2, is_remote=False)
    span = ReadableSpan(
        "s", context=context, attributes={"ok": 1, "huge": 2**64, "bad.str": "a\ud800b", "also.ok": "y"}
    )
    with caplog.at_level(logging.ERROR, logger="cadscope.tracing._otlpwire"):
        ours = encode_request([span])
    [parsed] = [s for r in ExportTraceServiceRequest.FromString(ours).resource_spans for ss in r.scope_spans
                for s in ss.spans]  # fmt: skip
    assert [a.key for a in parsed.attributes] == ["ok", "also.ok"]
    assert "huge" in caplog.text and "bad.str" in caplog.text
    # Upstream makes the same call for these two attributes.
    good = ReadableSpan("s", context=context, attributes={"ok": 1, "also.ok": "y"})
    assert ours == encode_spans([good]).SerializeToString()


def test_a_name_that_is_not_utf8_is_sent_with_replacements():
    """Where upstream's encoder raises and the whole batch is lost."""
    span = ReadableSpan("stage \ud800", context=SpanContext(1, 2, is_remote=False),
                        status=Status(StatusCode.ERROR, "bad \udfff"))  # fmt: skip
    with pytest.raises(Exception):  # noqa: B017 - whichever error upb raises
        encode_spans([span]).SerializeToString()
    [parsed] = ExportTraceServiceRequest.FromString(encode_request([span])).resource_spans[0].scope_spans[0].spans
    assert parsed.name == "stage ?" and parsed.status.message == "bad ?"


def test_the_exporter_sends_the_same_request_over_grpc():
    """A real gRPC receiver on loopback gets what upstream's exporter would have sent."""
    spans = _spans(42, count=200)
    with OTLPReceiver() as receiver:
        exporter = OTLPWireSpanExporter(endpoint=receiver.endpoint, insecure=True)
        try:
            assert exporter.export(spans) is SpanExportResult.SUCCESS
        finally:
            exporter.shutdown()
        [request] = receiver.requests
    assert request == encode_spans(spans)


def test_the_exporter_reports_failure_when_nobody_listens():
    with OTLPReceiver() as receiver:
        endpoint = receiver.endpoint
    exporter = OTLPWireSpanExporter(endpoint=endpoint, insecure=True, timeout=1)
    try:
        assert exporter.export(_spans(1, count=3)) is SpanExportResult.FAILURE
    finally:
        exporter.shutdown()


_BDP_CHILD = """
import ast
import sys
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from cadscope.tracing._otlpgrpc import OTLPWireSpanExporter

memory = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(memory))
for i in range(20):
    provider.get_tracer("t").start_span(f"s{i}").end()
exporter = OTLPWireSpanExporter(endpoint=sys.argv[1], insecure=True, channel_options=ast.literal_eval(sys.argv[2]))
print([exporter.export(memory.get_finished_spans()).name for _ in range(3)])
exporter.shutdown()
"""


@pytest.mark.parametrize(("options", "pings"), [("None", False), ("(('grpc.http2.bdp_probe', 1),)", True)])
def test_the_grpc_exporter_sends_no_bdp_pings_unless_asked(options, pings):
    """gRPC's own tracer (``GRPC_TRACE=bdp_estimator``) in an exporting process shows the client's
    BDP estimator at work only where the caller turns probing back on: by default the responses
    set off no ping. The control case keeps this from passing on a tracer that says nothing."""
    with OTLPReceiver() as receiver:
        env = {**os.environ, "GRPC_TRACE": "bdp_estimator", "GRPC_VERBOSITY": "debug"}
        child = subprocess.run([sys.executable, "-c", _BDP_CHILD, receiver.endpoint, options], env=env,
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert child.returncode == 0, child.stderr[-2000:]
        assert child.stdout.strip() == "['SUCCESS', 'SUCCESS', 'SUCCESS']"
        assert len(receiver.spans) == 60
    # The client's estimator names its peer, the receiver; the receiver's (not in this process) would not.
    client_pings = [line for line in child.stderr.splitlines() if f"bdp[ipv4:127.0.0.1:{receiver.port}]" in line]
    assert bool(client_pings) is pings, child.stderr[-2000:]


class _HTTPReceiver:
    """A real OTLP/HTTP endpoint on loopback: keeps each POST's path, headers and (decompressed) body and
    answers with ``status`` (200 and an empty ExportTraceServiceResponse by default)."""

    def __init__(self, status: int = 200) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def __enter__(self) -> _HTTPReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_the_http_exporter_posts_upstreams_bytes(compression):
    """Over a real HTTP connection: the body upstream's OTLP/HTTP exporter posts for the same spans,
    to the same path with the same content type, compressed as configured."""
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as UpstreamHTTP

    spans = _spans(7, count=150)
    kwargs = {"compression": Compression.Gzip} if compression else {}
    with _HTTPReceiver() as receiver:
        for exporter_class in (OTLPWireHTTPSpanExporter, UpstreamHTTP):
            exporter = exporter_class(endpoint=receiver.endpoint, **kwargs)
            try:
                assert exporter.export(spans) is SpanExportResult.SUCCESS
            finally:
                exporter.shutdown()
        ours, theirs = receiver.requests
    assert ours[2] == theirs[2] == encode_spans(spans).SerializeToString()
    assert ours[0] == theirs[0] == "/v1/traces"
    for header in ("content-type", "content-encoding"):
        assert ours[1].get(header) == theirs[1].get(header)
    assert ours[1]["content-type"] == "application/x-protobuf"
    assert ours[1].get("content-encoding") == compression
    assert OTLPWireHTTPSpanExporter(endpoint=receiver.endpoint)._wire  # our encoder sent it, not upstream's


def test_the_http_exporter_reports_a_refused_batch_and_an_oversized_one_without_raising():
    spans = _spans(3, count=5)
    with _HTTPReceiver(status=400) as receiver:
        exporter = OTLPWireHTTPSpanExporter(endpoint=receiver.endpoint, timeout=2)
        assert exporter.export(spans) is SpanExportResult.FAILURE
        assert len(receiver.requests) == 1  # a 400 is not retried
    with _HTTPReceiver() as receiver:
        exporter = OTLPWireHTTPSpanExporter(endpoint=receiver.endpoint, max_request_size=100)
        assert exporter.export(spans) is SpanExportResult.FAILURE
        assert receiver.requests == []  # dropped before it was sent, as upstream does
        exporter = OTLPWireHTTPSpanExporter(endpoint=receiver.endpoint, max_request_size=0)  # no limit
        assert exporter.export(spans) is SpanExportResult.SUCCESS


def test_the_http_exporter_reports_failure_when_nobody_listens():
    with OTLPReceiver() as receiver:
        endpoint = f"{receiver.http_endpoint}/v1/traces"
    exporter = OTLPWireHTTPSpanExporter(endpoint=endpoint, timeout=1)
    assert exporter.export(_spans(1, count=3)) is SpanExportResult.FAILURE


def test_the_http_exporter_falls_back_to_upstreams_export_where_its_parts_are_missing():
    """An upstream release without the client and metrics this exporter calls: every export is upstream's."""
    spans = _spans(5, count=20)
    with _HTTPReceiver() as receiver:
        exporter = OTLPWireHTTPSpanExporter(endpoint=receiver.endpoint)
        exporter._wire = False
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        [(_, _, body)] = receiver.requests
    assert body == encode_spans(spans).SerializeToString()


def test_setup_picks_the_exporter_by_protocol(monkeypatch):
    from cadscope.tracing import _setup

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    for protocol, expected in (("http/protobuf", OTLPWireHTTPSpanExporter), ("grpc", OTLPWireSpanExporter),
                               (None, OTLPWireSpanExporter)):  # fmt: skip
        if protocol is None:
            monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
        else:
            monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        exporter = _setup._otlp_exporter()
        assert type(exporter) is expected
        exporter.shutdown()


@pytest.mark.parametrize(("protocol", "exporter", "other_client"),
                         [("http/protobuf", "OTLPWireHTTPSpanExporter", "grpc"),
                          ("grpc", "OTLPWireSpanExporter", "opentelemetry.exporter.otlp.proto.http")])  # fmt: skip
def test_a_process_imports_only_its_protocols_client(protocol, exporter, other_client):
    """Each of upstream's clients costs a process 0.15-0.25 s to import, in every pool process after fork."""
    code = ("import sys; from cadscope.tracing import _setup; exporter = _setup._otlp_exporter(); "
            f"print(type(exporter).__name__, {other_client!r} in sys.modules); exporter.shutdown()")  # fmt: skip
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == [exporter, "False"], out.stdout + out.stderr


def test_the_test_receiver_takes_otlp_http_and_refuses_what_is_not_a_request():
    import httpx

    spans = _spans(11, count=10)
    with OTLPReceiver() as receiver:
        exporter = OTLPWireHTTPSpanExporter(endpoint=f"{receiver.http_endpoint}/v1/traces")
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        assert len(receiver.wait_for(lambda got: len(got) >= len(spans), timeout=10)) == len(spans)
        assert httpx.post(f"{receiver.http_endpoint}/v1/traces", content=b"\xff\xff garbage").status_code == 400
        assert httpx.post(f"{receiver.http_endpoint}/v1/logs", content=encode_request(spans)).status_code == 404
        assert receiver.transports == ["http"] and len(receiver.spans) == len(spans)
