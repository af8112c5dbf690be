"""``cadscope_queue_messages{queue}``: messages waiting in the broker, read at scrape time.

Redis: kombu keeps a queue as lists, one per priority step (``queue``,
``queue\\x06\\x163``, ...); their lengths are summed. Embedded broker: message
files in the queue folder. A broker that does not answer within the timeout
yields no sample (and the broker check of ``/health/ready`` says why).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["QueueCollector"]

_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (0, 3, 6, 9)


class QueueCollector(Collector):
    def __init__(self, broker_url: str, queue: str, transport_options: dict[str, Any], timeout_s: float = 0.5):
        self.broker_url, self.queue, self.timeout_s = broker_url, queue, timeout_s
        self.folder = transport_options.get("data_folder_in")
        self._redis: Any = None

    def _length(self) -> int:
        if self.broker_url.startswith("filesystem"):
            return sum(1 for _ in Path(str(self.folder)).glob(f"*.{self.queue}.msg"))
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(
                self.broker_url, socket_connect_timeout=self.timeout_s, socket_timeout=self.timeout_s
            )
        keys = [self.queue] + [f"{self.queue}{_PRIORITY_SEP}{step}" for step in _PRIORITY_STEPS if step]
        pipe = self._redis.pipeline()
        for key in keys:
            pipe.llen(key)
        return int(sum(pipe.execute()))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("cadscope_queue_messages", "Messages waiting in the broker queue.", labels=["queue"])
        try:
            family.add_metric([self.queue], self._length())
        except Exception:  # noqa: BLE001 - a scrape must not fail because the broker is down
            return
        yield family
