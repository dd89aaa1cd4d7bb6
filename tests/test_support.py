"""The test helpers themselves (tests/support/), where a mistake would hide others."""

from __future__ import annotations

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
