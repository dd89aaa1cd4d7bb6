"""The MMDetection calling convention shared by every visdet loss.

An element-wise loss, then ``weight -> reduce -> avg_factor (+ float32 eps) -> * loss_weight``
(one shared path, ``_weighted_reduce`` over ``_reduction.weight_reduce_loss``), with a per-call
``reduction_override`` in {None, 'none', 'mean', 'sum'}; the forward tail and parameters every
visdet spec declares.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..._reduction import REDUCTIONS, weight_reduce_loss
from ...errors import InvalidArgument
from ...registry import FLOAT_DTYPES, Input, LossOutput, Param

_UPSTREAM = "visdet@f72e8d1 (BinItAI/visdet HEAD; same as mmdet 3.3.0)"
_EMPTY_NOTE = "upstream returns NaN: reduction 'mean' of an empty loss tensor (mean of nothing)"
_SHORTCUT_NOTE = (
    "no weight is > 0: upstream short-circuits to (pred * weight).sum(), a 0 that keeps the "
    "autograd graph and is not multiplied by loss_weight"
)


# --------------------------------------------------------------------------------------------
# The shared MMDetection calling convention
# --------------------------------------------------------------------------------------------


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _call_reduction(reduction: str, reduction_override: str | None) -> str:
    """The reduction of this call: a given ``reduction_override`` replaces the constructor's
    (both are declared choices, checked before the loss runs)."""
    return reduction if reduction_override is None else reduction_override


def _check_broadcast(
    shape: Sequence[int], other: Tensor, field: str, against: str = "the element-wise loss"
) -> None:
    """Upstream multiplies with plain broadcasting; shapes that cannot broadcast crash there."""
    try:
        torch.broadcast_shapes(tuple(shape), tuple(other.shape))
    except RuntimeError:
        raise InvalidArgument.expected(
            field,
            f"a shape that broadcasts against {against} of shape {list(shape)}",
            f"shape {list(other.shape)}",
        ) from None


def _optional_avg_factor(avg_factor: Any) -> float | Tensor | None:
    if avg_factor is None:
        return None
    if (
        isinstance(avg_factor, Tensor)
        and avg_factor.numel() == 1
        and not avg_factor.dtype.is_complex
    ):
        return avg_factor  # upstream heads pass a tensor too; `sum / (avg_factor + eps)` broadcasts
    if isinstance(avg_factor, bool) or not isinstance(avg_factor, (int, float)):
        got = (
            f"tensor of shape {list(avg_factor.shape)}"
            if isinstance(avg_factor, Tensor)
            else type(avg_factor).__name__
        )
        raise InvalidArgument.expected("avg_factor", "a number", got)
    return avg_factor


def _weighted_reduce(
    loss: Tensor,
    weight: Tensor | None,
    reduction: str,
    avg_factor: float | Tensor | None,
    loss_weight: float,
    notes: Sequence[str] = (),
) -> Tensor | LossOutput:
    """``loss_weight * weight_reduce_loss(loss, weight, reduction, avg_factor)``, as every class does."""
    if weight is not None:
        _check_broadcast(loss.shape, weight, "weight")
    value = loss_weight * weight_reduce_loss(loss, weight, reduction, avg_factor)
    notes = list(notes)
    if reduction == "mean" and avg_factor is None and loss.numel() == 0:
        notes.append(_EMPTY_NOTE)
    return LossOutput(value, notes=notes) if notes else value


def _zero_weight_shortcut(pred: Tensor, weight: Tensor | None) -> LossOutput | None:
    """mmdet's early return when no weight is positive (L1, SmoothL1, IoU, GIoU)."""
    if weight is None or bool((weight > 0).any()):
        return None
    if pred.dim() == weight.dim() + 1:
        weight = weight.unsqueeze(1)
    _check_broadcast(pred.shape, weight, "weight", "pred")
    return LossOutput((pred * weight).sum(), notes=[_SHORTCUT_NOTE])


def _same_shape(pred: Tensor, other: Tensor, field: str = "target", whose: str = "pred's") -> None:
    if pred.shape != other.shape:
        raise InvalidArgument.expected(
            field, f"shape {list(pred.shape)} ({whose})", f"shape {list(other.shape)}"
        )


def _probabilities(t: Tensor, field: str) -> None:
    # F.binary_cross_entropy rejects anything outside [0, 1], NaN included.
    if t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
        raise InvalidArgument.expected(
            field, "probabilities in [0, 1] (activated=True)", "values outside [0, 1]"
        )


_REDUCTION = Param(
    "reduction",
    "str",
    "mean",
    choices=REDUCTIONS,
    doc="'none' | 'mean' (over all elements) | 'sum'",
)
_LOSS_WEIGHT = Param("loss_weight", "float", 1.0, doc="multiplier of the reduced loss")


_REDUCTION_OVERRIDE = Input(
    "reduction_override",
    kind="str",
    optional=True,
    choices=REDUCTIONS,
    doc="replaces the constructor's reduction for this call",
)


def _tail_inputs(
    weight_doc: str, weight_dtypes: tuple[str, ...] = FLOAT_DTYPES
) -> tuple[Input, ...]:
    """weight, avg_factor, reduction_override: the MMDetection forward tail."""
    return (
        Input("weight", dtypes=weight_dtypes, optional=True, doc=weight_doc),
        Input(
            "avg_factor",
            kind="number",
            optional=True,
            doc="divide the sum by avg_factor + float32 eps (mean only; an error with sum)",
        ),
        _REDUCTION_OVERRIDE,
    )


def _broadcast_pair(pred_doc: str, target_doc: str) -> tuple[Input, Input]:
    """A float prediction and a float target that broadcasts with it, both receiving gradients
    (MSELoss, GaussianFocalLoss)."""
    return (
        Input("pred", differentiable=True, doc=pred_doc),
        Input("target", broadcasts_with="pred", differentiable=True, doc=target_doc),
    )


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
