"""The Celery apps that bench/task_overhead.py runs, one per mode ($BENCH_MODE).

- ``bare``: plain Celery, no telemetry.
- ``upstream``: the stack DESIGN.md measured: opentelemetry-instrumentation-celery,
  the SDK's ``BatchSpanProcessor`` with the OTLP gRPC exporter, a
  prometheus_client counter and histogram in multiprocess mode.
- ``cadscope``: cadscope's own worker app (its signals: JSON logs, the tracer
  provider with the bounded batch processor and the open-span journal, task
  spans from opentelemetry-instrumentation-celery, the multiprocess registry
  served with compaction, the journal reaper, the heartbeat), the task
  recording the catalogue's task outcome and runtime metrics as ``run_job`` does.
- ``burn``: plain Celery whose task burns ``$BENCH_BURN_US`` microseconds of
  its thread's CPU: a control, an overhead of known size.

Every mode shares the broker settings that matter for throughput: JSON, late
ack, prefetch 1, no result stored.
"""

from __future__ import annotations

import os
import time
from timeit import default_timer
from typing import Any

from celery import Celery, signals

MODE = os.environ.get("BENCH_MODE", "bare")
BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/12")
COMMON = {
    "task_serializer": "json",
    "accept_content": ["json"],
    "task_acks_late": True,
    "worker_prefetch_multiplier": 1,
    "task_ignore_result": True,
    "worker_hijack_root_logger": False,
}

if MODE == "cadscope":
    from _common import catalogue_noop

    from cadscope.workers import app

    app.conf.update(broker_url=BROKER, result_backend=None, **COMMON)
    noop = catalogue_noop(app)

else:
    app = Celery("bench", broker=BROKER)
    app.conf.update(**COMMON)

    if MODE == "upstream":
        from prometheus_client import Counter, Histogram

        TASKS = Counter("bench_tasks", "Tasks run.", ("task", "outcome"))
        RUNTIME = Histogram("bench_task_runtime_seconds", "Task run time.", ("task",))

        @signals.worker_process_init.connect
        def _init(**_: Any) -> None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.instrumentation.celery import CeleryInstrumentor
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            provider = TracerProvider()
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            CeleryInstrumentor().instrument(tracer_provider=provider)

        @signals.worker_process_shutdown.connect
        def _shutdown(**_: Any) -> None:
            from opentelemetry import trace

            trace.get_tracer_provider().force_flush(5000)  # type: ignore[attr-defined]

        @app.task(name="bench.noop")
        def noop() -> None:
            started = default_timer()
            TASKS.labels("bench.noop", "success").inc()
            RUNTIME.labels("bench.noop").observe(default_timer() - started)

    elif MODE == "burn":
        BURN_NS = int(float(os.environ.get("BENCH_BURN_US", "100")) * 1000)

        @app.task(name="bench.noop")
        def noop() -> None:
            until = time.thread_time_ns() + BURN_NS
            while time.thread_time_ns() < until:
                pass

    else:
        from _common import plain_noop

        noop = plain_noop(app)
