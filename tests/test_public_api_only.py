"""cadscope uses only the public API of the libraries it plugs into.

An AST scan of ``cadscope/``: no private module or name is imported from opentelemetry,
prometheus_client, celery, kombu or billiard, and no underscore attribute is read or written
on their objects. The one module allowed to know prometheus_client's multiprocess file format
is ``cadscope/metrics/_files.py``, and it imports nothing private either.

Where the type of an object is unknown to a static scan (``span._attributes``), an underscore
attribute that cadscope itself never defines must be someone else's, and fails the scan.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cadscope"
GUARDED = ("opentelemetry", "prometheus_client", "celery", "kombu", "billiard")
# Underscore names that are public API: namedtuple's methods, os._exit (the way out of a forked child).
PUBLIC_UNDERSCORE = {"_replace", "_asdict", "_fields", "_make", "_exit"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _guarded(module: str | None) -> bool:
    return module is not None and module.split(".")[0] in GUARDED


def _sources() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if "child" not in path.parts)


@functools.lru_cache(maxsize=1)
def _own_private_names() -> frozenset[str]:
    """Every underscore attribute cadscope defines: methods and names in its class bodies, and
    attributes it assigns (``self._x = ...``)."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        names.add(item.name)
                    elif isinstance(item, ast.Assign):
                        names.update(t.id for t in item.targets if isinstance(t, ast.Name))
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        names.add(item.target.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return frozenset(name for name in names if _private(name))


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def violations(path: Path, own: frozenset[str]) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    guarded_names: set[str] = set()  # names bound to guarded modules or their objects
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _guarded(alias.name):
                    guarded_names.add((alias.asname or alias.name).split(".")[0])
                    if any(_private(part) for part in alias.name.split(".")):
                        found.append(f"{path.name}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _guarded(node.module):
            assert node.module is not None
            if any(_private(part) for part in node.module.split(".")):
                found.append(f"{path.name}:{node.lineno}: from {node.module} import ...")
            for alias in node.names:
                guarded_names.add(alias.asname or alias.name)
                if _private(alias.name):
                    found.append(f"{path.name}:{node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not _private(node.attr) or node.attr in PUBLIC_UNDERSCORE:
            continue
        root = _root(node.value)
        on_guarded = isinstance(root, ast.Name) and root.id in guarded_names
        ours = isinstance(root, ast.Name) and root.id in ("self", "cls") and node.value is root
        if on_guarded or (not ours and node.attr not in own):
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_private_attribute_of_the_libraries_cadscope_plugs_into():
    own = _own_private_names()
    found = [v for path in _sources() if path.name != "_files.py" for v in violations(path, own)]
    assert found == []


def test_the_file_format_module_imports_nothing_private_either():
    found = violations(PACKAGE / "metrics" / "_files.py", _own_private_names())
    assert found == []


@pytest.mark.parametrize(
    "code",
    [
        "from opentelemetry.util._once import Once",
        "from opentelemetry import trace\ntrace._TRACER_PROVIDER = None",
        "from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY",
        "from prometheus_client import values\nvalues._multi_process_cleanups.append(1)",
        "def f(span):\n    return span._attributes",
        "from celery import Celery\nCelery('x').conf._x = 1",
        "import opentelemetry.sdk.trace._sampling_experimental",
    ],
)
def test_the_scan_finds_what_it_must(tmp_path, code):
    path = tmp_path / "sample.py"
    path.write_text(code)
    assert violations(path, _own_private_names()) != []
