"""Render the Grafana dashboard's panels to a PNG, without Grafana.

Each panel's queries are run against a real Prometheus, as Grafana would run them
(the dashboard's variables set to "All", ``$__rate_interval`` to the given
window), and plotted with matplotlib in the dashboard's own layout.

Two ways to run it:

    # a real run on this machine first: a worker and the API (``cadscope run``, both
    # engines), a Prometheus scraping them, AI prompts, event streams and failing jobs
    python infra/render_dashboard.py --run --out docs/images/dashboard.png

    # or the panels of a Prometheus you already have, over its last 15 minutes
    python infra/render_dashboard.py --prometheus http://127.0.0.1:9090 --range 15m --out dashboard.png

``--run`` needs ``prometheus`` on the PATH, and FreeCAD (``freecadcmd``) and OCP
for the run itself, as the test suite does.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

INFRA = Path(__file__).resolve().parent
BOARD = INFRA / "grafana" / "dashboards" / "cadscope-model-generation.json"
PROMPT = "60 x 40 x 8 mm plate with 1 mm fillets in aluminium as STEP"
_UNITS = {"s": 1, "m": 60, "h": 3600}


def seconds(text: str) -> int:
    """``90s``, ``15m``, ``1h`` (or a number of seconds) as seconds."""
    match = re.fullmatch(r"([0-9]+)([smh]?)", text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 1h)")
    return int(match.group(1)) * _UNITS[match.group(2) or "s"]


@dataclass
class Panel:
    """What one panel showed: its series (legend, times, values) or table rows."""

    title: str
    kind: str
    series: list[tuple[str, list[float], list[float]]] = field(default_factory=list)
    rows: list[dict[str, str]] = field(default_factory=list)

    @property
    def has_data(self) -> bool:
        if self.kind == "row":
            return True  # a row is a heading: it has nothing to show
        return bool(self.rows) or any(any(math.isfinite(v) for v in values) for _, _, values in self.series)


# The version comparison row's two variables: versions the per-version recording rule lists.
VERSIONS_QUERY = "group by (version) (cadscope:version_stage_duration_seconds:p95_30m)"


def _expr(expr: str, rate_interval: str, range_s: int, chosen: tuple[str, str] = ("", "")) -> str:
    # As Grafana fills them with every variable set to "All" (its allValue, .*), and the version
    # comparison row's two with the versions chosen.
    for name in ("freecad_version", "occt_version", "flow_type"):
        expr = expr.replace(f"${name}", ".*")
    expr = expr.replace("$baseline", chosen[0]).replace("$candidate", chosen[1])
    return expr.replace("$__rate_interval", rate_interval).replace("$__range", f"{range_s}s")


def choose_versions(versions: list[str]) -> tuple[str, str]:
    """The baseline and the candidate for the version row: the oldest OCCT first (``fc/occt`` labels)."""

    def key(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", version.rsplit("/", 1)[-1]))

    ordered = sorted(versions, key=key)
    return (ordered[0], ordered[-1]) if ordered else ("", "")


def _legend(template: str, labels: dict[str, str]) -> str:
    if not template:
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()


def query_panels(
    prometheus: str, start: float, end: float, *, rate_interval: str = "1m", board: Path = BOARD
) -> list[Panel]:
    """Every panel's queries over ``[start, end]`` (a table's at ``end``), as Grafana runs them."""
    panels = []
    step = max(1.0, round((end - start) / 120, 1))
    with httpx.Client(base_url=prometheus, timeout=60) as client:

        def get(path: str, **params: Any) -> list[dict[str, Any]]:
            body = client.get(path, params=params).json()
            if body.get("status") != "success":
                raise RuntimeError(f"Prometheus refused {params.get('query')!r}: {body.get('error')}")
            return list(body["data"]["result"])

        chosen = choose_versions(
            [r["metric"].get("version", "") for r in get("/api/v1/query", query=VERSIONS_QUERY, time=end)]
        )
        for spec in json.loads(board.read_text())["panels"]:
            panel = Panel(spec["title"], spec["type"])
            for target in spec["targets"]:
                expr = _expr(target["expr"], rate_interval, int(end - start), chosen)
                if spec["type"] == "table":
                    for result in get("/api/v1/query", query=expr, time=end):
                        panel.rows.append({**result["metric"], "value": result["value"][1]})
                    continue
                for result in get("/api/v1/query_range", query=expr, start=start, end=end, step=step):
                    times = [float(t) for t, _ in result["values"]]
                    values = [float(v) for _, v in result["values"]]
                    panel.series.append((_legend(target.get("legendFormat", ""), result["metric"]), times, values))
            panel.series.sort(key=lambda s: s[0])
            panels.append(panel)
    return panels


def draw(panels: list[Panel], out: Path, *, board: Path = BOARD, title: str = "", dpi: int = 38) -> None:
    """The panels in the dashboard's grid (24 columns), one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layout = [spec["gridPos"] for spec in json.loads(board.read_text())["panels"]]
    # One time axis for every panel, as on the dashboard: minutes since the first sample of any.
    origin = min((t[0] for p in panels for _, t, _ in p.series if t), default=0.0)
    span = (max((t[-1] for p in panels for _, t, _ in p.series if t), default=origin + 60) - origin) / 60
    rows = max(g["y"] + g["h"] for g in layout)
    figure = plt.figure(figsize=(20, rows * 0.42), facecolor="#111217")
    grid = figure.add_gridspec(rows, 24, hspace=0.4, wspace=0.4, left=0.02, right=0.99, top=0.985, bottom=0.01)
    if title:
        figure.suptitle(title, color="#d8d9da", fontsize=15, y=0.997)
    for panel, pos in zip(panels, layout, strict=True):
        if panel.kind == "row":
            figure.text(0.02 + 0.97 * pos["x"] / 24, 0.985 - 0.975 * (pos["y"] + 0.5) / rows, panel.title,
                        color="#d8d9da", fontsize=14, weight="bold", va="center")  # fmt: skip
            continue
        axes = figure.add_subplot(grid[pos["y"] + 1 : pos["y"] + pos["h"], pos["x"] : pos["x"] + pos["w"]])
        axes.set_facecolor("#181b1f")
        axes.set_title(panel.title, color="#d8d9da", fontsize=12, loc="left")
        axes.tick_params(colors="#8e8e8e", labelsize=8)
        for spine in axes.spines.values():
            spine.set_color("#2c3235")
        if panel.kind == "table":
            _table(axes, panel)
        elif panel.kind == "heatmap":
            _heatmap(axes, panel, origin)
        else:
            _lines(axes, panel, origin)
        if panel.kind != "table" and panel.has_data:
            axes.set_xlim(0, span)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=dpi, facecolor=figure.get_facecolor())
    plt.close(figure)


def _no_data(axes: Any) -> None:
    axes.text(0.5, 0.5, "No data", color="#8e8e8e", ha="center", va="center", transform=axes.transAxes)


def _lines(axes: Any, panel: Panel, origin: float) -> None:
    if not panel.has_data:
        return _no_data(axes)
    for legend, times, values in panel.series[:12]:
        axes.plot([(t - origin) / 60 for t in times], values, linewidth=1.4, label=legend[:60])
    axes.set_xlabel("minutes", color="#8e8e8e", fontsize=8)
    axes.legend(fontsize=7, loc="upper left", framealpha=0.3, labelcolor="#d8d9da", facecolor="#181b1f", ncol=1)
    axes.grid(color="#2c3235", linewidth=0.5)


def _heatmap(axes: Any, panel: Panel, origin: float) -> None:
    import numpy

    if not panel.has_data:
        return _no_data(axes)
    buckets = sorted((math.inf if legend == "+Inf" else float(legend), times, values)
                     for legend, times, values in panel.series)  # fmt: skip
    columns = sorted({t for _, times, _ in buckets for t in times})
    rows = []
    for _, times, values in buckets:
        at = dict(zip(times, values, strict=True))
        rows.append([at.get(t, 0.0) if math.isfinite(at.get(t, 0.0)) else 0.0 for t in columns])
    # Counts per bucket, not cumulative: each row minus the one below it; empty cells not drawn.
    cells = numpy.array([[r - (rows[i - 1][j] if i else 0.0) for j, r in enumerate(row)] for i, row in enumerate(rows)])
    extent = ((columns[0] - origin) / 60, (columns[-1] - origin) / 60, -0.5, len(rows) - 0.5)
    axes.imshow(numpy.ma.masked_less_equal(cells, 0), aspect="auto", origin="lower", cmap="YlOrRd",
                interpolation="nearest", extent=extent)  # fmt: skip
    axes.set_xlabel("minutes", color="#8e8e8e", fontsize=8)
    labels = [("+Inf" if math.isinf(le) else f"{le:g}") for le, _, _ in buckets]
    axes.set_yticks(range(len(labels)), labels)
    axes.set_ylabel("latency bucket (s)", color="#8e8e8e", fontsize=8)


def _table(axes: Any, panel: Panel) -> None:
    axes.axis("off")
    if not panel.rows:
        return _no_data(axes)
    columns = [c for c in ("alertname", "alertstate", "severity", "value") if any(c in r for r in panel.rows)]
    cells = [[row.get(c, "") for c in columns] for row in panel.rows[:8]]
    table = axes.table(cellText=cells, colLabels=columns, loc="upper left", cellLoc="left")
    table.set_fontsize(10)
    for cell in table.get_celld().values():
        cell.set_facecolor("#181b1f")
        cell.set_edgecolor("#2c3235")
        cell.get_text().set_color("#d8d9da")


# -- a real run, scraped by a real Prometheus -----------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate: Any, timeout: float, what: str, interval: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@contextmanager
def prometheus(workdir: Path, targets: dict[str, str]) -> Iterator[str]:
    """A Prometheus of its own (1 s scrapes and rule evaluations, the project's rules) scraping
    ``targets`` (job name to ``host:port``), as the project's prometheus.yml configures it."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not on the PATH (Debian: apt-get install prometheus)")
    config = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config.pop("alerting", None)
    config["rule_files"] = [str(INFRA / "prometheus" / "rules" / "cadscope.rules.yml")]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    config["scrape_configs"] = []
    for name, target in targets.items():
        job = copy.deepcopy(jobs[name])
        job["static_configs"] = [{"targets": [target]}]
        config["scrape_configs"].append(job)
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    proc = subprocess.Popen(  # noqa: S603
        [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(workdir / "prometheus.log").open("wb"), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None

        _wait(ready, 60, "Prometheus ready")
        if proc.poll() is not None:
            raise RuntimeError(f"Prometheus exited {proc.returncode}; see {workdir / 'prometheus.log'}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _follow(url: str, headers: dict[str, str]) -> str:
    last = ""
    with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(30, read=300)) as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                last = line.removeprefix("event: ")
    return last


def record_run(workdir: Path, *, jobs: int = 14, log: Any = None) -> tuple[str, float, float, Any]:
    """A traced run on this machine, scraped as it goes: ``cadscope run`` on both engines (the
    built-in workload), then AI prompts followed by two event streams each, polls of a job that
    is not there (404), and failing jobs on FreeCAD, enough for the failure-rate alert.

    A context manager's worth of processes: returns ``(prometheus_url, start, end, stop)``, and
    ``stop()`` ends them all.
    """
    from cadscope.workers._workload import CRASH, FILLET_TOO_BIG, TEMPLATES, workload

    log = log or sys.stderr
    workdir.mkdir(parents=True, exist_ok=True)
    metrics_port, api_port = _free_port(), _free_port()
    scraping = prometheus(workdir, {"cadscope-worker": f"127.0.0.1:{metrics_port}",
                                    "cadscope-api": f"127.0.0.1:{api_port}"})  # fmt: skip
    url = scraping.__enter__()
    run_log = (workdir / "run.log").open("w+")
    run = subprocess.Popen(  # noqa: S603
        [sys.executable, "-P", "-m", "cadscope.workers.cli", "run", "--jobs", str(jobs), "--engine", "all",
         "--out", str(workdir / "out"), "--metrics-port", str(metrics_port), "--api-port", str(api_port),
         "--keep-serving"],
        stdout=run_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, "CADSCOPE_API_MAX_STREAMS": "100"},
    )  # fmt: skip

    def stop() -> None:
        if run.poll() is None:
            run.send_signal(signal.SIGTERM)
            try:
                run.wait(120)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait()
        scraping.__exit__(None, None, None)

    try:
        start = time.time()
        print(f"render_dashboard: cadscope run --jobs {jobs} (log: {workdir / 'run.log'})", file=log)

        def serving() -> str | None:
            if run.poll() is not None:
                raise RuntimeError(
                    f"cadscope run exited {run.returncode}:\n{(workdir / 'run.log').read_text()[-3000:]}"
                )
            found = re.search(r"serving: API (\S+) \(Authorization: Bearer (\w+)\)", (workdir / "run.log").read_text())
            return found.group(0) if found else None

        found = re.search(r"API (\S+) \(Authorization: Bearer (\w+)\)", _wait(serving, 900, "the run's jobs"))
        assert found is not None
        api, headers = found.group(1), {"Authorization": f"Bearer {found.group(2)}"}

        def submit(path: str, body: dict[str, Any]) -> str:
            response = httpx.post(f"{api}{path}", json=body, headers=headers, timeout=60)
            response.raise_for_status()
            return str(response.json()["job_id"])

        def finished(job_id: str) -> bool:
            body = httpx.get(f"{api}/v1/jobs/{job_id}", headers=headers, timeout=30).json()
            return body.get("state") == "finished"

        print("render_dashboard: prompts with event streams, a missing job, failing jobs", file=log)
        httpx.get(f"{api}/v1/jobs/job-00000000000000000000", headers=headers, timeout=30)  # a 404
        prompts = [submit("/v1/prompts", {"prompt": PROMPT, "engine": e}) for e in ("freecad", "ocp")]
        with concurrent.futures.ThreadPoolExecutor(2 * len(prompts)) as pool:
            streams = [pool.submit(_follow, f"{api}/v1/jobs/{j}/events", headers) for j in prompts for _ in (1, 2)]
            for stream in streams:
                stream.result()
        # Every healthy job once more on both engines: a series' first sample is never an increase, so
        # a rate shows what a second observation adds; then the failures.
        again = [s for s in workload(2 * len(TEMPLATES), ["freecad", "ocp"]) if not s.get("expect_failure")]
        failing = [{**copy.deepcopy(t), "engine": "freecad"} for t in (FILLET_TOO_BIG, CRASH) for _ in range(8)]
        ids = [submit("/v1/jobs", spec) for spec in again + failing]
        ids += [submit("/v1/prompts", {"prompt": PROMPT, "engine": e}) for e in ("freecad", "ocp")]
        for job_id in ids:
            _wait(lambda job_id=job_id: finished(job_id), 300, f"job {job_id}")

        def alerting() -> bool:
            alerts = httpx.get(f"{url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
            return bool(alerts)

        _wait(alerting, 90, "an alert pending")
        _wait(lambda: len(httpx.get(f"{url}/api/v1/query", params={"query": VERSIONS_QUERY}, timeout=10)
                          .json()["data"]["result"]) >= 2, 90, "the per-version recording rules")  # fmt: skip
        time.sleep(3)  # the last scrapes
        return url, start, time.time(), stop
    except BaseException:
        stop()
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="render_dashboard.py",
        description="Render the Grafana dashboard's panels to a PNG from a real Prometheus, without Grafana.",
        epilog="examples:\n  python infra/render_dashboard.py --run --out docs/images/dashboard.png\n"
        "  python infra/render_dashboard.py --prometheus http://127.0.0.1:9090 --range 15m --out dashboard.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", action="store_true", help="make a real run on this machine and render it")
    source.add_argument("--prometheus", help="a Prometheus URL that scrapes cadscope already")
    parser.add_argument("--out", default=str(INFRA.parent / "docs" / "images" / "dashboard.png"))
    parser.add_argument("--range", default="15m", help="with --prometheus: the window up to now (default 15m)")
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes (default 1m)")
    parser.add_argument("--jobs", type=int, default=14, help="with --run: jobs of the built-in workload")
    args = parser.parse_args(argv)
    try:
        range_s = seconds(args.range)
        seconds(args.rate_interval)
        if args.run:
            with tempfile.TemporaryDirectory(prefix="cadscope-dashboard-") as workdir:
                url, start, end, stop = record_run(Path(workdir), jobs=args.jobs)
                try:
                    panels = query_panels(url, start, end, rate_interval=args.rate_interval)
                finally:
                    stop()
        else:
            end = time.time()
            panels = query_panels(args.prometheus, end - range_s, end, rate_interval=args.rate_interval)
        draw(panels, Path(args.out), title="cadscope: model generation (FreeCAD and OCP)")
    except (RuntimeError, TimeoutError, ValueError, httpx.HTTPError, OSError) as exc:
        print(f"render_dashboard: {exc}", file=sys.stderr)
        return 1
    empty = [p.title for p in panels if not p.has_data]
    size = Path(args.out).stat().st_size
    print(f"render_dashboard: {len(panels)} panels, {len(panels) - len(empty)} with data, {args.out} "
          f"({size // 1024} KiB)" + (f"; no data: {', '.join(empty)}" if empty else ""), file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
