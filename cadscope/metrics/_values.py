"""The multiprocess files' format, read and written, and values that write several at once.

prometheus_client's multiprocess mode keeps each process's values in files of
its own, one a metric type (``counter_<pid>.db``, ``gauge_livesum_<pid>.db``),
laid out by ``prometheus_client.mmap_dict``: the bytes used (4) and padding (4),
then an entry per value: the key's length (4), the key (``mmap_key``'s JSON)
padded to 8 bytes, the value and a timestamp (two doubles).

:func:`_entries` walks that layout, for the scrape and for compaction
(``_multiprocess``). :func:`multiprocess_value_class` gives the value class
``enable_multiprocess`` installs: upstream's ``MmapedValue``, the same files,
keys and values, the same rule after a fork (the child opens files of its own
and starts its values from them), and one lock for all of a process's values.

Why not upstream's: on every ``inc``, ``set`` and ``get`` it takes its lock,
asks for the pid and writes through two more calls. A task's outcome counter
and run-time histogram (the sum and one bucket) cost 15 Python calls that way,
of the about 45 cadscope adds to a no-op task on the pool's task thread. What a
busy host charges for them is the code and data they read from memory, every
cache having been filled by other processes since the last task: with
:func:`add`, which writes several values under one lock, with one fork check
and no call per value, a task's metrics read about 150 lines fewer
(bench/RESULTS.md, "The collector, not the calls"; ``bench/task_cold.py``).
A task's three writes go through ``_valuesc.observe`` (:data:`compiled_observe`), the same
writes in C, where it was built (``setup.py``) and not turned off (``CADSCOPE_COMPILED=0``);
it leaves them to :func:`add` where the lock is held or a fork not yet followed.
The fork is noticed by ``os.register_at_fork``, which every fork from Python
runs (``os.fork``, multiprocessing's and billiard's), not by asking for the
pid, and a child gets new locks: a lock another thread held at the fork would
stay held there.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import values
from prometheus_client.mmap_dict import mmap_key

from .._compiled import compiled_wanted

__all__ = ["MultiProcessValue", "add", "compiled_observe", "multiprocess_value_class"]

_int = struct.Struct("i").unpack_from
_two_doubles = struct.Struct("dd").unpack_from
_INT = struct.Struct("i").pack
_PAIR = struct.Struct("dd").pack
_PAIR_INTO = struct.Struct("dd").pack_into
_CORRUPT = "Read beyond file size detected, file is corrupted."  # mmap_dict's words
_INITIAL_SIZE = 1 << 16  # mmap_dict's _INITIAL_MMAP_SIZE
_HEADER = 8


def _entries(data: bytes | mmap.mmap) -> Iterable[tuple[bytes, float, float]]:
    """``(key, value, timestamp)`` of every entry, as ``mmap_dict._read_all_values`` walks them,
    with the key left undecoded, and one more check: a negative key length is
    corruption. Upstream reads on, and a length of -28 (say) takes it back to
    an entry it has read, for ever: a scrape, or a compaction, that never
    ends and holds the directory's lock."""
    used = _int(data, 0)[0]
    pos = _HEADER
    while pos < used:
        length = _int(data, pos)[0]
        if length < 0 or length + pos > used:
            raise RuntimeError(_CORRUPT)
        pos += 4
        key = data[pos : pos + length]
        pos += length + (8 - (length + 4) % 8)
        value, timestamp = _two_doubles(data, pos)
        yield key, value, timestamp
        pos += 16


class _File:
    """One process's file of one metric type, as ``MmapedDict`` writes it; its class's lock held."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a+b")  # noqa: SIM115 - open for the process's life, closed by close()
        capacity = os.fstat(self._file.fileno()).st_size
        if capacity == 0:
            self._file.truncate(_INITIAL_SIZE)
            capacity = _INITIAL_SIZE
        self._capacity = capacity
        self.m = mmap.mmap(self._file.fileno(), capacity, access=mmap.ACCESS_WRITE)
        self._positions: dict[str, int] = {}
        self._used = _int(self.m, 0)[0]
        if self._used == 0:
            self._used = _HEADER
            self.m[0:4] = _INT(self._used)
        else:  # a pid used before, whose file is still here: go on from its values, as upstream does
            pos = _HEADER
            for key, _value, _timestamp in _entries(self.m):
                pos += 4 + len(key) + (8 - (len(key) + 4) % 8)
                self._positions[key.decode("utf-8")] = pos
                pos += 16

    def position(self, key: str) -> int:
        """Where ``key``'s value is, the entry added if new (``MmapedDict._init_value``)."""
        pos = self._positions.get(key)
        if pos is not None:
            return pos
        encoded = key.encode("utf-8")
        padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)
        entry = _INT(len(encoded)) + padded + _PAIR(0.0, 0.0)
        while self._used + len(entry) > self._capacity:
            self._capacity *= 2
            self._file.truncate(self._capacity)
            self.m = mmap.mmap(self._file.fileno(), self._capacity)
        self.m[self._used : self._used + len(entry)] = entry
        self._used += len(entry)
        self.m[0:4] = _INT(self._used)
        pos = self._positions[key] = self._used - 16
        return pos

    def close(self) -> None:
        self.m.close()
        self._file.close()


# This process's pid, moved by every fork from Python; a value class whose files are another pid's
# opens this one's at its next write or read.
_pid = os.getpid()
_classes: list[type[MultiProcessValue]] = []  # every multiprocess_value_class() made in this process


def _forked() -> None:
    """In a forked child: its pid, and a new lock for every value class. Only the forking thread
    goes on in the child, so a lock another thread held at the fork would never be released there
    (upstream's is, and the child's first write then waits for ever)."""
    global _pid
    _pid = os.getpid()
    for cls in _classes:
        cls._lock = threading.Lock()


os.register_at_fork(after_in_child=_forked)


class MultiProcessValue:
    """A value in this process's file of its metric type (prometheus_client's ``MmapedValue``).

    Made through :func:`multiprocess_value_class`, whose class holds its
    files, values and lock: one lock for every value of the process, as
    upstream's (multiprocess mode presumes few threads)."""

    _multiprocess = True
    # A class of multiprocess_value_class()'s own each:
    _lock: threading.Lock
    _files: dict[str, _File]
    _values: list[MultiProcessValue]
    _files_pid: int

    def __init__(self, typ: str, metric_name: str, name: str, labelnames: Sequence[str],
                 labelvalues: Sequence[str], help_text: str, multiprocess_mode: str = "",
                 **kwargs: Any) -> None:  # fmt: skip
        self._params = typ, metric_name, name, labelnames, labelvalues, help_text, multiprocess_mode
        with self._lock:
            self._follow_fork()
            self._reset()
            self._values.append(self)

    @classmethod
    def _follow_fork(cls) -> None:
        """After a fork, this process's own files; every value starts from its own (the lock held)."""
        if cls._files_pid == _pid:
            return
        cls._files_pid = _pid
        for file in cls._files.values():
            file.close()
        cls._files.clear()
        for value in cls._values:
            value._reset()

    def _reset(self) -> None:
        typ, metric_name, name, labelnames, labelvalues, help_text, mode = self._params
        prefix = f"{typ}_{mode}" if typ == "gauge" else typ
        file = self._files.get(prefix)
        if file is None:
            path = os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], f"{prefix}_{self._files_pid}.db")
            file = self._files[prefix] = _File(path)
        self._file = file
        self._position = file.position(mmap_key(metric_name, name, list(labelnames), list(labelvalues), help_text))
        self._value, self._timestamp = _two_doubles(file.m, self._position)

    def inc(self, amount: float) -> None:
        with self._lock:
            if self._files_pid != _pid:
                self._follow_fork()
            self._value += amount
            self._timestamp = 0.0
            _PAIR_INTO(self._file.m, self._position, self._value, 0.0)

    def set(self, value: float, timestamp: float | None = None) -> None:
        with self._lock:
            if self._files_pid != _pid:
                self._follow_fork()
            self._value = value
            self._timestamp = timestamp or 0.0
            _PAIR_INTO(self._file.m, self._position, value, self._timestamp)

    def get(self) -> float:
        with self._lock:
            if self._files_pid != _pid:
                self._follow_fork()
            return self._value

    def set_exemplar(self, exemplar: object) -> None:
        return None  # not kept in multiprocess mode, as upstream

    def get_exemplar(self) -> None:
        return None


def multiprocess_value_class() -> type[MultiProcessValue]:
    """A value class with files, values and a lock of its own, for ``values.ValueClass``: as
    ``values.MultiProcessValue()``, which makes a class per call, so that values made after a
    directory change open files there."""

    class Value(MultiProcessValue):
        _lock = threading.Lock()
        _files: dict[str, _File] = {}
        _values: list[MultiProcessValue] = []
        _files_pid = _pid

    def close() -> None:
        with Value._lock:
            for file in Value._files.values():
                file.close()
            Value._files.clear()
            Value._values.clear()

    _classes.append(Value)
    # values.close_all_multiprocess_files() closes every class's files, upstream's and these.
    cleanups = getattr(values, "_multi_process_cleanups", None)
    if isinstance(cleanups, list):
        cleanups.append(close)
    return Value


def add(changes: Sequence[tuple[MultiProcessValue, float]]) -> None:
    """Add each amount to its value, under one lock and one fork check: as ``value.inc(amount)``
    for each, in fewer calls. Every value of one :func:`multiprocess_value_class` class."""
    cls = type(changes[0][0])
    with cls._lock:
        if cls._files_pid != _pid:
            cls._follow_fork()
        for value, amount in changes:
            value._value = total = value._value + amount
            value._timestamp = 0.0
            _PAIR_INTO(value._file.m, value._position, total, 0.0)


def _compiled_observe() -> Callable[[tuple[Any, ...], float], bool] | None:
    """``_valuesc.observe``: :func:`add` for a task's counter value, histogram sum and bucket, in C; None where
    it was not built or ``CADSCOPE_COMPILED=0``. Given ``(value class, counter value, sum value, bounds as
    native doubles, bucket values)`` and the seconds, it writes all three values and returns True, or
    nothing and False where :func:`add` must (the class's lock held, a fork not yet followed, NaN)."""
    if not compiled_wanted():
        return None
    try:
        from . import _valuesc
    except ImportError:
        return None
    _valuesc.configure(globals())  # its _pid, which every fork moves
    return _valuesc.observe


compiled_observe = _compiled_observe()
