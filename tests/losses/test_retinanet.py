"""retinanet_loss (NetsPresso Trainer 1.4.1 RetinaNetLoss): golden values, hand recomputation,
matching edge cases (low-quality ties), validation and gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import lossd.server.losses  # noqa: F401  (registers the specs)
from lossd.server import registry
from lossd.server.errors import InvalidArgument
from lossd.server.losses.retinanet import match_anchors, retinanet_loss
from tests.support.losskit import call

# ---------------------------------------------------------------------------------------------
# An independent re-derivation: python-float IoU, loop matching, focal from log-sigmoids.


def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _reference_matches(boxes: list[list[float]], anchors: list[list[float]]) -> list[int]:
    if not boxes:
        return [-1] * len(anchors)
    iou = [[_iou(g, a) for a in anchors] for g in boxes]
    best = []
    for j in range(len(anchors)):
        column = [iou[g][j] for g in range(len(boxes))]
        best.append(column.index(max(column)))  # first GT on ties
    matches = []
    for j, g in enumerate(best):
        v = iou[g][j]
        matches.append(g if v >= 0.5 else (-2 if v >= 0.4 else -1))
    for g in range(len(boxes)):
        top = max(iou[g])
        for j in range(len(anchors)):
            if iou[g][j] == top:
                matches[j] = best[j]
    return matches


def _reference_loss(out: dict, target: dict) -> tuple[torch.Tensor, torch.Tensor]:
    anchors = out["anchors"]
    cls_all = torch.cat(out["cls_logits"], dim=1)
    box_all = torch.cat(out["bbox_regression"], dim=1)
    batch = len(target["gt"])
    cls_total = box_total = 0.0
    for b, gt in enumerate(target["gt"]):
        matches = _reference_matches(gt["boxes"].tolist(), anchors.tolist())
        fg = [j for j, m in enumerate(matches) if m >= 0]
        valid = [j for j, m in enumerate(matches) if m != -2]
        labels = gt["labels"].tolist()
        x = cls_all[b]
        t = torch.zeros_like(x)
        for j in fg:
            t[j, labels[matches[j]]] = 1.0
        x, t = x[valid], t[valid]
        ce = -(t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x))
        p = torch.sigmoid(x)
        p_t = t * p + (1 - t) * (1 - p)
        focal = (0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2
        cls_total = cls_total + focal.sum() / max(1, len(fg))
        l1 = 0.0
        for j in fg:
            a, g = anchors[j], gt["boxes"][matches[j]]
            aw, ah, gw, gh = a[2] - a[0], a[3] - a[1], g[2] - g[0], g[3] - g[1]
            enc = torch.stack(
                (
                    ((g[0] + g[2]) / 2 - (a[0] + a[2]) / 2) / aw,
                    ((g[1] + g[3]) / 2 - (a[1] + a[3]) / 2) / ah,
                    torch.log(gw / aw),
                    torch.log(gh / ah),
                )
            )
            l1 = l1 + (box_all[b, j] - enc).abs().sum()
        box_total = box_total + l1 / max(1, len(fg))
    return cls_total / batch, box_total / batch


def _anchors(image_size: int = 64, strides=(16, 32), ratios=(0.5, 1.0, 2.0)) -> list[torch.Tensor]:
    levels = []
    for s in strides:
        n = image_size // s
        rows = []
        for y in range(n):
            for x in range(n):
                cx, cy = (x + 0.5) * s, (y + 0.5) * s
                for r in ratios:
                    w, h = 4 * s / math.sqrt(r), 4 * s * math.sqrt(r)
                    rows.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        levels.append(torch.tensor(rows, dtype=torch.float64))
    return levels


def _case(dtype=torch.float64, seed=0, num_classes=4, ratios=(0.5, 1.0, 2.0), strides=(16, 32)):
    """Three images, two levels, ragged GT with an empty image and a small box."""
    gen = torch.Generator().manual_seed(seed)
    levels = _anchors(strides=strides, ratios=ratios)
    batch = 3
    out = {
        "anchors": torch.cat(levels).to(dtype),
        "cls_logits": [
            torch.randn(batch, lv.shape[0], num_classes, generator=gen, dtype=torch.float64).to(
                dtype
            )
            for lv in levels
        ],
        "bbox_regression": [
            (0.3 * torch.randn(batch, lv.shape[0], 4, generator=gen, dtype=torch.float64)).to(dtype)
            for lv in levels
        ],
    }
    gt = [
        {
            "boxes": torch.tensor([[2.0, 4.0, 40.0, 30.0], [30.0, 20.0, 62.0, 60.0]], dtype=dtype),
            "labels": torch.tensor([1, 3]),
        },
        {"boxes": torch.zeros(0, 4, dtype=dtype), "labels": torch.zeros(0, dtype=torch.int64)},
        {
            "boxes": torch.tensor(
                [[10.0, 10.0, 22.0, 18.0], [0.0, 0.0, 64.0, 64.0], [33.0, 5.0, 57.0, 45.0]],
                dtype=dtype,
            ),
            "labels": torch.tensor([0, 2, 2]),
        },
    ]
    return out, {"gt": gt}


def _leaves(out: dict) -> list[torch.Tensor]:
    return [*out["cls_logits"], *out["bbox_regression"]]


# ---------------------------------------------------------------------------------------------
# Hand recomputation


def test_matches_hand_recomputation_value_and_grads():
    out, target = _case()
    for leaf in _leaves(out):
        leaf.requires_grad_(True)
    result = retinanet_loss(out, target)
    ref_cls, ref_box = _reference_loss(out, target)
    torch.testing.assert_close(result.components["cls"], ref_cls.detach(), rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(result.components["box"], ref_box.detach(), rtol=1e-7, atol=1e-10)
    got = torch.autograd.grad(result.value, _leaves(out))
    want = torch.autograd.grad(ref_cls + ref_box, _leaves(out))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)


def test_components_add_up_and_are_detached():
    out, target = _case(seed=3)
    for leaf in _leaves(out):
        leaf.requires_grad_(True)
    result = retinanet_loss(out, target)
    assert set(result.components) == {"cls", "box"}
    assert result.value.requires_grad
    assert not result.components["cls"].requires_grad and not result.components["box"].requires_grad
    torch.testing.assert_close(
        result.value.detach(), result.components["cls"] + result.components["box"], rtol=0, atol=0
    )
    assert result.components["box"] > 0 and result.components["cls"] > 0


def _one_box_loss(anchors, logits, deltas, box: list[float], label: int):
    """retinanet_loss of one image (one level) with one ground-truth box."""
    out = {"anchors": anchors, "cls_logits": [logits], "bbox_regression": [deltas]}
    gt = {"boxes": torch.tensor([box], dtype=torch.float64), "labels": torch.tensor([label])}
    return retinanet_loss(out, {"gt": [gt]})


def test_tied_low_quality_matches_are_all_foreground():
    # The GT overlaps anchors 0 and 1 equally (IoU 1/3 < 0.4): both become foreground.
    anchors = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0], [40.0, 40.0, 50.0, 50.0]],
        dtype=torch.float64,
    )
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.0], [-3.0, 1.0]]], dtype=torch.float64)
    deltas = torch.tensor(
        [[[0.2, 0.1, 0.0, -0.3], [-0.5, 0.0, 0.4, 0.0], [9.0, 9.0, 9.0, 9.0]]], dtype=torch.float64
    )
    result = _one_box_loss(anchors, logits, deltas, [5.0, 0.0, 15.0, 10.0], 1)

    def fl(x: float, t: float) -> float:  # focal term, alpha .25, gamma 2
        p = 1 / (1 + math.exp(-x))
        ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        p_t = p * t + (1 - p) * (1 - t)
        return (0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2

    targets = [[0, 1], [0, 1], [0, 0]]
    cls = (
        sum(
            fl(x, t)
            for row, trow in zip(logits[0].tolist(), targets, strict=True)
            for x, t in zip(row, trow, strict=True)
        )
        / 2
    )
    # GT centre (10, 5), size 10x10; anchor centres (5, 5) and (15, 5), size 10x10.
    box = (abs(0.2 - 0.5) + 0.1 + 0.0 + 0.3 + abs(-0.5 + 0.5) + 0.0 + 0.4 + 0.0) / 2
    assert result.components["cls"].item() == pytest.approx(cls, rel=1e-12)
    assert result.components["box"].item() == pytest.approx(box, rel=1e-12)


def test_tie_keeps_each_anchors_own_best_gt():
    # gt0's best IoU 0.3 is shared by anchors 0 and 1, but anchor 1 prefers gt1 (0.35): it keeps gt1.
    iou = torch.tensor([[0.3, 0.3, 0.1], [0.1, 0.35, 0.2]], dtype=torch.float64)
    assert match_anchors(iou.clone()).tolist() == [0, 1, -1]
    # thresholds: >= 0.5 foreground, [0.4, 0.5) ignored (-2), < 0.4 background (-1)
    # (gt0's best is anchor 5 at exactly 0.5, so anchor 3 at 0.45 stays ignored)
    iou = torch.tensor(
        [[0.3, 0.3, 0.1, 0.45, 0.4, 0.5], [0.2, 0.6, 0.0, 0.1, 0.0, 0.2]], dtype=torch.float64
    )
    assert match_anchors(iou.clone()).tolist() == [-1, 1, -1, -2, -2, 0]
    # a GT whose best IoU is in the ignore band still gets its anchor back as foreground
    iou = torch.tensor([[0.3, 0.45, 0.1]], dtype=torch.float64)
    assert match_anchors(iou.clone()).tolist() == [-1, 0, -1]


def test_gt_overlapping_no_anchor_makes_every_zero_iou_anchor_foreground():
    # torchvision's low-quality rule: a GT whose best IoU is 0 "ties" with every anchor at 0.
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0]], dtype=torch.float64)
    logits = torch.tensor([[[0.3, -0.2], [1.0, 2.0]]], dtype=torch.float64)
    deltas = torch.zeros(1, 2, 4, dtype=torch.float64)
    result = _one_box_loss(anchors, logits, deltas, [100.0, 100.0, 110.0, 120.0], 0)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    p = torch.sigmoid(logits[0])
    ce = F.binary_cross_entropy_with_logits(logits[0], t, reduction="none")
    expected_cls = (
        (0.25 * t + 0.75 * (1 - t)) * ce * (1 - (p * t + (1 - p) * (1 - t))) ** 2
    ).sum() / 2
    torch.testing.assert_close(result.components["cls"], expected_cls, rtol=1e-12, atol=0)
    # deltas vs anchor 0: (100/10, 105/10, 0, log 2); anchor 1: (90/10, 105/10, 0, log 2)
    expected_box = (10 + 10.5 + math.log(2) + 9 + 10.5 + math.log(2)) / 2
    assert result.components["box"].item() == pytest.approx(expected_box, rel=1e-12)


def test_image_without_boxes_is_all_background():
    out, target = _case()
    only_empty = {"gt": [target["gt"][1]]}
    out1 = {
        "anchors": out["anchors"],
        "cls_logits": [lv[1:2] for lv in out["cls_logits"]],
        "bbox_regression": [lv[1:2] for lv in out["bbox_regression"]],
    }
    result = retinanet_loss(out1, only_empty)
    x = torch.cat(out1["cls_logits"], dim=1)[0]
    p = torch.sigmoid(x)
    expected = (0.75 * F.softplus(x) * p**2).sum()  # t = 0: ce = softplus(x), 1 - p_t = p
    torch.testing.assert_close(result.components["cls"], expected, rtol=1e-12, atol=0)
    assert result.components["box"].item() == 0.0


def test_ignored_anchors_get_no_gradient_and_background_no_box_gradient():
    out, target = _case(seed=5)
    for leaf in _leaves(out):
        leaf.requires_grad_(True)
    retinanet_loss(out, target).value.backward()
    cls_grad = torch.cat([lv.grad for lv in out["cls_logits"]], dim=1)
    box_grad = torch.cat([lv.grad for lv in out["bbox_regression"]], dim=1)
    for b, gt in enumerate(target["gt"]):
        matches = torch.tensor(_reference_matches(gt["boxes"].tolist(), out["anchors"].tolist()))
        if b == 2:
            assert (matches == -2).any(), "the case must contain ignored anchors"
        assert torch.all(cls_grad[b][matches == -2] == 0)
        assert torch.all(cls_grad[b][matches != -2] != 0)
        assert torch.all(box_grad[b][matches < 0] == 0)
    assert torch.all(box_grad[1] == 0)  # the image without boxes


def test_float32_stays_float32_and_matches_float64():
    # Square anchors on a multiple-of-8 grid: IoUs (and so the matching) are exact in both dtypes.
    out64, target64 = _case(ratios=(1.0,))
    out32, target32 = _case(dtype=torch.float32, ratios=(1.0,))
    r32, r64 = retinanet_loss(out32, target32), retinanet_loss(out64, target64)
    assert r32.value.dtype == torch.float32
    torch.testing.assert_close(r32.value.double(), r64.value, rtol=1e-5, atol=1e-6)


def test_inputs_are_not_mutated():
    out, target = _case()
    out_copy, target_copy = copy.deepcopy(out), copy.deepcopy(target)
    retinanet_loss(out, target)
    torch.testing.assert_close(out["anchors"], out_copy["anchors"], rtol=0, atol=0)
    for a, b in zip(_leaves(out), _leaves(out_copy), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for g, h in zip(target["gt"], target_copy["gt"], strict=True):
        torch.testing.assert_close(g["boxes"], h["boxes"], rtol=0, atol=0)
        torch.testing.assert_close(g["labels"], h["labels"], rtol=0, atol=0)


def _no_anchors(images: int) -> dict:
    """A head output with no anchors, for ``images`` images and 3 classes."""
    return {
        "anchors": torch.zeros(0, 4, dtype=torch.float64),
        "cls_logits": [torch.zeros(images, 0, 3, dtype=torch.float64)],
        "bbox_regression": [torch.zeros(images, 0, 4, dtype=torch.float64)],
    }


def test_zero_anchors_and_no_boxes_gives_zero():
    out = _no_anchors(2)
    empty = {
        "boxes": torch.zeros(0, 4, dtype=torch.float64),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    result = retinanet_loss(out, {"gt": [empty, empty]})
    assert result.value.item() == 0.0


# ---------------------------------------------------------------------------------------------
# Invalid input: InvalidArgument where upstream crashes, naming the field


def _replace(out, target, **changes):
    out, target = dict(out), {"gt": [dict(g) for g in target["gt"]]}
    for key, value in changes.items():
        if key.startswith("gt"):
            i, field = key[2], key.split("_", 1)[1]
            target["gt"][int(i)][field] = value
        else:
            out[key] = value
    return out, target


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda o, t: _replace(o, t, gt2_labels=torch.tensor([0, 4, 2])), "target.gt[2].labels"),
        (lambda o, t: _replace(o, t, gt0_labels=torch.tensor([-1, 1])), "target.gt[0].labels"),
        (lambda o, t: _replace(o, t, gt0_labels=torch.tensor([1.0, 3.0])), "target.gt[0].labels"),
        (lambda o, t: _replace(o, t, gt0_labels=torch.tensor([1])), "target.gt[0].labels"),
        (
            lambda o, t: _replace(o, t, gt0_boxes=torch.zeros(2, 5, dtype=torch.float64)),
            "target.gt[0].boxes",
        ),
        (
            lambda o, t: _replace(o, t, gt0_boxes=torch.zeros(2, 4, dtype=torch.int64)),
            "target.gt[0].boxes",
        ),
        (lambda o, t: _replace(o, t, anchors=o["anchors"][:-1]), "out.cls_logits"),
        (
            lambda o, t: _replace(o, t, bbox_regression=[o["bbox_regression"][0]]),
            "out.bbox_regression",
        ),
        (
            lambda o, t: _replace(
                o, t, bbox_regression=[lv[..., :3] for lv in o["bbox_regression"]]
            ),
            "out.bbox_regression[0]",
        ),
        (
            lambda o, t: _replace(
                o, t, cls_logits=[o["cls_logits"][0], o["cls_logits"][1][..., :2]]
            ),
            "out.cls_logits[1]",
        ),
        (
            lambda o, t: _replace(o, t, cls_logits=[lv[:2] for lv in o["cls_logits"]]),
            "out.cls_logits[0]",
        ),
        (
            lambda o, t: _replace(o, t, cls_logits=torch.cat(o["cls_logits"], dim=1)),
            "out.cls_logits",
        ),
        (lambda o, t: _replace(o, t, cls_logits=[]), "out.cls_logits"),
        (lambda o, t: _replace(o, t, anchors=o["anchors"][:, :3]), "out.anchors"),
        (lambda o, t: ({k: v for k, v in o.items() if k != "anchors"}, t), "out.anchors"),
        (lambda o, t: (o, {"gt": []}), "target.gt"),
        (lambda o, t: (o, {"boxes": t["gt"]}), "target.gt"),
        (lambda o, t: (o, {"gt": [{"boxes": g["boxes"]} for g in t["gt"]]}), "target.gt[0].labels"),
    ],
)
def test_invalid_inputs_raise_invalid_argument(change, field):
    out, target = change(*_case())
    with pytest.raises(InvalidArgument) as info:
        call("retinanet_loss", out, target)  # the declaration, then the loss, as the engine does
    assert info.value.field == field
    assert "expected" in str(info.value) or "missing" in str(info.value)


def test_boxes_with_no_anchors_is_invalid():
    out = _no_anchors(1)
    gt = {
        "boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]], dtype=torch.float64),
        "labels": torch.tensor([0]),
    }
    with pytest.raises(InvalidArgument, match="anchor"):
        retinanet_loss(out, {"gt": [gt]})


# ---------------------------------------------------------------------------------------------
# Gradients and registration


@pytest.mark.usefixtures("one_thread")
def test_gradcheck_cls_logits_and_bbox_regression():
    # 4 + 1 anchors keep gradcheck fast; they still hold foreground, background and both levels.
    out, target = _case(seed=11, ratios=(1.0,), strides=(32, 64))
    assert retinanet_loss(out, target).components["box"] > 0
    leaves = _leaves(out)
    for leaf in leaves:
        leaf.requires_grad_(True)
    n = len(out["cls_logits"])

    def fn(*tensors):
        o = {
            "anchors": out["anchors"],
            "cls_logits": list(tensors[:n]),
            "bbox_regression": list(tensors[n:]),
        }
        return retinanet_loss(o, target).value

    assert gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-6)


def test_spec_registered_with_example():
    spec = registry.get("retinanet_loss")
    assert spec.families == ("netspresso",)
    assert [i.name for i in spec.inputs] == ["out", "target"]
    assert spec.params == ()
    assert spec.canonical_params({}) == {}
    with pytest.raises(InvalidArgument):
        spec.canonical_params({"alpha": 0.5})  # nothing is configurable upstream
    for dtype in (torch.float32, torch.float64):
        args, kwargs, params = spec.make_example(dtype)
        result = spec.fn(*args, **kwargs, **params)
        assert result.value.dtype == dtype and torch.isfinite(result.value)
        assert result.components["box"] > 0  # the example has foreground anchors
        args2, _, _ = spec.make_example(dtype)
        torch.testing.assert_close(spec.fn(*args2).value, result.value, rtol=0, atol=0)


def _torchvision_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """torchvision.ops.box_iou's rule: box_area and the intersection upcast half precision
    (``_upcast``: float16/bfloat16 -> float32) before multiplying."""

    def area(b):
        b = b.float() if b.dtype in (torch.float16, torch.bfloat16) else b
        return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])

    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (
        (rb - lt).float().clamp(min=0)
        if rb.dtype in (torch.float16, torch.bfloat16)
        else (rb - lt).clamp(min=0)
    )
    inter = wh[:, :, 0] * wh[:, :, 1]
    return inter / (area(boxes1)[:, None] + area(boxes2) - inter)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_box_areas_are_upcast_like_torchvision(dtype):
    from lossd.server.losses.retinanet import box_iou

    # Boxes of 300 x 300 and more: a half-precision area (90,000 > 65,504) overflows unless upcast.
    gt = torch.tensor([[0.0, 0.0, 300.0, 300.0], [50.0, 40.0, 450.0, 420.0]], dtype=dtype)
    anchors = torch.tensor(
        [[0.0, 0.0, 256.0, 256.0], [0.0, 0.0, 320.0, 320.0], [60.0, 40.0, 440.0, 400.0]],
        dtype=dtype,
    )
    got = box_iou(gt, anchors)
    want = _torchvision_box_iou(gt, anchors)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want)
    assert bool((got > 0.5).any()), "the overflowed areas made every IoU ~0: nothing matched"
    # The whole loss then matches the same anchors as on the float32 copy of the same boxes.
    out = {
        "anchors": anchors,
        "cls_logits": [torch.zeros(1, 3, 2, dtype=dtype)],
        "bbox_regression": [torch.zeros(1, 3, 4, dtype=dtype)],
    }
    target = {"gt": [{"boxes": gt, "labels": torch.tensor([0, 1])}]}
    half = retinanet_loss(out, target).value
    out32 = {k: v.float() if torch.is_tensor(v) else [t.float() for t in v] for k, v in out.items()}
    target32 = {"gt": [{"boxes": gt.float(), "labels": torch.tensor([0, 1])}]}
    full = retinanet_loss(out32, target32).value
    torch.testing.assert_close(half.float(), full, rtol=2e-2, atol=2e-2)
