"""Infra that is proven: rules and their unit tests through promtool, Alertmanager
through amtool, compose through docker-compose, and every dashboard query and
alert expression run against a real Prometheus that scraped a real run.

Grafana and Tempo cannot run here: the dashboard JSON is checked by code and
its queries are executed through Prometheus's HTTP API, as Grafana would.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from cadscope.metrics import Catalogue
from cadscope.workers._workload import TEMPLATES

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
# Panels whose data only exists once the AI flow runs (issue 8); exempt from "returns data".
AI_PANELS = {"AI Provider Performance"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is part of the test environment (.ci/run installs it)"
    return path


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_generated_files_are_current():
    for path, text in generate.outputs().items():
        assert path.read_text() == text, f"{path} is stale: run python infra/generate.py"


def test_promtool_checks_and_unit_tests_every_alert():
    rules = INFRA / "prometheus" / "rules" / "cadscope.rules.yml"
    check = _run(_tool("promtool"), "check", "rules", str(rules))
    assert check.returncode == 0, check.stdout + check.stderr
    unit = _run(_tool("promtool"), "test", "rules", "cadscope.rules.test.yml", cwd=INFRA / "prometheus" / "tests")
    assert unit.returncode == 0, unit.stdout + unit.stderr
    tests = yaml.safe_load((INFRA / "prometheus" / "tests" / "cadscope.rules.test.yml").read_text())["tests"]
    alerts = [r["alert"] for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"] if "alert" in r]
    for alert in alerts:
        cases = [t for t in tests if t["alert_rule_test"][0]["alertname"] == alert]
        assert [bool(c["alert_rule_test"][0]["exp_alerts"]) for c in cases] == [True, False], alert
    seed = {
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
    assert seed <= set(alerts)


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


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values out
    expr = re.sub(r"\{[^}]*\}", "", expr)  # selectors out
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges out
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    keywords = {"sum", "by", "rate", "increase", "histogram_quantile", "and", "or", "absent", "le", "max", "without"}
    return {w for w in words if w not in keywords and ("_" in w or w == "up")}


def _exported_names() -> set[str]:
    from cadscope.api._red import REDMiddleware

    registry = CollectorRegistry()
    Catalogue(registry)
    REDMiddleware(app=None, registry=registry)  # type: ignore[arg-type]
    names = {name for sample_names in registry._collector_to_names.values() for name in sample_names}  # noqa: SLF001
    return names | OTHER_METRICS


def test_every_query_names_only_metrics_the_code_exports():
    exported = _exported_names()
    recorded = {r["record"] for r in generate.RECORDING_RULES}
    exprs = [r["expr"] for r in generate.RECORDING_RULES] + [a.expr for a in generate.ALERTS]
    exprs += [t["expr"] for p in generate.PANELS for t in p["targets"]]
    for expr in exprs:
        for name in _metric_names(expr) - recorded - LABELS:
            assert name in exported, f"{name!r} in {expr!r} is not exported by the code"


def test_dashboard_has_the_seed_panels_variables_and_version_legends():
    board = json.loads((INFRA / "grafana" / "dashboards" / "cadscope-model-generation.json").read_text())
    assert len(board["panels"]) == 16
    assert [v["name"] for v in board["templating"]["list"]] == ["freecad_version", "occt_version", "flow_type"]
    for panel in board["panels"]:
        for target in panel["targets"]:
            if panel["title"] in AI_PANELS:
                continue  # provider metrics carry no engine versions
            assert "$freecad_version" in target["expr"] and "$occt_version" in target["expr"], panel["title"]
            assert "{{freecad_version}}" in target["legendFormat"] and "{{occt_version}}" in target["legendFormat"]
    flow_panels = [p for p in board["panels"] if "model_generation" in json.dumps(p["targets"])]
    assert flow_panels and all("$flow_type" in t["expr"] for p in flow_panels for t in p["targets"])


@pytest.mark.slow
def test_dashboards_and_alerts_against_a_real_prometheus(tmp_path, start_worker, start_api, engines):
    worker = start_worker()
    api = start_api(worker)
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
    try:
        wait_until(lambda: _ready(url), 60, what="prometheus ready")

        def query(expr: str) -> list[dict]:
            body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=30).json()
            assert body["status"] == "success", (expr, body)
            return body["data"]["result"]

        wait_until(lambda: query('up{job="cadscope-worker"} == 1'), 30, what="first scrape")
        # Two waves: the first creates every series, the second makes rate() see increases.
        for _wave in range(2):
            job_ids = []
            for template in TEMPLATES:
                for engine in ("freecad", "ocp"):
                    spec_ = {**template, "engine": engine}
                    if engine == "ocp":
                        spec_["exports"] = [
                            {**e, "format": "stl" if e["format"] == "obj" else e["format"]} for e in template["exports"]
                        ]
                    response = httpx.post(f"{api.url}/v1/jobs", json=spec_, headers=api.headers(), timeout=30)
                    assert response.status_code == 202, response.text
                    job_ids.append(response.json()["job_id"])
            for job_id in job_ids:
                wait_until(
                    lambda job_id=job_id: (
                        httpx.get(f"{api.url}/v1/jobs/{job_id}", headers=api.headers(), timeout=10).json().get("state")
                        == "finished"
                    ),
                    300,
                    interval=0.5,
                    what=job_id,
                )
            time.sleep(3)  # a few scrapes after the last job
        pairs = {
            (r["metric"]["freecad_version"], r["metric"]["occt_version"])
            for r in query("group by (freecad_version, occt_version) (model_generation_started_total)")
        }
        assert ("0.20.2", "7.6.3") in pairs and any(f == "none" and o.startswith("8.0") for f, o in pairs)

        board = json.loads((INFRA / "grafana" / "dashboards" / "cadscope-model-generation.json").read_text())
        empty = []
        for panel in board["panels"]:
            for freecad, occt in sorted(pairs):
                for target in panel["targets"]:
                    # As Grafana formats a regex variable: dots escaped for PromQL's string syntax.
                    expr = (
                        target["expr"]
                        .replace("$freecad_version", freecad.replace(".", "\\\\."))
                        .replace("$occt_version", occt.replace(".", "\\\\."))
                        .replace("$flow_type", ".*")
                        .replace("$__rate_interval", "2m")
                        .replace("$__range", "10m")
                    )
                    result = query(expr)
                    finite = [r for r in result if not math.isnan(float(r["value"][1]))]
                    if not finite and panel["title"] not in AI_PANELS:
                        empty.append((panel["title"], freecad, occt, target["refId"]))
        assert not empty, f"panels without data: {empty}"

        for alert in generate.ALERTS:
            query(alert.expr)  # evaluates without error (status success is asserted)
        rules = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
        # The deliberate failures really show: the failure-rate alert is pending or firing.
        alerts = {
            a["labels"]["alertname"] for a in httpx.get(f"{url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        }
        assert "ModelGenerationHighFailureRate" in alerts
    finally:
        prometheus.terminate()
        prometheus.wait(30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
