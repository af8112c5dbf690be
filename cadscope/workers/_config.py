"""Worker configuration from the environment (the process boundary only)."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["EMBEDDED", "WorkerSettings", "broker_settings", "parse_engine", "shadow_selected", "shadow_settings"]

_VERSION = re.compile(r"^\d{1,3}\.\d{1,3}\.\d{1,3}$")

EMBEDDED = "embedded"


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker reads from its environment, read once."""

    data_dir: Path
    metrics_dir: Path
    metrics_addr: str
    metrics_port: int
    hard_time_limit: int
    soft_time_limit: int
    ready_file: str | None
    visibility_timeout: int = 1200
    max_deliveries: int = 3
    allow_faults: bool = False
    document_store: Path | None = None  # store:// keys resolve here; default data_dir/store
    document_cache: Path | None = None  # verified input documents; default data_dir/document-cache
    document_cache_bytes: int = 1 << 30
    # The engine pool this worker serves (``ocp@7.9.3``, ``freecad``): it runs no other engine.
    engine: str | None = None
    # Shadow runs: this fraction of the primary jobs this worker runs (and that no API
    # shadowed already) is also sent to the candidate pool's queue, as shadow jobs.
    shadow_fraction: float = 0.0
    shadow_queue: str | None = None
    shadow_engine: str | None = None  # the candidate, ENGINE[@OCCT_VERSION]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerSettings:
        env = os.environ if environ is None else environ
        data = Path(env.get("CADSCOPE_DATA_DIR", os.path.abspath("cadscope-data")))
        hard = int(env.get("CADSCOPE_TASK_TIME_LIMIT", "900"))
        soft = int(env.get("CADSCOPE_TASK_SOFT_TIME_LIMIT", str(max(hard - 60, 1))))
        if soft >= hard:
            raise ValueError(f"CADSCOPE_TASK_SOFT_TIME_LIMIT ({soft}) must be below CADSCOPE_TASK_TIME_LIMIT ({hard})")
        visibility = int(env.get("CADSCOPE_VISIBILITY_TIMEOUT", str(hard + 300)))
        if visibility <= hard:
            # Redis would hand a job that is still running to a second worker.
            raise ValueError(
                f"CADSCOPE_VISIBILITY_TIMEOUT ({visibility}) must exceed CADSCOPE_TASK_TIME_LIMIT ({hard})"
            )
        return cls(
            data_dir=data,
            metrics_dir=Path(env.get("PROMETHEUS_MULTIPROC_DIR", str(data / "metrics"))),
            metrics_addr=env.get("CADSCOPE_METRICS_ADDR", "127.0.0.1"),
            metrics_port=int(env.get("CADSCOPE_METRICS_PORT", "9808")),
            hard_time_limit=hard,
            soft_time_limit=soft,
            ready_file=env.get("CADSCOPE_READY_FILE"),
            visibility_timeout=visibility,
            max_deliveries=int(env.get("CADSCOPE_MAX_DELIVERIES", "3")),
            allow_faults=env.get("CADSCOPE_ALLOW_FAULTS") == "1",
            document_store=Path(env.get("CADSCOPE_DOCUMENT_STORE", str(data / "store"))),
            document_cache=Path(env.get("CADSCOPE_DOCUMENT_CACHE", str(data / "document-cache"))),
            document_cache_bytes=int(env.get("CADSCOPE_DOCUMENT_CACHE_BYTES", str(1 << 30))),
            engine=env.get("CADSCOPE_ENGINE") or None,
            **shadow_settings(env),
        )


def parse_engine(text: str) -> tuple[str, str | None]:
    """``ENGINE[@OCCT_VERSION]`` as (engine, version or None); ValueError naming what is wrong."""
    name, _, version = text.partition("@")
    if name not in ("freecad", "ocp") or (version and not _VERSION.fullmatch(version)):
        raise ValueError(f"an engine is freecad or ocp, optionally @OCCT_VERSION (ocp@7.9.3), not {text!r}")
    return name, version or None


def shadow_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """``CADSCOPE_SHADOW_FRACTION`` (0 to 1, default 0), ``CADSCOPE_SHADOW_QUEUE`` (the candidate
    pool's queue) and ``CADSCOPE_SHADOW_ENGINE`` (the candidate): read by the API and the worker."""
    fraction = float(env.get("CADSCOPE_SHADOW_FRACTION", "0") or 0)
    if not 0 <= fraction <= 1:
        raise ValueError(f"CADSCOPE_SHADOW_FRACTION ({fraction}) must be between 0 and 1")
    queue, engine = env.get("CADSCOPE_SHADOW_QUEUE") or None, env.get("CADSCOPE_SHADOW_ENGINE") or None
    if fraction > 0 and not (queue and engine):
        raise ValueError("CADSCOPE_SHADOW_FRACTION > 0 needs CADSCOPE_SHADOW_QUEUE and CADSCOPE_SHADOW_ENGINE")
    if engine:
        parse_engine(engine)
    return {"shadow_fraction": fraction, "shadow_queue": queue, "shadow_engine": engine}


def shadow_selected(job_id: str, fraction: float) -> bool:
    """Whether ``job_id`` is shadowed at ``fraction``: decided by its id, so a retry decides the same."""
    if fraction <= 0:
        return False
    return int(hashlib.sha256(job_id.encode()).hexdigest()[:8], 16) < fraction * 0x1_0000_0000


def broker_settings(broker_url: str | None, data_dir: Path) -> dict[str, Any]:
    """Celery broker/backend settings; ``None`` or ``embedded`` picks the
    filesystem transport under ``data_dir`` (no server to install)."""
    if broker_url and broker_url not in (EMBEDDED, "filesystem://"):
        backend = os.environ.get("CELERY_RESULT_BACKEND") or broker_url
        return {"broker_url": broker_url, "result_backend": backend}
    queue = data_dir / "broker" / "queue"
    processed = data_dir / "broker" / "processed"
    results = data_dir / "broker" / "results"
    control = data_dir / "broker" / "control"
    for folder in (queue, processed, results, control):
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "broker_url": "filesystem://",
        "broker_transport_options": {
            "data_folder_in": str(queue),
            "data_folder_out": str(queue),
            "processed_folder": str(processed),
            # kombu's default is ./control: exchange tables in whatever
            # directory the process happened to start in.
            "control_folder": str(control),
            "store_processed": False,
            # The default 1 s poll would show up as queue wait on every job.
            "polling_interval": 0.05,
        },
        "result_backend": f"file://{results}",
    }
