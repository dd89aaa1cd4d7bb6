"""visdet box IoU losses: IoULoss and GIoULoss of aligned x1y1x2y2 boxes."""

from __future__ import annotations

import torch
from torch import Tensor

from ...registry import Input, LossOutput, LossSpec, Param
from ._mmdet import (
    _LOSS_WEIGHT,
    _REDUCTION,
    _UPSTREAM,
    _call_reduction,
    _gen,
    _same_shape,
    _tail_inputs,
    _weighted_reduce,
    _zero_weight_shortcut,
)

_IOU_MODES = ("linear", "square", "log")


# Box IoU losses
# --------------------------------------------------------------------------------------------


def _aligned_overlaps(boxes1: Tensor, boxes2: Tensor, mode: str, eps: float) -> Tensor:
    """IoU or GIoU of aligned x1y1x2y2 box pairs (mmdet ``bbox_overlaps(is_aligned=True)``).

    Union and enclosing area are clamped to at least ``eps``; overlap and enclosing widths to 0.
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - overlap
    eps_t = union.new_tensor([eps])
    union = torch.max(union, eps_t)
    ious = overlap / union
    if mode == "iou":
        return ious
    enclose_wh = (
        torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(boxes1[..., :2], boxes2[..., :2])
    ).clamp(min=0)
    enclose_area = torch.max(enclose_wh[..., 0] * enclose_wh[..., 1], eps_t)
    return ious - (enclose_area - union) / enclose_area


def _box_weight(weight: Tensor | None, pred: Tensor) -> Tensor | None:
    """A per-coordinate (N, 4) weight is averaged to (N,) to match the per-box loss."""
    if weight is None or weight.dim() <= 1:
        return weight
    _same_shape(pred, weight, "weight", "pred's, for a weight with more than one dim")
    return weight.mean(-1)


def _box_loss(pred: Tensor, target: Tensor, mode: str, eps: float) -> Tensor:
    # mmdet computes fp16 boxes in float32 (overflow) and casts the overlaps back.
    half = pred.dtype == torch.float16
    overlaps = _aligned_overlaps(
        pred.float() if half else pred,
        target,
        "giou" if mode == "giou" else "iou",
        1e-6 if mode != "giou" else eps,
    )
    if mode != "giou":
        overlaps = overlaps.clamp(min=eps)
    if half:
        # Back to the dtype mmdet's arithmetic gives: float16 for two float16 inputs, float32
        # for a float16 pred against a float32 target (type promotion).
        overlaps = overlaps.to(torch.promote_types(pred.dtype, target.dtype))
    if mode == "linear":
        return 1 - overlaps
    if mode == "square":
        return 1 - overlaps**2
    if mode == "log":
        return -overlaps.log()
    return 1 - overlaps  # giou


def iou_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    avg_factor: float | None = None,
    reduction_override: str | None = None,
    *,
    linear: bool = False,
    eps: float = 1e-6,
    reduction: str = "mean",
    loss_weight: float = 1.0,
    mode: str = "log",
) -> Tensor | LossOutput:
    """IoU loss of aligned box pairs: ``1 - IoU`` (linear), ``1 - IoU^2`` (square) or ``-ln IoU`` (log).

    IoU = overlap / max(union, 1e-6), then clamped to at least ``eps``.

    Args:
        pred (Tensor): ``(N, 4)`` float boxes, x1y1x2y2 absolute coordinates.
        target (Tensor): ``(N, 4)`` float boxes, aligned with ``pred``.
        weight (Tensor, optional): ``(N,)``, or ``(N, 4)`` averaged over the last dim. When no
            entry is > 0 and the reduction is not ``'none'``: returns ``(pred * weight).sum()``.
        avg_factor (float, optional): divide the sum by ``avg_factor + eps``.
        reduction_override (str, optional): ``'none'``, ``'mean'`` or ``'sum'`` for this call.
        linear (bool): deprecated upstream; True means ``mode='linear'``.
        eps (float): lower clamp of the IoU.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``.
        loss_weight (float): multiplier of the result.
        mode (str): ``'linear'`` | ``'square'`` | ``'log'``.

    Returns:
        Tensor: the loss; NaN for an empty input with ``mean``. Gradients flow to both boxes.

    Reference:
        ``visdet.models.losses.IoULoss`` (visdet f72e8d1 = mmdet 3.3.0); Yu et al., "UnitBox",
        ACM MM 2016.
    """
    notes = []
    if linear:
        mode = "linear"
        notes.append(
            "upstream DeprecationWarning: linear=True is deprecated, use mode='linear' (mode is now 'linear')"
        )
    reduction = _call_reduction(reduction, reduction_override)
    if reduction != "none":
        shortcut = _zero_weight_shortcut(pred, weight)
        if shortcut is not None:
            shortcut.notes[:0] = notes
            return shortcut
    weight = _box_weight(weight, pred)
    loss = _box_loss(pred, target, mode, eps)
    return _weighted_reduce(loss, weight, reduction, avg_factor, loss_weight, notes)


def giou_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    avg_factor: float | None = None,
    reduction_override: str | None = None,
    *,
    eps: float = 1e-6,
    reduction: str = "mean",
    loss_weight: float = 1.0,
) -> Tensor | LossOutput:
    """Generalized IoU loss ``1 - GIoU`` of aligned box pairs.

    ``GIoU = IoU - (C - U) / C`` with union ``U`` and enclosing-box area ``C`` both clamped to at
    least ``eps``. Identical boxes give 0, disjoint far-apart boxes approach 2; zero-area boxes
    give 1.

    Args:
        pred (Tensor): ``(N, 4)`` float boxes, x1y1x2y2 absolute coordinates.
        target (Tensor): ``(N, 4)`` float boxes, aligned with ``pred``.
        weight (Tensor, optional): ``(N,)``, or ``(N, 4)`` averaged over the last dim. When no
            entry is > 0 (any reduction): returns ``(pred * weight).sum()``.
        avg_factor (float, optional): divide the sum by ``avg_factor + eps``.
        reduction_override (str, optional): ``'none'``, ``'mean'`` or ``'sum'`` for this call.
        eps (float): lower clamp of union and enclosing area.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``.
        loss_weight (float): multiplier of the result.

    Returns:
        Tensor: the loss; NaN for an empty input with ``mean``. Gradients flow to both boxes.

    Reference:
        ``visdet.models.losses.GIoULoss`` (visdet f72e8d1 = mmdet 3.3.0); Rezatofighi et al.,
        "Generalized Intersection over Union", CVPR 2019.
    """
    reduction = _call_reduction(reduction, reduction_override)
    shortcut = _zero_weight_shortcut(pred, weight)
    if shortcut is not None:
        return shortcut
    weight = _box_weight(weight, pred)
    loss = _box_loss(pred, target, "giou", eps)
    return _weighted_reduce(loss, weight, reduction, avg_factor, loss_weight)


def _boxes(n: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 8
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 6 + 2
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


def _example_boxes(dtype):
    gen = _gen(16)
    return (_boxes(6, gen, dtype), _boxes(6, gen, dtype)), {}, {}


# IoULoss and GIoULoss: aligned boxes, then the MMDetection forward tail.
_BOX_INPUTS = (
    Input("pred", shape=("N", "*", 4), differentiable=True, doc="(N, 4) boxes, x1y1x2y2 absolute"),
    Input("target", same_shape="pred", differentiable=True, doc="(N, 4) boxes aligned with pred"),
    *_tail_inputs("(N,) per-box weight, or (N, 4) averaged over the last dim"),
)

SPECS = (
    LossSpec(
        name="IoULoss",
        fn=iou_loss,
        families=("visdet",),
        summary="IoU loss of aligned x1y1x2y2 boxes: 1 - IoU, 1 - IoU^2 or -ln IoU.",
        inputs=_BOX_INPUTS,
        params=(
            Param("linear", "bool", False, doc="deprecated: True means mode='linear'"),
            Param("eps", "float", 1e-6, doc="lower clamp of the IoU"),
            _REDUCTION,
            _LOSS_WEIGHT,
            Param("mode", "str", "log", choices=_IOU_MODES, doc="'linear' | 'square' | 'log'"),
        ),
        reference=f"visdet.models.losses.IoULoss ({_UPSTREAM}); Yu et al., UnitBox, ACM MM 2016",
        example='RemoteLoss("IoULoss", mode="log", loss_weight=1.0)(pred_boxes, gt_boxes, weight)',
        make_example=_example_boxes,
    ),
    LossSpec(
        name="GIoULoss",
        fn=giou_loss,
        families=("visdet",),
        summary="Generalized IoU loss 1 - GIoU of aligned x1y1x2y2 boxes.",
        inputs=_BOX_INPUTS,
        params=(
            Param("eps", "float", 1e-6, doc="lower clamp of union and enclosing area"),
            _REDUCTION,
            _LOSS_WEIGHT,
        ),
        reference=f"visdet.models.losses.GIoULoss ({_UPSTREAM}); Rezatofighi et al., Generalized Intersection over Union, CVPR 2019",
        example='RemoteLoss("GIoULoss", loss_weight=2.0)(pred_boxes, gt_boxes, weight, avg_factor=num_pos)',
        make_example=_example_boxes,
    ),
)
