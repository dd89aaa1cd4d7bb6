"""The one reduction helper every loss uses.

``reduce_loss`` is torch's plain ``none``/``mean``/``sum``. ``weight_reduce_loss`` is the rule
MMDetection and visdet apply to every element-wise loss (upstream ``weight_reduce_loss``):

1. multiply by ``weight`` when given (plain broadcasting);
2. without ``avg_factor``: reduce with ``reduction`` (``mean`` counts every element, zero-weighted
   ones included);
3. with ``avg_factor``: ``mean`` is ``sum / (avg_factor + eps)`` where eps is float32's machine
   epsilon (so ``avg_factor=0`` gives 0, not inf), ``none`` stays unreduced and ``sum`` is an
   error, as upstream.

The caller then multiplies by its ``loss_weight``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import InvalidArgument

REDUCTIONS = ("none", "mean", "sum")
# Upstream adds float32's epsilon whatever the dtype of the loss (mmdet losses/utils.py).
AVG_FACTOR_EPS = torch.finfo(torch.float32).eps


def check_reduction(reduction: str, field: str = "reduction") -> str:
    if reduction not in REDUCTIONS:
        raise InvalidArgument.expected(field, "one of 'none', 'mean', 'sum'", repr(reduction))
    return reduction


def reduce_loss(loss: Tensor, reduction: str) -> Tensor:
    """Reduce an element-wise loss like torch does (``mean`` of an empty tensor is NaN)."""
    check_reduction(reduction)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def weight_reduce_loss(
    loss: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | None = None,
) -> Tensor:
    """Apply an element-wise ``weight``, then reduce or average by ``avg_factor`` (mmdet rule)."""
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return reduce_loss(loss, reduction)
    check_reduction(reduction)
    if reduction == "mean":
        return loss.sum() / (avg_factor + AVG_FACTOR_EPS)
    if reduction == "sum":
        raise InvalidArgument(
            'avg_factor can not be used with reduction="sum"',
            field="avg_factor",
            upstream="ValueError",
        )
    return loss
