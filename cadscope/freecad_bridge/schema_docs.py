"""The job reference and the job's JSON Schema, generated from the pydantic models.

``python -m cadscope.freecad_bridge.schema_docs`` writes ``docs/jobs.md`` and the
JSON Schema shipped in the package (``cadscope/freecad_bridge/job.schema.json``,
served by the API as ``GET /v1/schema/job``); ``--check`` exits 1 when either is
stale. Both are made from :class:`~cadscope.freecad_bridge.JobSpec` itself, so a
field added to the models appears in them at the next run. The examples shown in
the reference are the files in ``examples/``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from . import _schema
from ._schema import JobSpec

__all__ = [
    "EXAMPLES",
    "job_json_schema",
    "main",
    "openapi_job_schema",
    "outputs",
    "render_reference",
    "shipped_job_schema",
]

ROOT = Path(__file__).resolve().parents[2]  # the repository, for a contributor's checkout
SCHEMA_FILE = Path(__file__).resolve().parent / "job.schema.json"
SCHEMA_ID = "https://cadscope.dev/schemas/job.schema.json"

# One example per kind of job, each a file in examples/ that the tests submit.
# (file, kind, what it shows)
EXAMPLES = (
    ("job.json", "parametric", "a part built from primitives, a boolean and a fillet, exported as STEP and STL"),
    ("assembly.json", "parametric", "two parts, one attached to the other by local coordinate systems (LCS)"),
    ("upload.json", "upload", "a STEP file from the document store, drilled and exported"),
    ("script.json", "script", "a registered FreeCAD script run with the job's parameters"),
    ("template.json", "template", "a registered parametric FCStd document, recomputed with new values"),
)
PROMPT_EXAMPLE = "prompt.json"

# What a field is for, where the model does not say it with a ``description``.
NOTES: dict[str, str] = {
    "JobSpec.name": "The job's name: in the trace, the manifest and the logs.",
    "JobSpec.flow_type": (
        "What kind of job this is. Set for you: `upload` when `input` is given, `script` or `template` "
        "when those are; `ai_prompt` is what `POST /v1/prompts` makes."
    ),
    "JobSpec.input": "An existing document to load (the `upload` flow); an `import` step uses it.",
    "JobSpec.engine": (
        "`freecad` (freecadcmd) or `ocp` (OpenCASCADE through OCP); `auto` lets the worker choose one it has. "
        "A template job runs in `freecad`; a script job names its engine."
    ),
    "JobSpec.occt_version": (
        "Run on the engine pool with this OCCT version (`ocp@7.9.3`): a worker serves it only if it has that engine."
    ),
    "JobSpec.options": "What changes the work (meshing, file formats, booleans), one default for both engines.",
    "JobSpec.cold_start": "Start a fresh engine process for this job instead of forking it from a warm one.",
    "JobOptions.linear_deflection": "Tessellation chord height in mm (a fraction of each edge's size if `relative`).",
    "JobOptions.angular_deflection": "Tessellation angle in radians.",
    "JobOptions.relative": "Read `linear_deflection` as a fraction of each edge's size.",
    "JobOptions.stl_format": "STL encoding.",
    "JobOptions.step_schema": "STEP application protocol.",
    "JobOptions.step_units": "Units written in STEP files.",
    "JobOptions.iges_mode": (
        "`faces`: trimmed surfaces (IGES 144, read everywhere); `brep`: a manifold solid (IGES 186)."
    ),
    "JobOptions.iges_units": "Units written in IGES files.",
    "JobOptions.fuzzy_value": "OCCT's fuzzy value for booleans, in mm (0: exact).",
    "JobOptions.parallel": (
        "OCCT's parallel mode for booleans (FreeCAD's always run in parallel: `false` runs on OCP only)."
    ),
    "JobSpec.parts": "The parts to build. At least one, except in script and template jobs.",
    "JobSpec.assembly": "Instances of the parts, placed or attached to each other.",
    "JobSpec.exports": "The files to write. At least one, except in script jobs (they list `outputs`).",
    "JobSpec.script": "A registered script to run (the `script` flow).",
    "JobSpec.template": "A registered FCStd template to recompute (the `template` flow).",
    "JobSpec.parameters": (
        "Script jobs: any JSON, read by the script with `cadscope_child.parameters()`. Template jobs: "
        '`{"Object.Property": value}` or `{"Sheet.Cell": value}` (a cell address such as `B2` or an alias); '
        "a value is a number, a boolean or a string (no formula)."
    ),
    "JobSpec.outputs": "The files a script job must write; the job fails (`bad_output`) if one is missing.",
    "JobSpec.timeout_s": "Seconds the CAD process may run before it is killed (outcome `timeout`).",
    "JobSpec.fault": (
        "A deliberate failure, for tests and demonstrations; refused unless the worker runs with "
        "`CADSCOPE_ALLOW_FAULTS=1`."
    ),
    "JobSpec.expect_failure": (
        "Marks a job that is meant to fail (the demo workload's); echoed in its status, it changes nothing else."
    ),
    "Part.name": "The part's name, used by exports and assembly instances.",
    "Part.steps": "Operations in order; a step refers only to steps before it, by name.",
    "Part.result": "The step whose shape is the part (default: the last step).",
    "Part.material": "A material id from the shipped library (see [Materials](#materials)).",
    "Part.lcs": "Named local coordinate systems of the part, for assembly attachments; `origin` is implicit.",
    "Assembly.name": "The assembly's name; an export's `of` can name it.",
    "Assembly.instances": "Part instances; names are unique.",
    "Instance.name": "The instance's name.",
    "Instance.part": "The part it is an instance of.",
    "Instance.placement": "Where it is, in the assembly's frame (or `attach`, not both).",
    "Instance.attach": "Attached to another instance (or `placement`, not both).",
    "Attach.to": "The instance attached to.",
    "Attach.to_lcs": "An LCS of that instance's part.",
    "Attach.lcs": "An LCS of this instance's own part, made to coincide with `to_lcs`.",
    "Export.format": "The file format; OCP writes `step`, `stl`, `brep` and `iges`, FreeCAD `obj` too.",
    "Export.of": "A part or the assembly.",
    "Export.name": "The file name without extension (`<name>.<format>`).",
    "Export.validate_determinism": (
        "Export a second time and compare the two files (timestamps aside); the artifact's `deterministic` "
        "says whether they matched."
    ),
    "Output.name": "The file name without extension.",
    "Output.format": "The file format.",
    "InputDocument.uri": (
        "`store://<key>`, a file in the workers' document store, or an `http(s)://` URL on a public address "
        "(an internal host only when the operator allows it with `CADSCOPE_DOCUMENT_ALLOW`)."
    ),
    "InputDocument.sha256": "The document's sha256 (hex): the worker checks the bytes before any engine opens them.",
    "InputDocument.format": "`step`, `brep` or `fcstd` (FCStd needs engine `freecad`).",
    "InputDocument.size_bytes": "The expected size, checked too when given.",
    "ScriptSource.uri": "`store://scripts/<key>`.",
    "ScriptSource.sha256": "The script's sha256 (hex), as the operator registered it.",
    "ScriptSource.format": "Always `py`.",
    "ScriptSource.size_bytes": "The expected size, checked too when given.",
    "TemplateSource.uri": "`store://templates/<key>`.",
    "TemplateSource.sha256": "The template's sha256 (hex), as the operator registered it.",
    "TemplateSource.format": "Always `fcstd`.",
    "TemplateSource.size_bytes": "The expected size, checked too when given.",
    "Placement.position": "x, y, z in millimetres.",
    "Placement.rotation": "A rotation about an axis through the position.",
    "Rotation.axis": "The axis (any length but zero).",
    "Rotation.angle": "Degrees.",
    "Box.length": "Along x, millimetres.",
    "Box.width": "Along y, millimetres.",
    "Box.height": "Along z, millimetres.",
    "Cylinder.radius": "Millimetres.",
    "Cylinder.height": "Along z, millimetres.",
    "Sphere.radius": "Millimetres.",
    "Cone.radius1": "Radius at the base, millimetres.",
    "Cone.radius2": "Radius at the top, millimetres (differs from `radius1`).",
    "Cone.height": "Millimetres.",
    "Torus.radius1": "Ring radius, millimetres.",
    "Torus.radius2": "Tube radius, millimetres (smaller than `radius1`).",
    "Extrusion.points": "The polygon's corners (x, y), in order; it is closed for you.",
    "Extrusion.height": "Along z, millimetres.",
    "Boolean.operation": "`union` fuses, `cut` removes the later operands from the first, `common` keeps the overlap.",
    "Boolean.operands": "Names of earlier steps; the first is the base.",
    "Fillet.target": "The earlier step whose edges are rounded.",
    "Fillet.radius": "Millimetres.",
    "Fillet.edges": "`all`, `vertical`, `top`, `bottom`, or edge indices of the target shape.",
    "Chamfer.target": "The earlier step whose edges are bevelled.",
    "Chamfer.size": "Millimetres.",
    "Chamfer.edges": "`all`, `vertical`, `top`, `bottom`, or edge indices of the target shape.",
}
_STEP_FIELDS = {"name": "The step's name, unique in its part.", "kind": "The step's kind.",
                "placement": "Where the shape is, in the part's frame."}  # fmt: skip

# The rules that tie fields together (the models' validators), in words.
RULES = (
    "A *name* (of a job, part, step, instance, LCS) starts with a letter and holds letters, digits, `_` and `-`, "
    "64 characters at most; a *file name* (`Export.name`, `Output.name`) may start with a digit too.",
    "Unknown keys are refused everywhere: a typo is a 422 naming the field, not a silent default.",
    "A step refers only to steps before it in the same part; step names are unique in a part, part names in a job.",
    "A job built from parts has at least one part and one export; every export names a part or the assembly, "
    "and the engine (when not `auto`) can write its format.",
    f"A job has at most {_schema.MAX_STEPS_TOTAL} steps and {_schema.MAX_OPERANDS_TOTAL} boolean operands in all.",
    "An STL or OBJ export must stay within a mesh budget (about "
    f"{_schema.MAX_MESH_TRIANGLES:,} triangles for one copy of each part exported, "
    f"{_schema.MAX_MESH_TRIANGLES_WRITTEN:,} for every instance written): very large curved primitives are refused "
    "for mesh exports, with a message that says so; export STEP or BREP instead.",
    "An `input` document needs an `import` step and an `import` step needs an `input`; an FCStd input needs "
    "engine `freecad`.",
    "An assembly instance is placed or attached, not both; attachments form a tree (no cycle) and name LCSs that "
    "the parts define.",
    "A script job has `script`, its `engine` (`freecad` or `ocp`) and `outputs`; no parts, assembly, input or exports.",
    "A template job has `template` and `exports` (of objects in the document); no parts, assembly, input or "
    f"outputs; its `parameters` are at most {_schema.MAX_PARAMETER_BYTES // 1024} KiB of JSON.",
    "`outputs` and `parameters` belong to script and template jobs only; `fault` to parts jobs only.",
)


def job_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a job, from :class:`JobSpec`."""
    schema = JobSpec.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}


@lru_cache(maxsize=1)
def shipped_job_schema() -> dict[str, Any]:
    """The JSON Schema file shipped in the package (what ``GET /v1/schema/job`` serves)."""
    text = (resources.files("cadscope") / "freecad_bridge" / "job.schema.json").read_text()
    return json.loads(text)  # type: ignore[no-any-return]


def openapi_job_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """The job's schema for an OpenAPI document: the request body's schema (a reference)
    and the component schemas it needs, referenced as ``#/components/schemas/<Model>``."""
    schema = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.pop("$defs", {})
    components[schema.get("title", "JobSpec")] = schema
    return {"$ref": f"#/components/schemas/{schema.get('title', 'JobSpec')}"}, components


# -- the reference page ------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return f"`{text}`"


def _num(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


def _bounds(s: dict[str, Any]) -> list[str]:
    out = []
    if "minimum" in s:
        out.append(f"≥ {_num(s['minimum'])}")
    if "exclusiveMinimum" in s:
        out.append(f"> {_num(s['exclusiveMinimum'])}")
    if "maximum" in s:
        out.append(f"≤ {_num(s['maximum'])}")
    if "exclusiveMaximum" in s:
        out.append(f"< {_num(s['exclusiveMaximum'])}")
    if "minLength" in s or "maxLength" in s:
        out.append(f"length {s.get('minLength', 0)}–{s['maxLength']}" if "maxLength" in s
                   else f"length ≥ {s['minLength']}")  # fmt: skip
    if ("minItems" in s or "maxItems" in s) and "prefixItems" not in s:
        low, high = s.get("minItems", 0), s.get("maxItems")
        out.append(f"{low} to {high} items" if high is not None else f"at least {low} items")
    if "maxProperties" in s:
        out.append(f"at most {s['maxProperties']} keys")
    if "pattern" in s and s["pattern"] not in _NAMED_PATTERNS:
        out.append(f"matches `{s['pattern']}`")
    return out


# Patterns shared by many fields, named once under "Rules across fields".
_NAMED_PATTERNS = {
    _schema.Name.__metadata__[0].pattern: "name",  # type: ignore[attr-defined]
    _schema.FileStem.__metadata__[0].pattern: "file name",  # type: ignore[attr-defined]
}


def _link(ref: str) -> str:
    name = ref.rsplit("/", 1)[-1]
    return "any JSON value" if name == "JsonValue" else f"[{name}](#{name.lower()})"


def _type(s: dict[str, Any], nested: bool = False) -> str:
    """A schema in words: ``number``, ``list of [Part](#part)``, ``"a" | "b"``..."""
    if "$ref" in s:
        return _link(s["$ref"])
    if "const" in s:
        return _code(s["const"])
    if "enum" in s:
        return " | ".join(_code(v) for v in s["enum"])
    if "oneOf" in s or "anyOf" in s:
        options = [o for o in s.get("oneOf", s.get("anyOf", [])) if o.get("type") != "null"]
        text = " or ".join(_type(o, nested=nested) for o in options)
        return text + (" or null" if len(options) < len(s.get("oneOf", s.get("anyOf", []))) else "")
    kind = s.get("type")
    if s.get("pattern") in _NAMED_PATTERNS:
        return _NAMED_PATTERNS[s["pattern"]]
    if kind == "array":
        if "prefixItems" in s:
            return "[" + ", ".join(_type(i) for i in s["prefixItems"]) + "]"
        text = "list of " + _type(s.get("items", {}), nested=True)
    elif kind == "object":
        values = s.get("additionalProperties") or next(iter(s.get("patternProperties", {}).values()), None)
        text = "object" if not values else "map of name to " + _type(values, nested=True)
    else:
        text = str(kind or "any JSON value")
    if nested:
        bounds = _bounds(s)
        if bounds:
            text += " (" + ", ".join(bounds) + ")"
    return text


def _field_bounds(s: dict[str, Any]) -> str:
    found = _bounds(s)
    for option in s.get("anyOf", []):
        found += _bounds(option)
    items = s.get("prefixItems") or s.get("items", {}).get("prefixItems", [])  # a tuple, or a list of tuples
    each = {", ".join(_bounds(i)) for i in items}
    if len(each) == 1 and "" not in each:
        found.append("each " + each.pop())
    return ", ".join(found)


def _models_in_order(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """JobSpec, then every model in the order a reader meets it."""
    defs = schema.get("$defs", {})
    order: list[tuple[str, dict[str, Any]]] = [("JobSpec", schema)]
    queue = [{k: v for k, v in schema.items() if k != "$defs"}]
    while queue:
        for name in re.findall(r'"#/\$defs/([^"]+)"', json.dumps(queue.pop(0))):
            if name in defs and name != "JsonValue" and all(name != n for n, _ in order):
                order.append((name, defs[name]))
                queue.append(defs[name])
    return order


def _model_section(name: str, model: dict[str, Any]) -> list[str]:
    lines = [f"### {name}", ""]
    description = model.get("description", "")
    if description:
        lines += [" ".join(description.split()), ""]
    required = set(model.get("required", []))
    lines += ["| field | type | default | bounds | |", "| --- | --- | --- | --- | --- |"]
    for field, s in model.get("properties", {}).items():
        note = s.get("description") or NOTES.get(f"{name}.{field}") or _STEP_FIELDS.get(field, "")
        default = "required" if field in required else _code(s.get("default"))
        lines.append(f"| `{field}` | {_cell(_type(s))} | {_cell(default)} | {_cell(_field_bounds(s))} | "
                     f"{_cell(note)} |")  # fmt: skip
    return [*lines, ""]


def _example(path: Path) -> list[str]:
    return ["```json", path.read_text().rstrip("\n"), "```", ""]


def render_reference(examples: Path | None = None) -> str:
    """``docs/jobs.md``: every field, type, default and bound, and an example per kind of job."""
    examples = examples or ROOT / "examples"
    schema = job_json_schema()
    materials = _schema.load_material_library()
    lines = [
        "# Job reference",
        "",
        "<!-- Generated from the job models by `python -m cadscope.freecad_bridge.schema_docs`: do not edit. -->",
        "",
        "A job is a JSON document posted to `POST /v1/jobs`. It is data, never code: it names",
        "primitives, booleans and edge features, an assembly, materials and the files to export; or a",
        "script or template an operator registered on the workers. The API validates it before",
        "anything is queued and answers 422 with the field and the reason when it is not valid.",
        "",
        "```sh",
        "curl -s -X POST http://127.0.0.1:8000/v1/jobs \\",
        '     -H "Authorization: Bearer $CADSCOPE_API_TOKEN" -H "Content-Type: application/json" \\',
        "     -d @examples/job.json",
        "```",
        "",
        "The answer (202) gives the job's `job_id`, its `status_url` and its `events_url` (a",
        "server-sent event stream). Send an `Idempotency-Key` header to retry a submission safely: the",
        "same key gets the same job. Then follow it, and fetch what it wrote:",
        "",
        "```sh",
        'curl -s -H "Authorization: Bearer $CADSCOPE_API_TOKEN" http://127.0.0.1:8000/v1/jobs/JOB_ID',
        'curl -N -H "Authorization: Bearer $CADSCOPE_API_TOKEN" http://127.0.0.1:8000/v1/jobs/JOB_ID/events',
        'curl -O -H "Authorization: Bearer $CADSCOPE_API_TOKEN" \\',
        "     http://127.0.0.1:8000/v1/jobs/JOB_ID/artifacts/plate.step",
        "```",
        "",
        "The JSON Schema of a job is served by the API at `GET /v1/schema/job`, is the request body",
        "of `POST /v1/jobs` on the API's OpenAPI page (`/docs`), and ships in the package as",
        "`cadscope/freecad_bridge/job.schema.json`, for editors and client-side validation. Lengths",
        "are millimetres and angles degrees throughout.",
        "",
        "## Kinds of job",
        "",
        "| kind (`flow_type`) | what runs | example |",
        "| --- | --- | --- |",
        "| `parametric` | parts built from the job's steps | [`examples/job.json`](../examples/job.json), "
        "[`examples/assembly.json`](../examples/assembly.json) |",
        "| `upload` | an existing STEP, BREP or FCStd document, loaded and worked on | "
        "[`examples/upload.json`](../examples/upload.json) |",
        "| `script` | a FreeCAD or OCP script registered on the workers, with the job's parameters | "
        "[`examples/script.json`](../examples/script.json) |",
        "| `template` | a parametric FCStd document registered on the workers, recomputed with new values | "
        "[`examples/template.json`](../examples/template.json) |",
        "| `ai_prompt` | a job made from a sentence by the AI provider chain (`POST /v1/prompts`) | "
        "[`examples/prompt.json`](../examples/prompt.json) |",
        "",
        "Documents, scripts and templates are registered by an operator, not sent in a request: copy",
        "the file into the workers' document store (`CADSCOPE_DOCUMENT_STORE`, by default",
        "`$CADSCOPE_DATA_DIR/store`; scripts under `scripts/`, templates under `templates/`) and give",
        "users its `store://` key and sha256 (`sha256sum FILE`). The worker checks the sha256 before",
        "any engine starts; a mismatch is refused as a security violation. The examples' files are in",
        "`examples/store/`: run the workers with `CADSCOPE_DOCUMENT_STORE=$PWD/examples/store` (an",
        "absolute path) to submit the examples as they are.",
        "",
    ]
    for filename, kind, what in EXAMPLES:
        lines += [f"### `{kind}`: {what}", "", f"`examples/{filename}`:", "", *_example(examples / filename)]
    lines += [
        "### `ai_prompt`: a sentence in, a job out",
        "",
        f"`examples/{PROMPT_EXAMPLE}`, posted to `POST /v1/prompts` (`engine` is optional, `auto` by default):",
        "",
        *_example(examples / PROMPT_EXAMPLE),
        "## Rules across fields",
        "",
        *[f"- {rule}" for rule in RULES],
        "",
        "## Fields",
        "",
        "A step of a part is one of `box`, `cylinder`, `sphere`, `cone`, `torus`, `extrusion`, `import`",
        "(the primitives), `boolean`, `fillet` and `chamfer`, told apart by its `kind`.",
        "",
    ]
    for name, model in _models_in_order(schema):
        lines += _model_section(name, model)
    lines += [
        "## Materials",
        "",
        "`Part.material` is one of these ids (the library ships in the package, `cadscope/materials/library.json`):",
        "",
        "| id | name |",
        "| --- | --- |",
        *[f"| `{mid}` | {_cell(str(card.get('name', '')))} |" for mid, card in sorted(materials.items())],
        "",
    ]
    return "\n".join(lines)


def outputs(root: Path | None = None) -> dict[Path, str]:
    """What this generator writes: the reference page and the shipped schema file."""
    root = root or ROOT
    return {
        root / "docs" / "jobs.md": render_reference(root / "examples"),
        SCHEMA_FILE: json.dumps(job_json_schema(), indent=2, ensure_ascii=False) + "\n",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cadscope.freecad_bridge.schema_docs",
        description="Write docs/jobs.md and the shipped job schema from the job models.",
        epilog="example: python -m cadscope.freecad_bridge.schema_docs --check",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is stale, writing nothing")
    args = parser.parse_args(argv)
    if not (ROOT / "examples").is_dir():
        print(f"schema_docs: no examples/ beside {ROOT}: run it from a checkout of the repository", file=sys.stderr)
        return 2
    stale = []
    for path, text in outputs().items():
        if not path.exists() or path.read_text() != text:
            stale.append(path)
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    for path in stale:
        print(f"{'stale' if args.check else 'wrote'}: {path.relative_to(ROOT)}", file=sys.stderr)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
