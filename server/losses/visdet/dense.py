"""visdet dense-prediction losses: GaussianFocalLoss (CenterNet heat-maps), DiceLoss (mask heads).

Both follow the MMDetection convention of ``_mmdet`` (weight, reduction, ``avg_factor`` with
float32's eps, ``loss_weight``). An ``avg_factor`` may be a Python number or a one-element tensor:
CenterNet passes ``max(1, heatmap.eq(1).sum())``, a 0-d int64 tensor, and upstream's
``avg_factor + eps`` is then computed in float32 (where the eps mostly rounds away); lossd keeps
that tensor as a tensor, so the division is the one upstream does, bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...errors import InvalidArgument
from ...registry import ANY_DTYPES, Input, LossOutput, LossSpec, Param
from ._mmdet import (
    _LOSS_WEIGHT,
    _REDUCTION,
    _REDUCTION_OVERRIDE,
    _UPSTREAM,
    _broadcast_pair,
    _call_reduction,
    _gen,
    _optional_avg_factor,
    _weighted_reduce,
)

GAUSSIAN_FOCAL_EPS = 1e-12


def _avg_factor_input() -> Input:
    return Input(
        "avg_factor",
        kind="any",
        optional=True,
        doc="a number or a one-element tensor (kept a tensor: upstream's float32 avg_factor + eps); "
        "divides the sum (mean only; an error with sum)",
    )


# --------------------------------------------------------------------------------------------
# GaussianFocalLoss
# --------------------------------------------------------------------------------------------


def gaussian_focal_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    avg_factor: Any = None,
    reduction_override: str | None = None,
    *,
    alpha: float = 2.0,
    gamma: float = 4.0,
    reduction: str = "mean",
    loss_weight: float = 1.0,
) -> Tensor | LossOutput:
    """Focal loss on a gaussian heat-map (CenterNet / CornerNet), element-wise, then mmdet reduction.

    With ``eps = 1e-12``, positives are the entries where ``target == 1`` exactly::

        pos = -log(pred + eps) * (1 - pred)^alpha * [target == 1]
        neg = -log(1 - pred + eps) * pred^alpha * (1 - target)^gamma
        loss = pos + neg

    then ``weight``, the reduction (or ``sum / (avg_factor + float32 eps)``) and ``loss_weight``.

    Args:
        pred (Tensor): ``(B, C, H, W)`` (any shape) float probabilities, e.g. a sigmoid heat-map.
        target (Tensor): float gaussian heat-map broadcastable with ``pred``, peaks exactly 1.
        weight (Tensor, optional): element weight broadcast against the loss.
        avg_factor (number or Tensor, optional): divide the sum by ``avg_factor + eps``; a
            one-element tensor (CenterNet's count of peaks) stays a tensor, as upstream.
        reduction_override (str, optional): ``'none'``, ``'mean'`` or ``'sum'`` for this call.
        alpha (float): exponent of the prediction's modulating factor.
        gamma (float): exponent of ``1 - target`` that down-weights negatives near a peak.
        reduction (str): ``'none'`` | ``'mean'`` (over every element) | ``'sum'``.
        loss_weight (float): multiplier of the result.

    Returns:
        Tensor: the loss. Gradients flow to ``pred`` and to ``target`` (through the negative
        weights). ``pred`` outside [0, 1] gives NaN, as upstream (a note says so).

    Reference:
        ``visdet.models.losses.GaussianFocalLoss`` (visdet f72e8d1). Law and Deng, "CornerNet",
        ECCV 2018; Zhou et al., "Objects as Points", arXiv:1904.07850.
    """
    reduction = _call_reduction(reduction, reduction_override)
    avg_factor = _optional_avg_factor(avg_factor)
    positive = target.eq(1)
    negative_weight = (1 - target).pow(gamma)
    pos_loss = -(pred + GAUSSIAN_FOCAL_EPS).log() * (1 - pred).pow(alpha) * positive
    neg_loss = -(1 - pred + GAUSSIAN_FOCAL_EPS).log() * pred.pow(alpha) * negative_weight
    notes = []
    if pred.numel() and not bool(((pred >= 0) & (pred <= 1)).all()):
        notes.append(
            "pred holds values outside [0, 1] (not probabilities): upstream's logs and powers give NaN there"
        )
    return _weighted_reduce(pos_loss + neg_loss, weight, reduction, avg_factor, loss_weight, notes)


# --------------------------------------------------------------------------------------------
# DiceLoss
# --------------------------------------------------------------------------------------------


def _dice_inputs(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    # Declared: both have a dim 1 to flatten from (upstream flattens from it).
    flat_pred, flat_target = pred.flatten(1).shape, target.flatten(1).shape
    try:
        torch.broadcast_shapes(flat_pred, flat_target)
    except RuntimeError:
        raise InvalidArgument.expected(
            "target",
            f"masks that flatten to a shape broadcasting with pred's flattened {list(flat_pred)}",
            f"shape {list(target.shape)} (flattened {list(flat_target)})",
        ) from None
    return pred, target


def dice_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    reduction_override: str | None = None,
    avg_factor: Any = None,
    *,
    use_sigmoid: bool = True,
    activate: bool = True,
    reduction: str = "mean",
    naive_dice: bool = False,
    loss_weight: float = 1.0,
    eps: float = 1e-3,
) -> Tensor | LossOutput:
    """Dice loss per mask (V-Net or naive dice), then mmdet reduction.

    ``p = sigmoid(pred)`` when ``activate`` (else ``pred`` as given); both are flattened from dim
    1, the target cast to float32 as upstream. With ``a = sum(p * t)`` per mask::

        V-Net (default):  d = 2a / ((sum(p^2) + eps) + (sum(t^2) + eps))
        naive_dice=True:  d = (2a + eps) / (sum(p) + sum(t) + eps)
        loss = 1 - d      (shape (n,))

    then ``weight``, the reduction (or ``sum / (avg_factor + float32 eps)``) and ``loss_weight``.
    Note the forward order: ``(pred, target, weight, reduction_override, avg_factor)``.

    Args:
        pred (Tensor): ``(n, *)`` float mask logits (probabilities when ``activate=False``).
        target (Tensor): ``(n, *)`` masks (float, integer or bool; cast to float32).
        weight (Tensor, optional): ``(n,)`` per-mask weight (1-d, one per mask).
        reduction_override (str, optional): ``'none'``, ``'mean'`` or ``'sum'`` for this call.
        avg_factor (number or Tensor, optional): divide the sum by ``avg_factor + eps``.
        use_sigmoid (bool): the activation is a sigmoid; must be True when ``activate``
            (upstream has no other).
        activate (bool): apply the sigmoid to ``pred``.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``.
        naive_dice (bool): the naive dice (linear denominators) instead of V-Net's squares.
        loss_weight (float): multiplier of the result.
        eps (float): smoothing term (see the formulas).

    Returns:
        Tensor: the loss; ``(n,)`` with ``none``. Gradients flow to ``pred`` and to a float
        ``target`` (through the float32 cast). An empty batch with ``mean`` is NaN, as upstream.

    Reference:
        ``visdet.models.losses.DiceLoss`` (visdet f72e8d1). Milletari et al., "V-Net", 3DV 2016.
    """
    reduction = _call_reduction(reduction, reduction_override)
    if activate and not use_sigmoid:
        raise InvalidArgument.expected(
            "params.use_sigmoid",
            "True when activate=True (upstream raises NotImplementedError: sigmoid is its only activation)",
            use_sigmoid,
            upstream="NotImplementedError",
        )
    pred, target = _dice_inputs(pred, target)
    avg_factor = _optional_avg_factor(avg_factor)
    if activate:
        pred = pred.sigmoid()
    flat = pred.flatten(1)
    mask = target.flatten(1).float()
    a = torch.sum(flat * mask, 1)
    if naive_dice:
        dice = (2 * a + eps) / (torch.sum(flat, 1) + torch.sum(mask, 1) + eps)
    else:
        dice = (2 * a) / ((torch.sum(flat * flat, 1) + eps) + (torch.sum(mask * mask, 1) + eps))
    loss = 1 - dice  # (n,), as the declared (n,) weight
    return _weighted_reduce(loss, weight, reduction, avg_factor, loss_weight)


# --------------------------------------------------------------------------------------------


def _gaussian_heatmap(
    batch: int, classes: int, size: int, centres: list, dtype: torch.dtype
) -> Tensor:
    """Heat-maps with a gaussian (sigma 1.5) at each ``(image, class, row, col)``, peaks exactly 1."""
    heat = torch.zeros(batch, classes, size, size, dtype=torch.float64)
    rows = torch.arange(size, dtype=torch.float64)
    for b, c, r, q in centres:
        g = torch.exp(-((rows[:, None] - r) ** 2 + (rows[None, :] - q) ** 2) / (2 * 1.5**2))
        heat[b, c] = torch.maximum(heat[b, c], g)
    return heat.to(dtype)


def _example_gaussian_focal(dtype):
    gen = _gen(1904)
    target = _gaussian_heatmap(2, 2, 6, [(0, 0, 2, 3), (0, 1, 4, 1)], dtype)  # image 1: no object
    pred = torch.rand(2, 2, 6, 6, generator=gen, dtype=torch.float64).mul(0.9).add(0.05).to(dtype)
    # CenterNet's avg_factor: max(1, number of peaks), a 0-d int64 tensor
    return (pred, target), {"avg_factor": torch.tensor(2)}, {}


def _example_dice(dtype):
    gen = _gen(1606)
    pred = torch.randn(3, 5, 5, generator=gen).to(dtype)
    target = (torch.rand(3, 5, 5, generator=gen) > 0.5).to(dtype)
    target[2] = 0  # an empty mask
    return (pred, target), {"weight": torch.tensor([1.0, 0.5, 2.0], dtype=dtype)}, {}


SPECS = (
    LossSpec(
        name="GaussianFocalLoss",
        fn=gaussian_focal_loss,
        families=("visdet",),
        summary="Gaussian focal loss (CenterNet): focal loss of heat-map probabilities against a "
        "gaussian target whose exact 1s are the positives.",
        inputs=(
            *_broadcast_pair(
                "(B, C, H, W) probabilities (sigmoid heat-map)",
                "(B, C, H, W) gaussian heat-map, exactly 1 at object centres",
            ),
            Input("weight", optional=True, doc="element weight broadcast against the loss"),
            _avg_factor_input(),
            _REDUCTION_OVERRIDE,
        ),
        params=(
            Param("alpha", "float", 2.0, doc="exponent of the prediction's modulating factor"),
            Param("gamma", "float", 4.0, doc="exponent of (1 - target) on the negatives"),
            _REDUCTION,
            _LOSS_WEIGHT,
        ),
        reference=f"visdet.models.losses.GaussianFocalLoss ({_UPSTREAM}); "
        "Zhou et al., Objects as Points (CenterNet), arXiv:1904.07850",
        example='RemoteLoss("GaussianFocalLoss", loss_weight=1.0)(heatmap.sigmoid(), gaussian_target, '
        "avg_factor=max(1, gaussian_target.eq(1).sum()))",
        make_example=_example_gaussian_focal,
    ),
    LossSpec(
        name="DiceLoss",
        fn=dice_loss,
        families=("visdet",),
        summary="Dice loss per mask (V-Net squared or naive denominators), sigmoid-activated; "
        "forward (pred, target, weight, reduction_override, avg_factor).",
        inputs=(
            Input("pred", shape=("n", "?", "*"), differentiable=True, doc="(n, *) mask logits"),
            Input(
                "target",
                dtypes=ANY_DTYPES,
                shape=("?", "?", "*"),
                differentiable=True,
                doc="(n, *) masks, cast to float32 (float targets get a gradient)",
            ),
            Input("weight", shape=("n",), optional=True, doc="(n,) per-mask weight"),
            _REDUCTION_OVERRIDE,
            _avg_factor_input(),
        ),
        params=(
            Param("use_sigmoid", "bool", True, doc="sigmoid activation (the only one upstream)"),
            Param("activate", "bool", True, doc="apply the activation to pred"),
            _REDUCTION,
            Param(
                "naive_dice", "bool", False, doc="linear denominators instead of V-Net's squares"
            ),
            _LOSS_WEIGHT,
            Param("eps", "float", 1e-3, doc="smoothing term of the dice ratio"),
        ),
        reference=f"visdet.models.losses.DiceLoss ({_UPSTREAM}); Milletari et al., V-Net, 3DV 2016",
        example='RemoteLoss("DiceLoss", naive_dice=False, loss_weight=1.0)(mask_logits, gt_masks, weight)',
        make_example=_example_dice,
    ),
)
