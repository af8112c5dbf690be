"""What the benchmark scripts share: a collector that only counts, the no-op task cadscope's worker runs,
how results are published, a median's interval."""

from __future__ import annotations

import contextlib
import os
import random
import statistics
import threading
import time
from concurrent import futures
from typing import Any

__all__ = ["NullCollector", "NullCollectorProcess", "NullHTTPCollectorProcess", "bootstrap", "catalogue_noop",
           "other_threads_cpu", "paired", "publish", "revision_tree", "task_request"]  # fmt: skip


class NullCollector:
    """An OTLP/gRPC trace endpoint that only counts the spans it receives (in
    another process than the one measured, so its work is not charged to the
    stack under test)."""

    def __init__(self) -> None:
        self.spans = 0

    def __enter__(self) -> NullCollector:
        import grpc
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        def export(request: bytes, context: Any) -> bytes:
            parsed = ExportTraceServiceRequest.FromString(request)
            self.spans += sum(len(ss.spans) for rs in parsed.resource_spans for ss in rs.scope_spans)
            return b""  # an empty ExportTraceServiceResponse

        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(export)},
        )
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=1)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class NullCollectorProcess:
    """A :class:`NullCollector` in a process of its own, for benchmarks whose
    measured process is this one: decoding the requests must not be charged
    to the worker under test. ``spans`` is read on exit."""

    SERVE = "--serve"

    def __enter__(self) -> NullCollectorProcess:
        import subprocess
        import sys

        self._proc = subprocess.Popen(
            [sys.executable, __file__, self.SERVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self._proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("PORT "):
            self._proc.kill()
            raise RuntimeError(f"null collector did not start: {line!r}")
        self.port = int(line.split()[1])
        self.spans = -1
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        out, _ = self._proc.communicate("", timeout=30)  # EOF on stdin: print the count and stop
        self.spans = int(out.split()[-1])


class NullHTTPCollectorProcess(NullCollectorProcess):
    """The same over OTLP/HTTP (protobuf), served by cadscope's test receiver: ``endpoint`` is the traces
    URL, ``/v1/traces``."""

    SERVE = "--serve-http"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"


def _serve() -> None:
    import sys

    with NullCollector() as collector:
        print(f"PORT {collector.port}", flush=True)
        sys.stdin.read()
    print(f"SPANS {collector.spans}", flush=True)


def _serve_http() -> None:
    import sys

    from cadscope.tracing.testing import OTLPReceiver

    with OTLPReceiver() as receiver:
        print(f"PORT {receiver.http_port}", flush=True)
        sys.stdin.read()
    print(f"SPANS {len(receiver.spans)}", flush=True)


def other_threads_cpu() -> dict[int, float]:
    """CPU seconds so far of each thread of this process but the calling one, by native id (Linux)."""
    me, used = threading.get_native_id(), {}
    for tid in map(int, os.listdir("/proc/self/task")):
        if tid != me:
            with contextlib.suppress(FileNotFoundError), open(f"/proc/self/task/{tid}/schedstat") as stat:
                used[tid] = int(stat.read().split()[0]) / 1e9  # first field: ns on a CPU
    return used


def plain_noop(app: Any) -> Any:
    """Register ``bench.noop`` on ``app``: a task that does nothing (bare Celery's, and cadscope's stacks
    whose task records no metrics)."""

    @app.task(name="bench.noop")
    def noop() -> None:
        return None

    return noop


def catalogue_noop(app: Any) -> Any:
    """Register ``bench.noop`` on ``app`` as cadscope's worker runs a task:
    recording the catalogue's task outcome and runtime metrics."""
    from cadscope.metrics import default_observability

    @app.task(name="bench.noop")
    def noop() -> None:
        started = time.perf_counter()
        default_observability().metrics.task_finished("bench.noop", "success", time.perf_counter() - started)

    return noop


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def task_request(task_id: str, name: str) -> dict[str, Any]:
    """A message's request as Celery's task tracer gets it in a pool process (headers flattened in),
    with the producer's ``traceparent``."""
    return {"id": task_id, "task": name, "retries": 0, "hostname": "bench@host",
            "delivery_info": {"exchange": "", "routing_key": "cadscope", "priority": 0, "redelivered": False},
            "reply_to": "8fe6b313-2d9b-3ffa-99f1-fdbd326c4878", "correlation_id": task_id,
            "timelimit": [900, 840], "traceparent": TRACEPARENT}  # fmt: skip


def revision_tree(repo: str, rev: str) -> tuple[str, str]:
    """A git worktree of ``repo`` at ``rev``, removed when this process exits, and the revision's short
    hash: for a stack that runs cadscope's code as it was there (its directory first on ``PYTHONPATH``)."""
    import atexit
    import subprocess
    import tempfile

    tree = tempfile.mkdtemp(prefix="cadscope-before-")
    subprocess.run(["git", "-C", repo, "worktree", "add", "--detach", "-f", tree, rev], check=True, capture_output=True)
    atexit.register(subprocess.run, ["git", "-C", repo, "worktree", "remove", "--force", tree], capture_output=True)
    short = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                           text=True).stdout.strip()  # fmt: skip
    return tree, short


def publish(text: str, results_file: str | None) -> None:
    """Print a results section and, with ``--write FILE``, append it there."""
    print(text)
    if results_file:
        with open(results_file, "a") as handle:
            handle.write(text)


def bootstrap(values: list[float], resamples: int = 4000) -> tuple[float, float, float]:
    """Median and its 95 % percentile-bootstrap interval."""
    rng = random.Random(7)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return statistics.median(values), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def paired(instrumented: list[float], bare: list[float]) -> tuple[float, float, float]:
    """Median of the paired ratios and its 95 % interval."""
    return bootstrap([i / b for i, b in zip(instrumented, bare, strict=True)])


if __name__ == "__main__":
    import sys

    _serve_http() if sys.argv[1:] == [NullHTTPCollectorProcess.SERVE] else _serve()
