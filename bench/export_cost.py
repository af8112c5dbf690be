"""What one span export costs the exporting process, over OTLP/gRPC and OTLP/HTTP, as ratios in one run.

A worker's span processor exports every 5 s (or 512 spans) from its own
thread. The export's cost is that thread's CPU (encoding, the call) plus
whatever the transport runs in threads of its own: gRPC's client keeps its
event-engine threads busy for seconds after every call, whether or not
another follows. So each exporter runs in a fresh process of its own that
exports the same batch on the processor's schedule, and the process's CPU
is read per thread (``/proc/self/task/*/schedstat``) over the exports:

- ``cadscope gRPC``: :class:`~cadscope.tracing._otlpgrpc.OTLPWireSpanExporter`,
  what a worker uses by default;
- ``cadscope gRPC, BDP``: the same with gRPC's BDP probing on, as upstream's
  channel has it (cadscope turns it off: ``CHANNEL_OPTIONS``);
- ``upstream gRPC`` and ``upstream HTTP``: opentelemetry-exporter-otlp's;
- ``cadscope HTTP``: :class:`~cadscope.tracing._otlphttp.OTLPWireHTTPSpanExporter`
  (``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf``).

The receivers (an OTLP/gRPC one and an OTLP/HTTP one, counting the spans they
receive) run in processes of their own. Rounds rotate the order of the exporters; each
figure is the median over rounds, and the ratio to cadscope gRPC is taken
within each round.

    python bench/export_cost.py [--rounds 3] [--exports 6] [--every 5] [--spans 200] [--write bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from _common import NullCollectorProcess, NullHTTPCollectorProcess, other_threads_cpu, publish

EXPORTERS = ("cadscope gRPC", "cadscope gRPC, BDP", "upstream gRPC", "upstream HTTP", "cadscope HTTP")


def _batch(count: int) -> list:
    """``count`` ended spans shaped as a CAD job's: a stage name and the attributes every stage span carries."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "cadscope-worker", "host.name": "bench"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("cadscope.freecad")
    stages = ("occt.boolean.fuse", "occt.fillet", "assembly.solve", "export.step", "recompute")
    for i in range(count):
        with tracer.start_as_current_span(stages[i % len(stages)]) as span:
            span.set_attributes({"cad.engine": "freecad", "freecad.version": "0.20.2", "occt.version": "7.6.3",
                                 "job.id": f"job-{i // 25:06d}", "cad.shape.faces": i % 97,
                                 "cad.stage.ok": True})  # fmt: skip
    return list(memory.get_finished_spans())


def child(kind: str, endpoint: str, exports: int, every: float, spans: int) -> dict[str, float]:
    """In a fresh process: one exporter, ``exports`` exports of one batch ``every`` seconds apart."""
    from opentelemetry.sdk.trace.export import SpanExportResult

    batch = _batch(spans)
    if kind == "cadscope gRPC":
        from cadscope.tracing._otlpwire import OTLPWireSpanExporter

        exporter = OTLPWireSpanExporter(endpoint=endpoint, insecure=True)
    elif kind == "cadscope gRPC, BDP":
        from cadscope.tracing._otlpwire import OTLPWireSpanExporter

        exporter = OTLPWireSpanExporter(
            endpoint=endpoint, insecure=True, channel_options=(("grpc.http2.bdp_probe", 1),)
        )
    elif kind == "upstream gRPC":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True)
    elif kind == "upstream HTTP":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPExporter

        exporter = HTTPExporter(endpoint=endpoint)
    else:
        from cadscope.tracing._otlpwire import OTLPWireHTTPSpanExporter

        exporter = OTLPWireHTTPSpanExporter(endpoint=endpoint)
    # A first export connects and warms up; then the transport settles as it would between a worker's exports.
    assert exporter.export(batch) is SpanExportResult.SUCCESS
    time.sleep(every)
    before, caller, started = other_threads_cpu(), time.thread_time_ns(), time.perf_counter()
    for _ in range(exports):
        assert exporter.export(batch) is SpanExportResult.SUCCESS, f"{kind}: export failed"
        time.sleep(every)
    caller, elapsed, after = (time.thread_time_ns() - caller) / 1e6, time.perf_counter() - started, other_threads_cpu()
    others = sum(cpu - before.get(tid, 0.0) for tid, cpu in after.items()) * 1000  # ms
    exporter.shutdown()
    return {"caller": caller / exports, "others": others / exports, "others_rate": others / elapsed,
            "threads": len(after)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--exports", type=int, default=6)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between exports (the processor's 5 s)")
    parser.add_argument("--spans", type=int, default=200, help="spans a batch (a 2-core worker's 5 s of jobs)")
    parser.add_argument("--write")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.endpoint, args.exports, args.every, args.spans)))
        return 0
    got: dict[str, list[dict[str, float]]] = {kind: [] for kind in EXPORTERS}
    with NullCollectorProcess() as grpc_sink, NullHTTPCollectorProcess() as http_sink:
        for r in range(args.rounds):
            for kind in EXPORTERS[r % len(EXPORTERS) :] + EXPORTERS[: r % len(EXPORTERS)]:
                endpoint = http_sink.endpoint if kind.endswith("HTTP") else grpc_sink.endpoint
                out = subprocess.run([sys.executable, __file__, "--child", kind, "--endpoint", endpoint,
                                      "--exports", str(args.exports), "--every", str(args.every),
                                      "--spans", str(args.spans)],
                                     capture_output=True, text=True, timeout=600, check=True)  # fmt: skip
                got[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
                row = got[kind][-1]
                print(f"round {r + 1} {kind:18s} caller {row['caller']:.2f} ms, other threads {row['others']:.2f} ms "
                      f"a export", flush=True)  # fmt: skip

    each = args.rounds * (args.exports + 1) * args.spans  # an exporter's spans, a warm-up export a round included
    transports = ["HTTP" if kind.endswith("HTTP") else "gRPC" for kind in EXPORTERS]
    sent = {transport: transports.count(transport) * each for transport in ("gRPC", "HTTP")}
    if (grpc_sink.spans, http_sink.spans) != (sent["gRPC"], sent["HTTP"]):
        raise SystemExit(f"spans sent {sent}, received: gRPC {grpc_sink.spans}, HTTP {http_sink.spans}")

    def total(row: dict[str, float]) -> float:
        return row["caller"] + row["others"]

    base = got["cadscope gRPC"]
    lines = [
        f"\n### One span export's CPU in the exporting process: {args.spans} spans every {args.every:g} s, "
        f"{args.exports} exports x {args.rounds} rounds ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}; `python bench/export_cost.py`)\n",
        "Medians over rounds [range]; the ratio is taken against cadscope gRPC within each round.\n",
        "| exporter | calling thread, per export | the process's other threads, per export | **total per export** "
        "| ÷ cadscope gRPC | other threads, CPU ms a second |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind in EXPORTERS:
        rows = got[kind]
        totals = [total(row) for row in rows]
        ratios = [total(row) / total(b) for row, b in zip(rows, base, strict=True)]
        lines.append(
            f"| {kind} | {statistics.median(r['caller'] for r in rows):.2f} ms "
            f"| {statistics.median(r['others'] for r in rows):.2f} ms "
            f"| **{statistics.median(totals):.2f} ms** [{min(totals):.2f}–{max(totals):.2f}] "
            f"| **{statistics.median(ratios):.2f}** [{min(ratios):.2f}–{max(ratios):.2f}] "
            f"| {statistics.median(r['others_rate'] for r in rows):.2f} |"
        )
    publish("\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
