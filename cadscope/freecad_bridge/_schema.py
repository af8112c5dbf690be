"""The job schema: a CAD job is data, never code.

A job builds parts from primitives, booleans and edge features, places part
instances in an Assembly4-style assembly (each instance attaches an LCS of its
own to an LCS of its parent), applies materials from the shipped library, and
exports files. Validation names the field and the reason; sizes and counts are
bounded so that a valid job also runs within limits.

Two more kinds run the user's own code, still as data: a ``script`` job names
a FreeCAD or OCP script and a ``template`` job a parametric FCStd document,
each one an operator registered in the worker's document store (under
``scripts/`` or ``templates/``), pinned by its sha256 and verified before any
engine starts. A request carries their parameters, never source.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from importlib import resources
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "InputDocument",
    "JobSpec",
    "JobOptions",
    "Output",
    "ScriptSource",
    "TemplateSource",
    "load_material_library",
    "material_library_path",
]

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")]
# A file name stem: no separators, no leading dot, so nothing escapes the job's folder.
FileStem = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
Length = Annotated[float, Field(gt=0, le=100_000, allow_inf_nan=False)]  # millimetres
Coordinate = Annotated[float, Field(ge=-1_000_000, le=1_000_000, allow_inf_nan=False)]

MAX_STEPS_TOTAL = 2_000
MAX_OPERANDS_TOTAL = 2_000
ENGINE_FORMATS = {"freecad": {"step", "stl", "brep", "iges", "obj"}, "ocp": {"step", "stl", "brep", "iges"}}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rotation(_Model):
    axis: tuple[Coordinate, Coordinate, Coordinate] = (0.0, 0.0, 1.0)
    angle: Annotated[float, Field(ge=-360, le=360, allow_inf_nan=False)] = 0.0

    @model_validator(mode="after")
    def _axis_not_zero(self) -> Rotation:
        if math.isclose(sum(c * c for c in self.axis), 0.0):
            raise ValueError("rotation axis must not be the zero vector")
        return self


class Placement(_Model):
    position: tuple[Coordinate, Coordinate, Coordinate] = (0.0, 0.0, 0.0)
    rotation: Rotation = Rotation()


class _Primitive(_Model):
    name: Name
    placement: Placement = Placement()


class Box(_Primitive):
    kind: Literal["box"]
    length: Length
    width: Length
    height: Length


class Cylinder(_Primitive):
    kind: Literal["cylinder"]
    radius: Length
    height: Length


class Sphere(_Primitive):
    kind: Literal["sphere"]
    radius: Length


class Cone(_Primitive):
    kind: Literal["cone"]
    radius1: Annotated[float, Field(ge=0, le=100_000, allow_inf_nan=False)]
    radius2: Annotated[float, Field(ge=0, le=100_000, allow_inf_nan=False)]
    height: Length

    @model_validator(mode="after")
    def _radii(self) -> Cone:
        if self.radius1 == self.radius2:
            raise ValueError("radius1 and radius2 must differ (equal radii make a cylinder)")
        return self


class Torus(_Primitive):
    kind: Literal["torus"]
    radius1: Length
    radius2: Length

    @model_validator(mode="after")
    def _radii(self) -> Torus:
        if self.radius2 >= self.radius1:
            raise ValueError("radius2 (tube) must be smaller than radius1 (ring)")
        return self


class Extrusion(_Primitive):
    """A closed polygon in the XY plane extruded along +Z."""

    kind: Literal["extrusion"]
    points: Annotated[list[tuple[Coordinate, Coordinate]], Field(min_length=3, max_length=1_000)]
    height: Length


class Boolean(_Model):
    kind: Literal["boolean"]
    name: Name
    operation: Literal["union", "cut", "common"]
    operands: Annotated[list[Name], Field(min_length=2, max_length=256)]


EdgeSelector = (
    Literal["all", "vertical", "top", "bottom"]
    | Annotated[list[Annotated[int, Field(ge=0, le=100_000)]], Field(min_length=1, max_length=1_000)]
)


class Fillet(_Model):
    kind: Literal["fillet"]
    name: Name
    target: Name
    radius: Length
    edges: EdgeSelector = "all"


class Chamfer(_Model):
    kind: Literal["chamfer"]
    name: Name
    target: Name
    size: Length
    edges: EdgeSelector = "all"


class Import(_Primitive):
    """The job's input document (``JobSpec.input``), loaded by the engine, as a solid."""

    kind: Literal["import"]


Step = Annotated[
    Box | Cylinder | Sphere | Cone | Torus | Extrusion | Import | Boolean | Fillet | Chamfer,
    Field(discriminator="kind"),
]

MAX_INPUT_BYTES = 512 << 20


class InputDocument(_Model):
    """An existing document to load (the ``upload`` flow), pinned by its sha256:
    the worker verifies the bytes before an engine ever opens them."""

    # store://<key> (a key in the worker's document store) or http(s)://...
    uri: Annotated[str, StringConstraints(pattern=r"^(?:store://[A-Za-z0-9._/-]{1,256}|https?://\S{1,2000})$")]
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    format: Literal["step", "brep", "fcstd"]
    size_bytes: Annotated[int, Field(gt=0, le=MAX_INPUT_BYTES)] | None = None

    @model_validator(mode="after")
    def _key_stays_in_the_store(self) -> InputDocument:
        if self.uri.startswith("store://"):
            key = self.uri.removeprefix("store://")
            if key.startswith("/") or ".." in key.split("/"):
                raise ValueError("a store key must not start with '/' or contain '..'")
        return self


class ScriptSource(InputDocument):
    """A FreeCAD or OCP script an operator put in the document store under ``scripts/``."""

    uri: Annotated[str, StringConstraints(pattern=r"^store://scripts/[A-Za-z0-9._/-]{1,240}$")]
    format: Literal["py"] = "py"  # type: ignore[assignment]


class TemplateSource(InputDocument):
    """A parametric FCStd document an operator put in the document store under ``templates/``."""

    uri: Annotated[str, StringConstraints(pattern=r"^store://templates/[A-Za-z0-9._/-]{1,240}$")]
    format: Literal["fcstd"] = "fcstd"  # type: ignore[assignment]


class Output(_Model):
    """A file a script job must write into its output folder (``<name>.<format>``)."""

    name: FileStem
    format: Literal["step", "stl", "brep", "iges", "obj"]

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.format}"


MAX_PARAMETER_BYTES = 64 << 10
# A template parameter: ``Object.Property`` or ``Sheet.Cell`` (an address such as B2, or an alias).
_TEMPLATE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\.[A-Za-z_][A-Za-z0-9_]{0,63}$")


class Part(_Model):
    name: Name
    steps: Annotated[list[Step], Field(min_length=1, max_length=500)]
    result: Name | None = None
    material: Annotated[str, StringConstraints(max_length=64)] | None = None
    lcs: Annotated[dict[Name, Placement], Field(max_length=64)] = {}

    @model_validator(mode="after")
    def _references(self) -> Part:
        seen: set[str] = set()
        for index, step in enumerate(self.steps):
            refs = (
                step.operands
                if isinstance(step, Boolean)
                else [step.target]
                if isinstance(step, Fillet | Chamfer)
                else []
            )
            for ref in refs:
                if ref not in seen:
                    raise ValueError(f"steps[{index}] ({step.name}) uses {ref!r}, which no earlier step defines")
            if step.name in seen:
                raise ValueError(f"steps[{index}]: step name {step.name!r} is used twice")
            seen.add(step.name)
        if self.result is not None and self.result not in seen:
            raise ValueError(f"result {self.result!r} is not a step of part {self.name!r}")
        if "origin" in self.lcs:
            raise ValueError("lcs 'origin' is implicit (the part's own frame) and cannot be redefined")
        if self.material is not None and self.material not in load_material_library():
            raise ValueError(f"material {self.material!r} is not in the material library")
        return self


class Attach(_Model):
    to: Name
    to_lcs: Name = "origin"
    lcs: Name = "origin"


class Instance(_Model):
    name: Name
    part: Name
    placement: Placement | None = None
    attach: Attach | None = None

    @model_validator(mode="after")
    def _one_way(self) -> Instance:
        if self.placement is not None and self.attach is not None:
            raise ValueError("an instance is either placed or attached, not both")
        return self


class Assembly(_Model):
    name: Name
    instances: Annotated[list[Instance], Field(min_length=1, max_length=500)]

    @model_validator(mode="after")
    def _tree(self) -> Assembly:
        names = [i.name for i in self.instances]
        if len(set(names)) != len(names):
            raise ValueError("instance names must be unique")
        parent = {i.name: i.attach.to for i in self.instances if i.attach}
        for child, target in parent.items():
            if target not in names:
                raise ValueError(f"instance {child!r} attaches to unknown instance {target!r}")
        for start in parent:
            node, hops = start, 0
            while node in parent:
                node, hops = parent[node], hops + 1
                if hops > len(names):
                    raise ValueError(f"instance {start!r} is part of an attachment cycle")
        return self


class Export(_Model):
    format: Literal["step", "stl", "brep", "iges", "obj"]
    of: Name
    name: FileStem
    validate_determinism: bool = True


class JobOptions(_Model):
    """Every parameter that changes the work, one default shared by both engines.

    Two engines (or two versions of one) compared on the same job do the same
    work only if they mesh, write and fuse the same way: each engine applies
    these itself, and the manifest and the spans record them (``options``).
    """

    # Tessellation (STL and OBJ exports): the chord height in millimetres, or a
    # fraction of each edge's size when ``relative``; the angle in radians.
    linear_deflection: Annotated[float, Field(ge=0.001, le=100, allow_inf_nan=False)] = 0.1
    angular_deflection: Annotated[float, Field(ge=0.01, le=1.5, allow_inf_nan=False)] = 0.5
    relative: bool = False
    stl_format: Literal["binary", "ascii"] = "binary"
    step_schema: Literal["AP203", "AP214", "AP242"] = "AP214"
    step_units: Literal["mm", "m", "in"] = "mm"
    # ``faces``: trimmed surfaces (IGES 144, read everywhere); ``brep``: a manifold solid (IGES 186).
    iges_mode: Literal["faces", "brep"] = "faces"
    iges_units: Literal["mm", "m", "in"] = "mm"
    # Boolean operations: OCCT's fuzzy value in millimetres (0: exact) and its parallel mode
    # (FreeCAD's booleans always run in parallel: a serial boolean runs on OCP only).
    fuzzy_value: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] = 0.0
    parallel: bool = True

    def as_attributes(self) -> dict[str, str | float | bool]:
        """The options as span attributes (``cad.option.<name>``)."""
        return {f"cad.option.{key}": value for key, value in self.model_dump().items()}


Fault = Literal[
    "raise", "segfault", "hang", "hang_unresponsive", "memory", "no_manifest", "kill_worker", "hang_in_export"
]


# -- the mesh budget -----------------------------------------------------------
# An STL or OBJ export meshes curved faces at the job's linear deflection, so
# its triangles, the memory to make them and the file grow with the size of
# the curved primitives and shrink with the deflection: an OCP sphere of
# radius 10 m, valid otherwise, runs out of a 2 GiB limit at 0.1 mm.
# Triangles are estimated per millimetre of each curved primitive's largest
# dimension at a deflection of 0.01 mm (sphere 500, torus up to 700, cone up
# to 160, cylinder 2, a fillet or chamfer up to 200 over its part), with a
# floor for small ones, and scaled by 0.01 mm over the job's deflection
# (triangles of a doubly curved face go as the inverse of the deflection: the
# scale is exact for spheres and tori, generous for the rest). A relative
# deflection is taken against the part's largest dimension. Booleans only keep
# or trim their operands' faces. An export's estimate, one instance of each
# part in it, stays under MAX_MESH_TRIANGLES: the largest sphere admitted
# peaks at about a third of the 2 GiB a CAD process gets by default. Every
# instance written counts toward MAX_MESH_TRIANGLES_WRITTEN: ~1 GiB of ASCII
# STL, half the default file size limit.
MAX_MESH_TRIANGLES = 150_000
MAX_MESH_TRIANGLES_WRITTEN = 4_000_000
_TRIANGLES_PER_MM = {"sphere": 500, "torus": 700, "cone": 160, "cylinder": 2, "fillet": 200, "chamfer": 200}
_TRIANGLES_FLOOR = {
    "sphere": 30_000,
    "torus": 30_000,
    "cone": 25_000,
    "cylinder": 1_000,
    "fillet": 1_000,
    "chamfer": 1_000,
}
_TABLE_DEFLECTION = 0.01  # millimetres: the deflection the table above counts triangles at


def _extent(step: Step) -> float:
    """A primitive's largest dimension in millimetres (0 for what is not a primitive)."""
    if isinstance(step, Sphere):
        return 2 * step.radius
    if isinstance(step, Torus):
        return 2 * (step.radius1 + step.radius2)
    if isinstance(step, Cone):
        return max(2 * max(step.radius1, step.radius2), step.height)
    if isinstance(step, Cylinder):
        return max(2 * step.radius, step.height)
    if isinstance(step, Box):
        return max(step.length, step.width, step.height)
    if isinstance(step, Extrusion):
        xs, ys = [p[0] for p in step.points], [p[1] for p in step.points]
        return max(max(xs) - min(xs), max(ys) - min(ys), step.height)
    return 0.0


def _part_triangles(part: Part, options: JobOptions) -> float:
    """Triangles a mesh export of ``part`` makes at the job's deflection, at most."""
    extent = max(_extent(step) for step in part.steps)
    deflection = options.linear_deflection * (max(extent, 1.0) if options.relative else 1.0)
    total = 0.0
    for step in part.steps:
        size = extent if step.kind in ("fillet", "chamfer") else _extent(step)
        if step.kind in _TRIANGLES_PER_MM:
            total += max(_TRIANGLES_PER_MM[step.kind] * size, _TRIANGLES_FLOOR[step.kind])
    return total * _TABLE_DEFLECTION / deflection


class JobSpec(_Model):
    """One CAD job. ``model_validate(data)`` raises ``ValidationError`` naming the field."""

    name: Name
    flow_type: Literal["parametric", "ai_prompt", "upload", "script", "template"] = "parametric"
    input: InputDocument | None = None
    engine: Literal["auto", "freecad", "ocp"] = "auto"
    # The engine's OCCT version, when several run side by side (``ocp@7.9.3``); None: any.
    occt_version: Annotated[str, StringConstraints(pattern=r"^\d{1,3}\.\d{1,3}\.\d{1,3}$")] | None = None
    # At least one each for a job built from parts (``_needed``); a script job has neither.
    parts: Annotated[list[Part], Field(max_length=100, validate_default=True)] = []
    assembly: Assembly | None = None
    exports: Annotated[list[Export], Field(max_length=32, validate_default=True)] = []
    # The user's own code: a registered script, or a registered FCStd template.
    script: ScriptSource | None = None
    template: TemplateSource | None = None
    # A script's parameters (any JSON, handed to it as cadscope_child.parameters()), or a
    # template's (``{"Object.Property": value, "Sheet.Cell": value}``).
    parameters: Annotated[dict[Annotated[str, StringConstraints(max_length=128)], JsonValue],
                          Field(max_length=256)] = {}  # fmt: skip
    # The files a script job must write (a template job lists ``exports``).
    outputs: Annotated[list[Output], Field(max_length=32)] = []
    timeout_s: Annotated[float, Field(gt=0, le=3_600)] = 120.0
    # What changes the work (tessellation, file formats, booleans): the same on every engine.
    options: JobOptions = JobOptions()
    # Deliberate faults for tests and the demo workload: an enum mapped to a
    # fixed action, never code; refused unless the worker has CADSCOPE_ALLOW_FAULTS=1.
    # ``hang_unresponsive``: the CAD process hangs and the pool process stops
    # answering Celery's soft time limit, as if stuck in C code: only the hard limit ends it.
    # ``hang_in_export``: the job does its work, then hangs inside its export stage, on its first
    # delivery only (a later one runs the job plainly): a job to kill mid-way and see redelivered.
    fault: Fault | None = None
    expect_failure: bool = False
    # Start a fresh engine process for this job instead of forking a warm engine.
    cold_start: bool = False

    @model_validator(mode="before")
    @classmethod
    def _upload_flow(cls, data: Any) -> Any:
        # A job with an input document is an upload flow unless it says otherwise.
        if isinstance(data, dict) and data.get("input") is not None and "flow_type" not in data:
            return {**data, "flow_type": "upload"}
        return data

    @field_validator("parts", "exports")
    @classmethod
    def _needed(cls, value: list[Any], info: ValidationInfo) -> list[Any]:
        # flow_type is validated first, and set for script and template jobs (``_user_code_flow``).
        flow, field = info.data.get("flow_type"), str(info.field_name)
        if not value and not (flow == "script" or (flow == "template" and field == "parts")):
            raise ValueError(f"a job needs at least one {field[:-1]}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _user_code_flow(cls, data: Any) -> Any:
        # A script or template job is that flow unless it says otherwise; a
        # template runs in FreeCAD, the only engine that reads FCStd.
        if isinstance(data, dict):
            kind = "script" if data.get("script") is not None else "template" if data.get("template") else None
            if kind is not None and "flow_type" not in data:
                data = {**data, "flow_type": kind}
            if kind == "template" and data.get("engine", "auto") == "auto":
                data = {**data, "engine": "freecad"}
        return data

    @model_validator(mode="after")
    def _cross_references(self) -> JobSpec:
        if self.script is not None or self.template is not None or self.flow_type in ("script", "template"):
            return self._user_code()
        if self.outputs or self.parameters:
            raise ValueError("outputs and parameters belong to script and template jobs")
        if self.engine == "freecad" and not self.options.parallel:
            raise ValueError("engine 'freecad' runs booleans in parallel only: options.parallel=false needs 'ocp'")
        imports = [s.name for p in self.parts for s in p.steps if isinstance(s, Import)]
        if imports and self.input is None:
            raise ValueError(f"step {imports[0]!r} imports a document, but the job has no input")
        if self.input is not None:
            if not imports:
                raise ValueError("the job has an input document but no import step uses it")
            if self.input.format == "fcstd" and self.engine != "freecad":
                raise ValueError("an FCStd input needs engine 'freecad'")
        parts = {p.name: p for p in self.parts}
        if len(parts) != len(self.parts):
            raise ValueError("part names must be unique")
        if sum(len(p.steps) for p in self.parts) > MAX_STEPS_TOTAL:
            raise ValueError(f"a job has at most {MAX_STEPS_TOTAL} steps in all")
        operands = sum(len(s.operands) for p in self.parts for s in p.steps if isinstance(s, Boolean))
        if operands > MAX_OPERANDS_TOTAL:
            raise ValueError(f"a job has at most {MAX_OPERANDS_TOTAL} boolean operands in all")
        targets = set(parts)
        if self.assembly is not None:
            if self.assembly.name in parts:
                raise ValueError(f"assembly name {self.assembly.name!r} collides with a part name")
            targets.add(self.assembly.name)
            for instance in self.assembly.instances:
                if instance.part not in parts:
                    raise ValueError(f"instance {instance.name!r} uses unknown part {instance.part!r}")
                if instance.attach is not None:
                    own = parts[instance.part].lcs
                    if instance.attach.lcs != "origin" and instance.attach.lcs not in own:
                        raise ValueError(
                            f"instance {instance.name!r}: part {instance.part!r} has no lcs {instance.attach.lcs!r}"
                        )
                    parent_part = next(i.part for i in self.assembly.instances if i.name == instance.attach.to)
                    if instance.attach.to_lcs != "origin" and instance.attach.to_lcs not in parts[parent_part].lcs:
                        raise ValueError(
                            f"instance {instance.name!r}: part {parent_part!r} has no lcs {instance.attach.to_lcs!r}"
                        )
        stems = [e.name + "." + e.format for e in self.exports]
        if len(set(stems)) != len(stems):
            raise ValueError("export file names must be unique")
        for export in self.exports:
            if export.of not in targets:
                raise ValueError(f"export {export.name!r} refers to unknown part or assembly {export.of!r}")
            if self.engine != "auto" and export.format not in ENGINE_FORMATS[self.engine]:
                raise ValueError(f"engine {self.engine!r} cannot export {export.format!r}")
        return self

    @model_validator(mode="after")
    def _mesh_budget(self) -> JobSpec:
        if self.script is not None or self.template is not None:
            return self  # the user's code builds the model: nothing here to estimate
        parts = {p.name: _part_triangles(p, self.options) for p in self.parts}
        for export in self.exports:
            if export.format not in ("stl", "obj"):
                continue
            if export.of in parts:
                counts = {export.of: 1}
            else:  # the assembly: every instance is written, each part meshed once
                assert self.assembly is not None
                counts = {}
                for instance in self.assembly.instances:
                    counts[instance.part] = counts.get(instance.part, 0) + 1
            once = sum(parts[name] for name in counts)
            written = sum(parts[name] * n for name, n in counts.items())
            if once > MAX_MESH_TRIANGLES or written > MAX_MESH_TRIANGLES_WRITTEN:
                raise ValueError(
                    f"export {export.name!r} ({export.format}) would mesh about {once:,.0f} triangles "
                    f"({written:,.0f} written), over the {MAX_MESH_TRIANGLES:,} ({MAX_MESH_TRIANGLES_WRITTEN:,} "
                    "written) a job may within the memory and file size limits: its curved primitives are too "
                    "large for a mesh export at a linear deflection of "
                    f"{self.options.linear_deflection:g}{'' if self.options.relative else ' mm'}; export STEP or "
                    "BREP, make them smaller, or mesh coarser (options.linear_deflection)"
                )
        return self

    def _user_code(self) -> JobSpec:
        kind = "script" if self.script is not None else "template"
        if self.script is not None and self.template is not None:
            raise ValueError("a job runs a script or a template, not both")
        if self.script is None and self.template is None:
            raise ValueError(f"a {self.flow_type} job needs its {self.flow_type} (a store:// key and sha256)")
        if self.flow_type != kind:
            raise ValueError(f"a {kind} job has flow_type {kind!r}")
        if self.parts or self.assembly is not None or self.input is not None:
            raise ValueError(f"a {kind} job has no parts, assembly or input document: its {kind} builds the model")
        if self.fault is not None:
            raise ValueError(f"fault injection is for parts jobs, not {kind} jobs")
        if len(json.dumps(self.parameters)) > MAX_PARAMETER_BYTES:
            raise ValueError(f"parameters take at most {MAX_PARAMETER_BYTES} bytes as JSON")
        if kind == "script":
            if self.engine == "auto":
                raise ValueError("a script job names its engine, 'freecad' or 'ocp': a script is written for one")
            if not self.outputs:
                raise ValueError("a script job lists the outputs it must write")
            if self.exports:
                raise ValueError("a script job lists outputs, not exports")
            names = [o.filename for o in self.outputs]
            if len(set(names)) != len(names):
                raise ValueError("output file names must be unique")
            return self
        if self.engine != "freecad":
            raise ValueError("a template job runs in FreeCAD (engine 'freecad')")
        if not self.exports:
            raise ValueError("a template job lists the exports to write after its recompute")
        if self.outputs:
            raise ValueError("a template job lists exports, not outputs")
        for key, value in self.parameters.items():
            if not _TEMPLATE_KEY.fullmatch(key):
                raise ValueError(f"template parameter {key!r} is not 'Object.Property' or 'Sheet.Cell'")
            if isinstance(value, str):
                if len(value) > 256 or value.startswith("=") or any(ord(c) < 32 for c in value):
                    raise ValueError(f"template parameter {key!r}: a string of at most 256 characters, "
                                     "no control characters, not a formula ('=...')")  # fmt: skip
            elif not isinstance(value, (bool, int, float)) or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"template parameter {key!r}: a number, a boolean or a string")
        stems = [e.name + "." + e.format for e in self.exports]
        if len(set(stems)) != len(stems):
            raise ValueError("export file names must be unique")
        return self

    def formats(self) -> set[str]:
        return {e.format for e in self.exports}

    def stored_document(self) -> InputDocument | None:
        """The document the worker fetches and verifies before the engine starts:
        the input document, the script or the template."""
        return self.input or self.script or self.template


def material_library_path() -> str:
    return str(resources.files("cadscope") / "materials" / "library.json")


@lru_cache(maxsize=1)
def load_material_library() -> dict[str, Any]:
    """Material cards by id, from the library shipped in the package."""
    with open(material_library_path()) as handle:
        return {card["id"]: card for card in json.load(handle)["materials"]}
