"""The per-call CPU's "before", measured in the same run: lossd as it was before issue 14's work.

Issue 14 item 4 asks lossd's own CPU per small call halved, each side. Figures recorded on one
machine cannot show that on another: the same code's CPU per call moves by 1.5-2.6 x between the
2-core boxes this project runs on. So ``bench --cpu`` serves and calls lossd at ``BEFORE`` beside
today's, on the same inputs, block for block in the same rounds:

- its ``client/`` and ``server/`` come from ``git archive`` into the run's work directory and are
  imported as ``lossd`` through a shim directory put first on ``PYTHONPATH``;
- its server is a child ``lossd serve`` run from there;
- its client is a child process too (two versions of ``lossd.client`` cannot share one
  interpreter), which this module drives a block at a time over stdin and stdout.

``python -m bench.before`` is that child; it is not run by hand.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from .servers import ROOT

BEFORE = "901838b"  # main before issue 14's work (bench/RESULTS.md, "Per-call CPU", **Before**)
WARM_UP_CALLS = 20


class BeforeUnavailable(RuntimeError):
    """The tree at ``BEFORE`` could not be made (no git, or a clone without that commit)."""


def checkout(workdir: Path, commit: str = BEFORE) -> Path:
    """Extract ``commit``'s lossd under ``workdir``; returns the directory to put on PYTHONPATH."""
    dest = workdir / f"lossd-{commit}"
    shim = dest / "shim"
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "client", "server", "proto"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        reason = archive.stderr.decode(errors="replace").strip()
        raise BeforeUnavailable(f"git archive {commit}: {reason}")
    untar = subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=False)
    if untar.returncode != 0:
        raise BeforeUnavailable(f"tar -x of {commit}'s archive into {dest} failed")
    (shim / "lossd").mkdir(parents=True, exist_ok=True)
    for part in ("client", "server"):
        link = shim / "lossd" / part
        if not link.exists():
            link.symlink_to(dest / part)
    return shim


def environment(shim: Path) -> dict[str, str]:
    """The environment that makes ``lossd`` resolve to the tree under ``shim``."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{shim}{os.pathsep}{path}" if path else str(shim)}


class BeforeClient:
    """``RemoteLoss`` at ``BEFORE`` in a child process, calling ``endpoint`` with case ``index``
    of ``bench.cpu.cases()``; ``block()`` runs ``calls`` forward + backward calls there and
    returns the child's CPU ms per call (every thread of it, as the parent counts its own)."""

    def __init__(self, shim: Path, endpoint: str, index: int, calls: int) -> None:
        self.calls = calls
        argv = [sys.executable, "-m", "bench.before", endpoint, str(index), str(calls)]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, **environment(shim)},
        )
        ready = self.proc.stdout.readline().split()
        if ready[:1] != ["ready"] or not Path(ready[1]).is_relative_to(shim.parent):
            self.close()
            raise BeforeUnavailable(f"the {BEFORE} client did not start: {ready}")

    def block(self) -> float:
        self.proc.stdin.write("block\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _serve_blocks(endpoint: str, index: int, calls: int) -> None:
    import lossd.client

    from .cpu import cases, remote_call

    remote, module = remote_call(cases()[index], endpoint)
    for _ in range(WARM_UP_CALLS):
        remote()
    print("ready", Path(lossd.client.__file__).resolve(), flush=True)
    for _ in sys.stdin:
        start = time.process_time()
        for _ in range(calls):
            remote()
        print(1e3 * (time.process_time() - start) / calls, flush=True)
    module.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.before")
    parser.add_argument("endpoint")
    parser.add_argument("index", type=int)
    parser.add_argument("calls", type=int)
    args = parser.parse_args()
    _serve_blocks(args.endpoint, args.index, args.calls)


if __name__ == "__main__":
    main()
