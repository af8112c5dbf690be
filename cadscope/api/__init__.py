"""The HTTP front door, where every job's trace begins.

    CADSCOPE_API_TOKEN=... cadscope api --port 8000

Everything under ``/v1/`` needs the bearer token.

- ``POST /v1/jobs``: a job spec → 202 ``{"job_id", "idempotency_key"}`` and a
  ``traceparent`` header; 422 with field errors; 413 over the body limit; 503
  within ~5 s when the broker does not confirm. With an ``Idempotency-Key``
  header the job id is derived from the key, and a retry gets the same job
  (409 if the body differs); the worker runs a job id at most once to its end.
- ``POST /v1/prompts``: ``{"prompt", "engine"}`` through the AI providers, then
  as ``/v1/jobs``.
- ``GET /v1/jobs/{id}``: state, stages, timings, manifest or classified failure.
- ``GET /v1/jobs/{id}/artifacts/{name}``: an exported file.
- ``GET /v1/jobs/{id}/events``: Server-Sent Events, replayed from the start,
  closed after ``job.finished``; at most ``CADSCOPE_API_MAX_STREAMS`` open
  (503 beyond).
- ``/health/live``, ``/health/ready``, ``/health/detailed`` (bearer token).
- ``/metrics``: the API's RED metrics.
"""

from __future__ import annotations

from ._app import ApiSettings, create_app
from ._health import health_score

__all__ = ["ApiSettings", "create_app", "health_score"]
