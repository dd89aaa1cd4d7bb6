"""yolov9_loss (NetsPresso Trainer 1.4.1 YOLOv9Loss): the golden case, a per-image reference
(assignment GT by GT, CIoU and DFL from their formulas) for each parameter and input form,
ragged multi-image GT with an empty image, a no-GT batch with a known value, gradients against
the reference (and gradcheck where the loss has no stop-gradient), refusals by path, the remote
path and the NetsPresso config build."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import lossd.server.losses  # noqa: F401  (registers the specs)
from lossd.client import from_config
from lossd.server import registry
from lossd.server.errors import InvalidArgument
from lossd.server.losses.netspresso import criteria_list
from lossd.server.losses.yolov9 import yolov9_loss
from tests.support.golden import GOLDEN, GOLDEN_TOL, load_golden
from tests.support.losskit import assert_refused_then_served

GOLDEN_CASE = GOLDEN / "netspresso" / "yolov9_loss__default.pt"
EPS = 1e-7


# ---------------------------------------------------------------------------------------------
# Inputs


def _inputs(seed=0, reg_max=4, classes=3, img=32, sides=((4, 4), (2, 2)), counts=(2, 0, 3)):
    gen = torch.Generator().manual_seed(seed)
    h, w = (img, img) if isinstance(img, int) else img
    batch = len(counts)
    levels = [
        torch.randn(batch, 4 * reg_max + classes, hl, wl, generator=gen, dtype=torch.float64)
        for hl, wl in sides
    ]
    gt = []
    for n in counts:
        xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.5
        wh = 0.25 + torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.25
        scale = torch.tensor([w, h, w, h], dtype=torch.float64)
        gt.append(
            {
                "boxes": torch.cat((xy, xy + wh), -1) * scale,
                "labels": torch.randint(0, classes, (n,), generator=gen),
            }
        )
    return {"pred": levels}, {"gt": gt, "img_size": img, "num_classes": classes}


# ---------------------------------------------------------------------------------------------
# The reference


def _ciou(b1, b2):
    """CIoU of broadcastable xyxy boxes from its definition (alpha detached)."""
    w1, h1 = b1[..., 2] - b1[..., 0], b1[..., 3] - b1[..., 1]
    w2, h2 = b2[..., 2] - b2[..., 0], b2[..., 3] - b2[..., 1]
    iw = (torch.min(b1[..., 2], b2[..., 2]) - torch.max(b1[..., 0], b2[..., 0])).clamp(min=0)
    ih = (torch.min(b1[..., 3], b2[..., 3]) - torch.max(b1[..., 1], b2[..., 1])).clamp(min=0)
    inter = iw * ih
    iou = inter / (w1 * h1 + w2 * h2 - inter + EPS)
    rho2 = ((b1[..., 0] + b1[..., 2]) / 2 - (b2[..., 0] + b2[..., 2]) / 2) ** 2 + (
        (b1[..., 1] + b1[..., 3]) / 2 - (b2[..., 1] + b2[..., 3]) / 2
    ) ** 2
    cw = torch.max(b1[..., 2], b2[..., 2]) - torch.min(b1[..., 0], b2[..., 0])
    ch = torch.max(b1[..., 3], b2[..., 3]) - torch.min(b1[..., 1], b2[..., 1])
    v = 4 / math.pi**2 * (torch.atan(w1 / (h1 + EPS)) - torch.atan(w2 / (h2 + EPS))) ** 2
    alpha = (v / (v - iou + 1 + EPS)).detach()
    return iou - rho2 / (cw**2 + ch**2 + EPS) - alpha * v


def reference(out, target, reg_max):
    levels = out["pred"]["outputs"] if isinstance(out["pred"], dict) else out["pred"]
    img = target["img_size"]
    height, width = (img, img) if isinstance(img, int) else img
    classes = target["num_classes"]
    anchors, strides, cls, bins = [], [], [], []
    for level in levels:
        batch, _, hl, wl = level.shape
        s = width // wl
        for r in range(hl):
            for c in range(wl):
                anchors.append([c * s + s // 2, r * s + s // 2])
                strides.append(s)
        cls.append(level[:, 4 * reg_max :].flatten(2).transpose(1, 2))
        side_bins = level[:, : 4 * reg_max].reshape(batch, 4, reg_max, hl * wl)
        bins.append(side_bins.permute(0, 3, 1, 2))
    anchors = torch.tensor(anchors, dtype=torch.float64)
    strides = torch.tensor(strides, dtype=torch.float64)
    cls, bins = torch.cat(cls, 1), torch.cat(bins, 1)  # (B, A, C), (B, A, 4, reg_max)
    dist = (bins.softmax(-1) * torch.arange(reg_max, dtype=torch.float64)).sum(-1)
    dist = dist * strides[:, None]
    boxes = torch.cat((anchors - dist[..., :2], anchors + dist[..., 2:]), -1)  # pixels

    batch, num_anchors = cls.shape[:2]
    align = torch.zeros(batch, num_anchors, classes, dtype=torch.float64)
    assigned_box = torch.zeros(batch, num_anchors, 4, dtype=torch.float64)
    valid = torch.zeros(batch, num_anchors, dtype=torch.bool)
    with torch.no_grad():
        for b, gt in enumerate(target["gt"]):
            g_boxes, g_labels = gt["boxes"].double(), gt["labels"]
            n = g_labels.shape[0]
            if n == 0:
                continue
            ious = _ciou(g_boxes[:, None], boxes[b][None]).clamp(0, 1)  # (n, A)
            inside = (
                (g_boxes[:, None, 0] < anchors[None, :, 0])
                & (anchors[None, :, 0] < g_boxes[:, None, 2])
                & (g_boxes[:, None, 1] < anchors[None, :, 1])
                & (anchors[None, :, 1] < g_boxes[:, None, 3])
            )
            prob = torch.sigmoid(cls[b][:, g_labels]).T  # (n, A)
            metric = inside * ious**6 * prob**0.5
            claims = torch.zeros(n, num_anchors, dtype=torch.bool)
            for g in range(n):
                top = metric[g].topk(10).indices
                claims[g, top] = metric[g, top] > 0
            owner = torch.full((num_anchors,), -1)
            for a in range(num_anchors):
                who = claims[:, a].nonzero().flatten()
                if len(who) == 1:
                    owner[a] = who[0]
                elif len(who) > 1:
                    owner[a] = int(ious[:, a].argmax())
            mask = torch.zeros(n, num_anchors)
            for a in range(num_anchors):
                if owner[a] >= 0:
                    mask[owner[a], a] = 1
            best_metric = (metric * mask).amax(1)
            best_iou = (ious * mask).amax(1)
            for a in range(num_anchors):
                g = int(owner[a])
                if g < 0:
                    continue
                valid[b, a] = True
                assigned_box[b, a] = g_boxes[g]
                align[b, a, g_labels[g]] = metric[g, a] / (best_metric[g] + 1e-9) * best_iou[g]
    norm = max(float(align.sum()), 1.0)
    weight = align.sum(-1)[valid]
    loss_cls = F.binary_cross_entropy_with_logits(cls, align, reduction="sum") / norm
    scaled_pred = (boxes / strides[None, :, None])[valid]
    scaled_gt = (assigned_box / strides[None, :, None])[valid]
    loss_iou = ((1 - _ciou(scaled_pred, scaled_gt)) * weight).sum() / norm
    point = (anchors / strides[:, None])[None].expand(batch, -1, -1)[valid]
    t = torch.cat((point - scaled_gt[:, :2], scaled_gt[:, 2:] - point), -1).clamp(0, reg_max - 1.01)
    logp = bins[valid].log_softmax(-1)  # (K, 4, reg_max)
    left = t.floor().long()
    dfl = -logp.gather(-1, left[..., None])[..., 0] * (left + 1 - t) - logp.gather(
        -1, (left + 1)[..., None]
    )[..., 0] * (t - left)
    loss_dfl = (dfl.mean(-1) * weight).sum() / norm
    return {
        "cls": loss_cls,
        "iou": loss_iou,
        "dfl": loss_dfl,
        "total": 0.5 * loss_cls + 1.5 * loss_dfl + 7.5 * loss_iou,
    }


def _assert_matches(out, target, reg_max=4, **params):
    result = yolov9_loss(out, target, l1_activate_epoch=None, reg_max=reg_max, **params)
    expected = reference(out, target, reg_max)
    for k in ("cls", "iou", "dfl"):
        torch.testing.assert_close(result.components[k], expected[k], rtol=1e-10, atol=1e-12, msg=k)
    torch.testing.assert_close(result.value, expected["total"], rtol=1e-10, atol=1e-12)
    return result


# ---------------------------------------------------------------------------------------------
# Golden and reference values


def test_golden_case_matches_the_reference():
    case = load_golden(GOLDEN_CASE)
    out, target = case["args"]
    expected = reference(
        {"pred": [lv.double() for lv in out["pred"]]},
        {**target, "gt": [{**g, "boxes": g["boxes"].double()} for g in target["gt"]]},
        16,
    )
    torch.testing.assert_close(
        expected["total"], case["expected_loss"].double(), rtol=1e-5, atol=1e-6
    )


def test_ragged_multi_image_with_an_empty_image():
    out, target = _inputs(seed=1, counts=(2, 0, 3))
    result = _assert_matches(out, target)
    assert result.components["iou"] > 0 and result.components["dfl"] > 0


@pytest.mark.parametrize("reg_max", [2, 4, 8, 16])
def test_reg_max(reg_max):
    out, target = _inputs(seed=2, reg_max=reg_max)
    assert _assert_matches(out, target, reg_max=reg_max).components["dfl"] > 0


@pytest.mark.parametrize(
    ("img", "sides"),
    [
        (32, ((4, 4), (2, 2))),
        ((32, 48), ((4, 6), (2, 3))),
        ([64, 32], ((8, 4), (4, 2), (2, 1))),
        (64, ((8, 8),)),
    ],
    ids=["int", "tuple-hw", "list-hw-3-levels", "one-level"],
)
def test_img_size_int_or_height_width(img, sides):
    out, target = _inputs(seed=3, img=img, sides=sides)
    _assert_matches(out, target)


@pytest.mark.parametrize("classes", [1, 2, 5])
def test_num_classes(classes):
    out, target = _inputs(seed=4, classes=classes)
    _assert_matches(out, target)


def test_dict_prediction_ignores_aux_outputs():
    out, target = _inputs(seed=5)
    plain = yolov9_loss(out, target, l1_activate_epoch=None, reg_max=4)
    aux = [lv * 3 for lv in out["pred"]]
    as_dict = {"pred": {"outputs": out["pred"], "aux_outputs": aux}}
    result = _assert_matches(as_dict, target)
    assert torch.equal(result.value, plain.value)


@pytest.mark.parametrize(("activate", "epoch"), [(None, None), (0, 10), (100, 3)])
def test_l1_activate_epoch_and_cur_epoch_are_unused(activate, epoch):
    out, target = _inputs(seed=6)
    base = yolov9_loss(out, target, l1_activate_epoch=None, reg_max=4)
    other = yolov9_loss(out, target, l1_activate_epoch=activate, cur_epoch=epoch, reg_max=4)
    assert torch.equal(base.value, other.value)


def test_no_gt_in_the_batch_is_the_class_term_alone():
    out, target = _inputs(seed=7, counts=(0, 0))
    result = _assert_matches(out, target)
    logits = torch.cat([lv[:, 16:].flatten() for lv in out["pred"]])
    expected = 0.5 * F.softplus(logits).sum()  # BCE against 0, divided by max(0, 1)
    torch.testing.assert_close(result.value, expected, rtol=1e-12, atol=1e-12)
    assert result.components["iou"] == 0 and result.components["dfl"] == 0


def test_float32_close_to_float64():
    out, target = _inputs(seed=8)
    r64 = yolov9_loss(out, target, l1_activate_epoch=None, reg_max=4)
    out32 = {"pred": [lv.float() for lv in out["pred"]]}
    target32 = {**target, "gt": [{**g, "boxes": g["boxes"].float()} for g in target["gt"]]}
    r32 = yolov9_loss(out32, target32, l1_activate_epoch=None, reg_max=4)
    assert r32.value.dtype == torch.float32
    assert r32.value.item() == pytest.approx(r64.value.item(), rel=1e-5)


def test_caller_inputs_are_not_modified_and_calls_repeat():
    out, target = _inputs(seed=9)
    copies = copy.deepcopy((out, target))
    first = yolov9_loss(out, target, l1_activate_epoch=None, reg_max=4)
    second = yolov9_loss(out, target, l1_activate_epoch=None, reg_max=4)
    assert torch.equal(first.value, second.value)
    for a, b in zip(out["pred"], copies[0]["pred"], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(target["gt"], copies[1]["gt"], strict=True):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])


# ---------------------------------------------------------------------------------------------
# Gradients


def test_gradients_equal_the_reference():
    # The assignment, its class targets and CIoU's alpha carry no gradient upstream, so finite
    # differences do not see what autograd sees; the reference has the same stop-gradients.
    out, target = _inputs(seed=10)
    leaves = [lv.clone().requires_grad_(True) for lv in out["pred"]]
    got = torch.autograd.grad(
        yolov9_loss({"pred": leaves}, target, l1_activate_epoch=None, reg_max=4).value, leaves
    )
    want = torch.autograd.grad(reference({"pred": leaves}, target, 4)["total"], leaves)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
        assert g.abs().sum() > 0


def test_gradcheck_without_ground_truth():
    # Without GT the loss has no stop-gradient (the class targets are 0): gradcheck holds.
    out, target = _inputs(seed=11, counts=(0, 0), sides=((2, 2), (1, 1)), img=16)
    leaves = [lv.clone().requires_grad_(True) for lv in out["pred"]]

    def fn(*xs):
        return yolov9_loss({"pred": list(xs)}, target, l1_activate_epoch=None, reg_max=4).value

    assert gradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=True)


# ---------------------------------------------------------------------------------------------
# Refusals: each names its field


BAD = [
    (lambda o, t: o["pred"].__setitem__(1, o["pred"][1][:, :-1]), "out.pred[1]"),
    (lambda o, t: o["pred"].__setitem__(1, o["pred"][1][:2]), "out.pred[1]"),
    (lambda o, t: o["pred"].__setitem__(0, o["pred"][0][..., :3]), "out.pred[0]"),
    (lambda o, t: o["pred"].__setitem__(0, o["pred"][0].float()), "out.pred[1]"),  # dtypes differ
    (lambda o, t: o["pred"].__setitem__(0, o["pred"][0][0]), "out.pred[0]"),
    (lambda o, t: o.__setitem__("pred", o["pred"][0]), "out.pred"),
    (lambda o, t: o.__setitem__("pred", []), "out.pred"),
    (lambda o, t: o.__setitem__("pred", {"aux_outputs": o["pred"]}), "out.pred.outputs"),
    (lambda o, t: o.pop("pred"), "out.pred"),
    (lambda o, t: t["gt"][2]["labels"].__setitem__(0, 3), "target.gt[2].labels"),
    (lambda o, t: t["gt"][2]["labels"].__setitem__(0, -1), "target.gt[2].labels"),
    (lambda o, t: t["gt"].pop(), "target.gt"),
    (lambda o, t: t["gt"][0].pop("labels"), "target.gt[0].labels"),
    (
        lambda o, t: t["gt"][0].__setitem__("boxes", t["gt"][0]["boxes"][:, :3]),
        "target.gt[0].boxes",
    ),
    (lambda o, t: t.__setitem__("gt", t["gt"][0]), "target.gt"),
    (lambda o, t: t.__setitem__("img_size", 30), "out.pred[0]"),
    (lambda o, t: t.__setitem__("img_size", (32, 30)), "out.pred[0]"),
    (lambda o, t: t.__setitem__("img_size", (32,)), "target.img_size"),
    (lambda o, t: t.__setitem__("img_size", 32.0), "target.img_size"),
    (lambda o, t: t.pop("num_classes"), "target.num_classes"),
]


@pytest.mark.parametrize(("mutate", "field"), BAD, ids=[f"{i}:{f}" for i, (_, f) in enumerate(BAD)])
def test_bad_structure_names_the_field(mutate, field):
    out, target = _inputs(seed=12)
    mutate(out, target)
    with pytest.raises(InvalidArgument) as err:
        yolov9_loss(out, target, l1_activate_epoch=None, reg_max=4)
    assert err.value.field == field, err.value.message


def test_fewer_than_ten_anchor_points_with_gt_is_refused():
    out, target = _inputs(seed=13, sides=((2, 2), (1, 1)), img=16)  # 5 anchor points
    with pytest.raises(InvalidArgument, match="10 anchor points") as err:
        yolov9_loss(out, target, l1_activate_epoch=None, reg_max=4)
    assert err.value.field == "out.pred"
    empty = {
        **target,
        "gt": [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 3,
    }
    assert torch.isfinite(yolov9_loss(out, empty, l1_activate_epoch=None, reg_max=4).value)


# ---------------------------------------------------------------------------------------------
# Registration, config format and the remote path


def test_spec_and_example():
    spec = registry.get("yolov9_loss")
    assert spec.fn is yolov9_loss and spec.families == ("netspresso",)
    with pytest.raises(InvalidArgument, match="l1_activate_epoch"):
        spec.canonical_params({})
    assert spec.canonical_params({"l1_activate_epoch": None})["reg_max"] == 16
    with pytest.raises(InvalidArgument):
        spec.canonical_params({"l1_activate_epoch": None, "reg_max": 1})
    for dtype in (torch.float32, torch.float64):
        args, kwargs, params = spec.make_example(dtype)
        r = spec.fn(*args, **kwargs, **spec.canonical_params(params))
        assert r.value.dtype == dtype and torch.isfinite(r.value)
        assert r.components["iou"] > 0


def test_config_entry_builds_through_from_config(endpoint):
    case = load_golden(GOLDEN_CASE)
    entry = {"criterion": "yolov9_loss", "weight": 2.0, **case["ctor"]}
    local = criteria_list(*case["args"], losses=[entry])
    torch.testing.assert_close(local.value, 2.0 * case["expected_loss"], **GOLDEN_TOL["float32"])
    yaml = "model:\n  losses:\n    - criterion: yolov9_loss\n      l1_activate_epoch: ~\n      weight: 2.0\n"
    with from_config(yaml, endpoint=endpoint) as crit:
        value = crit(*case["args"])
        torch.testing.assert_close(value, 2.0 * case["expected_loss"], **GOLDEN_TOL["float32"])
        assert set(crit.last_result.components) >= {"yolov9_loss", "yolov9_loss.dfl"}


def test_remote_refusal_names_the_path_and_the_server_keeps_serving(endpoint):
    case = load_golden(GOLDEN_CASE)
    bad = copy.deepcopy(case["args"])
    bad[0]["pred"][1] = bad[0]["pred"][1][:, :-1]
    assert_refused_then_served(
        endpoint, "yolov9_loss", case["ctor"], bad, case["args"], "args[0].pred[1]"
    )
    bad = copy.deepcopy(case["args"])
    bad[1]["gt"][0]["labels"][0] = 7
    assert_refused_then_served(
        endpoint, "yolov9_loss", case["ctor"], bad, case["args"], "args[1].gt[0].labels"
    )
