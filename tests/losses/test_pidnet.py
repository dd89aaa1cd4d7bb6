"""pidnet_loss (NetsPresso Trainer 1.4.1 PIDNetLoss): golden values, hand-computed terms,
upstream edge cases (NaN when nothing passes the 0.8 boundary threshold, eval-mode extra_p=None,
all-zero bd_gt, ignored weight), validation and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import lossd.server.losses  # noqa: F401  (registers the specs)
from lossd.server import registry
from lossd.server.errors import InvalidArgument
from lossd.server.losses.pidnet import pidnet_loss
from tests.support.losskit import GOLDEN_TOL, call, run_example

LOGIT_08 = math.log(4.0)  # sigmoid(log 4) == 0.8


def _softplus(x: float) -> float:
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def _ref_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean over non-ignored pixels of -log softmax at the label, by hand."""
    logp = logits - logits.exp().sum(1, keepdim=True).log()
    keep = labels != ignore_index
    picked = logp.gather(1, labels.clamp(min=0).unsqueeze(1) * keep.unsqueeze(1)).squeeze(1)
    return -(picked * keep).sum() / keep.sum()


def _ref_wbce(logits: torch.Tensor, bd_gt: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE from the formula; ratios rounded to float32 like upstream."""
    x, t = logits.flatten(), bd_gt.flatten().to(logits.dtype)
    pos, neg = int((t == 1).sum()), int((t == 0).sum())
    w_pos = float(
        torch.tensor(neg, dtype=torch.float32) / torch.tensor(pos + neg, dtype=torch.float32)
    )
    w_neg = float(
        torch.tensor(pos, dtype=torch.float32) / torch.tensor(pos + neg, dtype=torch.float32)
    )
    w = torch.where(t == 1, w_pos, torch.where(t == 0, w_neg, 0.0)).to(x.dtype)
    elem = torch.clamp(x, min=0) - x * t + torch.log1p(torch.exp(-x.abs()))
    return (w * elem).mean()


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _reference(out: dict, target: dict, ignore_index: int) -> torch.Tensor:
    labels, bd_gt = target["target"], target["bd_gt"]
    size = labels.shape[-2:]
    pred, extra_p, extra_d = (_resize(out[k], size) for k in ("pred", "extra_p", "extra_d"))
    bd_label = labels.clone()
    bd_label[torch.sigmoid(extra_d[:, 0]) <= 0.8] = ignore_index
    return (
        0.4 * _ref_ce(extra_p, labels, ignore_index)
        + _ref_ce(pred, labels, ignore_index)
        + 20 * _ref_wbce(extra_d, bd_gt)
        + _ref_ce(pred, bd_label, ignore_index)
    )


def _case(
    seed: int = 0,
    *,
    batch: int = 2,
    classes: int = 3,
    low: int = 4,
    size: int = 8,
    dtype: torch.dtype = torch.float64,
    d_shift: float = 1.5,
) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    out = {
        "pred": torch.randn(batch, classes, low, low, generator=gen, dtype=dtype),
        "extra_p": torch.randn(batch, classes, low, low + 1, generator=gen, dtype=dtype),
        "extra_d": torch.randn(batch, 1, low + 1, low, generator=gen, dtype=dtype) + d_shift,
    }
    labels = torch.randint(0, classes, (batch, size, size), generator=gen)
    bd_gt = (torch.rand(batch, size, size, generator=gen) < 0.3).to(dtype)
    return out, {"target": labels, "bd_gt": bd_gt}


# ---------------------------------------------------------------------------------------------
# Known values.


def test_hand_computed_uniform_logits() -> None:
    # Zero logits: every CE is log 2; extra_d = 10 passes 0.8 everywhere; bd_gt has 1 positive
    # and 3 negatives, so weights are 3/4 (positive) and 1/4 (negatives).
    out = {
        "pred": torch.zeros(1, 2, 2, 2, dtype=torch.float64),
        "extra_p": torch.zeros(1, 2, 2, 2, dtype=torch.float64),
        "extra_d": torch.full((1, 1, 2, 2), 10.0, dtype=torch.float64),
    }
    target = {
        "target": torch.tensor([[[0, 1], [1, 0]]]),
        "bd_gt": torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64),
    }
    r = pidnet_loss(out, target)
    bce = (0.75 * _softplus(-10.0) + 3 * 0.25 * _softplus(10.0)) / 4
    expected = 0.4 * math.log(2) + math.log(2) + 20 * bce + math.log(2)
    assert r.value.item() == pytest.approx(expected, rel=1e-12)
    assert r.components["extra_p_ce"].item() == pytest.approx(math.log(2), rel=1e-12)
    assert r.components["pred_ce"].item() == pytest.approx(math.log(2), rel=1e-12)
    assert r.components["boundary_bce"].item() == pytest.approx(bce, rel=1e-12)
    assert r.components["boundary_ce"].item() == pytest.approx(math.log(2), rel=1e-12)
    assert r.notes == []


@pytest.mark.parametrize("ignore_index", [-100, 255, 0])
def test_matches_reference_with_resize_and_ignore(ignore_index: int) -> None:
    out, target = _case(1)
    target["target"][0, :3, :] = ignore_index
    r = pidnet_loss(out, target, ignore_index=ignore_index)
    torch.testing.assert_close(
        r.value, _reference(out, target, ignore_index), rtol=1e-10, atol=1e-12
    )


def test_resize_is_bilinear_align_corners_true() -> None:
    out, target = _case(2)
    r = pidnet_loss(out, target)
    # The same maps resized with align_corners=False give a different number.
    other = {
        k: F.interpolate(v, size=(8, 8), mode="bilinear", align_corners=False)
        for k, v in out.items()
    }
    assert not torch.allclose(r.value, pidnet_loss(other, target).value)
    same = {k: _resize(v, (8, 8)) for k, v in out.items()}
    torch.testing.assert_close(r.value, pidnet_loss(same, target).value, rtol=1e-12, atol=1e-12)


def test_components_add_up_to_total() -> None:
    out, target = _case(3)
    r = pidnet_loss(out, target)
    c = r.components
    total = 0.4 * c["extra_p_ce"] + c["pred_ce"] + 20 * c["boundary_bce"] + c["boundary_ce"]
    torch.testing.assert_close(total, r.value.detach(), rtol=1e-12, atol=1e-12)
    assert set(c) == {"extra_p_ce", "pred_ce", "boundary_bce", "boundary_ce"}
    assert all(not v.requires_grad for v in c.values())


def test_an_image_without_labelled_or_boundary_pixels_beside_a_labelled_one() -> None:
    """Segmentation's "image with no boxes": image 0 is all ignore_index and has no boundary;
    the batch mean runs over image 1's pixels only, and image 0's main head gets no gradient."""
    out, target = _case(4)
    target["target"][0] = 255
    target["bd_gt"][0] = 0
    pred = out["pred"].clone().requires_grad_(True)
    r = pidnet_loss({**out, "pred": pred}, target, ignore_index=255)
    torch.testing.assert_close(r.value, _reference(out, target, 255), rtol=1e-10, atol=1e-12)
    c = r.components
    total = 0.4 * c["extra_p_ce"] + c["pred_ce"] + 20 * c["boundary_bce"] + c["boundary_ce"]
    torch.testing.assert_close(total, r.value.detach(), rtol=1e-12, atol=1e-12)
    r.value.backward()
    assert not pred.grad[0].any() and pred.grad[1].abs().sum() > 0


def test_boundary_threshold_is_strict_08() -> None:
    # Same-size maps (no interpolation effect): pixels at logit 2 (sigmoid .88) count, pixels at
    # logit 1 (sigmoid .73) and at exactly logit(0.8) do not.
    gen = torch.Generator().manual_seed(4)
    pred = torch.randn(1, 3, 2, 2, generator=gen, dtype=torch.float64)
    extra_d = torch.tensor([[[[2.0, 1.0], [LOGIT_08 - 1e-9, 2.0]]]], dtype=torch.float64)
    labels = torch.tensor([[[0, 1], [2, 1]]])
    out = {"pred": pred, "extra_p": pred.clone(), "extra_d": extra_d}
    r = pidnet_loss(out, {"target": labels, "bd_gt": torch.zeros(1, 2, 2, dtype=torch.float64)})
    logp = torch.log_softmax(pred, 1)[0]
    expected = -(logp[0, 0, 0] + logp[1, 1, 1]) / 2
    torch.testing.assert_close(r.components["boundary_ce"], expected, rtol=1e-12, atol=1e-12)


def test_weighted_bce_uses_float32_ratios() -> None:
    # 1 positive out of 3 pixels: weights 2/3 and 1/3 rounded to float32 (upstream's int * 1.0).
    x = torch.tensor([[[[0.3, -1.2, 2.0]]]], dtype=torch.float64)
    out = {
        "pred": torch.zeros(1, 2, 1, 3, dtype=torch.float64),
        "extra_p": torch.zeros(1, 2, 1, 3, dtype=torch.float64),
        "extra_d": x,
    }
    bd_gt = torch.tensor([[[1.0, 0.0, 0.0]]], dtype=torch.float64)
    r = pidnet_loss(out, {"target": torch.zeros(1, 1, 3, dtype=torch.int64), "bd_gt": bd_gt})
    w32 = [
        float(torch.tensor(2.0, dtype=torch.float32) / 3),
        float(torch.tensor(1.0, dtype=torch.float32) / 3),
    ]
    exact = (w32[0] * _softplus(-0.3) + w32[1] * (_softplus(-1.2) + _softplus(2.0))) / 3
    assert r.components["boundary_bce"].item() == pytest.approx(exact, rel=1e-14)
    float64_ratios = (2 / 3 * _softplus(-0.3) + 1 / 3 * (_softplus(-1.2) + _softplus(2.0))) / 3
    assert r.components["boundary_bce"].item() != pytest.approx(float64_ratios, rel=1e-12)


def test_bd_gt_all_zero_gives_zero_bce() -> None:
    out, target = _case(5)
    target["bd_gt"] = torch.zeros_like(target["bd_gt"])
    r = pidnet_loss(out, target)
    assert r.components["boundary_bce"].item() == 0.0
    c = r.components
    torch.testing.assert_close(
        r.value.detach(), 0.4 * c["extra_p_ce"] + c["pred_ce"] + c["boundary_ce"]
    )


def test_bd_gt_values_other_than_0_1_get_zero_weight() -> None:
    out, target = _case(6)
    bd = target["bd_gt"].clone()
    bd[0, 0, :] = 0.5
    target2 = {"target": target["target"], "bd_gt": bd}
    r = pidnet_loss(out, target2)
    torch.testing.assert_close(
        r.components["boundary_bce"],
        _ref_wbce(_resize(out["extra_d"], (8, 8)), bd),
        rtol=1e-12,
        atol=1e-14,
    )


# ---------------------------------------------------------------------------------------------
# Upstream edge cases.


def test_nan_when_no_pixel_passes_threshold() -> None:
    out, target = _case(7, d_shift=-20.0)
    for v in out.values():
        v.requires_grad_(True)
    r = pidnet_loss(out, target)
    assert torch.isnan(r.value)
    assert torch.isnan(r.components["boundary_ce"])
    assert torch.isfinite(r.components["pred_ce"])
    assert len(r.notes) == 1 and "NaN" in r.notes[0] and "0.8" in r.notes[0]
    r.value.backward()
    # torch's mean CE over zero pixels backpropagates zeros, so upstream's grads stay finite.
    assert all(torch.isfinite(v.grad).all() for v in out.values())


def test_nan_when_all_labels_ignored() -> None:
    out, target = _case(8)
    target["target"] = torch.full_like(target["target"], 255)
    r = pidnet_loss(out, target, ignore_index=255)
    assert torch.isnan(r.value)
    assert torch.isnan(r.components["pred_ce"]) and torch.isnan(r.components["extra_p_ce"])
    assert len(r.notes) == 1 and "ignore_index" in r.notes[0]


def test_extra_p_none_returns_connected_zero() -> None:
    pred = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    # Nothing else is read upstream: no extra_d, and the target may be anything.
    r = pidnet_loss({"pred": pred, "extra_p": None}, {})
    assert r.value.item() == 0.0
    assert any("extra_p is None" in n for n in r.notes)
    r.value.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_weight_is_accepted_and_ignored() -> None:
    out, target = _case(9)
    plain = pidnet_loss(out, target)
    weighted = pidnet_loss(out, target, weight=[1.0, 5.0, 0.1])
    assert torch.equal(plain.value, weighted.value)
    assert plain.notes == [] and any("weight" in n and "ignored" in n for n in weighted.notes)


def test_caller_out_is_not_modified() -> None:
    out, target = _case(10)
    before = {k: (v, v.shape, v.clone()) for k, v in out.items()}
    pidnet_loss(out, target)
    for k, (obj, shape, values) in before.items():
        assert out[k] is obj and out[k].shape == shape and torch.equal(out[k], values)


def test_float32_matches_float64_reference() -> None:
    out, target = _case(11, dtype=torch.float32)
    r = pidnet_loss(out, target)
    assert r.value.dtype == torch.float32
    out64 = {k: v.double() for k, v in out.items()}
    target64 = {"target": target["target"], "bd_gt": target["bd_gt"].double()}
    torch.testing.assert_close(
        r.value.double(), _reference(out64, target64, -100), **GOLDEN_TOL["float32"]
    )


# ---------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize("bad", [3, -1, 7])
def test_out_of_range_label(bad: int) -> None:
    out, target = _case(12)
    target["target"][1, 2, 2] = bad
    with pytest.raises(InvalidArgument, match="class indices") as err:
        pidnet_loss(out, target)
    assert err.value.field == "target.target"


def test_ignore_index_label_is_not_out_of_range() -> None:
    out, target = _case(13)
    target["target"][0, 0, 0] = 255
    assert torch.isfinite(pidnet_loss(out, target, ignore_index=255).value)
    with pytest.raises(InvalidArgument):
        pidnet_loss(out, target)  # 255 is out of range with the default ignore_index


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda o, t: o.__setitem__("extra_d", o["extra_d"].repeat(1, 2, 1, 1)), "out.extra_d"),
        (lambda o, t: o.__setitem__("extra_p", o["extra_p"][:1]), "out.extra_p"),
        (lambda o, t: t.__setitem__("target", t["target"].int()), "target.target"),
        (lambda o, t: t.__setitem__("target", t["target"][:1]), "target.target"),
        (lambda o, t: t.__setitem__("bd_gt", t["bd_gt"][:, :4]), "target.bd_gt"),
        (lambda o, t: t.__setitem__("bd_gt", t["bd_gt"].long()), "target.bd_gt"),
        (lambda o, t: o.pop("extra_d"), "out.extra_d"),
        (lambda o, t: o.__setitem__("pred", o["pred"][0]), "out.pred"),
    ],
)
def test_invalid_layout(mutate, field: str) -> None:
    out, target = _case(14)
    mutate(out, target)
    with pytest.raises(InvalidArgument) as err:
        call("pidnet_loss", out, target)  # the declaration, then the loss, as the engine does
    assert err.value.field == field


# ---------------------------------------------------------------------------------------------
# Gradients and registration.


@pytest.mark.parametrize("which", ["pred", "extra_p", "extra_d"])
def test_gradcheck(which: str) -> None:
    out, target = _case(15, batch=1, classes=2, low=3, size=5)
    # Keep the boundary threshold decision away from the finite-difference steps.
    d = torch.sigmoid(_resize(out["extra_d"], (5, 5)))
    assert ((d - 0.8).abs() > 1e-3).all() and (d > 0.8).any()

    def fn(x: torch.Tensor) -> torch.Tensor:
        return pidnet_loss({**out, which: x}, target).value

    assert gradcheck(fn, (out[which].clone().requires_grad_(True),), eps=1e-6, atol=1e-7)


def test_spec_registered_and_example_runs() -> None:
    spec = registry.get("pidnet_loss")
    assert spec.fn is pidnet_loss and spec.families == ("netspresso",)
    assert spec.param("ignore_index").default == -100 and spec.param("weight").default is None
    for dtype in (torch.float32, torch.float64):
        assert run_example(spec, dtype).value > 0
