"""``.ci/stress``: the suite N times beside two CPU burners, which it stops however it ends."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import psutil
import pytest

from .conftest import REPO


def _stress(*args: str) -> tuple[subprocess.CompletedProcess[str], list[int]]:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    done = subprocess.run([str(REPO / ".ci" / "stress"), *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)  # fmt: skip
    found = re.search(r"CPU burners \(pids (\d+) (\d+)\)", done.stdout)
    assert found, done.stdout + done.stderr
    return done, [int(pid) for pid in found.groups()]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
def test_runs_n_times_and_stops_its_burners_whether_the_runs_pass_or_fail():
    passed, burners = _stress("-n", "2", "-q", "-p", "no:cacheprovider", "tests/test_help.py", "-k", "top_level")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "run 1 of 2 passed" in passed.stdout and "2 run(s) passed" in passed.stdout
    assert all(_gone(pid) for pid in burners)

    failed, burners = _stress("-n", "3", "-q", "-p", "no:cacheprovider", "tests/test_help.py", "-k", "no_such_test")
    assert failed.returncode == 1 and "run 1 of 3 failed" in failed.stdout and "run 2" not in failed.stdout
    assert all(_gone(pid) for pid in burners)


def test_a_bad_count_is_one_line():
    done = subprocess.run([str(REPO / ".ci" / "stress"), "-n", "none"], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stderr) == (2, ".ci/stress: -n needs a whole number of runs, 1 or more\n")
