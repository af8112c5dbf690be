"""RED metrics for the API: requests by method, route template and status; latency; in flight;
and the event streams, which are not requests to be timed like the others.

The route is the matched template (``/v1/jobs/{job_id}``), never the raw path,
so a client cannot mint label values; unmatched paths are ``unmatched``.

A response sent as ``text/event-stream`` is a stream: it stays open as long as
the job it follows, minutes for a heavy part. It is still counted and timed
under its route (the latency alert leaves that route out), and it has signals
of its own:

- ``http_streams_open{route}``: streams being served now;
- ``http_stream_errors_total{route, reason}``: streams that ended before the
  server finished them. ``server_error``: the server failed mid-stream and the
  client got a cut stream. ``client_disconnected``: the client, or a proxy
  between (an idle timeout shorter than a job), closed it first. Both reasons
  are exposed at 0 from a route's first stream, so a first error shows as an
  increase.
"""

from __future__ import annotations

from timeit import default_timer
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["REDMiddleware"]

# API calls are fast except submission under broker trouble (bounded at ~5 s).
API_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
STREAM_ERROR_REASONS = ("client_disconnected", "server_error")
_STREAM_TYPE = b"text/event-stream"


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
        self.streams_open = Gauge(
            "http_streams_open", "Event streams being served, by route template.", ("route",),
            registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.stream_errors = Counter(
            "http_stream_errors", "Event streams that ended before the server finished them, by route and reason.",
            ("route", "reason"), registry=registry,
        )  # fmt: skip
        self._stream_routes: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        stream: str | None = None  # the route, once the response turned out to be a stream
        finished = False  # the response's last message went out
        disconnected = False
        start = default_timer()

        async def receive_wrapper() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal status, stream, finished
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if _is_stream(message):
                    stream = self._stream_started(_route(scope))
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True

        self.in_flight.inc()
        failure: BaseException | None = None
        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self.in_flight.dec()
            if stream is not None:
                self.streams_open.labels(stream).dec()
                if not finished:
                    gone = disconnected or isinstance(failure, (ClientDisconnect, OSError))
                    self.stream_errors.labels(stream, "client_disconnected" if gone else "server_error").inc()
            method = scope.get("method", "GET")
            method = method if method in _METHODS else "other"
            route = _route(scope)
            self.requests.labels(method, route, str(status)).inc()
            self.latency.labels(method, route).observe(max(default_timer() - start, 0))

    def _stream_started(self, route: str) -> str:
        if route not in self._stream_routes:
            self._stream_routes.add(route)
            for reason in STREAM_ERROR_REASONS:
                self.stream_errors.labels(route, reason)
        self.streams_open.labels(route).inc()
        return route


def _is_stream(start: Message) -> bool:
    return any(
        name.lower() == b"content-type" and value.lower().startswith(_STREAM_TYPE)
        for name, value in start.get("headers", ())
    )


def _route(scope: Scope) -> str:
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"
