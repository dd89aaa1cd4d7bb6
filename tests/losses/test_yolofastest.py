"""yolofastest_loss (NetsPresso Trainer 1.4.1 YOLOFastestLoss): the golden case in both level
layouts, a one-GT case computed from the formulas, a multi-image batch with an empty image
against its images one by one, gradients, the config build and bad structures."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.autograd import gradcheck

from lossd.client import from_config
from lossd.server.errors import InvalidArgument
from lossd.server.losses.yolofastest import _make_example
from tests.support.golden import GOLDEN, load_golden
from tests.support.losskit import assert_refused_then_served, call, value

NAME = "yolofastest_loss"
GOLDEN_CASE = GOLDEN / "netspresso" / f"{NAME}__default.pt"


def _softplus(x: float) -> float:
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def _bce_logits(x: float, t: float) -> float:
    return _softplus(x) - x * t


def _corners(b):
    return b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2


def _giou(a, b, eps=1e-7):
    ax1, ay1, ax2, ay2 = _corners(a)
    bx1, by1, bx2, by2 = _corners(b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = a[2] * a[3] + b[2] * b[3] - inter
    enclosure = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / (union + eps) - (enclosure - union) / max(enclosure, eps), inter / union


def test_golden_in_the_flattened_4d_layout() -> None:
    case = load_golden(GOLDEN_CASE)
    out, target = case["args"]
    levels = [
        lv.reshape(lv.shape[0], -1, *lv.shape[-2:]).requires_grad_(True) for lv in out["pred"]
    ]
    loss = value(call(NAME, {"pred": levels}, target, **case["ctor"]))
    torch.testing.assert_close(loss, case["expected_loss"], rtol=1e-7, atol=1e-10)
    loss.backward()
    for k, level in enumerate(levels):
        want = case["expected_grads"][f"args[0].pred[{k}]"]
        torch.testing.assert_close(level.grad.reshape(want.shape), want, rtol=1e-7, atol=1e-10)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _size(logit: float, anchor: float) -> float:
    return 2 * (math.tanh(logit / 2 - 0.549306) + 1) * anchor


def test_one_gt_from_the_formulas() -> None:
    """One level (img 32, 2x2 cells, stride 16), two anchors, C = 2; every box but one is tiny,
    so SimOTA matches that one anchor (k = int(IoU sum) clamped to 1)."""
    anchors = [[6.0, 8.0, 14.0, 10.0]]
    level = torch.zeros(1, 2, 7, 2, 2, dtype=torch.float64)
    level[:, :, 2:4] = -8.0
    level[:, :, 4:] = torch.linspace(-1, 1, 2 * 3 * 4, dtype=torch.float64).reshape(2, 3, 2, 2)
    t = [0.2, -0.3, 0.4, 0.1]  # anchor 1, row 0, col 1
    level[0, 1, :4, 0, 1] = torch.tensor(t, dtype=torch.float64)
    gt = (28.0, 8.0, 16.0, 10.0)  # cxcywh of the xyxy box below
    target = {
        "gt": [
            {
                "boxes": torch.tensor([[20.0, 3.0, 36.0, 13.0]], dtype=torch.float64),
                "labels": torch.tensor([1]),
            }
        ],
        "img_size": 32,
        "num_classes": 2,
    }
    out = call(NAME, {"pred": [level]}, target, anchors=anchors)

    box = (
        (_sigmoid(t[0]) + 1) * 16,
        (_sigmoid(t[1]) + 0) * 16,
        _size(t[2], 14.0),
        _size(t[3], 10.0),
    )
    giou, iou = _giou(box, gt)
    obj = sum(_softplus(x) for x in level[0, :, 4].flatten().tolist()) - float(level[0, 1, 4, 0, 1])
    cls_logits = level[0, 1, 5:, 0, 1].tolist()
    cls = _bce_logits(cls_logits[0], 0.0) + _bce_logits(cls_logits[1], iou)
    expected = {"iou": 1 - giou, "obj": obj, "cls": cls}
    for key, want in expected.items():
        torch.testing.assert_close(out.components[key].item(), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.value.item(), 5 * (1 - giou) + obj + cls, rtol=1e-10, atol=1e-12)


def test_multi_image_batch_with_an_empty_image_equals_its_images() -> None:
    (out, target), _, params = _make_example(torch.float64)
    levels = [lv.detach().clone().requires_grad_(True) for lv in out["pred"]]
    batch = call(NAME, {"pred": levels}, target, **params)
    parts = []
    for i in range(3):
        one = {"pred": [lv[i : i + 1] for lv in out["pred"]]}
        one_target = {**target, "gt": target["gt"][i : i + 1]}
        parts.append(value(call(NAME, one, one_target, **params)))
    # one matched anchor in images 0 and 2, none in image 1: the batch divides by 2, each image by 1
    torch.testing.assert_close(batch.value * 2, sum(parts), rtol=1e-12, atol=1e-12)
    batch.value.backward()
    empty = levels[0].grad[1]
    assert empty[:, 4].any() and not empty[:, :4].any() and not empty[:, 5:].any()


def test_unused_epoch_parameters_change_nothing_and_caller_data_is_kept() -> None:
    (out, target), _, params = _make_example(torch.float64)
    before = copy.deepcopy(target)
    base = value(call(NAME, out, target, **params))
    again = value(call(NAME, out, target, **params, l1_activate_epoch=0, cur_epoch=5))
    assert torch.equal(base, again)
    for got, want in zip(target["gt"], before["gt"]):
        assert torch.equal(got["boxes"], want["boxes"])


def test_gradcheck_every_level() -> None:
    (out, target), _, params = _make_example(torch.float64)
    levels = tuple(lv.detach().clone().requires_grad_(True) for lv in out["pred"])

    def fn(*lv):
        return value(call(NAME, {"pred": list(lv)}, target, **params))

    assert gradcheck(fn, levels, eps=1e-6, atol=1e-7, fast_mode=True)


def _bad(mutate):
    (out, target), _, params = _make_example(torch.float32)
    out, target, params = copy.deepcopy(out), copy.deepcopy(target), copy.deepcopy(params)
    mutate(out, target, params)
    return out, target, params


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (
            lambda o, t, p: p.update(anchors=[[4.0, 6.0, 10.0], [1.0, 2.0, 3.0, 4.0]]),
            "params.anchors[0]",
        ),
        (
            lambda o, t, p: p.update(anchors=[[4.0, 6.0, 10.0, 8.0], [1.0, 2.0]]),
            "params.anchors[1]",
        ),
        (lambda o, t, p: p.update(anchors=[[4.0, 6.0, 10.0, 8.0]]), "params.anchors"),
        (lambda o, t, p: p.update(anchors="4,6"), "params.anchors"),
        (lambda o, t, p: o.update(pred=[o["pred"][0], o["pred"][1][:, :10]]), "out.pred[1]"),
        (lambda o, t, p: o.update(pred=[o["pred"][0][:, :1], o["pred"][1]]), "out.pred[0]"),
        (lambda o, t, p: o.update(pred=[o["pred"][0], o["pred"][1][:2]]), "out.pred[1]"),
        (lambda o, t, p: o.pop("pred"), "out.pred"),
        (lambda o, t, p: t["gt"][0].update(labels=torch.tensor([2])), "target.gt[0].labels"),
        (lambda o, t, p: t["gt"][2].pop("boxes"), "target.gt[2].boxes"),
        (lambda o, t, p: t.update(gt=t["gt"][:2]), "target.gt"),
        (lambda o, t, p: t.pop("img_size"), "target.img_size"),
    ],
    ids=[
        "anchors-odd",
        "anchors-count",
        "anchors-levels",
        "anchors-type",
        "level-channels",
        "level-anchors",
        "level-batch",
        "no-pred",
        "label-C",
        "no-boxes",
        "gt-count",
        "no-img_size",
    ],
)
def test_bad_structures_name_the_path(mutate, field) -> None:
    out, target, params = _bad(mutate)
    with pytest.raises(InvalidArgument) as info:
        call(NAME, out, target, **params)
    assert info.value.field == field


def test_bad_structure_through_the_rpc_and_the_server_keeps_serving(endpoint) -> None:
    (out, target), _, params = _make_example(torch.float32)
    bad = copy.deepcopy(target)
    bad["gt"][2]["labels"] = torch.tensor([5])
    assert_refused_then_served(
        endpoint, NAME, params, (out, bad), (out, target), "args[1].gt[2].labels"
    )


def test_netspresso_yaml_entry_builds_it(endpoint) -> None:
    (out, target), _, params = _make_example(torch.float64)
    yaml = (
        "model:\n  losses:\n    - criterion: yolofastest_loss\n      anchors:\n"
        "        - [4.0, 6.0, 10.0, 8.0]\n        - [12.0, 16.0, 20.0, 18.0]\n      weight: 1.0\n"
    )
    with from_config(yaml, endpoint=endpoint) as crit:
        got = crit(out, target)
    torch.testing.assert_close(got, value(call(NAME, out, target, **params)), rtol=1e-12, atol=0)


def test_giou_matches_the_formula_on_disjoint_nested_and_overlapping_boxes() -> None:
    from lossd.server.losses.yolofastest import giou_cxcywh

    pairs = [
        ((10.0, 10.0, 4.0, 4.0), (20.0, 10.0, 4.0, 4.0)),  # disjoint: GIoU < 0
        ((10.0, 10.0, 8.0, 8.0), (10.0, 10.0, 2.0, 2.0)),  # nested
        ((10.0, 10.0, 6.0, 4.0), (12.0, 11.0, 4.0, 6.0)),  # overlapping
    ]
    pred = torch.tensor([p for p, _ in pairs], dtype=torch.float64)
    target = torch.tensor([t for _, t in pairs], dtype=torch.float64)
    expected = torch.tensor([_giou(p, t)[0] for p, t in pairs], dtype=torch.float64)
    torch.testing.assert_close(giou_cxcywh(pred, target), expected, rtol=1e-12, atol=1e-12)
    assert expected[0] < 0
