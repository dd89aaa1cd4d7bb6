"""The test helpers themselves (tests/support/), where a mistake would hide others."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.support import reaper
from tests.support.losskit import differentiable_paths


def test_differentiable_paths_reads_every_digit_of_an_argument_index():
    differentiable = {1, 11, 12}
    spec = SimpleNamespace(
        inputs=[
            SimpleNamespace(name=f"x{i}", differentiable=i in differentiable) for i in range(13)
        ]
    )
    args = [torch.zeros(1) for _ in range(12)]
    args[11] = {"pred": [torch.zeros(1), torch.zeros(1, dtype=torch.long)]}
    kwargs = {"x12": torch.zeros(1), "x0": torch.zeros(1)}
    assert differentiable_paths(spec, args, kwargs) == ["args[1]", "args[11].pred[0]", "kwargs.x12"]


def test_tests_import_their_helpers_by_package_name():
    """No test edits sys.path to find a helper: they live in tests/support/ (pytest's
    pythonpath puts the repository root on the path)."""
    root = Path(__file__).resolve().parent
    edits = [
        str(path.relative_to(root))
        for path in sorted(root.rglob("*.py"))
        if path.name != "test_support.py"
        and re.search(r"sys\.path\.(insert|append)\(", path.read_text())
    ]
    assert not edits, f"sys.path edited in {edits}: import from tests.support instead"


def _wait_for(predicate, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not (found := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.02)
    return found


@pytest.mark.skipif(sys.platform != "linux", reason="prctl and /proc are Linux's")
def test_an_orphan_a_test_leaves_is_the_suites_to_find_and_kill():
    """The conftest made pytest a subreaper, so a grandchild whose parent exited is still
    under the suite, where the session's sweep finds it (not lost to init)."""
    started = subprocess.run(
        ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True
    )
    orphan = int(started.stdout)
    try:
        assert orphan in reaper.descendants(os.getpid())
    finally:
        os.kill(orphan, signal.SIGKILL)
        os.waitpid(orphan, 0)


@pytest.mark.skipif(sys.platform != "linux", reason="/proc is Linux's")
def test_leftovers_that_ignore_sigterm_are_killed_with_their_whole_tree():
    parent = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 60 & sleep 60"])
    try:
        _wait_for(lambda: len(reaper.descendants(parent.pid)) == 2)
        killed = reaper.kill_leftovers(parent.pid, grace_s=0.3)
        assert sorted(cmd for cmd in killed.values()) == ["sleep 60", "sleep 60"]
        assert reaper.descendants(parent.pid) == {}
    finally:
        parent.kill()
        parent.wait()


@pytest.mark.skipif(sys.platform != "linux", reason="/proc is Linux's")
def test_multiprocessings_resource_tracker_is_left_to_exit_with_the_suite():
    tracker = f"{sys.executable} -c 'import time; time.sleep(60)' multiprocessing.resource_tracker"
    parent = subprocess.Popen(["sh", "-c", f"sleep 60 & {tracker} & wait"])
    try:
        _wait_for(lambda: len(reaper.descendants(parent.pid)) == 2)
        killed = reaper.kill_leftovers(parent.pid, grace_s=0.3)
        assert list(killed.values()) == ["sleep 60"]
        assert [c for c in reaper.descendants(parent.pid).values() if "resource_tracker" in c]
    finally:
        for pid in reaper.descendants(parent.pid):
            os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()
