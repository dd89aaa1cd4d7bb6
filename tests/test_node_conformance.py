"""The Node.js conformance client (tests/conformance/node/) against a real server.

It is written from proto/ alone, as a user of another language would write it, and checks
health, reflection, the registry RPCs, Compute in four float formats, a nested NetsPresso call,
a ComputeChunked call of 8M elements, reduction='none' VJPs, error codes with BadRequest details
and an audit round trip. .ci/run installs it with `npm ci`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.serverproc import ServerProcess

NODE_DIR = Path(__file__).resolve().parent / "conformance" / "node"


def test_the_node_client_conforms(tmp_path: Path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed; the Node.js conformance client cannot run")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip(f"run `npm ci` in {NODE_DIR} first (.ci/run does)")
    flags = ("--audit", "runs", "--audit-db", str(tmp_path / "audit.sqlite3"))
    with ServerProcess(*flags, "--data-dir", str(tmp_path)) as server:
        result = subprocess.run(
            [node, "--test", "--test-reporter=spec", "conformance.test.mjs"],
            cwd=NODE_DIR,
            env={**os.environ, "LOSSD_ENDPOINT": server.address},
            capture_output=True,
            text=True,
            timeout=600,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    passed = re.search(r"\bpass (\d+)", output)
    assert passed and int(passed.group(1)) >= 13, output[-3000:]  # every check ran
    assert re.search(r"\bfail 0\b", output), output[-3000:]
