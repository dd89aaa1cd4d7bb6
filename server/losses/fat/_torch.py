"""What fat's torch losses share: upstream names, weight handling, torch's legacy reduction
pair, NaN notes and the float input/target declaration."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..._reduction import REDUCTIONS
from ...errors import InvalidArgument
from ...registry import FLOAT_DTYPES, Input, LossOutput, Param

_FAT = "giovannipollo/fat@9abd3cf utils/loss.py LossFactory"


_TORCH = "torch 2.13"


_NETSPRESSO = "netspresso-trainer==1.4.1"


# torch's class-index losses accept Long and Byte targets ("expected ... Long or Byte").
_INDEX_DTYPES = (torch.int64, torch.uint8)


def _dtype(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _result(value: Tensor, notes: list[str]) -> Tensor | LossOutput:
    """A bare tensor, as upstream returns it, unless something needs explaining."""
    return LossOutput(value, notes=notes) if notes else value


def _as_weight(value: Any, field: str, like: Tensor) -> Tensor:
    """A weight parameter (tensor or list of numbers) on ``like``'s device and dtype."""
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        value = torch.tensor([float(v) for v in value])
    if not isinstance(value, Tensor) or value.dtype.is_complex or value.dtype == torch.bool:
        got = type(value).__name__ if not isinstance(value, Tensor) else _dtype(value)
        raise InvalidArgument.expected(field, "a real tensor or a list of numbers", got)
    return value.to(device=like.device, dtype=like.dtype)


def _class_weight(value: Any, num_classes: int, like: Tensor) -> Tensor | None:
    if value is None:
        return None
    weight = _as_weight(value, "weight", like)
    if weight.dim() != 1 or weight.numel() != num_classes:
        raise InvalidArgument.expected(
            "weight", f"one weight per class, shape [{num_classes}]", f"shape {list(weight.shape)}"
        )
    return weight


def _broadcast_weight(value: Any, field: str, like: Tensor) -> Tensor | None:
    """An element weight that must broadcast to ``like``'s shape without growing it."""
    if value is None:
        return None
    weight = _as_weight(value, field, like)
    try:
        shape = torch.broadcast_shapes(weight.shape, like.shape)
    except RuntimeError:
        shape = None
    if shape != like.shape:
        raise InvalidArgument.expected(
            field,
            f"a shape that broadcasts to the input's {list(like.shape)}",
            f"shape {list(weight.shape)}",
        )
    return weight


def _legacy_reduction(
    size_average: bool | None, reduce: bool | None, reduction: str
) -> tuple[str, list[str]]:
    """torch's deprecated ``size_average``/``reduce`` pair, which overrides ``reduction`` when set."""
    if size_average is None and reduce is None:
        return reduction, []
    # Unset halves count as True, as in torch.
    averaged = True if size_average is None else size_average
    reduced = True if reduce is None else reduce
    legacy = ("mean" if averaged else "sum") if reduced else "none"
    return legacy, [
        f"size_average={size_average}, reduce={reduce} are deprecated torch arguments; as in torch they "
        f"override reduction={reduction!r} with {legacy!r}"
    ]


def _empty_mean_note(loss_name: str) -> list[str]:
    return [
        f"upstream returns NaN: {loss_name} with reduction='mean' over an empty input divides by zero"
    ]


def _noted_result(
    loss: Tensor, loss_name: str, reduction: str, elements: Tensor, notes: list[str]
) -> Tensor | LossOutput:
    """The loss, with ``notes`` and the NaN note of ``mean`` over an empty ``elements``."""
    if reduction == "mean" and elements.numel() == 0:
        notes = notes + _empty_mean_note(loss_name)
    return _result(loss, notes)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


_REDUCTION = Param("reduction", "str", "mean", choices=REDUCTIONS, doc="'none' | 'mean' | 'sum'")

# torch CrossEntropyLoss's label_smoothing, declared by fat's and NetsPresso's cross_entropy.
LABEL_SMOOTHING = Param(
    "label_smoothing",
    "float",
    0.0,
    minimum=0.0,
    maximum=1.0,
    doc="mix with the uniform distribution",
)


def _pair_inputs(input_doc: str, target_doc: str, **target_rules: Any) -> tuple[Input, Input]:
    """Float input and target; by default broadcasting together, as torch's pointwise losses."""
    rules = target_rules or {"broadcasts_with": "input"}
    return (
        Input("input", dtypes=FLOAT_DTYPES, shape=("*",), differentiable=True, doc=input_doc),
        Input("target", dtypes=FLOAT_DTYPES, differentiable=True, doc=target_doc, **rules),
    )
