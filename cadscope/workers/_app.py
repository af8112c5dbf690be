"""The Celery app and the worker's lifecycle (fork-safe telemetry setup).

Main process (``worker_init``, before the pool forks): joins or makes the
tracer provider (with the open-span journal), takes and wipes the
multiprocess metrics directory, serves ``/metrics``, closes the spans that
dead processes left open (:class:`~cadscope.tracing.JournalReaper`), and
discovers the engines once so every pool process inherits their versions.

Pool process (``worker_process_init``): its metric files allocated ahead,
and Celery instrumented (opentelemetry-instrumentation-celery, unless
something already did). ``worker_process_shutdown``: flush spans (billiard's
pool processes leave through ``os._exit``; ``atexit`` never runs) and retire
the process's live gauges.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery, signals

from ..freecad_bridge import WarmPool, discover_engines
from ..metrics import (
    Catalogue,
    DirectoryInUse,
    default_observability,
    enable_multiprocess,
    mark_process_dead,
    multiprocess_registry,
    process_identifier,
    reserve_process_files,
    serve_metrics,
)
from ..tracing import (
    JournalReaper,
    SpanJournal,
    configure_json_logging,
    instrument_celery,
    setup_tracing,
    shutdown_tracing,
)
from ._config import WorkerSettings, broker_settings
from ._progress import Heartbeat, ProgressService, progress_store

__all__ = ["PUBLISHED_AT_HEADER", "QUEUE", "app", "configure_app", "progress", "span_journal"]

log = logging.getLogger("cadscope.workers")

QUEUE = "cadscope"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
PUBLISHED_AT_HEADER = "cadscope_published_at"

app = Celery("cadscope", include=["cadscope.workers._tasks"])


def configure_app(celery_app: Celery, broker_url: str | None = None, settings: WorkerSettings | None = None) -> Celery:
    """Apply cadscope's settings.

    The broker is ``broker_url``, else ``$CELERY_BROKER_URL``, else a local
    Redis; ``embedded`` selects kombu's filesystem transport under
    ``$CADSCOPE_DATA_DIR`` (no server needed, one host only).
    """
    settings = settings or WorkerSettings.from_env()
    broker = broker_url or os.environ.get("CELERY_BROKER_URL") or DEFAULT_BROKER
    celery_app.conf.update(
        broker_settings(broker, settings.data_dir),
        # Job parameters are data: JSON only, never pickle.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # A job lost with its worker runs again: ack after the work, requeue
        # on worker loss, take one job at a time (CAD jobs are long and heavy).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.hard_time_limit,
        task_soft_time_limit=settings.soft_time_limit,
        task_default_queue=QUEUE,
        task_track_started=True,
        result_expires=24 * 3600,
        broker_connection_retry_on_startup=True,
        # Bounded publish retries: an API must fail fast when the broker is down.
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        worker_hijack_root_logger=False,
    )
    transport = dict(celery_app.conf.broker_transport_options or {})
    if not celery_app.conf.broker_url.startswith("filesystem"):
        # Longer than the hard time limit, or Redis redelivers a job still running.
        transport.setdefault("visibility_timeout", settings.visibility_timeout)
        transport.setdefault("socket_connect_timeout", 3)
        transport.setdefault("socket_timeout", 10)
    celery_app.conf.broker_transport_options = transport
    return celery_app


configure_app(app)


@signals.before_task_publish.connect
def _stamp_published_at(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is not None:
        headers.setdefault(PUBLISHED_AT_HEADER, time.time())


@functools.lru_cache(maxsize=1)
def progress() -> ProgressService:
    """This process's progress service (Redis streams or files, like the broker)."""
    return ProgressService(progress_store(app.conf.broker_url, WorkerSettings.from_env().data_dir))


@signals.celeryd_init.connect
def _on_celeryd_init(conf: Any = None, **_: Any) -> None:
    """Worker only: a job that finished while Redis was restarting must not turn
    into a failure because its result could not be stored. Retry storing it
    (exponential backoff, up to ~5 min) instead. The API keeps the default:
    its reads fail fast rather than hold a request for minutes."""
    if conf is not None:
        conf.result_backend_always_retry = True
        conf.result_backend_max_retries = 40


_journal: dict[str, SpanJournal] = {}


def span_journal() -> SpanJournal | None:
    """This worker's open-span journal (set up in its main process), or None outside a worker."""
    return _journal.get("journal")


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    settings = WorkerSettings.from_env()
    configure_json_logging("cadscope-worker")
    try:
        enable_multiprocess(str(settings.metrics_dir), wipe=True, lock=True)
    except DirectoryInUse as exc:
        print(f"cadscope worker: {exc}", file=sys.stderr, flush=True)
        os._exit(78)  # EX_CONFIG: a supervisor must not restart it into the same refusal
    fallback: list[str] = []
    reserve_process_files(Catalogue.FILE_KINDS, on_fallback=fallback.append)
    observability = default_observability()  # after the switch: its unlabelled metrics write files now
    for reason in fallback:
        observability.record_metrics_fallback(reason)
    # Spans of every process on a job's path are journalled while open, so that if one dies
    # this process ends them at its death (JournalReaper); after a whole worker died, the
    # next one on this data directory ends them at its last heartbeat (recover()).
    journal = SpanJournal(
        str(settings.data_dir / "journal"), owner=process_identifier(), on_error=observability.record_journal_error
    )
    _journal["journal"] = journal
    provider = setup_tracing("cadscope-worker", on_drop=observability.record_spans_dropped, processors=[journal])
    reaper = JournalReaper(
        journal.directory, provider, owner=process_identifier(), on_recovered=observability.record_spans_recovered
    )
    reaper.recover()
    reaper.start()
    # Pool processes come and go (max_tasks_per_child, crashes): fold the files of dead ones
    # into accumulators so scrapes stay flat and counters never drop. The counters alerting
    # on a single event are exposed at 0 from now on.
    observability.zero_event_counters()
    registry, _collector = multiprocess_registry(
        compact_every_s=5.0,
        on_unreadable=observability.record_metrics_file_unreadable,
        on_accumulator=observability.record_metrics_accumulator,
    )
    server, _thread = serve_metrics(registry, settings.metrics_port, settings.metrics_addr)
    engines = discover_engines()
    _start_warm_engines(engines, observability)
    node = getattr(sender, "hostname", None) or f"worker@{socket.gethostname()}"
    info = {"node": node, "pid": os.getpid(), "engines": [e.as_dict() for e in dict.fromkeys(engines.values())],
            "concurrency": getattr(sender, "concurrency", None)}  # fmt: skip
    Heartbeat(progress().store, node, info).start()
    _freeze_heap()  # last: what the pool forks with
    log.info(
        "worker ready to fork",
        extra={
            "metrics": f"http://{settings.metrics_addr}:{server.server_port}/metrics",
            "engines": {name: info.as_dict() for name, info in engines.items()},
        },
    )


_warm: dict[str, WarmPool] = {}
# A fork server serves this many jobs, or grows by this much, before it is replaced.
DEFAULT_WARM_MAX_FORKS = 1000
DEFAULT_WARM_MAX_RSS_GROWTH_MB = 64


def _start_warm_engines(engines: Any, observability: Any) -> None:
    """One fork server per engine for the whole host, unless ``CADSCOPE_WARM=0``; its
    directory reaches the pool processes through the environment they inherit."""
    if os.environ.get("CADSCOPE_WARM", "1") == "0":
        return
    try:
        max_forks = int(os.environ.get("CADSCOPE_WARM_MAX_FORKS", DEFAULT_WARM_MAX_FORKS))
        growth = int(os.environ.get("CADSCOPE_WARM_MAX_RSS_GROWTH_MB", DEFAULT_WARM_MAX_RSS_GROWTH_MB)) << 20
        pool = WarmPool(
            # One per engine pool: discovery also names each kind's default engine ("ocp").
            {info.pool: (info.argv[0], info.as_dict()) for info in engines.values()},
            max_forks=max_forks,
            max_rss_growth=growth,
            metrics=observability.metrics,
        )
    except ValueError as exc:
        print(f"cadscope worker: CADSCOPE_WARM_*: {exc}", file=sys.stderr, flush=True)
        os._exit(78)
    pool.start()
    _warm["pool"] = pool
    log.info("warm engines", extra={"servers": sorted(pool.servers), "unavailable": pool.unavailable})


@signals.worker_shutdown.connect
def _stop_warm_engines(**_: Any) -> None:
    pool = _warm.pop("pool", None)
    if pool is not None:
        pool.stop()


@signals.worker_ready.connect
def _on_worker_ready(**_: Any) -> None:
    ready_file = WorkerSettings.from_env().ready_file
    if ready_file:
        path = Path(ready_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(os.getpid()))


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    # The ready file says a worker is up: it leaves with the worker that wrote it (a
    # later worker on the same file has written its own pid there).
    ready_file = WorkerSettings.from_env().ready_file
    if ready_file:
        path = Path(ready_file)
        try:
            if path.read_text() == str(os.getpid()):
                path.unlink()
        except OSError:
            pass


@signals.worker_process_init.connect
def _on_worker_process_init(**_: Any) -> None:
    configure_json_logging("cadscope-worker")
    observability = default_observability()
    provider = setup_tracing("cadscope-worker", on_drop=observability.record_spans_dropped)  # the main's, inherited
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        reserve_process_files(Catalogue.FILE_KINDS, on_fallback=observability.record_metrics_fallback)
        _check_metrics_writable(observability.metrics.worker_process_starts)
    instrument_celery(provider)
    _freeze_heap()


def _check_metrics_writable(starts: Any, timeout_s: float = 5.0) -> None:
    """Count this pool process's start, on a thread, within ``timeout_s``; else leave.

    prometheus_client's multiprocess values share one lock in a process. A pool
    process forked while another thread of the main process held it (writing a
    metric) inherits it held, and its first metric write would wait for ever:
    better to say so and exit, so that the pool starts another process."""
    done = threading.Event()

    def count() -> None:
        starts.inc()
        done.set()

    threading.Thread(target=count, name="cadscope-metrics-check", daemon=True).start()
    if not done.wait(timeout_s):
        log.critical("metric writes are blocked in this pool process (forked mid-write); exiting so it is replaced")
        logging.shutdown()
        os._exit(70)


def _freeze_heap() -> None:
    """Leave every object made so far (imports, the app, telemetry set-up) out of the cyclic
    collector's passes from now on (``gc.freeze``), as Python's documentation advises a server
    that forks without exec: a pool process's collections then no longer write to the headers
    of the objects it shares with the main process, so the pages holding them stay shared."""
    gc.freeze()


@signals.worker_process_shutdown.connect
def _on_worker_process_shutdown(pid: int | None = None, **_: Any) -> None:
    # Bounded: a collector that is down or hangs costs at most 5 s here, and
    # the spans it never took are counted (cadscope_telemetry_spans_dropped).
    shutdown_tracing(timeout_millis=5000)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        mark_process_dead(process_identifier())
