"""Turns cadscope's auto-instrumentation on in a Python that cadscope started.

Python imports ``sitecustomize`` at start-up from the first folder on its path
that has one; cadscope puts this folder first on ``PYTHONPATH`` for
``cadscope exec`` and for ``script`` and ``template`` jobs. With the telemetry
pipe inherited (``CADSCOPE_TELEMETRY_FD``) and ``CADSCOPE_AUTO`` not ``0``, it
instruments FreeCAD and OCP (``cadscope_auto``); otherwise it does nothing.
Either way it then runs the ``sitecustomize`` this one hides (Debian's, a
virtual environment's), as ``opentelemetry-instrument`` does.
"""

import os
import sys


def _cadscope_bootstrap():
    if not os.environ.get("CADSCOPE_TELEMETRY_FD") or os.environ.get("CADSCOPE_AUTO") == "0":
        return
    try:
        import cadscope_auto

        cadscope_auto.bootstrap()
    except Exception:  # noqa: BLE001 - the user's interpreter starts, instrumented or not
        pass


def _run_hidden_sitecustomize():
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001 - as site.py does for a failing sitecustomize
        pass


_cadscope_bootstrap()
_run_hidden_sitecustomize()
