"""Multiprocess registry: the worker's main process owns the directory.

prometheus_client picks its value class when it is imported, from
``PROMETHEUS_MULTIPROC_DIR``. :func:`enable_multiprocess` sets the variable and
switches the value class, so it works whether or not prometheus_client was
imported first, as long as it runs before any labelled child is created (all
cadscope metrics have labels, so children are created lazily).
"""

from __future__ import annotations

import glob
import os
import shutil

from prometheus_client import CollectorRegistry, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

__all__ = ["enable_multiprocess", "mark_process_dead", "multiprocess_registry"]

ENV = "PROMETHEUS_MULTIPROC_DIR"


def enable_multiprocess(path: str, *, wipe: bool = False) -> str:
    """Use ``path`` for this process and its children; ``wipe`` at fleet start."""
    path = os.path.abspath(path)
    if wipe and os.path.isdir(path):
        # Keep the directory (other processes may hold it open); empty it.
        for entry in glob.glob(os.path.join(path, "*")):
            if os.path.isdir(entry):
                shutil.rmtree(entry, ignore_errors=True)
            else:
                os.unlink(entry)
    os.makedirs(path, exist_ok=True)
    os.environ[ENV] = path
    values.ValueClass = values.MultiProcessValue()
    return path


def multiprocess_registry(path: str | None = None) -> CollectorRegistry:
    """A registry that aggregates every process's files (for ``/metrics``)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path or os.environ[ENV])
    return registry
