"""The upload flow: input documents fetched, verified before any engine opens
them, cached, and rebuilt by both engines (real freecadcmd, real OCP)."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from cadscope.freecad_bridge import JobSpec, run_cad_job
from cadscope.freecad_bridge._documents import DocumentCache, DocumentError, FetchPolicy, fetch_document
from cadscope.freecad_bridge._schema import InputDocument
from cadscope.metrics import Catalogue, ModelObservability
from cadscope.tracing.testing import in_memory_provider

from .conftest import wait_until


def _obs() -> tuple[ModelObservability, CollectorRegistry]:
    registry = CollectorRegistry()
    return ModelObservability(Catalogue(registry)), registry


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def _doc(uri: str, data: bytes, fmt: str = "step") -> InputDocument:
    return InputDocument(uri=uri, sha256=hashlib.sha256(data).hexdigest(), format=fmt)  # type: ignore[arg-type]


DATA = b"ISO-10303-21;\n" + b"x" * 300_000
# The test servers listen on loopback, which documents may not come from unless an operator allows it.
LOOPBACK_ONE = FetchPolicy(allowed_networks=(ipaddress.ip_network("127.0.0.1/32"),))


def test_a_stored_document_is_verified_cached_and_a_second_load_is_a_hit(tmp_path):
    obs, registry = _obs()
    store = tmp_path / "store"
    (store / "parts").mkdir(parents=True)
    (store / "parts" / "a.step").write_bytes(DATA)
    cache = DocumentCache(tmp_path / "cache")
    doc = _doc("store://parts/a.step", DATA)
    stages: list[tuple[str, float]] = []
    first = fetch_document(doc, cache=cache, store_root=store, observability=obs,
                           on_progress=lambda s, r: stages.append((s, r)))  # fmt: skip
    assert first.read_bytes() == DATA and first.suffix == ".step"
    assert ("download", 1.0) in stages and ("checksum", 1.0) in stages
    again = fetch_document(doc, cache=cache, store_root=store, observability=obs)
    assert again == first
    assert _value(registry, "cadscope_document_cache_misses_total") == 1
    assert _value(registry, "cadscope_document_cache_hits_total") == 1
    assert _value(registry, "cadscope_document_load_attempts_total", source="store") == 2
    assert _value(registry, "cadscope_document_cache_entries", cache="documents") == 1
    assert _value(registry, "cadscope_document_cache_bytes", cache="documents") == len(DATA)
    assert _value(registry, "cadscope_document_load_stage_seconds_count", stage="checksum") == 2


def test_a_tampered_document_is_rejected_counted_and_logged_as_a_security_event(tmp_path, caplog):
    obs, registry = _obs()
    store = tmp_path / "store"
    store.mkdir()
    (store / "a.step").write_bytes(DATA[:-1] + b"y")  # one byte changed after the sha256 was taken
    cache = DocumentCache(tmp_path / "cache")
    provider, exporter = in_memory_provider()
    from opentelemetry import trace

    with caplog.at_level(logging.ERROR, logger="cadscope.documents"), \
            trace.use_span(provider.get_tracer("t").start_span("task"), end_on_exit=True):  # fmt: skip
        with pytest.raises(DocumentError) as rejected:
            fetch_document(_doc("store://a.step", DATA), cache=cache, store_root=store, observability=obs)
    assert rejected.value.error_type == "checksum_mismatch"
    assert _value(registry, "cadscope_security_violations_total", violation_type="checksum_mismatch",
                  severity="critical") == 1  # fmt: skip
    assert _value(registry, "cadscope_document_load_failures_total", source="store",
                  error_type="checksum_mismatch") == 1  # fmt: skip
    record = next(r for r in caplog.records if getattr(r, "security_event", False))
    assert record.violation_type == "checksum_mismatch"  # type: ignore[attr-defined]
    assert list(cache.root.iterdir()) == []  # nothing bad left behind for a later lookup


def test_a_tampered_cache_entry_is_caught_too(tmp_path):
    obs, registry = _obs()
    store = tmp_path / "store"
    store.mkdir()
    (store / "a.step").write_bytes(DATA)
    cache = DocumentCache(tmp_path / "cache")
    doc = _doc("store://a.step", DATA)
    cached = fetch_document(doc, cache=cache, store_root=store, observability=obs)
    cached.write_bytes(b"evil")
    with pytest.raises(DocumentError, match="sha256"):
        fetch_document(doc, cache=cache, store_root=store, observability=obs)
    assert not cached.exists()


def test_a_key_that_escapes_the_store_is_a_violation_even_past_the_schema(tmp_path):
    obs, registry = _obs()
    (tmp_path / "secret.step").write_bytes(DATA)
    (tmp_path / "store").mkdir()
    # model_construct skips the schema's own check: the fetcher must not rely on it alone.
    doc = InputDocument.model_construct(uri="store://../secret.step", sha256=hashlib.sha256(DATA).hexdigest(),
                                        format="step", size_bytes=None)  # fmt: skip
    with pytest.raises(DocumentError) as rejected:
        fetch_document(doc, cache=DocumentCache(tmp_path / "cache"), store_root=tmp_path / "store",
                       observability=obs)  # fmt: skip
    assert rejected.value.error_type == "bad_uri"
    assert _value(registry, "cadscope_security_violations_total", violation_type="path_traversal", severity="high")


def test_the_cache_evicts_the_least_recently_used_beyond_its_budget(tmp_path):
    obs, _ = _obs()
    store = tmp_path / "store"
    store.mkdir()
    cache = DocumentCache(tmp_path / "cache", max_bytes=2 * len(DATA) + 10)
    docs = []
    for i in range(3):
        data = DATA + bytes([i])
        (store / f"{i}.step").write_bytes(data)
        docs.append(_doc(f"store://{i}.step", data))
    import os
    import time

    for index, doc in enumerate(docs[:2]):
        path = fetch_document(doc, cache=cache, store_root=store, observability=obs)
        os.utime(path, (time.time() - 100 + index, time.time() - 100 + index))
    fetch_document(docs[0], cache=cache, store_root=store, observability=obs)  # 0 is now the most recent
    fetch_document(docs[2], cache=cache, store_root=store, observability=obs)  # over budget: 1 goes
    kept = {p.name.split(".")[0] for p in cache.root.iterdir()}
    assert kept == {docs[0].sha256, docs[2].sha256}


class FlakyRangeServer:
    """Serves one file with HTTP Range support; the first response is cut off
    half way (Content-Length promised, connection closed)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.ranges: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                header = self.headers.get("Range")
                server.ranges.append(header)
                start = int(header.split("=")[1].rstrip("-")) if header else 0
                body = server.data[start:]
                self.send_response(206 if header else 200)
                self.send_header("Content-Length", str(len(body)))
                if header:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.data) - 1}/{len(server.data)}")
                self.end_headers()
                if len(server.ranges) == 1:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops mid-body
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/doc.step"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_an_http_download_cut_off_half_way_resumes_with_a_range_request(tmp_path):
    obs, registry = _obs()
    server = FlakyRangeServer(DATA)
    try:
        path = fetch_document(_doc(server.url, DATA), cache=DocumentCache(tmp_path / "cache"),
                              store_root=tmp_path, observability=obs, policy=LOOPBACK_ONE)  # fmt: skip
    finally:
        server.httpd.shutdown()
    assert path.read_bytes() == DATA
    assert server.ranges[0] is None and server.ranges[1] == f"bytes={len(DATA) // 2}-"
    assert _value(registry, "cadscope_document_load_attempts_total", source="http") == 1


# -- hostile document servers: SSRF, redirects, size lies, trickles --------------------------------


class HostileServer:
    """A real HTTP server on a loopback address, told per test how to misbehave. It counts
    what it was asked for and what it sent, so a test can tell a refusal before any
    connection from one after it."""

    def __init__(self, mode: str = "ok", host: str = "127.0.0.1", data: bytes = DATA) -> None:
        self.mode, self.data = mode, data
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.sent = 0
        self.release = threading.Event()  # what a "lie" server waits for before its body
        self.closed_by_client = threading.Event()
        self.redirect_to = ""
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                server.requests.append(("GET", self.path, dict(self.headers)))
                try:
                    server.answer(self)
                except (BrokenPipeError, ConnectionResetError):
                    server.closed_by_client.set()

            do_POST = do_GET  # noqa: N815

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}/doc.step"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        mode = self.mode
        if mode == "redirect":
            handler.send_response(302)
            handler.send_header("Location", self.redirect_to)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if mode.startswith("status_"):
            body = b"secret internal page"
            handler.send_response(int(mode.removeprefix("status_")))
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        handler.send_response(200)
        if mode == "ok":
            handler.send_header("Content-Length", str(len(self.data)))
            handler.end_headers()
            handler.wfile.write(self.data)
        elif mode == "size_lie":  # announces 5 GB, holds the body until released
            handler.send_header("Content-Length", str(5 << 30))
            handler.end_headers()
            handler.wfile.flush()
            self.release.wait(30)
            self._stream(handler, 64 << 20)
        elif mode == "endless":  # no length: streams until the client leaves
            handler.end_headers()
            self._stream(handler, 256 << 20)
        elif mode == "trickle":  # a byte every 0.3 s of a 1,000-byte document
            handler.send_header("Content-Length", "1000")
            handler.end_headers()
            for _ in range(1000):
                handler.wfile.write(b"x")
                handler.wfile.flush()
                self.sent += 1
                time.sleep(0.3)

    def _stream(self, handler: BaseHTTPRequestHandler, limit: int) -> None:
        chunk = b"y" * 65536
        while self.sent < limit:
            handler.wfile.write(chunk)
            self.sent += len(chunk)

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hostile():  # type: ignore[no-untyped-def]
    servers: list[HostileServer] = []

    def start(mode: str = "ok", host: str = "127.0.0.1") -> HostileServer:
        servers.append(HostileServer(mode, host))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def _fetch(tmp_path: Path, uri: str, data: bytes = DATA, **kwargs: Any) -> Path:
    obs, _ = _obs()
    doc = InputDocument(uri=uri, sha256=hashlib.sha256(data).hexdigest(), format="step",
                        size_bytes=kwargs.pop("size_bytes", None))  # fmt: skip
    cache = DocumentCache(tmp_path / f"cache-{uuid.uuid4().hex[:6]}")  # each fetch its own: no hits
    return fetch_document(doc, cache=cache, store_root=tmp_path, observability=obs, **kwargs)


def test_documents_from_internal_addresses_are_refused_before_any_connection(tmp_path, hostile):
    """Loopback in every spelling, through a live server that counts what reaches it; the
    other internal ranges (metadata, private, unique-local, link-local) are checked on the
    addresses alone, so no packet ever leaves for them even if this check regressed."""
    server = hostile()
    port = server.httpd.server_address[1]
    for host in ("127.0.0.1", "0x7f000001", "2130706433", "0177.0.0.1", "127.1", "localhost", "[::ffff:127.0.0.1]"):
        with pytest.raises(DocumentError) as refused:
            _fetch(tmp_path, f"http://{host}:{port}/doc.step")
        assert refused.value.error_type == "bad_uri", host
        assert str(port) not in str(refused.value) and "127." not in str(refused.value), host
    with pytest.raises(DocumentError, match="credentials") as refused:
        _fetch(tmp_path, f"http://user:secret@127.0.0.1:{port}/doc.step", policy=LOOPBACK_ONE)
    assert server.requests == [], "nothing reached the internal server"

    policy = FetchPolicy()
    internal = ("169.254.169.254", "fd00:ec2::254", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "::1",
                "0.0.0.0", "fe80::1", "::ffff:10.0.0.1", "2002:a00:1::", "64:ff9b::a9fe:a9fe", "224.0.0.1")  # fmt: skip
    for address in internal:
        assert not policy.allows(ipaddress.ip_address(address)), address
        with pytest.raises(DocumentError):  # a literal address resolves without a lookup, and is refused
            policy.resolve(address, 80)
    assert policy.allows(ipaddress.ip_address("93.184.216.34"))
    assert policy.allows(ipaddress.ip_address("2606:2800:220:1::1"))

    allowed = FetchPolicy.from_env({"CADSCOPE_DOCUMENT_ALLOW": "127.0.0.1/32, store.internal"})
    assert allowed.allows(ipaddress.ip_address("127.0.0.1")) and not allowed.allows(ipaddress.ip_address("127.0.0.2"))
    assert allowed.allowed_hosts == {"store.internal"}
    with pytest.raises(ValueError, match="CADSCOPE_DOCUMENT_ALLOW"):
        FetchPolicy.from_env({"CADSCOPE_DOCUMENT_ALLOW": "10.0.0.0/33"})
    assert _fetch(tmp_path, server.url, policy=allowed).read_bytes() == DATA  # the operator's choice


def test_every_redirect_is_checked_and_the_remote_is_never_described(tmp_path, hostile):
    inner = hostile(host="127.0.0.2")  # internal, not allowed
    outer = hostile("redirect")  # allowed by the policy, redirects inwards
    outer.redirect_to = inner.url
    with pytest.raises(DocumentError) as refused:
        _fetch(tmp_path, outer.url, policy=LOOPBACK_ONE)
    assert refused.value.error_type == "bad_uri"
    assert len(outer.requests) == 1 and inner.requests == []

    # A redirect within what is allowed is followed.
    target = hostile()
    outer.redirect_to = target.url
    assert _fetch(tmp_path, outer.url, policy=LOOPBACK_ONE).read_bytes() == DATA

    # The remote's answers all read the same to a client: no status, no size, no port.
    for status in (401, 404, 500):
        target.mode = f"status_{status}"
        with pytest.raises(DocumentError) as failed:
            _fetch(tmp_path, target.url, policy=LOOPBACK_ONE)
        assert str(failed.value) == "the document could not be downloaded", status
    target.mode = "ok"
    with pytest.raises(DocumentError) as mismatch:
        _fetch(tmp_path, target.url, policy=LOOPBACK_ONE, size_bytes=len(DATA) - 7)
    assert mismatch.value.error_type == "size_mismatch" and str(len(DATA)) not in str(mismatch.value)


def test_the_host_is_resolved_once_per_hop_and_the_checked_address_is_the_one_connected(tmp_path, hostile, monkeypatch):
    """DNS rebinding: the name answers an allowed address when checked and an internal one
    afterwards. No DNS server of ours can run here, so getaddrinfo stands in for it."""
    public = hostile()
    internal = hostile(host="127.0.0.2")
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1"] + ["127.0.0.2"] * 10)

    def rebinding(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host == "docs.example":
            host = next(answers)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    port = public.httpd.server_address[1]
    internal.httpd.server_close()  # the internal server takes the same port on 127.0.0.2
    internal.httpd = ThreadingHTTPServer(("127.0.0.2", port), type(public.httpd.RequestHandlerClass))  # type: ignore[arg-type]
    threading.Thread(target=internal.httpd.serve_forever, daemon=True).start()
    path = _fetch(tmp_path, f"http://docs.example:{port}/doc.step", policy=LOOPBACK_ONE)
    assert path.read_bytes() == DATA
    assert len(public.requests) == 1 and public.requests[0][2]["Host"] == f"docs.example:{port}"
    assert internal.requests == []


def test_reading_stops_at_the_declared_size_and_at_the_deadline(tmp_path, hostile):
    # 5 GB announced for a 1,000-byte document: refused on the header, before the body is sent.
    liar = hostile("size_lie")
    with pytest.raises(DocumentError) as lie:
        _fetch(tmp_path, liar.url, policy=LOOPBACK_ONE, size_bytes=1000)
    assert lie.value.error_type == "size_mismatch" and liar.sent == 0
    liar.release.set()

    # No length announced, an endless body: reading stops just past the declared size.
    endless = hostile("endless")
    with pytest.raises(DocumentError) as long:
        _fetch(tmp_path, endless.url, policy=LOOPBACK_ONE, size_bytes=1000)
    assert long.value.error_type == "size_mismatch"
    wait_until(endless.closed_by_client.is_set, 30, what="the client hung up on the endless body")
    assert endless.sent < 64 << 20  # what the socket buffers took, not the 256 MiB on offer

    # A byte every 0.3 s: the job's deadline ends the download, whatever each read's timeout.
    trickle = hostile("trickle")
    with pytest.raises(DocumentError) as slow:
        _fetch(tmp_path, trickle.url, policy=LOOPBACK_ONE, size_bytes=1000, deadline=time.monotonic() + 2)
    assert slow.value.error_type == "download_timeout"
    wait_until(trickle.closed_by_client.is_set, 30, what="the client hung up on the trickle")
    assert trickle.sent < 1000
    assert [p for cache in tmp_path.glob("cache-*") for p in cache.iterdir()] == []  # nothing partial is kept


# -- end to end: a real worker rebuilds a real document with both engines --------------------------


@pytest.mark.slow
def test_a_previous_jobs_step_is_uploaded_and_rebuilt_by_both_engines(start_worker, engines, redis_url):
    from cadscope.workers import app, configure_app, run_job
    from cadscope.workers._workload import PLATE

    configure_app(app, redis_url)
    worker = start_worker(concurrency=1)
    first = run_job.apply_async(args=[{**PLATE, "engine": "freecad"}], queue=worker.queue).get(timeout=120)
    assert first["status"] == "succeeded"
    step = Path(first["out_dir"]) / "plate.step"
    store = worker.data_dir / "store" / "uploads"
    store.mkdir(parents=True)
    shutil.copy(step, store / "plate.step")
    sha = hashlib.sha256(step.read_bytes()).hexdigest()

    def rebuild(engine: str, digest: str = sha) -> dict[str, Any]:
        spec = {
            "name": "rebuilt", "engine": engine,
            "input": {"uri": "store://uploads/plate.step", "sha256": digest, "format": "step"},
            "parts": [{"name": "p", "steps": [
                {"kind": "import", "name": "doc"},
                {"kind": "cylinder", "name": "bore", "radius": 3, "height": 8, "placement": {"position": [30, 20, 0]}},
                {"kind": "boolean", "name": "bored", "operation": "cut", "operands": ["doc", "bore"]}]}],
            "exports": [{"format": "step", "of": "p", "name": "p"}, {"format": "brep", "of": "p", "name": "p"}],
        }  # fmt: skip
        return run_job.apply_async(args=[spec], queue=worker.queue).get(timeout=120)

    results = {engine: rebuild(engine) for engine in ("freecad", "ocp")}
    before = first["manifest"]["parts"]["plate"]["volume"]
    for engine, result in results.items():
        assert result["status"] == "succeeded", result
        after = result["manifest"]["parts"]["p"]["volume"]
        assert after == pytest.approx(before - 3.14159265 * 9 * 8, rel=1e-4), engine  # the bore, nothing else
    text = worker.scrape()
    assert "cadscope_document_cache_hits_total 1.0" in text  # the second engine found it verified and cached
    assert "cadscope_document_cache_misses_total 1.0" in text
    assert 'freecad_document_load_seconds_count{freecad_version="none"' in text  # OCP loaded it ...
    assert 'source="upload"' in text and 'flow_type="upload"' in text  # ... as an upload flow

    tampered = rebuild("freecad", digest=hashlib.sha256(b"another file").hexdigest())
    assert tampered["status"] == "failed" and tampered["error_type"] == "checksum_mismatch"
    text = worker.scrape()
    assert 'cadscope_security_violations_total{severity="critical",violation_type="checksum_mismatch"} 1.0' in text
    # No engine ran for it: the subprocess count is what the three good jobs made.
    assert sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("cadscope_subprocess_outcomes_total{")) == 3  # fmt: skip
    logged = [json.loads(line) for line in worker.log.read_text().splitlines() if '"security_event"' in line]
    assert logged and logged[0]["violation_type"] == "checksum_mismatch"


@pytest.mark.slow
def test_an_fcstd_document_is_loaded_by_freecad(tmp_path, engines):
    saved = tmp_path / "box.FCStd"
    script = ("import FreeCAD; d = FreeCAD.newDocument('src'); b = d.addObject('Part::Box', 'b'); "
              f"b.Length = 20; d.recompute(); d.saveAs({str(saved)!r})")  # fmt: skip
    subprocess.run(["freecadcmd", "-c", script], check=True, capture_output=True, timeout=120)
    wait_until(saved.exists, 5, what="FCStd saved")
    data = saved.read_bytes()
    spec = JobSpec.model_validate({
        "name": "from_fcstd", "engine": "freecad",
        "input": {"uri": "store://box.FCStd", "sha256": hashlib.sha256(data).hexdigest(), "format": "fcstd"},
        "parts": [{"name": "p", "steps": [{"kind": "import", "name": "doc"}]}],
        "exports": [{"format": "brep", "of": "p", "name": "p"}],
    })  # fmt: skip
    obs, registry = _obs()
    path = fetch_document(spec.input, cache=DocumentCache(tmp_path / "cache"), store_root=tmp_path,  # type: ignore[arg-type]
                          observability=obs)  # fmt: skip
    result = run_cad_job(spec, tmp_path / f"out-{uuid.uuid4().hex[:6]}", observability=obs, input_path=path)
    assert result.ok, result.error_message
    assert result.manifest is not None and result.manifest["parts"]["p"]["volume"] == pytest.approx(20 * 10 * 10)
    assert _value(registry, "cadscope_document_load_stage_seconds_count", stage="validate") == 1


@pytest.mark.slow
def test_a_worker_refuses_internal_urls_and_ends_a_trickled_download_at_the_jobs_time_limit(
    start_worker, engines, redis_url, hostile
):  # fmt: skip
    """Through a real worker: an internal URL fails the job as ``bad_uri`` with nothing sent to
    the internal server and nothing about it in the status; a document trickled a byte at a
    time fails at the job's ``timeout_s`` (3 s), not minutes later. The operator allows the
    trickling server's address, so the refusal is the deadline's, not the policy's."""
    from cadscope.workers import app, configure_app, run_job

    configure_app(app, redis_url)
    internal = hostile()
    trickle = hostile("trickle", host="127.0.0.2")
    worker = start_worker(concurrency=1, env={"CADSCOPE_DOCUMENT_ALLOW": "127.0.0.2/32"})

    def job(uri: str, **extra: Any) -> dict[str, Any]:
        spec = {
            "name": "from_url", "engine": "ocp", **extra,
            "input": {"uri": uri, "sha256": hashlib.sha256(DATA).hexdigest(), "format": "step", "size_bytes": 1000},
            "parts": [{"name": "p", "steps": [{"kind": "import", "name": "doc"}]}],
            "exports": [{"format": "step", "of": "p", "name": "p"}],
        }  # fmt: skip
        return run_job.apply_async(args=[spec], queue=worker.queue).get(timeout=120)

    port = internal.httpd.server_address[1]
    refused = job(f"http://2130706433:{port}/latest/meta-data/")
    assert refused["status"] == "failed" and refused["error_type"] == "bad_uri", refused
    assert str(port) not in refused["error_message"] and internal.requests == []

    late = job(trickle.url, timeout_s=3)
    assert late["status"] == "failed" and late["error_type"] == "download_timeout", late
    wait_until(trickle.closed_by_client.is_set, 30, what="the worker hung up on the trickle")
    assert trickle.sent < 1000
    logged = [json.loads(line) for line in worker.log.read_text().splitlines() if '"forbidden_address"' in line]
    assert logged and logged[0]["security_event"] is True  # the operator learns what was refused
