"""NetsPresso Trainer 1.4.1 ``retinanet_loss``: focal classification + L1 box regression.

Anchors are matched to ground truth per image exactly like torchvision's
``Matcher(0.5, 0.4, allow_low_quality_matches=True)`` and boxes are encoded like
``BoxCoder(weights=(1, 1, 1, 1))``; both are re-derived here with plain torch operations in the
same order, so values and gradients match upstream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._reduction import reduce_loss
from ..errors import InvalidArgument
from ..registry import INT_DTYPES, Form, Input, LossOutput, LossSpec
from ._checks import check_class_indices
from .netspresso import _sigmoid_focal_elementwise, model_output

FG_IOU_THRESH = 0.5
BG_IOU_THRESH = 0.4
BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2


def _upcast(t: Tensor) -> Tensor:
    # Like torchvision's box ops: half-precision box coordinates are multiplied in float32.
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if t.dtype in (torch.int32, torch.int64) else t.int()


def _box_area(boxes: Tensor) -> Tensor:
    # torchvision's box_area upcasts too: a half-precision area overflows past 65504 (256 x 256).
    boxes = _upcast(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of ``(M, 4)`` and ``(N, 4)`` xyxy boxes, as ``torchvision.ops.box_iou``."""
    top_left = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = _upcast(bottom_right - top_left).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    union = _box_area(boxes1)[:, None] + _box_area(boxes2) - inter
    return inter / union


def match_anchors(iou: Tensor) -> Tensor:
    """Best GT per anchor, with torchvision ``Matcher(0.5, 0.4, allow_low_quality_matches=True)`` rules.

    ``iou`` is ``(M gts, N anchors)`` with M, N > 0. Returns ``(N,)`` int64: the matched GT index,
    ``-1`` below 0.4, ``-2`` in [0.4, 0.5). Then, for every GT, each anchor reaching that GT's
    highest IoU (ties included, even when that IoU is 0) gets back its own best-GT index.
    """
    best_iou, matches = iou.max(dim=0)
    best_gt = matches.clone()
    matches[best_iou < BG_IOU_THRESH] = BELOW_LOW_THRESHOLD
    matches[(best_iou >= BG_IOU_THRESH) & (best_iou < FG_IOU_THRESH)] = BETWEEN_THRESHOLDS
    highest_per_gt, _ = iou.max(dim=1)
    _, anchors_at_highest = torch.where(iou == highest_per_gt[:, None])
    matches[anchors_at_highest] = best_gt[anchors_at_highest]
    return matches


def encode_boxes(gt: Tensor, anchors: Tensor) -> Tensor:
    """Regression targets of ``gt`` w.r.t. ``anchors`` (both ``(K, 4)`` xyxy), BoxCoder weights 1.

    ``(dx, dy, dw, dh) = ((gx - ax) / aw, (gy - ay) / ah, log(gw / aw), log(gh / ah))`` with
    widths ``x2 - x1`` and centres ``x1 + 0.5 * w``, exactly as torchvision's ``encode_boxes``.
    """
    # torchvision multiplies each delta by its BoxCoder weight; with weights (1, 1, 1, 1) that
    # is an exact no-op, so it is left out.
    a_w = anchors[:, 2:3] - anchors[:, 0:1]
    a_h = anchors[:, 3:4] - anchors[:, 1:2]
    a_cx = anchors[:, 0:1] + 0.5 * a_w
    a_cy = anchors[:, 1:2] + 0.5 * a_h
    g_w = gt[:, 2:3] - gt[:, 0:1]
    g_h = gt[:, 3:4] - gt[:, 1:2]
    g_cx = gt[:, 0:1] + 0.5 * g_w
    g_cy = gt[:, 1:2] + 0.5 * g_h
    dx = (g_cx - a_cx) / a_w
    dy = (g_cy - a_cy) / a_h
    dw = torch.log(g_w / a_w)
    dh = torch.log(g_h / a_h)
    return torch.cat((dx, dy, dw, dh), dim=1)


def _level_list(levels: list[Tensor], field: str, batch: int) -> list[Tensor]:
    """The declared ``(B_l, A_l, K)`` levels, each of the batch size the target's list gives."""
    for k, level in enumerate(levels):
        if level.shape[0] != batch:
            raise InvalidArgument.expected(
                f"{field}[{k}]",
                f"batch size {batch} (as in {field}[0] and target.gt)",
                f"shape {list(level.shape)}",
            )
    return list(levels)


def _check_inputs(
    out: Mapping[str, Any], target: Mapping[str, Any]
) -> tuple[Tensor, Tensor, Tensor, list[dict]]:
    # Declared (_OUT, _TARGET): the keys, anchors (A, 4), non-empty level lists of (B_l, A_l, C)
    # and (B_l, A_l, 4) float tensors, one {'boxes' float, 'labels' integer} dict per image.
    anchors, gts = out["anchors"], target["gt"]
    batch = len(gts)
    cls_levels = _level_list(out["cls_logits"], "out.cls_logits", batch)
    box_levels = _level_list(out["bbox_regression"], "out.bbox_regression", batch)
    num_anchors = anchors.shape[0]
    for field, levels in (("out.cls_logits", cls_levels), ("out.bbox_regression", box_levels)):
        total = sum(level.shape[1] for level in levels)
        if total != num_anchors:
            sizes = " + ".join(str(level.shape[1]) for level in levels)
            raise InvalidArgument.expected(
                field,
                f"per-level anchor counts summing to A={num_anchors} (out.anchors)",
                f"{sizes} = {total}",
            )
    num_classes = cls_levels[0].shape[2]

    images = []
    for i, gt in enumerate(gts):
        where = f"target.gt[{i}]"
        boxes, labels = gt["boxes"], gt["labels"]
        if boxes.numel() > 0:
            if boxes.dim() != 2 or boxes.shape[1] != 4:
                raise InvalidArgument.expected(
                    f"{where}.boxes", "shape (n, 4), xyxy", f"shape {list(boxes.shape)}"
                )
            if labels.shape != (boxes.shape[0],):
                raise InvalidArgument.expected(
                    f"{where}.labels",
                    f"shape ({boxes.shape[0]},), one label per box",
                    f"shape {list(labels.shape)}",
                )
            if num_anchors == 0:
                # torchvision's Matcher raises "No proposal boxes available" here.
                raise InvalidArgument.expected(
                    "out.anchors", "at least one anchor when an image has boxes", "shape [0, 4]"
                )
            # Checked before any indexing: an out-of-range label must never reach a kernel.
            check_class_indices(labels, num_classes, f"{where}.labels")
        images.append({"boxes": boxes, "labels": labels})
    return anchors, torch.cat(cls_levels, dim=1), torch.cat(box_levels, dim=1), images


def retinanet_loss(out: Mapping[str, Any], target: Mapping[str, Any]) -> LossOutput:
    """RetinaNet loss: sigmoid focal classification plus L1 regression of encoded box deltas.

    Per image: anchors are matched to GT boxes by IoU (fg >= 0.5, ignored in [0.4, 0.5),
    background below 0.4, plus torchvision's low-quality matches: every anchor tying for a GT's
    best IoU is foreground); an image without boxes is all background. The classification loss
    is the focal loss (alpha 0.25, gamma 2, summed) over all non-ignored anchors against one-hot
    targets, divided by max(1, #foreground); the box loss is the summed L1 distance between the
    predicted deltas and the encoded matched GT boxes of foreground anchors, divided by
    max(1, #foreground). Both are averaged over the images. Nothing is configurable upstream.

    Args:
        out (dict): ``'anchors'``: Tensor[A, 4] float, xyxy absolute pixels, all levels
            concatenated, shared by every image; ``'cls_logits'``: list per level of
            Tensor[B, A_l, C] float logits; ``'bbox_regression'``: list per level of
            Tensor[B, A_l, 4] float deltas (dx, dy, dw, dh). ``sum(A_l) == A`` for both lists.
        target (dict): ``'gt'``: list of B dicts ``{'boxes': Tensor[n_i, 4] float xyxy absolute,
            'labels': Tensor[n_i] int64 in [0, C)}``; ``n_i`` may be 0.

    Returns:
        LossOutput: ``value`` = cls + box (scalar); components ``'cls'`` and ``'box'`` (detached).
        Gradients flow to ``cls_logits`` and ``bbox_regression`` (and, as upstream, to anchors and
        GT boxes through the box encoding when they require grad).

    Reference:
        ``netspresso_trainer.losses.detection.retinanet.RetinaNetLoss`` (netspresso-trainer
        1.4.1), with torchvision's ``Matcher``/``BoxCoder``. Lin et al., "Focal Loss for Dense
        Object Detection", ICCV 2017, https://arxiv.org/abs/1708.02002.
    """
    anchors, cls_logits, bbox_regression, images = _check_inputs(out, target)

    matched = []
    for image in images:
        if image["boxes"].numel() == 0:
            matched.append(
                torch.full(
                    (anchors.shape[0],),
                    BELOW_LOW_THRESHOLD,
                    dtype=torch.int64,
                    device=anchors.device,
                )
            )
        else:
            matched.append(match_anchors(box_iou(image["boxes"], anchors)))

    cls_terms = []
    for image, logits, matches in zip(images, cls_logits, matched, strict=True):
        foreground = matches >= 0
        num_fg = int(foreground.sum())
        onehot = torch.zeros_like(logits)
        onehot[foreground, image["labels"][matches[foreground]]] = 1.0
        valid = matches != BETWEEN_THRESHOLDS
        focal = _sigmoid_focal_elementwise(logits[valid], onehot[valid], FOCAL_ALPHA, FOCAL_GAMMA)
        cls_terms.append(reduce_loss(focal, "sum") / max(1, num_fg))

    box_terms = []
    for image, deltas, matches in zip(images, bbox_regression, matched, strict=True):
        fg_idx = torch.where(matches >= 0)[0]
        boxes = image["boxes"] if image["boxes"].numel() else image["boxes"].reshape(0, 4)
        encoded = encode_boxes(boxes[matches[fg_idx]], anchors[fg_idx, :])
        l1 = reduce_loss(F.l1_loss(deltas[fg_idx, :], encoded, reduction="none"), "sum")
        box_terms.append(l1 / max(1, fg_idx.numel()))

    # Python's sum (starting at 0) and the divisions mirror upstream's accumulation order.
    cls_loss = sum(cls_terms) / len(images)
    box_loss = sum(box_terms) / max(1, len(images))
    return LossOutput(
        cls_loss + box_loss, components={"cls": cls_loss.detach(), "box": box_loss.detach()}
    )


def _make_anchors(
    image_size: int, strides: Sequence[int], ratios: Sequence[float], dtype: torch.dtype
) -> list[Tensor]:
    """Per-level xyxy anchors, (H, W, ratio) order, one size (4 * stride) per level."""
    levels = []
    for stride in strides:
        n = image_size // stride
        centres = (torch.arange(n, dtype=torch.float64) + 0.5) * stride
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        size = 4.0 * stride
        per_ratio = []
        for ratio in ratios:
            w, h = size / ratio**0.5, size * ratio**0.5
            per_ratio.append(torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1))
        levels.append(torch.stack(per_ratio, dim=2).reshape(-1, 4).to(dtype))
    return levels


def _make_example(dtype: torch.dtype) -> tuple[tuple, dict, dict]:
    gen = torch.Generator().manual_seed(2017)
    levels = _make_anchors(64, (16, 32), (0.5, 1.0, 2.0), dtype)
    batch, num_classes = 2, 3
    cls_logits = [
        torch.randn(batch, lv.shape[0], num_classes, generator=gen).to(dtype) for lv in levels
    ]
    bbox_regression = [
        (0.1 * torch.randn(batch, lv.shape[0], 4, generator=gen)).to(dtype) for lv in levels
    ]
    gt = [
        {
            "boxes": torch.tensor([[4.0, 6.0, 30.0, 28.0], [20.0, 24.0, 60.0, 62.0]], dtype=dtype),
            "labels": torch.tensor([0, 2]),
        },
        {"boxes": torch.zeros(0, 4, dtype=dtype), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    out = {
        "anchors": torch.cat(levels),
        "cls_logits": cls_logits,
        "bbox_regression": bbox_regression,
    }
    return (out, {"gt": gt}), {}, {}


_LEVELS = "a list with one (B, A_l, ...) tensor per level"
_OUT = Form(
    kind="dict",
    keys=(
        ("anchors", Form(shape=("A", 4), label="anchors (A, 4), xyxy")),
        (
            "cls_logits",
            Form(kind="list", each=Form(shape=("?", "?", "K")), min_items=1, label=_LEVELS),
        ),
        (
            "bbox_regression",
            Form(kind="list", each=Form(shape=("?", "?", 4)), min_items=1, label=_LEVELS),
        ),
    ),
)
_TARGET = Form(
    kind="dict",
    keys=(
        (
            "gt",
            Form(
                kind="list",
                each=Form(
                    kind="dict",
                    keys=(("boxes", Form()), ("labels", Form(dtypes=INT_DTYPES))),
                ),
                # Upstream divides the classification loss by len(target['gt']).
                min_items=1,
                label="a list with one {'boxes', 'labels'} dict per image",
            ),
        ),
    ),
)

SPECS = (
    LossSpec(
        name="retinanet_loss",
        fn=retinanet_loss,
        families=("netspresso",),
        summary="RetinaNet loss: IoU anchor matching, focal classification (alpha .25, gamma 2) + L1 on encoded boxes.",
        inputs=(
            model_output(
                "{'anchors': Tensor[A, 4] xyxy, 'cls_logits': [Tensor[B, A_l, C]] per level, "
                "'bbox_regression': [Tensor[B, A_l, 4]] per level}; sum(A_l) == A",
                _OUT,
            ),
            Input(
                "target",
                kind="structure",
                forms=(_TARGET,),
                doc="{'gt': [{'boxes': Tensor[n_i, 4] float xyxy, 'labels': Tensor[n_i] int64 in [0, C)}] * B}",
            ),
        ),
        params=(),
        reference="netspresso_trainer.losses.detection.retinanet.RetinaNetLoss (netspresso-trainer==1.4.1); "
        "torchvision Matcher/BoxCoder; Lin et al., Focal Loss for Dense Object Detection, ICCV 2017",
        example='RemoteLoss("retinanet_loss")({"anchors": anchors, "cls_logits": cls_levels, '
        '"bbox_regression": box_levels}, {"gt": [{"boxes": boxes, "labels": labels}, ...]})',
        make_example=_make_example,
    ),
)
