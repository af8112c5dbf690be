"""Run CAD work in contained, traced subprocesses.

Usage::

    from cadscope.freecad_bridge import JobSpec, run_cad_job, discover_engines

    job = JobSpec.model_validate(json_data)          # ValidationError names the field
    result = run_cad_job(job, "out/job-1", job_id="job-1")
    result.outcome   # ok | script_error | crash | timeout | oom | killed | bad_output
                     # | resource_limit | disk_full
    result.artifacts # [{"name", "format", "size", "sha256", "deterministic"}]

Warm engines: a :class:`WarmPool` keeps a fork server per engine (FreeCAD's
and OCP's modules imported, nothing else), and :func:`run_cad_job` forks each
job from it unless ``CADSCOPE_WARM=0`` or the job says ``cold_start``; see
``docs/warm.md``.

:func:`run` runs *any* argv the same way (allowlisted environment, trace
context in ``TRACEPARENT``, own process group, limits, telemetry pipe), under
a keeper process that kills whatever the job left when it ends. The child
side is ``freecad_bridge/child/cadscope_probe.py``, standard library only.

The user's own code: a ``JobSpec`` with ``script`` or ``template`` (a key in
the document store and its sha256) runs a registered FreeCAD/OCP script or a
parametric FCStd. With :func:`auto_instrumentation_env` in a child's
environment (:func:`child_path` first on ``PYTHONPATH``), any Python that
cadscope starts instruments FreeCAD's and OCP's entry points itself, and
finds ``cadscope_child``, the API for scripts (``child/cadscope_child.py``)::

    result = run(["freecadcmd", "my_macro.py"], env=auto_instrumentation_env(), observer=...)
"""

from __future__ import annotations

from ._engines import (
    CadResult,
    EngineInfo,
    EngineUnavailable,
    auto_instrumentation_env,
    child_path,
    discover_engines,
    pick_engine,
    run_cad_job,
)
from ._runner import (
    DEFAULT_ENV_ALLOWLIST,
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_PROCESSES,
    OUTCOMES,
    RunLimits,
    RunResult,
    build_env,
    run,
)
from ._schema import JobOptions, JobSpec, load_material_library, material_library_path
from ._warm import WarmPool

__all__ = [
    "DEFAULT_ENV_ALLOWLIST",
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_MAX_PROCESSES",
    "OUTCOMES",
    "CadResult",
    "EngineInfo",
    "EngineUnavailable",
    "JobOptions",
    "JobSpec",
    "RunLimits",
    "RunResult",
    "WarmPool",
    "auto_instrumentation_env",
    "build_env",
    "child_path",
    "discover_engines",
    "load_material_library",
    "material_library_path",
    "pick_engine",
    "run",
    "run_cad_job",
]
