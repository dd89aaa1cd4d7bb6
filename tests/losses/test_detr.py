"""detr_loss (NetsPresso Trainer 1.4.1 DETRLoss, RT-DETR): the golden case, a brute-force
reference (every one-to-one assignment tried, each term written out per pair) for each parameter
and term, ragged multi-image GT with an empty image, the matcher by name only, upstream's crash
points, gradients (gradcheck where the terms carry no detached factor), the remote path and the
NetsPresso config build."""

from __future__ import annotations

import copy
import itertools
import math

import grpc
import pytest
import torch
from torch.autograd import gradcheck

import lossd.server.losses  # noqa: F401  (registers the specs)
from lossd.client import LossdError, RemoteLoss, from_config
from lossd.server import registry
from lossd.server.errors import InvalidArgument
from lossd.server.losses.detr import RT_DETR_MATCHER, RT_DETR_WEIGHTS, detr_loss
from lossd.server.losses.netspresso import criteria_list
from tests.support.golden import GOLDEN, GOLDEN_TOL, load_golden
from tests.support.losskit import run_example

C = 3
GOLDEN_CASE = GOLDEN / "netspresso" / "detr_loss__default.pt"


# ---------------------------------------------------------------------------------------------
# Inputs


def _layer(gen, batch, queries, channels):
    centres = 0.15 + 0.7 * torch.rand(batch, queries, 2, generator=gen, dtype=torch.float64)
    sizes = 0.05 + 0.4 * torch.rand(batch, queries, 2, generator=gen, dtype=torch.float64)
    logits = 1.5 * torch.randn(batch, queries, channels, generator=gen, dtype=torch.float64)
    return torch.cat((centres, sizes), -1), logits


def _inputs(seed=0, channels=C, queries=5, aux=1, dn=True, img=64, counts=(2, 0, 3)):
    """B = len(counts) images with ragged GT (an empty one), ``aux`` auxiliary layers, one
    denoising layer with two groups."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(counts)
    boxes, logits = _layer(gen, batch, queries, channels)
    out = {"pred": torch.cat((boxes, logits), -1), "aux_pred": None, "dn_aux_pred": None}
    if aux:
        out["aux_pred"] = []
        for _ in range(aux):
            b, lg = _layer(gen, batch, queries, channels)
            out["aux_pred"].append({"pred_logits": lg, "pred_boxes": b})
    h, w = (img, img) if isinstance(img, int) else img
    gt = []
    for n in counts:
        xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.5
        wh = 0.1 + torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.4
        norm = torch.cat((xy, xy + wh), -1)
        scale = torch.tensor([w, h, w, h], dtype=torch.float64)
        # Distinct labels per image: a class-only cost then has no tie between GT boxes.
        labels = torch.randperm(C, generator=gen)[:n]
        gt.append({"boxes": norm * scale, "labels": labels})
    groups, num_dn = 2, 2 * max(counts)
    out["dn_meta"] = None
    if dn:
        b, lg = _layer(gen, batch, num_dn, channels)
        out["dn_aux_pred"] = [{"pred_logits": lg, "pred_boxes": b}]
        positive = tuple(
            torch.randperm(num_dn, generator=gen)[: n * groups]
            if n
            else torch.zeros(0, dtype=torch.int64)
            for n in counts
        )
        out["dn_meta"] = {
            "dn_positive_idx": positive,
            "dn_num_group": groups,
            "dn_num_split": [num_dn, queries],
        }
    return out, {"gt": gt, "img_size": img, "num_classes": C}


def _params(**over):
    params = {
        "matcher": copy.deepcopy(RT_DETR_MATCHER),
        "weight_dict": dict(RT_DETR_WEIGHTS),
        "losses": ["vfl", "boxes"],
        "alpha": 0.75,
        "gamma": 2.0,
    }
    params.update(over)
    return params


# ---------------------------------------------------------------------------------------------
# The reference: plain per-pair formulas and an exhaustive assignment search.


def _xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), -1)


def _iou_giou(a, b):
    """IoU and GIoU of two single xyxy boxes."""
    iw = (torch.min(a[2], b[2]) - torch.max(a[0], b[0])).clamp(min=0)
    ih = (torch.min(a[3], b[3]) - torch.max(a[1], b[1])).clamp(min=0)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (torch.max(a[2], b[2]) - torch.min(a[0], b[0])) * (
        torch.max(a[3], b[3]) - torch.min(a[1], b[1])
    )
    return inter / union, inter / union - (hull - union) / hull


def _normalised(target):
    img = target["img_size"]
    h, w = (img, img) if isinstance(img, int) else img
    scale = torch.tensor([w, h, w, h], dtype=torch.float64)
    return [(g["boxes"] / scale, g["labels"]) for g in target["gt"]]


def _cost(logits, boxes, gt_boxes, gt_labels, m):
    """Cost matrix (Q, n) written pair by pair."""
    w = m["weight_dict"]
    rows = []
    for q in range(boxes.shape[0]):
        row = []
        for j in range(gt_boxes.shape[0]):
            c = int(gt_labels[j])
            if m["use_focal_loss"]:
                p = torch.sigmoid(logits[q, c])
                a, g = m["alpha"], m["gamma"]
                cls = a * (1 - p) ** g * -torch.log(p + 1e-8) - (1 - a) * p**g * -torch.log(
                    1 - p + 1e-8
                )
            else:
                cls = -torch.softmax(logits[q], -1)[c]
            g_cxcywh = torch.stack(
                (
                    (gt_boxes[j, 0] + gt_boxes[j, 2]) / 2,
                    (gt_boxes[j, 1] + gt_boxes[j, 3]) / 2,
                    gt_boxes[j, 2] - gt_boxes[j, 0],
                    gt_boxes[j, 3] - gt_boxes[j, 1],
                )
            )
            l1 = (boxes[q] - g_cxcywh).abs().sum()
            giou = _iou_giou(_xyxy(boxes[q]), gt_boxes[j])[1]
            row.append(
                float(
                    (w["cost_bbox"] * l1 + w["cost_class"] * cls - w["cost_giou"] * giou).detach()
                )
            )
        rows.append(row)
    return rows


def _brute_force(rows, queries, n):
    best, best_pairs = math.inf, None
    for perm in itertools.permutations(range(queries), n):
        total = sum(rows[q][j] for j, q in enumerate(perm))
        if total < best - 1e-12:
            best, best_pairs = total, [(q, j) for j, q in enumerate(perm)]
    return best_pairs or []


def _layer_terms(logits, boxes, images, pairs, num_boxes, params, num_classes):
    alpha, gamma = params["alpha"], params["gamma"]
    batch, queries, channels = logits.shape
    terms = {}
    target = torch.zeros(batch, queries, channels, dtype=torch.float64)
    score = torch.zeros(batch, queries, channels, dtype=torch.float64)
    classes = torch.full((batch, queries), num_classes)
    l1 = giou_sum = logits.sum() * 0
    for b, ((gt_boxes, gt_labels), image_pairs) in enumerate(zip(images, pairs, strict=True)):
        for q, j in image_pairs:
            c = int(gt_labels[j])
            classes[b, q] = c
            if c < channels:
                target[b, q, c] = 1.0
            src = _xyxy(boxes[b, q])
            iou, giou = _iou_giou(src, gt_boxes[j])
            score[b, q, c if c < channels else 0] = iou.detach() if c < channels else 0
            g = gt_boxes[j]
            g_cxcywh = torch.stack(((g[0] + g[2]) / 2, (g[1] + g[3]) / 2, g[2] - g[0], g[3] - g[1]))
            l1 = l1 + (boxes[b, q] - g_cxcywh).abs().sum()
            giou_sum = giou_sum + (1 - giou)
    for name in params["losses"]:
        if name == "boxes":
            terms["loss_bbox"] = l1 / num_boxes
            terms["loss_giou"] = giou_sum / num_boxes
        elif name == "vfl":
            p = torch.sigmoid(logits)
            weight = alpha * p.detach() ** gamma * (1 - target) + score
            bce = -(score * torch.log(p) + (1 - score) * torch.log(1 - p))
            terms["loss_vfl"] = (weight * bce).sum() / queries * queries / num_boxes
        elif name == "focal":
            p = torch.sigmoid(logits)
            bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
            p_t = p * target + (1 - p) * (1 - target)
            loss = bce * (1 - p_t) ** gamma
            if alpha >= 0:
                loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
            terms["loss_focal"] = loss.sum() / queries * queries / num_boxes
        elif name == "labels":
            weight = torch.ones(num_classes + 1, dtype=torch.float64)
            weight[-1] = 1e-4
            logp = torch.log_softmax(logits, -1)
            w = weight[classes]
            terms["loss_ce"] = -(w * logp.gather(-1, classes[..., None])[..., 0]).sum() / w.sum()
            matched = [(b, q, int(images[b][1][j])) for b, ps in enumerate(pairs) for q, j in ps]
            right = sum(int(logits[b, q].argmax()) == c for b, q, c in matched)
            # float32, as upstream's accuracy
            accuracy = torch.tensor(float(right)) * (100.0 / len(matched)) if matched else 0.0
            terms["class_error"] = 100 - torch.as_tensor(accuracy, dtype=torch.float32)
        elif name == "cardinality":
            counts = (logits.argmax(-1) != channels - 1).sum(1).float()
            lengths = torch.tensor([float(lab.shape[0]) for _, lab in images])  # float32
            terms["cardinality_error"] = (counts - lengths).abs().mean()
    return terms


def reference(out, target, params):
    images = _normalised(target)
    num_boxes = max(sum(lab.shape[0] for _, lab in images), 1)
    m = params["matcher"]
    result = {}

    def layer(logits, boxes, pairs, norm, suffix):
        terms = _layer_terms(logits, boxes, images, pairs, norm, params, target["num_classes"])
        for k, v in terms.items():
            if k in params["weight_dict"]:
                result[k + suffix] = v * params["weight_dict"][k]

    def match(logits, boxes):
        return [
            _brute_force(_cost(logits[b], boxes[b], g, lab, m), boxes.shape[1], lab.shape[0])
            for b, (g, lab) in enumerate(images)
        ]

    main_logits, main_boxes = out["pred"][..., 4:], out["pred"][..., :4]
    layer(main_logits, main_boxes, match(main_logits, main_boxes), num_boxes, "")
    for i, aux in enumerate(out["aux_pred"] or []):
        pairs = match(aux["pred_logits"], aux["pred_boxes"])
        layer(aux["pred_logits"], aux["pred_boxes"], pairs, num_boxes, f"_aux_{i}")
    if out["dn_aux_pred"] is not None:
        meta = out["dn_meta"]
        groups = meta["dn_num_group"]
        pairs = [
            [(int(q), k % lab.shape[0]) for k, q in enumerate(meta["dn_positive_idx"][b].tolist())]
            if lab.shape[0]
            else []
            for b, (_, lab) in enumerate(images)
        ]
        for i, dn in enumerate(out["dn_aux_pred"]):
            layer(dn["pred_logits"], dn["pred_boxes"], pairs, num_boxes * groups, f"_dn_{i}")
    return result


def _assert_matches_reference(out, target, params):
    result = detr_loss(out, target, **params)
    expected = reference(out, target, params)
    assert set(result.components) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(
            result.components[k].double(), v.detach().double(), rtol=1e-10, atol=1e-12, msg=k
        )
    torch.testing.assert_close(
        result.value, sum(expected.values()).to(result.value.dtype), rtol=1e-10, atol=1e-12
    )
    return result, expected


# ---------------------------------------------------------------------------------------------
# Golden and reference values


def test_golden_case_matches_the_reference():
    case = load_golden(GOLDEN_CASE)
    result, _ = _assert_matches_reference(*case["args"], case["ctor"])
    torch.testing.assert_close(result.value, case["expected_loss"], **GOLDEN_TOL["float64"])


def test_ragged_multi_image_with_an_empty_image_and_aux_and_dn_layers():
    out, target = _inputs(seed=1, aux=2, counts=(2, 0, 3))
    result, expected = _assert_matches_reference(out, target, _params())
    assert {"loss_vfl_aux_1", "loss_giou_dn_0"} <= set(expected)
    assert len(result.components) == 3 * (1 + 2 + 1)


@pytest.mark.parametrize(
    "matcher_change",
    [
        {"use_focal_loss": False},
        {"weight_dict": {"cost_class": 0, "cost_bbox": 1, "cost_giou": 0}},
        {"weight_dict": {"cost_class": 5, "cost_bbox": 0, "cost_giou": 0}},
        {"weight_dict": {"cost_class": 0, "cost_bbox": 0, "cost_giou": 3.5}},
        {"alpha": 0.6, "gamma": 0.5},
    ],
    ids=["softmax", "bbox-only", "class-only", "giou-only", "alpha-gamma"],
)
def test_matcher_parameters(matcher_change):
    out, target = _inputs(seed=2)
    params = _params()
    params["matcher"].update(matcher_change)
    _assert_matches_reference(out, target, params)


def test_matcher_cost_weights_change_the_assignment():
    out, target = _inputs(seed=3, aux=0, dn=False, counts=(3,), queries=4)
    values = set()
    for costs in (
        {"cost_class": 0, "cost_bbox": 1, "cost_giou": 0},
        {"cost_class": 1, "cost_bbox": 0, "cost_giou": 0},
    ):
        params = _params(losses=["boxes"])
        params["matcher"]["weight_dict"] = costs
        values.add(round(detr_loss(out, target, **params).value.item(), 9))
    assert len(values) == 2


@pytest.mark.parametrize(
    ("losses", "weights", "channels"),
    [
        (["vfl"], {"loss_vfl": 1.5}, C),
        (["boxes"], {"loss_bbox": 5, "loss_giou": 2}, C),
        (["focal", "boxes"], {"loss_focal": 2.0, "loss_bbox": 5, "loss_giou": 2}, C),
        (["focal", "cardinality"], {"loss_focal": 1, "cardinality_error": 0.5}, C),
        (["labels", "boxes"], {"loss_ce": 1, "class_error": 0.1, "loss_giou": 1}, C + 1),
        (["labels", "cardinality"], {"loss_ce": 2, "cardinality_error": 1}, C + 1),
        (["vfl", "vfl", "boxes"], {"loss_vfl": 1, "loss_bbox": 1}, C),  # repeated: counted once
    ],
)
def test_loss_terms_and_weight_dict(losses, weights, channels):
    out, target = _inputs(seed=4, channels=channels)
    params = _params(losses=losses, weight_dict=weights)
    if "labels" in losses:
        params["matcher"]["use_focal_loss"] = False
    _assert_matches_reference(out, target, params)


@pytest.mark.parametrize(("alpha", "gamma"), [(0.2, 2.0), (0.5, 1.0), (1.0, 0.0), (0.25, 3.0)])
@pytest.mark.parametrize("term", ["vfl", "focal"])
def test_alpha_and_gamma(term, alpha, gamma):
    out, target = _inputs(seed=5)
    params = _params(losses=[term], weight_dict={f"loss_{term}": 1}, alpha=alpha, gamma=gamma)
    _assert_matches_reference(out, target, params)


def test_focal_with_negative_alpha_disables_balancing():
    out, target = _inputs(seed=5)
    _assert_matches_reference(
        out, target, _params(losses=["focal"], weight_dict={"loss_focal": 1}, alpha=-1)
    )


@pytest.mark.parametrize("img", [64, (48, 80), [80, 48]])
def test_img_size_int_or_height_width(img):
    out, target = _inputs(seed=6, img=img)
    _assert_matches_reference(out, target, _params())


def test_without_aux_or_denoising_layers():
    out, target = _inputs(seed=7, aux=0, dn=False)
    result, _ = _assert_matches_reference(out, target, _params())
    assert set(result.components) == {"loss_vfl", "loss_bbox", "loss_giou"}


def test_an_empty_denoising_list_adds_no_term():
    # Upstream still checks the index counts against the GT (asserted), then loops over nothing.
    out, target = _inputs(seed=8)
    out["dn_aux_pred"] = []
    result, _ = _assert_matches_reference(out, target, _params())
    assert not any("_dn_" in k for k in result.components)
    out["dn_meta"]["dn_positive_idx"] = (torch.tensor([0]),) + out["dn_meta"]["dn_positive_idx"][1:]
    with pytest.raises(InvalidArgument) as err:
        detr_loss(out, target, **_params())
    assert err.value.field == "out.dn_meta.dn_positive_idx[0]"


def test_no_ground_truth_in_the_batch():
    out, target = _inputs(seed=8, counts=(0, 0), dn=False)
    result, _ = _assert_matches_reference(out, target, _params())
    assert result.components["loss_bbox"] == 0 and result.components["loss_vfl"] > 0


def test_float32_close_to_float64():
    out, target = _inputs(seed=9)
    r64 = detr_loss(out, target, **_params())

    def f32(obj):
        if isinstance(obj, torch.Tensor):
            return obj.float() if obj.is_floating_point() else obj
        if isinstance(obj, dict):
            return {k: f32(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(f32(v) for v in obj)
        return obj

    r32 = detr_loss(f32(out), f32(target), **_params())
    assert r32.value.dtype == torch.float32
    assert r32.value.item() == pytest.approx(r64.value.item(), rel=1e-5)


def test_caller_target_is_not_modified_and_calls_repeat():
    out, target = _inputs(seed=10)
    boxes = [g["boxes"] for g in target["gt"]]
    copies = [b.clone() for b in boxes]
    first = detr_loss(out, target, **_params())
    second = detr_loss(out, target, **_params())  # upstream would normalise twice
    assert torch.equal(first.value, second.value)
    for g, b, c in zip(target["gt"], boxes, copies, strict=True):
        assert g["boxes"] is b and torch.equal(b, c)


# ---------------------------------------------------------------------------------------------
# Gradients


def _flat_leaves(out):
    leaves = [out["pred"]]
    for key in ("aux_pred", "dn_aux_pred"):
        for layer in out[key] or []:
            leaves += [layer["pred_logits"], layer["pred_boxes"]]
    return leaves


def _rebuild(out, leaves):
    it = iter(leaves)
    new = {**out, "pred": next(it)}
    for key in ("aux_pred", "dn_aux_pred"):
        if out[key] is not None:
            new[key] = [{"pred_logits": next(it), "pred_boxes": next(it)} for _ in out[key]]
    return new


@pytest.mark.parametrize(
    ("losses", "weights", "channels"),
    [
        (["focal", "boxes"], {"loss_focal": 1, "loss_bbox": 5, "loss_giou": 2}, C),
        (["labels", "boxes"], {"loss_ce": 1, "loss_bbox": 1, "loss_giou": 1}, C + 1),
    ],
)
def test_gradcheck_every_output_tensor(losses, weights, channels):
    # These terms have no detached factor, so finite differences see what autograd sees (the
    # matching is piecewise constant and far from a tie in this small case).
    out, target = _inputs(seed=11, channels=channels, queries=3, counts=(2, 0))
    params = _params(losses=losses, weight_dict=weights)
    params["matcher"]["use_focal_loss"] = channels == C
    leaves = [t.clone().requires_grad_(True) for t in _flat_leaves(out)]

    def fn(*xs):
        return detr_loss(_rebuild(out, xs), target, **params).value

    assert gradcheck(fn, leaves, eps=1e-6, atol=1e-6, fast_mode=True)


def test_vfl_gradients_equal_the_reference():
    # VFL detaches the IoU target and the focal weight (as upstream), so compare with the
    # reference's autograd rather than finite differences.
    out, target = _inputs(seed=12)
    params = _params()
    leaves = [t.clone().requires_grad_(True) for t in _flat_leaves(out)]
    got = torch.autograd.grad(detr_loss(_rebuild(out, leaves), target, **params).value, leaves)
    want = torch.autograd.grad(
        sum(reference(_rebuild(out, leaves), target, params).values()), leaves
    )
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Refusals: each names its field


BAD = [
    (lambda o, t, p: o.pop("aux_pred"), "out.aux_pred"),
    (lambda o, t, p: o.__setitem__("aux_pred", o["aux_pred"][0]), "out.aux_pred"),
    (lambda o, t, p: o["aux_pred"][0].pop("pred_boxes"), "out.aux_pred[0].pred_boxes"),
    (
        lambda o, t, p: o["aux_pred"][0].__setitem__("pred_logits", torch.zeros(3, 5, C + 1)),
        "out.aux_pred[0].pred_logits",
    ),
    (
        lambda o, t, p: o["aux_pred"][0].__setitem__("pred_boxes", torch.zeros(2, 5, 4)),
        "out.aux_pred[0].pred_boxes",
    ),
    (lambda o, t, p: o.__setitem__("pred", o["pred"][..., :-1]), "out.pred"),
    (lambda o, t, p: o.__setitem__("dn_meta", None), "out.dn_meta"),
    (
        lambda o, t, p: o["dn_meta"]["dn_positive_idx"].__setitem__(0, torch.tensor([0, 1])),
        "out.dn_meta.dn_positive_idx[0]",
    ),
    (
        lambda o, t, p: o["dn_meta"]["dn_positive_idx"].__setitem__(0, torch.tensor([0, 1, 2, 99])),
        "out.dn_meta.dn_positive_idx[0]",
    ),
    (lambda o, t, p: t["gt"][2]["labels"].__setitem__(0, C), "target.gt[2].labels"),
    (lambda o, t, p: t["gt"][2]["labels"].__setitem__(0, -1), "target.gt[2].labels"),
    (lambda o, t, p: t["gt"].pop(), "target.gt"),
    (lambda o, t, p: t["gt"][0].pop("boxes"), "target.gt[0].boxes"),
    (
        lambda o, t, p: t["gt"][0].__setitem__("boxes", t["gt"][0]["boxes"][:1]),
        "target.gt[0].boxes",
    ),
    (
        lambda o, t, p: t["gt"][0]["boxes"].__setitem__(0, torch.tensor([30.0, 5.0, 10.0, 20.0])),
        "target.gt[0].boxes[0]",
    ),
    (
        lambda o, t, p: t["gt"][2]["boxes"].__setitem__((1, 2), float("inf")),
        "target.gt[2].boxes[1]",
    ),
    (lambda o, t, p: o.__setitem__("pred", o["pred"][:, :0]), "out.pred"),
    (
        lambda o, t, p: o["aux_pred"][0].update(
            pred_logits=o["aux_pred"][0]["pred_logits"][:, :0],
            pred_boxes=o["aux_pred"][0]["pred_boxes"][:, :0],
        ),
        "out.aux_pred[0].pred_logits",
    ),
    (lambda o, t, p: t.pop("num_classes"), "target.num_classes"),
    (lambda o, t, p: t.__setitem__("img_size", (64, 64, 3)), "target.img_size"),
    (lambda o, t, p: o["pred"].__setitem__((1, 2, 2), -0.1), "out.pred[1][2]"),
    (
        lambda o, t, p: o["aux_pred"][0]["pred_boxes"].__setitem__((0, 3, 3), float("nan")),
        "out.aux_pred[0].pred_boxes[0][3]",
    ),
    (
        lambda o, t, p: p["matcher"].__setitem__("type", "__import__('os').system('id')"),
        "params.matcher.type",
    ),
    (lambda o, t, p: p["matcher"].pop("use_focal_loss"), "params.matcher.use_focal_loss"),
    (
        lambda o, t, p: p["matcher"]["weight_dict"].pop("cost_giou"),
        "params.matcher.weight_dict.cost_giou",
    ),
    (
        lambda o, t, p: p["matcher"].__setitem__(
            "weight_dict", {"cost_class": 0, "cost_bbox": 0, "cost_giou": 0}
        ),
        "params.matcher.weight_dict",
    ),
    (lambda o, t, p: p.__setitem__("losses", ["masks"]), "params.losses[0]"),
    (lambda o, t, p: p.__setitem__("weight_dict", {"loss_ce": 1}), "params.weight_dict"),
    (lambda o, t, p: p.__setitem__("losses", ["labels", "vfl"]), "params.losses"),
    (lambda o, t, p: p.__setitem__("losses", ["labels"]), "out.pred"),
    (lambda o, t, p: p.update(losses=["focal"], alpha=1.5), "params.alpha"),
]


@pytest.mark.parametrize(("mutate", "field"), BAD, ids=[f for _, f in BAD])
def test_bad_structure_names_the_field(mutate, field):
    out, target = _inputs(seed=13)
    out["dn_meta"]["dn_positive_idx"] = list(out["dn_meta"]["dn_positive_idx"])
    params = _params()
    mutate(out, target, params)
    with pytest.raises(InvalidArgument) as err:
        detr_loss(out, target, **params)
    assert err.value.field == field, err.value.message


# ---------------------------------------------------------------------------------------------
# Registration, config format and the remote path


def test_spec_and_example():
    spec = registry.get("detr_loss")
    assert spec.fn is detr_loss and spec.families == ("netspresso",)
    with pytest.raises(InvalidArgument, match="matcher"):
        spec.canonical_params({})
    for dtype in (torch.float32, torch.float64):
        run_example(spec, dtype)


def test_config_entry_builds_through_from_config(endpoint):
    case = load_golden(GOLDEN_CASE)
    entry = {"criterion": "detr_loss", "weight": 0.5, **case["ctor"]}
    local = criteria_list(*copy.deepcopy(case["args"]), losses=[entry])
    torch.testing.assert_close(local.value, 0.5 * case["expected_loss"], **GOLDEN_TOL["float64"])
    with from_config({"model": {"losses": [entry]}}, endpoint=endpoint) as crit:
        value = crit(*case["args"])
        assert crit.name == "losses"
        torch.testing.assert_close(value, 0.5 * case["expected_loss"], **GOLDEN_TOL["float64"])
        assert "detr_loss.loss_vfl_dn_1" in crit.last_result.components


def test_remote_refusal_names_the_path_and_the_server_keeps_serving(endpoint):
    case = load_golden(GOLDEN_CASE)
    bad = copy.deepcopy(case["args"])
    bad[0]["aux_pred"][1].pop("pred_logits")
    with RemoteLoss("detr_loss", endpoint=endpoint, **case["ctor"]) as crit:
        with pytest.raises(LossdError) as err:
            crit(*bad)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.field == "args[0].aux_pred[1].pred_logits"
        with pytest.raises(LossdError) as err:
            RemoteLoss(
                "detr_loss",
                endpoint=endpoint,
                **{**case["ctor"], "matcher": {**case["ctor"]["matcher"], "type": "eval"}},
            )(*case["args"])
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.field == "params.matcher.type"
        torch.testing.assert_close(
            crit(*case["args"]), case["expected_loss"], **GOLDEN_TOL["float64"]
        )
