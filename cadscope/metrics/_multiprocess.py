"""Multiprocess registry: the worker's main process owns the directory, and keeps it bounded.

prometheus_client picks its value class when it is imported, from
``PROMETHEUS_MULTIPROC_DIR``. :func:`enable_multiprocess` sets the variable and
switches the value class, so it works whether or not prometheus_client was
imported first, as long as it runs before any labelled child is created (all
cadscope metrics have labels, so children are created lazily).

Upstream never compacts: every recycled pool child leaves its files behind and
each scrape reads them all (client_python #204, #367: 6,800 files, 40 s
scrapes). Deleting them would make counters go backwards. Here the files of
processes that have been reaped are merged into one accumulator per type,
atomically with respect to scrapes (one lock, held by the scrape and the
compaction, in the one process that serves ``/metrics``), so no counter ever
decreases and the directory holds the live processes plus two accumulators.

A file that cannot be read costs the scrape that file, never the whole
``/metrics`` page (upstream raises for all of it, client_python #1199):
``MmapedDict`` creates its file and only then sizes it, so a scrape can meet a
new pool child's file at 0 bytes, and a child killed in that window leaves it so
for good. Compaction deletes such a file once its process is reaped, and moves
an unreadable one aside (``*.unreadable``, kept for a post-mortem) rather than
failing every period while the directory grows.

The files are read by :func:`_read_metrics`, which gives upstream's metrics
(byte for byte once exposed) in a fraction of its time, summing counters,
histograms and summaries by key as it reads rather than making a sample per
process, and which refuses a negative key length, on which upstream's reader
never ends.
"""

from __future__ import annotations

import glob
import json
import logging
import mmap
import os
import re
import shutil
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable

import psutil
from prometheus_client import CollectorRegistry, values
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.samples import Sample

from ._values import _HEADER, _entries, _int, multiprocess_value_class

__all__ = [
    "CompactingMultiProcessCollector",
    "enable_multiprocess",
    "mark_process_dead",
    "multiprocess_registry",
    "process_reaped",
]

log = logging.getLogger("cadscope.metrics")

ENV = "PROMETHEUS_MULTIPROC_DIR"
ACCUMULATED = "compacted"
_PID_FILE = re.compile(r"^(counter|histogram|gauge_[a-z]+|summary)_(\d+)\.db$")
UNREADABLE = ".unreadable"


def _sized(path: str) -> bool:
    """Whether the file holds at least ``MmapedDict``'s header (the bytes used, padding): a shorter
    one has not been sized yet by the process creating it, and holds no samples."""
    try:
        return os.stat(path).st_size >= _HEADER
    except FileNotFoundError:  # a live gauge's file, removed by mark_process_dead since the listing
        return False


def enable_multiprocess(path: str, *, wipe: bool = False) -> str:
    """Use ``path`` for this process and its children; ``wipe`` at fleet start."""
    path = os.path.abspath(path)
    if wipe and os.path.isdir(path):
        # Keep the directory (other processes may hold it open); empty it.
        for entry in glob.glob(os.path.join(path, "*")):
            if os.path.isdir(entry):
                shutil.rmtree(entry, ignore_errors=True)
            else:
                os.unlink(entry)
    os.makedirs(path, exist_ok=True)
    os.environ[ENV] = path
    values.ValueClass = multiprocess_value_class()
    return path


def process_reaped(pid: int) -> bool:
    """True once ``pid`` is gone for good: not running, and not a zombie awaiting its parent."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_DEAD
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _file_bytes(path: str) -> bytes:
    """The used part of an ``MmapedDict`` file, read as ``read_all_values_from_file`` reads it."""
    with open(path, "rb") as file:
        data = file.read(mmap.PAGESIZE)
        used = _int(data, 0)[0]
        if used > len(data):
            data += file.read(used - len(data))
    return data


_Fields = tuple[str, str, tuple[tuple[str, str], ...], str]
# Keys already parsed, across scrapes: a pure function's results, so never stale. Bounded by the
# fleet's series; emptied if it ever holds more than _PARSED_MAX (labels that churn without end).
_parsed_keys: dict[bytes, _Fields] = {}
_PARSED_MAX = 50_000


def _key_fields(key: bytes) -> _Fields:
    """An entry's key as prometheus_client writes it (``mmap_dict.mmap_key``): the
    metric's name, the sample's name, its labels (sorted) and its help text.
    Anything else raises ``ValueError``: the key of a corrupt file."""
    fields = _parsed_keys.get(key)
    if fields is None:
        fields = _parse_key(key)
        if len(_parsed_keys) >= _PARSED_MAX:
            _parsed_keys.clear()
        _parsed_keys[key] = fields
    return fields


def _parse_key(key: bytes) -> _Fields:
    fields = json.loads(key.decode("utf-8"))
    if isinstance(fields, list) and len(fields) == 4:
        metric_name, name, labels, help_text = fields
        if (
            isinstance(metric_name, str)
            and isinstance(name, str)
            and isinstance(help_text, str)
            and isinstance(labels, dict)
            and all(isinstance(value, str) for value in labels.values())
        ):
            return metric_name, name, tuple(sorted(labels.items())), help_text
    raise ValueError(f"not a metric key: {key[:100]!r}")


def _read_metrics(files: Iterable[str]) -> dict[str, Metric]:
    """``MultiProcessCollector._read_metrics``, the same metrics in the same order, in a fraction
    of its time.

    Upstream makes a sample of every entry of every file, then sums them by
    name and labels. A counter's, histogram's or summary's samples are summed
    over processes whatever the process, so here they are summed by their
    undecoded key as the files are read, in the same order (a key's sum is
    the same float), and a key is decoded and parsed once, when first seen:
    one sample per key instead of one per key and process. Gauges, whose
    modes look at each process, are read as upstream reads them."""
    metrics: dict[str, Metric] = {}
    parsed: dict[bytes, tuple[Metric, str, tuple[tuple[str, str], ...]]] = {}
    totals: dict[bytes, float] = {}

    def parse(key: bytes, typ: str) -> tuple[Metric, str, tuple[tuple[str, str], ...]]:
        metric_name, name, labels, help_text = _key_fields(key)
        metric = metrics.get(metric_name)
        if metric is None:
            metric = metrics[metric_name] = Metric(metric_name, help_text, typ)
        entry = parsed[key] = (metric, name, labels)
        return entry

    for path in files:
        parts = os.path.basename(path).split("_")
        typ = parts[0]
        try:
            data = _file_bytes(path)
        except FileNotFoundError:
            if typ == "gauge" and parts[1].startswith("live"):
                continue  # removed by mark_process_dead since the listing, as upstream allows
            raise
        if typ == "gauge":
            pid = ("pid", parts[2][:-3])
            for key, value, timestamp in _entries(data):
                metric, name, labels = parsed.get(key) or parse(key, typ)
                metric._multiprocess_mode = parts[1]  # type: ignore[attr-defined]
                # Labels as a tuple until _accumulate_metrics makes them a dict, as upstream passes them.
                metric.add_sample(name, labels + (pid,), value, timestamp)  # type: ignore[arg-type]
            continue
        for key, value, _timestamp in _entries(data):
            total = totals.get(key)
            if total is not None:
                totals[key] = total + value
            else:
                totals[key] = 0.0 + value  # upstream's sum starts at 0.0
                if key not in parsed:
                    parse(key, typ)
    for key, total in totals.items():
        metric, name, labels = parsed[key]
        metric.add_sample(name, labels, total)  # type: ignore[arg-type]
    return metrics


class CompactingMultiProcessCollector(MultiProcessCollector):
    """``MultiProcessCollector`` that folds reaped processes' files into accumulators,
    and reads them with a faster :func:`_read_metrics`."""

    def __init__(
        self,
        registry: CollectorRegistry | None,
        path: str | None = None,
        reaped: Callable[[int], bool] = process_reaped,
        on_unreadable: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(registry, path)
        self._reaped = reaped
        self._on_unreadable = on_unreadable
        self._lock = threading.Lock()
        self.compacted_files = 0
        self._exposed: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._reported: set[str] = set()

    @staticmethod
    def merge(files: Iterable[str], accumulate: bool = True) -> Iterable[Metric]:
        return MultiProcessCollector._accumulate_metrics(_read_metrics(files), accumulate)  # type: ignore[no-any-return]

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            files = [f for f in glob.glob(os.path.join(self._path, "*.db")) if _sized(f)]
            try:
                metrics = list(self.merge(files, accumulate=True))
            except Exception:  # noqa: BLE001 - find the file at fault; the rest is served
                unreadable = [f for f in files if not self._readable(f)]
                if not unreadable:
                    raise
                metrics = list(self.merge([f for f in files if f not in unreadable], accumulate=True))
            for metric in metrics:
                if metric.type in ("counter", "histogram", "summary"):
                    metric.samples = [self._monotonic(sample) for sample in metric.samples]
            return metrics

    def _readable(self, file: str) -> bool:
        try:
            self.merge([file], accumulate=True)
        except FileNotFoundError:
            return False  # gone since the listing: nothing to report
        except Exception as exc:  # noqa: BLE001 - reported once per file, left out of the scrape
            if file not in self._reported:
                self._reported.add(file)
                log.error("metrics file unreadable, left out of every scrape until compacted: %s (%r)", file, exc)
                self._unreadable("left_out")
            return False
        return True

    def _unreadable(self, action: str) -> None:
        if self._on_unreadable is not None:
            try:
                self._on_unreadable(action)
            except Exception:  # noqa: BLE001 - counting it must not fail the scrape or the compaction
                log.warning("on_unreadable failed", exc_info=True)

    def _monotonic(self, sample: Sample) -> Sample:
        # Compaction changes the order in which floats are summed, which can move
        # a histogram's _sum down by an ulp; Prometheus reads any decrease as a
        # counter reset (a rate() spike). Never expose less than before.
        key = (sample.name, tuple(sorted(sample.labels.items())))
        exposed = self._exposed.get(key)
        if exposed is not None and sample.value < exposed:
            return sample._replace(value=exposed)
        self._exposed[key] = sample.value
        return sample  # as it is, the case of almost every sample: no copy

    def compact(self) -> int:
        """Merge reaped processes' counters and histograms; drop their gauges. Returns files deleted
        (an unreadable file moved aside is not counted)."""
        with self._lock:
            dead: dict[str, list[str]] = defaultdict(list)
            for name in os.listdir(self._path):
                match = _PID_FILE.match(name)
                if match and int(match.group(2)) != os.getpid() and self._reaped(int(match.group(2))):
                    dead[match.group(1)].append(os.path.join(self._path, name))
            removed = 0
            for kind, files in dead.items():
                if kind in ("counter", "histogram", "summary"):
                    files = self._fold(kind, files)
                for file in files:
                    os.unlink(file)
                    removed += 1
            self.compacted_files += removed
            return removed

    def _fold(self, kind: str, files: list[str]) -> list[str]:
        """Fold ``files`` into the accumulator; returns those folded (or empty), to delete."""
        accumulator = os.path.join(self._path, f"{kind}_{ACCUMULATED}.db")
        totals: dict[bytes, float] = defaultdict(float)
        checked: set[bytes] = set()  # keys read as a scrape reads them
        folded = []
        # Counter and histogram samples (buckets, sums) are sums over processes,
        # so adding the raw values key by key is exactly what a scrape would do.
        for file in ([accumulator] if os.path.exists(accumulator) else []) + files:
            if _sized(file):  # else never sized by its dead process: no samples
                try:
                    entries = [(key, value) for key, value, _ in _entries(_file_bytes(file))]
                    # A key the scrape cannot read, folded in, would make the accumulator unreadable: every
                    # reaped process's counts gone from /metrics for good. A file with a key not seen yet is
                    # read as a scrape reads it (which raises where a scrape would), or else moved aside.
                    unchecked = [key for key, _value in entries if key not in checked]
                    if unchecked:
                        self.merge([file])
                        checked.update(unchecked)
                except Exception as exc:  # noqa: BLE001 - one bad file must not stop compaction for good
                    os.replace(file, file + UNREADABLE)
                    self._reported.discard(file)
                    log.error("metrics file unreadable, moved aside: %s%s (%r)", file, UNREADABLE, exc)
                    self._unreadable("moved_aside")
                    continue
                for key, value in entries:
                    totals[key] += value
            if file != accumulator:
                folded.append(file)
        temporary = accumulator + ".tmp"
        if os.path.exists(temporary):
            os.unlink(temporary)
        merged = MmapedDict(temporary)
        try:
            for key, value in totals.items():
                merged.write_value(key.decode("utf-8"), value, 0.0)
        finally:
            merged.close()
        os.replace(temporary, accumulator)
        return folded


def multiprocess_registry(
    path: str | None = None,
    *,
    compact_every_s: float | None = None,
    on_unreadable: Callable[[str], None] | None = None,
) -> tuple[CollectorRegistry, CompactingMultiProcessCollector]:
    """A registry aggregating every process's files, and its collector.

    With ``compact_every_s``, a daemon thread compacts reaped processes' files
    on that period (the worker's main process does this). ``on_unreadable`` is
    called with ``"left_out"`` the first time a scrape cannot read a file, and
    with ``"moved_aside"`` when compaction moves one aside.
    """
    registry = CollectorRegistry()
    collector = CompactingMultiProcessCollector(registry, path=path or os.environ[ENV], on_unreadable=on_unreadable)
    if compact_every_s:

        def loop() -> None:
            while True:
                threading.Event().wait(compact_every_s)
                try:
                    collector.compact()
                except Exception:  # noqa: BLE001 - retried next period; never kills the worker
                    log.exception("metrics compaction failed")

        threading.Thread(target=loop, name="cadscope-metrics-compaction", daemon=True).start()
    return registry, collector
