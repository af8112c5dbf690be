"""Engine-neutral interpreter of a validated job (standard library only).

The worker validates a job with pydantic and hands the child its JSON. This
module walks it in stages and calls an engine *backend* (FreeCAD or OCP) for
every geometric operation, wrapping each in a probe span whose name and
attributes the worker maps onto the catalogue's CAD metrics:

    cad.stage <stage>       stage=generate|assemble|export|validate_export
    document.create         (source=new)
    document.recompute      object_count
    occt.boolean            operation, solids_count
    occt.feature            feature, edges_count
    a4.lcs_resolution       lcs_count
    a4.solve                solver, constraints_count, lcs_count, iterations
    material.apply_property property;  material.apply_appearance appearance_type
    topology.hash           scope=part|assembly
    export                  format, size_bytes

The job's parameters are data: nothing here is ``eval``'d or formatted into code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re

from cadscope_probe import peak_rss_bytes, reset_peak_rss

__all__ = ["DEFAULT_OPTIONS", "JobError", "effective_options", "mesh_facets", "run_job"]

PRIMITIVES = ("box", "cylinder", "sphere", "cone", "torus", "extrusion")
EXPORT_EXT = {"step": "step", "stl": "stl", "brep": "brep", "iges": "iges", "obj": "obj"}
# Export headers carry wall-clock stamps (STEP FILE_NAME, IGES global section)
# and OCCT's STEP translator numbers its products per session ("... 7.6 2" on a
# process's second export): determinism is judged without either.
_STAMPS = (
    (re.compile(rb"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:[+-]\d{2}:\d{2})?"), b"<stamp>"),
    (re.compile(rb"\d{1,2}H\d{8}\.\d{6}"), b"<stamp>"),
    (re.compile(rb"(Open CASCADE STEP translator [0-9.]+) [0-9.]+"), rb"\1 <n>"),
)


class JobError(Exception):
    """The job cannot be carried out as specified (a user error, not a crash)."""


# -- work options: what changes the work, the same on every engine --------------
# The defaults are the job schema's (``JobOptions``): a job the worker validated
# carries all of them; a bare child run (``cadscope exec``, a test) gets these.
DEFAULT_OPTIONS = {
    "linear_deflection": 0.1,
    "angular_deflection": 0.5,
    "relative": False,
    "stl_format": "binary",
    "step_schema": "AP214",
    "step_units": "mm",
    "iges_mode": "faces",
    "iges_units": "mm",
    "fuzzy_value": 0.0,
    "parallel": True,
}
# OCCT's names (``write.step.schema``, ``write.step.unit``, ``write.iges.unit``) for the schema's.
STEP_SCHEMAS = {"AP203": "AP203", "AP214": "AP214IS", "AP242": "AP242DIS"}
STEP_UNITS = {"mm": "MM", "m": "M", "in": "INCH"}
IGES_UNITS = {"mm": "MM", "m": "M", "in": "IN"}


def effective_options(options):
    """The job's options over the defaults: what the engine applies and the manifest records."""
    merged = dict(DEFAULT_OPTIONS)
    merged.update({k: v for k, v in (options or {}).items() if k in DEFAULT_OPTIONS})
    return merged


def mesh_facets(path, fmt):
    """Facets (triangles) in a written STL (binary or ASCII) or OBJ file, read from the file itself."""
    if fmt == "stl":
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(84)
            if len(head) == 84:
                count = int.from_bytes(head[80:84], "little")
                if size == 84 + 50 * count:
                    return count
            handle.seek(0)
            return sum(1 for line in handle if line.lstrip().startswith(b"facet "))
    if fmt == "obj":
        with open(path, "rb") as handle:
            # A polygon of n corners is n - 2 triangles.
            return sum(len(line.split()) - 3 for line in handle if line.startswith(b"f "))
    return None


# -- placements: 3x4 row-major matrices, pure Python -------------------------


def placement_matrix(placement):
    """A ``{"position": [x,y,z], "rotation": {"axis": [..], "angle": deg}}`` as 3x4."""
    placement = placement or {}
    x, y, z = placement.get("position") or (0.0, 0.0, 0.0)
    rotation = placement.get("rotation") or {}
    ax, ay, az = rotation.get("axis") or (0.0, 0.0, 1.0)
    angle = math.radians(rotation.get("angle") or 0.0)
    norm = math.sqrt(ax * ax + ay * ay + az * az) or 1.0
    ax, ay, az = ax / norm, ay / norm, az / norm
    c, s, t = math.cos(angle), math.sin(angle), 1 - math.cos(angle)
    return [
        [t * ax * ax + c, t * ax * ay - s * az, t * ax * az + s * ay, x],
        [t * ax * ay + s * az, t * ay * ay + c, t * ay * az - s * ax, y],
        [t * ax * az - s * ay, t * ay * az + s * ax, t * az * az + c, z],
    ]


def compose(a, b):
    """a * b for rigid 3x4 matrices."""
    out = []
    for i in range(3):
        row = [sum(a[i][k] * b[k][j] for k in range(3)) for j in range(3)]
        row.append(sum(a[i][k] * b[k][3] for k in range(3)) + a[i][3])
        out.append(row)
    return out


def invert(m):
    """Inverse of a rigid 3x4 matrix (rotation transposed)."""
    rt = [[m[j][i] for j in range(3)] for i in range(3)]
    t = [-sum(rt[i][k] * m[k][3] for k in range(3)) for i in range(3)]
    return [rt[i] + [t[i]] for i in range(3)]


IDENTITY = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]


# -- helpers ------------------------------------------------------------------


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def normalised_digest(path):
    with open(path, "rb") as handle:
        data = handle.read()
    for pattern, replacement in _STAMPS:
        data = pattern.sub(replacement, data)
    return hashlib.sha256(data).hexdigest()


def select_edges(backend, shape, selector):
    """Edge indices for ``all``, ``vertical``, ``top``, ``bottom`` or explicit indices."""
    boxes = backend.edge_boxes(shape)
    if isinstance(selector, list):
        bad = [i for i in selector if not 0 <= i < len(boxes)]
        if bad:
            raise JobError("edge indices %s out of range (shape has %d edges)" % (bad, len(boxes)))
        return list(selector)
    if selector == "all":
        return list(range(len(boxes)))
    zmin = min(b[2] for b in boxes)
    zmax = max(b[5] for b in boxes)
    eps = 1e-6 * max(1.0, zmax - zmin)
    if selector == "vertical":
        picked = [
            i for i, b in enumerate(boxes) if abs(b[0] - b[3]) < eps and abs(b[1] - b[4]) < eps and b[5] - b[2] > eps
        ]
    elif selector == "top":
        picked = [i for i, b in enumerate(boxes) if abs(b[2] - zmax) < eps and abs(b[5] - zmax) < eps]
    elif selector == "bottom":
        picked = [i for i, b in enumerate(boxes) if abs(b[2] - zmin) < eps and abs(b[5] - zmin) < eps]
    else:
        raise JobError("unknown edge selector %r" % (selector,))
    if not picked:
        raise JobError("edge selector %r matched no edge" % (selector,))
    return picked


def topology_hash(backend, shape):
    """A digest of the shape's topology and geometry, stable across runs.

    Counts of sub-shapes, volume and the sorted vertex cloud rounded to a
    micrometre: two engines that build the same solid agree on it.
    """
    props = backend.properties(shape)
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            [props["solids"], props["faces"], props["edges"], props["vertices"], round(props["volume"], 3)]
        ).encode()
    )
    for vertex in sorted(tuple(round(c, 3) + 0.0 for c in v) for v in backend.vertices(shape)):
        digest.update(("%.3f,%.3f,%.3f;" % vertex).encode())
    return digest.hexdigest()


def _memory(span, operation, probe):
    peak = peak_rss_bytes()
    span["cad.memory.peak_bytes"] = peak
    probe.metric("occt.memory", peak, operation=operation)


# -- the stages ----------------------------------------------------------------


class _Materials:
    """The shipped material library, read once per process (a cache: hit or miss)."""

    def __init__(self, path, probe):
        self._path = path
        self._probe = probe
        self._cards = None
        self.library = "standard"

    def card(self, material_id):
        if self._cards is None:
            try:
                with open(self._path) as handle:
                    library = json.load(handle)
                self.library = str(library.get("library", "standard"))
                self._cards = {card["id"]: card for card in library["materials"]}
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self._probe.metric("material.library", 1, library=self.library, result="error")
                raise JobError("material library unreadable: %s" % exc) from None
            result = "miss"
        else:
            result = "hit"
        card = self._cards.get(material_id)
        if card is None:
            self._probe.metric("material.library", 1, library=self.library, result="error")
            raise JobError("material %r is not in library %r" % (material_id, self.library))
        self._probe.metric("material.library", 1, library=self.library, result=result)
        return card


def _load_input(backend, probe, document, matrix):
    """The job's input document, already verified by the worker (sha256), as a solid."""
    fmt = document["format"]
    attrs = {"cad.document.source": "upload", "cad.document.format": fmt, "cad.workbench": "Import"}
    with probe.span("document.load", attrs) as span:
        shape = backend.load(document["path"], fmt)
        span["cad.document.size_bytes"] = os.path.getsize(document["path"])
    probe.progress(kind="document_load", stage="load", ratio=1.0)
    with probe.span("document.validate", {"cad.document.format": fmt}) as span:
        valid = backend.is_valid(shape)
        span["cad.document.valid"] = valid
    if not valid:
        raise JobError("the input document does not hold a valid solid")
    probe.progress(kind="document_load", stage="validate", ratio=1.0)
    return backend.transform(shape, matrix)


def _build_part(backend, probe, part, document=None):
    steps = part["steps"]
    imported = {}
    for step in steps:
        if step["kind"] == "import":
            imported[step["name"]] = _load_input(backend, probe, document, placement_matrix(step.get("placement")))
    with probe.span("document.phase", {"cad.part": part["name"], "cad.phase": "create_objects"}):
        handles = {}
        for step in steps:
            if step["kind"] in PRIMITIVES:
                handles[step["name"]] = backend.primitive(step, placement_matrix(step.get("placement")))
                probe.metric("freecad.object_created", 1, cls=backend.object_class(step["kind"]), workbench="Part")
    with probe.span("document.recompute", {"cad.object_count": len(handles), "cad.workbench": "Part"}) as span:
        shapes = backend.recompute(handles)
        span["cad.object_count"] = backend.object_count()
    shapes.update(imported)
    probe.progress(kind="document", phase="recompute_done", part=part["name"])

    for step in steps:
        kind = step["kind"]
        if kind == "boolean":
            operands = [shapes[name] for name in step["operands"]]
            attrs = {"cad.boolean.operation": step["operation"], "cad.solids_count": len(operands)}
            with probe.span("occt.boolean", attrs) as span:
                reset_peak_rss()
                shapes[step["name"]] = backend.boolean(step["operation"], operands)
                _memory(span, "boolean_" + step["operation"], probe)
            probe.metric(
                "freecad.object_created", 1, cls=backend.object_class(kind, step["operation"]), workbench="Part"
            )
        elif kind in ("fillet", "chamfer"):
            target = shapes[step["target"]]
            edges = select_edges(backend, target, step.get("edges", "all"))
            size = step["radius"] if kind == "fillet" else step["size"]
            with probe.span("occt.feature", {"cad.feature": kind, "cad.edges_count": len(edges)}) as span:
                reset_peak_rss()
                shapes[step["name"]] = backend.feature(kind, target, size, edges)
                _memory(span, kind, probe)
            probe.metric("freecad.object_created", 1, cls=backend.object_class(kind), workbench="Part")
    result = shapes[part.get("result") or steps[-1]["name"]]
    backend.add_result(part["name"], result)
    return result


def _apply_material(backend, probe, materials, part, shape):
    card = materials.card(part["material"])
    props = backend.properties(shape)
    with probe.span("material.apply_property", {"cad.material.property": "density", "cad.material": card["id"]}):
        density = float(card["density_kg_m3"])
        # volume is in mm^3; kg = mm^3 * 1e-9 m^3/mm^3 * kg/m^3
        mass = props["volume"] * 1e-9 * density
        backend.set_property(part["name"], "density_kg_m3", density)
        backend.set_property(part["name"], "mass_kg", mass)
    appearance = card.get("appearance") or {}
    appearance_type = "color" if "color" in appearance else "none"
    with probe.span("material.apply_appearance", {"cad.material.appearance_type": appearance_type}):
        backend.set_appearance(part["name"], appearance)
    return {"material": card["id"], "density_kg_m3": density, "mass_kg": mass}


def _assemble(backend, probe, job, parts):
    assembly = job["assembly"]
    instances = assembly["instances"]
    lcs_of = {p["name"]: p.get("lcs") or {} for p in job["parts"]}
    lcs_count = sum(len(v) for v in lcs_of.values())
    by_name = {inst["name"]: inst for inst in instances}
    constraints = [inst for inst in instances if inst.get("attach")]

    with probe.span("a4.lcs_resolution", {"cad.lcs_count": lcs_count}):
        lcs_matrix = {}
        for part_name, frames in lcs_of.items():
            lcs_matrix[(part_name, "origin")] = IDENTITY
            for lcs_name, frame in frames.items():
                lcs_matrix[(part_name, lcs_name)] = placement_matrix(frame)

    attrs = {
        "cad.a4.solver": "lcs_attachment",
        "cad.a4.constraints_count": len(constraints),
        "cad.lcs_count": lcs_count,
    }
    with probe.span("a4.solve", attrs) as span:
        # Assembly4 attaches each instance's own LCS onto an LCS of its parent.
        # Resolve placements by fixed-point passes: an instance is placed once
        # its parent is; a pass that places nothing means a cycle or a dangling
        # parent, which the schema should have refused.
        placed = {}
        iterations = 0
        pending = list(instances)
        while pending:
            iterations += 1
            still = []
            for inst in pending:
                attach = inst.get("attach")
                if not attach:
                    placed[inst["name"]] = placement_matrix(inst.get("placement"))
                    continue
                parent = attach["to"]
                if parent not in placed:
                    still.append(inst)
                    continue
                parent_part = by_name[parent]["part"]
                try:
                    parent_lcs = lcs_matrix[(parent_part, attach.get("to_lcs", "origin"))]
                    own_lcs = lcs_matrix[(inst["part"], attach.get("lcs", "origin"))]
                except KeyError as exc:
                    raise JobError("instance %r: unknown LCS %s" % (inst["name"], exc)) from None
                placed[inst["name"]] = compose(compose(placed[parent], parent_lcs), invert(own_lcs))
            probe.progress(
                kind="assembly4",
                phase="solver_progress",
                constraints_resolved=len(constraints) - sum(1 for i in still if i.get("attach")),
                constraints_total=len(constraints),
            )
            if len(still) == len(pending):
                raise JobError("assembly does not resolve: %s" % sorted(i["name"] for i in still))
            pending = still
        span["cad.a4.iterations"] = iterations
    probe.metric("a4.iterations", iterations, solver="lcs_attachment")

    with probe.span("document.phase", {"cad.phase": "place_instances"}):
        placed_shapes = [backend.transform(parts[inst["part"]], placed[inst["name"]]) for inst in instances]
        compound = backend.compound(placed_shapes)
        backend.add_result(assembly["name"], compound, container=True)
        probe.metric("freecad.object_created", 1, cls=backend.object_class("assembly"), workbench="Assembly4")
    return compound


def _export(backend, probe, job, out_dir, targets):
    artifacts = []
    total = len(job["exports"])
    for index, export in enumerate(job["exports"]):
        fmt = export["format"]
        shape = targets[export["of"]]
        filename = "%s.%s" % (export["name"], EXPORT_EXT[fmt])
        path = os.path.join(out_dir, filename)
        with probe.span("export", {"cad.export.format": fmt.upper()}) as span:
            reset_peak_rss()
            backend.export(shape, fmt, path)
            size = os.path.getsize(path)
            span["cad.export.size_bytes"] = size
            _memory(span, "export_" + fmt, probe)
        facets = mesh_facets(path, fmt)  # after the export span: reading the file is not exporting
        probe.progress(kind="export", phase="exported", format=fmt, done=index + 1, total=total)
        artifacts.append(
            {
                "name": filename,
                "format": fmt,
                "of": export["of"],
                "size": size,
                "sha256": sha256_file(path),
                "validate": export.get("validate_determinism", True),
                "facets": facets,
            }
        )
    return artifacts


def _validate_exports(backend, probe, out_dir, targets, artifacts):
    scratch = os.path.join(out_dir, ".determinism")
    os.makedirs(scratch, exist_ok=True)
    for artifact in artifacts:
        if not artifact.pop("validate"):
            continue
        again = os.path.join(scratch, artifact["name"])
        backend.export(targets[artifact["of"]], artifact["format"], again)
        same = normalised_digest(again) == normalised_digest(os.path.join(out_dir, artifact["name"]))
        artifact["deterministic"] = same
        probe.metric(
            "export.validation",
            1,
            format=artifact["format"].upper(),
            result="pass" if same else "fail",
            size_bytes=artifact["size"],
        )
        os.unlink(again)
    os.rmdir(scratch)


def measure_geometry(backend, targets, artifacts):
    """Per part (and the assembly): mass properties, validity and topology counts; per mesh
    artifact: its facets. What two runs of one job compare to say they built the same thing."""
    parts = {}
    for name, shape in targets.items():
        measured = backend.geometry(shape)
        measured["valid"] = bool(backend.is_valid(shape))
        parts[name] = measured
    meshes = {a["name"]: {"facets": a["facets"]} for a in artifacts if a.get("facets") is not None}
    return {"parts": parts, "meshes": meshes}


def run_job(job, backend, probe, out_dir, material_library, document=None):
    """Run ``job`` with ``backend``, emitting probe events; return the manifest."""
    options = effective_options(job.get("options"))
    backend.set_options(options)
    probe.hello(engine=backend.engine, **backend.versions())
    for workbench, compatible in backend.workbenches().items():
        probe.metric("workbench.compatibility", 1, workbench=workbench, compatible=compatible)
    materials = _Materials(material_library, probe)

    with probe.span("document.create", {"cad.document.source": "new", "cad.workbench": "Part"}):
        backend.new_document(job["name"])
    probe.progress(kind="document", phase="created")

    parts, part_info = {}, {}
    with probe.span("cad.stage generate", {"cad.stage": "generate"}):
        probe.metric("workbench.invocation", 1, workbench="Part")
        for part in job["parts"]:
            shape = _build_part(backend, probe, part, document)
            parts[part["name"]] = shape
            info = dict(backend.properties(shape))
            with probe.span("topology.hash", {"cad.topology.scope": "part"}):
                info["topology_hash"] = topology_hash(backend, shape)
            if part.get("material"):
                info.update(_apply_material(backend, probe, materials, part, shape))
            part_info[part["name"]] = info

    targets = dict(parts)
    assembly_info = None
    if job.get("assembly"):
        with probe.span("cad.stage assemble", {"cad.stage": "assemble"}):
            probe.metric("workbench.invocation", 1, workbench="Assembly4")
            compound = _assemble(backend, probe, job, parts)
            targets[job["assembly"]["name"]] = compound
            with probe.span("topology.hash", {"cad.topology.scope": "assembly"}):
                assembly_info = {"name": job["assembly"]["name"], "topology_hash": topology_hash(backend, compound)}

    with probe.span("cad.stage export", {"cad.stage": "export"}):
        for workbench in sorted({backend.export_workbench(e["format"]) for e in job["exports"]}):
            probe.metric("workbench.invocation", 1, workbench=workbench)
        artifacts = _export(backend, probe, job, out_dir, targets)
        if job.get("fault") == "hang_in_export":
            _inject("hang", probe)

    with probe.span("cad.stage validate_export", {"cad.stage": "validate_export"}):
        _validate_exports(backend, probe, out_dir, targets, artifacts)

    # Outside the stages, so that measuring does not weigh on what is compared.
    with probe.span("geometry.measure", {"cad.geometry.targets": len(targets)}):
        geometry = measure_geometry(backend, targets, artifacts)
    for artifact in artifacts:
        if artifact.get("facets") is None:
            artifact.pop("facets", None)

    manifest = {
        "job_id": job.get("job_id"),
        "engine": backend.engine,
        "versions": backend.versions(),
        "parts": part_info,
        "assembly": assembly_info,
        "artifacts": artifacts,
        "options": options,
        "geometry": geometry,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    probe.result(manifest)
    return manifest


def main(backend_factory):
    """Entry point shared by the engine scripts: read the job, run it, report."""
    from cadscope_probe import Probe

    probe = Probe.from_env()
    with open(os.environ["CADSCOPE_JOB"]) as handle:
        payload = json.load(handle)
    backend = backend_factory()
    # Deliberate faults for the test suite and the demo workload ("fault" is
    # part of the validated schema, an enum, never code).
    fault = payload["job"].get("fault")
    if fault and fault != "hang_in_export":  # that one hangs late, inside the job (run_job)
        _inject(fault, probe)
    document = None
    if payload["job"].get("input"):
        document = {"path": payload["input_path"], "format": payload["job"]["input"]["format"]}
    run_job(payload["job"], backend, probe, os.environ["CADSCOPE_OUT"], payload["material_library"], document)


def _inject(fault, probe):
    import signal
    import time

    with probe.span("fault.inject", {"cad.fault": fault}):
        if fault == "raise":
            raise RuntimeError("injected script error")
        if fault == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        if fault in ("hang", "hang_unresponsive"):
            while True:
                time.sleep(1)
        if fault == "memory":
            hog = []
            while True:
                hog.append(bytearray(64 << 20))
        if fault == "no_manifest":
            os._exit(0)
