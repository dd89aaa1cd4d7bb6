"""visdet GaussianFocalLoss and DiceLoss: golden cases, hand references for every parameter and
reduction, CenterNet's tensor avg_factor, DiceLoss's forward order, gradients, the
``dict(type=...)`` build and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from lossd.client import RemoteLoss, from_config
from lossd.server.errors import InvalidArgument
from lossd.server.losses.visdet.dense import _gaussian_heatmap
from tests.support.losskit import assert_refused_then_served, call, gen, notes, value

EPS32 = torch.finfo(torch.float32).eps


def _reduce(per_element: list[float], reduction: str, avg_factor=None, weight=None) -> object:
    if weight is not None:
        per_element = [v * w for v, w in zip(per_element, weight)]
    if avg_factor is not None:
        return sum(per_element) / (avg_factor + EPS32) if reduction == "mean" else per_element
    if reduction == "mean":
        return sum(per_element) / len(per_element)
    return sum(per_element) if reduction == "sum" else per_element


# ------------------------------------------------------------------------------ GaussianFocalLoss


def _heat_case(seed=0, dtype=torch.float64):
    target = _gaussian_heatmap(2, 2, 5, [(0, 0, 1, 2), (0, 1, 3, 3), (1, 0, 0, 0)], dtype)
    pred = torch.rand(2, 2, 5, 5, generator=gen(seed), dtype=torch.float64) * 0.9 + 0.05
    return pred.to(dtype), target


def _gfl_reference(pred, target, alpha=2.0, gamma=4.0) -> list[float]:
    out = []
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
        pos = -math.log(p + 1e-12) * (1 - p) ** alpha * (1.0 if t == 1 else 0.0)
        neg = -math.log(1 - p + 1e-12) * p**alpha * (1 - t) ** gamma
        out.append(pos + neg)
    return out


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(
    "params",
    [{}, {"alpha": 1.5, "gamma": 3.0}, {"loss_weight": 0.5}],
    ids=["default", "alpha-gamma", "loss_weight"],
)
def test_gaussian_focal_every_parameter_and_reduction(params, reduction) -> None:
    pred, target = _heat_case(1)
    got = value(call("GaussianFocalLoss", pred, target, reduction=reduction, **params))
    ref = _gfl_reference(pred, target, params.get("alpha", 2.0), params.get("gamma", 4.0))
    expected = torch.tensor(_reduce(ref, reduction), dtype=torch.float64)
    expected = params.get("loss_weight", 1.0) * expected
    torch.testing.assert_close(got, expected.reshape(got.shape), rtol=1e-12, atol=1e-14)


def test_gaussian_focal_weight_avg_factor_and_override() -> None:
    pred, target = _heat_case(2)
    weight = torch.rand(pred.shape, generator=gen(3), dtype=torch.float64)
    ref = _gfl_reference(pred, target)
    got = value(call("GaussianFocalLoss", pred, target, weight, 4.0, "mean", reduction="sum"))
    expected = _reduce(ref, "mean", avg_factor=4.0, weight=weight.flatten().tolist())
    torch.testing.assert_close(got.item(), expected, rtol=1e-12, atol=0)
    summed = value(call("GaussianFocalLoss", pred, target, weight, None, "sum"))
    torch.testing.assert_close(summed.item(), _reduce(ref, "sum", weight=weight.flatten().tolist()))


def test_a_0d_tensor_avg_factor_keeps_upstreams_float32_eps() -> None:
    """CenterNet passes max(1, target.eq(1).sum()): int64 + eps is float32 upstream, so the eps
    rounds away; a Python number would divide by 3 + 1.19e-7."""
    pred, target = _heat_case(4)
    loss = torch.tensor(_gfl_reference(pred, target), dtype=torch.float64).reshape(pred.shape)
    as_tensor = value(call("GaussianFocalLoss", pred, target, None, torch.tensor(3)))
    assert torch.equal(as_tensor, loss.sum() / (torch.tensor(3) + EPS32))
    assert (torch.tensor(3) + EPS32).dtype == torch.float32
    as_number = value(call("GaussianFocalLoss", pred, target, None, 3))
    assert not torch.equal(as_tensor, as_number)
    torch.testing.assert_close(as_number, loss.sum() / (3 + EPS32), rtol=1e-15, atol=0)


def test_a_0d_tensor_avg_factor_travels_as_a_tensor(endpoint) -> None:
    pred, target = _heat_case(5)
    with RemoteLoss("GaussianFocalLoss", endpoint=endpoint) as crit:
        got = crit(pred, target, avg_factor=torch.tensor(3))
    assert torch.equal(got, value(call("GaussianFocalLoss", pred, target, None, torch.tensor(3))))


def test_gaussian_focal_image_without_object_and_notes() -> None:
    pred, target = _heat_case(6)
    got = value(call("GaussianFocalLoss", pred, target, reduction="none"))
    assert got.shape == pred.shape and (got[1, 1] > 0).all()  # negatives only there
    out = call("GaussianFocalLoss", pred * 2, target)
    assert any("outside [0, 1]" in n for n in notes(out))
    with pytest.raises(InvalidArgument) as info:
        call("GaussianFocalLoss", pred, target, None, 2.0, reduction="sum")
    assert info.value.field == "avg_factor"


def test_gaussian_focal_gradcheck_pred_and_target() -> None:
    pred, target = _heat_case(7)
    pred, target = pred[:1, :1, :3, :3].clone(), target[:1, :1, :3, :3].clone()
    target[0, 0, 1, 1] = 1.0

    def fn(p, t):
        return value(call("GaussianFocalLoss", p, t, None, torch.tensor(2)))

    assert gradcheck(fn, (pred.requires_grad_(True), target.requires_grad_(True)), eps=1e-7)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((torch.rand(2, 3), torch.rand(2, 4)), "target"),
        ((torch.rand(2, 3), torch.rand(2, 3), torch.rand(4)), "weight"),
        ((torch.rand(2, 3), torch.rand(2, 3), None, torch.tensor([1.0, 2.0])), "avg_factor"),
        ((torch.zeros(2, 3, dtype=torch.int64), torch.rand(2, 3)), "pred"),
    ],
    ids=["target-shape", "weight-shape", "avg_factor-vector", "pred-int"],
)
def test_gaussian_focal_bad_inputs_name_the_field(args, field) -> None:
    with pytest.raises(InvalidArgument) as info:
        call("GaussianFocalLoss", *args)
    assert info.value.field == field


def test_gaussian_focal_config_and_bad_call_through_the_rpc(endpoint) -> None:
    pred, target = _heat_case(8)
    with from_config(
        dict(type="GaussianFocalLoss", alpha=2.0, gamma=4.0, loss_weight=1.0), endpoint=endpoint
    ) as crit:
        got = crit(pred, target)
    expected = torch.tensor(_reduce(_gfl_reference(pred, target), "mean"), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert_refused_then_served(
        endpoint, "GaussianFocalLoss", {}, (pred, target[:, :1, :2]), (pred, target), "args[1]"
    )


# ------------------------------------------------------------------------------ DiceLoss


def _dice_case(seed=0, n=3, dtype=torch.float64):
    g = gen(seed)
    pred = torch.randn(n, 4, 5, generator=g, dtype=torch.float64).to(dtype)
    target = (torch.rand(n, 4, 5, generator=g) > 0.5).to(dtype)
    return pred, target


def _dice_reference(pred, target, activate=True, naive=False, eps=1e-3) -> list[float]:
    out = []
    for p_row, t_row in zip(pred.flatten(1).tolist(), target.flatten(1).float().tolist()):
        p_row = [1 / (1 + math.exp(-x)) for x in p_row] if activate else p_row
        a = sum(p * t for p, t in zip(p_row, t_row))
        if naive:
            d = (2 * a + eps) / (sum(p_row) + sum(t_row) + eps)
        else:
            # sum(t^2) + eps is a float32 tensor op upstream (the target was cast to float32)
            c = float(torch.tensor(sum(t * t for t in t_row), dtype=torch.float32) + eps)
            d = 2 * a / ((sum(p * p for p in p_row) + eps) + c)
        out.append(1 - d)
    return out


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(
    "params",
    [
        {},
        {"naive_dice": True},
        {"eps": 0.5},
        {"naive_dice": True, "eps": 1.0},
        {"activate": False},
        {"activate": False, "use_sigmoid": False},
        {"loss_weight": 3.0},
    ],
    ids=[
        "default",
        "naive",
        "eps",
        "naive-eps",
        "no-activate",
        "no-sigmoid-no-activate",
        "loss_weight",
    ],
)
def test_dice_every_parameter_and_reduction(params, reduction) -> None:
    pred, target = _dice_case(1)
    if params.get("activate") is False:
        pred = pred.sigmoid() * 0.8
    got = value(call("DiceLoss", pred, target, reduction=reduction, **params))
    ref = _dice_reference(
        pred,
        target,
        params.get("activate", True),
        params.get("naive_dice", False),
        params.get("eps", 1e-3),
    )
    expected = params.get("loss_weight", 1.0) * torch.tensor(
        _reduce(ref, reduction), dtype=torch.float64
    )
    torch.testing.assert_close(got, expected.reshape(got.shape), rtol=1e-12, atol=1e-14)


def test_dice_forward_order_is_weight_reduction_override_avg_factor(endpoint) -> None:
    pred, target = _dice_case(2)
    weight = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    ref = _dice_reference(pred, target)
    with RemoteLoss("DiceLoss", endpoint=endpoint) as crit:
        summed = crit(pred, target, weight, "sum")
        averaged = crit(pred, target, weight, "mean", 2.0)
    torch.testing.assert_close(
        summed.item(), _reduce(ref, "sum", weight=weight.tolist()), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        averaged.item(),
        _reduce(ref, "mean", avg_factor=2.0, weight=weight.tolist()),
        rtol=1e-12,
        atol=0,
    )


def test_dice_target_is_cast_to_float32_and_any_mask_dtype_works() -> None:
    pred, target = _dice_case(3)
    soft = target * 0.3  # not exact in float32
    got = value(call("DiceLoss", pred, soft))
    assert torch.equal(got, value(call("DiceLoss", pred, soft.float())))
    exact = torch.tensor(_reduce(_dice_reference(pred, soft.float()), "mean"), dtype=torch.float64)
    torch.testing.assert_close(got, exact, rtol=1e-7, atol=0)  # float32 target sums
    assert got.dtype == torch.float64
    base = value(call("DiceLoss", pred, target))
    for dtype in (torch.bool, torch.uint8, torch.int64, torch.float32):
        assert torch.equal(value(call("DiceLoss", pred, target.to(dtype))), base)


def test_dice_empty_mask_and_empty_batch() -> None:
    pred, target = _dice_case(4)
    target[1] = 0
    per_mask = value(call("DiceLoss", pred, target, reduction="none"))
    torch.testing.assert_close(
        per_mask, torch.tensor(_dice_reference(pred, target), dtype=torch.float64)
    )
    out = call("DiceLoss", pred[:0], target[:0])
    assert math.isnan(float(value(out))) and notes(out)


def test_dice_gradcheck_pred() -> None:
    # The target goes through upstream's float32 cast, so it is not float64-clean: pred only.
    pred, target = _dice_case(5, n=2)
    for naive in (False, True):

        def fn(p, naive=naive):
            return value(
                call(
                    "DiceLoss",
                    p,
                    target,
                    torch.tensor([1.0, 0.5], dtype=torch.float64),
                    naive_dice=naive,
                )
            )

        assert gradcheck(fn, (pred.clone().requires_grad_(True),), eps=1e-6, atol=1e-8)


def test_dice_target_gets_a_gradient_like_upstream() -> None:
    pred, target = _dice_case(6)
    t = target.clone().requires_grad_(True)
    value(call("DiceLoss", pred, t)).backward()
    assert t.grad is not None and t.grad.dtype == torch.float64 and t.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("args", "params", "field"),
    [
        ((torch.randn(3, 4), torch.ones(3, 5)), {}, "target"),
        ((torch.randn(3), torch.ones(3)), {}, "pred"),
        ((torch.randn(3, 4), torch.ones(3, 4), torch.ones(3, 1)), {}, "weight"),
        ((torch.randn(3, 4), torch.ones(3, 4), torch.ones(2)), {}, "weight"),
        ((torch.randn(3, 4), torch.ones(3, 4)), {"use_sigmoid": False}, "params.use_sigmoid"),
        ((torch.randn(3, 4), torch.ones(3, 4), None, "sum", 2.0), {}, "avg_factor"),
        ((torch.randn(3, 4), torch.ones(3, 4), None, "max"), {}, "reduction_override"),
    ],
    ids=[
        "target-shape",
        "pred-1d",
        "weight-2d",
        "weight-length",
        "no-sigmoid",
        "avg-sum",
        "override",
    ],
)
def test_dice_bad_inputs_name_the_field(args, params, field) -> None:
    with pytest.raises(InvalidArgument) as info:
        call("DiceLoss", *args, **params)
    assert info.value.field == field


def test_dice_config_and_bad_call_through_the_rpc(endpoint) -> None:
    pred, target = _dice_case(7)
    cfg = dict(
        type="DiceLoss", use_sigmoid=True, activate=True, naive_dice=True, eps=1.0, loss_weight=2.0
    )
    with from_config(cfg, endpoint=endpoint) as crit:
        got = crit(pred, target)
    expected = 2.0 * torch.tensor(
        _reduce(_dice_reference(pred, target, naive=True, eps=1.0), "mean"), dtype=torch.float64
    )
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-12, atol=0)
    assert_refused_then_served(
        endpoint,
        "DiceLoss",
        {},
        (pred, target, torch.ones(2, dtype=torch.float64)),
        (pred, target),
        "args[2]",
    )
