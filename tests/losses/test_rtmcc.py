"""rtmcc_loss (NetsPresso Trainer 1.4.1 RTMCCLoss): the golden case, a per-keypoint loop
reference, the raw-visibility weight, ignored parameters, images without visible keypoints,
gradients, the config build and bad structures."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from lossd.client import from_config
from lossd.server.errors import InvalidArgument
from lossd.server.losses.rtmcc import _make_example
from tests.support.losskit import assert_refused_then_served, call, gen, notes, value

NAME = "rtmcc_loss"


def _case(seed=0, n=2, k=3, dtype=torch.float64):
    g = gen(seed)
    pred = 0.5 * torch.randn(n, k, 1024, generator=g, dtype=torch.float64)
    xy = torch.rand(n, k, 2, generator=g, dtype=torch.float64) * 200 + 20
    vis = torch.ones(n, k, 1, dtype=torch.float64)
    return pred.to(dtype), torch.cat([xy, vis], -1).to(dtype)


def _reference(pred: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
    """One keypoint at a time, from the formulas: float32 gaussian labels at round(2 * xy)."""
    n_img, k_pts, _ = pred.shape
    total = torch.zeros((), dtype=torch.float64)
    bins = torch.arange(512, dtype=torch.float32)
    for n in range(n_img):
        for k in range(k_pts):
            x, y, vis = (float(v) for v in keypoints[n, k, :3])
            weight = vis
            labels = [torch.zeros(512), torch.zeros(512)]
            if vis >= 0.5:
                cx, cy = round(2 * x), round(2 * y)  # python rounds half to even, as torch
                if cx - 16.98 >= 512 or cy - 16.98 >= 512 or cx + 17.98 < 0 or cy + 17.98 < 0:
                    weight = 0.0
                else:
                    labels = [torch.exp(-((bins - c) ** 2) / (2 * 5.66**2)) for c in (cx, cy)]
            for axis in range(2):
                logits = pred[n, k, 512 * axis : 512 * (axis + 1)].double() * 10
                log_p = logits - torch.logsumexp(logits, 0)
                q = torch.softmax(labels[axis].double() * 10, 0)
                kl = torch.where(q > 0, q * (q.log() - log_p), torch.zeros_like(q)).mean()
                total = total + kl * weight
    return total / k_pts


def test_matches_the_per_keypoint_reference_with_ragged_visibility() -> None:
    (out, target), _, _ = _make_example(torch.float64)
    got = value(call(NAME, out, target))
    torch.testing.assert_close(
        got, _reference(out["pred"], target["keypoints"]), rtol=1e-6, atol=1e-9
    )


def test_the_weight_is_the_raw_visibility() -> None:
    pred, kp = _case(1, n=1, k=2)
    base = value(call(NAME, {"pred": pred}, {"keypoints": kp}))
    only_first = kp.clone()
    only_first[0, 1, 2] = 0.0
    first = value(call(NAME, {"pred": pred}, {"keypoints": only_first}))
    doubled = kp.clone()
    doubled[0, 0, 2] = 2.0  # COCO "visible"
    torch.testing.assert_close(
        value(call(NAME, {"pred": pred}, {"keypoints": doubled})), base + first
    )
    # visibility 0.3 < 0.5: unlabelled (a zero, i.e. uniform, label) yet still weighted 0.3
    low = kp.clone()
    low[0, 1, 2] = 0.3
    got = value(call(NAME, {"pred": pred}, {"keypoints": low}))
    torch.testing.assert_close(got, _reference(pred, low), rtol=1e-6, atol=1e-9)
    assert got > first


def test_a_labelled_keypoint_outside_the_bins_weighs_nothing() -> None:
    pred, kp = _case(2, n=1, k=2)
    outside = kp.clone()
    outside[0, 1, :2] = torch.tensor([300.0, -20.0])  # x bin 600 - 17 > 512
    dropped = kp.clone()
    dropped[0, 1, 2] = 0.0
    assert torch.equal(
        value(call(NAME, {"pred": pred}, {"keypoints": outside})),
        value(call(NAME, {"pred": pred}, {"keypoints": dropped})),
    )


def test_an_image_without_visible_keypoints_gets_no_gradient_and_the_batch_is_summed() -> None:
    pred, kp = _case(3, n=3)
    kp[1, :, 2] = 0.0
    p = pred.clone().requires_grad_(True)
    got = value(call(NAME, {"pred": p}, {"keypoints": kp}))
    got.backward()
    assert not p.grad[1].any() and p.grad[0].any() and p.grad[2].any()
    twice = value(call(NAME, {"pred": torch.cat([pred, pred])}, {"keypoints": torch.cat([kp, kp])}))
    torch.testing.assert_close(twice, 2 * got.detach())  # a sum over images, / K only


def test_constructor_parameters_are_ignored_as_upstream_with_a_note() -> None:
    pred, kp = _case(4)
    base = value(call(NAME, {"pred": pred}, {"keypoints": kp}))
    out = call(
        NAME, {"pred": pred}, {"keypoints": kp}, beta=1.0, use_target_weight=False, sigma=[2, 2]
    )
    assert torch.equal(value(out), base)
    assert len(notes(out)) == 3 and all("ignored" in n for n in notes(out))
    assert not notes(call(NAME, {"pred": pred}, {"keypoints": kp}, beta=10, input_size=[256, 256]))


def test_dtypes_promote_with_the_float32_labels() -> None:
    pred, kp = _case(5)
    assert (
        value(call(NAME, {"pred": pred.float()}, {"keypoints": kp.float()})).dtype == torch.float32
    )
    assert value(call(NAME, {"pred": pred.float()}, {"keypoints": kp})).dtype == torch.float64


def test_no_keypoints_is_nan_as_upstream() -> None:
    out = call(NAME, {"pred": torch.zeros(2, 0, 1024)}, {"keypoints": torch.zeros(2, 0, 3)})
    assert math.isnan(float(value(out))) and any("K = 0" in n for n in notes(out))


def test_caller_data_is_left_alone() -> None:
    pred, kp = _case(6)
    before = kp.clone()
    call(NAME, {"pred": pred}, {"keypoints": kp})
    assert torch.equal(kp, before)


def test_gradcheck_pred_and_keypoints() -> None:
    pred, kp = _case(7, n=1, k=2)
    kp[0, 1, 2] = 2.0
    # x, y are rounded (zero gradient away from the half-bin steps); visibility is the weight.
    assert gradcheck(
        lambda p, t: value(call(NAME, {"pred": p}, {"keypoints": t})),
        (pred.requires_grad_(True), kp.requires_grad_(True)),
        eps=1e-6,
        atol=1e-8,
        fast_mode=True,  # 2,054 inputs: random projections instead of one column each
    )


@pytest.mark.parametrize(
    ("out", "target", "field"),
    [
        ({}, {"keypoints": torch.zeros(2, 3, 3)}, "out.pred"),
        ({"pred": torch.zeros(2, 3, 512)}, {"keypoints": torch.zeros(2, 3, 3)}, "out.pred"),
        ({"pred": torch.zeros(2, 1024)}, {"keypoints": torch.zeros(2, 3, 3)}, "out.pred"),
        ({"pred": torch.zeros(2, 3, 1024)}, {}, "target.keypoints"),
        (
            {"pred": torch.zeros(2, 3, 1024)},
            {"keypoints": torch.zeros(2, 4, 3)},
            "target.keypoints",
        ),
        (
            {"pred": torch.zeros(2, 3, 1024)},
            {"keypoints": torch.zeros(2, 3, 2)},
            "target.keypoints",
        ),
        (
            {"pred": torch.zeros(2, 3, 1024)},
            {"keypoints": torch.zeros(2, 3, 3, dtype=torch.int64)},
            "target.keypoints",
        ),
    ],
    ids=["no-pred", "bins", "pred-2d", "no-keypoints", "K", "no-visibility", "int-keypoints"],
)
def test_bad_structures_name_the_field(out, target, field) -> None:
    with pytest.raises(InvalidArgument) as info:
        call(NAME, out, target)
    assert info.value.field == field


def test_bad_structure_through_the_rpc_and_the_server_keeps_serving(endpoint) -> None:
    pred, kp = _case(8, dtype=torch.float32)
    assert_refused_then_served(
        endpoint,
        NAME,
        {},
        ({"pred": pred[..., :1000]}, {"keypoints": kp}),
        ({"pred": pred}, {"keypoints": kp}),
        "args[0].pred",
    )


def test_netspresso_yaml_entry_builds_it_and_its_ignored_keys(endpoint) -> None:
    yaml = "model:\n  losses:\n    - criterion: rtmcc_loss\n      beta: 10.0\n      weight: 1.0\n"
    pred, kp = _case(9)
    with from_config(yaml, endpoint=endpoint) as crit:
        got = crit({"pred": pred}, {"keypoints": kp})
    torch.testing.assert_close(
        got, value(call(NAME, {"pred": pred}, {"keypoints": kp})), rtol=1e-12, atol=0
    )
