"""The two engines, discovered at run time, and one CAD job run through the runner.

- ``freecad``: ``freecadcmd`` (``$CADSCOPE_FREECADCMD`` or on ``PATH``) running
  ``child/engine_freecad.py`` in FreeCAD's own Python.
- ``ocp``: a Python with cadquery-ocp (``$CADSCOPE_OCP_PYTHON``, default this
  interpreter) running ``child/engine_ocp.py``. ``freecad_version="none"``.
- more OCP engines side by side: ``$CADSCOPE_OCP_PYTHONS``, comma-separated
  interpreter paths, each asked for its OCCT version and listed as
  ``ocp@<occt_version>`` (the default one too), so an OCCT upgrade runs the
  same engine code on two versions.

A ``script`` job runs the user's script under ``child/usercode_launch.py`` in
either engine, a ``template`` job ``child/engine_template.py`` in FreeCAD; both
with auto-instrumentation on (``child/sitecustomize.py`` first on
``PYTHONPATH``), so the user's FreeCAD and OCP calls become the same spans and
metrics as the JSON jobs' steps.

Versions are asked of the engine itself, once per process, never configured.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from opentelemetry import trace

from ..metrics import ModelObservability, bound, default_observability
from ._runner import RunLimits, RunResult, build_env, run
from ._schema import ENGINE_FORMATS, JobOptions, JobSpec, material_library_path
from ._warm import warm_socket_path

__all__ = [
    "CadResult",
    "EngineInfo",
    "EngineUnavailable",
    "auto_instrumentation_env",
    "child_path",
    "discover_engines",
    "pick_engine",
    "run_cad_job",
]

log = logging.getLogger("cadscope.freecad_bridge")

CHILD_DIR = Path(__file__).resolve().parent / "child"
_MARK = "CADSCOPE_VERSIONS "
_FREECAD_VERSION_SCRIPT = (
    "import FreeCAD, Part, json; v = FreeCAD.Version(); "
    f"print({_MARK!r} + json.dumps({{'freecad_version': '.'.join(x or '0' for x in v[:3]), "
    "'occt_version': Part.OCC_VERSION}))"
)
_OCP_VERSION_SCRIPT = (
    f"import sys, json; sys.path.insert(0, {str(CHILD_DIR)!r}); import engine_ocp; "
    f"print({_MARK!r} + json.dumps(engine_ocp.OCPBackend().versions()))"
)


def child_path() -> str:
    """The folder with cadscope's child modules: ``cadscope_child`` (the API for
    CAD scripts), the probe, and the ``sitecustomize`` that auto-instruments."""
    return str(CHILD_DIR)


def auto_instrumentation_env(pythonpath: str | None = None) -> dict[str, str]:
    """What a child's environment needs for auto-instrumentation: this folder first
    on ``PYTHONPATH`` (then ``pythonpath``, the caller's own entries, if any)."""
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(CHILD_DIR), pythonpath) if p)}


class EngineUnavailable(RuntimeError):
    """No engine of the requested kind exists on this host."""


@dataclass(frozen=True)
class EngineInfo:
    name: str
    argv: tuple[str, ...]
    freecad_version: str
    occt_version: str
    formats: frozenset[str]

    def as_dict(self) -> dict[str, Any]:
        return {"engine": self.name, "freecad_version": self.freecad_version, "occt_version": self.occt_version}

    @property
    def pool(self) -> str:
        """``<engine>@<occt_version>``: the engine pool (queue, pinned workers) it serves."""
        return f"{self.name}@{self.occt_version}"


def _ask_versions(argv: list[str]) -> dict[str, str] | None:
    try:
        out = subprocess.run(  # noqa: S603
            argv,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            env=build_env(extra={"HOME": _engine_home()}),
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("engine probe %s failed: %s", argv[0], exc)
        return None
    for line in out.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK) :])  # type: ignore[no-any-return]
    return None


def _engine_home() -> str:
    """FreeCAD writes its user config under $HOME: give it a private one."""
    home = os.environ.get("CADSCOPE_ENGINE_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cadscope", "engine-home"
    )
    os.makedirs(home, exist_ok=True)
    return home


@lru_cache(maxsize=1)
def discover_engines() -> dict[str, EngineInfo]:
    """Engines present on this host, with the versions they report. Cached."""
    engines: dict[str, EngineInfo] = {}
    freecadcmd = shutil.which(os.environ.get("CADSCOPE_FREECADCMD", "freecadcmd"))
    if freecadcmd:
        versions = _ask_versions([freecadcmd, "-c", _FREECAD_VERSION_SCRIPT])
        if versions:
            engines["freecad"] = EngineInfo(
                "freecad",
                (freecadcmd, str(CHILD_DIR / "engine_freecad.py")),
                versions["freecad_version"],
                versions["occt_version"],
                frozenset(ENGINE_FORMATS["freecad"]),
            )
    default = os.environ.get("CADSCOPE_OCP_PYTHON", sys.executable)
    more = [p.strip() for p in os.environ.get("CADSCOPE_OCP_PYTHONS", "").split(",") if p.strip()]
    for python in dict.fromkeys([default, *more]):
        versions = _ask_versions([python, "-c", _OCP_VERSION_SCRIPT])
        if not versions:
            log.warning("no OCP engine in %s", python)
            continue
        info = EngineInfo(
            "ocp",
            (python, str(CHILD_DIR / "engine_ocp.py")),
            versions["freecad_version"],
            versions["occt_version"],
            frozenset(ENGINE_FORMATS["ocp"]),
        )
        engines.setdefault("ocp", info)  # the default interpreter, else the first that works
        engines.setdefault(info.pool, info)
    if "freecad" in engines:
        engines.setdefault(engines["freecad"].pool, engines["freecad"])
    return engines


def pick_engine(
    requested: str,
    engines: Mapping[str, EngineInfo] | None = None,
    formats: Set[str] = frozenset(),
    options: JobOptions | None = None,
    occt_version: str | None = None,
) -> EngineInfo:
    """The engine for a job: as requested, or for ``auto`` FreeCAD first, then OCP.

    ``occt_version`` picks that version's pool (``ocp@7.9.3``); ``options`` rule
    out an engine that cannot honour them (FreeCAD's booleans always run in parallel)."""
    engines = discover_engines() if engines is None else engines
    order = ["freecad", "ocp"] if requested == "auto" else [requested]
    for name in order:
        info = engines.get(name if occt_version is None else f"{name}@{occt_version}")
        if options is not None and not options.parallel and name == "freecad":
            continue
        if info is not None and formats <= info.formats:
            return info
    wanted = requested if occt_version is None else f"{requested}@{occt_version}"
    raise EngineUnavailable(f"no engine for {wanted!r} with formats {sorted(formats)} (have {sorted(engines)})")


# Span names whose duration a metric records. A call past its operation's span
# budget in auto-instrumented code arrives instead as a metric event named
# ``<span name>.ns``: the span's attributes, and its duration in integer
# nanoseconds (an integer is cheaper to write than a float, call after call).
OBSERVED_SPANS = frozenset(
    {"document.create", "document.load", "document.recompute", "occt.boolean", "occt.feature", "export"}
)
OBSERVATIONS = {name + ".ns": name for name in OBSERVED_SPANS}
# How long the runner leaves the pipe to fill after draining it, for the user's
# code. A loop of cheap calls writes an observation each (some 70 bytes per
# 50 us call, 1.4 MB/s): within the default half second the pipe (1 MiB) could
# fill and stall the loop until the next read. Reading every 50 ms leaves it
# room twenty times over.
USER_CODE_READ_BATCH_S = 0.05


class ChildTelemetry:
    """Maps the child's probe spans and metric events onto the catalogue's CAD metrics."""

    def __init__(
        self,
        observability: ModelObservability,
        flow_type: str,
        on_progress: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        self.obs = observability
        self.flow_type = flow_type
        self.on_progress = on_progress
        self.stages: dict[str, float] = {}

    def span_ended(self, name: str, a: Mapping[str, Any], duration_s: float, error_type: str | None) -> None:
        o = self.obs
        if name.startswith("cad.stage "):
            stage = str(a.get("cad.stage"))
            self.stages[stage] = self.stages.get(stage, 0.0) + duration_s
            o.record_stage(self.flow_type, stage, duration_s)
        elif name == "document.create":
            o.record_document_load(
                str(a.get("cad.document.source", "new")), str(a.get("cad.workbench", "Part")), duration_s
            )
        elif name == "document.load":
            source = str(a.get("cad.document.source", "upload"))
            o.record_document_load(source, str(a.get("cad.workbench", "Import")), duration_s)
            o.record_document_load_stage("load", duration_s)
        elif name == "document.validate":
            o.record_document_load_stage("validate", duration_s)
        elif name == "document.recompute":
            o.record_recompute(str(a.get("cad.workbench", "Part")), int(a.get("cad.object_count", 0)), duration_s)
        elif name == "occt.boolean":
            o.record_occt_boolean(str(a.get("cad.boolean.operation")), int(a.get("cad.solids_count", 0)), duration_s)
        elif name == "occt.feature":
            o.record_occt_feature(str(a.get("cad.feature")), duration_s)
        elif name == "a4.solve":
            o.record_assembly4_solve(str(a.get("cad.a4.solver")), duration_s, None)
        elif name == "a4.lcs_resolution":
            o.record_lcs_resolution(int(a.get("cad.lcs_count", 0)), duration_s)
        elif name == "material.apply_property":
            o.record_material_property(str(a.get("cad.material.property")), duration_s)
        elif name == "material.apply_appearance":
            o.record_material_appearance(str(a.get("cad.material.appearance_type")), duration_s)
        elif name == "topology.hash":
            o.record_topology_hash(str(a.get("cad.topology.scope")), duration_s)
        elif name == "export" and error_type is None:
            o.record_export(str(a.get("cad.export.format")), int(a.get("cad.export.size_bytes", 0)), duration_s)

    def metric(self, name: str, value: float, a: Mapping[str, Any]) -> None:
        o = self.obs
        if name == "freecad.object_created":
            o.record_object_created(str(a.get("cls")), str(a.get("workbench")), value)
        elif name == "occt.memory":
            o.record_occt_memory(str(a.get("operation")), value)
        elif name == "material.library":
            o.record_material_library_access(str(a.get("library")), str(a.get("result")))
        elif name == "a4.iterations":
            o.record_assembly4_iterations(str(a.get("solver")), value)
        elif name == "export.validation":
            o.record_export_validation(str(a.get("format")), str(a.get("result")))
        elif name == "workbench.invocation":
            o.record_workbench_invocation(str(a.get("workbench")))
        elif name == "workbench.compatibility":
            o.record_workbench_compatibility(str(a.get("workbench")), bool(a.get("compatible")))
        elif name in OBSERVATIONS:
            self.span_ended(OBSERVATIONS[name], a, value / 1e9, None)
        else:
            o.metrics.telemetry_rejected.labels("unknown_metric").inc()

    def progress(self, a: Mapping[str, Any]) -> None:
        if a.get("kind") == "document_load":
            ratio = a.get("ratio")
            self.obs.set_document_load_progress(
                str(a.get("stage")), float(ratio) if isinstance(ratio, (int, float)) else 0.0
            )
        if self.on_progress is not None:
            self.on_progress(a)


@dataclass
class CadResult:
    engine: EngineInfo
    run: RunResult
    outcome: str
    error_type: str | None
    error_message: str
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


def _verify_artifacts(manifest: Mapping[str, Any], out_dir: Path) -> tuple[list[dict[str, Any]], str | None]:
    """Every artifact the child claims exists in ``out_dir`` with its size and sha256."""
    verified = []
    artifacts = manifest.get("artifacts")
    if not isinstance(artifacts, list) or not artifacts:
        return [], "manifest lists no artifacts"
    root = out_dir.resolve()
    for item in artifacts:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            return [], f"manifest names an unsafe artifact path {name!r}"
        path = (root / name).resolve()
        if path.parent != root or not path.is_file():
            return [], f"artifact {name!r} is missing"
        size = path.stat().st_size
        if size != item.get("size"):
            return [], f"artifact {name!r} does not match its manifest entry"
        with path.open("rb") as handle:  # streamed: an STL can be hundreds of MB
            if hashlib.file_digest(handle, "sha256").hexdigest() != item.get("sha256"):
                return [], f"artifact {name!r} does not match its manifest entry"
        verified.append(
            {
                "name": name,
                "format": item.get("format"),
                "size": size,
                "sha256": item["sha256"],
                "deterministic": item.get("deterministic"),
            }
        )
    return verified, None


# A failed job whose disk has less room than this left failed for want of it.
_DISK_NEARLY_FULL = 1 << 20
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _disk_full_message(path: Path) -> str:
    """What a full disk message names: the path the job wrote, the disk and its room."""
    mount = path.absolute()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        stat = os.statvfs(mount)
    except OSError:
        return f"no space left on the disk holding {path}"
    free = (stat.f_bfree if os.geteuid() == 0 else stat.f_bavail) * stat.f_frsize
    inodes = "" if stat.f_favail or not stat.f_files else ", no inode free"
    return (
        f"no space left on the disk holding {path} (the disk mounted at {mount}: "
        f"{free} bytes free of {stat.f_blocks * stat.f_frsize}{inodes})"
    )


def _disk_nearly_full(path: Path) -> bool:
    try:
        stat = os.statvfs(path)
    except OSError:
        return False
    free = (stat.f_bfree if os.geteuid() == 0 else stat.f_bavail) * stat.f_frsize
    return free < _DISK_NEARLY_FULL or (stat.f_files > 0 and stat.f_favail == 0)


def _file_at_limit(folder: Path, limit: int) -> Path | None:
    """A file the job wrote that stopped at the file size limit (the kernel writes up to it)."""
    for path in folder.rglob("*"):
        try:
            if path.is_file() and path.stat().st_size >= limit:
                return path
        except OSError:
            continue
    return None


def _judge_by_folder(
    outcome: str, error_type: str | None, message: str, artifacts: list[dict[str, Any]], out: Path, limits: RunLimits
) -> tuple[str, str | None, str]:
    """What only the job's folder shows: a file cut at the size limit, a disk left full.

    FreeCAD's STL export ignores a failed write: a job can deliver its manifest
    with an artifact cut short. So a job that leaves a file at the size limit,
    or its disk full, fails even with a manifest.
    """
    limit = limits.max_file_bytes
    if limit is not None:
        if outcome == "ok":  # the artifacts' sizes are known: no need to list the folder
            cut = next((out / a["name"] for a in artifacts if a["size"] >= limit), None)
        else:
            cut = _file_at_limit(out, limit)
        if cut is not None:
            return "resource_limit", "file_size_limit", f"{cut} reached the job's file size limit ({limit} bytes)"
    if outcome == "disk_full" or _disk_nearly_full(out):
        said = message or "the job's files may be cut short"
        return "disk_full", "ENOSPC", f"{_disk_full_message(out)}: {said}"
    return outcome, error_type, message


def _not_started(message: str, error_type: str) -> RunResult:
    """The result of a job that failed before its engine could start."""
    return RunResult(
        outcome="disk_full",
        pid=0,
        exit_code=None,
        signal=None,
        duration_s=0.0,
        peak_rss_bytes=0,
        cpu_s=0.0,
        manifest=None,
        hello={},
        error_type=error_type,
        error_message=message,
    )


def _missing_outputs(job: JobSpec, artifacts: list[dict[str, Any]]) -> str | None:
    """A script job succeeds only with every output it promised, verified."""
    written = {a["name"] for a in artifacts}
    missing = [o.filename for o in job.outputs if o.filename not in written]
    return f"the script did not write {', '.join(missing)}" if missing else None


def warm_choice(engine: EngineInfo, job: JobSpec) -> tuple[str | None, str | None]:
    """The warm engine's socket for this job, or None and why it starts cold:
    ``disabled`` (``CADSCOPE_WARM=0``), ``job_option`` (``cold_start``), ``no_server``."""
    if os.environ.get("CADSCOPE_WARM", "1") == "0":
        return None, "disabled"
    if job.cold_start:
        return None, "job_option"
    path = warm_socket_path(engine.name, engine.argv[0])
    return (path, None) if path is not None else (None, "no_server")


def run_cad_job(
    job: JobSpec,
    out_dir: str | os.PathLike[str],
    *,
    engine: EngineInfo | None = None,
    job_id: str = "",
    observability: ModelObservability | None = None,
    limits: RunLimits | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    on_progress: Callable[[Mapping[str, Any]], None] | None = None,
    input_path: str | os.PathLike[str] | None = None,
) -> CadResult:
    """Run a validated job in a contained subprocess of its engine.

    Artifacts land in ``out_dir``; the child's logs and job file in
    ``out_dir/.cadscope/``. Never raises for the child's failures, nor for a
    full disk: the outcome is classified and counted.
    """
    obs = observability or default_observability()
    engine = engine or pick_engine(
        job.engine, formats=job.formats(), options=job.options, occt_version=job.occt_version
    )
    out = Path(out_dir)
    work = out / ".cadscope"
    payload = {"job": {**job.model_dump(mode="json"), "job_id": job_id}, "material_library": material_library_path()}
    stored = job.stored_document()
    if stored is not None:
        if input_path is None:
            raise ValueError(f"a job with a stored {stored.format} document needs input_path: the verified local copy")
        payload["input_path"] = str(input_path)
    argv, env, cwd = list(engine.argv), {"CADSCOPE_JOB": str(work / "job.json"), "CADSCOPE_OUT": str(out)}, work
    files = {work / "job.json": json.dumps(payload)}
    if job.script is not None or job.template is not None:
        # The user's code, auto-instrumented; the launcher owns the run's manifest.
        launcher = "usercode_launch.py" if job.script is not None else "engine_template.py"
        argv = [engine.argv[0], str(CHILD_DIR / launcher)]
        files[work / "parameters.json"] = json.dumps(job.parameters)
        env.update(auto_instrumentation_env())
        env.update(CADSCOPE_RUN_MODE="job", CADSCOPE_PARAMETERS=str(work / "parameters.json"))
        if job.script is not None:
            cwd = out  # a script writes its outputs where it stands
    env["HOME"] = _engine_home()
    limits = limits or RunLimits(timeout_s=job.timeout_s, memory_bytes=2 << 30)
    if job.script is not None or job.template is not None:
        limits = dataclasses.replace(limits, read_batch_s=min(limits.read_batch_s, USER_CODE_READ_BATCH_S))
    telemetry = ChildTelemetry(obs, job.flow_type, on_progress)
    m = obs.metrics
    warm, cold_reason = warm_choice(engine, job)
    attributes = {
        "cad.engine": engine.name,
        "cad.freecad_version": engine.freecad_version,
        "cad.occt_version": engine.occt_version,
        "cad.job_id": job_id,
        "cad.role": obs.current_role(),
        **job.options.as_attributes(),
    }
    if cold_reason is not None:
        attributes["cad.start.reason"] = cold_reason
    # freecadcmd runs a script as a module named after its file; python as __main__.
    run_name = Path(argv[1]).stem if engine.name == "freecad" else "__main__"
    with obs.engine_versions(engine.freecad_version, engine.occt_version):
        v = obs.versions()
        try:
            work.mkdir(parents=True, exist_ok=True)
            for path, text in files.items():
                path.write_text(text)
            result = run(
                argv,
                limits=limits,
                env=env,
                cwd=str(cwd),
                stdout_path=str(work / "stdout.log"),
                stderr_path=str(work / "stderr.log"),
                tracer_provider=tracer_provider,
                span_name=f"cad.subprocess {engine.name}",
                attributes=attributes,
                observer=telemetry,
                warm=warm,
                run_name=run_name,
                on_drop=lambda reason: m.telemetry_rejected.labels(bound("rejected_reason", reason)).inc(),
            )
        except OSError as exc:
            if exc.errno not in _DISK_ERRNOS:
                raise
            result = _not_started(f"{_disk_full_message(out)}: {exc.strerror}", errno.errorcode[exc.errno])
        outcome, error_type, message = result.outcome, result.error_type, result.error_message
        if result.start == "warm":
            m.warm_hits.labels(engine.name, *v.values()).inc()
            if result.warm.get("server_rss_bytes"):
                m.warm_process_rss.labels(engine.name, *v.values()).set(result.warm["server_rss_bytes"])
        else:
            reason = result.cold_reason or cold_reason or "other"
            m.cold_starts.labels(engine.name, bound("cold_start_reason", reason), *v.values()).inc()
        artifacts: list[dict[str, Any]] = []
        if result.ok and result.manifest is not None:
            artifacts, problem = _verify_artifacts(result.manifest, out)
            kind = "artifact_mismatch"
            if problem is None and job.script is not None:
                problem, kind = _missing_outputs(job, artifacts), "missing_output"
            if problem is not None:
                artifacts = []
                outcome, error_type, message = "bad_output", kind, problem
                span = trace.get_current_span()
                span.set_attribute("error.type", "bad_output")
        if outcome in ("ok", "script_error", "crash", "killed", "bad_output", "disk_full") and result.pid:
            outcome, error_type, message = _judge_by_folder(outcome, error_type, message, artifacts, out, limits)
            if outcome != "ok":
                artifacts = []
        m.subprocess_outcomes.labels(engine.name, outcome, *v.values()).inc()
        if result.pid:
            m.subprocess_peak_memory.labels(engine.name, *v.values()).observe(result.peak_rss_bytes)
            m.subprocess_cpu.labels(engine.name, *v.values()).inc(result.cpu_s)
            obs.record_occt_memory("process", result.peak_rss_bytes)
        if outcome in ("oom", "timeout", "crash", "killed"):
            m.worker_restarts.labels(outcome, *v.values()).inc()
    return CadResult(
        engine=engine,
        run=result,
        outcome=outcome,
        error_type=error_type,
        error_message=message,
        artifacts=artifacts,
        manifest=result.manifest if outcome == "ok" else None,
        stages=telemetry.stages,
    )
