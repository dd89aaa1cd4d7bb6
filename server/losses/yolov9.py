"""NetsPresso Trainer 1.4.1 ``yolov9_loss``: YOLOv9's anchor-free loss with a task-aligned assigner.

Each level's DFL bin logits are turned into side distances (the expectation of the softmax over
``reg_max`` bins) and boxes around the anchor points; ground truth is assigned to anchor points
(no gradient) by the task-aligned metric ``CIoU^6 * p_cls^0.5`` among the points inside each box
(top 10 per GT, a point claimed twice keeps its highest-IoU GT); then BCE on the IoU-normalised
class targets, CIoU on the boxes and DFL on the bins, ``0.5 * cls + 1.5 * dfl + 7.5 * iou``.
The arithmetic follows upstream step by step, its float32 intermediates included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InvalidArgument
from ..registry import REQUIRED, LossOutput, LossSpec, Param
from ._checks import require_key, require_tensor
from ._detection import GT_TARGET, ground_truth, image_hw, plain_int, sequence
from .netspresso import model_output

TOPK = 10
IOU_FACTOR = 6.0
CLS_FACTOR = 0.5
CLS_WEIGHT, DFL_WEIGHT, IOU_WEIGHT = 0.5, 1.5, 7.5
EPS = 1e-7


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Upstream's float32 intermediates (GT packing, IoU): an upcast, never a downcast."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ciou(box1: Tensor, box2: Tensor, work: torch.dtype) -> Tensor:
    """Complete IoU of broadcastable xyxy boxes, computed in ``work``, returned in box1's dtype.

    ``iou - d^2 / c^2 - alpha * v`` with ``v = 4 / pi^2 (atan(w1/h1) - atan(w2/h2))^2`` and
    ``alpha = v / (v - iou + 1)`` detached, every denominator + 1e-7, as upstream's
    ``calculate_iou(..., 'ciou')``.
    """
    dtype = box1.dtype
    a, b = box1.to(work), box2.to(work)
    inter = torch.clamp(torch.min(a[..., 2], b[..., 2]) - torch.max(a[..., 0], b[..., 0]), min=0)
    inter = inter * torch.clamp(
        torch.min(a[..., 3], b[..., 3]) - torch.max(a[..., 1], b[..., 1]), min=0
    )
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    iou = inter / (area_a + area_b - inter + EPS)
    centre = ((a[..., 2] + a[..., 0]) / 2 - (b[..., 2] + b[..., 0]) / 2) ** 2 + (
        (a[..., 3] + a[..., 1]) / 2 - (b[..., 3] + b[..., 1]) / 2
    ) ** 2
    c_x = torch.max(a[..., 2], b[..., 2]) - torch.min(a[..., 0], b[..., 0])
    c_y = torch.max(a[..., 3], b[..., 3]) - torch.min(a[..., 1], b[..., 1])
    diou = iou - centre / (c_x**2 + c_y**2 + EPS)
    arctan = torch.atan((a[..., 2] - a[..., 0]) / (a[..., 3] - a[..., 1] + EPS)) - torch.atan(
        (b[..., 2] - b[..., 0]) / (b[..., 3] - b[..., 1] + EPS)
    )
    v = (4 / (math.pi**2)) * (arctan**2)
    with torch.no_grad():
        alpha = v / (v - iou + 1 + EPS)
    return (diou - alpha * v).to(dtype)


def _anchor_points(hw: tuple[int, int], strides: list[int]) -> tuple[Tensor, Tensor]:
    """Anchor point centres ``(A, 2)`` (x, y; int64, ``k * s + s // 2``) and strides ``(A,)``."""
    height, width = hw
    points, scaler = [], []
    for s in strides:
        ys = torch.arange(0, height, s) + s // 2
        xs = torch.arange(0, width, s) + s // 2
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x.flatten(), grid_y.flatten()), dim=-1))
        scaler.append(torch.full((grid_x.numel(),), s))
    return torch.cat(points), torch.cat(scaler)


def _decode(
    levels: list[Tensor], num_classes: int, reg_max: int, anchors: Tensor, scaler: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Class logits ``(B, A, C)``, bin logits ``(B, A, 4, reg_max)`` and xyxy boxes ``(B, A, 4)``."""
    cls, bins, dist = [], [], []
    for level in levels:
        batch, _, height, width = level.shape
        reg, logits = level.split([4 * reg_max, num_classes], dim=1)
        side_bins = reg.view(batch, 4, reg_max, height, width).permute(0, 2, 1, 3, 4)
        # Upstream's Anchor2Vec: a 1x1x1 conv whose weights are the bin values 0..reg_max-1,
        # float32 (a float64 call crashes there); lossd builds them in the input's dtype.
        weight = torch.arange(reg_max, dtype=level.dtype, device=level.device)
        expected = F.conv3d(side_bins.softmax(dim=1), weight.view(1, reg_max, 1, 1, 1))[:, 0]
        dist.append(expected.view(batch, 4, -1).permute(0, 2, 1))
        bins.append(side_bins.reshape(batch, reg_max, 4, -1).permute(0, 3, 2, 1))
        cls.append(logits.reshape(batch, num_classes, -1).permute(0, 2, 1))
    lt, rb = (torch.cat(dist, dim=1) * scaler.view(1, -1, 1)).chunk(2, dim=-1)
    boxes = torch.cat([anchors - lt, anchors + rb], dim=-1)
    return torch.cat(cls, dim=1), torch.cat(bins, dim=1), boxes


@torch.no_grad()
def align_targets(
    gt: Tensor, pred_cls: Tensor, pred_boxes: Tensor, anchors: Tensor, num_classes: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Task-aligned assignment of the packed GT ``(B, N, 5)`` (label, xyxy; label -1 pads).

    Returns the class targets ``(B, A, C)`` (one-hot scaled by the IoU-normalised alignment),
    the assigned boxes ``(B, A, 4)`` and the assigned-anchor mask ``(B, A)``.
    """
    if gt.shape[1] == 0:
        align_cls = torch.zeros_like(pred_cls)
        return (
            align_cls,
            torch.zeros_like(pred_boxes),
            align_cls.new_zeros(pred_cls.shape[:2]).bool(),
        )
    gt_cls, gt_boxes = gt.split([1, 4], dim=-1)
    gt_cls = gt_cls.long().clamp(0)
    x1, y1, x2, y2 = gt_boxes[:, :, None].unbind(3)
    ax, ay = anchors[None, None].unbind(dim=3)
    inside = (x1 < ax) & (ax < x2) & (y1 < ay) & (ay < y2)
    ious = ciou(gt_boxes.unsqueeze(2), pred_boxes.unsqueeze(1), gt.dtype).clamp(0, 1)
    cls_prob = torch.gather(
        pred_cls.sigmoid().transpose(1, 2), 1, gt_cls.expand(-1, -1, pred_cls.shape[1])
    )
    metric = inside * (ious**IOU_FACTOR) * (cls_prob**CLS_FACTOR)
    # Top 10 anchors per GT, kept where their metric is positive.
    values, indices = metric.topk(TOPK, dim=-1)
    topk_mask = torch.zeros_like(metric).scatter_(dim=-1, index=indices, src=values) > 0
    # An anchor claimed by several GTs keeps the one it overlaps most.
    shared = (topk_mask.sum(1, keepdim=True) > 1).repeat([1, topk_mask.shape[1], 1])
    best = F.one_hot(ious.argmax(1), topk_mask.shape[1]).permute(0, 2, 1)
    topk_mask = torch.where(shared, best, topk_mask)
    assigned = topk_mask.argmax(dim=1)[..., None]
    valid = topk_mask.sum(1)
    boxes = torch.gather(gt_boxes, 1, assigned.repeat(1, 1, 4))
    onehot = F.one_hot(torch.gather(gt_cls, 1, assigned).squeeze(-1), num_classes)
    ious = ious * topk_mask
    metric = metric * topk_mask
    normalised = (metric / (metric.amax(dim=-1, keepdim=True) + 1e-9)) * ious.amax(
        dim=-1, keepdim=True
    )
    align_cls = onehot * normalised.permute(0, 2, 1).gather(2, assigned) * valid[:, :, None]
    # Upstream concatenates classes and boxes (dtype promotion) before splitting them again.
    common = torch.promote_types(align_cls.dtype, boxes.dtype)
    return align_cls.to(common), boxes.to(common), valid.bool()


def _levels(out: Mapping[str, Any]) -> tuple[list[Tensor], str]:
    pred = require_key(out, "pred", "out")
    field = "out.pred"
    if isinstance(pred, Mapping):
        # A dict prediction carries 'outputs' (and 'aux_outputs', which upstream ignores).
        pred, field = require_key(pred, "outputs", "out.pred"), "out.pred.outputs"
    levels = sequence(
        pred, field, "a list with one (B, 4 * reg_max + C, H_l, W_l) tensor per level"
    )
    if not levels:
        raise InvalidArgument.expected(field, "at least one level", "an empty list")
    return [
        require_tensor(lv, f"{field}[{k}]", floating=True, dim=4) for k, lv in enumerate(levels)
    ], field


def _check_levels(
    levels: list[Tensor], field: str, hw: tuple[int, int], channels: int
) -> list[int]:
    first = levels[0]
    strides = []
    for k, level in enumerate(levels):
        where = f"{field}[{k}]"
        batch, chans, height, width = level.shape
        if chans != channels:
            raise InvalidArgument.expected(
                where,
                f"4 * reg_max + num_classes = {channels} channels",
                f"shape {list(level.shape)}",
            )
        if (batch, level.dtype, level.device) != (first.shape[0], first.dtype, first.device):
            raise InvalidArgument.expected(
                where,
                f"batch {first.shape[0]}, {first.dtype}, on {first.device} (as {field}[0])",
                f"batch {batch}, {level.dtype}, on {level.device}",
            )
        stride = hw[1] // width if width else 0
        if (
            stride < 1
            or hw[0] % stride
            or hw[1] % stride
            or (hw[0] // stride, hw[1] // stride) != (height, width)
        ):
            # Upstream derives the stride from the width and builds its anchor grid from the
            # image size: anything else ends in a shape mismatch.
            raise InvalidArgument.expected(
                where,
                f"H_l x W_l = (H / s) x (W / s) for the image (H, W) = {hw} and the stride "
                f"s = W // W_l dividing both",
                f"shape {list(level.shape)}",
            )
        strides.append(stride)
    return strides


def yolov9_loss(
    out: Mapping[str, Any],
    target: Mapping[str, Any],
    *,
    l1_activate_epoch: int | None,
    cur_epoch: int | None = None,
    reg_max: int = 16,
) -> LossOutput:
    """YOLOv9 loss: task-aligned assignment, then ``0.5 * BCE + 1.5 * DFL + 7.5 * CIoU``.

    Each level ``(B, 4 * reg_max + C, H_l, W_l)`` holds the bin logits of the four sides
    (left, top, right, bottom; side-major) then C class logits; its stride is
    ``s = W // W_l``. The anchor points are ``(col * s + s // 2, row * s + s // 2)``; each side's
    distance is ``s * sum_k k * softmax(bins)_k``, giving xyxy boxes around the points. GT boxes
    are packed into float32 rows ``(label, x1, y1, x2, y2)`` (label -1 pads; the caller's
    target is not modified).

    Assignment (no gradient): for each GT, the points strictly inside its box score
    ``clamp(CIoU, 0, 1)^6 * sigmoid(cls_gt)^0.5``; its top 10 by this score (if > 0) are
    candidates; a point claimed by several GTs keeps the GT of highest CIoU. The class target of
    an assigned point is ``score / max_score(gt) * max_ciou(gt)`` for its GT's class. With
    ``n = max(sum of class targets, 1)`` and ``w`` each assigned point's class target sum::

        cls = sum BCEWithLogits(cls_logits, class targets) / n
        iou = sum_assigned w * (1 - CIoU(pred, gt)) / n               (boxes in stride units)
        dfl = sum_assigned w * mean_sides DFL(bins, clamp(distance / s, 0, reg_max - 1.01)) / n
        total = 0.5 * cls + 1.5 * dfl + 7.5 * iou

    Args:
        out (dict): ``'pred'``: the list of level tensors, or a dict ``{'outputs': [...],
            'aux_outputs': ...}`` whose ``aux_outputs`` upstream ignores (so does lossd).
        target (dict): ``'gt'``: B dicts ``{'boxes': Tensor[n_i, 4] float xyxy pixels,
            'labels': Tensor[n_i] int in [0, C)}`` (``n_i`` may be 0); ``'img_size'``: int or
            (H, W); ``'num_classes'``: int C.
        l1_activate_epoch (int or None): required by upstream's constructor, unused.
        cur_epoch (int, optional): the trainer's epoch counter; unused, as upstream.
        reg_max (int): DFL bins per side. Default: ``16``.

    Returns:
        LossOutput: ``value`` the scalar total (the levels' dtype); components ``'cls'``,
        ``'iou'``, ``'dfl'`` are the unweighted terms. Gradients flow to every level.

    Raises:
        InvalidArgument: labels outside [0, C), a level whose channels are not
            ``4 * reg_max + C`` or whose size does not tile the image, levels of different
            dtypes, fewer than 10 anchor points with GT present (upstream's top-10).

    Reference:
        ``netspresso_trainer.losses.detection.yolov9.YOLOv9Loss`` (netspresso-trainer 1.4.1),
        after WongKinYiu/YOLO. Wang et al., "YOLOv9: Learning What You Want to Learn Using
        Programmable Gradient Information", ECCV 2024.
    """
    levels, field = _levels(out)
    num_classes = plain_int(require_key(target, "num_classes", "target"), "target.num_classes", 1)
    hw = image_hw(require_key(target, "img_size", "target"))
    strides = _check_levels(levels, field, hw, 4 * reg_max + num_classes)
    batch, dtype, device = levels[0].shape[0], levels[0].dtype, levels[0].device
    if batch == 0:
        # Upstream takes max() over the per-image GT counts: ValueError on an empty batch.
        raise InvalidArgument.expected(f"{field}[0]", "at least one image", "batch size 0")
    images = ground_truth(target, batch, num_classes, source=field)
    work = _work_dtype(dtype)

    anchors, scaler = _anchor_points(hw, strides)
    anchors, scaler = anchors.to(device), scaler.to(device)
    pred_cls, pred_bins, pred_boxes = _decode(levels, num_classes, reg_max, anchors, scaler)
    max_gt = max(labels.shape[0] for _, labels in images)
    if max_gt and anchors.shape[0] < TOPK:
        raise InvalidArgument.expected(
            field,
            f"at least {TOPK} anchor points over the levels (upstream takes each GT's top {TOPK})",
            f"{anchors.shape[0]}",
        )
    packed = torch.zeros(batch, max_gt, 5, dtype=work, device=device)
    packed[:, :, 0] = -1
    for i, (boxes, labels) in enumerate(images):
        packed[i, : labels.shape[0], 1:5] = boxes
        packed[i, : labels.shape[0], 0] = labels

    target_cls, target_boxes, valid = align_targets(
        packed, pred_cls.detach(), pred_boxes.detach(), anchors, num_classes
    )
    target_boxes = target_boxes / scaler[None, :, None]
    pred_boxes = pred_boxes / scaler[None, :, None]
    cls_norm = max(target_cls.sum(), 1)
    box_norm = target_cls.sum(-1)[valid]

    loss_cls = (
        F.binary_cross_entropy_with_logits(pred_cls, target_cls, reduction="none").sum() / cls_norm
    )

    mask4 = valid[..., None].expand(-1, -1, 4)
    picked_pred = pred_boxes[mask4].view(-1, 4)
    picked_target = target_boxes[mask4].view(-1, 4)
    loss_iou = ((1.0 - ciou(picked_pred, picked_target, work)) * box_norm).sum() / cls_norm

    # Upstream divides the int64 anchor points by their int64 strides: torch's default float32.
    anchors_norm = (anchors.to(work) / scaler[:, None].to(work))[None]
    lt, rb = target_boxes.chunk(2, -1)
    distances = torch.cat((anchors_norm - lt, rb - anchors_norm), -1).clamp(0, reg_max - 1.01)
    picked_dist = distances[mask4].view(-1)
    picked_bins = pred_bins[mask4].view(-1, reg_max)
    left = picked_dist.floor()
    right = left + 1
    dfl = F.cross_entropy(picked_bins, left.long(), reduction="none") * (right - picked_dist)
    dfl = dfl + F.cross_entropy(picked_bins, right.long(), reduction="none") * (picked_dist - left)
    loss_dfl = (dfl.view(-1, 4).mean(-1) * box_norm).sum() / cls_norm

    total = CLS_WEIGHT * loss_cls + DFL_WEIGHT * loss_dfl + IOU_WEIGHT * loss_iou
    components = {"cls": loss_cls.detach(), "iou": loss_iou.detach(), "dfl": loss_dfl.detach()}
    return LossOutput(total, components=components)


def _make_example(dtype: torch.dtype) -> tuple[tuple, dict, dict]:
    gen = torch.Generator().manual_seed(2402)
    batch, classes, reg_max = 2, 2, 4
    channels = 4 * reg_max + classes
    pred = [
        torch.randn(batch, channels, n, n, generator=gen, dtype=torch.float64).to(dtype)
        for n in (4, 2)
    ]
    gt = [
        {
            "boxes": torch.tensor([[3.0, 2.0, 21.0, 15.0], [10.0, 12.0, 30.0, 31.0]], dtype=dtype),
            "labels": torch.tensor([1, 0]),
        },
        {"boxes": torch.zeros(0, 4, dtype=dtype), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    target = {"gt": gt, "img_size": 32, "num_classes": classes}
    return ({"pred": pred}, target), {}, {"l1_activate_epoch": None, "reg_max": reg_max}


SPECS = (
    LossSpec(
        name="yolov9_loss",
        fn=yolov9_loss,
        families=("netspresso",),
        summary="YOLOv9 loss: task-aligned assignment (CIoU^6 * p^0.5, top 10), 0.5*BCE + 1.5*DFL over reg_max bins + 7.5*CIoU.",
        inputs=(
            model_output(
                "{'pred': [Tensor[B, 4 * reg_max + C, H_l, W_l]] per level (side-major DFL "
                "bin logits, then class logits), or {'outputs': [...], 'aux_outputs': ignored}}"
            ),
            GT_TARGET,
        ),
        params=(
            Param(
                "l1_activate_epoch",
                "int",
                REQUIRED,
                doc="required by upstream's constructor (null allowed), unused",
                nullable=True,
            ),
            Param("cur_epoch", "int", None, doc="the trainer's epoch counter; unused, as upstream"),
            Param("reg_max", "int", 16, doc="DFL bins per box side", minimum=2),
        ),
        reference="netspresso_trainer.losses.detection.yolov9.YOLOv9Loss (netspresso-trainer==1.4.1); "
        "WongKinYiu/YOLO; Wang et al., YOLOv9, ECCV 2024",
        example='RemoteLoss("yolov9_loss", l1_activate_epoch=None)({"pred": [p3, p4, p5]}, '
        '{"gt": [{"boxes": boxes, "labels": labels}, ...], "img_size": 640, "num_classes": 80})',
        make_example=_make_example,
    ),
)
