"""A worker's ready marker (``CADSCOPE_READY_FILE``) leaves with the worker that wrote it,
so markers do not pile up in a data folder across runs."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.slow
def test_a_worker_removes_its_ready_file_at_shutdown_and_only_its_own(start_worker, tmp_path):
    worker = start_worker(concurrency=1)
    ready = Path(worker.env["CADSCOPE_READY_FILE"])
    assert ready.read_text() == str(worker.proc.pid)
    assert worker.stop() == 0
    assert not ready.exists()

    # A file a later worker wrote (another pid) is that worker's: left alone.
    second = start_worker(concurrency=1)
    theirs = Path(second.env["CADSCOPE_READY_FILE"])
    theirs.write_text("1")
    second.stop()
    assert theirs.read_text() == "1"
