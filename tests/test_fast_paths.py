"""The shortcuts taken on the per-call hot path give the same answers as the plain checks."""

from __future__ import annotations

import pytest
import torch

from lossd.server.engine import _non_finite
from lossd.server.errors import InvalidArgument
from lossd.server.losses._checks import check_class_indices


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_non_finite_matches_isfinite(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max
    cases = [
        torch.zeros(5, dtype=dtype),
        torch.full(
            (1000,), big, dtype=dtype
        ),  # finite, but its sum overflows in float64 for float64 only
        torch.tensor([1.0, float("nan")], dtype=dtype),
        torch.tensor([1.0, float("inf")], dtype=dtype),
        torch.tensor([float("-inf"), float("inf")], dtype=dtype),
        torch.tensor([big, -big, big], dtype=dtype),
        torch.empty(0, dtype=dtype),
    ]
    for t in cases:
        assert _non_finite(t) == (t.numel() > 0 and not bool(torch.isfinite(t).all())), t
    assert not _non_finite(torch.tensor([1, 2, 3]))  # integers are always finite


def test_class_index_check_fast_path_keeps_every_refusal() -> None:
    check_class_indices(torch.tensor([0, 4, 2]), 5, "t")
    check_class_indices(torch.tensor([0, 5]), 5, "t", allow_background=True)
    check_class_indices(torch.tensor([-100, 4]), 5, "t", ignore_index=-100)
    for target, kwargs in [
        (torch.tensor([0, 5]), {}),
        (torch.tensor([-1, 2]), {}),
        (torch.tensor([-100, 5]), {"ignore_index": -100}),
        (torch.tensor([0, 6]), {"allow_background": True}),
    ]:
        with pytest.raises(InvalidArgument, match="class indices"):
            check_class_indices(target, 5, "t", **kwargs)
