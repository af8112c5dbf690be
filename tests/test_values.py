"""cadscope's multiprocess values write what prometheus_client's own write, byte for byte."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest, values
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

from cadscope.metrics import _values

# Every metric type and gauge mode, a value written twice, a label set added after the first
# writes, and enough keys of a long help text to grow a file past its first 64 KiB.
WRITES = textwrap.dedent(
    """
    import json, os, sys, time
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, values
    time.time = lambda: 1700000000.5  # the mostrecent modes' timestamps, the same in both runs
    if sys.argv[2] == "ours":
        from cadscope.metrics._values import multiprocess_value_class
        values.ValueClass = multiprocess_value_class()
    else:
        values.ValueClass = values.MultiProcessValue(lambda: 4242)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
    r = CollectorRegistry()
    c = Counter("jobs", "Jobs.", ("k",), registry=r)
    c.labels("a").inc()
    c.labels("a").inc(2.5)
    c.labels("b").inc()
    for mode in ("all", "liveall", "min", "max", "sum", "livesum", "mostrecent", "livemostrecent"):
        g = Gauge("g_" + mode, "A gauge.", ("k",), registry=r, multiprocess_mode=mode)
        g.labels("x").set(3)
        g.labels("x").set(2) if "mostrecent" in mode else g.labels("x").inc(-1)
        g.labels("y").set(7)
    h = Histogram("h", "A histogram.", ("k",), registry=r, buckets=(0.1, 1, 10))
    for v in (0.05, 0.5, 5, 50, 1):
        h.labels("x").observe(v)
    Summary("s", "A summary.", ("k",), registry=r).labels("x").observe(2)
    long = Counter("long", "x" * 500, ("i",), registry=r)
    for i in range(200):
        long.labels(str(i)).inc(i)
    c.labels("a").inc()  # a value written again after its file grew
    print(json.dumps({"pid": os.getpid()}))
    """
)


def _write(tmp_path, which: str) -> dict[str, bytes]:
    """Run WRITES with upstream's value class (its pid 4242) or ours; every file's used bytes, by
    name, ours renamed to pid 4242 too."""
    path = tmp_path / which
    path.mkdir()
    out = subprocess.run([sys.executable, "-c", WRITES, str(path), which], capture_output=True, text=True, check=True)
    pid = str(json.loads(out.stdout)["pid"])
    files = {}
    for file in sorted(path.iterdir()):
        if which == "ours":
            file = file.rename(path / file.name.replace(f"_{pid}.db", "_4242.db"))
        data = file.read_bytes()
        files[file.name] = data[: int.from_bytes(data[:4], sys.byteorder)]
    return files


def test_the_files_are_upstreams_byte_for_byte(tmp_path):
    upstream, ours = _write(tmp_path, "upstream"), _write(tmp_path, "ours")
    assert len(upstream) == 11  # counter, histogram, summary and the eight gauge modes' files
    assert ours == upstream
    assert len(ours["counter_4242.db"]) > 1 << 16  # grown past the first size
    expositions = []
    for which in ("upstream", "ours"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry, str(tmp_path / which))
        expositions.append(generate_latest(registry))
    assert expositions[0] == expositions[1]


@pytest.fixture
def value_class(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    cls = _values.multiprocess_value_class()
    yield cls
    with cls._lock:
        for file in cls._files.values():
            file.close()
        cls._files.clear()


def _made(cls, name: str, labelvalue: str = "a"):
    return cls("counter", name, name + "_total", ("k",), (labelvalue,), "Help.")


def _read(tmp_path) -> dict[str, float]:
    data = MmapedDict(str(tmp_path / f"counter_{os.getpid()}.db"), read_mode=True)
    try:
        return {json.loads(key)[1]: value for key, value, _ in data.read_all_values()}
    finally:
        data.close()


def test_add_writes_what_inc_writes(value_class, tmp_path):
    one, two, three = (_made(value_class, n) for n in ("one", "two", "three"))
    _values.add(((one, 1.0), (two, 0.25), (three, 1.0)))
    _values.add(((one, 1.0), (two, 4.0), (three, 1.0)))
    three.inc(2)
    assert (one.get(), two.get(), three.get()) == (2.0, 4.25, 4.0)
    assert _read(tmp_path) == {"one_total": 2.0, "two_total": 4.25, "three_total": 4.0}


def test_a_file_left_by_an_earlier_process_with_this_pid_is_gone_on_from(value_class, tmp_path):
    """A reused pid: upstream reads the file's values and goes on from them, and so does this."""
    _made(value_class, "jobs").inc(3)
    _made(value_class, "other").inc(1)
    with value_class._lock:
        value_class._files.popitem()[1].close()
    again = _values.multiprocess_value_class()
    jobs = _made(again, "jobs")
    assert jobs.get() == 3.0
    jobs.inc(1)
    _made(again, "new").inc(5)
    assert _read(tmp_path) == {"jobs_total": 4.0, "other_total": 1.0, "new_total": 5.0}


def _yield_before_each_write(monkeypatch) -> None:
    """Every write of a value into its file lets other threads run first (``time.sleep(0)``), under the
    value lock where the write holds it: where a thread without the lock would write a total that
    another has already passed."""
    pack_into = _values._PAIR_INTO

    def yielding_pack_into(*args) -> None:
        time.sleep(0)
        pack_into(*args)

    monkeypatch.setattr(_values, "_PAIR_INTO", yielding_pack_into)


def _run_watching(value, writers) -> list[tuple[float, float]]:
    """Run ``writers`` in threads of their own while another reads ``value``'s slot in its file as a
    scrape would, all along; every time it saw the value go down."""
    done, dips = threading.Event(), []

    def watcher() -> None:
        last = 0.0
        while not done.is_set():
            now = struct.unpack_from("d", value._file.m, value._position)[0]
            if now < last:
                dips.append((last, now))
            last = now
            time.sleep(0)  # the writers' turn

    threads = [threading.Thread(target=writer) for writer in writers]
    watching = threading.Thread(target=watcher)
    watching.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    watching.join()
    return dips


def test_threads_adding_to_the_same_values_lose_nothing(value_class, tmp_path, monkeypatch):
    """One lock for ``add`` and ``inc``: a task thread and another thread writing the same
    children (a thread pool, or a direct ``labels().inc()``) never lose an increment, and the
    file never shows a counter going down (which Prometheus would read as a reset). Each
    write lets other threads run just before it, where a thread without the lock would
    write a total that another has already passed."""
    _yield_before_each_write(monkeypatch)
    one, two = _made(value_class, "one"), _made(value_class, "two")
    rounds = 1_000

    def adder() -> None:
        for _ in range(rounds):
            _values.add(((one, 1.0), (two, 2.0)))

    def incer() -> None:
        for _ in range(rounds):
            one.inc(1)

    dips = _run_watching(one, (adder, incer, adder))
    assert _read(tmp_path) == {"one_total": 3.0 * rounds, "two_total": 4.0 * rounds}
    assert dips == []


def test_enable_multiprocess_installs_a_class_of_its_own_each_time(tmp_path, monkeypatch):
    """As upstream's ``MultiProcessValue()``: values made after a directory change open files there."""
    from cadscope.metrics import enable_multiprocess

    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    enable_multiprocess(str(tmp_path / "first"))
    first = values.ValueClass
    enable_multiprocess(str(tmp_path / "second"))
    assert issubclass(first, _values.MultiProcessValue) and values.ValueClass is not first
    _made(values.ValueClass, "jobs").inc(1)
    assert os.listdir(tmp_path / "second") == [f"counter_{os.getpid()}.db"]
    values.close_all_multiprocess_files()


FORK_WHILE_LOCKED = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
    from cadscope.metrics._values import multiprocess_value_class
    cls = multiprocess_value_class()
    jobs = cls("counter", "jobs", "jobs_total", ("k",), ("a",), "Jobs.")
    held, release = threading.Event(), threading.Event()

    def holder():
        with cls._lock:  # a metrics write in progress on another thread (a server's, a heartbeat's)
            held.set()
            release.wait()

    threading.Thread(target=holder).start()
    held.wait()
    pid = os.fork()
    if pid == 0:
        signal.alarm(5)  # a child that waits for the lock for ever dies here, not the test
        jobs.inc(1)
        os._exit(0 if jobs.get() == 1.0 else 3)
    release.set()
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
    """
)


def test_a_child_forked_while_another_thread_writes_can_write(tmp_path):
    """Only the forking thread lives on in a child: a lock another thread held at the fork would stay
    held there for ever. Each value class gets a new lock in the child."""
    out = subprocess.run([sys.executable, "-c", FORK_WHILE_LOCKED, str(tmp_path)], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr


# -- a task's three writes, compiled (_valuesc.observe) ---------------------------------------

BOUNDS = (0.1, 1.0, 10.0, float("inf"))


def _observed(cls, prefix: str):
    """A counter value, a sum value and a bucket value per bound, of one class; and observe()'s state."""
    counter, total = _made(cls, prefix + "count"), _made(cls, prefix + "sum")
    buckets = tuple(_made(cls, prefix + "bucket", str(bound)) for bound in BOUNDS)
    state = (cls, counter, total, struct.pack(f"{len(BOUNDS)}d", *BOUNDS), buckets)
    return counter, total, buckets, state


def _compiled():
    if _values.compiled_observe is None:
        pytest.skip(
            "cadscope.metrics._valuesc was not built here (CI requires it: test_the_compiled_modules_are_built)"
        )
    return _values.compiled_observe


SECONDS = (0.05, 0.1, 0.1000001, 0.5, 1.0, 5.0, 10.0, 50.0, 1e300, float("inf"), 0.0, -1.0, 2.5e-9)


def test_observe_writes_what_add_writes(value_class, tmp_path):
    """For every seconds (on a bound, between, past the last finite one, zero, negative), observe() writes
    what add() writes for the count, the sum and the bucket bisect_left picks: the same values, the
    same timestamps (0.0), the same file."""
    from bisect import bisect_left

    observe = _compiled()
    counter, total, buckets, state = _observed(value_class, "c_")
    py_counter, py_total, py_buckets, _ = _observed(value_class, "p_")
    for seconds in SECONDS:
        assert observe(state, seconds) is True
        _values.add(((py_counter, 1.0), (py_total, seconds), (py_buckets[bisect_left(BOUNDS, seconds)], 1.0)))
    ours, theirs = (counter, total, *buckets), (py_counter, py_total, *py_buckets)
    assert [(v._value, v._timestamp) for v in ours] == [(v._value, v._timestamp) for v in theirs]
    assert all(type(v._value) is float for v in ours)
    written = _read(tmp_path)
    assert {k[2:]: v for k, v in written.items() if k.startswith("c_")} == {
        k[2:]: v for k, v in written.items() if k.startswith("p_")
    }
    assert written["c_count_total"] == len(SECONDS)
    assert [v._value for v in buckets] == [5.0, 3.0, 2.0, 3.0]


def test_observe_leaves_its_writes_to_add_where_add_must(value_class, tmp_path, monkeypatch):
    """Nothing written, False returned: the class's lock held (another thread inside a write), the
    process's files not followed after a fork, NaN (observe() counts it in no bucket), seconds that are
    not a float, a value not as add() leaves it. Each time add() then writes it whole."""
    observe = _compiled()
    counter, total, buckets, state = _observed(value_class, "")

    def unchanged() -> bool:
        return (counter._value, total._value, *(b._value for b in buckets)) == (0.0,) * 6 and _read(tmp_path) == {
            k: 0.0 for k in _read(tmp_path)
        }

    with value_class._lock:
        assert observe(state, 0.5) is False
    assert unchanged()
    monkeypatch.setattr(_values, "_pid", _values._pid + 1)  # as after a fork, before the first write
    assert observe(state, 0.5) is False
    monkeypatch.undo()
    assert observe(state, float("nan")) is False
    assert observe(state, 1) is False  # an int: the Python path's comparisons, exact
    total._value = 1  # not a float: whatever it is, add() deals with it
    assert observe(state, 0.5) is False
    total._value = 0.0
    assert unchanged()
    assert observe(state, 0.5) is True
    assert (counter._value, total._value, buckets[1]._value) == (1.0, 0.5, 1.0)


def test_threads_observing_and_adding_to_the_same_values_lose_nothing(value_class, tmp_path, monkeypatch):
    """observe() takes no lock: it writes only where the lock is free, and nothing can run while it
    does. Threads inside add() and inc() are switched out while holding the lock (each write yields
    first); a thread calling observe() then finds the lock held and goes through add(). No increment is
    lost and the file never shows a value going down."""
    observe = _compiled()
    _yield_before_each_write(monkeypatch)
    counter, total, buckets, state = _observed(value_class, "")
    rounds, compiled = 2_000, [0]

    def observer() -> None:
        for _ in range(rounds):
            if observe(state, 0.5):
                compiled[0] += 1
            else:
                _values.add(((counter, 1.0), (total, 0.5), (buckets[1], 1.0)))

    def adder() -> None:
        for _ in range(rounds):
            _values.add(((counter, 1.0), (total, 0.5), (buckets[1], 1.0)))

    def incer() -> None:
        for _ in range(rounds):
            counter.inc(1)

    dips = _run_watching(counter, (observer, adder, incer, observer))
    written = _read(tmp_path)
    assert (written["count_total"], written["sum_total"]) == (4.0 * rounds, 1.5 * rounds)
    assert counter._value == 4.0 * rounds and total._value == 1.5 * rounds and buckets[1]._value == 3.0 * rounds
    assert dips == []
    assert 0 < compiled[0] < 2 * rounds  # both ways taken: observe() wrote, and left some to add()


OBSERVE_AFTER_FORK = textwrap.dedent(
    """
    import os, struct, sys
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
    from cadscope.metrics import _values
    cls = _values.multiprocess_value_class()
    made = [cls("counter", n, n + "_total", ("k",), ("a",), "H.") for n in ("count", "sum", "b1", "b2")]
    state = (cls, made[0], made[1], struct.pack("2d", 1.0, float("inf")), (made[2], made[3]))
    assert _values.compiled_observe(state, 0.5)
    pid = os.fork()
    if pid == 0:
        first = _values.compiled_observe(state, 2.0)  # the parent's files still: add() follows the fork
        if not first:
            _values.add(((made[0], 1.0), (made[1], 2.0), (made[3], 1.0)))
        second = _values.compiled_observe(state, 0.25)
        os._exit(0 if (first, second) == (False, True) else 3)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), os.getpid(), pid)
    """
)


def test_observe_after_a_fork_writes_the_childs_own_file(tmp_path):
    """In a forked child observe() first finds the class's files to be the parent's, and leaves that
    write to add(), which opens the child's own files (its values start from them, empty, as upstream's
    do); then observe() writes there. The parent's file keeps the parent's writes only."""
    if _values.compiled_observe is None:
        pytest.skip(
            "cadscope.metrics._valuesc was not built here (CI requires it: test_the_compiled_modules_are_built)"
        )
    out = subprocess.run([sys.executable, "-c", OBSERVE_AFTER_FORK, str(tmp_path)], capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    code, parent, child = out.stdout.split()
    assert code == "0", out.stderr

    def values(pid: str) -> dict[str, float]:
        data = MmapedDict(str(tmp_path / f"counter_{pid}.db"), read_mode=True)
        try:
            return {json.loads(key)[1]: value for key, value, _ in data.read_all_values()}
        finally:
            data.close()

    assert values(parent) == {"count_total": 1.0, "sum_total": 0.5, "b1_total": 1.0, "b2_total": 0.0}
    assert values(child) == {"count_total": 2.0, "sum_total": 2.25, "b1_total": 1.0, "b2_total": 1.0}
