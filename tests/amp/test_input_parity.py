"""Inputs torch accepts, lossd accepts (and computes as torch does); inputs torch refuses, lossd
refuses, with torch's exception class. Both rules live in the declarations: an Input's
``promote_with`` and a Param's ``same_dtype``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lossd.client import LossdError, RemoteLoss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32, torch.uint8], ids=str)
@pytest.mark.parametrize(
    ("name", "fn"), [("mse", F.mse_loss), ("l1", F.l1_loss), ("smooth_l1", F.smooth_l1_loss)]
)
def test_integer_targets_are_promoted_as_torch_promotes_them(
    name, fn, dtype, target_dtype, endpoint
):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(5, 3, generator=g) * 3).to(dtype)
    t = torch.randint(0, 4, (5, 3), generator=g).to(target_dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with RemoteLoss(name, endpoint=endpoint) as crit:
        remote = crit(xa, t)
    local = fn(xb, t)
    assert remote.dtype == local.dtype
    assert torch.equal(remote.detach(), local.detach())
    remote.backward()
    local.backward()
    assert torch.equal(xa.grad, xb.grad)


@pytest.mark.parametrize("name", ["bce_with_logits", "bce", "kl_div"])
def test_an_integer_target_is_refused_where_torch_refuses_it(name, endpoint):
    x, t = torch.rand(4, 3).clamp(0.1, 0.9), torch.randint(0, 2, (4, 3))
    torch_fn = {
        "bce_with_logits": F.binary_cross_entropy_with_logits,
        "bce": F.binary_cross_entropy,
        "kl_div": F.kl_div,
    }[name]
    with pytest.raises(RuntimeError):
        torch_fn(x, t)
    with RemoteLoss(name, endpoint=endpoint) as crit, pytest.raises(LossdError) as info:
        crit(x, t)
    assert info.value.field == "args[1]"


@pytest.mark.parametrize("n", [4, 0], ids=["batch", "empty"])
@pytest.mark.parametrize(("name", "fn"), [("nll", F.nll_loss), ("cross_entropy", F.cross_entropy)])
def test_a_class_weight_of_another_dtype_is_refused_as_torch_refuses_it(name, fn, n, endpoint):
    x, t = torch.randn(n, 3).log_softmax(-1), torch.randint(0, 3, (n,))
    weight = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="expected scalar type"):
        fn(x, t, weight=weight)
    with (
        RemoteLoss(name, endpoint=endpoint, weight=weight) as crit,
        pytest.raises(RuntimeError) as info,  # LossdRuntimeError: torch's class
    ):
        crit(x, t)
    assert isinstance(info.value, LossdError) and info.value.field == "params.weight"
    assert "upstream returns NaN" not in info.value.details
    # The same weight in the input's dtype, or as a list of numbers, is accepted.
    with RemoteLoss(name, endpoint=endpoint, weight=weight.float()) as crit:
        assert (
            torch.equal(
                crit(x, t),
                fn(x, t, weight=weight.float()),
            )
            or n == 0
        )
    with RemoteLoss(name, endpoint=endpoint, weight=[1.0, 2.0, 0.5]) as crit:
        crit(x, t)
