"""Geometry equivalence between two sides, job name by job name.

Each side's result manifest carries, per part, volume, area, bounding box,
centre of mass, validity and topology counts, and per mesh artifact its facet
count, plus the effective work options. Every candidate manifest of a job name
is compared with the baseline's first one; a difference beyond the stated
tolerance is a mismatch. Different work options are a mismatch too: a
comparison between two sides that did different work says nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Mismatch", "Tolerances", "compare_geometry"]

_TOPOLOGY = ("solids", "shells", "faces", "edges", "vertices")


@dataclass(frozen=True)
class Tolerances:
    """How far two engines' geometry may differ and still be the same part."""

    # Mass properties of the exact solid: OCCT versions integrate them differently,
    # far below a tenth of a per cent on the workload's parts.
    volume_rel: float = 1e-3
    area_rel: float = 1e-3
    # Bounding boxes include shape tolerances (1e-7 mm and up) and fillet extrema found numerically.
    bbox_abs_mm: float = 0.05
    center_abs_mm: float = 0.01
    # Meshes at the same deflection differ by the mesher's version: a count, not an identity.
    facets_rel: float = 0.25
    # Topology counts and validity must be equal.


@dataclass(frozen=True)
class Mismatch:
    job: str
    item: str  # "part plate", "mesh plate.stl", "options"
    field: str
    baseline: Any
    candidate: Any
    tolerance: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "item": self.item,
            "field": self.field,
            "baseline": self.baseline,
            "candidate": self.candidate,
            "tolerance": self.tolerance,
        }


def _rel_close(a: Any, b: Any, rel: float) -> bool:
    try:
        x, y = float(a), float(b)
    except (TypeError, ValueError):
        return a == b
    return math.isclose(x, y, rel_tol=rel, abs_tol=1e-9)


def _vec_close(a: Any, b: Any, tol: float) -> bool:
    if not isinstance(a, list | tuple) or not isinstance(b, list | tuple) or len(a) != len(b):
        return a == b
    try:
        return all(abs(float(x) - float(y)) <= tol for x, y in zip(a, b, strict=True))
    except (TypeError, ValueError):
        return False


def _both(
    job: str, kind: str, base: dict[str, Any], cand: dict[str, Any], found: list[Mismatch]
) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Each name on both sides, with its two records; a name on one side only is a ``present`` mismatch."""
    for name in sorted(set(base) | set(cand)):
        item = f"{kind} {name}"
        if name not in base or name not in cand:
            found.append(Mismatch(job, item, "present", name in base, name in cand, "equal"))
            continue
        yield item, base[name] or {}, cand[name] or {}


def _parts(job: str, base: dict[str, Any], cand: dict[str, Any], tol: Tolerances) -> list[Mismatch]:
    found: list[Mismatch] = []
    for item, b, c in _both(job, "part", base, cand, found):
        checks: list[tuple[str, bool, str]] = [
            ("volume", _rel_close(b.get("volume"), c.get("volume"), tol.volume_rel), f"rel {tol.volume_rel:g}"),
            ("area", _rel_close(b.get("area"), c.get("area"), tol.area_rel), f"rel {tol.area_rel:g}"),
            ("bbox", _vec_close(b.get("bbox"), c.get("bbox"), tol.bbox_abs_mm), f"abs {tol.bbox_abs_mm:g} mm"),
            (
                "center_of_mass",
                _vec_close(b.get("center_of_mass"), c.get("center_of_mass"), tol.center_abs_mm),
                f"abs {tol.center_abs_mm:g} mm",
            ),
            ("valid", b.get("valid") == c.get("valid"), "equal"),
            *((name, b.get(name) == c.get(name), "equal") for name in _TOPOLOGY),
        ]
        found.extend(Mismatch(job, item, name, b.get(name), c.get(name), how) for name, ok, how in checks if not ok)
    return found


def _meshes(job: str, base: dict[str, Any], cand: dict[str, Any], tol: Tolerances) -> list[Mismatch]:
    found: list[Mismatch] = []
    for item, mesh_b, mesh_c in _both(job, "mesh", base, cand, found):
        b, c = mesh_b.get("facets"), mesh_c.get("facets")
        if not _rel_close(b, c, tol.facets_rel):
            found.append(Mismatch(job, item, "facets", b, c, f"rel {tol.facets_rel:g}"))
    return found


def compare_geometry(
    baseline: dict[str, list[dict[str, Any]]],
    candidate: dict[str, list[dict[str, Any]]],
    tolerances: Tolerances | None = None,
) -> tuple[list[Mismatch], int]:
    """Mismatches between the two sides' manifests, and how many job names both sides have."""
    tol = tolerances or Tolerances()
    found: list[Mismatch] = []
    shared = sorted(set(baseline) & set(candidate))
    for job in shared:
        reference = baseline[job][0]
        seen: set[tuple[str, str]] = set()
        for manifest in candidate[job]:
            mismatches = []
            if reference.get("options") != manifest.get("options"):
                mismatches.append(
                    Mismatch(job, "options", "options", reference.get("options"), manifest.get("options"), "equal")
                )
            b_geo, c_geo = reference.get("geometry") or {}, manifest.get("geometry") or {}
            mismatches += _parts(job, b_geo.get("parts") or {}, c_geo.get("parts") or {}, tol)
            mismatches += _meshes(job, b_geo.get("meshes") or {}, c_geo.get("meshes") or {}, tol)
            for mismatch in mismatches:
                if (mismatch.item, mismatch.field) not in seen:  # once per job name, not per repetition
                    seen.add((mismatch.item, mismatch.field))
                    found.append(mismatch)
    return found, len(shared)
