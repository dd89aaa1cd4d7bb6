"""The test helpers themselves (tests/support/), where a mistake would hide others."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import torch

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
