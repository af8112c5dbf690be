"""Infra that is proven: rules and their unit tests through promtool, Alertmanager
through amtool, compose through docker-compose, every dashboard query and alert
expression run against a real Prometheus that scraped a real run, and the API's
own signals (its metrics across several server processes, its event streams).

Grafana and Tempo cannot run here: the dashboard JSON is checked by code and
its queries are executed through Prometheus's HTTP API, as Grafana would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from cadscope.api._red import REDMiddleware
from cadscope.metrics import Catalogue
from cadscope.workers._workload import CRASH, FILLET_TOO_BIG, TEMPLATES

from .conftest import REPO, free_port, wait_until

INFRA = REPO / "infra"
spec = importlib.util.spec_from_file_location("infra_generate", INFRA / "generate.py")
assert spec and spec.loader
generate = importlib.util.module_from_spec(spec)
sys.modules["infra_generate"] = generate  # dataclasses look their module up there
spec.loader.exec_module(generate)

# Series not defined on a registry at import: Prometheus's own, and two made at scrape or first use.
OTHER_METRICS = {"up", "cadscope_queue_messages", "cadscope_progress_events_total"}
LABELS = {
    "flow_type",
    "violation_type",
    "freecad_version",
    "occt_version",
    "operation",
    "feature",
    "solver",
    "provider",
    "model",
    "stage",
    "source",
    "doc_complexity",
    "lcs_count_range",
    "library",
    "property",
    "appearance_type",
    "scope",
    "format",
    "file_size_range",
    "workbench",
    "compatible",
    "engine",
    "reason",
    "instance",
    "queue",
    "status",
    "result",
    "outcome",
    "job",
    "__rate_interval",
    "__range",
}
CAD_PANELS = [  # the CAD fleet's 16 panels, in their order
    "Model Generation Success Rate",
    "P95 Latencies by Flow",
    "Active Flows",
    "AI Provider Performance",
    "Document Operations",
    "OCCT Operations",
    "OCCT Memory Usage",
    "Assembly4 Solver",
    "LCS Resolution",
    "Material Library",
    "Material Application",
    "Topology Hash",
    "Export Validation",
    "Export Duration",
    "Workbench Usage",
    "Worker Resources",
]
API_PANELS = {"API Request Rate", "API Latency", "API Errors", "Active Alerts"}
BOARD = INFRA / "grafana" / "dashboards" / "cadscope-model-generation.json"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is part of the test environment (.ci/run installs it)"
    return path


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_generated_files_are_current():
    for path, text in generate.outputs().items():
        assert path.read_text() == text, f"{path} is stale: run python infra/generate.py"


def _is_ratio(expr: str) -> bool:
    """Whether an alert divides one count by another, itself or through a recording rule."""
    ratios = {r["record"] for r in generate.RECORDING_RULES if " / " in r["expr"]}
    return " / " in expr or any(name in expr for name in ratios)


def test_promtool_checks_and_unit_tests_every_alert():
    """Each alert fires above its threshold and is silent below it; each ratio alert is also
    silent where its ratio is above the threshold but made of too few events (promtool checks
    the ratio's value in that case too, so the guard is what keeps it silent)."""
    rules = INFRA / "prometheus" / "rules" / "cadscope.rules.yml"
    check = _run(_tool("promtool"), "check", "rules", str(rules))
    assert check.returncode == 0, check.stdout + check.stderr
    unit = _run(_tool("promtool"), "test", "rules", "cadscope.rules.test.yml", cwd=INFRA / "prometheus" / "tests")
    assert unit.returncode == 0, unit.stdout + unit.stderr
    tests = yaml.safe_load((INFRA / "prometheus" / "tests" / "cadscope.rules.test.yml").read_text())["tests"]
    alerts = {r["alert"]: r["expr"] for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"]
              if "alert" in r}  # fmt: skip
    for alert, expr in alerts.items():
        cases = [t for t in tests if t["alert_rule_test"][0]["alertname"] == alert]
        fires = [bool(c["alert_rule_test"][0]["exp_alerts"]) for c in cases]
        if _is_ratio(expr):
            assert fires == [True, False, False], f"{alert} is a ratio: it needs a case below its minimum volume"
            assert cases[2]["promql_expr_test"][0]["exp_samples"], alert
        else:
            assert fires == [True, False], alert
    required = {
        "ModelGenerationHighFailureRate",
        "FreeCADWorkerFailure",
        "AIProviderHighErrorRate",
        "ModelGenerationSlow",
        "OCCTBooleanOperationSlow",
        "OCCTHighMemoryUsage",
        "Assembly4SolverSlow",
        "Assembly4ExcessiveIterations",
        "HighRequestLatency",
        "HighErrorRate",
        "InstanceDown",
    }
    assert required <= set(alerts)


def test_the_memory_alert_reads_1_5_gb_in_binary_units_on_a_real_bucket_boundary():
    """Memory is counted in binary units, as ps, Docker and Kubernetes count it: 1.5 GB is 1.5 GiB, and
    the alert's ``le`` is a boundary the memory histogram really exposes."""
    assert generate.THRESHOLDS["occt_memory_bytes"] == 1536 * 2**20
    registry = CollectorRegistry()
    Catalogue(registry).occt_memory.labels("fillet", "0.20.2", "7.6.3").observe(1 << 20)
    assert f'le="{generate.MEMORY_LE}"' in generate_latest(registry).decode()
    alert = next(a for a in generate.ALERTS if a.name == "OCCTHighMemoryUsage")
    assert f'le="{generate.MEMORY_LE}"' in alert.expr and "1.5 GiB" in alert.summary


def test_every_alert_has_severity_summary_description_and_a_runbook_that_exists():
    rules = yaml.safe_load((INFRA / "prometheus" / "rules" / "cadscope.rules.yml").read_text())
    for rule in (r for g in rules["groups"] for r in g["rules"] if "alert" in r):
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert (
            rule["annotations"]["summary"]
            and "$value" in rule["annotations"]["description"]
            or rule["alert"] in {"InstanceDown", "CadscopeWorkersDown"}
        )
        runbook = rule["annotations"]["runbook_url"].rsplit("/docs/", 1)[1]
        assert (REPO / "docs" / runbook).is_file(), runbook


RUNBOOK_SECTIONS = (
    "## What it means for users",
    "## Look first",
    "## Traces",
    "## Likely causes",
    "## Fix",
    "## Escalate",
)


def test_every_runbook_an_on_call_engineer_can_act_on():
    """Each alert's runbook says what users see, which panels and PromQL to look at, which traces
    to pull (TraceQL and a Jaeger search), the causes in CAD terms, the commands that fix them and
    when to escalate; and names the alerts it serves. No stub: every section has substance."""
    rules = yaml.safe_load((INFRA / "prometheus" / "rules" / "cadscope.rules.yml").read_text())
    by_runbook: dict[str, set[str]] = {}
    for rule in (r for g in rules["groups"] for r in g["rules"] if "alert" in r):
        by_runbook.setdefault(rule["annotations"]["runbook_url"].rsplit("/docs/", 1)[1], set()).add(rule["alert"])
    panels = {p["title"] for p in generate.PANELS}
    for runbook, alerts in sorted(by_runbook.items()):
        text = (REPO / "docs" / runbook).read_text()
        for alert in alerts:
            assert alert in text.split("\n", 1)[0], f"{runbook}'s title names {alert}"
        sections = re.split(r"^(?=## )", text, flags=re.M)
        found = {section.split("\n", 1)[0].strip(): section for section in sections if section.startswith("## ")}
        for heading in RUNBOOK_SECTIONS:
            assert heading in found, f"{runbook}: no {heading!r}"
            body = found[heading].split("\n", 1)[1]
            assert len(body.split()) >= 25, f"{runbook}: {heading!r} is a stub"
        assert "```promql" in found["## Look first"], f"{runbook}: no PromQL to look at"
        assert any(f"**{title}**" in found["## Look first"] for title in panels), f"{runbook}: no dashboard panel"
        assert "```traceql" in found["## Traces"] and "Jaeger" in found["## Traces"], f"{runbook}: no trace search"
        assert "```sh" in found["## Fix"] or "```bash" in found["## Fix"], f"{runbook}: no command"


def test_prometheus_alertmanager_and_compose_configs_are_valid():
    check = _run(_tool("promtool"), "check", "config", "--syntax-only", str(INFRA / "prometheus" / "prometheus.yml"))
    assert check.returncode == 0, check.stdout + check.stderr
    am = _run(_tool("amtool"), "check-config", str(INFRA / "alertmanager" / "alertmanager.yml"))
    assert am.returncode == 0, am.stdout + am.stderr
    compose = _run(_tool("docker-compose"), "-f", str(REPO / "docker-compose.yml"), "config")
    assert compose.returncode == 0, compose.stderr
    services = yaml.safe_load(compose.stdout)["services"]
    assert {
        "redis",
        "api",
        "worker-freecad",
        "worker-ocp",
        "prometheus",
        "alertmanager",
        "grafana",
        "otel-collector",
        "tempo",
        "jaeger",
    } <= set(services)
    assert all("healthcheck" in services[name] for name in ("redis", "api", "worker-freecad", "worker-ocp"))
    # Every service that exports spans sends them to the collector's receiver for the protocol it speaks.
    collector = yaml.safe_load((INFRA / "otel-collector" / "config.yml").read_text())
    receivers = collector["receivers"]["otlp"]["protocols"]
    ports = {name: int(receiver["endpoint"].rsplit(":", 1)[1]) for name, receiver in receivers.items()}
    for name in ("api", "worker-freecad", "worker-ocp"):
        env = services[name]["environment"]
        protocol = "http" if env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc").startswith("http") else "grpc"
        endpoint = urllib.parse.urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert (endpoint.hostname, endpoint.port) == ("otel-collector", ports[protocol]), name


def test_prometheus_scrapes_every_metrics_endpoint_of_the_collector():
    """The span metrics (the collector's Prometheus exporter) and the collector's own telemetry."""
    collector = yaml.safe_load((INFRA / "otel-collector" / "config.yml").read_text())
    endpoints = [e["endpoint"] for name, e in collector["exporters"].items() if name.split("/")[0] == "prometheus"]
    endpoints.append(collector["service"]["telemetry"]["metrics"]["address"])
    assert len(endpoints) >= 2
    prometheus = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    for endpoint in endpoints:
        assert f"otel-collector:{endpoint.rsplit(':', 1)[1]}" in targets, endpoint


def test_the_api_image_gives_its_server_processes_one_metrics_directory_of_its_own():
    """Several server processes, one multiprocess directory: not on a volume the API shares."""
    text = (INFRA / "docker" / "Dockerfile.api").read_text()
    command = json.loads(re.search(r"^CMD (.+)$", text, re.M)[1])  # type: ignore[index]
    env = dict(re.findall(r"^ENV (\w+)=(\S+)$", text, re.M))
    assert command[:2] == ["cadscope", "api"] and int(command[command.index("--workers") + 1]) > 1
    directory = env.get("PROMETHEUS_MULTIPROC_DIR")
    assert directory, "the server processes of the API image need a shared metrics directory"
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    assert services["api"]["environment"].get("PROMETHEUS_MULTIPROC_DIR", directory) == directory
    for volume in services["api"].get("volumes", []):
        mount = volume.split(":")[1]
        assert not (directory + "/").startswith(mount.rstrip("/") + "/"), f"{directory} is on the volume {volume}"
    for name, service in services.items():  # wiped at the API's start: nobody else's
        if name != "api":
            assert (service.get("environment") or {}).get("PROMETHEUS_MULTIPROC_DIR") != directory, name


def test_grafana_rate_interval_follows_the_scrape_interval():
    datasources = yaml.safe_load((INFRA / "grafana" / "provisioning" / "datasources" / "datasources.yml").read_text())
    prometheus = next(d for d in datasources["datasources"] if d["type"] == "prometheus")
    config = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    assert prometheus["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values out
    expr = re.sub(r"\{[^}]*\}", "", expr)  # selectors out
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges out
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    keywords = {"sum", "by", "rate", "increase", "histogram_quantile", "and", "or", "absent", "le", "max", "without",
                "label_join", "label_replace", "topk", "on", "ignoring", "group_left", "round"}  # fmt: skip
    return {w for w in words if w not in keywords and ("_" in w or w == "up")}


def _exported_names() -> set[str]:
    registry = CollectorRegistry()
    Catalogue(registry)
    REDMiddleware(app=None, registry=registry)  # type: ignore[arg-type]
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]} | OTHER_METRICS


def test_every_query_names_only_metrics_the_code_exports():
    exported = _exported_names()
    rules = generate.RECORDING_RULES + generate.VERSION_RULES
    recorded = {r["record"] for r in rules}
    exprs = [r["expr"] for r in rules] + [a.expr for a in generate.ALERTS]
    exprs += [t["expr"] for p in generate.PANELS for t in p["targets"]]
    for expr in exprs:
        for name in _metric_names(expr) - recorded - LABELS:
            assert name in exported, f"{name!r} in {expr!r} is not exported by the code"


def _unit(panel: dict[str, Any], ref_id: str) -> str:
    for override in panel["fieldConfig"]["overrides"]:
        if override["matcher"] == {"id": "byFrameRefID", "options": ref_id}:
            return next(p["value"] for p in override["properties"] if p["id"] == "unit")
    return str(panel["fieldConfig"]["defaults"]["unit"])


def test_dashboard_has_the_fleet_panels_variables_and_version_legends():
    board = json.loads(BOARD.read_text())
    titles = [p["title"] for p in board["panels"]]
    assert titles[:16] == CAD_PANELS and API_PANELS <= set(titles[16:])
    variables = ["freecad_version", "occt_version", "flow_type", "baseline", "candidate"]
    assert [v["name"] for v in board["templating"]["list"]] == variables
    for panel, spec_ in zip(board["panels"], generate.PANELS, strict=True):
        for target in panel["targets"]:
            if spec_.get("versions", True) is True:
                assert "$freecad_version" in target["expr"] and "$occt_version" in target["expr"], panel["title"]
                assert "{{freecad_version}}" in target["legendFormat"] and "{{occt_version}}" in target["legendFormat"]
    flow_panels = [p for p in board["panels"] if "model_generation" in json.dumps(p["targets"])]
    assert flow_panels and all("$flow_type" in t["expr"] for p in flow_panels for t in p["targets"])
    panels = {p["title"]: p for p in board["panels"]}
    # 1: an overall series beside the per-flow ones.
    assert any("flow_type," not in t["expr"].split(")")[0] for t in panels["Model Generation Success Rate"]["targets"])
    # 4: a heatmap of latency buckets.
    ai = panels["AI Provider Performance"]
    assert ai["type"] == "heatmap" and all(
        t["format"] == "heatmap" and "sum by (le)" in t["expr"] for t in ai["targets"]
    )
    # 8: iterations are a count, and every legend names the solver.
    solver = panels["Assembly4 Solver"]
    iterations = next(t for t in solver["targets"] if "iterations" in t["expr"])
    assert _unit(solver, iterations["refId"]) == "short"
    assert all("{{solver}}" in t["legendFormat"] for t in solver["targets"])
    # 16: CPU, memory, and restarts as a count.
    resources = panels["Worker Resources"]
    by_metric = {name: t for t in resources["targets"] for name in _metric_names(t["expr"])}
    assert "cadscope_subprocess_cpu_seconds_total" in by_metric
    assert _unit(resources, by_metric["cadscope_subprocess_peak_memory_bytes_bucket"]["refId"]) == "bytes"
    assert _unit(resources, by_metric["freecad_worker_restarts_total"]["refId"]) == "short"
    # The API: the latency panel shows what HighRequestLatency counts; the alerts table, pending and firing.
    # The version comparison row: each of its panels reads both chosen version pairs.
    row = titles.index("Version comparison")
    assert board["panels"][row]["type"] == "row"
    pair_panels = [
        p for p, spec_ in zip(board["panels"], generate.PANELS, strict=True) if spec_.get("versions") == "pair"
    ]
    assert pair_panels == board["panels"][row + 1 :] and len(pair_panels) == 4
    for panel in pair_panels:
        exprs = " ".join(t["expr"] for t in panel["targets"])
        assert '"$baseline"' in exprs and '"$candidate"' in exprs, panel["title"]
    ratios = [t["expr"] for p in pair_panels for t in p["targets"] if " / " in t["expr"]]
    assert {generate.STAGE_P95, generate.OPERATION_P95} <= {r.split("{")[0] for r in ratios}
    latency = panels["API Latency"]
    assert any(generate.SHORT_ROUTES in t["expr"] for t in latency["targets"])
    assert panels["Active Alerts"]["targets"][0]["expr"].endswith("(ALERTS)")


# -- the API's signals: what the request alerts read, and the event streams they leave out ------


def _red_app(registry: CollectorRegistry) -> REDMiddleware:
    """A Starlette app behind the RED middleware: a short route, and an event stream that ends
    as the test says (``done``, ``fail`` mid-stream, or ``hang`` until the client leaves)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    async def events(request: Request) -> Response:
        how = request.path_params["how"]

        async def body():  # type: ignore[no-untyped-def]
            yield b"event: job.submitted\ndata: {}\n\n"
            if how == "fail":
                raise RuntimeError("the progress store went away")
            if how == "hang":
                await asyncio.Event().wait()
            yield b"event: job.finished\ndata: {}\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    async def status(request: Request) -> Response:
        return JSONResponse({"state": "running"})

    return REDMiddleware(Starlette(routes=[Route("/jobs/{how}/events", events), Route("/jobs/{how}", status)]),
                         registry=registry)  # fmt: skip


async def _get(app: REDMiddleware, path: str, *, leave: bool = False, on_body=None) -> None:  # type: ignore[no-untyped-def]
    """One GET through ASGI as uvicorn drives it (spec 2.3: the app listens for the disconnect).
    ``leave``: the client goes away once the first body arrives."""
    gone = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            if on_body:
                on_body()
            if leave:
                gone.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [], "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000)}  # fmt: skip
    await app(scope, receive, send)


def test_event_streams_have_their_own_signals_open_and_ended_early():
    """A stream counts as open while it is served, and one that ends before the server finished it
    counts by why: the client left (a closed tab, a proxy's idle timeout) or the server failed mid-way.
    Both reasons exist at 0 from a route's first stream. A short request is no stream."""
    registry = CollectorRegistry()
    app = _red_app(registry)
    route = "/jobs/{how}/events"

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    while_open: list[float | None] = []
    asyncio.run(
        _get(app, "/jobs/done/events", on_body=lambda: while_open.append(value("http_streams_open", route=route)))
    )
    assert while_open[0] == 1 and value("http_streams_open", route=route) == 0
    for reason in ("client_disconnected", "server_error"):
        assert value("http_stream_errors_total", route=route, reason=reason) == 0, reason
    asyncio.run(_get(app, "/jobs/hang/events", leave=True))
    assert value("http_stream_errors_total", route=route, reason="client_disconnected") == 1
    assert value("http_streams_open", route=route) == 0
    with pytest.raises(RuntimeError, match="progress store"):
        asyncio.run(_get(app, "/jobs/fail/events"))
    assert value("http_stream_errors_total", route=route, reason="server_error") == 1
    assert value("http_streams_open", route=route) == 0
    assert value("http_requests_total", method="GET", route=route, status="200") == 3  # still requests of their route
    asyncio.run(_get(app, "/jobs/x"))
    assert value("http_requests_total", method="GET", route="/jobs/{how}", status="200") == 1
    assert value("http_streams_open", route="/jobs/{how}") is None


def _sample(page: str, name: str, **labels: str) -> float:
    """A sample's value on a /metrics page (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in page.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


SMALL_JOB = {
    "name": "plate",
    "engine": "ocp",
    "parts": [{"name": "plate", "steps": [{"kind": "box", "name": "b", "length": 20, "width": 10, "height": 2}]}],
    "exports": [{"format": "step", "of": "plate", "name": "plate"}],
}


@pytest.mark.slow
def test_an_api_of_several_server_processes_serves_counters_that_never_go_back(tmp_path, redis_server):
    """``cadscope api --workers 3`` as a user starts it, with no PROMETHEUS_MULTIPROC_DIR. Each scrape
    is put on a chosen server process (the others stopped: only it can accept), each process serves
    some, and every page counts every process's requests: exactly the requests made, never fewer than
    the page before. A server process killed with an event stream open keeps its counts, and its
    stream and request no longer show as open once uvicorn has reaped it."""
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path), "CELERY_BROKER_URL": redis_server.url,
           "CELERY_RESULT_BACKEND": redis_server.url, "CADSCOPE_API_TOKEN": "token",
           "CADSCOPE_DATA_DIR": str(tmp_path / "data"), "CADSCOPE_QUEUE": "nobody-consumes"}  # fmt: skip
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp_path / "api.log"
    api = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "cadscope.workers.cli", "api", "--port", str(port), "--workers", "3"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    servers: list[psutil.Process] = []

    def alone(server: psutil.Process) -> list[psutil.Process]:
        """Stop every other server process, and wait until the kernel has stopped them."""
        others = [s for s in servers if s.pid != server.pid and s.is_running()]
        for other in others:
            other.send_signal(signal.SIGSTOP)
        wait_until(lambda: all(o.status() == psutil.STATUS_STOPPED for o in others), 10, what="stopped")
        return others

    def resume(others: list[psutil.Process]) -> None:
        for other in others:
            other.send_signal(signal.SIGCONT)

    try:
        directory = Path(wait_until(lambda: next(tmp_path.glob("cadscope-api-metrics-*"), None), 30,
                                    what="the API's metrics directory"))  # fmt: skip

        def ready() -> list[psutil.Process]:
            children = [c for c in psutil.Process(api.pid).children() if "spawn_main" in " ".join(c.cmdline())]
            files = {p.name for p in directory.iterdir()}
            # Each server process's files are named by its pid and start time.
            started = [c for c in children if any(f.startswith(f"gauge_livesum_{c.pid}-") for f in files)]
            return started if len(started) == 3 else []

        servers = wait_until(ready, 60, what="three server processes")

        def counted(route: str, count: int, method: str = "GET", status: str = "200") -> None:
            """Wait until the files hold ``count`` requests of ``route``: a server process counts a request
            after its response went out, and must not be stopped in between."""
            files = CollectorRegistry()
            MultiProcessCollector(files, path=str(directory))
            labels = {"method": method, "route": route, "status": status}
            wait_until(lambda: files.get_sample_value("http_requests_total", labels) == count, 30, what=route)

        health = scrapes = 0
        for _round in range(2):
            for server in servers:
                others = alone(server)
                try:
                    for _ in range(2):
                        assert httpx.get(f"{url}/health/live", timeout=30).status_code == 200
                        health += 1
                    counted("/health/live", health)
                    page = httpx.get(f"{url}/metrics", timeout=30).text
                    scrapes += 1
                    counted("/metrics", scrapes)
                finally:
                    resume(others)
                assert _sample(page, "http_requests_total", method="GET", route="/health/live", status="200") == health
                assert _sample(page, "http_requests_total", method="GET", route="/metrics", status="200") == scrapes - 1
        files = {p.name for p in directory.iterdir()}
        served = all(any(f.startswith(f"counter_{s.pid}-") for f in files) for s in servers)
        assert served, "every server process served requests"

        # A stream held open by one server process, which then dies.
        job = httpx.post(f"{url}/v1/jobs", json=SMALL_JOB, headers={"Authorization": "Bearer token"}, timeout=30)
        assert job.status_code == 202, job.text
        counted("/v1/jobs", 1, "POST", "202")
        victim = servers[0]
        others = alone(victim)
        try:
            client = socket.create_connection(("127.0.0.1", port), timeout=30)
            client.sendall(f"GET /v1/jobs/{job.json()['job_id']}/events HTTP/1.1\r\nHost: api\r\n"
                           "Authorization: Bearer token\r\n\r\n".encode())  # fmt: skip
            received = b""
            while b"job.submitted" not in received:
                received += client.recv(4096)
        finally:
            resume(others)
        before = httpx.get(f"{url}/metrics", timeout=30).text
        assert _sample(before, "http_streams_open", route="/v1/jobs/{job_id}/events") == 1
        victim.send_signal(signal.SIGKILL)
        client.close()

        def settled() -> str | None:
            page = httpx.get(f"{url}/metrics", timeout=30).text
            gone = _sample(page, "http_streams_open", route="/v1/jobs/{job_id}/events") == 0
            return page if gone and _sample(page, "http_requests_in_flight") == 1 else None  # this scrape alone

        after = wait_until(settled, 60, interval=0.5, what="the killed process's stream no longer open")
        for key in ({"method": "GET", "route": "/health/live", "status": "200"},
                    {"method": "POST", "route": "/v1/jobs", "status": "202"}):  # fmt: skip
            assert _sample(after, "http_requests_total", **key) == _sample(before, "http_requests_total", **key) > 0
    finally:
        for server in servers:
            if server.is_running():
                server.send_signal(signal.SIGCONT)
        api.terminate()
        try:
            api.wait(30)
        except subprocess.TimeoutExpired:
            api.kill()
            api.wait()
    assert not list(tmp_path.glob("cadscope-api-metrics-*")), "the temporary directory is removed at exit"


# -- a real Prometheus over a real run --------------------------------------------------------


def _job(template: dict[str, Any], engine: str) -> dict[str, Any]:
    job = {**copy.deepcopy(template), "engine": engine}
    if engine == "ocp":  # OBJ is a FreeCAD (Mesh workbench) export; OCP writes STL instead
        job["exports"] = [{**e, "format": "stl" if e["format"] == "obj" else e["format"]} for e in job["exports"]]
    return job


def _follow(url: str, headers: dict[str, str]) -> list[str]:
    """Follow a job's event stream to its end, as a dashboard client would; the event types."""
    types = []
    with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(30, read=300)) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: "):
                types.append(line.removeprefix("event: "))
    return types


PROMPT = "60 x 40 x 8 mm plate with 1 mm fillets in aluminium as STEP"


@pytest.mark.slow
def test_dashboards_and_alerts_against_a_real_prometheus(  # type: ignore[no-untyped-def]
    tmp_path, start_worker, start_api, engines, otlp_receiver
):
    """A real Prometheus (1 s scrapes and evaluations) over a traced run of both engines.

    First a healthy run: every template that should succeed on both engines, two prompts through
    the AI flow, two clients following each job's event stream to its end, and enough short
    requests for the API's volume guards. No alert may be pending or firing at any evaluation, the
    latency alert included, though the streams' own route reads seconds. Then the deliberate
    failures, enough of them to pass the failure-rate alert's minimum volume: it goes pending.
    Then every panel query must return data for every version pair, and every panel whose metric
    carries ``flow_type`` must filter by it."""
    otlp = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "200"}  # fmt: skip
    worker = start_worker(env=otlp)
    api = start_api(worker, env=otlp)
    api_port = urllib.parse.urlparse(api.url).port
    worker_port = urllib.parse.urlparse(worker.metrics_url).port
    config = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config.pop("alerting")
    config["rule_files"] = [str(INFRA / "prometheus" / "rules" / "cadscope.rules.yml")]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["cadscope-worker"]["static_configs"] = [{"targets": [f"127.0.0.1:{worker_port}"]}]
    jobs["cadscope-api"]["static_configs"] = [{"targets": [f"127.0.0.1:{api_port}"]}]
    config["scrape_configs"] = [jobs["cadscope-worker"], jobs["cadscope-api"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prometheus = subprocess.Popen(  # noqa: S603
        [
            _tool("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("wb"),
    )
    url = f"http://127.0.0.1:{port}"

    def query(expr: str) -> list[dict]:
        body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=30).json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def submit(path: str, body: dict[str, Any]) -> str:
        response = httpx.post(f"{api.url}{path}", json=body, headers=api.headers(), timeout=30)
        assert response.status_code == 202, response.text
        return str(response.json()["job_id"])

    def status(job_id: str) -> dict[str, Any]:
        return dict(httpx.get(f"{api.url}/v1/jobs/{job_id}", headers=api.headers(), timeout=30).json())

    def run(specs: list[dict[str, Any]], prompts: list[dict[str, str]], followers: int) -> list[dict[str, Any]]:
        """Submit, follow each job's stream to its end (``followers`` clients a job, else poll), statuses."""
        ids = [submit("/v1/jobs", s) for s in specs] + [submit("/v1/prompts", p) for p in prompts]
        if followers:
            with concurrent.futures.ThreadPoolExecutor(len(ids) * followers) as pool:
                streams = [
                    pool.submit(_follow, f"{api.url}/v1/jobs/{i}/events", api.headers())
                    for i in ids
                    for _ in range(followers)
                ]
                assert all(f.result()[-1] == "job.finished" for f in streams)
        for job_id in ids:
            wait_until(lambda job_id=job_id: status(job_id).get("state") == "finished", 300, interval=0.5, what=job_id)
        return [status(job_id) for job_id in ids]

    def evaluations() -> None:
        """Wait until the alerting rules have been evaluated twice more (on what was scraped by then)."""

        def last() -> str:
            groups = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
            return str(next(g["lastEvaluation"] for g in groups if g["name"] == "cadscope-alerts"))

        for _ in range(2):
            seen = last()
            wait_until(lambda seen=seen: last() != seen, 30, interval=0.2, what="a rule evaluation")

    try:
        wait_until(lambda: _ready(url), 60, what="prometheus ready")
        wait_until(lambda: len(query("up == 1")) == 2, 30, what="first scrapes")
        # A client asking for a job that expired (404), seen by Prometheus before the run: the series the
        # status polls add to exists, so they all count as increases (a series' first value never does).
        missing = httpx.get(f"{api.url}/v1/jobs/job-00000000000000000000", headers=api.headers(), timeout=10)
        assert missing.status_code == 404
        wait_until(lambda: query('http_request_duration_seconds_count{route="/v1/jobs/{job_id}"}'), 30, what="404")
        evaluations()
        healthy = [t for t in TEMPLATES if not t.get("expect_failure")]
        started = time.monotonic()
        results = run([_job(t, e) for t in healthy for e in ("freecad", "ocp")],
                      [{"prompt": PROMPT, "engine": e} for e in ("freecad", "ocp")], followers=2)  # fmt: skip
        assert all(r["status"] == "succeeded" for r in results), results
        for poll in range(generate.MIN_REQUESTS + 10):  # clients polling their jobs: enough for the guard
            status(results[poll % len(results)]["job_id"])
        guard = f"{generate.SHORT_REQUESTS_5M} >= {generate.MIN_REQUESTS}"
        wait_until(lambda: query(guard), 30, interval=0.5, what="Prometheus has seen the short requests")
        evaluations()

        # Nothing pending or firing at any evaluation of the healthy run, nor now.
        seconds = int(time.monotonic() - started)
        raised = query(f"count by (alertname, alertstate) (count_over_time(ALERTS[{seconds}s]))")
        assert not raised, [r["metric"] for r in raised]
        for alert in generate.ALERTS:
            assert not query(alert.expr), alert.name
        # ... though the streams' own route is slow by the latency metric: the alert leaves it out, by name.
        stream = f'route="{generate.STREAM_ROUTES[0]}"'
        stream_mean = query(f"sum(rate(http_request_duration_seconds_sum{{{stream}}}[5m]))"
                            f" / sum(rate(http_request_duration_seconds_count{{{stream}}}[5m]))")  # fmt: skip
        assert float(stream_mean[0]["value"][1]) > generate.THRESHOLDS["http_latency_avg_s"]
        streamed = {r["metric"]["route"] for r in query("group by (route) (http_streams_open)")}
        assert streamed == set(generate.STREAM_ROUTES)

        # The deliberate failures, enough on FreeCAD to pass the minimum volume (one of each on OCP shows its
        # failure series), and the healthy jobs again so that rates rise.
        # 24 failures and the healthy jobs: well past the alert's minimum volume of 20 flows in 5 minutes
        # (increase() over a window that starts inside the run can read a little under the count).
        failing = [_job(t, "freecad") for t in (FILLET_TOO_BIG, CRASH) for _ in range(12)]
        failing += [_job(t, "ocp") for t in (FILLET_TOO_BIG, CRASH)]
        results = run([_job(t, e) for t in healthy for e in ("freecad", "ocp")] + failing, [], followers=0)
        assert sum(r["status"] != "succeeded" for r in results) == len(failing)

        def failure_alert() -> bool:
            alerts = httpx.get(f"{url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
            return any(a["labels"]["alertname"] == "ModelGenerationHighFailureRate" for a in alerts)

        wait_until(failure_alert, 90, interval=0.5, what="ModelGenerationHighFailureRate pending")

        pairs = {
            (r["metric"]["freecad_version"], r["metric"]["occt_version"])
            for r in query("group by (freecad_version, occt_version) (model_generation_started_total)")
        }
        assert ("0.20.2", "7.6.3") in pairs and any(f == "none" and o.startswith("8.0") for f, o in pairs)
        board = json.loads(BOARD.read_text())
        # The version comparison row's variables: the versions the recording rules list (OCCT 7.6.3 first).
        wait_until(lambda: len(query(f"group by (version) ({generate.STAGE_P95})")) >= 2, 90, interval=1,
                   what="per-version recording rules")  # fmt: skip
        chosen = sorted(r["metric"]["version"] for r in query(f"group by (version) ({generate.STAGE_P95})"))
        chosen.sort(key=lambda version: not version.endswith("/7.6.3"))
        empty, unfiltered = [], []
        for panel, spec_ in zip(board["panels"], generate.PANELS, strict=True):
            versions = spec_.get("versions", True)
            for freecad, occt in sorted(pairs) if versions is True else [("", "")]:
                for target in panel["targets"]:
                    # As Grafana formats a regex variable: dots escaped for PromQL's string syntax.
                    expr = (
                        target["expr"]
                        .replace("$baseline", chosen[0])
                        .replace("$candidate", chosen[1])
                        .replace("$freecad_version", freecad.replace(".", "\\\\."))
                        .replace("$occt_version", occt.replace(".", "\\\\."))
                        .replace("$flow_type", ".*")
                        .replace("$__rate_interval", "2m")
                        .replace("$__range", "10m")
                    )
                    result = query(expr)
                    finite = [r for r in result if not math.isnan(float(r["value"][1]))]
                    if not finite:
                        empty.append((panel["title"], freecad, occt, target["refId"]))
            for target in panel["targets"]:
                names = "|".join(_metric_names(target["expr"]) & _exported_names())
                if names and query(f'count({{__name__=~"{names}", flow_type!=""}})'):
                    if '$flow_type"' not in target["expr"]:
                        unfiltered.append((panel["title"], target["refId"]))
        assert not empty, f"panels without data: {empty}"
        assert not unfiltered, f"panels whose metric has flow_type, not filtered by it: {unfiltered}"

        for alert in generate.ALERTS:
            query(alert.expr)  # evaluates without error (status success is asserted)
        rules = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
        # The fleet's baseline is one version pair: the one that ran the most flows.
        assert len(query(generate.BASELINE_VERSION)) == 1
        _compare_from_prometheus(url, query, tmp_path, sorted(pairs))
    finally:
        prometheus.terminate()
        prometheus.wait(30)


def _compare_from_prometheus(url: str, query, tmp_path: Path, pairs: list[tuple[str, str]]) -> None:  # type: ignore[no-untyped-def]
    """``cadscope compare --prometheus`` on the histograms this Prometheus scraped: the sizes and
    quantiles it reports are the ones PromQL computes from the same buckets."""
    from cadscope.workers.cli import main

    occt = {o for _, o in pairs}
    base, cand = "7.6.3", next(o for o in sorted(occt) if o.startswith("8.0"))
    report_file = tmp_path / "compare.json"
    argv = ["compare", "--prometheus", url, "--baseline", f'occt_version="{base}"',
            "--candidate", f'occt_version="{cand}"', "--range", "15m", "--json", str(report_file)]  # fmt: skip
    assert main(argv) in (0, 1)
    report = json.loads(report_file.read_text())
    features = report["features"]
    assert {"flow", "stage:generate", "occt.boolean[cut]", "export[step]"} <= set(features)
    assert all(f["method"] == "buckets" for f in features.values())
    for version, side in ((base, "reference"), (cand, "current")):
        assert report[side]["source"] == "prometheus" and report[side]["jobs"] > 0
        selector = f'occt_version="{version}", operation="cut"'
        # histogram_quantile over the same increase(): the report's p95 and count are PromQL's. Asked a
        # moment later, increase() extrapolates over a slightly different stretch: equal within that.
        count = query(f"sum(increase(occt_boolean_duration_seconds_count{{{selector}}}[15m]))")
        buckets = f"sum by (le) (increase(occt_boolean_duration_seconds_bucket{{{selector}}}[15m]))"
        p95 = query(f"histogram_quantile(0.95, {buckets})")
        cut = features["occt.boolean[cut]"]
        assert cut[f"{side}_size"] == pytest.approx(float(count[0]["value"][1]), abs=1, rel=0.05)
        assert cut["p95_s"][side] == pytest.approx(float(p95[0]["value"][1]), rel=1e-3)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
