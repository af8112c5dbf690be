"""``cadscope compare``: its statistics against scipy and reference computations, its geometry
check, its reports and exit codes, on files written by the project's own exporters.

The statistics are checked on generated samples: equality with scipy (KS) and with a textbook
computation (PSI, histogram_quantile) needs no engine. Runs of the real engines, where the
bucket-based estimates are compared with the raw ones, are in ``test_compare_runs.py``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from scipy import stats as scipy_stats

import cadscope.compare as compare
from cadscope.compare import _stats
from cadscope.tracing import OTLPJsonFileSpanExporter
from cadscope.workers.cli import main

OCCT_OP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, math.inf)


def test_all_is_sorted_and_real():
    def key(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert list(compare.__all__) == sorted(compare.__all__, key=key)
    for name in compare.__all__:
        assert getattr(compare, name) is not None, name


def _buckets(values: np.ndarray, bounds: tuple[float, ...] = OCCT_OP_BUCKETS) -> _stats.Buckets:
    cumulative = tuple(float(np.count_nonzero(values <= b)) for b in bounds)
    return _stats.Buckets(bounds, cumulative)


@pytest.mark.parametrize(("n", "m", "shift"), [(40, 55, 1.0), (300, 200, 1.15), (2000, 1500, 1.0), (25, 30, 2.0)])
def test_ks_equals_scipy_raw_and_on_bucket_bounds(n, m, shift):
    rng = np.random.default_rng(n)
    base = np.sort(rng.lognormal(-3, 0.6, n))
    cand = np.sort(rng.lognormal(-3, 0.6, m) * shift)
    ours = _stats.ks_raw(base, cand)
    theirs = scipy_stats.ks_2samp(base, cand)
    assert ours.statistic == pytest.approx(theirs.statistic, abs=1e-12)
    assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-9, abs=1e-15)
    # The statistic by hand: the largest gap between the two empirical distribution functions.
    points = np.concatenate([base, cand])
    by_hand = np.max(np.abs(np.searchsorted(base, points, "right") / n - np.searchsorted(cand, points, "right") / m))
    assert ours.statistic == pytest.approx(by_hand, abs=1e-12)

    # Samples that sit on bucket bounds lose nothing to binning: the bucket KS is scipy's
    # statistic, and its p-value scipy's asymptotic one.
    bounds = np.asarray(OCCT_OP_BUCKETS[:-1])
    on_base = bounds[np.minimum(np.searchsorted(bounds, base), bounds.size - 1)]
    on_cand = bounds[np.minimum(np.searchsorted(bounds, cand), bounds.size - 1)]
    binned = _stats.ks_buckets(_buckets(on_base), _buckets(on_cand))
    reference = scipy_stats.ks_2samp(on_base, on_cand, method="asymp")
    assert binned.statistic == pytest.approx(reference.statistic, abs=1e-12)
    assert binned.p_value == pytest.approx(reference.pvalue, rel=1e-9, abs=1e-15)
    # Elsewhere, binning only hides gaps.
    assert _stats.ks_buckets(_buckets(base), _buckets(cand)).statistic <= ours.statistic + 1e-12


def _psi_reference(expected: list[float], actual: list[float]) -> float:
    """PSI as the drift-monitoring literature writes it, one bin at a time."""
    e_total, a_total = sum(expected), sum(actual)
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e_share = max(e / e_total, 1e-4)
        a_share = max(a / a_total, 1e-4)
        total += (a_share - e_share) * math.log(a_share / e_share)
    return total


@pytest.mark.parametrize("shift", [1.0, 1.1, 1.3, 2.0])
def test_psi_equals_the_reference_computation_and_its_bands(shift):
    rng = np.random.default_rng(7)
    base = np.sort(rng.lognormal(-2, 0.5, 1000))
    cand = np.sort(rng.lognormal(-2, 0.5, 800) * shift)
    # Raw: ten quantile bins of the baseline.
    edges = np.quantile(base, np.linspace(0, 1, 11))
    expected = [0.0] * 10
    actual = [0.0] * 10
    for values, counts in ((base, expected), (cand, actual)):
        for value in values:
            counts[min(9, max(0, int(np.searchsorted(edges[1:-1], value, side="right"))))] += 1
    assert _stats.psi_raw(base, cand) == pytest.approx(_psi_reference(expected, actual), rel=1e-9)
    # Buckets: the histogram's own.
    b, c = _buckets(base), _buckets(cand)
    assert _stats.psi_buckets(b, c) == pytest.approx(_psi_reference(list(b.counts()), list(c.counts())), rel=1e-9)
    value = _stats.psi_raw(base, cand)
    assert _stats.psi_band(value) == ("none" if value < 0.1 else "moderate" if value < 0.2 else "significant")
    if shift == 1.0:
        assert _stats.psi_band(value) == "none"
    if shift == 2.0:
        assert _stats.psi_band(value) == "significant"


def test_bucket_quantile_interpolates_as_histogram_quantile():
    # 10 observations: 4 in (0, 0.1], 4 in (0.1, 0.5], 2 in (0.5, 1]
    b = _stats.Buckets((0.1, 0.5, 1.0, math.inf), (4, 8, 10, 10))
    assert _stats.quantile_buckets(b, 0.5) == pytest.approx(0.1 + 0.4 * (5 - 4) / 4)
    assert _stats.quantile_buckets(b, 0.2) == pytest.approx(0.1 * 2 / 4)
    assert _stats.quantile_buckets(b, 0.95) == pytest.approx(0.5 + 0.5 * (9.5 - 8) / 2)
    # In the +Inf bucket: the highest finite bound, as PromQL answers.
    assert _stats.quantile_buckets(_stats.Buckets((0.1, math.inf), (1, 10)), 0.9) == 0.1
    with pytest.raises(ValueError):
        _stats.Buckets((0.1, 0.5), (1, 2))


def test_the_exact_bootstrap_of_a_quantile_ratio_matches_resampling():
    rng = np.random.default_rng(3)
    base = np.sort(rng.lognormal(-3, 0.5, 150))
    cand = np.sort(rng.lognormal(-3, 0.5, 120) * 1.5)
    for q in (0.5, 0.95):
        low, high = _stats.ratio_interval_raw(base, cand, q)
        # The same interval by brute force: resample each side, take the quantile, 4,000 times.
        draws = []
        for _ in range(4000):
            b = np.sort(rng.choice(base, base.size))
            c = np.sort(rng.choice(cand, cand.size))
            draws.append(_stats.quantile_raw(c, q) / _stats.quantile_raw(b, q))
        ref_low, ref_high = np.percentile(draws, [2.5, 97.5])
        assert low == pytest.approx(ref_low, rel=0.06) and high == pytest.approx(ref_high, rel=0.06)
        assert low < _stats.quantile_raw(cand, q) / _stats.quantile_raw(base, q) < high


def test_rate_difference_interval_is_newcombes():
    # Newcombe (1998), Statistics in Medicine 17:873, table II, example (a): 56/70 against 48/80.
    low, high = _stats.rate_difference_interval(48, 80, 56, 70)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)
    low, high = _stats.rate_difference_interval(0, 20, 0, 20)
    assert low < 0 < high


def test_ks_p_values_are_adjusted_for_the_features_judged_holm():
    from cadscope.compare._report import FeatureResult, _holm

    def feature(p: float, n: int = 50) -> FeatureResult:
        return FeatureResult("f", "operation", "raw", n, n, ks=_stats.KSResult(0.5, p))

    features = [feature(0.04), feature(0.01), feature(0.03), feature(0.001, n=3)]
    _holm(features, compare.Thresholds())
    # Sorted 0.01, 0.03, 0.04 of three judged: 3 x 0.01, 2 x 0.03, then no less than that.
    assert [f.ks_p_adjusted for f in features[:3]] == pytest.approx([0.06, 0.03, 0.06])
    assert math.isnan(features[3].ks_p_adjusted)  # too few observations: not judged, not counted


# -- geometry -------------------------------------------------------------------------------------------


def _manifest(volume: float = 18534.2, facets: int = 2924, options: dict | None = None) -> dict:
    """A result manifest with the ``geometry`` and ``options`` blocks the engines deliver, written by
    hand: these tests choose the differences, and ``results.jsonl`` lines carry it as ``cadscope run``
    writes them (job_id, name, engine, versions, role, outcome, manifest)."""
    return {
        "options": options or {"linear_deflection": 0.1, "angular_deflection": 0.5, "stl_format": "binary"},
        "geometry": {
            "parts": {
                "plate": {
                    "volume": volume,
                    "area": 6120.5,
                    "bbox": [0, 0, 0, 60, 40, 8],
                    "center_of_mass": [30, 20, 4],
                    "valid": True,
                    "solids": 1,
                    "shells": 1,
                    "faces": 18,
                    "edges": 44,
                    "vertices": 28,
                }
            },
            "meshes": {"plate.stl": {"facets": facets}},
        },
    }


def test_geometry_within_tolerance_is_equal_and_beyond_it_a_mismatch():
    same = {"mounting_plate": [_manifest()]}
    close = {"mounting_plate": [_manifest(volume=18534.2 * (1 + 5e-4), facets=3300)]}
    found, shared = compare.compare_geometry(same, close)
    assert (found, shared) == ([], 1)
    far = {"mounting_plate": [_manifest(), _manifest(volume=18000.0, facets=6000)]}
    found, _ = compare.compare_geometry(same, far)
    assert {(m.item, m.field) for m in found} == {("part plate", "volume"), ("mesh plate.stl", "facets")}
    other_work = {"mounting_plate": [_manifest(options={"linear_deflection": 0.01})]}
    found, _ = compare.compare_geometry(same, other_work)
    assert [m.field for m in found] == ["options"]


# -- the command ----------------------------------------------------------------------------------------


def _write_run(folder: Path, jobs: list[tuple[str, str, float]], seed: int, results: list[dict] | None = None) -> None:
    """A run folder whose ``traces.jsonl`` the project's own OTLP/JSON exporter writes: per job
    (engine, OCCT version, boolean slowdown) a flow span over a subprocess span over a cut and a
    topology hash, with lognormal durations of our choosing."""
    folder.mkdir(parents=True, exist_ok=True)
    exporter = OTLPJsonFileSpanExporter(folder / "traces.jsonl")
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    rng = np.random.default_rng(seed)
    t = 1_700_000_000_000_000_000
    for number, (engine, occt, factor) in enumerate(jobs):
        labels = {"cad.engine": engine, "cad.occt_version": occt, "cad.freecad_version": "none"}
        job = {"cad.job_id": f"job-{seed}-{number}"}
        cut = int(rng.lognormal(-4, 0.3) * factor * 1e9)
        hashed = int(rng.lognormal(-5, 0.3) * 1e9)
        flow = tracer.start_span("cad.flow parametric", start_time=t, attributes={**job, **labels})
        ctx = trace.set_span_in_context(flow)
        sub = tracer.start_span("cad.subprocess ocp", ctx, start_time=t + 1000,
                                attributes={**job, **labels, "cad.subprocess.outcome": "ok"})  # fmt: skip
        sub_ctx = trace.set_span_in_context(sub)
        cut_attributes = {"cad.boolean.operation": "cut"}
        op = tracer.start_span("occt.boolean", sub_ctx, start_time=t + 2000, attributes=cut_attributes)
        op.end(end_time=t + 2000 + cut)
        h = tracer.start_span("topology.hash", sub_ctx, start_time=t + 3000 + cut)
        h.end(end_time=t + 3000 + cut + hashed)
        sub.end(end_time=t + 4000 + cut + hashed)
        flow.end(end_time=t + 5000 + cut + hashed)
        t += 10_000_000_000
    provider.shutdown()
    if results is not None:
        (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))


def test_one_folder_two_selectors_flags_the_slowed_operation_and_writes_json_and_html(tmp_path, capsys):
    run = tmp_path / "run"
    _write_run(run, [("ocp", "7.9.3", 1.0)] * 60 + [("ocp", "8.0.1", 2.0)] * 60, seed=1)
    report_json, report_html = tmp_path / "drift.json", tmp_path / "report.html"
    argv = ["compare", str(run), "--baseline", "occt_version=7.9.3", "--candidate", 'occt_version="8.0.1"',
            "--json", str(report_json), "--html", str(report_html)]  # fmt: skip
    assert main(argv) == 1
    table = capsys.readouterr().out
    assert re.search(r"occt\.boolean\[cut\].*slower", table)
    assert re.search(r"topology\.hash .*same", table)
    report = json.loads(report_json.read_text())
    assert {"timestamp", "reference_size", "current_size", "features", "drift_detected"} <= set(report)
    operations = [f for f in report["regressions"] if report["features"][f]["kind"] == "operation"]
    assert operations == ["occt.boolean[cut]"] and report["verdict"] == "fail"
    assert set(report["regressions"]) <= {"occt.boolean[cut]", "flow"}  # the flow holds the cut
    cut = report["features"]["occt.boolean[cut]"]
    assert cut["reference_size"] == cut["current_size"] == 60
    assert cut["ks_test"]["drift_detected"] and cut["ks_test"]["p_value"] < 1e-6
    assert cut["psi"]["drift_level"] == "significant" and cut["drift_detected"]
    assert 1.6 < cut["p50_ratio"]["ratio"] < 2.5 and cut["p50_ratio"]["ci"][0] > 1.25
    assert report["features"]["topology.hash"]["verdict"] == "same"
    assert report["reference"]["versions"] == [{"engine": "ocp", "freecad_version": "none", "occt_version": "7.9.3"}]
    page = report_html.read_text()
    assert page.count("data:image/png;base64,") == len(report["features"])
    assert not re.search(r"""(src|href)=['"](?!data:)""", page), "the page must need no other file"
    assert "occt.boolean[cut]" in page and "FAIL" in page


def test_two_folders_pass_when_the_same_and_fail_on_a_geometry_mismatch(tmp_path, capsys):
    results = [{"job_id": "j", "name": "mounting_plate", "engine": "ocp", "freecad_version": "none",
                "occt_version": "8.0.1", "role": "primary", "outcome": "ok", "manifest": _manifest()}]  # fmt: skip
    _write_run(tmp_path / "a", [("ocp", "8.0.1", 1.0)] * 40, seed=2, results=results)
    _write_run(tmp_path / "b", [("ocp", "8.0.1", 1.0)] * 40, seed=3, results=results)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "verdict: PASS" in capsys.readouterr().out
    changed = [{**results[0], "manifest": _manifest(volume=17000.0)}]
    _write_run(tmp_path / "c", [("ocp", "8.0.1", 1.0)] * 40, seed=3, results=changed)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    out = capsys.readouterr().out
    assert "mounting_plate: part plate volume: 18534.2 -> 17000.0" in out and "geometry differs" in out


def test_the_candidate_failing_more_often_fails_the_comparison(tmp_path, capsys):
    def rows(failed: int) -> list[dict]:
        return [{"job_id": f"j{i}", "name": "plate", "engine": "ocp", "occt_version": "8.0.1",
                 "outcome": "crash" if i < failed else "ok", "manifest": None} for i in range(40)]  # fmt: skip

    _write_run(tmp_path / "a", [("ocp", "8.0.1", 1.0)] * 20, seed=4, results=rows(0))
    _write_run(tmp_path / "b", [("ocp", "8.0.1", 1.0)] * 20, seed=5, results=rows(12))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "the candidate fails more often" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare"], "give one run folder"),
        (["compare", "{run}"], "needs --baseline and --candidate"),
        (["compare", "{run}", "--baseline", "engine", "--candidate", "engine=ocp"], "bad selector"),
        (["compare", "{run}", "--baseline", "colour=red", "--candidate", "engine=ocp"], "unknown selector key"),
        (["compare", "{run}", "--baseline", "engine=freecad", "--candidate", "engine=ocp"], "nothing matches"),
        (["compare", "{run}/nowhere", "{run}"], "no such folder"),
        (["compare", "{run}", "{run}", "--ratio", "0.5"], "--ratio must be above 1"),
        (["compare", "{run}/unreadable", "{run}"], "holds neither traces.jsonl nor metrics.prom"),
        (["compare", "{run}/binary", "{run}"], "is not text"),
        (["compare", "{run}/garbage", "{run}"], "is not OTLP/JSON"),
        (["compare", "--prometheus", "http://127.0.0.1:1", "--baseline", "engine=a", "--candidate", "engine=b"],
         "no engine label"),
        (["compare", "--prometheus", "http://127.0.0.1:1", "--baseline", "occt_version=1", "--candidate",
          "occt_version=2"], "cannot reach Prometheus"),
        (["compare", "--prometheus", "http://x", "--baseline", "occt_version=1", "--candidate", "occt_version=2",
          "--range", "yesterday"], "bad range"),
    ],
)  # fmt: skip
def test_usage_and_input_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    _write_run(tmp_path / "run", [("ocp", "8.0.1", 1.0)] * 3, seed=6)
    (tmp_path / "run" / "unreadable").mkdir()
    (tmp_path / "run" / "unreadable" / "traces.jsonl").mkdir()  # a folder where the file should be
    (tmp_path / "run" / "garbage").mkdir()
    (tmp_path / "run" / "garbage" / "traces.jsonl").write_text('{"resourceSpans": [{"scopeSpans": [{"spans": [{}]}]}]}')
    (tmp_path / "run" / "binary").mkdir()
    (tmp_path / "run" / "binary" / "traces.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    assert main([a.replace("{run}", str(tmp_path / "run")) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("cadscope compare: "), err


def test_a_folder_with_metrics_only_is_compared_from_its_buckets(tmp_path, capsys):
    from prometheus_client import CollectorRegistry, generate_latest

    from cadscope.metrics import Catalogue

    rng = np.random.default_rng(8)
    for name, factor in (("a", 1.0), ("b", 3.0)):
        registry = CollectorRegistry()
        catalogue = Catalogue(registry)
        for value in rng.lognormal(-3.5, 0.4, 200) * factor:
            catalogue.occt_boolean.labels("cut", "2-5", "none", "8.0.1", "primary").observe(value)
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.prom").write_bytes(generate_latest(registry))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json", str(tmp_path / "r.json")]) == 1
    feature = json.loads((tmp_path / "r.json").read_text())["features"]["occt.boolean[cut]"]
    assert feature["method"] == "buckets" and feature["verdict"] == "slower"
    assert feature["reference_size"] == feature["current_size"] == 200
    assert "(buckets)" in capsys.readouterr().out
