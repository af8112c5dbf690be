"""RED metrics for the API: requests by method, route template and status; latency; in flight.

The route is the matched template (``/v1/jobs/{job_id}``), never the raw path,
so a client cannot mint label values; unmatched paths are ``unmatched``.
"""

from __future__ import annotations

from timeit import default_timer
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["REDMiddleware"]

# API calls are fast except submission under broker trouble (bounded at ~5 s).
API_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class REDMiddleware:
    def __init__(self, app: ASGIApp, registry: CollectorRegistry = REGISTRY) -> None:
        self.app = app
        self.requests = Counter(
            "http_requests", "HTTP requests by method, route template and status.",
            ("method", "route", "status"), registry=registry,
        )  # fmt: skip
        self.latency = Histogram(
            "http_request_duration_seconds", "HTTP request latency by method and route template.",
            ("method", "route"), registry=registry, buckets=API_LATENCY_BUCKETS,
        )  # fmt: skip
        self.in_flight = Gauge(
            "http_requests_in_flight", "HTTP requests being served.", registry=registry, multiprocess_mode="livesum"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = default_timer()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.in_flight.dec()
            method = scope.get("method", "GET")
            method = method if method in _METHODS else "other"
            route = _route(scope)
            self.requests.labels(method, route, str(status)).inc()
            self.latency.labels(method, route).observe(max(default_timer() - start, 0))


def _route(scope: Scope) -> str:
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"
