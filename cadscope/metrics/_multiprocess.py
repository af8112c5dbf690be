"""Multiprocess metrics: one directory per worker host, kept bounded, read by one collector.

prometheus_client writes every process's values to files of its own in
``PROMETHEUS_MULTIPROC_DIR`` (its ``MultiProcessValue``, unchanged).
:func:`enable_multiprocess` turns that on, naming each process's files by
its pid *and its start time* (prometheus_client's ``process_identifier``
argument), so a file belongs to exactly one process ever: a pid the kernel
reuses gets files of its own, and a file whose process is gone can be
folded into the accumulators without a race.

Upstream never compacts: every recycled pool process leaves its files, and
each scrape reads them all (client_python #204, #367: 6,800 files, 40 s
scrapes); deleting them would make counters go backwards.
:class:`CompactingMultiProcessCollector`, a ``Collector`` of cadscope's own,
serves the directory and folds dead processes' counters, histograms and
summaries into one accumulator per type, in batches, off the scrape path:
a scrape waits at most for one batch's renames and deletions. Scrapes and
the swap of a batch take a shared and an exclusive ``flock`` on the
directory's lock file, so several processes serving one directory (an API
with several server processes) never see a batch twice or not at all; one
process at a time compacts.

The accumulators are written whole (temporary file, checksum, rename) with
the previous copy kept; a copy that fails its checksum is repaired from the
last one this process read or wrote, or from the previous copy, and the
repair (or a loss no copy could make up) is counted and logged. A counter
is never exposed lower than before, and after a loss it goes on from where
it was, so rates stay right (no freeze, no reset).

:func:`reserve_process_files` allocates a process's files before
prometheus_client maps them: a write to a mapped page of a sparse file on a
full disk kills the process with SIGBUS. Where the disk has no room, the
process's files go to a memory-backed fallback directory, which the
collector reads and compacts too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, values
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import _files

__all__ = [
    "CompactingMultiProcessCollector",
    "DirectoryInUse",
    "enable_multiprocess",
    "fallback_directory",
    "identifier_alive",
    "lock_directory",
    "mark_process_dead",
    "multiprocess_registry",
    "process_identifier",
    "process_reaped",
    "reserve_process_files",
]

log = logging.getLogger("cadscope.metrics")

ENV = "PROMETHEUS_MULTIPROC_DIR"
ACCUMULATED = "compacted"
UNREADABLE = ".unreadable"
LOCK_FILE = ".cadscope-owner.lock"
SWAP_LOCK_FILE = ".cadscope-swap.lock"
COMPACTOR_LOCK_FILE = ".cadscope-compactor.lock"
_FILE = re.compile(r"^(counter|histogram|summary|gauge_[a-z]+)_([0-9]+(?:-[0-9]+)?|compacted)\.db$")
_SUMMED = ("counter", "histogram", "summary")
GAUGE_MODES = ("all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent", "livemostrecent")
# Bytes allocated ahead for a process's file of each kind: room for about 1,500 entries of a
# histogram and 1,500 of a counter at cadscope's key lengths; a file that outgrows it is given
# blocks by the compaction loop (see _top_up).
RESERVE_BYTES = {"counter": 1 << 18, "histogram": 1 << 20, "summary": 1 << 16, "gauge": 1 << 16}
BATCH = 256  # dead files folded per swap: what one swap's deletions cost a waiting scrape


# -- whose files ------------------------------------------------------------------------------


def _start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (``/proc/<pid>/stat``), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return None
    try:
        return int(stat[stat.rindex(b")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


_identity: dict[str, object] = {"pid": None, "value": ""}


def process_identifier() -> str:
    """This process's name for its files: ``<pid>-<start ticks>`` (``<pid>`` where ``/proc`` is
    missing). prometheus_client asks for it on every write, so it is kept until the pid changes."""
    pid = os.getpid()
    if _identity["pid"] != pid:
        ticks = _start_ticks(pid)
        _identity["value"] = f"{pid}-{ticks}" if ticks is not None else str(pid)
        _identity["pid"] = pid
    return _identity["value"]  # type: ignore[return-value]


def process_reaped(pid: int) -> bool:
    """True once ``pid`` is gone for good: not running, and not a zombie awaiting its parent."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_DEAD
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def identifier_alive(identifier: str) -> bool:
    """Whether the process whose files carry ``identifier`` may still write to them. With a start
    time, a process is that pid started at that tick: once gone it never comes back, zombie or not.
    A bare pid (files of prometheus_client's default naming) is alive until it is reaped."""
    pid_text, _, ticks = identifier.partition("-")
    pid = int(pid_text)
    if not ticks:
        return not process_reaped(pid)
    if _start_ticks(pid) != int(ticks):
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# -- the directory ----------------------------------------------------------------------------


class DirectoryInUse(RuntimeError):
    """Another live process owns the metrics directory."""


_owned: dict[str, int] = {}  # directory -> the fd holding its owner lock, for this process's life


def lock_directory(path: str) -> None:
    """Take ``path`` for this process (an exclusive ``flock`` held until it exits), or raise
    :class:`DirectoryInUse` naming the owner: two workers on one directory would wipe and fold
    each other's files. Idempotent in the owning process."""
    path = os.path.abspath(path)
    if path in _owned:
        return
    os.makedirs(path, exist_ok=True)
    fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise DirectoryInUse(
            f"metrics directory {path} is in use by another process (pid {owner}); give each worker "
            f"a directory of its own: PROMETHEUS_MULTIPROC_DIR, or CADSCOPE_DATA_DIR for all its files"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _owned[path] = fd


def fallback_directory(path: str) -> str:
    """The memory-backed directory where a process's files go when ``path``'s disk is full."""
    digest = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]
    base = "/dev/shm" if os.path.isdir("/dev/shm") else os.environ.get("TMPDIR", "/tmp")
    return os.path.join(base, f"cadscope-metrics-{digest}")


def _empty(path: str) -> None:
    for entry in os.scandir(path):
        if entry.name in (LOCK_FILE,):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


_value_classes: dict[str, object] = {}


def enable_multiprocess(path: str, *, wipe: bool = False, lock: bool = False) -> str:
    """Use ``path`` for this process's metrics and its children's (``PROMETHEUS_MULTIPROC_DIR``),
    with prometheus_client's own multiprocess values, files named by :func:`process_identifier`.

    ``lock`` takes the directory for this process first (:func:`lock_directory`); ``wipe``
    empties it, and its fallback directory, at fleet start. Call it before any labelled child is
    made (every cadscope metric has labels, so children are made lazily). Calling it again for
    the same directory keeps the same value class."""
    path = os.path.abspath(path)
    if lock:
        lock_directory(path)
    os.makedirs(path, exist_ok=True)
    if wipe:
        _empty(path)
        fallback = fallback_directory(path)
        if os.path.isdir(fallback):
            _empty(fallback)
    os.environ[ENV] = path
    # One value class per directory and process tree: a second class would map the same files
    # again and write over its entries.
    value_class = _value_classes.get(path)
    if value_class is None:
        value_class = _value_classes[path] = values.MultiProcessValue(process_identifier)
    values.ValueClass = value_class
    return path


def _kinds_of(catalogue_kinds: Iterable[str] | None) -> list[str]:
    return list(catalogue_kinds) if catalogue_kinds is not None else ["counter", "histogram", "gauge_livesum"]


def reserve_process_files(
    kinds: Iterable[str] | None = None, *, on_fallback: Callable[[str], None] | None = None
) -> str:
    """Allocate this process's files of each kind (``counter``, ``histogram``, ``gauge_<mode>``)
    before prometheus_client maps them, in ``$PROMETHEUS_MULTIPROC_DIR``. Where its disk is full,
    this process's files go to :func:`fallback_directory` instead (``PROMETHEUS_MULTIPROC_DIR`` is
    set to it for this process), and ``on_fallback(reason)`` is called. Returns the directory
    used. Call it in a new process before its first metric write (``worker_process_init``)."""
    primary = os.environ[ENV]
    home = os.environ.get("CADSCOPE_METRICS_HOME", primary)  # the directory the collector serves
    identifier = process_identifier()
    error: OSError | None = None
    for directory in (home, fallback_directory(home)):
        try:
            os.makedirs(directory, exist_ok=True)
            for kind in _kinds_of(kinds):
                size = RESERVE_BYTES["gauge" if kind.startswith("gauge") else kind]
                _files.allocate(os.path.join(directory, f"{kind}_{identifier}.db"), size)
        except OSError as exc:
            error = exc
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                break
            log.error(
                "no room for this process's metric files in %s (%s); trying the memory-backed fallback",
                directory,
                os.strerror(exc.errno or 0),
            )
            continue
        os.environ.setdefault("CADSCOPE_METRICS_HOME", home)
        os.environ[ENV] = directory
        if directory != home and on_fallback is not None:
            on_fallback("disk_full")
        return directory
    raise OSError(error.errno if error else errno.EIO, f"cannot allocate metric files: {error}")


def mark_process_dead(pid: int | str, path: str | None = None) -> None:
    """Remove the live-gauge files of a process that has exited (``pid`` or an identifier; with
    a bare pid, every identifier of that pid). Compaction does this too, later."""
    path = path or os.environ[ENV]
    for name in os.listdir(path):
        match = _FILE.match(name)
        if not match or not match.group(1).startswith("gauge_live"):
            continue
        identifier = match.group(2)
        if identifier == str(pid) or identifier.split("-")[0] == str(pid):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(path, name))


# -- the collector -----------------------------------------------------------------------------


@contextlib.contextmanager
def _flocked(path: str, mode: int) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # releases the lock


_PARSED_MAX = 100_000
_parsed: dict[bytes, _files.Fields] = {}


def _fields(key: bytes) -> _files.Fields:
    """A key's fields, parsed once per process (bounded: labels that churn without end clear it)."""
    fields = _parsed.get(key)
    if fields is None:
        fields = _files.parse_key(key)
        if len(_parsed) >= _PARSED_MAX:
            _parsed.clear()
        _parsed[key] = fields
    return fields


class CompactingMultiProcessCollector(Collector):
    """Serves a multiprocess directory (and its fallback); folds dead processes' files.

    Register it on a registry of its own and serve that registry (see
    :func:`multiprocess_registry`). ``alive(identifier)`` says whether a
    file's process may still write (tests pass their own).
    ``on_unreadable(action)`` is called with ``"left_out"`` the first time a
    scrape cannot read a file and ``"moved_aside"`` when compaction moves it
    aside; ``on_accumulator(outcome)`` with ``"repaired"`` or ``"lost"``
    when an accumulator copy failed its checksum.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        path: str | None = None,
        *,
        alive: Callable[[str], bool] = identifier_alive,
        on_unreadable: Callable[[str], None] | None = None,
        on_accumulator: Callable[[str], None] | None = None,
    ) -> None:
        self.path = os.path.abspath(path or os.environ[ENV])
        self.directories = [self.path, fallback_directory(self.path)]
        self._alive = alive
        self._on_unreadable = on_unreadable
        self._on_accumulator = on_accumulator
        self._readers: dict[str, _files.FileReader] = {}
        # Every key of a summed kind gets a slot; each file's keys map to slots (kept while it lives).
        self._slot_of: dict[bytes, int] = {}
        self._slot_keys: list[bytes] = []
        # slot -> (metric name, help, kind, (sample name, labels), a histogram bucket's series or None, its bound)
        self._slot_info: list[tuple[str, str, str, tuple[str, tuple[tuple[str, str], ...]], Any, float]] = []
        self._file_slots: dict[str, list[int]] = {}
        self._accumulator_slots: dict[str, tuple[list[tuple[bytes, float, float]], list[int]]] = {}
        self._reported: set[str] = set()
        self._exposed: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._offsets: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        # kind -> the accumulator's entries as last verified or written here, and the file's
        # (inode, size, mtime) then: the repair source, and a scrape's cache.
        self._accumulators: dict[str, tuple[list[tuple[bytes, float, float]], tuple[int, int, int] | None]] = {}
        self._state_lock = threading.Lock()
        self.compacted_files = 0
        self.longest_swap_s = 0.0  # the longest a scrape could have waited for a swap
        if registry is not None:
            registry.register(self)

    # -- scrape ---------------------------------------------------------------------------

    def _lock_path(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _listing(self) -> list[tuple[str, str, str]]:
        """``(path, kind, identifier)`` of every value file, accumulators included."""
        found = []
        for directory in self.directories:
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                continue
            for name in names:
                match = _FILE.match(name)
                if match:
                    found.append((os.path.join(directory, name), match.group(1), match.group(2)))
        return found

    def collect(self) -> Iterable[Metric]:
        with _flocked(self._lock_path(SWAP_LOCK_FILE), fcntl.LOCK_SH), self._state_lock:
            reported = len(self._reported)
            listing, summed, gauges = self._read_all()
            if len(self._reported) > reported:
                # A file met unreadable was just counted (``on_unreadable``), in a file this scrape may
                # have read already: read again, so the scrape that found it shows the count.
                listing, summed, gauges = self._read_all()
            # Counters, histograms and summaries are sums over processes: each key has a slot,
            # and every file's values are added into the slots of its keys.
            totals = [0.0] * len(self._slot_keys)
            present: set[int] = set()
            for slots, values in summed:
                present.update(slots)
                for slot, value in zip(slots, values):  # noqa: B905 - equal lengths, by construction
                    totals[slot] += value
            listed = {path for path, _kind, _identifier in listing}
            self._readers = {path: reader for path, reader in self._readers.items() if path in listed}
            self._file_slots = {path: slots for path, slots in self._file_slots.items() if path in listed}
            return self._families(totals, sorted(present), gauges)

    def _read_all(
        self,
    ) -> tuple[
        list[tuple[str, str, str]],
        list[tuple[list[int], tuple[float, ...]]],
        list[tuple[bytes, float, float, str, str]],
    ]:
        summed: list[tuple[list[int], tuple[float, ...]]] = []
        gauges: list[tuple[bytes, float, float, str, str]] = []
        listing = self._listing()
        for path, kind, identifier in listing:
            if kind.startswith("gauge_"):
                rows = self._read(path, kind, identifier)
                mode = kind[len("gauge_") :]
                gauges.extend((key, value, timestamp, mode, identifier) for key, value, timestamp in rows or ())
                continue
            found = self._summed_values(path, kind, identifier)
            if found is not None:
                summed.append(found)
        return listing, summed, gauges

    def _slots(self, keys: list[bytes], kind: str, known: list[int]) -> list[int]:
        """The slots of ``keys``, extending ``known`` (the slots of its first keys) for new ones."""
        slot_of, slot_keys = self._slot_of, self._slot_keys
        for key in keys[len(known) :]:
            slot = slot_of.get(key)
            if slot is None:
                # A key no scrape could expose raises here: the file is unreadable.
                metric_name, name, labels, help_text = _fields(key)
                bucket_of, bound = None, 0.0
                le = next((value for label, value in labels if label == "le"), None)
                if kind == "histogram" and le is not None:
                    bucket_of, bound = (metric_name, tuple(item for item in labels if item[0] != "le")), float(le)
                slot = slot_of[key] = len(slot_keys)
                slot_keys.append(key)
                self._slot_info.append((metric_name, help_text, kind, (name, labels), bucket_of, bound))
            known.append(slot)
        return known

    def _summed_values(self, path: str, kind: str, identifier: str) -> tuple[list[int], tuple[float, ...]] | None:
        if identifier == ACCUMULATED:
            rows = self._accumulator(path, kind)
            cached = self._accumulator_slots.get(kind)
            if cached is None or cached[0] is not rows:
                cached = (rows, self._slots([key for key, _, _ in rows], kind, []))
                self._accumulator_slots[kind] = cached
            return cached[1], tuple(value for _, value, _ in rows)
        reader = self._readers.get(path)
        if reader is None:
            reader = self._readers[path] = _files.FileReader(path)
        try:
            values = reader.values()
            slots = self._file_slots.setdefault(path, [])
            if len(slots) < len(reader.keys):
                self._slots(reader.keys, kind, slots)
            return slots, values
        except FileNotFoundError:
            return None  # gone since the listing (folded)
        except (OSError, _files.CorruptFile) as exc:
            self._unreadable_file(path, exc)
            return None

    def _unreadable_file(self, path: str, exc: Exception) -> None:
        self._readers.pop(path, None)
        self._file_slots.pop(path, None)
        if path not in self._reported:
            self._reported.add(path)
            log.error("metrics file unreadable, left out of every scrape until compacted: %s (%s)", path, exc)
            self._report(self._on_unreadable, "left_out")

    def _read(self, path: str, kind: str, identifier: str) -> list[tuple[bytes, float, float]] | None:
        reader = self._readers.get(path)
        if reader is None:
            reader = self._readers[path] = _files.FileReader(path)
        try:
            rows = reader.read()
            for key, _value, _timestamp in rows:
                _fields(key)
            return rows
        except FileNotFoundError:
            return None  # gone since the listing (a live gauge's file, or a process's end)
        except (OSError, _files.CorruptFile) as exc:
            self._unreadable_file(path, exc)
            return None

    def _accumulator(self, path: str, kind: str) -> list[tuple[bytes, float, float]]:
        """The accumulator's entries: from this process's copy while the file is unchanged, else
        read and verified (a copy that fails its checksum is repaired, see :meth:`_repair`)."""
        try:
            stat = os.stat(path)
            signature: tuple[int, int, int] | None = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            signature = None
        cached = self._accumulators.get(kind)
        if cached is not None and cached[1] == signature:
            return cached[0]
        rows, source = _files.read_accumulator(path)
        if source in ("previous", "lost"):
            rows = self._repair(path, kind, rows, source)
        try:
            stat = os.stat(path)
            signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            signature = None
        self._accumulators[kind] = (rows, signature)
        return rows

    def _repair(
        self, path: str, kind: str, rows: list[tuple[bytes, float, float]], source: str
    ) -> list[tuple[bytes, float, float]]:
        """An accumulator whose current copy failed its checksum: rewrite it from this process's
        own copy if it has one (``repaired``: nothing lost), else from the previous copy
        (``previous``: the last fold's counts are lost), else empty (``lost``: every fold so far).
        Counters still never go back (see :meth:`_monotonic`), and rates stay right after it."""
        known = self._accumulators.get(kind)
        if known is not None:
            rows, outcome = known[0], "repaired"
        else:
            outcome = source
        try:
            items = ((key.decode("utf-8"), value, 0.0) for key, value, _ in rows)
            _files.write_accumulator(path, items, keep_previous=False)  # the corrupt copy is no previous
        except OSError as exc:
            log.error("could not rewrite the metrics accumulator %s: %s", path, exc)
        explain = {
            "repaired": "rewritten from this process's copy; nothing lost",
            "previous": "rewritten from its previous copy; the counts of the last processes folded are lost",
            "lost": "its previous copy failed too; the counts of every process folded so far are lost",
        }[outcome]
        log.error("metrics accumulator %s failed its checksum: %s", path, explain)
        self._report(self._on_accumulator, outcome)
        return rows

    def _report(self, callback: Callable[[str], None] | None, what: str) -> None:
        if callback is not None:
            try:
                callback(what)
            except Exception:  # noqa: BLE001 - counting it must not fail the scrape or the compaction
                log.warning("metrics callback failed", exc_info=True)

    def _families(
        self, totals: list[float], present: list[int], gauges: list[tuple[bytes, float, float, str, str]]
    ) -> list[Metric]:
        metrics: dict[str, Metric] = {}
        buckets: dict[tuple[str, tuple[tuple[str, str], ...]], dict[float, float]] = defaultdict(dict)
        samples: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = defaultdict(dict)

        def family(name: str, help_text: str, kind: str) -> Metric:
            metric = metrics.get(name)
            if metric is None:
                metric = metrics[name] = Metric(name, help_text, kind)
            return metric

        info = self._slot_info
        for slot in present:
            metric_name, help_text, kind, sample, bucket_of, bound = info[slot]
            total = totals[slot]
            if metric_name not in metrics:
                family(metric_name, help_text, kind)
            if bucket_of is not None:
                bucket = buckets[bucket_of]
                bucket[bound] = bucket.get(bound, 0.0) + total
                continue
            series = samples[metric_name]
            series[sample] = series.get(sample, 0.0) + total
        for (metric_name, labels), bucket in buckets.items():
            series = samples[metric_name]
            running = 0.0
            for bound in sorted(bucket):
                running += bucket[bound]
                series[(metric_name + "_bucket", labels + (("le", floatToGoString(bound)),))] = running
            series[(metric_name + "_count", labels)] = running
        stamps: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        for key, value, timestamp, mode, identifier in gauges:
            metric_name, name, labels, help_text = _fields(key)
            family(metric_name, help_text, "gauge")
            series = samples[metric_name]
            if mode in ("all", "liveall"):
                series[(name, labels + (("pid", identifier),))] = value
                continue
            sample = (name, labels)
            current = series.get(sample)
            if mode in ("min", "livemin"):
                series[sample] = value if current is None else min(current, value)
            elif mode in ("max", "livemax"):
                series[sample] = value if current is None else max(current, value)
            elif mode in ("sum", "livesum"):
                series[sample] = (current or 0.0) + value
            else:  # mostrecent, livemostrecent
                if current is None or stamps.get((metric_name, name, labels), float("-inf")) < timestamp:
                    series[sample] = value
                    stamps[(metric_name, name, labels)] = timestamp
        out = []
        for metric_name, metric in metrics.items():
            monotonic = metric.type in _SUMMED
            for (name, labels), value in samples[metric_name].items():
                if monotonic:
                    value = self._monotonic(name, labels, value)
                metric.add_sample(name, dict(labels), value)
            out.append(metric)
        return out

    def _monotonic(self, name: str, labels: tuple[tuple[str, str], ...], value: float) -> float:
        """A counter's value as exposed: never lower than before. Folding changes the order in which
        floats are summed (a histogram's ``_sum`` can move down by an ulp), and a lost accumulator
        drops what was folded; Prometheus reads any decrease as a reset, and ``increase()`` would
        then count the whole history again. The shortfall is kept as an offset added from then on,
        so the series goes on from where it was and its rate stays right."""
        key = (name, labels)
        offset = self._offsets.get(key, 0.0)
        shown = value + offset
        exposed = self._exposed.get(key)
        if exposed is not None and shown < exposed:
            self._offsets[key] = offset + (exposed - shown)
            shown = exposed
        self._exposed[key] = shown
        return shown

    # -- compaction -----------------------------------------------------------------------

    def compact(self, batch: int = BATCH) -> int:
        """Fold the files of processes that are gone into the accumulators and delete them (gauges
        are deleted, not folded), ``batch`` files per swap. Returns the files deleted. Several
        processes may call it on one directory: one at a time folds, the others return 0."""
        try:
            with _flocked(self._lock_path(COMPACTOR_LOCK_FILE), fcntl.LOCK_EX | fcntl.LOCK_NB):
                return self._compact(batch)
        except BlockingIOError:
            return 0

    def _compact(self, batch: int) -> int:
        dead: dict[str, list[str]] = defaultdict(list)
        for path, kind, identifier in self._listing():
            if identifier != ACCUMULATED and not self._alive(identifier):
                dead[kind].append(path)
        removed = 0
        for kind, paths in sorted(dead.items()):
            paths.sort()
            for start in range(0, len(paths), batch):
                chunk = paths[start : start + batch]
                if kind in _SUMMED:
                    removed += self._fold(kind, chunk)
                else:
                    with _flocked(self._lock_path(SWAP_LOCK_FILE), fcntl.LOCK_EX), self._state_lock:
                        removed += _unlink_all(chunk)
        self._top_up()
        self.compacted_files += removed
        return removed

    def _fold(self, kind: str, paths: list[str]) -> int:
        """Fold ``paths`` into ``kind``'s accumulator: read and sum outside the scrape lock (the files
        of dead processes no longer change), then swap the accumulator and delete them under it."""
        accumulator = os.path.join(self.path, f"{kind}_{ACCUMULATED}.db")
        with self._state_lock:
            current = self._accumulator(accumulator, kind) if os.path.exists(accumulator) else []
        totals: dict[bytes, float] = {}
        for key, value, _timestamp in current:
            totals[key] = totals.get(key, 0.0) + value
        folded: list[str] = []
        for path in paths:
            try:
                rows = _files.FileReader(path).read()
                for key, _value, _timestamp in rows:
                    _fields(key)  # a key no scrape could read would make the accumulator unreadable
            except FileNotFoundError:
                continue
            except (OSError, _files.CorruptFile) as exc:
                self._move_aside(path, exc)
                continue
            for key, value, _timestamp in rows:
                totals[key] = totals.get(key, 0.0) + value
            folded.append(path)
        if not folded:
            return 0
        rows = [(key, value, 0.0) for key, value in totals.items()]
        try:
            staged = _files.stage_accumulator(
                accumulator, ((key.decode("utf-8"), value, 0.0) for key, value, _ in rows)
            )
        except OSError as exc:
            log.error(
                "metrics compaction deferred: cannot write %s (%s); the files stay until it can", accumulator, exc
            )
            return 0
        with _flocked(self._lock_path(SWAP_LOCK_FILE), fcntl.LOCK_EX), self._state_lock:
            began = time.monotonic()
            _files.commit_accumulator(accumulator, staged, sync=False)
            stat = os.stat(accumulator)
            self._accumulators[kind] = (rows, (stat.st_ino, stat.st_size, stat.st_mtime_ns))
            removed = _unlink_all(folded)
            # Kept until the lock is released: freeing a reader's thousands of parsed keys costs
            # more than the rest of the swap, and nothing a scrape needs waits on it.
            stale = [(self._readers.pop(path, None), self._file_slots.pop(path, None)) for path in folded]
            self.longest_swap_s = max(self.longest_swap_s, time.monotonic() - began)
        del stale
        _files.sync_directory(accumulator)  # durable renames, outside what a scrape waits for
        return removed

    def _move_aside(self, path: str, exc: Exception) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, path + UNREADABLE)
            self._reported.discard(path)
            log.error("metrics file unreadable, moved aside: %s%s (%s)", path, UNREADABLE, exc)
            self._report(self._on_unreadable, "moved_aside")

    def _top_up(self) -> None:
        """Give blocks to live files that outgrew what was allocated for them (prometheus_client
        doubles a full file by truncating it: sparse again). On a full disk this fails, is logged,
        and is tried again next time."""
        for path, _kind, identifier in self._listing():
            if identifier == ACCUMULATED:
                continue
            try:
                if _files.sparse(path):
                    _files.allocate(path, 0)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot allocate blocks for %s: %s", path, exc)


def _unlink_all(paths: Iterable[str]) -> int:
    count = 0
    for path in paths:
        try:
            os.unlink(path)
            count += 1
        except FileNotFoundError:
            pass
    return count


def multiprocess_registry(
    path: str | None = None,
    *,
    compact_every_s: float | None = None,
    on_unreadable: Callable[[str], None] | None = None,
    on_accumulator: Callable[[str], None] | None = None,
) -> tuple[CollectorRegistry, CompactingMultiProcessCollector]:
    """A registry serving every process's files, and its collector.

    With ``compact_every_s``, a daemon thread compacts dead processes' files
    on that period (the worker's main process does this).
    """
    registry = CollectorRegistry()
    collector = CompactingMultiProcessCollector(
        registry, path, on_unreadable=on_unreadable, on_accumulator=on_accumulator
    )
    if compact_every_s:
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(compact_every_s):
                try:
                    collector.compact()
                except Exception:  # noqa: BLE001 - tried again next period; never kills the worker
                    log.exception("metrics compaction failed")

        threading.Thread(target=loop, name="cadscope-metrics-compaction", daemon=True).start()
    return registry, collector
