"""yolox_loss (NetsPresso Trainer 1.4.1 YOLOXLoss): golden values, hand-built SimOTA cases whose
assignment is known by construction (multi-image, multi-level, ragged GT with an empty image,
dynamic k, conflicts), upstream edge cases (no GT, GT padding rule, no candidate anchor),
validation and gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.autograd import gradcheck

import lossd.server.losses  # noqa: F401  (registers the specs)
from lossd.server import registry
from lossd.server.errors import InvalidArgument
from lossd.server.losses.yolox import yolox_loss
from lossd.server.registry import LossOutput
from tests.support.losskit import call, run_example

NUM_CLASSES = 3
TINY = -5.0  # tw = th = -5: boxes of width stride * e^-5, IoU ~1e-5 with any GT


# ---------------------------------------------------------------------------------------------
# Hand-built cases. Every anchor predicts a tiny box except a few "designated" anchors that
# predict a box close to one GT; with IoU costs of ~0.5 against >= 33 for tiny boxes and every
# dynamic k equal to int(sum of IoUs), the assignment is known by construction.


def _softplus(x: float) -> float:
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def _iou(a: tuple, b: tuple, eps: float = 0.0) -> float:
    """IoU of two cxcywh boxes with python floats."""
    iw = max(0.0, min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2))
    ih = max(0.0, min(a[1] + a[3] / 2, b[1] + b[3] / 2) - max(a[1] - a[3] / 2, b[1] - b[3] / 2))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter + eps)


def _levels(
    batch: int, sizes: tuple[int, ...], seed: int, logit_scale: float = 0.5
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    levels = []
    for n in sizes:
        level = torch.zeros(batch, 5 + NUM_CLASSES, n, n, dtype=torch.float64)
        level[:, 2:4] = TINY
        level[:, 4:] = logit_scale * torch.randn(
            batch, 1 + NUM_CLASSES, n, n, generator=gen, dtype=torch.float64
        )
        levels.append(level)
    return levels


def _designate(levels, img_size, image, level, row, col, box_cxcywh) -> None:
    """Make one anchor predict ``box_cxcywh`` (absolute)."""
    stride = img_size // levels[level].shape[-1]
    cx, cy, w, h = box_cxcywh
    levels[level][image, 0, row, col] = cx / stride - col
    levels[level][image, 1, row, col] = cy / stride - row
    levels[level][image, 2, row, col] = math.log(w / stride)
    levels[level][image, 3, row, col] = math.log(h / stride)


def _xyxy(cx, cy, w, h) -> list[float]:
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def _image(*gts: tuple[tuple, int]) -> dict:
    """One image's ground truth from (cx, cy, w, h) boxes and their labels; none: no boxes."""
    boxes = torch.tensor([_xyxy(*box) for box, _ in gts], dtype=torch.float64).reshape(-1, 4)
    return {"boxes": boxes, "labels": torch.tensor([label for _, label in gts], dtype=torch.int64)}


def _expected(levels, img_size, fg: list[tuple], use_l1: bool = True) -> dict[str, float]:
    """Loss terms from the formulas, given the matched anchors.

    ``fg`` holds ``(image, level, row, col, gt_cxcywh, label)`` per matched anchor.
    """
    num_fg = max(len(fg), 1)
    obj = sum(_softplus(x) for lv in levels for x in lv[:, 4].flatten().tolist())
    iou_sum = cls = l1 = 0.0
    for image, level, row, col, gt, label in fg:
        raw = levels[level][image, :, row, col].tolist()
        s = img_size // levels[level].shape[-1]
        pred = ((raw[0] + col) * s, (raw[1] + row) * s, math.exp(raw[2]) * s, math.exp(raw[3]) * s)
        iou_sum += 1 - _iou(pred, gt, eps=1e-7) ** 2
        obj -= raw[4]
        soft = _iou(pred, gt)
        for c in range(NUM_CLASSES):
            cls += _softplus(raw[5 + c]) - raw[5 + c] * (soft if c == label else 0.0)
        l1_target = (
            gt[0] / s - col,
            gt[1] / s - row,
            math.log(gt[2] / s + 1e-8),
            math.log(gt[3] / s + 1e-8),
        )
        l1 += sum(abs(r - t) for r, t in zip(raw[:4], l1_target, strict=True))
    terms = {
        "iou": iou_sum / num_fg,
        "obj": obj / num_fg,
        "cls": cls / num_fg,
        "l1": l1 / num_fg if use_l1 else 0.0,
    }
    terms["total"] = 5 * terms["iou"] + terms["obj"] + terms["cls"] + terms["l1"]
    return terms


GT_A = (12.0, 12.0, 16.0, 12.0)  # image 0, label 1
GT_B = (48.0, 48.0, 24.0, 16.0)  # image 2, label 0
GT_C = (10.0, 50.0, 16.0, 20.0)  # image 2, label 2


def _three_images() -> tuple[list[torch.Tensor], dict, list[tuple]]:
    """img 64, levels 8x8 (stride 8) and 4x4 (stride 16); GT counts 1, 0, 2."""
    img = 64
    levels = _levels(3, (8, 4), seed=11)
    _designate(levels, img, 0, 0, 1, 1, (12.8, 11.6, 15.0, 13.0))  # IoU ~0.84 with A
    _designate(levels, img, 2, 1, 2, 2, (49.6, 47.2, 22.0, 17.0))  # IoU ~0.80 with B
    _designate(levels, img, 2, 0, 6, 1, (9.6, 50.4, 17.0, 19.0))  # IoU ~0.90 with C
    target = {
        "gt": [
            _image((GT_A, 1)),
            _image(),
            _image((GT_B, 0), (GT_C, 2)),
        ],
        "img_size": img,
        "num_classes": NUM_CLASSES,
    }
    fg = [(0, 0, 1, 1, GT_A, 1), (2, 1, 2, 2, GT_B, 0), (2, 0, 6, 1, GT_C, 2)]
    return levels, target, fg


def _assert_terms(result: LossOutput, expected: dict[str, float]) -> None:
    assert result.value.item() == pytest.approx(expected["total"], rel=1e-10)
    for name in ("iou", "obj", "cls", "l1"):
        assert result.components[name].item() == pytest.approx(
            expected[name], rel=1e-10, abs=1e-12
        ), name


# ---------------------------------------------------------------------------------------------
# Known values.


def test_multi_image_multi_level_ragged_gt() -> None:
    levels, target, fg = _three_images()
    result = yolox_loss({"pred": levels}, target, l1_activate_epoch=1)
    _assert_terms(result, _expected(levels, 64, fg))
    assert result.notes == []


@pytest.mark.parametrize(
    ("cur_epoch", "activate", "use_l1"),
    [(None, 5, True), (0, 1, False), (1, 1, True), (4, 5, False), (7, 5, True)],
)
def test_l1_switch(cur_epoch, activate, use_l1) -> None:
    levels, target, fg = _three_images()
    result = yolox_loss({"pred": levels}, target, l1_activate_epoch=activate, cur_epoch=cur_epoch)
    expected = _expected(levels, 64, fg, use_l1=use_l1)
    _assert_terms(result, expected)
    assert (result.components["l1"].item() > 0) == use_l1


def test_components_add_up_to_total() -> None:
    levels, target, _ = _three_images()
    r = yolox_loss({"pred": levels}, target, l1_activate_epoch=0)
    c = r.components
    torch.testing.assert_close(
        5 * c["iou"] + c["obj"] + c["cls"] + c["l1"], r.value, rtol=1e-12, atol=1e-12
    )
    assert set(c) == {"iou", "obj", "cls", "l1"} and not any(v.requires_grad for v in c.values())


def test_dynamic_k_takes_the_cheapest_candidates() -> None:
    # Three anchors predict the GT's centre with widths 0.95, 0.9 and 0.85 of it (IoU = ratio):
    # k = int(2.7 + tiny) = 2, so the two best fits are matched, the third is background.
    img = 32
    levels = _levels(1, (4,), seed=3, logit_scale=0.0)  # equal class scores: only IoU cost differs
    gt = GT_A
    for col, ratio in ((0, 0.95), (1, 0.9), (2, 0.85)):
        _designate(levels, img, 0, 0, 1, col, (gt[0], gt[1], gt[2] * ratio, gt[3]))
    target = {
        "gt": [
            {"boxes": torch.tensor([_xyxy(*gt)], dtype=torch.float64), "labels": torch.tensor([2])}
        ],
        "img_size": img,
        "num_classes": NUM_CLASSES,
    }
    result = yolox_loss({"pred": levels}, target, l1_activate_epoch=0)
    _assert_terms(result, _expected(levels, img, [(0, 0, 1, 0, gt, 2), (0, 0, 1, 1, gt, 2)]))


def test_anchor_claimed_twice_keeps_cheapest_gt() -> None:
    # Two GTs on the same box with labels 0 and 1 both pick the designated anchor; the anchor is
    # confident in class 0, so the label-0 GT keeps it and the label-1 GT ends with no anchor.
    img = 32
    levels = _levels(1, (4,), seed=5)
    _designate(levels, img, 0, 0, 1, 1, (12.8, 11.6, 15.0, 13.0))
    levels[0][0, 5:, 1, 1] = torch.tensor([3.0, -3.0, -3.0], dtype=torch.float64)
    box = _xyxy(*GT_A)

    def run(labels: list[int]) -> LossOutput:
        gt = {
            "boxes": torch.tensor([box] * len(labels), dtype=torch.float64),
            "labels": torch.tensor(labels),
        }
        return yolox_loss(
            {"pred": levels},
            {"gt": [gt], "img_size": img, "num_classes": NUM_CLASSES},
            l1_activate_epoch=0,
        )

    expected = _expected(levels, img, [(0, 0, 1, 1, GT_A, 0)])
    _assert_terms(run([1, 0]), expected)
    _assert_terms(run([0, 1]), expected)
    assert run([1]).value.item() != pytest.approx(expected["total"], rel=1e-6)


def test_float32_close_to_float64() -> None:
    levels, target, fg = _three_images()
    levels32 = [lv.float() for lv in levels]
    target32 = {
        **target,
        "gt": [{"boxes": g["boxes"].float(), "labels": g["labels"]} for g in target["gt"]],
    }
    r = yolox_loss({"pred": levels32}, target32, l1_activate_epoch=0)
    assert r.value.dtype == torch.float32
    assert r.value.item() == pytest.approx(_expected(levels, 64, fg)["total"], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Upstream edge cases.


def test_no_gt_in_batch_is_objectness_only() -> None:
    levels = [lv.requires_grad_(True) for lv in _levels(2, (4, 2), seed=7)]
    empty = {
        "boxes": torch.zeros(0, 4, dtype=torch.float64),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    r = yolox_loss(
        {"pred": levels},
        {"gt": [empty, copy.deepcopy(empty)], "img_size": 32, "num_classes": NUM_CLASSES},
        l1_activate_epoch=0,
    )
    expected = sum(
        _softplus(x) for lv in levels for x in lv[:, 4].flatten().tolist()
    )  # / max(0, 1)
    assert r.value.item() == pytest.approx(expected, rel=1e-12)
    assert all(r.components[k].item() == 0.0 for k in ("iou", "cls", "l1"))
    r.value.backward()
    for lv in levels:
        assert torch.equal(lv.grad[:, :4], torch.zeros_like(lv.grad[:, :4]))
        assert torch.equal(lv.grad[:, 5:], torch.zeros_like(lv.grad[:, 5:]))
        torch.testing.assert_close(lv.grad[:, 4], torch.sigmoid(lv[:, 4]).detach())


def test_gt_padding_rule_counts_rows_with_positive_sum() -> None:
    # Upstream counts the rows whose label + cx + cy + w + h > 0 and keeps that many *first*
    # rows. A label-0 all-zero box after the real GT is dropped; before it, it displaces it.
    levels, target, _ = _three_images()
    zero = [0.0, 0.0, 0.0, 0.0]

    def with_rows(boxes, labels):
        t = copy.deepcopy(target)
        t["gt"][0] = {
            "boxes": torch.tensor(boxes, dtype=torch.float64),
            "labels": torch.tensor(labels),
        }
        return yolox_loss({"pred": levels}, t, l1_activate_epoch=0)

    real = with_rows([_xyxy(*GT_A)], [1])
    after = with_rows([_xyxy(*GT_A), zero], [1, 0])
    before = with_rows([zero, _xyxy(*GT_A)], [0, 1])
    assert torch.equal(after.value, real.value)
    assert not torch.allclose(before.value, real.value)
    assert any("target.gt[0]" in n and "1 of 2 rows" in n for n in after.notes)
    assert any("target.gt[0]" in n and "1 of 2 rows" in n for n in before.notes)
    # A box left of / above the image with label 0 has cx + cy + w + h <= 0: dropped as well.
    negative = with_rows([_xyxy(*GT_A), [-10.0, -10.0, -4.0, -4.0]], [1, 0])
    assert torch.equal(negative.value, real.value)


def test_caller_target_is_not_modified_and_calls_repeat() -> None:
    levels, target, _ = _three_images()
    boxes = [g["boxes"] for g in target["gt"]]
    copies = [b.clone() for b in boxes]
    first = yolox_loss({"pred": levels}, target, l1_activate_epoch=0)
    second = yolox_loss({"pred": levels}, target, l1_activate_epoch=0)  # upstream: "Invalid box"
    assert torch.equal(first.value, second.value)
    for g, b, c in zip(target["gt"], boxes, copies, strict=True):
        assert g["boxes"] is b and torch.equal(b, c)


def test_gt_without_any_candidate_raises() -> None:
    levels, target, _ = _three_images()
    target["gt"][1] = {
        "boxes": torch.tensor([[200.0, 200.0, 220.0, 230.0]], dtype=torch.float64),
        "labels": torch.tensor([0]),
    }
    with pytest.raises(InvalidArgument, match="candidate") as err:
        yolox_loss({"pred": levels}, target, l1_activate_epoch=0)
    assert err.value.field == "target.gt[1].boxes[0]"


def test_gt_without_own_candidate_next_to_others_is_kept_with_note() -> None:
    # Upstream only crashes when the whole image has no candidate; otherwise the stray GT gets
    # the cheapest candidate of the other GTs (cost >= 1e6). A note names it.
    levels, target, _ = _three_images()
    target["gt"][0] = {
        "boxes": torch.tensor([_xyxy(*GT_A), [200.0, 200.0, 220.0, 230.0]], dtype=torch.float64),
        "labels": torch.tensor([1, 0]),
    }
    r = yolox_loss({"pred": levels}, target, l1_activate_epoch=0)
    assert torch.isfinite(r.value)
    assert any("target.gt[0].boxes[1]" in n for n in r.notes)


# ---------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize("bad", [NUM_CLASSES, -1])
def test_out_of_range_label(bad: int) -> None:
    levels, target, _ = _three_images()
    target["gt"][2]["labels"] = torch.tensor([0, bad])
    with pytest.raises(InvalidArgument, match="class indices") as err:
        yolox_loss({"pred": levels}, target, l1_activate_epoch=0)
    assert err.value.field == "target.gt[2].labels"


def test_batch_mismatch() -> None:
    levels, target, _ = _three_images()
    target["gt"] = target["gt"][:2]
    with pytest.raises(InvalidArgument, match=r"B=3 entries \(as in out.pred\[0\]") as err:
        call("yolox_loss", {"pred": levels}, target, l1_activate_epoch=0)
    assert err.value.field == "target.gt"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda o, t: o["pred"].__setitem__(1, o["pred"][1][:, :-1]), "out.pred[1]"),
        (lambda o, t: o["pred"].__setitem__(1, o["pred"][1][:2]), "out.pred[1]"),
        (lambda o, t: o.__setitem__("pred", o["pred"][0]), "out.pred"),
        (lambda o, t: o.__setitem__("pred", []), "out.pred"),
        (
            lambda o, t: t["gt"][0].__setitem__(
                "boxes", torch.tensor([[20.0, 6.0, 4.0, 18.0]], dtype=torch.float64)
            ),
            "target.gt[0].boxes[0]",
        ),
        (
            lambda o, t: t["gt"][0].__setitem__("boxes", torch.zeros(2, 4, dtype=torch.float64)),
            "target.gt[0].boxes",
        ),
        (lambda o, t: t["gt"][0].__setitem__("labels", torch.tensor([1.0])), "target.gt[0].labels"),
        (lambda o, t: t.pop("num_classes"), "target.num_classes"),
        (lambda o, t: t.__setitem__("img_size", 64.0), "target.img_size"),
    ],
)
def test_invalid_layout(mutate, field: str) -> None:
    levels, target, _ = _three_images()
    out = {"pred": list(levels)}
    mutate(out, target)
    with pytest.raises(InvalidArgument) as err:
        call("yolox_loss", out, target, l1_activate_epoch=0)  # declaration first, as the engine
    assert err.value.field == field


# ---------------------------------------------------------------------------------------------
# Gradients and registration.


@pytest.mark.parametrize("level", [0, 1])
def test_gradcheck(level: int) -> None:
    # Small and well separated: finite-difference steps cannot change the assignment.
    img = 32
    levels = _levels(2, (4, 2), seed=13)
    _designate(levels, img, 0, 0, 1, 1, (12.8, 11.6, 15.0, 13.0))
    # The class target (IoU) is detached upstream, so the loss's true derivative through that
    # target is not part of the gradient; a zero logit for the matched class makes that term's
    # derivative vanish, so finite differences and autograd agree.
    levels[0][0, 5 + 1, 1, 1] = 0.0
    target = {
        "gt": [
            _image((GT_A, 1)),
            _image(),
        ],
        "img_size": img,
        "num_classes": NUM_CLASSES,
    }
    fg = [(0, 0, 1, 1, GT_A, 1)]
    _assert_terms(
        yolox_loss({"pred": levels}, target, l1_activate_epoch=0), _expected(levels, img, fg)
    )

    def fn(x: torch.Tensor) -> torch.Tensor:
        pred = list(levels)
        pred[level] = x
        return yolox_loss({"pred": pred}, target, l1_activate_epoch=0).value

    assert gradcheck(
        fn, (levels[level].clone().requires_grad_(True),), eps=1e-6, atol=1e-7, fast_mode=True
    )


def test_spec_registered_and_example_runs() -> None:
    spec = registry.get("yolox_loss")
    assert spec.fn is yolox_loss and spec.families == ("netspresso",)
    assert spec.param("l1_activate_epoch").required and spec.param("cur_epoch").default is None
    with pytest.raises(InvalidArgument, match="l1_activate_epoch"):
        spec.canonical_params({})
    for dtype in (torch.float32, torch.float64):
        c = run_example(spec, dtype).components
        assert c["iou"] > 0 and c["l1"] > 0  # the example has matched anchors and L1 on
    # The example is built so that generic gradchecks of it agree with autograd.
    args, kwargs, params = spec.make_example(torch.float64)
    leaves = [lv.clone().requires_grad_(True) for lv in args[0]["pred"]]

    def fn(*pred: torch.Tensor) -> torch.Tensor:
        return yolox_loss({"pred": list(pred)}, args[1], **params).value

    assert gradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=True)
