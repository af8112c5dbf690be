"""Runs a ``template`` job in FreeCAD: a parametric FCStd document, its parameters, a recompute, exports.

Run as ``freecadcmd engine_template.py`` with this folder first on
``PYTHONPATH``, so the document's load, its recompute (each feature's time as
a child span) and the exports are auto-instrumented as in any FreeCAD script.
Stages, as in a JSON job:

- ``cad.stage generate``: open the verified copy of the template; set each
  parameter (``Sheet.Cell`` or ``Sheet.Alias`` on a spreadsheet, else
  ``Object.Property``); recompute. An object left invalid fails the job,
  naming it.
- ``cad.stage export``: each export's object's shape, written as JSON jobs
  write it, with its volume, area and topology counts in the manifest.
- ``cad.stage validate_export``: each export written again and compared,
  without the timestamps the formats carry.

Parameter values are data: a number, a boolean, or a string that is not a
formula; nothing is evaluated.
"""

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cadscope_auto  # noqa: E402
import cadscope_child  # noqa: E402
import cadscope_job  # noqa: E402
import FreeCAD  # noqa: E402  (FreeCAD's Python only)
import Part  # noqa: E402, F401 - loaded (and instrumented, its version reported) before any shape is

_CELL = re.compile(r"^[A-Z]{1,3}[0-9]{1,5}$")
JobError = cadscope_job.JobError


class _Exporter:
    """Writes a shape the way the JSON jobs' FreeCAD engine does (like for like)."""

    def export(self, shape, fmt, path):
        if fmt == "step":
            shape.exportStep(path)
        elif fmt == "brep":
            shape.exportBrep(path)
        elif fmt == "iges":
            shape.exportIges(path)
        elif fmt == "stl":
            shape.exportStl(path)
        elif fmt == "obj":
            import Mesh
            import MeshPart

            mesh = MeshPart.meshFromShape(Shape=shape, LinearDeflection=0.1, AngularDeflection=0.5)
            Mesh.Mesh(mesh).write(path)
        else:
            raise JobError("format %r not supported by the FreeCAD engine" % fmt)


def _object(doc, name):
    obj = doc.getObject(name)
    if obj is None:
        matches = doc.getObjectsByLabel(name)
        obj = matches[0] if len(matches) == 1 else None
    if obj is None:
        raise JobError("the template has no object named %r" % name)
    return obj


def _cell_text(value):
    if isinstance(value, bool):
        return "1" if value else "0"
    return value if isinstance(value, str) else repr(value)


def apply_parameters(doc, parameters):
    for key, value in parameters.items():
        name, field = key.split(".", 1)
        obj = _object(doc, name)
        if obj.TypeId == "Spreadsheet::Sheet":
            cell = field if _CELL.match(field) else obj.getCellFromAlias(field)
            if not cell:
                raise JobError("spreadsheet %r has no cell or alias %r" % (name, field))
            obj.set(cell, _cell_text(value))
        else:
            if field not in obj.PropertiesList:
                raise JobError("object %r has no property %r" % (name, field))
            try:
                setattr(obj, field, value)
            except (TypeError, ValueError) as exc:
                raise JobError("%s = %r: %s" % (key, value, exc)) from None
            cadscope_auto.note_parameter(key, value)


def _properties(shape):
    return {
        "volume": shape.Volume,
        "area": shape.Area,
        "solids": len(shape.Solids),
        "faces": len(shape.Faces),
        "edges": len(shape.Edges),
        "vertices": len(shape.Vertexes),
    }


def main():
    with open(os.environ["CADSCOPE_JOB"]) as handle:
        payload = json.load(handle)
    job = payload["job"]
    out = os.environ["CADSCOPE_OUT"]
    run = cadscope_child._run
    probe = run.probe
    cadscope_auto.instrument()
    exporter = _Exporter()
    try:
        with probe.span("cad.stage generate", {"cad.stage": "generate"}):
            doc = FreeCAD.openDocument(payload["input_path"], True)  # hidden: no view objects
            apply_parameters(doc, job["parameters"])
            probe.progress(kind="template", phase="parameters_set", count=len(job["parameters"]))
            doc.recompute()
            invalid = [o.Name for o in doc.Objects if "Invalid" in o.State]
            if invalid:
                raise JobError("objects failed to recompute: %s" % ", ".join(invalid))
            probe.progress(kind="document", phase="recompute_done")

        targets, parts, artifacts = {}, {}, []
        with probe.span("cad.stage export", {"cad.stage": "export"}):
            for index, export in enumerate(job["exports"]):
                obj = _object(doc, export["of"])
                shape = getattr(obj, "Shape", None)
                if shape is None or shape.isNull():
                    raise JobError("object %r has no shape to export" % export["of"])
                targets[export["of"]] = shape
                parts[export["of"]] = _properties(shape)
                name = "%s.%s" % (export["name"], cadscope_job.EXPORT_EXT[export["format"]])
                path = os.path.join(out, name)
                exporter.export(shape, export["format"], path)
                artifacts.append(
                    {
                        "name": name,
                        "format": export["format"],
                        "of": export["of"],
                        "size": os.path.getsize(path),
                        "sha256": cadscope_job.sha256_file(path),
                        "validate": export.get("validate_determinism", True),
                    }
                )
                probe.progress(kind="export", phase="exported", format=export["format"], done=index + 1,
                               total=len(job["exports"]))  # fmt: skip

        with probe.span("cad.stage validate_export", {"cad.stage": "validate_export"}), cadscope_auto.paused():
            cadscope_job._validate_exports(exporter, probe, out, targets, artifacts)
    except BaseException as exc:
        run.fail(exc)
        run.flush_counts()
        raise

    run.manifest = lambda: {
        "job_id": job.get("job_id"),
        "kind": "template",
        "engine": "freecad",
        "parameters": job["parameters"],
        "parts": parts,
        "artifacts": artifacts,
        "objects": len(doc.Objects),
        "result": dict(run.result),
    }
    run.finish()


main()
