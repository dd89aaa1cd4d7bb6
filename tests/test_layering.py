"""The package layout the house rules fix: ``lossd.client`` (wire package included) never
imports ``lossd.server``, so a trainer installs and loads the client without the server."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import lossd.client

_IMPORT_ALL = """
import importlib, pkgutil, sys
import lossd.client
for info in pkgutil.walk_packages(lossd.client.__path__, "lossd.client."):
    importlib.import_module(info.name)
print(sorted(m for m in sys.modules if m == "lossd.server" or m.startswith("lossd.server.")))
"""


def test_every_client_module_imports_without_the_server():
    names = [i.name for i in pkgutil.walk_packages(lossd.client.__path__, "lossd.client.")]
    assert "lossd.client.wire.codec" in names  # the walk reaches the shared wire package
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_client_source_names_the_server_package():
    root = Path(lossd.client.__path__[0])
    for path in root.rglob("*.py"):
        if "_proto" in path.parts:
            continue
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")):
                assert "lossd.server" not in stripped and not stripped.startswith(
                    "from ..server"
                ), f"{path}: {stripped}"
