"""Synthetic transaction monitoring: a tiny prompt through every
provider on a schedule, so a dead provider shows before a user finds it."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ._chain import ProviderChain

__all__ = ["SyntheticCheck"]

log = logging.getLogger("cadscope.ai")


class SyntheticCheck:
    """Runs :meth:`ProviderChain.check` every ``interval_s`` seconds on a
    daemon thread (``None`` or 0: never). ``last`` holds each provider's latest
    result with its time; ``ai_provider_synthetic_ok`` has it as a gauge."""

    def __init__(self, chain: ProviderChain, interval_s: float | None) -> None:
        self.chain = chain
        self.interval_s = interval_s
        self.last: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> dict[str, dict[str, Any]]:
        report = self.chain.check()
        now = time.time()
        for name, result in report.items():
            self.last[name] = {**result, "at": now}
        return report

    def start(self) -> None:
        if not self.interval_s or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="cadscope-ai-synthetic", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # keep checking; the gauge shows the failure
                log.exception("synthetic AI check failed")
            self._stop.wait(self.interval_s)
