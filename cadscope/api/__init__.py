"""The HTTP front door, where every job's trace begins.

    CADSCOPE_API_TOKEN=... cadscope api --port 8000

- ``POST /v1/jobs``: a job spec → 202 ``{"job_id"}`` and a ``traceparent``
  header; 422 with field errors; 413 over the body limit; 503 within ~5 s when
  the broker is unreachable (nothing enqueued). Bearer token.
- ``GET /v1/jobs/{id}``: state, stages, timings, manifest or classified failure.
- ``GET /v1/jobs/{id}/artifacts/{name}``: an exported file (bearer token).
- ``GET /v1/jobs/{id}/events``: Server-Sent Events, replayed from the start,
  closed after ``job.finished``.
- ``/health/live``, ``/health/ready``, ``/health/detailed`` (bearer token).
- ``/metrics``: the API's RED metrics.
"""

from __future__ import annotations

from ._app import ApiSettings, create_app
from ._health import health_score

__all__ = ["ApiSettings", "create_app", "health_score"]
