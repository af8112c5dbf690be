"""The Celery side: app, CAD job task, fork-safe worker lifecycle.

Run a worker (prefork) against Redis::

    CELERY_BROKER_URL=redis://127.0.0.1:6379/0 cadscope worker --concurrency 2

or with Celery's own CLI: ``celery -A cadscope.workers.app worker``. Submit::

    from cadscope.workers import run_job
    run_job.apply_async(args=[job_spec_dict], kwargs={"job_id": "job-1"})
"""

from __future__ import annotations

from ._app import QUEUE, app, configure_app
from ._config import EMBEDDED, WorkerSettings
from ._tasks import TASK_NAME, run_job

__all__ = ["EMBEDDED", "QUEUE", "TASK_NAME", "WorkerSettings", "app", "configure_app", "run_job"]
