"""Engines side by side: OCP on two OCCT versions, engine pools, shadow runs, results.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cadscope.freecad_bridge import EngineUnavailable, discover_engines, pick_engine
from cadscope.workers._config import WorkerSettings, parse_engine, shadow_selected, shadow_settings
from cadscope.workers.cli import main
from tests.ocp_envs import ensure_env

REPO = Path(__file__).resolve().parent.parent


def test_engine_names_parse_or_say_what_is_wrong():
    assert parse_engine("ocp") == ("ocp", None)
    assert parse_engine("ocp@7.9.3") == ("ocp", "7.9.3")
    assert parse_engine("freecad@7.6.3") == ("freecad", "7.6.3")
    for bad in ("occ", "ocp@7.9", "ocp@latest", "@7.9.3", ""):
        with pytest.raises(ValueError, match="ENGINE|freecad or ocp"):
            parse_engine(bad)


def test_shadow_settings_default_to_nothing_and_refuse_half_a_setting():
    settings = WorkerSettings.from_env({})
    assert (settings.shadow_fraction, settings.shadow_queue, settings.shadow_engine, settings.engine) == (
        0.0, None, None, None)  # fmt: skip
    with pytest.raises(ValueError, match="between 0 and 1"):
        shadow_settings({"CADSCOPE_SHADOW_FRACTION": "1.5"})
    with pytest.raises(ValueError, match="CADSCOPE_SHADOW_QUEUE"):
        shadow_settings({"CADSCOPE_SHADOW_FRACTION": "0.1"})
    with pytest.raises(ValueError, match="freecad or ocp"):
        shadow_settings({"CADSCOPE_SHADOW_FRACTION": "0.1", "CADSCOPE_SHADOW_QUEUE": "q",
                         "CADSCOPE_SHADOW_ENGINE": "ocp@8"})  # fmt: skip
    pinned = WorkerSettings.from_env({"CADSCOPE_ENGINE": "ocp@7.9.3"})
    assert pinned.engine == "ocp@7.9.3"


def test_the_shadow_fraction_selects_by_job_id():
    """0 selects nothing (no publish at all), 1 everything, a fraction about that share;
    a retry of one job id decides the same."""
    ids = [f"job-{i:06d}" for i in range(20_000)]
    assert not any(shadow_selected(i, 0.0) for i in ids)
    assert all(shadow_selected(i, 1.0) for i in ids)
    share = sum(shadow_selected(i, 0.25) for i in ids) / len(ids)
    assert 0.23 < share < 0.27, share
    assert [shadow_selected(i, 0.25) for i in ids[:100]] == [shadow_selected(i, 0.25) for i in ids[:100]]


@pytest.mark.slow  # asks the engines for their versions
def test_run_refuses_half_a_comparison_and_unknown_engines(capsys, tmp_path):
    assert main(["run", "--baseline", "ocp", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "cadscope run: --baseline and --candidate go together"
    assert main(["run", "--baseline", "ocp@1.2.3", "--candidate", "ocp", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cadscope run: --baseline ocp@1.2.3: no such engine here") and "\n" not in err
    assert main(["run", "--baseline", "ocp", "--candidate", "cad", "--out", str(tmp_path)]) == 2
    assert "--candidate: an engine is freecad or ocp" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ocp_793() -> str:
    """The OCP engine on OCCT 7.9.3: built by ``python -m tests.ocp_envs 7.9.3`` (.ci/run does)."""
    return str(ensure_env("7.9.3"))


@pytest.mark.slow
def test_two_ocp_versions_are_discovered_by_asking_them(ocp_793, monkeypatch):
    monkeypatch.setenv("CADSCOPE_OCP_PYTHONS", ocp_793)
    discover_engines.cache_clear()
    try:
        found = discover_engines()
        assert found["ocp@7.9.3"].occt_version == "7.9.3" and found["ocp@7.9.3"].argv[0] == ocp_793
        assert found["ocp@8.0.1"].occt_version == "8.0.1"
        assert pick_engine("ocp", found, occt_version="7.9.3").argv[0] == ocp_793
        with pytest.raises(EngineUnavailable, match="ocp@7.8.1"):
            pick_engine("ocp", found, occt_version="7.8.1")
    finally:
        discover_engines.cache_clear()


def _samples(text: str, name: str) -> list[dict[str, str]]:
    return [s.labels for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def _spans(path: Path) -> list[dict]:  # type: ignore[type-arg]
    spans = []
    for line in path.read_text().splitlines():
        for resource in json.loads(line).get("resourceSpans", []):
            for scope in resource["scopeSpans"]:
                spans.extend(scope["spans"])
    return spans


def _attributes(span: dict) -> dict:  # type: ignore[type-arg]
    return {a["key"]: next(iter(a["value"].values())) for a in span.get("attributes", [])}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_run_baseline_and_candidate_through_real_workers(ocp_793, tmp_path, redis_url):
    """``cadscope run --baseline ocp@7.9.3 --candidate ocp@8.0.1``: two prefork workers, each
    pinned to its pool, the API shadowing every job. results.jsonl holds each job twice, the
    primary on 7.9.3 and the shadow on 8.0.1, with equal geometry; the metrics carry both
    version labels and roles; each shadow is a trace of its own linked to its primary's, and
    no shadow reaches the flow counters the SLO reads. Over Redis: kombu's filesystem transport
    can hand a consumer a message file its publisher has created and not yet written."""
    out = tmp_path / "run"
    env = {**os.environ, "CADSCOPE_OCP_PYTHONS": ocp_793}
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "cadscope.workers.cli", "run", "--baseline", "ocp@7.9.3", "--candidate", "ocp@8.0.1",
         "--jobs", "2", "--out", str(out), "--timeout", "400", "--broker", redis_url],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["role"], r["occt_version"], r["outcome"]) for r in results) == [
        ("primary", "7.9.3", "ok"), ("primary", "7.9.3", "ok"),
        ("shadow", "8.0.1", "ok"), ("shadow", "8.0.1", "ok"),
    ]  # fmt: skip
    by_name: dict[str, dict[str, dict]] = {}  # type: ignore[type-arg]
    for r in results:
        assert r["engine"] == "ocp" and r["freecad_version"] == "none"
        by_name.setdefault(r["name"], {})[r["role"]] = r
    assert set(by_name) == {"mounting_plate", "pin_fixture"}
    for name, pair in by_name.items():
        a, b = pair["primary"]["manifest"]["geometry"], pair["shadow"]["manifest"]["geometry"]
        for part, geometry in a["parts"].items():
            assert geometry["volume"] == pytest.approx(b["parts"][part]["volume"], rel=1e-6), (name, part)
        assert a["meshes"].keys() == b["meshes"].keys()
        assert pair["primary"]["manifest"]["options"] == pair["shadow"]["manifest"]["options"]

    primary_text, shadow_text = (out / "metrics.prom").read_text(), (out / "metrics-candidate.prom").read_text()
    booleans = _samples(primary_text, "occt_boolean_duration_seconds_count")
    assert booleans and {(s["occt_version"], s["role"]) for s in booleans} == {("7.9.3", "primary")}
    booleans = _samples(shadow_text, "occt_boolean_duration_seconds_count")
    assert booleans and {(s["occt_version"], s["role"]) for s in booleans} == {("8.0.1", "shadow")}
    assert {s["occt_version"] for s in _samples(primary_text, "model_generation_completed_total")} == {"7.9.3"}
    assert _samples(shadow_text, "model_generation_completed_total") == []  # never counted against the SLO
    # Compared as the later of each pair completes (whichever worker that is): OCCT 7.9.3 and 8.0.1
    # build the same geometry for these jobs.
    compared = [f for text in (primary_text, shadow_text) for f in text_string_to_metric_families(text)
                if f.name == "cadscope_shadow_comparisons"]  # fmt: skip
    assert {s.labels["result"] for f in compared for s in f.samples if s.value} <= {"match"}

    spans = _spans(out / "traces.jsonl")
    tasks = [s for s in spans if s["name"] == "run/cadscope.run_job"]
    primaries = {_attributes(s)["cad.job_id"]: s for s in tasks if _attributes(s).get("cad.role") == "primary"}
    shadows = [s for s in tasks if _attributes(s).get("cad.role") == "shadow"]
    assert len(primaries) == 2 and len(shadows) == 2
    for shadow in shadows:
        primary = primaries[_attributes(shadow)["cad.job_id"].removesuffix("-shadow")]
        assert shadow["traceId"] != primary["traceId"]
        assert any(link["traceId"] == primary["traceId"] for link in shadow.get("links", []))
    subprocesses = [_attributes(s) for s in spans if s["name"].startswith("cad.subprocess")]
    assert sorted((a["cad.role"], a["cad.occt_version"]) for a in subprocesses) == [
        ("primary", "7.9.3"), ("primary", "7.9.3"), ("shadow", "8.0.1"), ("shadow", "8.0.1")]  # fmt: skip


def _manifest(volume: float = 100.0, faces: int = 6, facets: int = 1000) -> dict:  # type: ignore[type-arg]
    part = {"volume": volume, "area": 60.0, "bbox": [0, 0, 0, 1, 2, 3], "center_of_mass": [0.5, 1, 1.5],
            "valid": True, "solids": 1, "shells": 1, "faces": faces, "edges": 12, "vertices": 8}  # fmt: skip
    return {"geometry": {"parts": {"p": part}, "meshes": {"p.stl": {"facets": facets}}}}


def test_geometry_differences_hold_to_the_stated_tolerances():
    """The same within tolerance is no difference; a volume, a topology count or a mesh
    beyond it is named."""
    from cadscope.workers._tasks import geometry_differences

    assert geometry_differences(_manifest(), _manifest(volume=100.00001, facets=1040)) == []
    assert geometry_differences(_manifest(), _manifest(volume=100.1)) == ["p.volume 100 != 100.1"]
    assert geometry_differences(_manifest(), _manifest(faces=7)) == ["p.faces 6 != 7"]
    assert geometry_differences(_manifest(), _manifest(facets=1200)) == ["p.stl.facets 1000 != 1200"]


def _compare_pairs(store: Any, monkeypatch: Any, pairs: list[tuple[dict, dict]]) -> Any:  # type: ignore[type-arg]
    """Each (primary, shadow) pair with the interleaving forced: both results stored before
    either side compares (two workers finishing at one instant), each side compares, then the
    primary once more (a redelivery, which returns its stored result). The registry counted in."""
    from prometheus_client import CollectorRegistry

    from cadscope.metrics import Catalogue, ModelObservability
    from cadscope.workers import _tasks
    from cadscope.workers._progress import ProgressService

    registry = CollectorRegistry()
    obs = ModelObservability(Catalogue(registry))
    monkeypatch.setattr(_tasks, "progress", lambda: ProgressService(store))
    monkeypatch.setattr(_tasks, "default_observability", lambda: obs)
    for primary, shadow in pairs:
        _tasks._compare_with_twin(primary, "primary")  # the shadow has not finished: nothing yet
        ProgressService(store).finish(primary["job_id"], result=primary)
        ProgressService(store).finish(shadow["job_id"], result=shadow)
        _tasks._compare_with_twin(primary, "primary")
        _tasks._compare_with_twin(shadow, "shadow", primary["job_id"])
        _tasks._compare_with_twin(primary, "primary")
    return registry


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_a_primary_and_its_shadow_are_compared_once_however_they_finish(kind, tmp_path, request, monkeypatch):
    """Two sides finishing together, and a side delivered again, make one comparison, counted
    and announced once; a shadow rejected before it ran (no engine) is compared by its outcome."""
    from cadscope.workers._progress import FileStore, RedisStore

    store = FileStore(tmp_path) if kind == "file" else RedisStore(request.getfixturevalue("redis_url"))
    job_id, rejected_id = f"job-{os.urandom(6).hex()}", f"job-{os.urandom(6).hex()}"
    engine = {"engine": "ocp", "freecad_version": "none", "occt_version": "8.0.1"}
    primary = {"job_id": job_id, "outcome": "ok", "engine": engine, "manifest": _manifest(), "role": "primary"}
    shadow = {**primary, "job_id": f"{job_id}-shadow", "role": "shadow", "manifest": _manifest(volume=100.1)}
    second = {**primary, "job_id": rejected_id}
    rejected = {"job_id": f"{rejected_id}-shadow", "status": "failed", "outcome": "engine_unavailable",
                "error_type": "engine_unavailable", "error_message": "no engine ocp@9.9.9 here"}  # fmt: skip

    registry = _compare_pairs(store, monkeypatch, [(primary, shadow), (second, rejected)])

    counted = {s.labels["result"]: s.value for f in registry.collect() if f.name == "cadscope_shadow_comparisons"
               for s in f.samples if s.name.endswith("_total") and s.value}  # fmt: skip
    assert counted == {"geometry_mismatch": 1.0, "outcome_mismatch": 1.0}
    announced = [e for _id, e in store.read(job_id) if e["type"] == "shadow.compared"]
    assert [(e["result"], e["differences"]) for e in announced] == [("geometry_mismatch", ["p.volume 100 != 100.1"])]
    announced = [e for _id, e in store.read(rejected_id) if e["type"] == "shadow.compared"]
    assert [e["differences"] for e in announced] == [["outcome ok != engine_unavailable"]]


def test_a_claim_in_the_file_store_expires_like_a_redis_key(tmp_path):
    import time

    from cadscope.workers._progress import FileStore

    store = FileStore(tmp_path)
    assert store.claim_once("job-1", "shadow-compared", 60) is True
    assert store.claim_once("job-1", "shadow-compared", 60) is False
    claim = tmp_path / "progress" / "job-1.once-shadow-compared"
    os.utime(claim, (time.time() - 120, time.time() - 120))
    assert store.claim_once("job-1", "shadow-compared", 60) is True
    assert store.finished("job-never-ran") is None
    assert not list((tmp_path / "progress").glob("job-never-ran*"))


@pytest.mark.slow
def test_a_worker_shadows_the_jobs_it_runs_on_a_pinned_candidate_pool(producer, start_worker, engines):
    """A worker with a shadow fraction of 1, pinned to FreeCAD, sends every primary it runs
    (straight from the broker, no API) to the OCP pool's queue; the OCP worker runs the shadow
    under its own id, on its own engine, and compares it with the primary. A pinned worker
    refuses a job for another engine."""
    from cadscope.workers import run_job
    from cadscope.workers._workload import PLATE

    candidate = start_worker(env={"CADSCOPE_ENGINE": "ocp"}, concurrency=1)
    primary = start_worker(
        env={"CADSCOPE_ENGINE": "freecad", "CADSCOPE_SHADOW_FRACTION": "1",
             "CADSCOPE_SHADOW_QUEUE": candidate.queue, "CADSCOPE_SHADOW_ENGINE": "ocp"},
        concurrency=1,
    )  # fmt: skip
    job_id = f"job-{os.urandom(5).hex()}"
    first = run_job.apply_async(args=[{**PLATE, "engine": "freecad"}], kwargs={"job_id": job_id}, task_id=job_id,
                                queue=primary.queue).get(timeout=240)  # fmt: skip
    assert (first["status"], first["role"], first["engine"]["engine"]) == ("succeeded", "primary", "freecad")
    shadow = run_job.AsyncResult(f"{job_id}-shadow").get(timeout=240)
    assert (shadow["status"], shadow["role"], shadow["engine"]["engine"]) == ("succeeded", "shadow", "ocp")
    assert shadow["manifest"]["geometry"]["parts"]["plate"]["volume"] == pytest.approx(
        first["manifest"]["geometry"]["parts"]["plate"]["volume"], rel=1e-6)  # fmt: skip
    text = candidate.scrape()
    compared = {s.labels["result"]: s.value for f in text_string_to_metric_families(text)
                if f.name == "cadscope_shadow_comparisons" for s in f.samples}  # fmt: skip
    assert compared == {"match": 1.0}
    refused = run_job.apply_async(args=[{**PLATE, "engine": "ocp"}], queue=primary.queue).get(timeout=120)
    assert (refused["status"], refused["error_type"]) == ("failed", "engine_unavailable")
