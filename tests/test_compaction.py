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

from cadscope.metrics import CompactingMultiProcessCollector, process_reaped

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


def test_compaction_keeps_every_counter_and_drops_dead_gauges(tmp_path):
    for _ in range(12):
        assert _spawn(tmp_path).wait() == 0
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
        files_before = len(os.listdir(tmp_path))

        removed = collector.compact()

        after = _samples(registry)
        names = os.listdir(tmp_path)
        assert removed == files_before - len(names) + 2  # +2: the accumulators it wrote
        assert sorted(n for n in names if "compacted" in n) == ["counter_compacted.db", "histogram_compacted.db"]
        # Only the live process and the unreaped zombie keep files of their own.
        assert {n.rsplit("_", 1)[1] for n in names if "compacted" not in n} == {f"{live.pid}.db", f"{zombie.pid}.db"}
        counters = {k: v for k, v in before.items() if not k[0].startswith("model_generation_active")}
        # Equal up to float summation order, and never lower (a decrease would read as a counter reset).
        assert {k: after[k] for k in counters} == pytest.approx(counters, rel=1e-12)
        assert all(after[k] >= v for k, v in counters.items())
        boolean = ("occt_boolean_duration_seconds_count",
                   (("freecad_version", "0.20.2"), ("occt_version", "7.6.3"), ("operation", "union"),
                    ("solids_range", "3-5")))  # fmt: skip
        assert after[boolean] == 3 * 14
        gauge = ("model_generation_active_flows",
                 (("flow_type", "parametric"), ("freecad_version", "0.20.2"), ("occt_version", "7.6.3")))  # fmt: skip
        assert before[gauge] == 14 and after[gauge] == 2  # dead processes' gauges are gone

        # The zombie is compacted once it has been reaped, into the same accumulators.
        assert not process_reaped(zombie.pid)
        zombie.wait()
        assert process_reaped(zombie.pid)
        for _ in range(3):
            assert _spawn(tmp_path).wait() == 0
        collector.compact()
        again = _samples(registry)
        assert again[boolean] == 3 * 17
        assert all(again[k] >= v for k, v in after.items() if k in counters), "a counter went backwards"
        assert {n.rsplit("_", 1)[1] for n in os.listdir(tmp_path) if "compacted" not in n} == {f"{live.pid}.db"}
    finally:
        live.kill()
        live.wait()


def test_a_counter_is_never_exposed_lower_than_before(tmp_path):
    import json

    from prometheus_client.mmap_dict import MmapedDict

    key = json.dumps(["jobs", "jobs_total", {"k": "v"}, "help"])
    path = tmp_path / f"counter_{os.getpid()}.db"  # a live pid: never compacted

    def write(value: float) -> None:
        store = MmapedDict(str(path))
        store.write_value(key, value, 0.0)
        store.close()

    registry = CollectorRegistry()
    CompactingMultiProcessCollector(registry, path=str(tmp_path))
    write(0.8400000000000003)
    assert registry.get_sample_value("jobs_total", {"k": "v"}) == 0.8400000000000003
    write(0.8400000000000002)  # one ulp lower, as a different summation order gives
    assert registry.get_sample_value("jobs_total", {"k": "v"}) == 0.8400000000000003
    write(1.5)
    assert registry.get_sample_value("jobs_total", {"k": "v"}) == 1.5


def test_parsed_keys_are_kept_across_scrapes_within_a_bound(tmp_path, monkeypatch):
    """The reader keeps the keys it has parsed from one scrape to the next (a
    worker's page parses ~1,500 every scrape otherwise), never more than its
    bound: labels that churn without end must not grow the worker's memory."""
    from cadscope.metrics import _multiprocess

    monkeypatch.setattr(_multiprocess, "_parsed_keys", {})
    monkeypatch.setattr(_multiprocess, "_PARSED_MAX", 10)
    registry = CollectorRegistry()
    CompactingMultiProcessCollector(registry, path=str(tmp_path))
    _write(tmp_path / f"counter_{os.getpid()}.db", {f"v{i}": float(i) for i in range(8)})
    assert registry.get_sample_value("jobs_total", {"k": "v7"}) == 7.0
    kept = dict(_multiprocess._parsed_keys)
    assert len(kept) == 8
    registry.get_sample_value("jobs_total", {"k": "v7"})
    assert all(_multiprocess._parsed_keys[key] is fields for key, fields in kept.items())  # not parsed again
    _write(tmp_path / f"counter_{os.getpid()}.db", {f"v{i}": float(i) for i in range(8, 20)})  # churn
    assert registry.get_sample_value("jobs_total", {"k": "v19"}) == 19.0
    assert registry.get_sample_value("jobs_total", {"k": "v3"}) == 3.0  # the first eight, still exposed
    assert len(_multiprocess._parsed_keys) <= 10


def _write(path, values: dict[str, float]) -> None:
    import json

    from prometheus_client.mmap_dict import MmapedDict

    store = MmapedDict(str(path))
    for labels, value in values.items():
        store.write_value(json.dumps(["jobs", "jobs_total", {"k": labels}, "help"]), value, 0.0)
    store.close()


def test_a_file_not_yet_sized_costs_nothing_and_is_deleted_once_reaped(tmp_path, caplog):
    """MmapedDict creates its file, then sizes it: a scrape can meet it at 0 bytes
    (client_python #1199), and a process killed in that window leaves it so."""
    from prometheus_client.multiprocess import MultiProcessCollector

    _write(tmp_path / "counter_101.db", {"a": 2.0})
    (tmp_path / "counter_102.db").touch()  # a child between open() and truncate()
    (tmp_path / "counter_103.db").touch()  # the same, killed there
    upstream = CollectorRegistry()
    MultiProcessCollector(upstream, path=str(tmp_path))
    with pytest.raises(Exception, match="unpack"):
        generate_latest(upstream)  # the whole page fails upstream

    registry = CollectorRegistry()
    collector = CompactingMultiProcessCollector(registry, path=str(tmp_path), reaped=lambda pid: pid in (101, 103))
    with caplog.at_level("WARNING", logger="cadscope.metrics"):
        assert registry.get_sample_value("jobs_total", {"k": "a"}) == 2.0
    assert caplog.records == []  # a file being created is normal, not an error

    assert collector.compact() == 2  # 101 folded, 103 deleted; 102 is alive and keeps its file
    assert sorted(os.listdir(tmp_path)) == ["counter_102.db", "counter_compacted.db"]
    assert registry.get_sample_value("jobs_total", {"k": "a"}) == 2.0


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
        registry, path=str(tmp_path), reaped=lambda pid: pid != 202, on_unreadable=actions.append
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
    assert sorted(os.listdir(tmp_path)) == ["counter_202.db", "counter_203.db.unreadable", "counter_compacted.db"]
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
    CompactingMultiProcessCollector(registry, path=str(tmp_path), reaped=lambda pid: False, on_unreadable=broken)
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
    collector = CompactingMultiProcessCollector(registry, path=str(tmp_path), reaped=lambda pid: pid != 304)
    with caplog.at_level("ERROR", logger="cadscope.metrics"):
        assert registry.get_sample_value("jobs_total", {"k": "a"}) == 6.0  # 302, 303 and 308 left out
        assert registry.get_sample_value("lag_bucket", {"le": "0.5"}) == 3.0  # 307 left out

        assert collector.compact() == 2  # 301 and 306 folded; 302, 303, 307 and 308 moved aside
    assert sorted(os.listdir(tmp_path)) == [
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


EVERY_KIND = textwrap.dedent(
    """
    import os, random, sys, time
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
    from cadscope.metrics import enable_multiprocess
    enable_multiprocess(sys.argv[1])
    rng = random.Random(int(sys.argv[2]))
    r = CollectorRegistry()
    ops = Counter("ops", "Operations.", ("op", "who"), registry=r)
    size = Histogram("size", "Sizes.", ("op",), buckets=(0.1, 1, 10), registry=r)
    lag = Summary("lag", "Lag.", ("op",), registry=r)
    gauges = {mode: Gauge(f"g_{mode}", f"A {mode} gauge.", ("op",), multiprocess_mode=mode, registry=r)
              for mode in Gauge._MULTIPROC_MODES}
    # Label values that need escaping, and some only some processes have.
    values = ["boolean", "fillet", 'say "hi"', "back\\\\slash", "line\\nbreak", "Zürich ø", str(os.getpid())]
    for _ in range(rng.randrange(5, 40)):
        op = rng.choice(values)
        ops.labels(op, rng.choice("ab")).inc(rng.choice([1, 0.1, 2.5e-7, 1e15]))
        size.labels(op).observe(rng.choice([0.05, 0.3, 7.0, 1e6, -2.0]))
        lag.labels(op).observe(rng.random())
        for gauge in gauges.values():
            gauge.labels(op).set(rng.uniform(-5, 5))
            time.sleep(0.001)  # mostrecent's timestamps: distinct across processes
    if len(sys.argv) > 3:
        print("ready", flush=True)
        time.sleep(60)
    """
)


def test_ours_reads_every_kind_of_file_as_upstream_does(tmp_path):
    """Counters, histograms, summaries and every gauge mode, written by real
    processes (several dead, one live): cadscope's reader (summing by key as
    it reads) exposes byte for byte what upstream's does, over the files as
    written and with an accumulator among them after a compaction."""
    for seed in range(6):
        subprocess.run([sys.executable, "-c", EVERY_KIND, str(tmp_path), str(seed)], check=True)
    live = subprocess.Popen([sys.executable, "-c", EVERY_KIND, str(tmp_path), "99", "linger"],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert live.stdout is not None and live.stdout.readline().strip() == "ready"
        upstream = CollectorRegistry()
        MultiProcessCollector(upstream, path=str(tmp_path))
        ours = CollectorRegistry()
        collector = CompactingMultiProcessCollector(ours, path=str(tmp_path), reaped=lambda pid: pid != live.pid)
        expected = generate_latest(upstream)
        assert b'g_liveall{op="fillet",pid=' in expected and b"lag_count" in expected and b'le="+Inf"' in expected
        assert generate_latest(ours) == expected

        # Fold the dead processes into accumulators: upstream and a fresh collector of ours (no
        # exposed values remembered) must still agree over the files as they now are.
        assert collector.compact() > 0
        names = sorted(os.listdir(tmp_path))
        assert {"counter_compacted.db", "histogram_compacted.db", "summary_compacted.db"} <= set(names)
        assert len(names) < 20, names
        upstream_after, ours_after = CollectorRegistry(), CollectorRegistry()
        MultiProcessCollector(upstream_after, path=str(tmp_path))
        CompactingMultiProcessCollector(ours_after, path=str(tmp_path))
        assert generate_latest(ours_after) == generate_latest(upstream_after)
    finally:
        live.kill()
        live.wait()


FORKS = textwrap.dedent(
    """
    import json, os, sys
    from prometheus_client import CollectorRegistry, Counter
    from cadscope.metrics import enable_multiprocess
    from cadscope.metrics import _values
    enable_multiprocess(sys.argv[1])
    jobs = Counter("jobs", "Jobs.", ("k",), registry=CollectorRegistry()).labels("a")
    jobs.inc()
    pid = os.fork()
    if pid == 0:  # a pool child: billiard forks this way
        jobs.inc(5)
        os._exit(0 if _values._pid == os.getpid() else 3)
    _, status = os.waitpid(pid, 0)
    jobs.inc(10)
    print(json.dumps({"child": pid, "status": status}))
    """
)


def test_a_forked_child_writes_its_own_file(tmp_path):
    """cadscope's multiprocess values notice a fork without a system call
    (the pid is read again only after a fork), so a child forked after the
    first write must still get a file of its own and start from zero there,
    as with upstream's ``os.getpid``."""
    out = subprocess.run([sys.executable, "-c", FORKS, str(tmp_path)], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    assert got["status"] == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert f"counter_{got['child']}.db" in files and len(files) == 2
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(tmp_path))
    assert registry.get_sample_value("jobs_total", {"k": "a"}) == 16.0
    child = MmapedDict(str(tmp_path / f"counter_{got['child']}.db"), read_mode=True)
    assert [value for _, value, _ in child.read_all_values()] == [5.0]
    child.close()


TASK_RUNS = textwrap.dedent(
    """
    import json, os, sys
    from prometheus_client import CollectorRegistry
    from cadscope.metrics import Catalogue, enable_multiprocess
    enable_multiprocess(sys.argv[1])
    metrics = Catalogue(CollectorRegistry())
    metrics.task_finished("run_job", "success", 0.2)  # its children are cached before the fork
    pid = os.fork()
    if pid == 0:  # a pool child
        metrics.task_finished("run_job", "success", 0.2)
        metrics.task_finished("run_job", "success", 4.0)
        metrics.task_finished("run_job", "failure", 70.0)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    metrics.task_finished("run_job", "success", 0.2)
    compiled = metrics._task_writes[("run_job", "success")].compiled is not None
    print(json.dumps({"child": pid, "status": status, "compiled": compiled}))
    """
)


@pytest.mark.parametrize("compiled", ["1", "0"])
def test_task_metrics_children_cached_before_a_fork_write_to_the_childs_files(tmp_path, compiled):
    """``Catalogue.task_finished`` keeps the labelled children it writes. A
    pool child inherits them across the fork: its runs must land in files of
    its own, and the whole must equal what ``labels()`` on each run gives.
    With the compiled writes (``_valuesc``, where built) and without them."""
    from cadscope.metrics import _values

    env = {**os.environ, "CADSCOPE_COMPILED": compiled}
    out = subprocess.run([sys.executable, "-c", TASK_RUNS, str(tmp_path)], capture_output=True, text=True, check=True,
                         env=env)  # fmt: skip
    got = json.loads(out.stdout)
    assert got["status"] == 0
    assert got["compiled"] is (compiled == "1" and _values.compiled_observe is not None)
    assert {f"counter_{got['child']}.db", f"histogram_{got['child']}.db"} <= {p.name for p in tmp_path.iterdir()}
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(tmp_path))
    get = registry.get_sample_value
    ok, failed = {"task": "run_job", "outcome": "success"}, {"task": "run_job", "outcome": "failure"}
    assert get("cadscope_task_outcomes_total", ok) == 4.0
    assert get("cadscope_task_outcomes_total", failed) == 1.0
    assert get("cadscope_task_runtime_seconds_count", ok) == 4.0
    assert get("cadscope_task_runtime_seconds_sum", ok) == pytest.approx(4.6)
    assert get("cadscope_task_runtime_seconds_bucket", {**ok, "le": "0.25"}) == 3.0
    assert get("cadscope_task_runtime_seconds_bucket", {**ok, "le": "5.0"}) == 4.0
    assert get("cadscope_task_runtime_seconds_bucket", {**failed, "le": "60.0"}) == 0.0
    assert get("cadscope_task_runtime_seconds_bucket", {**failed, "le": "120.0"}) == 1.0
    child = MmapedDict(str(tmp_path / f"counter_{got['child']}.db"), read_mode=True)
    runs = {json.loads(key)[2]["outcome"]: value for key, value, _ in child.read_all_values() if "task_outcomes" in key}
    assert runs == {"success": 2.0, "failure": 1.0}
    child.close()
