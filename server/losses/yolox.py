"""NetsPresso Trainer 1.4.1 ``yolox_loss``: YOLOX's anchor-free loss with SimOTA assignment.

The head outputs are decoded per level, every image's ground truth is assigned to anchors by
SimOTA (centre prior, cost = classification BCE + 3 * IoU cost, dynamic k) without gradients,
and the IoU, objectness, classification and (optionally) L1 terms are summed over the batch and
divided by the number of matched anchors. The arithmetic follows upstream step by step,
dtypes included (upstream packs the ground truth into a float32 tensor and scores the
classification cost in float32), so values and gradients match.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._reduction import reduce_loss
from ..errors import InvalidArgument, upstream_raises
from ..registry import INT_DTYPES, Form, Input, LossOutput, LossSpec, Param
from ._checks import check_class_indices
from ._detection import aligned_areas_cxcywh, plain_int
from .netspresso import model_output

REG_WEIGHT = 5.0
CENTER_RADIUS = 1.5
IOU_COST_WEIGHT = 3.0
OUTSIDE_COST = 1e6
MAX_CANDIDATES = 10
# Upstream packs GT labels and boxes with `torch.zeros(...)`, i.e. torch's default float32.
GT_PACK_DTYPE = torch.float32


def _xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def pairwise_iou_cxcywh(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """IoU of every pair of ``(M, 4)`` and ``(N, 4)`` cxcywh boxes (no eps), as ``(M, N)``."""
    top_left = torch.max(
        boxes_a[:, None, :2] - boxes_a[:, None, 2:] / 2, boxes_b[:, :2] - boxes_b[:, 2:] / 2
    )
    bottom_right = torch.min(
        boxes_a[:, None, :2] + boxes_a[:, None, 2:] / 2, boxes_b[:, :2] + boxes_b[:, 2:] / 2
    )
    area_a = torch.prod(boxes_a[:, 2:], 1)
    area_b = torch.prod(boxes_b[:, 2:], 1)
    overlaps = (top_left < bottom_right).to(top_left.dtype).prod(dim=2)
    area_i = torch.prod(bottom_right - top_left, 2) * overlaps
    return area_i / (area_a[:, None] + area_b - area_i)


def aligned_iou_cxcywh(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """IoU of row-aligned ``(K, 4)`` cxcywh boxes with ``eps`` added to the union."""
    area_p, area_g, area_i = aligned_areas_cxcywh(pred, target)
    return area_i / (area_p + area_g - area_i + eps)


def _decode_levels(
    levels: list[Tensor], img_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Flatten the levels (row-major H x W, levels in order) and decode boxes to absolute cxcywh.

    Returns the decoded outputs ``(B, A, 5 + C)``, the raw regression ``(B, A, 4)`` and, per
    anchor, the grid column, grid row and stride ``(A,)``.
    """
    decoded, raw, xs, ys, strides = [], [], [], [], []
    for level in levels:
        batch, channels, height, width = level.shape
        stride = img_size // width
        flat = level.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        grid = (
            torch.stack((cols, rows), dim=2)
            .reshape(1, height * width, 2)
            .to(device=level.device, dtype=level.dtype)
        )
        decoded.append(
            torch.cat(
                (
                    (flat[..., :2] + grid) * stride,
                    torch.exp(flat[..., 2:4]) * stride,
                    flat[..., 4:],
                ),
                dim=-1,
            )
        )
        raw.append(flat[..., :4])
        xs.append(grid[0, :, 0])
        ys.append(grid[0, :, 1])
        strides.append(
            torch.full((height * width,), float(stride), device=level.device, dtype=level.dtype)
        )
    return concat_levels(decoded, raw, xs, ys, strides)


def concat_levels(
    decoded: list[Tensor],
    raw: list[Tensor],
    xs: list[Tensor],
    ys: list[Tensor],
    strides: list[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A decode's per-level pieces joined over the levels, as both SimOTA heads (yolox_loss,
    yolofastest_loss) return them: outputs and raw regression along the anchors, then the grid
    column, grid row and stride of every anchor."""
    return (
        torch.cat(decoded, 1),
        torch.cat(raw, 1),
        torch.cat(xs),
        torch.cat(ys),
        torch.cat(strides),
    )


def _candidates(gt: Tensor, x_shifts: Tensor, y_shifts: Tensor, strides: Tensor) -> Tensor:
    """``(G, A)``: anchor centres strictly inside the +-1.5-stride square around each GT centre."""
    x_centres = ((x_shifts + 0.5) * strides).unsqueeze(0)
    y_centres = ((y_shifts + 0.5) * strides).unsqueeze(0)
    radius = strides.unsqueeze(0) * CENTER_RADIUS
    left = x_centres - (gt[:, 0:1] - radius)
    right = (gt[:, 0:1] + radius) - x_centres
    top = y_centres - (gt[:, 1:2] - radius)
    bottom = (gt[:, 1:2] + radius) - y_centres
    return torch.stack((left, top, right, bottom), 2).min(dim=-1).values > 0.0


@torch.no_grad()
def simota_assign(
    gt_boxes: Tensor,
    gt_classes: Tensor,
    in_centre: Tensor,
    boxes: Tensor,
    cls_logits: Tensor,
    obj_logits: Tensor,
    num_classes: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SimOTA for one image, restricted to the candidate anchors.

    Args:
        gt_boxes: Tensor[G, 4] cxcywh; gt_classes: Tensor[G] (float, as upstream packs them).
        in_centre: Tensor[G, N] bool, candidate n within GT g's centre square.
        boxes, cls_logits, obj_logits: the N candidates' decoded boxes, class and objectness logits.

    Returns:
        ``fg`` Tensor[N] bool (matched candidates), ``matched_gt`` Tensor[K] int64,
        ``matched_classes`` Tensor[K], ``matched_ious`` Tensor[K] (IoU with the matched GT).
    """
    num_gt, num_cand = in_centre.shape
    ious = pairwise_iou_cxcywh(gt_boxes, boxes)
    iou_cost = -torch.log(ious + 1e-8)
    onehot = F.one_hot(gt_classes.to(torch.int64), num_classes).float()
    # Upstream scores the classification cost in float32 with autocast disabled.
    scores = (cls_logits.float().sigmoid() * obj_logits.float().sigmoid()).sqrt()
    # Upstream's BCE refuses scores outside [0, 1] (NaN logits give NaN scores): so does this one.
    with upstream_raises("yolox_loss (SimOTA's classification cost, F.binary_cross_entropy)"):
        cls_cost = F.binary_cross_entropy(
            scores.unsqueeze(0).expand(num_gt, num_cand, num_classes),
            onehot.unsqueeze(1).expand(num_gt, num_cand, num_classes),
            reduction="none",
        ).sum(-1)
    cost = cls_cost + IOU_COST_WEIGHT * iou_cost + OUTSIDE_COST * (~in_centre)

    matching = torch.zeros_like(cost, dtype=torch.uint8)
    top_ious = torch.topk(ious, min(MAX_CANDIDATES, num_cand), dim=1).values
    dynamic_ks = torch.clamp(top_ious.sum(1).int(), min=1)
    for g in range(num_gt):
        cheapest = torch.topk(cost[g], k=int(dynamic_ks[g]), largest=False).indices
        matching[g][cheapest] = 1
    claims = matching.sum(0)
    if claims.max() > 1:
        # An anchor claimed by several GTs keeps only its cheapest one.
        shared = claims > 1
        cheapest_gt = torch.min(cost[:, shared], dim=0).indices
        matching[:, shared] *= 0
        matching[cheapest_gt, shared] = 1
    fg = claims > 0
    matched_gt = matching[:, fg].argmax(0)
    matched_ious = (matching * ious).sum(0)[fg]
    return fg, matched_gt, gt_classes[matched_gt], matched_ious


def _level_list(value: list[Tensor], num_classes: int) -> list[Tensor]:
    """The declared (B, ?, H_l, W_l) levels; their channels follow target.num_classes."""
    levels = []
    for k, level in enumerate(value):
        where = f"out.pred[{k}]"
        if level.shape[1] != 5 + num_classes:
            raise InvalidArgument.expected(
                where, f"5 + num_classes = {5 + num_classes} channels", f"shape {list(level.shape)}"
            )
        if level.shape[2] == 0 or level.shape[3] == 0:
            raise InvalidArgument.expected(
                where, "non-empty H_l, W_l", f"shape {list(level.shape)}"
            )
        if levels and level.device != levels[0].device:
            raise InvalidArgument.expected(
                where, f"device {levels[0].device} (as out.pred[0])", str(level.device)
            )
        levels.append(level)
    return levels


def check_target(target: Mapping[str, Any], batch: int) -> tuple[list[dict], int, int]:
    """``target['gt']`` (one ``{'boxes', 'labels'}`` per image), ``img_size`` and ``num_classes``,
    checked as upstream needs them; returns ``(images, img_size, num_classes)``."""
    # Declared (TARGET, in both heads' specs): the keys, B entries of {'labels' (n,) integer,
    # 'boxes' (n, 4) float}. Checked here: the scalars, and what reads the values.
    num_classes = plain_int(target["num_classes"], "target.num_classes", 0)
    img_size = plain_int(target["img_size"], "target.img_size", 1)
    if batch == 0:
        # Upstream takes max() over the per-image GT counts: ValueError on an empty batch.
        raise InvalidArgument.expected("out.pred[0]", "at least one image", "batch size 0")
    images = []
    for i, gt in enumerate(target["gt"]):
        where = f"target.gt[{i}]"
        labels, boxes = gt["labels"], gt["boxes"]
        # Checked before any kernel: an out-of-range label must never reach one_hot on a device.
        check_class_indices(labels, num_classes, f"{where}.labels")
        bad = ~((boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1]))
        if bool(bad.any()):
            # Upstream's xyxy -> cxcywh conversion asserts "Invalid box".
            j = int(bad.nonzero()[0, 0])
            raise InvalidArgument.expected(
                f"{where}.boxes[{j}]", "an xyxy box with x2 >= x1 and y2 >= y1", boxes[j].tolist()
            )
        images.append({"boxes": boxes, "labels": labels})
    return images, img_size, num_classes


def _check_inputs(
    out: Mapping[str, Any], target: Mapping[str, Any]
) -> tuple[list[Tensor], list[dict], int, int]:
    num_classes = plain_int(target["num_classes"], "target.num_classes", 0)
    levels = _level_list(out["pred"], num_classes)
    images, img_size, num_classes = check_target(target, levels[0].shape[0])
    return levels, images, img_size, num_classes


def yolox_loss(
    out: Mapping[str, Any],
    target: Mapping[str, Any],
    *,
    l1_activate_epoch: int,
    cur_epoch: int | None = None,
) -> LossOutput:
    """YOLOX loss: SimOTA-assigned IoU, objectness, classification and L1 terms.

    Each level ``(B, 5 + C, H_l, W_l)`` (channels ``tx, ty, tw, th, obj, cls_0..C-1``) has stride
    ``img_size // W_l`` and decodes to ``cx = (tx + col) * s``, ``cy = (ty + row) * s``,
    ``w = exp(tw) * s``, ``h = exp(th) * s``. GT boxes are converted to cxcywh (in a copy; the
    caller's target is not modified, unlike upstream) and packed into float32 rows
    ``(label, cx, cy, w, h)``; as upstream, an image's GT count is the number of rows whose sum
    is > 0 and the *first* that many rows are used (a note says when rows are dropped).

    Assignment (SimOTA, no gradient, per image): candidates are anchors whose centre
    ``(grid + 0.5) * s`` lies strictly within 1.5 strides of a GT centre; cost =
    ``BCE(sqrt(sigmoid(cls) * sigmoid(obj)), onehot) + 3 * -log(IoU + 1e-8) + 1e6 * outside``;
    each GT takes its ``max(1, int(sum of its top-min(10, N) IoUs))`` cheapest candidates; an
    anchor claimed twice keeps its cheapest GT. With ``num_fg`` the matched anchors of the whole
    batch (at least 1)::

        total = 5 * iou + obj + cls + l1
        iou = sum_fg (1 - IoU(pred, gt)^2) / num_fg        (union + 1e-7)
        obj = sum_all BCEWithLogits(obj, fg) / num_fg
        cls = sum_fg BCEWithLogits(cls, onehot * IoU) / num_fg   (IoU detached)
        l1  = sum_fg |(tx, ty, tw, th) - (cx/s - col, cy/s - row, log(w/s + 1e-8), log(h/s + 1e-8))| / num_fg

    ``l1`` is included iff ``cur_epoch is None or cur_epoch >= l1_activate_epoch``. A batch with
    no GT gives the objectness term alone.

    Args:
        out (dict): ``'pred'``: list over levels of Tensor[B, 5 + C, H_l, W_l] float raw outputs.
        target (dict): ``'gt'``: list of B dicts ``{'boxes': Tensor[n_i, 4] float xyxy absolute
            pixels, 'labels': Tensor[n_i] int in [0, C)}`` (``n_i`` may be 0);
            ``'img_size'``: int image width; ``'num_classes'``: int C.
        l1_activate_epoch (int): first epoch with the L1 term. Required.
        cur_epoch (int, optional): the current epoch (upstream reads the trainer's
            ``cur_epoch.value``); None means L1 is always on. Default: ``None``.

    Returns:
        LossOutput: ``value`` the scalar total; components ``'iou'``, ``'obj'``, ``'cls'``,
        ``'l1'`` are the unweighted terms above (already divided by ``num_fg``; ``'l1'`` is 0 when
        off), so ``total = 5 * iou + obj + cls + l1``. Gradients flow to every level of
        ``out['pred']``; the target gets none.

    Raises:
        InvalidArgument: labels outside [0, C), an xyxy box with x2 < x1 or y2 < y1, a batch size
            mismatch, or an image with GTs but no candidate anchor at all (upstream:
            ``RuntimeError: selected index k out of range``).

    Reference:
        ``netspresso_trainer.losses.detection.yolox.YOLOXLoss`` (netspresso-trainer 1.4.1).
        Ge et al., "YOLOX: Exceeding YOLO Series in 2021", https://arxiv.org/abs/2107.08430.
    """
    levels, images, img_size, num_classes = _check_inputs(out, target)
    use_l1 = cur_epoch is None or cur_epoch >= l1_activate_epoch
    decoded = _decode_levels(levels, img_size)
    return simota_losses(*decoded, images, num_classes, levels[0].dtype, use_l1, _iou_squared_loss)


def _iou_squared_loss(pred: Tensor, target: Tensor) -> Tensor:
    return 1 - aligned_iou_cxcywh(pred, target) ** 2


def simota_losses(
    outputs: Tensor,
    raw_reg: Tensor,
    x_shifts: Tensor,
    y_shifts: Tensor,
    strides: Tensor,
    images: list[dict],
    num_classes: int,
    level_dtype: torch.dtype,
    use_l1: bool,
    box_loss: Callable[[Tensor, Tensor], Tensor],
) -> LossOutput:
    """The YOLOX family's terms once the levels are decoded to ``outputs`` ``(B, A, 5 + C)``
    (absolute cxcywh, obj, cls): SimOTA per image, then ``5 * box + obj + cls (+ l1)``, each
    summed and divided by the matched count; ``box_loss`` scores matched (pred, GT) cxcywh rows."""
    device, batch, num_anchors = outputs.device, outputs.shape[0], outputs.shape[1]
    bbox_preds, obj_preds, cls_preds = outputs[:, :, :4], outputs[:, :, 4:5], outputs[:, :, 5:]

    max_gt = max(image["labels"].shape[0] for image in images)
    packed = torch.zeros(batch, max_gt, 5, dtype=GT_PACK_DTYPE, device=device)
    for i, image in enumerate(images):
        n = image["labels"].shape[0]
        packed[i, :n, 1:5] = _xyxy_to_cxcywh(image["boxes"])
        packed[i, :n, 0] = image["labels"]
    num_gts = (packed.sum(dim=2) > 0).sum(dim=1)

    notes = []
    cls_targets, reg_targets, l1_targets, obj_targets, fg_masks = [], [], [], [], []
    num_fg = 0
    for i in range(batch):
        num_gt = int(num_gts[i])
        if num_gt < images[i]["labels"].shape[0]:
            notes.append(
                f"target.gt[{i}]: only {num_gt} of {images[i]['labels'].shape[0]} rows have label + cx + cy + w + h > 0; "
                f"as upstream, the first {num_gt} rows are used and the rest dropped"
            )
        if num_gt == 0:
            cls_targets.append(outputs.new_zeros((0, num_classes)))
            reg_targets.append(outputs.new_zeros((0, 4)))
            l1_targets.append(outputs.new_zeros((0, 4)))
            obj_targets.append(outputs.new_zeros((num_anchors, 1)).to(level_dtype))
            fg_masks.append(outputs.new_zeros(num_anchors).bool())
            continue
        gt_boxes = packed[i, :num_gt, 1:5]
        gt_classes = packed[i, :num_gt, 0]
        with torch.no_grad():
            in_centre = _candidates(gt_boxes, x_shifts, y_shifts, strides)
        candidate = in_centre.any(dim=0)
        if not bool(candidate.any()):
            # Upstream's topk(k=1) over zero candidates: "selected index k out of range".
            raise InvalidArgument(
                f"no anchor centre lies within {CENTER_RADIUS} strides of the centre of any GT box of image {i} "
                "(e.g. a box outside the image), so SimOTA has no candidate (upstream: RuntimeError "
                "'selected index k out of range')",
                field=f"target.gt[{i}].boxes[0]",
            )
        for j in torch.nonzero(~in_centre.any(dim=1)).flatten().tolist():
            notes.append(
                f"target.gt[{i}].boxes[{j}] has no anchor centre within {CENTER_RADIUS} strides of its centre; "
                "as upstream, SimOTA still gives it its cheapest candidate(s) of the image (cost >= 1e6)"
            )
        fg_cand, matched_gt, matched_classes, matched_ious = simota_assign(
            gt_boxes,
            gt_classes,
            in_centre[:, candidate],
            bbox_preds[i][candidate],
            cls_preds[i][candidate],
            obj_preds[i][candidate],
            num_classes,
        )
        fg_mask = candidate.clone()
        fg_mask[candidate] = fg_cand
        num_fg += int(fg_cand.sum())
        matched_boxes = gt_boxes[matched_gt]
        cls_targets.append(
            F.one_hot(matched_classes.to(torch.int64), num_classes) * matched_ious.unsqueeze(-1)
        )
        reg_targets.append(matched_boxes)
        obj_targets.append(fg_mask.unsqueeze(-1).to(level_dtype))
        fg_masks.append(fg_mask)
        if use_l1:
            fg_strides, fg_x, fg_y = strides[fg_mask], x_shifts[fg_mask], y_shifts[fg_mask]
            l1_target = torch.stack(
                (
                    matched_boxes[:, 0] / fg_strides - fg_x,
                    matched_boxes[:, 1] / fg_strides - fg_y,
                    torch.log(matched_boxes[:, 2] / fg_strides + 1e-8),
                    torch.log(matched_boxes[:, 3] / fg_strides + 1e-8),
                ),
                dim=1,
            )
            l1_targets.append(l1_target.to(outputs.dtype))

    # torch.cat promotes dtypes like upstream's concatenation (float32 GT rows with the
    # outputs-dtype empties of images without GT).
    cls_target = torch.cat(cls_targets, 0)
    reg_target = torch.cat(reg_targets, 0)
    obj_target = torch.cat(obj_targets, 0)
    fg = torch.cat(fg_masks, 0)
    divisor = max(num_fg, 1)

    loss_iou = reduce_loss(box_loss(bbox_preds.reshape(-1, 4)[fg], reg_target), "sum") / divisor
    obj_bce = F.binary_cross_entropy_with_logits(
        obj_preds.reshape(-1, 1), obj_target, reduction="none"
    )
    loss_obj = reduce_loss(obj_bce, "sum") / divisor
    cls_bce = F.binary_cross_entropy_with_logits(
        cls_preds.reshape(-1, num_classes)[fg], cls_target, reduction="none"
    )
    loss_cls = reduce_loss(cls_bce, "sum") / divisor
    if use_l1:
        l1 = F.l1_loss(raw_reg.reshape(-1, 4)[fg], torch.cat(l1_targets, 0), reduction="none")
        loss_l1: Tensor | float = reduce_loss(l1, "sum") / divisor
    else:
        loss_l1 = 0.0

    total = REG_WEIGHT * loss_iou + loss_obj + loss_cls + loss_l1
    components = {
        "iou": loss_iou.detach(),
        "obj": loss_obj.detach(),
        "cls": loss_cls.detach(),
        "l1": loss_l1.detach()
        if isinstance(loss_l1, Tensor)
        else torch.zeros((), dtype=total.dtype, device=device),
    }
    return LossOutput(total, components=components, notes=notes)


def _make_example(dtype: torch.dtype) -> tuple[tuple, dict, dict]:
    # Every anchor predicts a tiny box except one per GT that fits it well, so SimOTA's choice is
    # far from any tie and finite differences cannot flip it; the matched class logits are 0,
    # which makes the (detached, as upstream) IoU class target's derivative vanish: gradcheck
    # of this example agrees with autograd.
    gen = torch.Generator().manual_seed(2107)
    batch, num_classes, img_size = 2, 3, 32
    pred = []
    for n in (4, 2):
        level = 0.5 * torch.randn(batch, 5 + num_classes, n, n, generator=gen, dtype=torch.float64)
        level[:, 2:4] = -5.0
        pred.append(level)
    # GT 0 (label 0): cxcywh (12, 12, 16, 12), fitted by level 0, row 1, col 1 (stride 8).
    pred[0][0, :4, 1, 1] = torch.tensor(
        [0.6, 0.45, math.log(15 / 8), math.log(13 / 8)], dtype=torch.float64
    )
    pred[0][0, 5, 1, 1] = 0.0
    # GT 1 (label 2): cxcywh (22, 22, 18, 16), fitted by level 1, row 1, col 1 (stride 16).
    pred[1][0, :4, 1, 1] = torch.tensor(
        [0.4, 0.35, math.log(17 / 16), math.log(15 / 16)], dtype=torch.float64
    )
    pred[1][0, 7, 1, 1] = 0.0
    gt = [
        {
            "boxes": torch.tensor([[4.0, 6.0, 20.0, 18.0], [13.0, 14.0, 31.0, 30.0]], dtype=dtype),
            "labels": torch.tensor([0, 2]),
        },
        {"boxes": torch.zeros(0, 4, dtype=dtype), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    target = {"gt": gt, "img_size": img_size, "num_classes": num_classes}
    return (
        ({"pred": [level.to(dtype) for level in pred]}, target),
        {},
        {"l1_activate_epoch": 1, "cur_epoch": 3},
    )


def level_outputs(each: Form | tuple[Form, ...], label: str) -> Form:
    """``{'pred': [one tensor per level]}``, the out dict of both SimOTA heads (yolox_loss,
    yolofastest_loss); each level is one of the ``each`` forms."""
    return Form(
        kind="dict",
        keys=(("pred", Form(kind="list", each=each, min_items=1, label=label)),),
    )


_OUT = level_outputs(
    Form(shape=("B", "?", "?", "?")), "a list with one (B, 5 + C, H_l, W_l) tensor per level"
)
# The target of YOLOX's SimOTA heads (yolox_loss, yolofastest_loss; check_target checks the
# rest: the scalars, class indices, box validity).
TARGET = Form(
    kind="dict",
    keys=(
        ("num_classes", Form(kind="any")),
        ("img_size", Form(kind="any")),
        (
            "gt",
            Form(
                kind="list",
                each=Form(
                    kind="dict",
                    keys=(
                        ("labels", Form(dtypes=INT_DTYPES, shape=("_n",))),
                        ("boxes", Form(shape=("_n", 4), label="xyxy boxes, one row per label")),
                    ),
                ),
                length="B",
                label="a list with one {'boxes', 'labels'} dict per image",
            ),
        ),
    ),
)
# The target argument both SimOTA heads declare.
TARGET_INPUT = Input(
    "target",
    kind="structure",
    forms=(TARGET,),
    doc="{'gt': [{'boxes': Tensor[n_i, 4] float xyxy absolute, 'labels': Tensor[n_i] int in [0, C)}] * B, "
    "'img_size': int image width, 'num_classes': int C}",
)

SPECS = (
    LossSpec(
        name="yolox_loss",
        fn=yolox_loss,
        families=("netspresso",),
        summary="YOLOX loss: SimOTA assignment, 5*IoU + objectness BCE + IoU-soft class BCE (+ L1 on raw offsets), / num_fg.",
        inputs=(
            model_output(
                "{'pred': [Tensor[B, 5 + C, H_l, W_l]] per level, channels tx, ty, tw, th, obj, cls_0..C-1}",
                _OUT,
            ),
            TARGET_INPUT,
        ),
        params=(
            Param(
                "l1_activate_epoch",
                "int",
                doc="first epoch (cur_epoch >= it) that adds the L1 term",
            ),
            Param(
                "cur_epoch",
                "int",
                None,
                doc="current epoch (stands in for the trainer's cur_epoch.value); None: L1 always on",
            ),
        ),
        reference="netspresso_trainer.losses.detection.yolox.YOLOXLoss (netspresso-trainer==1.4.1); "
        "Ge et al., YOLOX: Exceeding YOLO Series in 2021, arXiv:2107.08430",
        example='RemoteLoss("yolox_loss", l1_activate_epoch=1, cur_epoch=3)({"pred": [p3, p4, p5]}, '
        '{"gt": [{"boxes": boxes, "labels": labels}, ...], "img_size": 640, "num_classes": 80})',
        make_example=_make_example,
    ),
)
