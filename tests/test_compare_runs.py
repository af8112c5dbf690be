"""``cadscope compare`` on real runs: the real worker, the real OCP engine, the real exporters.

Two ``cadscope run`` of the same workload go side by side (at the same time, so that the
machine's load falls on both alike): one plain, one whose engine slows every ``occt.boolean``
by a known factor (the probe's ``CADSCOPE_TEST_SLOWDOWN`` fault, set by a wrapper that starts
the engine). The comparison must flag the booleans and no other operation; comparisons of a
run against itself (its jobs dealt at random into two folders) must flag nothing; and the
bucket-based estimates from the run's own metrics must agree with the raw span durations.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cadscope.compare import SideData, compare_sides, read_exposition, read_traces
from cadscope.compare._stats import quantile_buckets, quantile_raw
from cadscope.workers.cli import main

from .conftest import REPO

SLOWDOWN = 10.0
JOBS = 28


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compare-runs")
    wrapper = root / "slow-python"
    wrapper.write_text(f'#!/bin/sh\nCADSCOPE_TEST_SLOWDOWN=occt.boolean={SLOWDOWN:g} exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    # Cold engines: the wrapper plants the slowdown in the environment of each engine it starts.
    env = {**os.environ, "PYTHONPATH": str(REPO), "CADSCOPE_WARM": "0"}
    env.pop("CELERY_BROKER_URL", None)
    started = []
    for name, extra in (("base", {}), ("slow", {"CADSCOPE_OCP_PYTHON": str(wrapper)})):
        argv = [sys.executable, "-m", "cadscope.workers.cli", "run", "--engine", "ocp", "--jobs", str(JOBS),
                "--concurrency", "1", "--out", str(root / name)]  # fmt: skip
        log = (root / f"{name}.log").open("wb")
        started.append(subprocess.Popen(argv, env={**env, **extra}, stdout=log, stderr=subprocess.STDOUT))  # noqa: S603
    for proc in started:
        assert proc.wait(900) == 0, (root / "base.log").read_text()[-2000:] + (root / "slow.log").read_text()[-2000:]
    return root / "base", root / "slow"


def _split(requests: list[dict], into: tuple[Path, Path], seed: int) -> None:
    """Deal a run's jobs (its parsed trace lines) at random into two folders, half of each workload
    job name to each (the same mix of work on both sides), every span with its trace."""
    names: dict[str, str] = {}
    for request in requests:
        for resource in request["resourceSpans"]:
            for scope in resource["scopeSpans"]:
                for span in scope["spans"]:
                    for attribute in span.get("attributes", []):
                        if attribute["key"] == "cad.job_name":
                            names[span["traceId"]] = attribute["value"]["stringValue"]
    rng = random.Random(seed)
    first: set[str] = set()
    for name in sorted(set(names.values())):
        traces = sorted(t for t, n in names.items() if n == name)
        rng.shuffle(traces)
        first.update(traces[: len(traces) // 2])
    for index, folder in enumerate(into):
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "traces.jsonl").open("w") as out:
            for request in requests:
                part = {"resourceSpans": [
                    {**resource, "scopeSpans": [
                        {**scope, "spans": [s for s in scope["spans"] if (s["traceId"] in first) == (index == 0)]}
                        for scope in resource["scopeSpans"]]}
                    for resource in request["resourceSpans"]]}  # fmt: skip
                out.write(json.dumps(part) + "\n")


@pytest.mark.slow
def test_a_planted_regression_is_flagged_on_that_operation_only(runs, tmp_path, capsys):
    base, slow = runs
    report_file = tmp_path / "report.json"
    assert main(["compare", str(base), str(slow), "--json", str(report_file), "--html", str(tmp_path / "r.html")]) == 1
    out = capsys.readouterr().out
    report = json.loads(report_file.read_text())
    verdicts = {name: f["verdict"] for name, f in report["features"].items() if f["kind"] == "operation"}
    assert verdicts["occt.boolean[cut]"] == "slower", out
    cut = report["features"]["occt.boolean[cut]"]
    # Every boolean takes SLOWDOWN times as long: so do its quantiles, within their intervals.
    assert cut["p50_ratio"]["ci"][0] <= SLOWDOWN * 1.25 and cut["p50_ratio"]["ci"][1] >= SLOWDOWN / 1.25, out
    others = {name: v for name, v in verdicts.items() if not name.startswith("occt.boolean[")}
    assert others and not {name for name, v in others.items() if v in ("slower", "faster")}, out
    assert all(r.startswith("occt.boolean[") or report["features"][r]["kind"] != "operation"
               for r in report["regressions"]), out  # fmt: skip
    assert report["reference"]["versions"] == report["current"]["versions"]  # the same engine, only slowed


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_run_against_itself_flags_nothing(runs, tmp_path, capsys):
    """Ten random halvings of each run, compared: at most one verdict of slower or faster in the twenty
    comparisons. A verdict needs the KS test to reject after Holm's correction over the comparison's
    features (a family-wise error of 5 %) and a quantile ratio of at least 1.25 whose interval
    excludes 1, so even one is rare (none in most runs); two would say the rule lets noise through."""
    flagged, statuses, rejections, comparisons = [], [], 0, 0
    for run in runs:
        requests = [json.loads(line) for line in (run / "traces.jsonl").read_text().splitlines() if line.strip()]
        for seed in range(10):
            halves = (tmp_path / f"{run.name}-{seed}-a", tmp_path / f"{run.name}-{seed}-b")
            _split(requests, halves, seed)
            report_file = tmp_path / f"{run.name}-{seed}.json"
            status = main(["compare", str(halves[0]), str(halves[1]), "--json", str(report_file)])
            capsys.readouterr()
            report = json.loads(report_file.read_text())
            flagged += [
                (run.name, seed, f) for f, v in report["features"].items() if v["verdict"] in ("slower", "faster")
            ]
            rejections += sum(v["ks_test"]["drift_detected"] for v in report["features"].values())
            comparisons += len(report["features"])
            statuses.append(status)
    assert len(flagged) <= 1, f"false positives: {flagged}"
    assert statuses.count(0) >= len(statuses) - 1
    # KS alone, unadjusted, rejects about alpha of true nulls.
    assert rejections <= 0.1 * comparisons, (rejections, comparisons)


@pytest.mark.slow
def test_bucket_estimates_agree_with_raw_durations_on_a_real_run(runs):
    for run in runs:
        raw, binned = SideData({}, "raw"), SideData({}, "buckets")
        read_traces(run / "traces.jsonl", [raw])
        read_exposition(run / "metrics.prom", [binned])
        shared = raw.features & binned.features
        assert {"flow", "stage:generate", "occt.boolean[cut]", "topology.hash"} <= shared
        for feature in sorted(shared):
            values = np.sort(np.frombuffer(raw.raw[feature]))
            buckets = binned.buckets[feature]
            # The same observations: every span duration is also a histogram observation.
            assert values.size == buckets.count, feature
            bounds = (0.0, *buckets.bounds)
            for q in (0.5, 0.95):
                exact = quantile_raw(values, q)
                estimate = quantile_buckets(buckets, q)
                # The estimate interpolates inside the very bucket that holds the exact quantile.
                index = int(np.searchsorted(buckets.bounds, exact, side="left"))
                low, high = bounds[index], min(bounds[index + 1], buckets.bounds[-2])
                assert low - 1e-9 <= estimate <= high + 1e-9, (feature, q, exact, estimate, low, high)
    # Between the two runs: the bucket KS is never above the raw one, and both see the slowdown.
    sides = {}
    for method, reader, name in (("raw", read_traces, "traces.jsonl"), ("buckets", read_exposition, "metrics.prom")):
        pair = [SideData({}, "base"), SideData({}, "slow")]
        for side, run in zip(pair, runs, strict=True):
            reader(run / name, [side])
        sides[method] = {f.feature: f for f in compare_sides(*pair).features}
    for feature, raw_result in sides["raw"].items():
        if feature in sides["buckets"]:
            assert sides["buckets"][feature].ks.statistic <= raw_result.ks.statistic + 1e-9, feature
    assert sides["raw"]["occt.boolean[cut]"].verdict == sides["buckets"]["occt.boolean[cut]"].verdict == "slower"
