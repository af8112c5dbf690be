"""prometheus_client's multiprocess file format, as cadscope reads and writes it (``metrics/_files.py``).

The guard: files written by the installed prometheus_client, of every kind, read by cadscope's
collector exactly as prometheus_client's own collector reads them. If a release changes the
format, these tests fail before any scrape goes wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from cadscope.metrics import CompactingMultiProcessCollector, _files

EVERY_KIND = textwrap.dedent(
    """
    import os, random, sys, time
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
    from cadscope.metrics import enable_multiprocess
    from cadscope.metrics._multiprocess import GAUGE_MODES
    enable_multiprocess(sys.argv[1])
    rng = random.Random(int(sys.argv[2]))
    r = CollectorRegistry()
    ops = Counter("ops", "Operations.", ("op", "who"), registry=r)
    size = Histogram("size", "Sizes.", ("op",), buckets=(0.1, 1, 10), registry=r)
    lag = Summary("lag", "Lag.", ("op",), registry=r)
    gauges = {mode: Gauge(f"g_{mode}", f"A {mode} gauge.", ("op",), multiprocess_mode=mode, registry=r)
              for mode in GAUGE_MODES}
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


def _families(registry: CollectorRegistry) -> dict[str, tuple[str, str, list[tuple[str, tuple, float]]]]:
    """Each family's type, help and samples (sorted): the exposition, whatever the order of its lines."""
    text = generate_latest(registry).decode()
    return {
        family.name: (
            family.type,
            family.documentation,
            sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in family.samples),
        )
        for family in text_string_to_metric_families(text)
    }


def test_the_installed_prometheus_client_writes_what_cadscope_reads():
    """The format guard. The installed prometheus_client's own value classes write counters,
    histograms, summaries and every gauge mode (real processes, several dead, one live);
    cadscope's collector must expose exactly what prometheus_client's collector exposes, over
    the files as written and again after compaction folded the dead processes' files."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        for seed in range(6):
            subprocess.run([sys.executable, "-c", EVERY_KIND, directory, str(seed)], check=True)
        live = subprocess.Popen([sys.executable, "-c", EVERY_KIND, directory, "99", "linger"],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert live.stdout is not None and live.stdout.readline().strip() == "ready"
            upstream = CollectorRegistry()
            MultiProcessCollector(upstream, path=directory)
            ours = CollectorRegistry()
            collector = CompactingMultiProcessCollector(ours, directory)
            expected = _families(upstream)
            assert {"ops", "size", "lag", "g_liveall", "g_mostrecent"} <= set(expected)
            assert _families(ours) == expected

            # The dead processes folded into accumulators: prometheus_client's collector, and a
            # fresh one of ours, still agree over the files as they now are.
            assert collector.compact() > 0
            names = sorted(os.listdir(directory))
            assert {"counter_compacted.db", "histogram_compacted.db", "summary_compacted.db"} <= set(names)
            upstream_after, ours_after = CollectorRegistry(), CollectorRegistry()
            MultiProcessCollector(upstream_after, path=directory)
            CompactingMultiProcessCollector(ours_after, directory)
            live_only = _families(upstream_after)
            assert _families(ours_after) == live_only

            # Counters and histograms kept every dead process's counts (up to the order floats are summed).
            def summed(families):  # type: ignore[no-untyped-def]
                return {
                    (n, labels): v for t, _, samples in families.values() if t != "gauge" for n, labels, v in samples
                }

            assert summed(live_only) == pytest.approx(summed(expected), rel=1e-12)
        finally:
            live.kill()
            live.wait()


def test_entries_read_every_value_prometheus_client_wrote(tmp_path):
    path = str(tmp_path / "counter_1.db")
    store = MmapedDict(path)
    keys = [json.dumps(["jobs", "jobs_total", {"k": f"v{i}" + "x" * (i % 7)}, "Jobs."]) for i in range(300)]
    for i, key in enumerate(keys):
        store.write_value(key, float(i), 0.0)
    store.close()
    rows = list(_files.entries(_files.read_used(path)))
    assert [(key.decode(), value) for key, value, _ in rows] == [(key, float(i)) for i, key in enumerate(keys)]
    reader = _files.FileReader(path)
    assert [value for _, value, _ in reader.read()] == [float(i) for i in range(300)]
    store = MmapedDict(path)  # prometheus_client goes on from the file's values
    store.write_value(keys[3], 30.0, 0.0)
    store.write_value("new", 1.0, 0.0)
    store.close()
    again = reader.read()  # only the new entry is parsed; every value is read again
    assert again[3][1] == 30.0 and again[-1][:2] == (b"new", 1.0) and len(again) == 301


@pytest.mark.parametrize(
    "key",
    [
        "not json",
        '["jobs", "jobs_total", ["k", "a"], "h"]',
        '["", "", {}, "h"]',
        '["a b", "a b", {}, "h"]',
        '["lag", "lag_bucket", {"le": "x5"}, "h"]',
        '["j", "j_total", {"k": 1}, "h"]',
    ],  # fmt: skip
)
def test_keys_no_scrape_could_expose_are_corrupt(key):
    with pytest.raises(_files.CorruptFile):
        _files.parse_key(key.encode())


def test_accumulators_are_written_whole_with_a_checksum_and_the_previous_copy(tmp_path):
    path = str(tmp_path / "counter_compacted.db")
    a, b = (json.dumps(["jobs", "jobs_total", {"k": k}, "Jobs."]) for k in "ab")
    _files.write_accumulator(path, [(a, 1.0, 0.0)])
    _files.write_accumulator(path, [(a, 3.0, 0.0), (b, 1.0, 0.0)])
    assert _files.read_accumulator(path) == ([(a.encode(), 3.0, 0.0), (b.encode(), 1.0, 0.0)], "current")
    # prometheus_client reads it as one of its own files
    store = MmapedDict(path, read_mode=True)
    assert [(k, v) for k, v, _ in store.read_all_values()] == [(a, 3.0), (b, 1.0)]
    store.close()
    data = bytearray(open(path, "rb").read())
    data[20] ^= 0xFF  # a torn or corrupted write
    open(path, "wb").write(bytes(data))
    assert _files.read_accumulator(path) == ([(a.encode(), 1.0, 0.0)], "previous")
    open(path + _files.PREVIOUS, "ab").write(b"x")
    assert _files.read_accumulator(path) == ([], "lost")


def test_allocate_gives_every_byte_its_blocks_and_keeps_what_is_there(tmp_path):
    path = str(tmp_path / "counter_9.db")
    _files.allocate(path, 1 << 18)
    assert os.path.getsize(path) == 1 << 18 and not _files.sparse(path)
    store = MmapedDict(path)  # prometheus_client takes the allocated file as its own
    store.write_value("k", 2.0, 0.0)
    store.close()
    with open(path, "r+b") as file:
        file.truncate(1 << 19)  # as prometheus_client grows a full file: a hole
    assert _files.sparse(path)
    _files.allocate(path, 0)
    assert not _files.sparse(path) and os.path.getsize(path) == 1 << 19
    assert list(_files.entries(_files.read_used(path)))[0][:2] == (b"k", 2.0)
