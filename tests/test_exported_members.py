"""Each package's __all__ is sorted and names only what exists (httpx style)."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize(
    "module", ["cadscope.tracing", "cadscope.metrics", "cadscope.freecad_bridge", "cadscope.workers"]
)
def test_all_is_sorted_and_real(module):
    mod = importlib.import_module(module)

    # isort-style, as ruff's RUF022 keeps it: CONSTANTS, Classes, functions.
    def key(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert list(mod.__all__) == sorted(mod.__all__, key=key)
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name}"


def test_probe_imports_only_the_standard_library():
    import ast
    import sys
    from pathlib import Path

    child = Path(importlib.import_module("cadscope.freecad_bridge").__file__).parent / "child"
    for path in (child / "cadscope_probe.py", child / "cadscope_job.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    top = name.split(".")[0]
                    assert top in sys.stdlib_module_names or top == "cadscope_probe", f"{path.name}: {name}"
