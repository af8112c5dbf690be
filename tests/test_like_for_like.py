"""Like for like: the work options are explicit, shared by both engines, applied by each,
and recorded; the manifest carries per-part geometry and per-mesh facet counts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from cadscope.freecad_bridge import EngineInfo, JobOptions, JobSpec, pick_engine, run_cad_job
from cadscope.metrics import ModelObservability
from cadscope.metrics._catalogue import Catalogue
from cadscope.tracing.testing import in_memory_provider
from cadscope.workers._workload import ASSEMBLY, HOUSING, PLATE

# Tolerances two runs of one job are held to (the same as `cadscope compare` states).
VOLUME_REL = 1e-6
AREA_REL = 1e-6
BBOX_ABS = 1e-3  # millimetres
FACETS_REL = 0.05


def _job(template: dict[str, Any], engine: str, **options: Any) -> JobSpec:
    return JobSpec.model_validate({**template, "engine": engine, "options": options})


def _run(job: JobSpec, engines, out: Path, provider=None):  # type: ignore[no-untyped-def]
    obs = ModelObservability(Catalogue(CollectorRegistry()))
    result = run_cad_job(job, out, engine=engines[job.engine], observability=obs, tracer_provider=provider)
    assert result.outcome == "ok", (job.engine, result.outcome, result.error_type, result.error_message)
    assert result.manifest is not None
    return result.manifest


def test_the_options_have_one_default_and_are_bounded():
    """Every option has its default in the schema, the manifest's record of it is the same
    dict, and a bad value names the field."""
    job = JobSpec.model_validate({**PLATE, "engine": "ocp"})
    assert job.options == JobOptions()
    assert job.options.linear_deflection == 0.1 and job.options.stl_format == "binary"
    attributes = job.options.as_attributes()
    assert attributes["cad.option.linear_deflection"] == 0.1 and attributes["cad.option.step_schema"] == "AP214"
    for bad in ({"linear_deflection": 0}, {"stl_format": "text"}, {"step_schema": "AP999"}, {"fuzzy": 1}):
        with pytest.raises(ValidationError) as refused:
            _job(PLATE, "ocp", **bad)
        assert "options" in str(refused.value)


def test_a_serial_boolean_is_refused_on_freecad_and_routed_to_ocp():
    """FreeCAD's booleans always run in parallel: ``parallel=false`` names OCP or is refused."""
    formats = frozenset({"step", "stl", "brep", "iges"})
    engines = {
        "freecad": EngineInfo("freecad", ("freecadcmd",), "0.20.2", "7.6.3", formats | {"obj"}),
        "ocp": EngineInfo("ocp", ("python",), "none", "8.0.1", formats),
    }
    with pytest.raises(ValidationError, match="parallel"):
        _job(PLATE, "freecad", parallel=False)
    job = _job(PLATE, "auto", parallel=False)
    assert pick_engine(job.engine, engines, job.formats(), job.options).name == "ocp"
    assert pick_engine("auto", engines, job.formats(), JobOptions()).name == "freecad"


def test_the_mesh_budget_follows_the_deflection():
    """A sphere the budget admits at the default deflection is refused ten times finer,
    and one it refuses at the default is admitted ten times coarser."""
    ball = {
        "name": "ball",
        "parts": [{"name": "ball", "steps": [{"kind": "sphere", "name": "s", "radius": 1000}]}],
        "exports": [{"format": "stl", "of": "ball", "name": "ball"}],
    }
    JobSpec.model_validate(ball)
    with pytest.raises(ValidationError, match="linear deflection of 0.01 mm"):
        JobSpec.model_validate({**ball, "options": {"linear_deflection": 0.01}})
    big = {**ball, "parts": [{"name": "ball", "steps": [{"kind": "sphere", "name": "s", "radius": 5000}]}]}
    with pytest.raises(ValidationError):
        JobSpec.model_validate(big)
    JobSpec.model_validate({**big, "options": {"linear_deflection": 1.0}})


def _close(a: float, b: float, rel: float) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("template", [PLATE, ASSEMBLY, HOUSING], ids=lambda t: t["name"])
def test_the_same_job_on_both_engines_does_the_same_work(engines, tmp_path, template):
    """FreeCAD 0.20 (OCCT 7.6) and OCP (OCCT 8.0) on the same job and default options:
    every part's volume, area and bounding box agree within the stated tolerances, every
    mesh has comparable facet counts, and both manifests record the same options."""
    manifests = {name: _run(_job(template, name), engines, tmp_path / name) for name in ("freecad", "ocp")}
    fc, ocp = manifests["freecad"], manifests["ocp"]
    assert fc["options"] == ocp["options"] == JobOptions().model_dump()
    assert set(fc["geometry"]["parts"]) == set(ocp["geometry"]["parts"]) != set()
    for name, a in fc["geometry"]["parts"].items():
        b = ocp["geometry"]["parts"][name]
        assert a["valid"] and b["valid"], name
        assert _close(a["volume"], b["volume"], VOLUME_REL), (name, a["volume"], b["volume"])
        assert _close(a["area"], b["area"], AREA_REL), (name, a["area"], b["area"])
        assert all(abs(x - y) <= BBOX_ABS for x, y in zip(a["bbox"], b["bbox"], strict=True)), name
        assert all(abs(x - y) <= BBOX_ABS for x, y in zip(a["center_of_mass"], b["center_of_mass"], strict=True))
        assert a["solids"] == b["solids"] and a["shells"] == b["shells"], name
    meshes = [a["name"] for a in fc["artifacts"] if a["format"] == "stl"]
    assert meshes and set(fc["geometry"]["meshes"]) == set(ocp["geometry"]["meshes"]) == set(meshes)
    for name in meshes:
        a, b = fc["geometry"]["meshes"][name]["facets"], ocp["geometry"]["meshes"][name]["facets"]
        assert a > 0 and abs(a - b) <= FACETS_REL * max(a, b), (name, a, b)
        # Binary STL by default, on both: 84 bytes of header and count, 50 a facet.
        for engine, manifest in manifests.items():
            size = next(x["size"] for x in manifest["artifacts"] if x["name"] == name)
            assert size == 84 + 50 * manifest["geometry"]["meshes"][name]["facets"], (engine, name)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["freecad", "ocp"])
def test_each_engine_applies_the_options(engines, tmp_path, engine):
    """Options change the work as they say on each engine: a finer deflection makes more
    facets, ASCII STL is text, the STEP schema and units are the ones asked for, IGES in
    BRep mode writes manifold solids (entity 186). The spans record the options."""
    template = {**HOUSING, "exports": [*HOUSING["exports"], {"format": "step", "of": "housing", "name": "housing"}]}
    coarse = _run(_job(template, engine), engines, tmp_path / "coarse")
    options = {"linear_deflection": 0.02, "angular_deflection": 0.1, "stl_format": "ascii",
               "step_schema": "AP203", "step_units": "in", "iges_mode": "brep"}  # fmt: skip
    provider, exporter = in_memory_provider()
    fine = _run(_job(template, engine, **options), engines, tmp_path / "fine", provider)
    spans = exporter.get_finished_spans
    assert fine["options"] == {**JobOptions().model_dump(), **options}
    assert fine["geometry"]["meshes"]["housing.stl"]["facets"] > coarse["geometry"]["meshes"]["housing.stl"]["facets"]
    assert (tmp_path / "fine" / "housing.stl").read_bytes().startswith(b"solid")
    step = (tmp_path / "fine" / "housing.step").read_text()
    assert "CONFIG_CONTROL_DESIGN" in step and "INCH" in step, step[:2000]
    default_step = (tmp_path / "coarse" / "housing.step").read_text()
    assert "AUTOMOTIVE_DESIGN" in default_step and "SI_UNIT(.MILLI.,.METRE.)" in default_step
    iges = (tmp_path / "fine" / "housing.iges").read_text()
    entity_types = {line[:8].strip() for line in iges.splitlines() if line[72:73] == "D"}
    assert "186" in entity_types, sorted(entity_types)
    default_iges = (tmp_path / "coarse" / "housing.iges").read_text()
    assert "186" not in {line[:8].strip() for line in default_iges.splitlines() if line[72:73] == "D"}
    subprocess_span = next(s for s in spans() if s.name.startswith("cad.subprocess"))
    assert subprocess_span.attributes["cad.option.linear_deflection"] == 0.02
    assert subprocess_span.attributes["cad.option.step_units"] == "in"
