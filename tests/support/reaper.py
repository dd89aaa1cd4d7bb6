"""No process the suite starts outlives it.

A child that hangs (a DDP worker whose peer is gone, a server a failed test never stopped)
keeps the suite's stdout open after pytest returns, so whoever reads that output, CI among
them, waits for it until its own limit. The suite makes itself the subreaper of everything it
starts (orphans re-parent to pytest, not init) and, when the session ends, kills what is left
and names it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from pathlib import Path

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants this process's children (Linux only; False elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def descendants(root: int) -> dict[int, str]:
    """Every live process under ``root``, pid to command line, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after it.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        try:
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        found[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
        todo.extend(children.get(pid, []))
    return found


# multiprocessing's resource tracker lives until the process that started it exits (it reads
# a pipe to EOF), so it is not a leftover; killing it early only makes multiprocessing warn.
_EXITS_WITH_THE_SUITE = ("multiprocessing.resource_tracker",)


def kill_leftovers(root: int, grace_s: float = 3.0) -> dict[int, str]:
    """SIGTERM, then after ``grace_s`` SIGKILL, every descendant of ``root`` but those that exit
    with it; returns what it killed."""
    leftovers = {
        pid: cmd
        for pid, cmd in descendants(root).items()
        if not any(name in cmd for name in _EXITS_WITH_THE_SUITE)
    }
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = leftovers.keys() & descendants(root).keys()  # one /proc scan a step
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive &= descendants(root).keys()
    for pid in leftovers:  # only these: another child's Popen still expects to reap its own
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    return leftovers
