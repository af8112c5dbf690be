"""``/metrics`` over HTTP, loopback by default."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

__all__ = ["serve_metrics"]


def serve_metrics(
    registry: CollectorRegistry, port: int, addr: str = "127.0.0.1"
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``registry`` on ``addr:port`` in a daemon thread (port 0: pick one)."""
    return start_http_server(port, addr=addr, registry=registry)
