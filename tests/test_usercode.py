"""The user's own CAD code: auto-instrumentation inside FreeCAD and OCP, the child
API, ``script`` and ``template`` jobs, and ``cadscope exec``.

Real ``freecadcmd`` (FreeCAD 0.20.2, OCCT 7.6.3), real OCP (OCCT 8.0), the real
runner, CLI, worker and API. The scripts under ``tests/data/usercode`` are
written against plain FreeCAD and OCP, with no cadscope import.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import types
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from cadscope.freecad_bridge import JobSpec, RunLimits, auto_instrumentation_env, child_path, run
from cadscope.freecad_bridge._engines import ChildTelemetry
from cadscope.freecad_bridge._runner import _decode_event
from cadscope.metrics import Catalogue, ModelObservability
from cadscope.tracing._waterfall import read_otlp_json
from cadscope.tracing.testing import in_memory_provider
from cadscope.workers.cli import main as cli_main

from .conftest import STAMPS, Recorder, normalised, wait_until

DATA = Path(__file__).resolve().parent / "data" / "usercode"
# What differs between two runs of the same script whatever cadscope does: the
# export stamps, and object addresses in the messages of pybind11's argument errors.
_STAMPS = (*STAMPS, (re.compile(rb"0x[0-9a-f]{6,16}"), b"0x<address>"))


def _normalised(path: Path) -> bytes:
    return normalised(path, _STAMPS)


def _recorded_metrics(recorder: Recorder, versions: tuple[str, str], flow_type: str = "script") -> CollectorRegistry:
    """What the worker's metrics make of a child's telemetry, on a registry of its own."""
    registry = CollectorRegistry()
    obs = ModelObservability(Catalogue(registry))
    telemetry = ChildTelemetry(obs, flow_type)
    with obs.engine_versions(*versions):
        for name, attributes, duration, error in recorder.spans:
            telemetry.span_ended(name, attributes, duration, error)
        for name, value, attributes in recorder.metrics:
            telemetry.metric(name, value, attributes)
    return registry


def _through_runner(argv: list[str], cwd: Path) -> tuple[Any, list[Any], Recorder]:
    cwd.mkdir(parents=True, exist_ok=True)
    provider, exporter = in_memory_provider()
    recorder = Recorder()
    result = run(argv, limits=RunLimits(timeout_s=300), env=auto_instrumentation_env(), cwd=str(cwd),
                 stdout_path=str(cwd / "stdout.log"), stderr_path=str(cwd / "stderr.log"),
                 tracer_provider=provider, observer=recorder)  # fmt: skip
    return result, list(exporter.get_finished_spans()), recorder


def _bare(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CADSCOPE_TELEMETRY_FD")}
    return subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def _exec(argv: list[str], cwd: Path, out: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "cadscope.workers.cli", "exec", "--out", str(out), "--", *argv],
                          cwd=cwd, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def _same_outputs(bare: Path, others: list[Path], exact: list[str], normalised: list[str]) -> None:
    for other in others:
        for name in exact:
            assert (other / name).read_bytes() == (bare / name).read_bytes(), f"{other.name}/{name}"
        for name in normalised:
            assert _normalised(other / name) == _normalised(bare / name), f"{other.name}/{name}"


def _ancestors(span: Any, by_id: dict[int, Any]) -> list[str]:
    names = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        names.append(span.name)
    return names


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def _prom_value(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


# -- FreeCAD and OCP, unchanged scripts ------------------------------------------------------------------


@pytest.mark.slow
def test_an_unchanged_freecad_script_gives_the_json_jobs_spans_and_metrics_and_the_same_results(
    tmp_path, engines, otlp_receiver
):
    freecad = engines["freecad"]
    argv = [freecad.argv[0], str(DATA / "freecad_part.py")]
    bare = _bare(argv, tmp_path / "bare")
    assert bare.returncode == 0, bare.stderr
    facts = json.loads((tmp_path / "bare" / "facts.json").read_text())
    assert set(facts["errors"]) == {"fillet_too_large", "fuse_not_a_shape", "fuse_keyword", "fuse_no_argument",
                                    "unbound_no_self", "export_into_missing_folder", "open_missing"}  # fmt: skip

    # Through the runner: spans with the JSON jobs' names, attributes and parents.
    result, spans, recorder = _through_runner(argv, tmp_path / "runner")
    assert result.ok, (result.outcome, result.error_message, result.stderr_tail)
    assert result.manifest is not None and result.manifest["kind"] == "exec"
    assert result.hello == {"engine": "freecad", "freecad_version": freecad.freecad_version,
                            "occt_version": freecad.occt_version}  # fmt: skip
    by_id = {s.context.span_id: s for s in spans}
    (script,) = [s for s in spans if s.name == "cad.script"]
    assert by_id[script.parent.span_id].name == "cad.subprocess"
    assert script.attributes["cad.script.name"] == "freecad_part.py" and script.attributes["cad.auto.failures"] == 0
    for span in spans:
        if span.name not in ("cad.subprocess", "cad.script"):
            assert "cad.script" in _ancestors(span, by_id), span.name
    named = defaultdict(list)
    for span in spans:
        named[span.name].append(span)
    ok = [s for s in spans if s.status.is_ok]
    booleans = {(s.attributes["cad.boolean.operation"], s.attributes["cad.solids_count"])
                for s in ok if s.name == "occt.boolean" and "cad.object.name" not in s.attributes}  # fmt: skip
    assert booleans == {("cut", 2), ("union", 2), ("common", 2)}
    features = {s.attributes["cad.feature"]: s for s in ok if s.name == "occt.feature" and "cad.object.name"
                not in s.attributes}  # fmt: skip
    assert features["fillet"].attributes["cad.edges_count"] == facts["fillet_edges"]
    assert features["chamfer"].attributes["cad.edges_count"] == facts["chamfer_edges"]
    assert "extrude" in features
    assert all(s.attributes["cad.memory.peak_bytes"] > 50 << 20 for s in (features["fillet"], features["chamfer"]))
    # Each recompute, with the time of each PartDesign feature and Part boolean as its children.
    recomputes = named["document.recompute"]
    children = {r.context.span_id: [s for s in spans if s.parent and s.parent.span_id == r.context.span_id]
                for r in recomputes}  # fmt: skip
    recomputed = {(c.attributes["cad.object.type"], c.attributes.get("cad.feature") or
                   c.attributes.get("cad.boolean.operation")) for kids in children.values() for c in kids}  # fmt: skip
    assert recomputed == {("PartDesign::Pad", "pad"), ("PartDesign::Pocket", "pocket"),
                          ("PartDesign::Fillet", "fillet"), ("Part::Cut", "cut")}  # fmt: skip
    design = [r for r in recomputes if r.attributes["cad.workbench"] == "PartDesign"]
    assert len(design) == 4 and all(r.attributes["cad.object_count"] > 0 for r in design)
    changed = [r for r in recomputes if "cad.parameters" in r.attributes]
    assert [r.attributes["cad.parameters"] for r in changed] == ["Params.B1=50", "Params.B1=70"]
    assert [c.attributes["cad.object.name"] for c in children[changed[1].context.span_id]] == ["Slotted"]
    # Every export path, with the size of the file it wrote.
    exports = {(s.attributes["cad.export.format"], s.attributes["cad.export.size_bytes"]) for s in ok
               if s.name == "export"}  # fmt: skip
    files = {"plate.brep": "BREP", "plate.step": "STEP", "plate.iges": "IGES", "plate.stl": "STL",
             "body.brep": "BREP", "slotted_part.brep": "BREP", "body.step": "STEP", "slotted.stl": "STL",
             "usercode.FCStd": "FCSTD"}  # fmt: skip
    assert {(fmt, (tmp_path / "runner" / name).stat().st_size) for name, fmt in files.items()} <= exports
    assert len(named["document.create"]) == 1
    # The failures the script caught are failed spans, the script's exceptions unchanged.
    failed = {(s.name, s.attributes["error.type"]) for s in spans if not s.status.is_ok and s.name != "cad.subprocess"}
    assert failed == {("occt.feature", "OCCError"), ("occt.boolean", "TypeError"), ("export", "OCCError"),
                      ("document.load", "OSError")}  # fmt: skip

    # The catalogue's CAD metrics, with the versions the engine reported.
    versions = (freecad.freecad_version, freecad.occt_version)
    registry = _recorded_metrics(recorder, versions)
    v = {"freecad_version": versions[0], "occt_version": versions[1]}
    assert (
        _sample(registry, "occt_boolean_duration_seconds_count", role="primary", operation="cut", solids_range="2", **v)
        == 3
    )
    # Failed calls are measured too, as in JSON jobs: the caught oversized fillet is the third.
    assert _sample(registry, "occt_feature_duration_seconds_count", role="primary", feature="fillet", **v) == 3
    assert _sample(registry, "freecad_recompute_duration_seconds_count", role="primary", workbench="PartDesign",
                   doc_complexity="simple", **v) + _sample(registry, "freecad_recompute_duration_seconds_count",
                   role="primary", workbench="PartDesign", doc_complexity="moderate", **v) == 4  # fmt: skip
    assert (
        _sample(
            registry, "export_duration_seconds_count", role="primary", format="STEP", file_size_range="lt_100kb", **v
        )
        == 2
    )
    assert _sample(registry, "occt_operation_memory_bytes_count", operation="boolean_cut", **v) == 1
    assert _sample(registry, "freecad_object_created_total", **{"class": "Part::Cut"}, workbench="Part", **v) == 1
    assert _sample(registry, "freecad_workbench_invocations_total", workbench="Mesh", **v) == 1
    assert (
        _sample(registry, "freecad_document_load_seconds_count", role="primary", source="new", workbench="Part", **v)
        == 1
    )

    # Through `cadscope exec`: the files, the waterfall, the collector.
    out = tmp_path / "report"
    cli = _exec(argv, tmp_path / "exec", out, {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint})
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "occt.boolean" in cli.stdout and "cadscope exec: ok" in cli.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["outcome"], summary["engine"], summary["freecad_version"], summary["occt_version"]) == (
        "ok",
        "freecad",
        *versions,
    )
    assert summary["operations"]["occt.boolean"]["calls"] == 9  # 4 on shapes, 2 recomputed, 3 failed
    prom = (out / "metrics.prom").read_text()
    assert _prom_value(prom, "occt_boolean_duration_seconds_count", operation="common", **v) == 1
    assert _prom_value(prom, "cadscope_subprocess_outcomes_total", engine="freecad", outcome="ok", **v) == 1
    with (out / "traces.jsonl").open() as lines:
        traced = [s for s in read_otlp_json(lines) if s.trace_id == summary["trace_id"]]
    ids = {s.span_id: s for s in traced}
    pad = next(s for s in traced if s.attributes.get("cad.feature") == "pad")
    chain = [pad.name]
    while pad.parent_span_id in ids:
        pad = ids[pad.parent_span_id]
        chain.append(pad.name)
    assert chain == ["occt.feature", "document.recompute", "cad.script", "cad.subprocess freecad", "cadscope exec"]
    received = otlp_receiver.wait_for(
        lambda spans: sum(s["trace_id"] == summary["trace_id"] for s in spans) >= len(traced), 30
    )
    assert {s["name"] for s in received if s["trace_id"] == summary["trace_id"]} == {s.name for s in traced}

    # Behaviour unchanged: the same files, the same objects and volumes, the same exceptions.
    _same_outputs(tmp_path / "bare", [tmp_path / "runner", tmp_path / "exec"],
                  exact=["plate.brep", "body.brep", "slotted.brep", "slotted_part.brep", "plate.stl", "slotted.stl",
                         "facts.json"],
                  normalised=["plate.step", "plate.iges", "body.step"])  # fmt: skip


@pytest.mark.slow
def test_an_unchanged_ocp_script_gives_the_json_jobs_spans_and_metrics_and_the_same_results(tmp_path, engines):
    ocp = engines["ocp"]
    argv = [ocp.argv[0], str(DATA / "ocp_part.py")]
    bare = _bare(argv, tmp_path / "bare")
    assert bare.returncode == 0, bare.stderr
    facts = json.loads((tmp_path / "bare" / "facts.json").read_text())
    assert set(facts["errors"]) == {"fuse_not_shapes", "prism_of_a_solid", "fillet_too_large"}
    assert facts["returns"]["brep_into_missing_folder"] == "False"

    result, spans, recorder = _through_runner(argv, tmp_path / "runner")
    assert result.ok, (result.outcome, result.error_message, result.stderr_tail)
    assert result.hello == {"engine": "ocp", "freecad_version": "none", "occt_version": ocp.occt_version}
    by_id = {s.context.span_id: s for s in spans}
    assert all("cad.script" in _ancestors(s, by_id) for s in spans if s.name not in ("cad.subprocess", "cad.script"))
    ok = [s for s in spans if s.status.is_ok]
    assert sorted(s.attributes["cad.boolean.operation"] for s in ok if s.name == "occt.boolean") == [
        "common",
        "cut",
        "union",
        "union",
    ]  # the constructor form and the Build() form
    features = {s.attributes["cad.feature"]: s.attributes for s in ok if s.name == "occt.feature"}
    assert set(features) == {"fillet", "chamfer", "extrude", "thickness"}
    assert features["fillet"]["cad.edges_count"] == 4 and features["chamfer"]["cad.edges_count"] == 2
    exports = {(s.attributes["cad.export.format"], s.attributes["cad.export.size_bytes"]) for s in ok
               if s.name == "export"}  # fmt: skip
    files = {"plate.brep": "BREP", "hollow.brep": "BREP", "plate.step": "STEP", "plate.iges": "IGES",
             "plate.stl": "STL"}  # fmt: skip
    assert exports == {(fmt, (tmp_path / "runner" / name).stat().st_size) for name, fmt in files.items()}
    assert [s.attributes["cad.mesh.linear_deflection"] for s in ok if s.name == "occt.mesh"] == [0.1]
    assert [s.attributes["cad.document.format"] for s in ok if s.name == "document.load"] == ["STEP"]
    failed = {(s.name, s.attributes["error.type"]) for s in spans if not s.status.is_ok and s.name != "cad.subprocess"}
    assert failed == {("occt.boolean", "TypeError"), ("occt.feature", "Standard_NoSuchObject"),
                      ("occt.feature", "StdFail_NotDone"), ("export", "ExportFailed"),
                      ("document.load", "LoadFailed")}  # fmt: skip

    versions = ("none", ocp.occt_version)
    registry = _recorded_metrics(recorder, versions)
    v = {"freecad_version": "none", "occt_version": ocp.occt_version}
    assert (
        _sample(registry, "occt_boolean_duration_seconds_count", role="primary", operation="cut", solids_range="2", **v)
        == 1
    )
    assert _sample(registry, "occt_feature_duration_seconds_count", role="primary", feature="chamfer", **v) == 1
    assert (
        _sample(
            registry, "export_duration_seconds_count", role="primary", format="STL", file_size_range="100kb_1mb", **v
        )
        == 1
    )
    # The STEP read back and the BREP read that failed: loads are timed either way, as in JSON jobs.
    assert (
        _sample(registry, "freecad_document_load_seconds_count", role="primary", source="file", workbench="Import", **v)
        == 2
    )

    cli = _exec(argv, tmp_path / "exec", tmp_path / "report")
    assert cli.returncode == 0, cli.stdout + cli.stderr
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert (summary["outcome"], summary["engine"], summary["occt_version"]) == ("ok", "ocp", ocp.occt_version)

    # Unchanged behaviour. The thick solid's BREP lists its curves in an order
    # that changes from run to run even without cadscope (OCCT's offset
    # algorithm): it is compared by volume and face count, in facts.json.
    _same_outputs(tmp_path / "bare", [tmp_path / "runner", tmp_path / "exec"],
                  exact=["plate.brep", "plate.stl"], normalised=["plate.step", "plate.iges", "facts.json"])  # fmt: skip
    assert (tmp_path / "bare" / "hollow.brep").read_bytes() != b""


@pytest.mark.slow
def test_exec_fails_when_the_script_fails_though_freecad_exits_0(tmp_path, engines):
    freecadcmd, python = engines["freecad"].argv[0], engines["ocp"].argv[0]
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    boom = "import Part\nPart.makeBox(1, 1, 1).fuse(Part.makeBox(1, 1, 1))\nraise ValueError('the macro gave up')\n"
    (scripts / "boom.py").write_text(boom)
    (scripts / "boom.FCMacro").write_text(boom)
    (scripts / "exits.py").write_text("import sys\nsys.exit(3)\n")
    (scripts / "missing.py").write_text("import OCP\nraise KeyError('no such part')\n")
    assert _bare([freecadcmd, str(scripts / "boom.py")], tmp_path / "bare").returncode == 0  # FreeCAD's lie
    cases = {
        "boom.py": ([freecadcmd, str(scripts / "boom.py")], "ValueError", "the macro gave up", 1),
        "boom.FCMacro": ([freecadcmd, str(scripts / "boom.FCMacro")], "freecad_script_error", "the macro gave up", 1),
        "exits.py": ([python, str(scripts / "exits.py")], "exit_3", "status 3", 3),
        "missing.py": ([python, str(scripts / "missing.py")], "KeyError", "no such part", 1),
    }
    for name, (argv, error_type, message, status) in cases.items():
        out = tmp_path / name
        cli = _exec(argv, tmp_path / "cwd", out)
        summary = json.loads((out / "summary.json").read_text())
        assert cli.returncode == status, (name, cli.stdout, cli.stderr)
        assert summary["outcome"] == "script_error" and summary["error_type"] == error_type, (name, summary)
        assert message in summary["error_message"], (name, summary)
        assert "cadscope exec: script_error" in cli.stdout
    # The exception is on the script's root span, and the boolean before it is traced.
    with (tmp_path / "boom.py" / "traces.jsonl").open() as lines:
        spans = {s.name: s for s in read_otlp_json(lines)}
    assert spans["cad.script"].status_code == 2 and spans["cad.script"].attributes["error.type"] == "ValueError"
    assert spans["occt.boolean"].status_code != 2 and spans["cadscope exec"].attributes["error.type"] == "script_error"


@pytest.mark.slow
def test_uninstrument_puts_every_original_back(tmp_path, engines):
    check_freecad = """
import json, FreeCAD, Part, Mesh, MeshPart, Import, cadscope_auto
def state():
    return {"fuse": type(Part.Shape.__dict__["fuse"]).__name__, "bound": type(Part.makeBox(1, 1, 1).fuse).__name__,
            "recompute": type(FreeCAD.Document.__dict__["recompute"]).__name__,
            "newDocument": hasattr(FreeCAD.newDocument, "__wrapped__"),
            "meshFromShape": hasattr(MeshPart.meshFromShape, "__wrapped__")}
before, status = state(), cadscope_auto.status()
cadscope_auto.uninstrument()
after = state()
spans = cadscope_auto.status()["spans"]
Part.makeBox(1, 1, 1).fuse(Part.makeBox(1, 1, 1))
json.dump({"before": before, "after": after, "skipped": status["skipped"], "instrumented": status["instrumented"],
           "new_spans": cadscope_auto.status()["spans"] - spans}, open("state.json", "w"))
"""
    check_ocp = """
import json, cadscope_auto
from OCP.BRepAlgoAPI import BRepAlgoAPI_Fuse
from OCP.BRepTools import BRepTools
def state():
    return {"init": hasattr(BRepAlgoAPI_Fuse.__dict__["__init__"], "__wrapped__"),
            "build": "Build" in BRepAlgoAPI_Fuse.__dict__,
            "write": type(BRepTools.__dict__["Write_s"]).__name__,
            "write_wrapped": hasattr(BRepTools.__dict__["Write_s"].__func__, "__wrapped__")}
before, status = state(), cadscope_auto.status()
cadscope_auto.uninstrument()
json.dump({"before": before, "after": state(), "skipped": status["skipped"]}, open("state.json", "w"))
"""
    found = {}
    for engine, code in (("freecad", check_freecad), ("ocp", check_ocp)):
        script = tmp_path / f"check_{engine}.py"
        script.write_text(code)
        result, _spans, _recorder = _through_runner([engines[engine].argv[0], str(script)], tmp_path / engine)
        assert result.ok, (engine, result.error_message, result.stderr_tail)
        found[engine] = json.loads((tmp_path / engine / "state.json").read_text())
    freecad = found["freecad"]
    assert freecad["before"] == {"fuse": "function", "bound": "method", "recompute": "function", "newDocument": True,
                                 "meshFromShape": True}  # fmt: skip
    assert freecad["after"] == {"fuse": "method_descriptor", "bound": "builtin_function_or_method",
                                "recompute": "method_descriptor", "newDocument": False,
                                "meshFromShape": False}  # fmt: skip
    assert freecad["skipped"] == {} and freecad["new_spans"] == 0
    assert {"Part.Shape.fuse", "FreeCAD.Document.recompute", "FreeCAD document observer"} <= set(
        freecad["instrumented"]
    )
    ocp = found["ocp"]
    assert ocp["before"] == {"init": True, "build": True, "write": "staticmethod", "write_wrapped": True}
    assert ocp["after"] == {"init": False, "build": False, "write": "staticmethod", "write_wrapped": False}
    assert ocp["skipped"] == {}


# -- script and template jobs through the API --------------------------------------------------------

TEMPLATE = """
import FreeCAD, Part, Spreadsheet
doc = FreeCAD.newDocument("bracket")
sheet = doc.addObject("Spreadsheet::Sheet", "Params")
for cell, alias, value in (("B1", "Length", "40"), ("B2", "Width", "20"), ("B3", "Height", "5")):
    sheet.set(cell, value)
    sheet.setAlias(cell, alias)
plate = doc.addObject("Part::Box", "Plate")
for prop in ("Length", "Width", "Height"):
    plate.setExpression(prop, "Params." + prop)
hole = doc.addObject("Part::Cylinder", "Hole")
hole.Radius, hole.Height = 3, 50
hole.setExpression("Placement.Base.x", "Params.Length / 2")
hole.setExpression("Placement.Base.y", "Params.Width / 2")
hole.Placement.Base.z = -10
bracket = doc.addObject("Part::Cut", "Bracket")
bracket.Base, bracket.Tool = plate, hole
doc.recompute()
doc.saveAs(%r)
"""

MARKER_SCRIPT = "open('ran.txt', 'w').write('this script ran')\n"

PLATE_SCRIPT = """
import FreeCAD, Part
import cadscope_child as cadscope
p = cadscope.parameters()
plate = Part.makeBox(p["length"], p["width"], 4)
for i in range(p["holes"]):
    plate = plate.cut(Part.makeCylinder(2, 10, FreeCAD.Vector(8 + 8 * i, p["width"] / 2, -1)))
plate.exportStep("plate.step")
cadscope.result({"volume": plate.Volume})
"""


def _submit(api: Any, spec: dict[str, Any]) -> str:
    response = httpx.post(f"{api.url}/v1/jobs", json=spec, headers=api.headers(), timeout=30)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def _finished(api: Any, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = httpx.get(f"{api.url}/v1/jobs/{job_id}", headers=api.headers(), timeout=10).json()
        return body if body.get("state") == "finished" else None

    return wait_until(done, 180, interval=0.2, what=f"{job_id} finished")  # type: ignore[no-any-return]


@pytest.mark.slow
def test_template_and_script_jobs_through_the_api(start_worker, start_api, engines, tmp_path):
    worker = start_worker(concurrency=1)
    api = start_api(worker)
    store = worker.data_dir / "store"
    (store / "templates").mkdir(parents=True)
    (store / "scripts").mkdir()
    template = store / "templates" / "bracket.FCStd"
    subprocess.run([engines["freecad"].argv[0], "-c", TEMPLATE % str(template)], check=True, capture_output=True,
                   timeout=120)  # fmt: skip
    digest = hashlib.sha256(template.read_bytes()).hexdigest()

    # A template, two parameter sets: a cell by alias and a property; a cell by address.
    runs = {
        "wide": ({"Params.Length": 60, "Params.Width": 30}, 60 * 30 * 5 - math.pi * 9 * 5),
        "tall": ({"Params.B3": 12, "Hole.Radius": 4}, 40 * 20 * 12 - math.pi * 16 * 12),
    }
    jobs = {
        name: _submit(api, {"name": "bracket", "template": {"uri": "store://templates/bracket.FCStd", "sha256": digest},
                            "parameters": params, "exports": [{"format": "step", "of": "Bracket", "name": "bracket"},
                                                              {"format": "stl", "of": "Bracket", "name": "bracket"}]})
        for name, (params, _volume) in runs.items()
    }  # fmt: skip
    for name, job_id in jobs.items():
        body = _finished(api, job_id)
        assert body["status"] == "succeeded", body
        assert body["manifest"]["parts"]["Bracket"]["volume"] == pytest.approx(runs[name][1], rel=1e-6)
        assert {a["name"] for a in body["artifacts"]} == {"bracket.step", "bracket.stl"}
        assert all(a["deterministic"] for a in body["artifacts"])

    # A registered script with its parameters; and one whose sha256 does not match,
    # refused before any engine starts.
    (store / "scripts" / "plate.py").write_text(PLATE_SCRIPT)
    (store / "scripts" / "marker.py").write_text(MARKER_SCRIPT)
    good = _submit(api, {
        "name": "plate", "engine": "freecad", "parameters": {"length": 40, "width": 20, "holes": 2},
        "script": {"uri": "store://scripts/plate.py", "sha256": hashlib.sha256(PLATE_SCRIPT.encode()).hexdigest()},
        "outputs": [{"name": "plate", "format": "step"}]})  # fmt: skip
    approved = hashlib.sha256(b"what the operator approved").hexdigest()
    tampered = _submit(api, {
        "name": "marker", "engine": "ocp", "outputs": [{"name": "x", "format": "brep"}],
        "script": {"uri": "store://scripts/marker.py", "sha256": approved}})  # fmt: skip
    promised = _submit(api, {
        "name": "plate", "engine": "freecad", "parameters": {"length": 40, "width": 20, "holes": 0},
        "script": {"uri": "store://scripts/plate.py", "sha256": hashlib.sha256(PLATE_SCRIPT.encode()).hexdigest()},
        "outputs": [{"name": "plate", "format": "step"}, {"name": "plate", "format": "stl"}]})  # fmt: skip
    broken = _finished(api, promised)
    assert (broken["outcome"], broken["error_type"]) == ("bad_output", "missing_output"), broken
    assert "plate.stl" in broken["error_message"]
    body = _finished(api, good)
    assert body["status"] == "succeeded", body
    assert body["manifest"]["result"]["volume"] == pytest.approx(40 * 20 * 4 - 2 * math.pi * 4 * 4, rel=1e-6)
    refused = _finished(api, tampered)
    assert (refused["status"], refused["outcome"], refused["error_type"]) == ("failed", "rejected", "checksum_mismatch")
    assert not list(worker.data_dir.glob("jobs/*/ran.txt"))

    text = worker.scrape()
    v = {"freecad_version": engines["freecad"].freecad_version, "occt_version": engines["freecad"].occt_version}
    assert _prom_value(text, "cadscope_security_violations_total", violation_type="checksum_mismatch",
                       severity="critical") == 1  # fmt: skip
    # Engines ran for the two templates and the two good scripts, never for the refused one.
    assert sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "cadscope_subprocess_outcomes_total") == 4  # fmt: skip
    assert _prom_value(text, "cadscope_subprocess_outcomes_total", engine="freecad", outcome="bad_output", **v) == 1
    assert _prom_value(text, "model_generation_completed_total", flow_type="template", status="success", **v) == 2
    assert _prom_value(text, "model_generation_completed_total", flow_type="script", status="success", **v) == 1
    assert _prom_value(text, "model_generation_completed_total", flow_type="script", status="failure", **v) == 1
    assert _prom_value(text, "occt_boolean_duration_seconds_count", operation="cut", **v) == 4  # 2 recomputes, 2 holes
    assert _prom_value(text, "freecad_recompute_duration_seconds_count", workbench="Part", **v) == 2


# -- fast: the child API, the wrappers' contract, the schema, the CLI ---------------------------------------


def test_the_child_api_is_a_no_op_without_a_pipe(tmp_path):
    code = """
import json, sys
import cadscope_child as cadscope
with cadscope.span("bracket.ribs", {"cad.ribs": 4}) as span:
    span["cad.volume"] = 1.5
cadscope.metric("occt.memory", 1, operation="ribs")
cadscope.progress(phase="ribs")
cadscope.result({"mass_kg": 1.25})
print(json.dumps({"enabled": cadscope.enabled, "parameters": cadscope.parameters(), "out": cadscope.output_dir(),
                  "auto": "cadscope_auto" in sys.modules}))
"""
    env = {k: v for k, v in os.environ.items() if k != "CADSCOPE_TELEMETRY_FD"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": child_path()},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert json.loads(proc.stdout) == {"enabled": False, "parameters": {}, "out": str(tmp_path), "auto": False}


def test_the_child_api_reports_through_the_runner(tmp_path):
    script = tmp_path / "mine.py"
    script.write_text("""
import cadscope_child as cadscope
with cadscope.span("My Step!", {"cad.Ribs": 4, "skip": [1]}) as outer:
    with cadscope.span("occt.boolean", {"cad.boolean.operation": "union", "cad.solids_count": 3}):
        pass
    outer["cad.volume"] = 1.5
try:
    with cadscope.span("bracket.check"):
        raise ValueError("too thin")
except ValueError:
    pass
cadscope.metric("occt.memory", 123456, operation="ribs")
cadscope.progress(phase="ribs", done=1, total=2)
cadscope.result({"mass_kg": 1.25})
# A program the script starts inherits neither the telemetry pipe nor its variable.
import os, subprocess, sys
subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('CADSCOPE_TELEMETRY_FD'), "
                "sorted(int(f) for f in os.listdir('/proc/self/fd')))"], close_fds=False, stdout=open("fds", "w"))
""")
    result, spans, recorder = _through_runner([sys.executable, str(script)], tmp_path)
    assert result.ok, (result.error_message, result.stderr_tail)
    variable, fds = (tmp_path / "fds").read_text().split(" ", 1)
    assert variable == "None" and not result.dropped
    assert set(json.loads(fds)) <= {0, 1, 2, 3}  # the standard streams and listdir's own
    assert result.manifest == {"kind": "exec", "exports": [], "result": {"mass_kg": 1.25}}
    by_name = {s.name: s for s in spans}
    assert dict(by_name["my step_"].attributes) == {"cad.ribs": 4, "cad.volume": 1.5}
    assert by_name["occt.boolean"].parent.span_id == by_name["my step_"].context.span_id
    assert by_name["my step_"].parent.span_id == by_name["cad.script"].context.span_id
    assert by_name["bracket.check"].attributes["error.type"] == "ValueError"
    assert recorder.progress_events == [{"phase": "ribs", "done": 1, "total": 2}]
    assert ("occt.memory", 123456.0, {"operation": "ribs"}) in recorder.metrics
    registry = _recorded_metrics(recorder, ("none", "8.0.1"))
    assert _sample(registry, "occt_boolean_duration_seconds_count", role="primary", operation="union",
                   solids_range="3-5",
                   freecad_version="none", occt_version="8.0.1") == 1  # fmt: skip


def _child_modules() -> tuple[Any, Any]:
    sys.path.insert(0, child_path())
    try:
        import cadscope_auto
        import cadscope_probe
    finally:
        sys.path.remove(child_path())
    return cadscope_auto, cadscope_probe


def test_wrappers_pass_everything_through_and_count_only_their_own_failures(monkeypatch):
    auto, probe_module = _child_modules()
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    probe = probe_module.Probe(write_end, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    monkeypatch.setattr(auto, "_probe", probe)
    monkeypatch.setattr(auto, "_state", auto._State())
    monkeypatch.setattr(auto, "SPANS_PER_OPERATION", 3)
    fake = types.ModuleType("fake")
    marker = object()
    raised = RuntimeError("from the original")

    def work(value, fail=False):
        if fail:
            raise raised
        return marker if value is None else value

    fake.work = work
    site = auto._Site("occt.boolean", lambda a, k: {"cad.boolean.operation": "cut", "cad.solids_count": 2})
    broken = auto._Site("occt.feature", lambda a, k: 1 / 0)  # a wrapper that fails reading its attributes
    assert auto._wrap_function(fake, "work", "fake.work", site) is None
    fake.other = work
    assert auto._wrap_function(fake, "other", "fake.other", broken) is None
    assert fake.work is not work and fake.work.__wrapped__ is work and fake.work.__name__ == "work"

    results = [fake.work(None) for _ in range(10)]
    assert all(r is marker for r in results)  # the very object, every call
    with pytest.raises(RuntimeError) as caught:
        fake.work(1, fail=True)
    assert caught.value is raised  # the very exception
    assert fake.other(None) is marker and auto.status()["failures"] == 1
    probe.flush()
    events = [_decode_event(line) for line in os.read(read_end, 1 << 20).splitlines()]
    starts = [e for e in events if e["t"] == "start"]
    observed = [e for e in events if e["t"] == "metric" and e["n"] == "occt.boolean.ns"]
    # The first three calls are spans; the next seven observations; the failure past the budget a span again.
    assert [e["n"] for e in starts] == ["occt.boolean"] * 4
    assert len(observed) == 7 and all(e["a"] == {"cad.boolean.operation": "cut", "cad.solids_count": 2}
                                      and type(e["v"]) is int and 0 <= e["v"] < 10**9 for e in observed)  # fmt: skip
    failed = [e for e in events if e["t"] == "end" and e.get("s") == "error"]
    assert [(e["e"], e["m"]) for e in failed] == [("RuntimeError", "from the original")]
    assert auto.status()["observed"] == 7 and auto.status()["spans"] == 4

    auto.uninstrument()
    assert fake.work is work and fake.other is work
    os.close(read_end)
    os.close(write_end)


def test_observations_and_the_user_code_flows_reach_the_seed_metrics():
    registry = CollectorRegistry()
    obs = ModelObservability(Catalogue(registry))
    with obs.engine_versions("0.20.2", "7.6.3"):
        for flow in ("script", "template"):
            telemetry = ChildTelemetry(obs, flow)
            telemetry.span_ended("cad.stage generate", {"cad.stage": "generate"}, 0.5, None)
        # A call past its span budget arrives as a metric event named after the span, in nanoseconds.
        telemetry.metric("occt.boolean.ns", 4_000_000, {"cad.boolean.operation": "union", "cad.solids_count": 2})
        telemetry.metric("occt.feature.ns", 2_000_000, {"cad.feature": "extrude"})
        telemetry.metric("document.load.ns", 100_000_000, {"cad.document.source": "file", "cad.workbench": "Part"})
        telemetry.metric("export.ns", 10_000_000, {"cad.export.format": "STEP", "cad.export.size_bytes": 2000})
        telemetry.metric("occt.boolean", 0.004, {"cad.boolean.operation": "union"})  # not an observation
    v = {"freecad_version": "0.20.2", "occt_version": "7.6.3"}
    for flow in ("script", "template"):
        assert _sample(registry, "model_generation_stage_duration_seconds_count", role="primary", flow_type=flow,
                       stage="generate",
                       **v) == 1  # fmt: skip
    assert (
        _sample(registry, "occt_boolean_duration_seconds_sum", role="primary", operation="union", solids_range="2", **v)
        == 0.004
    )
    assert _sample(registry, "occt_feature_duration_seconds_count", role="primary", feature="extrude", **v) == 1
    assert (
        _sample(registry, "freecad_document_load_seconds_count", role="primary", source="file", workbench="Part", **v)
        == 1
    )
    assert (
        _sample(
            registry, "export_duration_seconds_count", role="primary", format="STEP", file_size_range="lt_100kb", **v
        )
        == 1
    )
    assert _sample(registry, "cadscope_telemetry_events_rejected_total", reason="unknown_metric") == 1


SCRIPT = {
    "name": "plate",
    "engine": "freecad",
    "script": {"uri": "store://scripts/plate.py", "sha256": "a" * 64},
    "parameters": {"length": 40, "nested": {"list": [1, 2]}},
    "outputs": [{"name": "plate", "format": "step"}],
}
TEMPLATE_JOB = {"name": "bracket", "template": {"uri": "store://templates/b.FCStd", "sha256": "b" * 64},
                "parameters": {"Params.Length": 60, "Pad.Length": "12 mm", "Pad.Reversed": True},
                "exports": [{"format": "step", "of": "Body", "name": "b"}]}  # fmt: skip


def test_script_and_template_jobs_are_data_never_code():
    script = JobSpec.model_validate(SCRIPT)
    assert (script.flow_type, script.stored_document().format, script.formats()) == ("script", "py", set())
    template = JobSpec.model_validate(TEMPLATE_JOB)
    assert (template.flow_type, template.engine, template.stored_document().format) == ("template", "freecad", "fcstd")
    bad = {
        "inline source": {**SCRIPT, "source": "import os"},
        "a key outside scripts/": {**SCRIPT, "script": {"uri": "store://uploads/plate.py", "sha256": "a" * 64}},
        "a key leaving the store": {**SCRIPT, "script": {"uri": "store://scripts/../x.py", "sha256": "a" * 64}},
        "a script from a URL": {**SCRIPT, "script": {"uri": "https://example.com/x.py", "sha256": "a" * 64}},
        "no sha256": {**SCRIPT, "script": {"uri": "store://scripts/plate.py"}},
        "any engine": {**SCRIPT, "engine": "auto"},
        "no outputs": {**SCRIPT, "outputs": []},
        "a path as output": {**SCRIPT, "outputs": [{"name": "../x", "format": "step"}]},
        "parts too": {**SCRIPT, "parts": [{"name": "p", "steps": [{"kind": "box", "name": "b", "length": 1,
                                                                   "width": 1, "height": 1}]}]},
        "another flow": {**SCRIPT, "flow_type": "parametric"},
        "a fault": {**SCRIPT, "fault": "segfault"},
        "huge parameters": {**SCRIPT, "parameters": {"x": "y" * (70 << 10)}},
        "a formula": {**TEMPLATE_JOB, "parameters": {"Params.Length": "=Params.Width * 2"}},
        "a nested value": {**TEMPLATE_JOB, "parameters": {"Params.Length": [1, 2]}},
        "a bad key": {**TEMPLATE_JOB, "parameters": {"Params": 1}},
        "the OCP engine": {**TEMPLATE_JOB, "engine": "ocp"},
        "both": {**TEMPLATE_JOB, "script": SCRIPT["script"]},
    }  # fmt: skip
    for why, data in bad.items():
        with pytest.raises(ValidationError):
            JobSpec.model_validate(data)
            pytest.fail(f"accepted a job with {why}")


def test_exec_cli_errors_are_one_line_and_non_zero(capsys, tmp_path):
    cases = [
        (["exec"], 2, "no command given"),
        (["exec", "--", "no-such-program-cadscope"], 127, "command not found: no-such-program-cadscope"),
        (["exec", "--engine-name", "9 lives", "--", "true"], 2, "--engine-name"),
        (["exec", "--timeout", "0", "--", "true"], 2, "--timeout must be positive"),
        (["exec", "--out", str(tmp_path / "file" / "sub"), "--", "true"], 2, "cannot use --out"),
    ]
    (tmp_path / "file").write_text("not a folder")
    for argv, status, message in cases:
        assert cli_main(argv) == status, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("cadscope exec: ") and message in err, (argv, err)


@pytest.mark.slow
def test_the_overhead_benchmark_runs_on_both_engines(tmp_path):
    # A smoke run (no timing is asserted): each engine's per-call and script rows are there.
    out = tmp_path / "results.md"
    bench = Path(__file__).resolve().parent.parent / "bench" / "usercode_overhead.py"
    proc = subprocess.run([sys.executable, str(bench), "--rounds", "1", "--calls", "200", "--n", "200",
                           "--write", str(out)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = out.read_text().splitlines()
    rows = [line.split(" | ")[0].lstrip("| ") for line in lines if " µs |" in line or " s |" in line]
    assert rows == ["freecad", "ocp", "freecad, 9 extrusions + 1 cut", "ocp, 9 extrusions + 1 cut",
                    "freecad, 9 extrusions + 1 cut per 10", "ocp, 9 extrusions + 1 cut per 10",
                    "freecad, extrusions only (worst case)", "ocp, extrusions only (worst case)"]  # fmt: skip
