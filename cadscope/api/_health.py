"""Health checks: each with its own timeout; no URL, secret or stack trace in any answer.

Health score (0-100), for ``/health/detailed``:

    100
    - 50 if the broker does not answer
    - 30 if no worker has sent a heartbeat in the last 30 s
    - 10 if the workers' engines are unknown (no engine reported)
    - 10 if the progress store does not answer (when it is not the broker)
    - 10 per firing critical alert (at most 20), 5 per firing warning (at most 10)
    clamped to 0..100. Ready means: broker, at least one worker, engines known.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

__all__ = ["Check", "health_score", "run_checks"]


@dataclass
class Check:
    name: str
    ok: bool
    latency_ms: float
    detail: str = ""

    def public(self, detailed: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok}
        if detailed:
            out["latency_ms"] = round(self.latency_ms, 1)
            if self.detail:
                out["detail"] = self.detail
        return out


async def timed(name: str, probe: Callable[[], Any], timeout_s: float) -> tuple[Check, Any]:
    """Run a blocking probe in a thread with its own deadline; errors become a failed check."""
    start = time.monotonic()
    try:
        value = await asyncio.wait_for(run_in_threadpool(probe), timeout=timeout_s)
        ok = bool(value) if not isinstance(value, dict) else True
        detail = ""
    except TimeoutError:
        value, ok, detail = None, False, f"no answer within {timeout_s:g} s"
    except Exception as exc:  # noqa: BLE001 - reported, never raised; the class name only
        value, ok, detail = None, False, type(exc).__name__
    return Check(name, ok, (time.monotonic() - start) * 1000, detail), value


def prometheus_alerts(url: str, timeout_s: float) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url.rstrip('/')}/api/v1/alerts", timeout=timeout_s) as response:  # noqa: S310
        data = json.load(response)
    return [
        {"alertname": a["labels"].get("alertname"), "severity": a["labels"].get("severity"), "state": a.get("state")}
        for a in data.get("data", {}).get("alerts", [])
    ]


async def run_checks(
    broker_ping: Callable[[], Any],
    workers: Callable[[], dict[str, dict[str, Any]]],
    store_ping: Callable[[], Any] | None = None,
    prometheus_url: str | None = None,
    timeout_s: float = 1.0,
) -> tuple[list[Check], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    tasks = [timed("broker", broker_ping, timeout_s), timed("workers", workers, timeout_s)]
    if store_ping is not None:
        tasks.append(timed("progress_store", store_ping, timeout_s))
    if prometheus_url:
        tasks.append(timed("prometheus", lambda: prometheus_alerts(prometheus_url, timeout_s), timeout_s))
    results = await asyncio.gather(*tasks)
    checks = [check for check, _ in results]
    found_workers: dict[str, dict[str, Any]] = results[1][1] or {}
    checks[1].ok = bool(found_workers)
    if not found_workers and not checks[1].detail:
        checks[1].detail = "no worker heartbeat in the last 30 s"
    engines = {e.get("engine") for w in found_workers.values() for e in w.get("engines", [])}
    checks.append(Check("engines", bool(engines), 0.0, "" if engines else "no engine reported by any worker"))
    alerts: list[dict[str, Any]] = []
    if prometheus_url:
        alerts = next((value or [] for check, value in results if check.name == "prometheus"), [])
    return checks, found_workers, alerts


def health_score(checks: list[Check], alerts: list[dict[str, Any]]) -> int:
    ok = {check.name: check.ok for check in checks}
    score = 100
    score -= 0 if ok.get("broker") else 50
    score -= 0 if ok.get("workers") else 30
    score -= 0 if ok.get("engines") else 10
    score -= 0 if ok.get("progress_store", True) else 10
    firing = [a for a in alerts if a.get("state") == "firing"]
    score -= min(20, 10 * sum(1 for a in firing if a.get("severity") == "critical"))
    score -= min(10, 5 * sum(1 for a in firing if a.get("severity") == "warning"))
    return max(0, min(100, score))
