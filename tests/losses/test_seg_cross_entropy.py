"""seg_cross_entropy (NetsPresso Trainer 1.4.1 SegCrossEntropyLoss): the golden case, torch
references for every parameter and legacy reduction, soft targets, images without labelled
pixels, gradients, the config build and bad structures."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from lossd.client import from_config
from lossd.server.errors import InvalidArgument
from tests.support.losskit import (
    assert_refused_then_served,
    call,
    gen,
    notes,
    value,
)

NAME = "seg_cross_entropy"


def _case(seed=0, batch=2, classes=3, small=(3, 4), big=(7, 9), dtype=torch.float64):
    g = gen(seed)
    pred = torch.randn(batch, classes, *small, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (batch, *big), generator=g)
    return pred, labels


def _reference(pred, labels, **kw):
    up = F.interpolate(pred, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(up, labels, **kw)


@pytest.mark.parametrize(
    ("params", "torch_kw"),
    [
        ({}, {}),
        ({"ignore_index": 1}, {"ignore_index": 1}),
        ({"label_smoothing": 0.2}, {"label_smoothing": 0.2}),
        (
            {"weight": [0.5, 2.0, 1.0]},
            {"weight": torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)},
        ),
        ({"reduce": False}, {"reduction": "none"}),
        ({"size_average": False}, {"reduction": "sum"}),
        ({"size_average": True, "reduce": True}, {"reduction": "mean"}),
        ({"size_average": False, "reduce": False}, {"reduction": "none"}),
    ],
    ids=[
        "default",
        "ignore_index",
        "label_smoothing",
        "weight",
        "reduce-none",
        "size_average-sum",
        "legacy-mean",
        "legacy-none",
    ],
)
def test_every_parameter_and_legacy_reduction_against_torch(params, torch_kw) -> None:
    pred, labels = _case(1)
    got = value(call(NAME, {"pred": pred}, {"target": labels}, **params))
    torch.testing.assert_close(got, _reference(pred, labels, **torch_kw), rtol=1e-12, atol=1e-12)
    if "reduce" in params and not params["reduce"]:
        assert got.shape == labels.shape


def test_resize_is_bilinear_without_corner_alignment() -> None:
    # A 1x2 map resized to 1x4: align_corners=False samples at 0.25-steps from the pixel centres.
    pred = torch.tensor([[[[0.0, 4.0]], [[0.0, 0.0]]]], dtype=torch.float64)
    labels = torch.zeros(1, 1, 4, dtype=torch.int64)
    up0 = torch.tensor([0.0, 1.0, 3.0, 4.0], dtype=torch.float64)  # class-0 logit per pixel
    expected = (torch.log1p(torch.exp(-up0))).mean()  # -log softmax(class 0), class-1 logit 0
    torch.testing.assert_close(
        value(call(NAME, {"pred": pred}, {"target": labels})), expected, rtol=1e-12, atol=1e-12
    )


def test_soft_targets_match_torch_and_get_gradients() -> None:
    pred, _ = _case(2)
    soft = torch.softmax(torch.randn(2, 3, 7, 9, generator=gen(3), dtype=torch.float64), 1)
    p, t = pred.clone().requires_grad_(True), soft.clone().requires_grad_(True)
    got = value(call(NAME, {"pred": p}, {"target": t}, label_smoothing=0.1))
    expected = _reference(pred, soft, label_smoothing=0.1)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-12, atol=1e-12)
    got.backward()
    assert t.grad is not None and t.grad.abs().sum() > 0


def test_multi_image_with_an_image_without_labelled_pixels() -> None:
    pred, labels = _case(4, batch=3)
    labels[1] = 255  # no labelled pixel in image 1
    labels[2, :3] = 255
    p = pred.clone().requires_grad_(True)
    got = value(call(NAME, {"pred": p}, {"target": labels}, ignore_index=255))
    counted = labels != 255
    up = F.interpolate(pred, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    per_pixel = -torch.log_softmax(up, 1).gather(1, labels.clamp(max=2).unsqueeze(1)).squeeze(1)
    expected = per_pixel[counted].sum() / counted.sum()
    torch.testing.assert_close(got.detach(), expected, rtol=1e-12, atol=1e-12)
    got.backward()
    assert not p.grad[1].any() and p.grad[0].any() and p.grad[2].any()


def test_no_labelled_pixel_at_all_is_nan_as_upstream_with_a_note() -> None:
    pred, labels = _case(5)
    out = call(NAME, {"pred": pred}, {"target": torch.full_like(labels, 255)}, ignore_index=255)
    assert math.isnan(float(value(out)))
    assert any("NaN" in n for n in notes(out))


def test_caller_data_is_left_alone() -> None:
    pred, labels = _case(6)
    before = pred.clone()
    out = {"pred": pred}
    call(NAME, out, {"target": labels})
    assert out["pred"] is pred and torch.equal(pred, before)


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft"])
def test_gradcheck_float64(soft: bool) -> None:
    pred, labels = _case(7, batch=2, classes=2, small=(2, 2), big=(3, 3))
    if soft:
        target = torch.softmax(torch.randn(2, 2, 3, 3, generator=gen(8), dtype=torch.float64), 1)
        inputs = (pred.requires_grad_(True), target.requires_grad_(True))
    else:
        inputs = (pred.requires_grad_(True),)

    def fn(p, t=labels):
        return value(call(NAME, {"pred": p}, {"target": t}, label_smoothing=0.1))

    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    ("out", "target", "field"),
    [
        ({}, {"target": torch.zeros(2, 7, 9, dtype=torch.int64)}, "out.pred"),
        (
            {"pred": torch.randn(2, 3, 4)},
            {"target": torch.zeros(2, 7, 9, dtype=torch.int64)},
            "out.pred",
        ),
        (
            {"pred": torch.randn(2, 3, 0, 4)},
            {"target": torch.zeros(2, 7, 9, dtype=torch.int64)},
            "out.pred",
        ),
        ({"pred": torch.randn(2, 3, 4, 5)}, {}, "target.target"),
        (
            {"pred": torch.randn(2, 3, 4, 5)},
            {"target": torch.zeros(3, 7, 9, dtype=torch.int64)},
            "target.target",
        ),
        ({"pred": torch.randn(2, 3, 4, 5)}, {"target": torch.zeros(2, 2, 7, 9)}, "target.target"),
        ({"pred": torch.randn(2, 3, 4, 5)}, {"target": torch.full((2, 7, 9), 3)}, "target.target"),
        ({"pred": torch.randn(2, 3, 4, 5)}, {"target": torch.full((2, 7, 9), -1)}, "target.target"),
    ],
    ids=[
        "no-pred",
        "pred-3d",
        "pred-empty",
        "no-target",
        "batch",
        "soft-channels",
        "label-C",
        "label-negative",
    ],
)
def test_bad_structures_name_the_field(out, target, field) -> None:
    with pytest.raises(InvalidArgument) as info:
        call(NAME, out, target)
    assert info.value.field == field


def test_bad_structure_through_the_rpc_and_the_server_keeps_serving(endpoint) -> None:
    pred, labels = _case(9, dtype=torch.float32)
    assert_refused_then_served(
        endpoint,
        NAME,
        {},
        ({"pred": pred}, {"target": labels + 3}),
        ({"pred": pred}, {"target": labels}),
        "args[1].target",
    )


def test_netspresso_yaml_entry_builds_it(endpoint) -> None:
    yaml = (
        "model:\n  losses:\n    - criterion: seg_cross_entropy\n      ignore_index: 255\n"
        "      label_smoothing: 0.1\n      weight: 2.0\n"
    )
    pred, labels = _case(10)
    labels[0, 0] = 255
    with from_config(yaml, endpoint=endpoint) as crit:
        got = crit({"pred": pred}, {"target": labels})
    expected = 2.0 * _reference(pred, labels, ignore_index=255, label_smoothing=0.1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["seg_cross_entropy", "cross_entropy"])
def test_soft_targets_with_an_ignore_index_are_refused_as_torch_refuses_them(name) -> None:
    # torch raises "ignore_index is not supported for floating point target" (RuntimeError).
    pred, _ = _case(11)
    soft = torch.softmax(torch.randn(2, 3, 7, 9, generator=gen(12), dtype=torch.float64), 1)
    if name == "cross_entropy":
        soft = soft[..., :3, :4]
    with pytest.raises(InvalidArgument) as info:
        call(name, {"pred": pred}, {"target": soft}, ignore_index=255)
    assert info.value.field == "params.ignore_index" and info.value.upstream == "RuntimeError"


@pytest.mark.parametrize(
    ("name", "args", "field"),
    [
        (
            "seg_cross_entropy",
            (
                {"pred": torch.randn(2, 3, 2, 2)},
                {"target": torch.zeros(2, 4, 4, dtype=torch.uint8)},
            ),
            "target.target",
        ),
        ("cross_entropy", (torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.uint8)), "target"),
        ("nll", (torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.uint8)), "target"),
    ],
    ids=["seg", "cross_entropy-1d", "nll-2d"],
)
def test_uint8_labels_with_spatial_dims_are_refused_as_torch_refuses_them(
    name, args, field
) -> None:
    # torch: "expected scalar type Long but found Byte" (RuntimeError) once there are spatial dims.
    with pytest.raises(InvalidArgument) as info:
        call(name, *args)
    assert info.value.field == field and info.value.upstream == "RuntimeError"
    flat = (
        call(name, torch.randn(4, 3), torch.zeros(4, dtype=torch.uint8))
        if name != "seg_cross_entropy"
        else None
    )
    assert flat is None or torch.isfinite(value(flat))
