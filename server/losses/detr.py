"""NetsPresso Trainer 1.4.1 ``detr_loss``: the RT-DETR set criterion with Hungarian matching.

Each decoder output (the last layer, every auxiliary layer) is matched one-to-one to the ground
truth by minimising a class + L1 + GIoU cost with ``scipy.optimize.linear_sum_assignment`` (the
solver upstream uses, so ties resolve the same way); the denoising layers are matched by the
indices the model recorded in ``dn_meta``. The requested terms (``vfl``, ``boxes``, ``focal``,
``labels``, ``cardinality``) are computed per layer, weighted by ``weight_dict`` and summed.
The arithmetic follows upstream step by step, so values and gradients match.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..errors import InvalidArgument
from ..registry import REQUIRED, LossOutput, LossSpec, Param
from ._checks import require_key, require_tensor
from ._detection import (
    GT_TARGET,
    check_xyxy,
    cxcywh_to_xyxy,
    first_bad,
    ground_truth,
    image_hw,
    plain_int,
    sequence,
    xyxy_to_cxcywh,
)
from .netspresso import _sigmoid_focal_elementwise, model_output

#: The matcher types upstream can name (it evaluates ``matcher.type`` as code in its module). lossd never
#: evaluates client text: the type is looked up by name.
MATCHER_TYPES = ("HungarianMatcher",)
TERMS = ("labels", "boxes", "cardinality", "focal", "vfl")
_COSTS = ("cost_class", "cost_bbox", "cost_giou")
_MATCHER_EPS = 1e-8
_NO_OBJECT_WEIGHT = 1e-4
_PRED_BOX_WHY = "w, h >= 0 in cxcywh: upstream's transform_bbox asserts it"


# --------------------------------------------------------------------------------------------
# Parameters


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument.expected(field, "a number", type(value).__name__)
    return value


def _check_matcher(matcher: Mapping[str, Any]) -> dict[str, Any]:
    where = "params.matcher"
    kind = require_key(matcher, "type", where)
    if kind not in MATCHER_TYPES:
        raise InvalidArgument.expected(
            f"{where}.type",
            f"a matcher type by name: one of {', '.join(MATCHER_TYPES)} (lossd never evaluates config text)",
            repr(kind),
        )
    costs = require_key(matcher, "weight_dict", where)
    weights = {
        c: _number(require_key(costs, c, f"{where}.weight_dict"), f"{where}.weight_dict.{c}")
        for c in _COSTS
    }
    if all(w == 0 for w in weights.values()):
        # Upstream: AssertionError "All costs can't be zeros."
        raise InvalidArgument.expected(
            f"{where}.weight_dict",
            "at least one non-zero cost",
            "all costs 0",
            upstream="AssertionError",
        )
    use_focal = require_key(matcher, "use_focal_loss", where)
    if not isinstance(use_focal, bool):
        raise InvalidArgument.expected(
            f"{where}.use_focal_loss", "a bool", type(use_focal).__name__
        )
    return {
        **weights,
        "alpha": _number(require_key(matcher, "alpha", where), f"{where}.alpha"),
        "gamma": _number(require_key(matcher, "gamma", where), f"{where}.gamma"),
        "use_focal_loss": use_focal,
    }


def _check_terms(losses: list, weight_dict: Mapping[str, Any], alpha: float) -> list[str]:
    for i, term in enumerate(losses):
        if term not in TERMS:
            # Upstream asserts "do you really want to compute {loss} loss?" ('masks' included).
            raise InvalidArgument.expected(
                f"params.losses[{i}]",
                f"one of {', '.join(TERMS)}",
                repr(term),
                upstream="AssertionError",
            )
    for key, w in weight_dict.items():
        _number(w, f"params.weight_dict.{key}")
    if "focal" in losses and not (0 <= alpha <= 1) and alpha != -1:
        # torchvision's sigmoid_focal_loss refuses such an alpha with ValueError.
        raise InvalidArgument.expected(
            "params.alpha",
            "a value in [0, 1] or -1 (the 'focal' term)",
            alpha,
            upstream="ValueError",
        )
    return list(losses)


# --------------------------------------------------------------------------------------------
# Inputs


def _layer(value: Any, where: str, batch: int, channels: int, like: Tensor) -> dict[str, Tensor]:
    layer = {}
    for key, last in (("pred_logits", channels), ("pred_boxes", 4)):
        t = require_tensor(require_key(value, key, where), f"{where}.{key}", floating=True, dim=3)
        if t.shape[0] != batch or t.shape[2] != last:
            raise InvalidArgument.expected(
                f"{where}.{key}", f"shape ({batch}, Q, {last})", f"shape {list(t.shape)}"
            )
        if t.dtype != like.dtype or t.device != like.device:
            raise InvalidArgument.expected(
                f"{where}.{key}",
                f"dtype {str(like.dtype).removeprefix('torch.')} on {like.device} (as out.pred)",
                f"{str(t.dtype).removeprefix('torch.')} on {t.device}",
            )
        layer[key] = t
    if layer["pred_logits"].shape[1] != layer["pred_boxes"].shape[1]:
        raise InvalidArgument.expected(
            f"{where}.pred_boxes",
            f"{layer['pred_logits'].shape[1]} queries (as {where}.pred_logits)",
            f"shape {list(layer['pred_boxes'].shape)}",
        )
    return layer


def _layers(out: Mapping[str, Any], key: str, batch: int, channels: int, like: Tensor):
    value = require_key(out, key, "out")
    if value is None:
        return None
    items = sequence(value, f"out.{key}", "a list of {'pred_logits', 'pred_boxes'} dicts or None")
    return [_layer(v, f"out.{key}[{i}]", batch, channels, like) for i, v in enumerate(items)]


def _dn_indices(
    dn_meta: Any, images: list[tuple[Tensor, Tensor]], num_dn: int | None
) -> tuple[list[tuple[Tensor, Tensor]], int]:
    """Denoising matches ``(dn_positive_idx[i], arange(n_i) tiled dn_num_group times)`` per image."""
    where = "out.dn_meta"
    if not isinstance(dn_meta, Mapping):
        raise InvalidArgument.expected(
            where, "a dict (out.dn_aux_pred is given)", type(dn_meta).__name__
        )
    groups = plain_int(require_key(dn_meta, "dn_num_group", where), f"{where}.dn_num_group", 0)
    positive = sequence(
        require_key(dn_meta, "dn_positive_idx", where),
        f"{where}.dn_positive_idx",
        "one int64 index tensor per image",
    )
    if len(positive) != len(images):
        raise InvalidArgument.expected(
            f"{where}.dn_positive_idx", f"{len(images)} entries, one per image", f"{len(positive)}"
        )
    indices = []
    for i, (_, labels) in enumerate(images):
        num_gt = labels.shape[0]
        if num_gt == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=labels.device)
            indices.append((empty, empty))
            continue
        field = f"{where}.dn_positive_idx[{i}]"
        idx = require_tensor(positive[i], field, floating=False, dim=1)
        if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise InvalidArgument.expected(field, "an integer tensor", str(idx.dtype))
        if idx.shape[0] != num_gt * groups:
            # Upstream asserts len(dn_positive_idx[i]) == num_gt * dn_num_group.
            raise InvalidArgument.expected(
                field,
                f"{num_gt * groups} indices (n_gt {num_gt} x dn_num_group {groups})",
                f"{idx.shape[0]}",
                upstream="AssertionError",
            )
        if num_dn is not None and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_dn):
            raise InvalidArgument.expected(
                field, f"query indices in [0, {num_dn}) (the denoising queries)", idx.tolist()
            )
        gt_idx = torch.arange(num_gt, dtype=torch.int64, device=labels.device).tile(groups)
        indices.append((idx.to(torch.int64), gt_idx))
    return indices, groups


# --------------------------------------------------------------------------------------------
# Box arithmetic (upstream's own box_iou / generalized_box_iou, taken on the diagonal)


def _area(boxes: Tensor) -> Tensor:
    # torchvision's box_area upcasts half precision to float32.
    if boxes.dtype in (torch.float16, torch.bfloat16):
        boxes = boxes.float()
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _iou_union(a: Tensor, b: Tensor, pairwise: bool) -> tuple[Tensor, Tensor]:
    if pairwise:
        a_area, b_area, a = _area(a)[:, None], _area(b), a[:, None]
    else:
        a_area, b_area = _area(a), _area(b)
    wh = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = a_area + b_area - inter
    return inter / union, union


def _giou(a: Tensor, b: Tensor, pairwise: bool) -> Tensor:
    iou, union = _iou_union(a, b, pairwise)
    if pairwise:
        a = a[:, None]
    wh = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area


# --------------------------------------------------------------------------------------------
# Matching


@torch.no_grad()
def hungarian_match(
    layer: dict[str, Tensor],
    images: list[tuple[Tensor, Tensor]],
    m: dict[str, Any],
    field: str,
) -> list[tuple[Tensor, Tensor]]:
    """One-to-one (query, GT) pairs per image minimising ``cost_bbox * L1 + cost_class * class +
    cost_giou * -GIoU`` (boxes normalised, L1 in cxcywh, GIoU in xyxy)."""
    logits, boxes = layer["pred_logits"], layer["pred_boxes"]
    bs, num_queries = logits.shape[:2]
    flat = logits.flatten(0, 1)
    prob = torch.sigmoid(flat) if m["use_focal_loss"] else flat.softmax(-1)
    out_bbox = boxes.flatten(0, 1)
    tgt_ids = torch.cat([labels for _, labels in images])
    tgt_bbox = torch.cat([b for b, _ in images])
    prob = prob[:, tgt_ids]
    if m["use_focal_loss"]:
        alpha, gamma = m["alpha"], m["gamma"]
        neg = (1 - alpha) * (prob**gamma) * (-(1 - prob + _MATCHER_EPS).log())
        pos = alpha * ((1 - prob) ** gamma) * (-(prob + _MATCHER_EPS).log())
        cost_class = pos - neg
    else:
        cost_class = -prob
    tgt_cxcywh = xyxy_to_cxcywh(tgt_bbox)
    if out_bbox.dtype in (torch.float16, torch.bfloat16):
        # CPU cdist has no half kernel; autocast runs it in float32, and so does lossd always.
        out_bbox, tgt_cxcywh = out_bbox.float(), tgt_cxcywh.float()
    cost_bbox = torch.cdist(out_bbox, tgt_cxcywh, p=1)
    out_xyxy = cxcywh_to_xyxy(boxes)
    check_xyxy(out_xyxy, field, _PRED_BOX_WHY)
    cost_giou = -_giou(out_xyxy.flatten(0, 1), tgt_bbox, pairwise=True)
    cost = m["cost_bbox"] * cost_bbox + m["cost_class"] * cost_class + m["cost_giou"] * cost_giou
    cost = cost.view(bs, num_queries, -1).cpu()
    indices = []
    for i, c in enumerate(cost.split([labels.shape[0] for _, labels in images], -1)):
        try:
            rows, cols = linear_sum_assignment(c[i].double().numpy())
        except ValueError as err:  # NaN or infinite costs
            raise InvalidArgument(
                f"the matching cost of image {i} is not finite ({err}): check the predictions",
                field=field,
            ) from None
        indices.append(
            (
                torch.as_tensor(rows, dtype=torch.int64, device=logits.device),
                torch.as_tensor(cols, dtype=torch.int64, device=logits.device),
            )
        )
    return indices


# --------------------------------------------------------------------------------------------
# Terms


def _matched(indices, images):
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    labels = torch.cat([lab[j] for (_, lab), (_, j) in zip(images, indices, strict=True)])
    boxes = torch.cat([b[j] for (b, _), (_, j) in zip(images, indices, strict=True)], dim=0)
    return (batch_idx, src_idx), labels, boxes


def _matched_xyxy(boxes: Tensor, idx: tuple[Tensor, Tensor], field: str) -> Tensor:
    """The matched predictions in xyxy; upstream asserts w, h >= 0 on exactly these."""
    xyxy = cxcywh_to_xyxy(boxes[idx])
    bad = ~((xyxy[:, 2] >= xyxy[:, 0]) & (xyxy[:, 3] >= xyxy[:, 1]))
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        b, q = int(idx[0][j]), int(idx[1][j])
        raise InvalidArgument.expected(
            f"{field}[{b}][{q}]", f"a box with {_PRED_BOX_WHY}", boxes[b, q].tolist()
        )
    return xyxy


def _term(name, layer, images, indices, num_boxes, num_classes, alpha, gamma, field):
    """One upstream ``loss_*`` method: its unweighted dict of terms for one layer."""
    logits, boxes = layer["pred_logits"], layer["pred_boxes"]
    idx, tgt_labels, tgt_boxes = _matched(indices, images)
    classes = torch.full(logits.shape[:2], num_classes, dtype=torch.int64, device=logits.device)
    classes[idx] = tgt_labels
    queries = logits.shape[1]
    if name == "boxes":
        src = boxes[idx]
        src_xyxy = _matched_xyxy(boxes, idx, field)
        l1 = F.l1_loss(src, xyxy_to_cxcywh(tgt_boxes), reduction="none")
        giou = 1 - _giou(src_xyxy, tgt_boxes, pairwise=False)
        return {"loss_bbox": l1.sum() / num_boxes, "loss_giou": giou.sum() / num_boxes}
    if name == "vfl":
        src_xyxy = _matched_xyxy(boxes, idx, field)
        ious = _iou_union(src_xyxy, tgt_boxes, pairwise=False)[0].detach()
        onehot = F.one_hot(classes, num_classes=num_classes + 1)[..., :-1]
        score_o = torch.zeros_like(classes, dtype=logits.dtype)
        score_o[idx] = ious.to(score_o.dtype)
        score = score_o.unsqueeze(-1) * onehot
        weight = alpha * torch.sigmoid(logits).detach().pow(gamma) * (1 - onehot) + score
        loss = F.binary_cross_entropy_with_logits(logits, score, weight=weight, reduction="none")
        return {"loss_vfl": loss.mean(1).sum() * queries / num_boxes}
    if name == "focal":
        # Upstream hands torchvision an int64 one-hot target and crashes in BCE; lossd computes
        # the evident intent, the same one-hot as floats.
        onehot = F.one_hot(classes, num_classes=num_classes + 1)[..., :-1].to(logits.dtype)
        loss = _sigmoid_focal_elementwise(logits, onehot, alpha, gamma)
        return {"loss_focal": loss.mean(1).sum() * queries / num_boxes}
    if name == "labels":
        # Upstream's no-object weight vector is float32 whatever the logits' dtype (a float64
        # call crashes); lossd builds it in the logits' dtype.
        weight = torch.ones(num_classes + 1, dtype=logits.dtype, device=logits.device)
        weight[-1] = _NO_OBJECT_WEIGHT
        loss_ce = F.cross_entropy(logits.transpose(1, 2), classes, weight)
        with torch.no_grad():
            if tgt_labels.numel() == 0:
                accuracy = torch.zeros([], device=logits.device)
            else:
                top = logits[idx].topk(1, 1, True, True).indices.t()
                correct = top.eq(tgt_labels.view(1, -1).expand_as(top))
                accuracy = correct[:1].reshape(-1).float().sum(0) * (100.0 / tgt_labels.shape[0])
        return {"loss_ce": loss_ce, "class_error": 100 - accuracy}
    # cardinality: logged by upstream, never differentiated
    with torch.no_grad():
        lengths = torch.as_tensor([lab.shape[0] for _, lab in images], device=logits.device)
        card = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card.float(), lengths.float())}


def _check_channels(terms: list[str], channels: int, num_classes: int) -> None:
    need = set()
    if "vfl" in terms or "focal" in terms:
        need.add(num_classes)
    if "labels" in terms:
        need.add(num_classes + 1)
    if len(need) > 1:
        raise InvalidArgument.expected(
            "params.losses",
            "not both 'labels' (C + 1 logits) and 'vfl'/'focal' (C logits)",
            ", ".join(terms),
        )
    if need and channels not in need:
        (want,) = need
        raise InvalidArgument.expected(
            "out.pred",
            f"4 + {want} channels (cxcywh + {want} logits for num_classes {num_classes} "
            f"and losses {', '.join(terms)})",
            f"{4 + channels} channels",
        )


def detr_loss(
    out: Mapping[str, Any],
    target: Mapping[str, Any],
    *,
    matcher: Mapping[str, Any],
    weight_dict: Mapping[str, Any],
    losses: list,
    alpha: float = 0.2,
    gamma: float = 2.0,
    cur_epoch: int | None = None,
) -> LossOutput:
    """RT-DETR loss: Hungarian-matched VFL / focal / CE classification and L1 + GIoU boxes, over
    the last decoder layer, every auxiliary layer and every denoising layer.

    Target boxes are normalised by the image size (``x / W``, ``y / H``; in a copy: the caller's
    target is left alone, unlike upstream). For each layer the requested ``losses`` give terms,
    each multiplied by ``weight_dict[term]`` and kept only if it is a key there; auxiliary
    layer ``i`` adds ``<term>_aux_<i>`` and denoising layer ``i`` adds ``<term>_dn_<i>``. With
    ``num_boxes = max(1, total GT)`` (times ``dn_num_group`` for the denoising layers) and
    ``Q`` the layer's query count:

    * ``vfl``: ``loss_vfl = sum_{b,c} mean_q BCEWithLogits(x, s, weight=alpha * sigmoid(x)^gamma
      * (1 - t) + s) * Q / num_boxes``, ``t`` the one-hot of the matched class, ``s = t * IoU``
      (IoU and ``sigmoid(x)`` detached);
    * ``focal``: the same reduction of torchvision's sigmoid focal loss (``alpha``, ``gamma``);
    * ``boxes``: ``loss_bbox = sum |b - g|_1 / num_boxes`` (cxcywh) and ``loss_giou =
      sum (1 - GIoU) / num_boxes`` over the matched pairs;
    * ``labels``: ``loss_ce``, cross-entropy over ``C + 1`` logits (no-object weight 1e-4), and
      ``class_error`` (100 - top-1 accuracy of the matched queries, no gradient);
    * ``cardinality``: ``cardinality_error``, the L1 error of the predicted box count (no gradient).

    Matching (no gradient): ``cost = cost_bbox * L1(cxcywh) + cost_class * class +
    cost_giou * -GIoU``, with ``class = alpha_m (1-p)^gamma_m (-log(p + 1e-8)) - (1 - alpha_m)
    p^gamma_m (-log(1 - p + 1e-8))``, ``p = sigmoid`` (``use_focal_loss``) or ``-softmax`` of the
    GT class, solved per image by ``scipy.optimize.linear_sum_assignment``.

    Args:
        out (dict): ``'pred'``: Tensor[B, Q, 4 + K] (normalised cxcywh boxes, then K logits);
            ``'aux_pred'``: list of ``{'pred_logits': [B, Q, K], 'pred_boxes': [B, Q, 4]}`` or
            None; ``'dn_aux_pred'``: the same over the denoising queries, or None;
            ``'dn_meta'``: ``{'dn_positive_idx': B int tensors, 'dn_num_group': int, ...}`` (or
            None without ``dn_aux_pred``). K = C for vfl/focal, C + 1 for labels.
        target (dict): ``'gt'``: B dicts ``{'boxes': Tensor[n_i, 4] xyxy pixels, 'labels':
            Tensor[n_i] int in [0, C)}`` (``n_i`` may be 0); ``'img_size'``: int or (H, W);
            ``'num_classes'``: C.
        matcher (dict): ``{type: 'HungarianMatcher', weight_dict: {cost_class, cost_bbox,
            cost_giou}, alpha, gamma, use_focal_loss}``.
        weight_dict (dict): term name (``loss_vfl``, ``loss_bbox``, ...) -> multiplier.
        losses (list): terms to compute, among ``labels, boxes, cardinality, focal, vfl``.
        alpha (float): VFL / focal alpha. Default: ``0.2``.
        gamma (float): VFL / focal gamma. Default: ``2.0``.
        cur_epoch (int, optional): the trainer's epoch counter; unused, as upstream.

    Returns:
        LossOutput: ``value`` the sum of the weighted terms (a scalar); ``components`` each
        weighted term under its upstream name. Gradients flow to every float tensor of ``out``.

    Raises:
        InvalidArgument: an unknown matcher type or term, labels outside [0, C), a box with
            x2 < x1 (GT) or w < 0 (prediction), a layer of the wrong shape, denoising indices
            that disagree with the GT count, no term in ``weight_dict``, non-finite costs.

    Reference:
        ``netspresso_trainer.losses.detection.rtdetr.DETRLoss`` and ``HungarianMatcher``
        (netspresso-trainer 1.4.1), after lyuwenyu/RT-DETR. Zhao et al., "DETRs Beat YOLOs on
        Real-time Object Detection", CVPR 2024.
    """
    m = _check_matcher(matcher)
    terms = _check_terms(losses, weight_dict, alpha)
    num_classes = plain_int(require_key(target, "num_classes", "target"), "target.num_classes", 1)
    height, width = image_hw(require_key(target, "img_size", "target"))
    pred = require_tensor(require_key(out, "pred", "out"), "out.pred", floating=True, dim=3)
    batch, _, channels = pred.shape
    if channels < 5:
        raise InvalidArgument.expected(
            "out.pred", "shape (B, Q, 4 + K) with K >= 1", list(pred.shape)
        )
    if batch == 0 or pred.shape[1] == 0:
        # Upstream: no image fails max(); no query fails the cost matrix's view.
        raise InvalidArgument.expected(
            "out.pred", "at least one image and one query", f"shape {list(pred.shape)}"
        )
    _check_channels(terms, channels - 4, num_classes)
    main = {"pred_logits": pred[..., 4:], "pred_boxes": pred[..., :4]}
    aux = _layers(out, "aux_pred", batch, channels - 4, pred)
    for i, layer in enumerate(aux or []):
        if layer["pred_logits"].shape[1] == 0:
            raise InvalidArgument.expected(
                f"out.aux_pred[{i}].pred_logits", "at least one query (it is matched)", "none"
            )
    dn = _layers(out, "dn_aux_pred", batch, channels - 4, pred)
    dn_meta = require_key(out, "dn_meta", "out")

    images = []
    for i, (boxes, labels) in enumerate(
        ground_truth(target, batch, num_classes, source="out.pred")
    ):
        if boxes.dtype != pred.dtype or boxes.device != pred.device:
            raise InvalidArgument.expected(
                f"target.gt[{i}].boxes",
                f"dtype {str(pred.dtype).removeprefix('torch.')} on {pred.device} (as out.pred)",
                f"{str(boxes.dtype).removeprefix('torch.')} on {boxes.device}",
            )
        check_xyxy(boxes, f"target.gt[{i}].boxes", "upstream's transform_bbox asserts it")
        at = first_bad(~boxes.isfinite().all(-1))
        if at is not None:
            # Upstream's matching cost is then NaN, which scipy refuses.
            raise InvalidArgument.expected(
                f"target.gt[{i}].boxes[{at[0]}]", "finite coordinates", boxes[at].tolist()
            )
        scale = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
        images.append((boxes / scale.unsqueeze(0), labels.to(pred.device)))
    num_boxes = float(max(sum(labels.shape[0] for _, labels in images), 1))

    weighted: dict[str, Tensor] = {}

    def add(layer, indices, norm, suffix, field):
        for name in terms:
            parts = _term(name, layer, images, indices, norm, num_classes, alpha, gamma, field)
            for key, v in parts.items():
                if key in weight_dict:
                    weighted[key + suffix] = v * weight_dict[key]

    add(main, hungarian_match(main, images, m, "out.pred"), num_boxes, "", "out.pred")
    for i, layer in enumerate(aux or []):
        field = f"out.aux_pred[{i}].pred_boxes"
        add(layer, hungarian_match(layer, images, m, field), num_boxes, f"_aux_{i}", field)
    if dn is not None:
        num_dn = dn[0]["pred_logits"].shape[1] if dn else 0
        for i, layer in enumerate(dn):
            if layer["pred_logits"].shape[1] != num_dn:
                raise InvalidArgument.expected(
                    f"out.dn_aux_pred[{i}].pred_logits",
                    f"{num_dn} denoising queries (as out.dn_aux_pred[0])",
                    list(layer["pred_logits"].shape),
                )
        indices, groups = _dn_indices(dn_meta, images, num_dn if dn else None)
        for i, layer in enumerate(dn):
            add(layer, indices, num_boxes * groups, f"_dn_{i}", f"out.dn_aux_pred[{i}].pred_boxes")
    if not weighted:
        # Upstream: torch.stack of an empty list.
        raise InvalidArgument.expected(
            "params.weight_dict",
            "a weight for at least one computed term",
            f"keys {sorted(weight_dict)} for losses {terms}",
        )
    total = torch.stack(list(weighted.values())).sum()
    return LossOutput(total, components={k: v.detach() for k, v in weighted.items()})


RT_DETR_MATCHER = {
    "type": "HungarianMatcher",
    "weight_dict": {"cost_class": 2, "cost_bbox": 5, "cost_giou": 2},
    "alpha": 0.25,
    "gamma": 2.0,
    "use_focal_loss": True,
}
RT_DETR_WEIGHTS = {"loss_vfl": 1, "loss_bbox": 5, "loss_giou": 2}


def _layer_example(gen: torch.Generator, batch: int, queries: int, classes: int, dtype):
    centres = 0.2 + 0.6 * torch.rand(batch, queries, 2, generator=gen, dtype=torch.float64)
    sizes = 0.1 + 0.3 * torch.rand(batch, queries, 2, generator=gen, dtype=torch.float64)
    logits = torch.randn(batch, queries, classes, generator=gen, dtype=torch.float64)
    return torch.cat((centres, sizes), -1).to(dtype), logits.to(dtype)


def _make_example(dtype: torch.dtype) -> tuple[tuple, dict, dict]:
    gen = torch.Generator().manual_seed(2024)
    batch, queries, classes, num_dn = 2, 5, 3, 4
    boxes, logits = _layer_example(gen, batch, queries, classes, dtype)
    aux_boxes, aux_logits = _layer_example(gen, batch, queries, classes, dtype)
    dn_boxes, dn_logits = _layer_example(gen, batch, num_dn, classes, dtype)
    out = {
        "pred": torch.cat((boxes, logits), -1),
        "aux_pred": [{"pred_logits": aux_logits, "pred_boxes": aux_boxes}],
        "dn_aux_pred": [{"pred_logits": dn_logits, "pred_boxes": dn_boxes}],
        "dn_meta": {
            "dn_positive_idx": (torch.tensor([0, 1, 2, 3]), torch.zeros(0, dtype=torch.int64)),
            "dn_num_group": 2,
            "dn_num_split": [num_dn, queries],
        },
    }
    gt = [
        {
            "boxes": torch.tensor([[4.0, 6.0, 30.0, 28.0], [20.0, 30.0, 60.0, 62.0]], dtype=dtype),
            "labels": torch.tensor([0, 2]),
        },
        {"boxes": torch.zeros(0, 4, dtype=dtype), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    params = {
        "matcher": RT_DETR_MATCHER,
        "weight_dict": RT_DETR_WEIGHTS,
        "losses": ["vfl", "boxes"],
        "alpha": 0.75,
        "gamma": 2.0,
    }
    return (out, {"gt": gt, "img_size": 64, "num_classes": classes}), {}, params


SPECS = (
    LossSpec(
        name="detr_loss",
        fn=detr_loss,
        families=("netspresso",),
        summary="RT-DETR loss: Hungarian matching (scipy), weighted VFL/focal/CE + L1 + GIoU over the last, auxiliary and denoising decoder layers.",
        inputs=(
            model_output(
                "{'pred': Tensor[B, Q, 4 + K] (cxcywh normalised | logits), 'aux_pred': "
                "[{'pred_logits', 'pred_boxes'}] or None, 'dn_aux_pred': [...] or None, "
                "'dn_meta': {'dn_positive_idx', 'dn_num_group', ...} or None}"
            ),
            GT_TARGET,
        ),
        params=(
            Param(
                "matcher",
                "mapping",
                REQUIRED,
                doc="{type: HungarianMatcher, weight_dict: {cost_class, cost_bbox, cost_giou}, "
                "alpha, gamma, use_focal_loss}; the type is looked up by name, never evaluated",
            ),
            Param(
                "weight_dict",
                "mapping",
                REQUIRED,
                doc="term name (loss_vfl, loss_bbox, ...) -> weight",
            ),
            Param("losses", "list", REQUIRED, doc="terms among " + ", ".join(TERMS)),
            Param("alpha", "float", 0.2, doc="VFL / focal alpha"),
            Param("gamma", "float", 2.0, doc="VFL / focal gamma"),
            Param("cur_epoch", "int", None, doc="the trainer's epoch counter; unused, as upstream"),
        ),
        reference="netspresso_trainer.losses.detection.rtdetr.DETRLoss (netspresso-trainer==1.4.1); "
        "lyuwenyu/RT-DETR; Zhao et al., DETRs Beat YOLOs on Real-time Object Detection, CVPR 2024",
        example='RemoteLoss("detr_loss", matcher={"type": "HungarianMatcher", "weight_dict": '
        '{"cost_class": 2, "cost_bbox": 5, "cost_giou": 2}, "alpha": 0.25, "gamma": 2.0, '
        '"use_focal_loss": True}, weight_dict={"loss_vfl": 1, "loss_bbox": 5, "loss_giou": 2}, '
        'losses=["vfl", "boxes"], alpha=0.75)({"pred": pred, "aux_pred": aux, "dn_aux_pred": dn, '
        '"dn_meta": dn_meta}, {"gt": gt, "img_size": 640, "num_classes": 80})',
        make_example=_make_example,
    ),
)
