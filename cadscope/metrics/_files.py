"""prometheus_client's multiprocess file format: the one place cadscope reads and writes it.

prometheus_client's multiprocess mode keeps each process's values in files
of its own, one a metric type (``counter_<id>.db``, ``gauge_livesum_<id>.db``),
laid out by ``prometheus_client.mmap_dict``: the bytes used (4) and padding
(4), then an entry per value: the key's length (4), the key (``mmap_key``'s
JSON: metric name, sample name, labels, help) padded to 8 bytes, then the
value and a timestamp (two doubles). Values are written by
prometheus_client itself; cadscope reads the files (for scrapes and
compaction), writes its compaction accumulators in the same format, and
allocates a process's files before prometheus_client maps them.

This layout is not a public API of prometheus_client. Everything that
depends on it is in this module, and ``tests/test_metric_files.py`` fails
when an installed prometheus_client writes files this module reads
differently from prometheus_client's own collector.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import re
import struct
from collections.abc import Iterable, Iterator

__all__ = [
    "CorruptFile",
    "FileReader",
    "allocate",
    "commit_accumulator",
    "entries",
    "parse_key",
    "read_accumulator",
    "read_used",
    "sparse",
    "stage_accumulator",
    "sync_directory",
    "write_accumulator",
]

_INT = struct.Struct("<i")
_DOUBLES = struct.Struct("<dd")
HEADER = 8  # the bytes used (4) and padding (4)
INITIAL_SIZE = 1 << 16  # mmap_dict's first size; a file is doubled from there as it fills
CHECKSUM = ".sha256"
PREVIOUS = ".prev"


class CorruptFile(ValueError):
    """A file this module cannot read as prometheus_client writes it."""


def read_used(path: str) -> bytes:
    """The used part of one file (``b""`` for a file not sized yet by the process creating it)."""
    with open(path, "rb") as file:
        data = file.read(mmap.PAGESIZE)
        if len(data) < HEADER:
            return b""
        used = _INT.unpack_from(data, 0)[0]
        if used > len(data):
            data += file.read(used - len(data))
    return data


def entries(data: bytes) -> Iterator[tuple[bytes, float, float]]:
    """``(key, value, timestamp)`` of every entry, the key undecoded. Raises :class:`CorruptFile`
    where ``mmap_dict`` would raise, and for a negative key length too (on which
    ``mmap_dict``'s reader goes back to an entry it has read, for ever)."""
    if len(data) < HEADER:
        return
    used = _INT.unpack_from(data, 0)[0]
    if used == 0:  # allocated ahead (:func:`allocate`), not written to yet
        return
    if not HEADER <= used <= len(data):
        raise CorruptFile(f"bytes used {used} outside the file's {len(data)}")
    pos = HEADER
    while pos < used:
        length = _INT.unpack_from(data, pos)[0]
        if length < 0 or pos + 4 + length + 16 > used:
            raise CorruptFile(f"entry at {pos} runs past the bytes used")
        pos += 4
        key = data[pos : pos + length]
        pos += length + (8 - (length + 4) % 8)
        value, timestamp = _DOUBLES.unpack_from(data, pos)
        yield key, value, timestamp
        pos += 16


Fields = tuple[str, str, tuple[tuple[str, str], ...], str]


_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def parse_key(key: bytes) -> Fields:
    """A key as ``mmap_dict.mmap_key`` writes it: the metric's name, the sample's name, its
    labels (sorted) and its help text; names as Prometheus' text format allows them, and a
    bucket's bound a number. Anything else raises :class:`CorruptFile`: a scrape could not
    expose it."""
    try:
        fields = json.loads(key.decode("utf-8"))
    except ValueError as exc:
        raise CorruptFile(f"not a metric key: {key[:100]!r}") from exc
    if isinstance(fields, list) and len(fields) == 4:
        metric_name, name, labels, help_text = fields
        if (
            isinstance(metric_name, str)
            and isinstance(name, str)
            and _NAME.fullmatch(metric_name)
            and _NAME.fullmatch(name)
            and isinstance(help_text, str)
            and isinstance(labels, dict)
            and all(isinstance(label, str) and isinstance(value, str) for label, value in labels.items())
            and (not name.endswith("_bucket") or _number(labels.get("le", "0")))
        ):
            return metric_name, name, tuple(sorted(labels.items())), help_text
    raise CorruptFile(f"not a metric key: {key[:100]!r}")


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class FileReader:
    """Reads one live file again and again, cheaply.

    Entries are only ever appended, and a key never moves: what was parsed
    at the last read is kept (each key and its value's offset), and a later
    read parses only the entries added since, then reads every value in one
    ``struct`` call whose format skips the keys. A file that shrank is read
    from scratch.
    """

    __slots__ = ("path", "keys", "_offsets", "_parsed_to", "_values")

    def __init__(self, path: str) -> None:
        self.path = path
        self.keys: list[bytes] = []  # in file order; values() gives theirs in the same order
        self._offsets: list[int] = []
        self._parsed_to = HEADER
        self._values: struct.Struct | None = None

    def _load(self) -> bytes:
        """The file's used bytes, its new entries parsed; raises :class:`CorruptFile` or OSError."""
        data = read_used(self.path)
        used = _INT.unpack_from(data, 0)[0] if len(data) >= HEADER else 0
        if used == 0:
            return b""
        if used < self._parsed_to or used > len(data):
            self.keys, self._offsets, self._parsed_to, self._values = [], [], HEADER, None
            if used > len(data):
                raise CorruptFile(f"bytes used {used} outside the file's {len(data)}")
        pos = self._parsed_to
        if pos < used:
            keys, offsets = self.keys, self._offsets
            while pos < used:
                length = _INT.unpack_from(data, pos)[0]
                if length < 0 or pos + 4 + length + 16 > used:
                    raise CorruptFile(f"entry at {pos} runs past the bytes used")
                keys.append(data[pos + 4 : pos + 4 + length])
                pos += 4 + length + (8 - (length + 4) % 8)
                offsets.append(pos)
                pos += 16
            self._parsed_to = pos
            self._values = _skipping(offsets)
        return data

    def values(self) -> tuple[float, ...]:
        """Every entry's value now, in the order of :attr:`keys` (which this call may extend)."""
        data = self._load()
        return self._values.unpack_from(data) if data and self._values is not None else ()

    def read(self) -> list[tuple[bytes, float, float]]:
        """Every ``(key, value, timestamp)`` of the file now (gauges need the timestamps)."""
        data = self._load()
        if not data:
            return []
        unpack = _DOUBLES.unpack_from
        return [(key, *unpack(data, offset)) for key, offset in zip(self.keys, self._offsets, strict=True)]


def _skipping(offsets: list[int]) -> struct.Struct:
    """A format that reads the double at each offset and skips everything between."""
    parts = ["<"]
    position = 0
    for offset in offsets:
        if offset > position:
            parts.append(f"{offset - position}x")
        parts.append("d")
        position = offset + 8
    return struct.Struct("".join(parts))


def _encode(items: Iterable[tuple[str, float, float]]) -> bytes:
    body = bytearray()
    for key, value, timestamp in items:
        encoded = key.encode("utf-8")
        body += _INT.pack(len(encoded))
        body += encoded
        body += b" " * (8 - (len(encoded) + 4) % 8)
        body += _DOUBLES.pack(value, timestamp)
    used = HEADER + len(body)
    size = INITIAL_SIZE
    while size < used:
        size *= 2
    return _INT.pack(used) + b"\0" * 4 + bytes(body) + b"\0" * (size - used)


def sync_directory(path: str) -> None:
    """Make the renames in ``path``'s directory durable."""
    _fsync_dir(path)


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage_accumulator(path: str, items: Iterable[tuple[str, float, float]]) -> str:
    """Write the next copy of the accumulator ``path`` beside it (synced, with its checksum), to be
    put in place by :func:`commit_accumulator`. Returns the staged file's path. A full disk
    raises OSError and changes nothing."""
    data = _encode(items)
    staged = path + ".tmp"
    with open(staged, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    with open(staged + CHECKSUM, "w") as file:
        file.write(hashlib.sha256(data).hexdigest())
        file.flush()
        os.fsync(file.fileno())
    return staged


def commit_accumulator(path: str, staged: str, *, keep_previous: bool = True, sync: bool = True) -> None:
    """Put a staged copy in place: renames only. The copy it replaces is kept as ``.prev`` (not
    when that copy is a corrupt one being repaired: ``keep_previous=False``). A crash between two
    renames leaves a copy that fails its checksum and a sound previous one."""
    if keep_previous and os.path.exists(path):
        os.replace(path, path + PREVIOUS)
        if os.path.exists(path + CHECKSUM):
            os.replace(path + CHECKSUM, path + PREVIOUS + CHECKSUM)
    os.replace(staged, path)
    os.replace(staged + CHECKSUM, path + CHECKSUM)
    if sync:
        _fsync_dir(path)


def write_accumulator(path: str, items: Iterable[tuple[str, float, float]], *, keep_previous: bool = True) -> None:
    """Write ``path`` in the multiprocess format, whole or not at all (:func:`stage_accumulator`
    then :func:`commit_accumulator`)."""
    commit_accumulator(path, stage_accumulator(path, items), keep_previous=keep_previous)


def _verified(path: str) -> list[tuple[bytes, float, float]] | None:
    try:
        with open(path, "rb") as file:
            data = file.read()
        with open(path + CHECKSUM) as file:
            expected = file.read().strip()
    except FileNotFoundError:
        return None
    if hashlib.sha256(data).hexdigest() != expected:
        return None
    try:
        found = list(entries(data))
        for key, _value, _timestamp in found:
            parse_key(key)
    except CorruptFile:
        return None
    return found


def read_accumulator(path: str) -> tuple[list[tuple[bytes, float, float]], str]:
    """An accumulator's entries and where they came from: ``"current"``, ``"previous"`` (the
    current copy failed its checksum: the last compaction's folds are lost), ``"none"`` (no
    accumulator yet) or ``"lost"`` (neither copy is sound: every fold so far is lost)."""
    current = _verified(path)
    if current is not None:
        return current, "current"
    if not os.path.exists(path) and not os.path.exists(path + PREVIOUS):
        return [], "none"
    previous = _verified(path + PREVIOUS)
    if previous is not None:
        return previous, "previous"
    return [], "lost"


def allocate(path: str, size: int) -> None:
    """Create ``path`` (if new) with ``size`` bytes of disk allocated, zeros: prometheus_client
    then maps a file whose every page has its blocks, and a full disk cannot make a write to it
    fail with SIGBUS. A file already at least ``size`` long gets the blocks it lacks, its
    contents untouched. Raises OSError (``ENOSPC`` on a full disk)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        length = os.fstat(fd).st_size
        size = max(size, length)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # A filesystem without fallocate: write the zeros past the end (what is before it may be
            # another process's live values, and stays as it is).
            if size > length:
                os.pwrite(fd, b"\0" * (size - length), length)
                os.fsync(fd)
    finally:
        os.close(fd)


def sparse(path: str) -> bool:
    """Whether ``path`` has bytes with no disk blocks behind them (a write there may need space)."""
    stat = os.stat(path)
    return stat.st_blocks * 512 < stat.st_size
