"""The job schema: data, never code; errors name the field and the reason."""

from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError

from cadscope.freecad_bridge import JobSpec
from cadscope.workers._workload import TEMPLATES, workload

BASE = {
    "name": "plate",
    "parts": [{"name": "p", "steps": [{"kind": "box", "name": "b", "length": 10, "width": 10, "height": 2}]}],
    "exports": [{"format": "step", "of": "p", "name": "plate"}],
}


def _error(data) -> str:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(data)
    return str(info.value)


def _with(path, value):
    data = copy.deepcopy(BASE)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


def test_workload_templates_are_valid_on_both_engines():
    for spec in workload(2 * len(TEMPLATES), ["freecad", "ocp"]):
        JobSpec.model_validate(spec)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("parts", 0, "steps", 0, "length"), -5, "length"),
        (("parts", 0, "steps", 0, "length"), "ten", "length"),
        (("parts", 0, "steps", 0, "length"), 1e300, "less than or equal"),
        (("parts", 0, "steps", 0, "kind"), "hyperboloid", "kind"),
        (("exports", 0, "format"), "dwg", "format"),
        (("exports", 0, "name"), "../../etc/passwd", "name"),
        (("exports", 0, "name"), ".hidden", "name"),
        (("name",), "__import__('os').system('id')", "name"),
        (("parts", 0, "material"), "unobtainium", "not in the material library"),
        (("parts", 0, "steps", 0, "placement"), {"rotation": {"axis": [0, 0, 0]}}, "zero vector"),
        (("exports", 0, "of"), "ghost", "unknown part"),
        (("timeout_s",), 10**9, "timeout_s"),
        (("engine",), "solidworks", "engine"),
        (("fault",), "rm -rf /", "fault"),
    ],
)
def test_bad_specs_are_rejected_naming_the_field(path, value, expected):
    assert expected in _error(_with(path, value))


def test_unknown_fields_and_code_like_values_are_refused():
    assert "Extra inputs are not permitted" in _error({**BASE, "source": "import os"})
    # ``script`` names a script an operator registered (a store key and its sha256), never source.
    assert "valid dictionary" in _error({**BASE, "script": "import os"})


def test_ten_thousand_booleans_are_refused():
    steps = [{"kind": "box", "name": f"b{i}", "length": 1, "width": 1, "height": 1} for i in range(200)]
    many = [
        {"kind": "boolean", "name": f"u{i}", "operation": "union", "operands": [f"b{j}" for j in range(200)]}
        for i in range(50)
    ]
    data = {**BASE, "parts": [{"name": "p", "steps": steps + many}]}
    assert "steps" in _error(data) or "operands" in _error(data)


def test_references_and_assembly_cycles():
    data = copy.deepcopy(BASE)
    data["parts"][0]["steps"].append({"kind": "fillet", "name": "f", "target": "missing", "radius": 1})
    assert "no earlier step defines" in _error(data)
    data = copy.deepcopy(BASE)
    data["assembly"] = {
        "name": "a",
        "instances": [
            {"name": "x", "part": "p", "attach": {"to": "y"}},
            {"name": "y", "part": "p", "attach": {"to": "x"}},
        ],
    }
    assert "cycle" in _error(data)


def test_engine_specific_formats():
    data = _with(("exports", 0, "format"), "obj")
    JobSpec.model_validate({**data, "engine": "freecad"})
    assert "cannot export 'obj'" in _error({**data, "engine": "ocp"})
