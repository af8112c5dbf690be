"""Compaction of dead processes' metric files, with real processes writing real files."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from cadscope.metrics import CompactingMultiProcessCollector, _files

CHILD = textwrap.dedent(
    """
    import sys, time
    from cadscope.metrics import ModelObservability, enable_multiprocess
    enable_multiprocess(sys.argv[1])
    obs = ModelObservability()
    with obs.engine_versions("0.20.2", "7.6.3"):
        for _ in range(3):
            obs.record_occt_boolean("union", 4, 0.02)
        obs.record_object_created("Part::Box", "Part", 5)
        obs.metrics.active_flows.labels("parametric", "0.20.2", "7.6.3").inc()  # left behind, as by a SIGKILL
    if len(sys.argv) > 2:
        print("ready", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def _spawn(path, linger: float | None = None) -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", CHILD, str(path)] + ([str(linger)] if linger else [])
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _identifier_files(path) -> set[str]:
    return {n.split("_")[-1][:-3] for n in os.listdir(path) if n.endswith(".db") and "compacted" not in n}


def test_compaction_keeps_every_counter_and_drops_dead_gauges(tmp_path):
    dead = [_spawn(tmp_path) for _ in range(12)]  # side by side: each writes files of its own
    assert [proc.wait() for proc in dead] == [0] * 12
    live = _spawn(tmp_path, linger=60)
    assert live.stdout.readline().strip() == "ready"
    zombie = _spawn(tmp_path)
    while not os.path.exists(f"/proc/{zombie.pid}") or \
            open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":  # fmt: skip
        time.sleep(0.02)
    try:
        registry = CollectorRegistry()
        collector = CompactingMultiProcessCollector(registry, path=str(tmp_path))
        before = _samples(registry)
        files_before = len([n for n in os.listdir(tmp_path) if n.endswith(".db")])

        removed = collector.compact()

        after = _samples(registry)
        names = [n for n in os.listdir(tmp_path) if n.endswith(".db")]
        assert removed == files_before - len(names) + 2  # +2: the accumulators it wrote
        assert sorted(n for n in names if "compacted" in n) == ["counter_compacted.db", "histogram_compacted.db"]
        # Only the live process keeps files: a zombie's files are final (it can write no more, and its
        # name, pid and start time, is never reused), so it is folded before its parent reaps it.
        assert {i.split("-")[0] for i in _identifier_files(tmp_path)} == {str(live.pid)}
        counters = {k: v for k, v in before.items() if not k[0].startswith("model_generation_active")}
        # Equal up to float summation order, and never lower (a decrease would read as a counter reset).
        assert {k: after[k] for k in counters} == pytest.approx(counters, rel=1e-12)
        assert all(after[k] >= v for k, v in counters.items())
        boolean = ("occt_boolean_duration_seconds_count",
                   (("freecad_version", "0.20.2"), ("occt_version", "7.6.3"), ("operation", "union"),
                    ("role", "primary"), ("solids_range", "3-5")))  # fmt: skip
        assert after[boolean] == 3 * 14
        gauge = ("model_generation_active_flows",
                 (("flow_type", "parametric"), ("freecad_version", "0.20.2"), ("occt_version", "7.6.3")))  # fmt: skip
        assert before[gauge] == 14 and after[gauge] == 1  # dead processes' gauges are gone

        zombie.wait()
        later = [_spawn(tmp_path) for _ in range(3)]
        assert [proc.wait() for proc in later] == [0] * 3
        collector.compact()
        again = _samples(registry)
        assert again[boolean] == 3 * 17
        assert all(again[k] >= v for k, v in after.items() if k in counters), "a counter went backwards"
        assert {i.split("-")[0] for i in _identifier_files(tmp_path)} == {str(live.pid)}
    finally:
        live.kill()
        live.wait()


def _write(path, values: dict[str, float]) -> None:
    store = MmapedDict(str(path))
    for labels, value in values.items():
        store.write_value(json.dumps(["jobs", "jobs_total", {"k": labels}, "help"]), value, 0.0)
    store.close()


def test_a_counter_is_never_exposed_lower_and_goes_on_from_there_after_a_loss(tmp_path):
    """A value one ulp lower (folding sums floats in another order) or much lower (an accumulator
    lost): exposed as before, and later increments add to what was exposed, so ``rate()`` neither
    freezes nor sees a reset."""
    path = tmp_path / "counter_1.db"
    registry = CollectorRegistry()
    CompactingMultiProcessCollector(registry, path=str(tmp_path), alive=lambda identifier: True)
    _write(path, {"v": 0.8400000000000003})
    assert registry.get_sample_value("jobs_total", {"k": "v"}) == 0.8400000000000003
    _write(path, {"v": 0.8400000000000002})  # one ulp lower
    assert registry.get_sample_value("jobs_total", {"k": "v"}) == 0.8400000000000003
    _write(path, {"v": 100.0})
    assert registry.get_sample_value("jobs_total", {"k": "v"}) == pytest.approx(100.0)
    _write(path, {"v": 40.0})  # 60 lost
    assert registry.get_sample_value("jobs_total", {"k": "v"}) == pytest.approx(100.0)
    _write(path, {"v": 45.0})  # 5 more since: the series goes on from 100
    assert registry.get_sample_value("jobs_total", {"k": "v"}) == pytest.approx(105.0)


def test_parsed_keys_are_kept_across_scrapes_within_a_bound(tmp_path, monkeypatch):
    """The reader keeps the keys it has parsed from one scrape to the next (a
    worker's page parses ~1,500 every scrape otherwise), never more than its
    bound: labels that churn without end must not grow the worker's memory."""
    from cadscope.metrics import _multiprocess

    monkeypatch.setattr(_multiprocess, "_parsed", {})
    monkeypatch.setattr(_multiprocess, "_PARSED_MAX", 10)
    registry = CollectorRegistry()
    CompactingMultiProcessCollector(registry, path=str(tmp_path), alive=lambda identifier: True)
    _write(tmp_path / "counter_1.db", {f"v{i}": float(i) for i in range(8)})
    assert registry.get_sample_value("jobs_total", {"k": "v7"}) == 7.0
    kept = dict(_multiprocess._parsed)
    assert len(kept) == 8
    registry.get_sample_value("jobs_total", {"k": "v7"})
    assert all(_multiprocess._parsed[key] is fields for key, fields in kept.items())  # not parsed again
    _write(tmp_path / "counter_1.db", {f"v{i}": float(i) for i in range(8, 20)})  # churn
    assert registry.get_sample_value("jobs_total", {"k": "v19"}) == 19.0
    assert registry.get_sample_value("jobs_total", {"k": "v3"}) == 3.0  # the first eight, still exposed
    assert len(_multiprocess._parsed) <= 10


def test_a_file_not_yet_sized_costs_nothing_and_is_deleted_once_its_process_is_gone(tmp_path, caplog):
    """MmapedDict creates its file, then sizes it: a scrape can meet it at 0 bytes
    (client_python #1199), and a process killed in that window leaves it so."""
    _write(tmp_path / "counter_101.db", {"a": 2.0})
    (tmp_path / "counter_102.db").touch()  # a child between open() and truncate()
    (tmp_path / "counter_103.db").touch()  # the same, killed there
    upstream = CollectorRegistry()
    MultiProcessCollector(upstream, path=str(tmp_path))
    with pytest.raises(Exception, match="unpack"):
        generate_latest(upstream)  # the whole page fails upstream

    registry = CollectorRegistry()
    collector = CompactingMultiProcessCollector(registry, path=str(tmp_path), alive=lambda i: i not in ("101", "103"))
    with caplog.at_level("WARNING", logger="cadscope.metrics"):
        assert registry.get_sample_value("jobs_total", {"k": "a"}) == 2.0
    assert caplog.records == []  # a file being created is normal, not an error

    assert collector.compact() == 2  # 101 folded, 103 deleted; 102 is alive and keeps its file
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".db")) == ["counter_102.db", "counter_compacted.db"]
    assert registry.get_sample_value("jobs_total", {"k": "a"}) == 2.0


def _names(path) -> list[str]:
    """The value files and the files moved aside (not the locks, checksums and previous copies)."""
    return sorted(n for n in os.listdir(path) if n.endswith((".db", ".unreadable")))


def _second_entry(path) -> int:
    """The offset of a file's second entry (MmapedDict's layout: length, key padded to 8, two doubles)."""
    data = path.read_bytes()
    length = struct.unpack_from("i", data, 8)[0]
    return 8 + 4 + length + (8 - (length + 4) % 8) + 16


@pytest.mark.timeout(60)  # upstream's reader never ends on the negative length
@pytest.mark.parametrize("corruption", ["past the end", "negative"])
def test_an_unreadable_file_costs_its_own_samples_only_and_is_moved_aside(tmp_path, caplog, corruption):
    """A key length far past the file's end, or negative: upstream raises for
    the first, and for the second (-28 after a first entry) walks back to the
    first entry's value and reads on for ever, holding the scrape (and here
    the compaction lock with it)."""
    _write(tmp_path / "counter_201.db", {"a": 2.0})
    _write(tmp_path / "counter_202.db", {"a": 5.0, "b": 1.0})
    _write(tmp_path / "counter_203.db", {"a": 7.0, "z": 3.0})
    with open(tmp_path / "counter_203.db", "r+b") as corrupt:
        if corruption == "past the end":  # its first entry's key length
            corrupt.seek(8)
            corrupt.write(struct.pack("i", 10**6))
        else:
            corrupt.seek(_second_entry(tmp_path / "counter_203.db"))
            corrupt.write(struct.pack("i", -28))
    registry = CollectorRegistry()
    actions: list[str] = []
    collector = CompactingMultiProcessCollector(
        registry, path=str(tmp_path), alive=lambda i: i == "202", on_unreadable=actions.append
    )

    with caplog.at_level("ERROR", logger="cadscope.metrics"):
        for _ in range(3):
            assert registry.get_sample_value("jobs_total", {"k": "a"}) == 7.0
            assert registry.get_sample_value("jobs_total", {"k": "b"}) == 1.0
    reports = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(reports) == 1 and "counter_203.db" in reports[0].getMessage()  # once, not every scrape
    assert actions == ["left_out"]  # counted once too (cadscope_metrics_files_unreadable_total)

    caplog.clear()
    with caplog.at_level("ERROR", logger="cadscope.metrics"):
        assert collector.compact() == 1  # 201 folded; 203 moved aside, kept for a post-mortem
        assert collector.compact() == 0  # and compaction does not fail on it again
    assert _names(tmp_path) == ["counter_202.db", "counter_203.db.unreadable", "counter_compacted.db"]
    assert actions == ["left_out", "moved_aside"]
    assert [r.getMessage() for r in caplog.records if "moved aside" in r.getMessage()] != []
    assert registry.get_sample_value("jobs_total", {"k": "a"}) == 7.0
    assert registry.get_sample_value("jobs_total", {"k": "b"}) == 1.0
    assert registry.get_sample_value("jobs_total", {"k": "z"}) is None


def test_a_failing_unreadable_callback_fails_no_scrape(tmp_path):
    _write(tmp_path / "counter_401.db", {"a": 2.0})
    (tmp_path / "counter_402.db").write_bytes(b"\x20\x00\x00\x00" + b"\x00" * 28)  # used: 32, then garbage

    def broken(action: str) -> None:
        raise RuntimeError("the counter's own store is gone")

    registry = CollectorRegistry()
    CompactingMultiProcessCollector(registry, path=str(tmp_path), alive=lambda i: True, on_unreadable=broken)
    assert registry.get_sample_value("jobs_total", {"k": "a"}) == 2.0


def test_a_file_with_keys_no_scrape_can_read_is_moved_aside_never_folded(tmp_path, caplog):
    """A file whole in its layout whose keys are not prometheus_client's (JSON
    of a name, a sample name, a dict of labels and a help text), or a
    histogram's with a bucket bound that is no number, or a metric with no
    name: any key a scrape cannot read. Folded into
    the accumulator, such a key made the accumulator unreadable: every reaped
    process's counts left /metrics for good, and each later compaction folded
    more into a file no scrape read."""

    def write_keys(pid: int, entries: dict[str, float], kind: str = "counter") -> None:
        store = MmapedDict(str(tmp_path / f"{kind}_{pid}.db"))
        for key, value in entries.items():
            store.write_value(key, value, 0.0)
        store.close()

    good = json.dumps(["jobs", "jobs_total", {"k": "a"}, "help"])
    write_keys(301, {good: 5.0})
    write_keys(302, {good: 7.0, "not json": 1.0})
    write_keys(303, {good: 11.0, json.dumps(["jobs", "jobs_total", ["k", "a"], "help"]): 1.0})  # labels not a dict
    write_keys(304, {good: 1.0})  # alive
    write_keys(308, {good: 13.0, json.dumps(["", "", {}, "help"]): 1.0})  # no metric name: the scrape's Metric fails
    bucket = json.dumps(["lag", "lag_bucket", {"le": "0.5"}, "help"])
    write_keys(306, {bucket: 3.0}, "histogram")
    write_keys(307, {bucket.replace("0.5", "x5"): 1.0}, "histogram")  # a bound no float: _accumulate_metrics fails
    registry = CollectorRegistry()
    collector = CompactingMultiProcessCollector(registry, path=str(tmp_path), alive=lambda i: i == "304")
    with caplog.at_level("ERROR", logger="cadscope.metrics"):
        assert registry.get_sample_value("jobs_total", {"k": "a"}) == 6.0  # 302, 303 and 308 left out
        assert registry.get_sample_value("lag_bucket", {"le": "0.5"}) == 3.0  # 307 left out

        assert collector.compact() == 2  # 301 and 306 folded; 302, 303, 307 and 308 moved aside
    assert _names(tmp_path) == [
        "counter_302.db.unreadable", "counter_303.db.unreadable", "counter_304.db", "counter_308.db.unreadable",
        "counter_compacted.db", "histogram_307.db.unreadable", "histogram_compacted.db",
    ]  # fmt: skip
    fresh = CollectorRegistry()  # reads the accumulators from scratch, as after a restart of the scraper
    CompactingMultiProcessCollector(fresh, path=str(tmp_path))
    assert fresh.get_sample_value("jobs_total", {"k": "a"}) == 6.0
    assert fresh.get_sample_value("lag_bucket", {"le": "0.5"}) == 3.0
    write_keys(305, {good: 2.0})
    assert collector.compact() == 1
    assert registry.get_sample_value("jobs_total", {"k": "a"}) == 8.0
    moved = [r.getMessage() for r in caplog.records if "moved aside" in r.getMessage()]
    assert len(moved) == 4 and any("not a metric key" in m for m in moved)


FORKS = textwrap.dedent(
    """
    import json, os, sys
    from prometheus_client import CollectorRegistry, Counter
    from cadscope.metrics import enable_multiprocess, process_identifier
    enable_multiprocess(sys.argv[1])
    jobs = Counter("jobs", "Jobs.", ("k",), registry=CollectorRegistry()).labels("a")
    jobs.inc()
    pid = os.fork()
    if pid == 0:  # a pool process: billiard forks this way
        jobs.inc(5)
        print(json.dumps({"child": process_identifier()}), flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    jobs.inc(10)
    print(json.dumps({"parent": process_identifier(), "status": status}))
    """
)


def test_a_forked_child_writes_files_of_its_own(tmp_path):
    """prometheus_client's values, named by pid and start time, notice the fork: the child starts
    its own file from zero, and the parent's stays the parent's."""
    out = subprocess.run([sys.executable, "-c", FORKS, str(tmp_path)], capture_output=True, text=True, check=True)
    child, parent = (json.loads(line) for line in out.stdout.splitlines())
    assert parent["status"] == 0 and child["child"] != parent["parent"]
    assert child["child"].split("-")[0] != parent["parent"].split("-")[0] and "-" in child["child"]
    assert _names(tmp_path) == sorted([f"counter_{child['child']}.db", f"counter_{parent['parent']}.db"])
    registry = CollectorRegistry()
    CompactingMultiProcessCollector(registry, str(tmp_path), alive=lambda identifier: True)
    assert registry.get_sample_value("jobs_total", {"k": "a"}) == 16.0
    store = MmapedDict(str(tmp_path / f"counter_{child['child']}.db"), read_mode=True)
    assert [value for _, value, _ in store.read_all_values()] == [5.0]
    store.close()


def _ground_truth(path) -> dict[str, float]:
    """Every counter sample summed over every file as written (no compaction)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(path))
    return {
        f"{s.name}{sorted(s.labels.items())}": s.value
        for family in registry.collect()
        if family.type == "counter"
        for s in family.samples
    }


REUSER = textwrap.dedent(
    """
    import os, sys
    from prometheus_client import CollectorRegistry, Counter
    from cadscope.metrics import enable_multiprocess
    enable_multiprocess(sys.argv[1])
    Counter("jobs", "Jobs.", ("k",), registry=CollectorRegistry()).labels("a").inc(100)
    print(os.getpid(), flush=True)
    """
)


def _start_with_pid(wanted: int, argv: list[str]) -> subprocess.Popen[str]:
    """A process the kernel gives the pid ``wanted``: a pid reused, on purpose (``ns_last_pid``).
    Other processes of the machine may take the pid first: tried again until it comes."""
    for _ in range(200):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as last:
                last.write(str(wanted - 1))
        except OSError as exc:
            pytest.fail(f"cannot choose the next pid here ({exc}): this test needs root in its pid namespace")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        if proc.pid == wanted:
            return proc
        proc.wait()
    pytest.fail(f"the kernel never gave pid {wanted} again")


def test_a_pid_reused_between_the_liveness_check_and_the_fold_loses_nothing_and_counts_nothing_twice(tmp_path):
    """client_python's objection to compaction: a process dies, the compactor finds its pid dead,
    and before it folds the file a new process gets the same pid and writes. With files named by
    pid only, the new process would continue the dead one's file (upstream reopens it) and its
    counts would be folded, then lost with the deleted file, or counted twice. Here the pid is
    really reused, at that very moment: files named by pid and start time keep them apart."""
    first = subprocess.run([sys.executable, "-c", REUSER, str(tmp_path)], capture_output=True, text=True, check=True)
    dead_pid = int(first.stdout.split()[0])
    reuser: list[subprocess.Popen[str]] = []

    def alive(identifier: str) -> bool:
        from cadscope.metrics import identifier_alive

        answer = identifier_alive(identifier)
        if identifier.split("-")[0] == str(dead_pid) and not answer and not reuser:
            # Checked dead: now, before the fold, the same pid starts again and writes.
            proc = _start_with_pid(dead_pid, [sys.executable, "-c", REUSER + "\nimport time; time.sleep(60)",
                                              str(tmp_path)])  # fmt: skip
            assert proc.stdout is not None and int(proc.stdout.readline()) == dead_pid
            reuser.append(proc)
        return answer

    registry = CollectorRegistry()
    collector = CompactingMultiProcessCollector(registry, str(tmp_path), alive=alive)
    try:
        assert collector.compact() == 1
        assert reuser, "the pid was not reused"
        assert len([n for n in _names(tmp_path) if n.startswith(f"counter_{dead_pid}-")]) == 1  # the new one's own
        assert registry.get_sample_value("jobs_total", {"k": "a"}) == 200.0
    finally:
        for proc in reuser:
            proc.kill()
            proc.wait()
    assert collector.compact() == 1  # the second process, dead too now
    assert registry.get_sample_value("jobs_total", {"k": "a"}) == 200.0
    assert _names(tmp_path) == ["counter_compacted.db"]


def test_a_corrupt_accumulator_is_repaired_counted_and_never_freezes_a_counter(tmp_path):
    """A torn or corrupted accumulator: rewritten from this process's copy (nothing lost); a
    collector with no copy of its own takes the previous one and says what was lost. Either way
    counters are never exposed lower, and go on rising with the new counts."""
    for value in (1.0, 2.0):
        _write(tmp_path / f"counter_{int(value)}.db", {"a": value})
    outcomes: list[str] = []
    registry = CollectorRegistry()
    collector = CompactingMultiProcessCollector(
        registry, str(tmp_path), alive=lambda i: False, on_accumulator=outcomes.append
    )
    collector.compact()  # 1.0 and 2.0 folded
    _write(tmp_path / "counter_3.db", {"a": 4.0})
    collector.compact()  # 4.0 folded: the previous copy holds 3.0
    assert registry.get_sample_value("jobs_total", {"k": "a"}) == 7.0
    accumulator = tmp_path / "counter_compacted.db"
    data = bytearray(accumulator.read_bytes())
    data[30] ^= 0xFF
    accumulator.write_bytes(bytes(data))
    assert registry.get_sample_value("jobs_total", {"k": "a"}) == 7.0
    assert outcomes == ["repaired"]
    assert _files.read_accumulator(str(accumulator))[1] == "current"  # rewritten, sound again

    # A collector with no copy of its own (started after the corruption): the previous copy, and the
    # last fold's 4.0 lost, said and counted. The first collector never shows less than it showed.
    data = bytearray(accumulator.read_bytes())
    data[30] ^= 0xFF
    accumulator.write_bytes(bytes(data))
    others: list[str] = []
    fresh = CompactingMultiProcessCollector(None, str(tmp_path), alive=lambda i: False, on_accumulator=others.append)
    assert {s.value for m in fresh.collect() for s in m.samples if s.labels == {"k": "a"}} == {3.0}
    assert others == ["previous"]
    assert registry.get_sample_value("jobs_total", {"k": "a"}) == 7.0  # never exposed lower
    _write(tmp_path / "counter_4.db", {"a": 1.5})
    collector.compact()
    assert registry.get_sample_value("jobs_total", {"k": "a"}) == 8.5  # and rising from where it was


def test_scrapes_during_a_compaction_in_batches_see_every_count_exactly_once(tmp_path, monkeypatch):
    """Compaction folds a few files per swap; a scrape between two swaps, or one that arrives
    during a swap (it waits for it), must see each dead process's counts exactly once: in its
    file or in the accumulator, never both or neither."""
    import threading

    import cadscope.metrics._multiprocess as multiprocess

    for number in range(1, 41):
        _write(tmp_path / f"counter_{number}.db", {"a": float(number), "b": 1.0})
    registry = CollectorRegistry()
    collector = CompactingMultiProcessCollector(registry, str(tmp_path), alive=lambda i: False)
    between: list[float | None] = []
    during: list[float | None] = []
    waiting: list[threading.Thread] = []
    stage, commit = _files.stage_accumulator, _files.commit_accumulator

    def staged(path, items):  # type: ignore[no-untyped-def]
        between.append(registry.get_sample_value("jobs_total", {"k": "a"}))  # between two swaps
        return stage(path, items)

    def committed(path, staged_path, **kwargs):  # type: ignore[no-untyped-def]
        thread = threading.Thread(target=lambda: during.append(registry.get_sample_value("jobs_total", {"k": "a"})))
        thread.start()
        thread.join(0.2)
        assert thread.is_alive(), "a scrape went through in the middle of a swap"
        waiting.append(thread)
        commit(path, staged_path, **kwargs)

    monkeypatch.setattr(multiprocess._files, "stage_accumulator", staged)
    monkeypatch.setattr(multiprocess._files, "commit_accumulator", committed)
    assert collector.compact(batch=7) == 40
    for thread in waiting:
        thread.join(10)
    total = float(sum(range(1, 41)))
    assert between == [total] * 6 and during == [total] * 6  # 40 files, 7 a swap
    assert registry.get_sample_value("jobs_total", {"k": "a"}) == total
    assert registry.get_sample_value("jobs_total", {"k": "b"}) == 40.0


def test_two_collectors_on_one_directory_fold_once_and_agree(tmp_path):
    """An API with several server processes serves one directory from each: one compacts at a time
    (a lock file), and each sees the same counts."""
    for number in range(1, 9):
        _write(tmp_path / f"counter_{number}.db", {"a": 1.0})
    first, second = CollectorRegistry(), CollectorRegistry()
    a = CompactingMultiProcessCollector(first, str(tmp_path), alive=lambda i: False)
    b = CompactingMultiProcessCollector(second, str(tmp_path), alive=lambda i: False)
    import fcntl

    holder = os.open(tmp_path / ".cadscope-compactor.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # "the other one" is compacting
    try:
        assert a.compact() == 0
    finally:
        os.close(holder)
    assert b.compact() == 8
    assert a.compact() == 0
    assert first.get_sample_value("jobs_total", {"k": "a"}) == 8.0
    assert second.get_sample_value("jobs_total", {"k": "a"}) == 8.0
