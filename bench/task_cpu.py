"""Per-task CPU of the instrumentation in a pool process, without the noise.

bench/task_overhead.py measures the real thing (a prefork worker over Redis)
but on a 2-core VM its rounds scatter by ±15 %, more than the effect. This
script isolates what instrumentation adds where it runs, in the pool process:
it drives Celery's own task tracer (``celery.app.trace.build_tracer``, what a
pool child calls for every message, with the producer's ``traceparent`` among
the flattened headers) in a loop, in one process per stack, and reads the
process's CPU time (all threads, so span export counts) over N tasks, ending
with a flush so every span has been encoded and sent over OTLP/gRPC to a
sink in the parent.

The tracer gets the task object registered with the app, as a worker's
does (``app.tasks[name]``), not the proxy that ``@app.task`` returns: every
attribute read through that proxy costs a few microseconds, and
instrumentation that reads the task would be charged for them.

Stacks (one fresh process each, interleaved, repeated):

- ``bare``: the task alone;
- ``signals``: four receivers that do nothing, connected to the four task
  signals cadscope uses (what Celery's dispatch alone costs);
- ``metrics``: the task recording the catalogue's task outcome and runtime
  metrics, multiprocess mode, no tracing;
- ``upstream``: opentelemetry-instrumentation-celery, the SDK's
  ``BatchSpanProcessor``, OTLP gRPC, a prometheus_client counter and histogram
  (multiprocess mode): what DESIGN.md measured;
- ``cadscope-sdk-span``: cadscope's worker setup (its consumer handlers,
  bounded processor, catalogue metrics) with the SDK's span and upstream's
  OTLP encoder, as cadscope was up to 37adb98;
- ``cadscope-upstream-encoder``: the same with cadscope's lean task span
  (``cadscope.tracing._lean``), still upstream's encoder;
- ``cadscope-eager``: the lean task span made at once on the task thread, and
  cadscope's OTLP encoder, as cadscope was up to 09b6a77;
- ``cadscope-signals``: the lean task span, deferred (its ids and sampling
  decision made on the export thread), cadscope's OTLP encoder
  (``cadscope.tracing._otlpwire``), through Celery's task signals: as
  cadscope was up to f1489a2;
- ``cadscope-no-export``: as shipped, but the exporter discards the spans:
  the hooks, the span and the processor's queue without the encoding and
  the gRPC call (the export thread still resolves the deferred spans);
- ``cadscope``: as shipped: as ``cadscope-signals``, through the task's
  hooks (every task a ``TracedTask``), with no receiver on Celery's per-task
  signals.

The figure is the process's CPU, every thread's: a deferred span moves work
from the task thread to the export thread, and this loop charges both.

The results also split cadscope's added microseconds into metrics, the task
span (hooks, extract, span, context, processor) and export, from the
differences between these stacks, and give what deferring the span and the
hooks each save.

    python bench/task_cpu.py [--tasks 20000] [--rounds 5] [--write bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from _common import NullCollector, catalogue_noop, plain_noop, publish, task_request
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

STACKS = ("bare", "signals", "metrics", "upstream", "cadscope-sdk-span", "cadscope-upstream-encoder",
          "cadscope-eager", "cadscope-signals", "cadscope-no-export", "cadscope")  # fmt: skip
HOOKED = ("cadscope-no-export", "cadscope")  # the tracer through TracedTask's hooks
UNEXPORTED = ("bare", "signals", "metrics", "cadscope-no-export")
WARM_UP = 1000


class _Discard(SpanExporter):
    """An exporter that takes every span and does nothing with it."""

    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def child(stack: str, tasks: int) -> dict[str, float]:
    """Runs in a fresh process: set the stack up as a pool child would, then time N tasks."""
    from celery import Celery
    from celery.app.trace import build_tracer, setup_worker_optimizations

    if stack in HOOKED:
        from cadscope.tracing import TracedTask

        app = Celery("bench-cpu", set_as_current=True, task_cls=TracedTask)
    else:
        app = Celery("bench-cpu", set_as_current=True)
    app.conf.update(task_ignore_result=True, result_backend=None)
    flush = None

    if stack in ("bare", "signals"):
        if stack == "signals":
            from celery import signals

            def receiver(**_: object) -> None:
                return None

            for signal in (signals.task_prerun, signals.task_postrun, signals.task_failure, signals.task_retry):
                signal.connect(receiver, weak=False)
        noop = plain_noop(app)

    elif stack == "metrics":
        noop = catalogue_noop(app)

    elif stack == "upstream":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from prometheus_client import Counter, Histogram

        tasks_total = Counter("bench_tasks", "Tasks run.", ("task", "outcome"))
        runtime = Histogram("bench_task_runtime_seconds", "Task run time.", ("task",))
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        CeleryInstrumentor().instrument(tracer_provider=provider)
        flush = provider.force_flush

        @app.task(name="bench.noop")
        def noop() -> None:
            started = time.perf_counter()
            tasks_total.labels("bench.noop", "success").inc()
            runtime.labels("bench.noop").observe(time.perf_counter() - started)

    else:
        from cadscope.metrics import default_observability
        from cadscope.tracing import _celery, flush_tracing, instrument_celery_worker, setup_tracing

        exporters: list[SpanExporter] = []
        if stack == "cadscope-no-export":
            os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT")
            exporters.append(_Discard())
        elif stack not in ("cadscope", "cadscope-signals", "cadscope-eager"):
            # upstream's encoder, in upstream's OTLP/gRPC exporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter(endpoint=os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT"), insecure=True))
        if stack in ("cadscope-sdk-span", "cadscope-upstream-encoder", "cadscope-eager"):
            _celery.deferring_tracer = lambda tracer: None  # type: ignore[assignment]  # span made at once
        if stack == "cadscope-sdk-span":
            _celery.start_lean_span = lambda tracer, name, context, kind, attributes: tracer.start_span(  # type: ignore[assignment]
                name, context=context, kind=kind, attributes=attributes
            )
        provider = setup_tracing("bench-cpu", exporters=exporters, on_drop=default_observability().record_spans_dropped)
        noop = catalogue_noop(app)
        instrument_celery_worker(provider, app=app if stack in HOOKED else None)
        flush = flush_tracing  # type: ignore[assignment]

    # What a worker does before its pool runs a task: among other things, Celery's stack
    # protection, which lets a task class's own ``__call__`` (TracedTask's) call ``run``
    # directly rather than push a second request.
    setup_worker_optimizations(app, "bench@host")
    # The registered task, as a worker's tracer gets it; ``noop`` itself is a proxy.
    trace_task = build_tracer(noop.name, app.tasks[noop.name], app=app, eager=False, propagate=False)

    def run(n: int, offset: int) -> None:
        for i in range(offset, offset + n):
            task_id = f"job-{i:08d}"
            trace_task(task_id, (), {}, task_request(task_id, noop.name))

    run(WARM_UP, 0)  # imports, first spans, the gRPC channel
    if flush is not None:
        flush()
    cpu0 = time.process_time()
    run(tasks, WARM_UP)
    if flush is not None:
        flush()
    cpu = time.process_time() - cpu0
    return {"us_per_task": cpu / tasks * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write")
    parser.add_argument("--child", choices=STACKS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tasks)))
        return 0
    results: dict[str, list[float]] = {s: [] for s in STACKS}
    with NullCollector() as sink, tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for stack in STACKS if r % 2 == 0 else tuple(reversed(STACKS)):
                metrics_dir = os.path.join(tmp, f"{stack}-{r}")
                os.mkdir(metrics_dir)
                env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
                       "OTEL_EXPORTER_OTLP_INSECURE": "true", "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
                       "CADSCOPE_TRACES_FILE": ""}  # fmt: skip
                before = sink.spans
                out = subprocess.run(
                    [sys.executable, __file__, "--child", stack, "--tasks", str(args.tasks)],
                    env=env, capture_output=True, text=True, timeout=600, check=True,
                )  # fmt: skip
                us = json.loads(out.stdout.strip().splitlines()[-1])["us_per_task"]
                received = sink.spans - before
                # Every task's span must have reached the collector: a stack that dropped
                # spans (queue full) would look cheaper than it is.
                expected = 0 if stack in UNEXPORTED else args.tasks + WARM_UP
                if received != expected:
                    raise SystemExit(f"{stack}: the collector received {received} spans, expected {expected}")
                results[stack].append(us)
                print(f"round {r + 1} {stack:28s} {us:7.1f} µs CPU/task, {received} spans exported", flush=True)
    bare = statistics.median(results["bare"])
    lines = [
        f"\n### Task CPU in the pool process: Celery's task tracer in a loop, {args.tasks} tasks x "
        f"{args.rounds} rounds, OTLP/gRPC to a null collector ({time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        "`python bench/task_cpu.py`)\n",
        "| stack | CPU per task (median) | range | added by instrumentation |",
        "| --- | --- | --- | --- |",
    ]
    for stack in STACKS:
        values = results[stack]
        median = statistics.median(values)
        lines.append(
            f"| {stack} | {median:.1f} µs | {min(values):.1f}–{max(values):.1f} µs | **{median - bare:+.1f} µs** |"
        )
    lines.append("\nEvery span of every exporting run reached the collector (checked per run).\n")
    m = {stack: statistics.median(values) for stack, values in results.items()}
    parts = (
        ("metrics (task outcome counter and runtime histogram, multiprocess)", m["metrics"] - bare),
        ("task span (hooks, lean span, context, processor queue; a deferred span's resolving)",
         m["cadscope-no-export"] - m["metrics"]),
        ("export (OTLP encoding, gRPC, the export thread)", m["cadscope"] - m["cadscope-no-export"]),
    )  # fmt: skip
    lines += ["| where cadscope's added microseconds go (differences of medians) | per task |", "| --- | --- |"]
    lines += [f"| {what} | {us:+.1f} µs |" for what, us in parts]
    lines.append(f"| **all** (cadscope − bare) | **{m['cadscope'] - bare:+.1f} µs** |")
    deferring = m["cadscope-signals"] - m["cadscope-eager"]
    lines.append(f"| deferring the task span (cadscope-signals − cadscope-eager) | {deferring:+.1f} µs |")
    hooks = m["cadscope"] - m["cadscope-signals"]
    lines.append(f"| the task's hooks, not Celery's signals (cadscope − cadscope-signals) | {hooks:+.1f} µs |")
    dispatch = m["signals"] - bare
    lines.append(f"| for scale: four no-op receivers on the task signals (signals − bare) | {dispatch:+.1f} µs |")
    publish("\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
