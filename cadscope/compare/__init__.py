"""Version verdicts: compare two engines or OCCT/FreeCAD versions on the same workload.

From the command line (needs the ``compare`` extra: numpy, scipy, matplotlib)::

    cadscope compare RUN_DIR --baseline engine=freecad --candidate engine=ocp --html report.html
    cadscope compare BASE_DIR CAND_DIR --json drift.json
    cadscope compare --prometheus http://prometheus:9090 \\
        --baseline 'occt_version="7.9.3"' --candidate 'occt_version="8.0.1"' --range 24h

From Python::

    from cadscope.compare import SideData, compare_sides, parse_selector, read_run_folder

    base = SideData(parse_selector("occt_version=7.9.3"), "7.9.3")
    cand = SideData(parse_selector("occt_version=8.0.1"), "8.0.1")
    read_run_folder(Path("cadscope-out"), [base, cand])
    report = compare_sides(base, cand)
    report.failed, report.regressions, report.as_dict()

For each stage and operation: sample counts, p50 and p95 with the bootstrap
interval of their ratio, the two-sample Kolmogorov-Smirnov test, the
Population Stability Index; outcome rates with an interval on their
difference; geometry mismatches beyond stated tolerances. Names resolve on
first use, so the command line starts without numpy.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Buckets",
    "Mismatch",
    "Report",
    "SideData",
    "SourceError",
    "Thresholds",
    "Tolerances",
    "compare_geometry",
    "compare_sides",
    "parse_selector",
    "read_exposition",
    "read_prometheus",
    "read_results",
    "read_run_folder",
    "read_traces",
    "render_html",
    "render_table",
]

_WHERE = {
    "Buckets": "._stats",
    "Mismatch": "._geometry",
    "Report": "._report",
    "SideData": "._sources",
    "SourceError": "._sources",
    "Thresholds": "._report",
    "Tolerances": "._geometry",
    "compare_geometry": "._geometry",
    "compare_sides": "._report",
    "parse_selector": "._sources",
    "read_exposition": "._sources",
    "read_prometheus": "._sources",
    "read_results": "._sources",
    "read_run_folder": "._sources",
    "read_traces": "._sources",
    "render_html": "._render",
    "render_table": "._render",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
