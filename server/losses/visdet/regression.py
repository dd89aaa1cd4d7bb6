"""visdet element-wise regression losses: L1Loss, SmoothL1Loss, MSELoss and BalancedL1Loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import InvalidArgument
from ...registry import Input, LossOutput, LossSpec, Param
from ._mmdet import (
    _LOSS_WEIGHT,
    _REDUCTION,
    _UPSTREAM,
    _broadcast_pair,
    _call_reduction,
    _gen,
    _same_shape,
    _tail_inputs,
    _weighted_reduce,
    _zero_weight_shortcut,
)

# --------------------------------------------------------------------------------------------


def _elementwise_or_empty(pred: Tensor, target: Tensor, fn) -> Tensor:
    # Upstream checks emptiness before the shape assertion: an empty target gives pred.sum() * 0.
    if target.numel() == 0:
        return pred.sum() * 0
    _same_shape(pred, target)
    return fn(pred, target)


def l1_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    avg_factor: float | None = None,
    reduction_override: str | None = None,
    *,
    reduction: str = "mean",
    loss_weight: float = 1.0,
) -> Tensor | LossOutput:
    """L1 loss ``|pred - target|`` with MMDetection weighting and reduction.

    Args:
        pred (Tensor): float predictions, any shape (typically ``(N, 4)`` box deltas).
        target (Tensor): float targets of ``pred``'s shape.
        weight (Tensor, optional): broadcast against the element-wise loss (an ``(N,)`` weight
            does not broadcast against ``(N, 4)``). No positive entry: returns
            ``(pred * weight).sum()`` (0, graph kept, ``loss_weight`` not applied).
        avg_factor (float, optional): divide the sum by ``avg_factor + eps``.
        reduction_override (str, optional): ``'none'``, ``'mean'`` or ``'sum'`` for this call.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``.
        loss_weight (float): multiplier of the result.

    Returns:
        Tensor: the loss; an empty target gives 0 (graph kept). Gradients flow to both inputs.

    Reference:
        ``visdet.models.losses.L1Loss`` (visdet f72e8d1 = mmdet 3.3.0).
    """
    reduction = _call_reduction(reduction, reduction_override)
    shortcut = _zero_weight_shortcut(pred, weight)
    if shortcut is not None:
        return shortcut
    loss = _elementwise_or_empty(pred, target, lambda p, t: torch.abs(p - t))
    return _weighted_reduce(loss, weight, reduction, avg_factor, loss_weight)


def smooth_l1_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    avg_factor: float | None = None,
    reduction_override: str | None = None,
    *,
    beta: float = 1.0,
    reduction: str = "mean",
    loss_weight: float = 1.0,
) -> Tensor | LossOutput:
    """Smooth L1 (Huber-like): ``0.5 d^2 / beta`` if ``|d| < beta`` else ``|d| - 0.5 beta``.

    Args:
        pred (Tensor): float predictions, any shape (typically ``(N, 4)``).
        target (Tensor): float targets of ``pred``'s shape.
        weight (Tensor, optional): as in L1Loss, including the all-non-positive shortcut.
        avg_factor (float, optional): divide the sum by ``avg_factor + eps``.
        reduction_override (str, optional): ``'none'``, ``'mean'`` or ``'sum'`` for this call.
        beta (float): transition point, > 0.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``.
        loss_weight (float): multiplier of the result.

    Returns:
        Tensor: the loss; an empty target gives 0 (graph kept). Gradients flow to both inputs.

    Reference:
        ``visdet.models.losses.SmoothL1Loss`` (visdet f72e8d1 = mmdet 3.3.0); Girshick,
        "Fast R-CNN", ICCV 2015.
    """
    reduction = _call_reduction(reduction, reduction_override)
    shortcut = _zero_weight_shortcut(pred, weight)
    if shortcut is not None:
        return shortcut

    def elementwise(p: Tensor, t: Tensor) -> Tensor:
        diff = torch.abs(p - t)
        return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)

    loss = _elementwise_or_empty(pred, target, elementwise)
    return _weighted_reduce(loss, weight, reduction, avg_factor, loss_weight)


def mse_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    avg_factor: float | None = None,
    reduction_override: str | None = None,
    *,
    reduction: str = "mean",
    loss_weight: float = 1.0,
) -> Tensor | LossOutput:
    """Squared error ``(pred - target)^2`` with MMDetection weighting and reduction.

    Args:
        pred (Tensor): float predictions, any shape.
        target (Tensor): float targets broadcastable to ``pred`` (``F.mse_loss`` semantics).
        weight (Tensor, optional): broadcast against the element-wise loss.
        avg_factor (float, optional): divide the sum by ``avg_factor + eps``.
        reduction_override (str, optional): ``'none'``, ``'mean'`` or ``'sum'`` for this call.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``.
        loss_weight (float): multiplier of the result.

    Returns:
        Tensor: the loss; an empty input with ``mean`` gives NaN (no empty shortcut upstream).
        Gradients flow to both inputs.

    Reference:
        ``visdet.models.losses.MSELoss`` (visdet f72e8d1 = mmdet 3.3.0).
    """
    reduction = _call_reduction(reduction, reduction_override)
    if pred.shape != target.shape:
        # F.mse_loss broadcasts (with a warning); broadcasting first gives the same numbers quietly.
        pred, target = torch.broadcast_tensors(pred, target)
    loss = F.mse_loss(pred, target, reduction="none")
    return _weighted_reduce(loss, weight, reduction, avg_factor, loss_weight)


def balanced_l1_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    avg_factor: float | None = None,
    reduction_override: str | None = None,
    *,
    alpha: float = 0.5,
    gamma: float = 1.5,
    beta: float = 1.0,
    reduction: str = "mean",
    loss_weight: float = 1.0,
) -> Tensor | LossOutput:
    """Balanced L1 loss (Libra R-CNN).

    With ``d = |pred - target|`` and ``b = e^(gamma / alpha) - 1``:
    ``alpha / b * (b d + 1) * ln(b d / beta + 1) - alpha d`` if ``d < beta``, else
    ``gamma d + gamma / b - alpha beta``.

    Args:
        pred (Tensor): float predictions, any shape (typically ``(N, 4)``).
        target (Tensor): float targets of ``pred``'s shape.
        weight (Tensor, optional): broadcast against the element-wise loss (no shortcut).
        avg_factor (float, optional): divide the sum by ``avg_factor + eps``.
        reduction_override (str, optional): ``'none'``, ``'mean'`` or ``'sum'`` for this call.
        alpha (float): promotes the gradients of inliers; not 0.
        gamma (float): upper bound of the error; not 0 (``b`` would be 0).
        beta (float): transition point, > 0.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``.
        loss_weight (float): multiplier of the result.

    Returns:
        Tensor: the loss; an empty target gives 0 (graph kept). Gradients flow to both inputs.

    Reference:
        ``visdet.models.losses.BalancedL1Loss`` (visdet f72e8d1 = mmdet 3.3.0); Pang et al.,
        "Libra R-CNN", CVPR 2019.
    """
    if alpha == 0:
        raise InvalidArgument.expected(
            "params.alpha", "a non-zero value (b = e^(gamma/alpha) - 1)", alpha
        )
    try:
        b = math.e ** (gamma / alpha) - 1
    except OverflowError:
        raise InvalidArgument.expected(
            "params.gamma", "gamma / alpha small enough for e^(gamma/alpha)", gamma / alpha
        ) from None
    if b == 0:
        raise InvalidArgument.expected(
            "params.gamma", "a non-zero value (b = e^(gamma/alpha) - 1 must not be 0)", gamma
        )
    reduction = _call_reduction(reduction, reduction_override)

    def elementwise(p: Tensor, t: Tensor) -> Tensor:
        diff = torch.abs(p - t)
        inner = alpha / b * (b * diff + 1) * torch.log(b * diff / beta + 1) - alpha * diff
        return torch.where(diff < beta, inner, gamma * diff + gamma / b - alpha * beta)

    loss = _elementwise_or_empty(pred, target, elementwise)
    return _weighted_reduce(loss, weight, reduction, avg_factor, loss_weight)


def _example_regression(dtype):
    gen = _gen(15)
    pred = torch.randn(6, 4, generator=gen).to(dtype)
    target = torch.randn(6, 4, generator=gen).to(dtype)
    return (pred, target), {}, {}


_REG_WEIGHT_DOC = "weight broadcast against the element-wise loss (an (N,) weight does not broadcast against (N, 4))"
# L1Loss, SmoothL1Loss and BalancedL1Loss take the same forward.
_BOX_DELTA_INPUTS = (
    Input("pred", differentiable=True, doc="float predictions, e.g. (N, 4) box deltas"),
    Input("target", differentiable=True, doc="float targets of pred's shape"),
    *_tail_inputs(_REG_WEIGHT_DOC),
)

SPECS = (
    LossSpec(
        name="L1Loss",
        fn=l1_loss,
        families=("visdet",),
        summary="L1 loss |pred - target| with MMDetection weighting and reduction.",
        inputs=_BOX_DELTA_INPUTS,
        params=(_REDUCTION, _LOSS_WEIGHT),
        reference=f"visdet.models.losses.L1Loss ({_UPSTREAM})",
        example='RemoteLoss("L1Loss", loss_weight=1.0)(deltas, target_deltas, weight)',
        make_example=_example_regression,
    ),
    LossSpec(
        name="SmoothL1Loss",
        fn=smooth_l1_loss,
        families=("visdet",),
        summary="Smooth L1 loss: quadratic below beta, linear above.",
        inputs=_BOX_DELTA_INPUTS,
        params=(
            Param(
                "beta",
                "float",
                1.0,
                minimum=0.0,
                minimum_exclusive=True,
                doc="transition point between L2 and L1",
            ),
            _REDUCTION,
            _LOSS_WEIGHT,
        ),
        reference=f"visdet.models.losses.SmoothL1Loss ({_UPSTREAM}); Girshick, Fast R-CNN, ICCV 2015",
        example='RemoteLoss("SmoothL1Loss", beta=1.0, loss_weight=1.0)(deltas, target_deltas, weight)',
        make_example=_example_regression,
    ),
    LossSpec(
        name="MSELoss",
        fn=mse_loss,
        families=("visdet",),
        summary="Squared error (pred - target)^2 with MMDetection weighting and reduction.",
        inputs=(
            *_broadcast_pair("float predictions", "float targets broadcastable with pred"),
            *_tail_inputs("weight broadcast against the element-wise loss"),
        ),
        params=(_REDUCTION, _LOSS_WEIGHT),
        reference=f"visdet.models.losses.MSELoss ({_UPSTREAM})",
        example='RemoteLoss("MSELoss", loss_weight=1.0)(centerness, target_centerness)',
        make_example=_example_regression,
    ),
    LossSpec(
        name="BalancedL1Loss",
        fn=balanced_l1_loss,
        families=("visdet",),
        summary="Balanced L1 loss (Libra R-CNN): log-shaped below beta, linear above.",
        inputs=_BOX_DELTA_INPUTS,
        params=(
            Param("alpha", "float", 0.5, doc="inlier gradient promotion; not 0"),
            Param("gamma", "float", 1.5, doc="upper bound of the error; not 0"),
            Param(
                "beta", "float", 1.0, minimum=0.0, minimum_exclusive=True, doc="transition point"
            ),
            _REDUCTION,
            _LOSS_WEIGHT,
        ),
        reference=f"visdet.models.losses.BalancedL1Loss ({_UPSTREAM}); Pang et al., Libra R-CNN, CVPR 2019",
        example='RemoteLoss("BalancedL1Loss", alpha=0.5, gamma=1.5, beta=1.0)(deltas, target_deltas, weight)',
        make_example=_example_regression,
    ),
)
