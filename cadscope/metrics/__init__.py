"""The cadscope metric catalogue, its observability helpers, and multiprocess exposition.

Usage::

    from cadscope.metrics import ModelObservability

    obs = ModelObservability()                      # on the default REGISTRY
    with obs.engine_versions("0.20.2", "7.6.3"):
        with obs.observe_model_generation("parametric", job_id="job-1"):
            with obs.observe_occt_boolean("union", solids_count=5):
                ...

In a prefork worker, call :func:`enable_multiprocess` in the main process before
the pool forks, :func:`reserve_process_files` in each new process before its
first write, and serve :func:`multiprocess_registry` on ``/metrics``. Values
are written by prometheus_client's own multiprocess classes; cadscope's
collector reads the directory and keeps it bounded.
"""

from __future__ import annotations

from ._catalogue import (
    ALLOWED_LABEL_VALUES,
    SECURITY_VIOLATION_SEVERITY,
    VERSION_LABELS,
    Catalogue,
    bound,
    bound_version,
    doc_complexity,
    file_size_range,
    lcs_count_range,
    solids_range,
)
from ._exposition import serve_metrics
from ._facade import ModelObservability, default_observability
from ._multiprocess import (
    CompactingMultiProcessCollector,
    DirectoryInUse,
    enable_multiprocess,
    fallback_directory,
    identifier_alive,
    lock_directory,
    mark_process_dead,
    multiprocess_registry,
    process_identifier,
    process_reaped,
    reserve_process_files,
)

__all__ = [
    "ALLOWED_LABEL_VALUES",
    "SECURITY_VIOLATION_SEVERITY",
    "VERSION_LABELS",
    "Catalogue",
    "CompactingMultiProcessCollector",
    "DirectoryInUse",
    "ModelObservability",
    "bound",
    "bound_version",
    "default_observability",
    "doc_complexity",
    "enable_multiprocess",
    "fallback_directory",
    "file_size_range",
    "identifier_alive",
    "lcs_count_range",
    "lock_directory",
    "mark_process_dead",
    "multiprocess_registry",
    "process_identifier",
    "process_reaped",
    "reserve_process_files",
    "serve_metrics",
    "solids_range",
]
