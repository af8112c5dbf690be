"""The built-in demo workload: a realistic mix, deliberately failing jobs marked."""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["TEMPLATES", "for_engine", "workload"]


def _hole(name: str, x: float, y: float, radius: float = 2.5, height: float = 8) -> dict[str, Any]:
    return {"kind": "cylinder", "name": name, "radius": radius, "height": height, "placement": {"position": [x, y, 0]}}


PLATE: dict[str, Any] = {
    "name": "mounting_plate",
    "parts": [
        {
            "name": "plate",
            "material": "aluminium-6061",
            "steps": [
                {"kind": "box", "name": "blank", "length": 60, "width": 40, "height": 8},
                _hole("h1", 6, 6),
                _hole("h2", 54, 6),
                _hole("h3", 6, 34),
                _hole("h4", 54, 34),
                {
                    "kind": "boolean",
                    "name": "drilled",
                    "operation": "cut",
                    "operands": ["blank", "h1", "h2", "h3", "h4"],
                },
                {"kind": "fillet", "name": "rounded", "target": "drilled", "radius": 1, "edges": "vertical"},
            ],
        }
    ],
    "exports": [{"format": "step", "of": "plate", "name": "plate"}, {"format": "stl", "of": "plate", "name": "plate"}],
}

GRID: dict[str, Any] = {
    "name": "perforated_block",
    "parts": [
        {
            "name": "block",
            "material": "steel-s235",
            "steps": [
                {"kind": "box", "name": "body", "length": 80, "width": 80, "height": 20},
                *[_hole(f"p{i}{j}", 10 + 20 * i, 10 + 20 * j, 4, 20) for i in range(4) for j in range(4)],
                {
                    "kind": "boolean",
                    "name": "perforated",
                    "operation": "cut",
                    "operands": ["body", *[f"p{i}{j}" for i in range(4) for j in range(4)]],
                },
                {
                    "kind": "cylinder",
                    "name": "boss1",
                    "radius": 6,
                    "height": 10,
                    "placement": {"position": [20, 40, 20]},
                },
                {
                    "kind": "cylinder",
                    "name": "boss2",
                    "radius": 6,
                    "height": 10,
                    "placement": {"position": [60, 40, 20]},
                },
                {
                    "kind": "boolean",
                    "name": "bossed",
                    "operation": "union",
                    "operands": ["perforated", "boss1", "boss2"],
                },
                {"kind": "sphere", "name": "ball", "radius": 70, "placement": {"position": [40, 40, 10]}},
                {"kind": "boolean", "name": "trimmed", "operation": "common", "operands": ["bossed", "ball"]},
            ],
        }
    ],
    "exports": [{"format": "brep", "of": "block", "name": "block"}, {"format": "step", "of": "block", "name": "block"}],
}

HOUSING: dict[str, Any] = {
    "name": "housing",
    "parts": [
        {
            "name": "housing",
            "material": "abs",
            "steps": [
                {"kind": "box", "name": "outer", "length": 50, "width": 30, "height": 20},
                {
                    "kind": "box",
                    "name": "inner",
                    "length": 46,
                    "width": 26,
                    "height": 18,
                    "placement": {"position": [2, 2, 2]},
                },
                {"kind": "boolean", "name": "shell", "operation": "cut", "operands": ["outer", "inner"]},
                {"kind": "chamfer", "name": "chamfered", "target": "shell", "size": 0.5, "edges": "bottom"},
                {"kind": "fillet", "name": "rounded", "target": "chamfered", "radius": 1.5, "edges": "vertical"},
            ],
        }
    ],
    "exports": [
        {"format": "iges", "of": "housing", "name": "housing"},
        {"format": "stl", "of": "housing", "name": "housing"},
    ],
}

ASSEMBLY: dict[str, Any] = {
    "name": "pin_fixture",
    "parts": [
        {
            "name": "base",
            "material": "aluminium-6061",
            "lcs": {"left": {"position": [15, 20, 10]}, "right": {"position": [45, 20, 10]}},
            "steps": [{"kind": "box", "name": "b", "length": 60, "width": 40, "height": 10}],
        },
        {
            "name": "pin",
            "material": "brass-c360",
            "lcs": {"foot": {"position": [0, 0, 0]}, "head": {"position": [0, 0, 15]}},
            "steps": [
                {"kind": "cylinder", "name": "c", "radius": 3, "height": 15},
                {"kind": "chamfer", "name": "tip", "target": "c", "size": 0.8, "edges": "top"},
            ],
        },
        {
            "name": "cap",
            "material": "pla",
            "lcs": {"seat": {"position": [0, 0, 0]}},
            "steps": [
                {"kind": "cone", "name": "k", "radius1": 5, "radius2": 2, "height": 4},
                {"kind": "torus", "name": "ring", "radius1": 5, "radius2": 1},
                {"kind": "boolean", "name": "capped", "operation": "union", "operands": ["k", "ring"]},
            ],
        },
    ],
    "assembly": {
        "name": "fixture",
        "instances": [
            {"name": "base1", "part": "base"},
            {"name": "pin_l", "part": "pin", "attach": {"to": "base1", "to_lcs": "left", "lcs": "foot"}},
            {"name": "pin_r", "part": "pin", "attach": {"to": "base1", "to_lcs": "right", "lcs": "foot"}},
            {"name": "cap_l", "part": "cap", "attach": {"to": "pin_l", "to_lcs": "head", "lcs": "seat"}},
            {"name": "cap_r", "part": "cap", "attach": {"to": "pin_r", "to_lcs": "head", "lcs": "seat"}},
        ],
    },
    "exports": [
        {"format": "step", "of": "fixture", "name": "fixture"},
        {"format": "stl", "of": "fixture", "name": "fixture"},
        {"format": "brep", "of": "pin", "name": "pin"},
    ],
}

PROFILE: dict[str, Any] = {
    "name": "l_profile",
    "parts": [
        {
            "name": "profile",
            "material": "oak",
            "steps": [
                {
                    "kind": "extrusion",
                    "name": "l",
                    "height": 100,
                    "points": [[0, 0], [30, 0], [30, 5], [5, 5], [5, 30], [0, 30]],
                },
                {"kind": "fillet", "name": "soft", "target": "l", "radius": 0.5, "edges": "top"},
            ],
        }
    ],
    "exports": [
        {"format": "step", "of": "profile", "name": "profile"},
        {"format": "obj", "of": "profile", "name": "profile"},
    ],
}

# Deliberately failing jobs, marked as such: real geometric failures, not injected ones.
FILLET_TOO_BIG: dict[str, Any] = {
    "name": "impossible_fillet",
    "expect_failure": True,
    "parts": [
        {
            "name": "cube",
            "steps": [
                {"kind": "box", "name": "c", "length": 10, "width": 10, "height": 10},
                # OCCT accepts an 8 mm fillet on every edge of this cube (both 7.6 and 8.0): 20 mm it refuses.
                {"kind": "fillet", "name": "f", "target": "c", "radius": 20, "edges": "all"},
            ],
        }
    ],
    "exports": [{"format": "step", "of": "cube", "name": "cube"}],
}
CRASH: dict[str, Any] = {
    "name": "crashing_engine",
    "expect_failure": True,
    "fault": "segfault",
    "parts": [{"name": "cube", "steps": [{"kind": "box", "name": "c", "length": 10, "width": 10, "height": 10}]}],
    "exports": [{"format": "step", "of": "cube", "name": "cube"}],
}

TEMPLATES = [PLATE, ASSEMBLY, GRID, FILLET_TOO_BIG, HOUSING, PROFILE, CRASH]


def for_engine(spec: dict[str, Any], engine: str) -> dict[str, Any]:
    """``spec`` for ``engine``: OBJ is a FreeCAD (Mesh workbench) export, OCP writes STL instead."""
    spec = {**copy.deepcopy(spec), "engine": engine}
    if engine == "ocp" and isinstance(spec.get("exports"), list):
        for export in spec["exports"]:
            if isinstance(export, dict) and export.get("format") == "obj":
                export["format"] = "stl"
    return spec


def workload(count: int, engines: list[str], occt_version: str | None = None) -> list[dict[str, Any]]:
    """``count`` job specs cycling through the templates; with several engines,
    each template runs on each engine in turn so versions can be compared.
    ``occt_version`` pins the engine's OCCT version (``ocp@7.9.3``)."""
    jobs = []
    for index in range(count):
        engine = engines[index % len(engines)]
        spec = for_engine(TEMPLATES[(index // len(engines)) % len(TEMPLATES)], engine)
        if occt_version is not None:
            spec["occt_version"] = occt_version
        jobs.append(spec)
    return jobs
