"""fat's regression losses: mse, l1, smooth_l1 and kl_div."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._reduction import reduce_loss
from ...registry import LossOutput, LossSpec, Param
from ._torch import (
    _FAT,
    _REDUCTION,
    _TORCH,
    _gen,
    _noted_result,
    _pair_inputs,
)

KL_REDUCTIONS = ("none", "batchmean", "sum", "mean")


def _pair(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor, list[str]]:
    """Input and target (declared: float, broadcasting together), broadcast as torch does."""
    if input.shape == target.shape:
        return input, target, []
    shape = torch.broadcast_shapes(input.shape, target.shape)
    note = (
        f"target shape {list(target.shape)} differs from input shape {list(input.shape)}; torch broadcasts "
        f"both to {list(shape)} (and warns that this is likely a mistake)"
    )
    # Broadcasting here, exactly as torch does, keeps torch's warning out of the server log.
    input, target = torch.broadcast_tensors(input, target)
    return input, target, [note]


def _torch_pointwise(
    loss_fn: Callable[..., Tensor],
    loss_name: str,
    input: Tensor,
    target: Tensor,
    reduction: str,
    **options: float,
) -> Tensor | LossOutput:
    """mse, l1 and smooth_l1: torch's element-wise loss of the (broadcast) pair, with its notes."""
    input, target, notes = _pair(input, target)
    loss = loss_fn(input, target, reduction=reduction, **options)
    return _noted_result(loss, loss_name, reduction, input, notes)


def mse(input: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor | LossOutput:
    """Mean squared error ``(input - target)^2``.

    Args:
        input (Tensor[*]): float predictions.
        target (Tensor[*]): float targets, the input's shape (a broadcastable shape is accepted
            as in torch, with a note); receives a gradient.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'mean'``.

    Returns:
        Tensor: the loss; NaN for ``mean`` over an empty input, as in torch.

    Reference:
        ``torch.nn.MSELoss`` (torch 2.13) as built by fat's ``LossFactory`` (giovannipollo/fat@9abd3cf).
    """
    return _torch_pointwise(F.mse_loss, "mse", input, target, reduction)


def l1(input: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor | LossOutput:
    """Mean absolute error ``|input - target|``.

    Takes and returns what :func:`mse` does: ``input`` and ``target`` Tensor[*], ``reduction``.

    Reference:
        ``torch.nn.L1Loss`` (torch 2.13) as built by fat's ``LossFactory`` (giovannipollo/fat@9abd3cf).
    """
    return _torch_pointwise(F.l1_loss, "l1", input, target, reduction)


def smooth_l1(
    input: Tensor, target: Tensor, *, reduction: str = "mean", beta: float = 1.0
) -> Tensor | LossOutput:
    """Smooth L1 (Huber-like): ``0.5 * d^2 / beta`` if ``|d| < beta`` else ``|d| - 0.5 * beta``.

    Takes and returns what :func:`mse` does (``input`` and ``target`` Tensor[*], ``reduction``),
    and ``beta`` (float): >= 0, where the loss turns from quadratic to linear; ``0`` is exactly
    the L1 loss (torch switches to it). Default: ``1.0``.

    Reference:
        ``torch.nn.SmoothL1Loss`` (torch 2.13) as built by fat's ``LossFactory``
        (giovannipollo/fat@9abd3cf); Girshick, "Fast R-CNN", ICCV 2015.
    """
    return _torch_pointwise(F.smooth_l1_loss, "smooth_l1", input, target, reduction, beta=beta)


def kl_div(
    input: Tensor,
    target: Tensor,
    *,
    reduction: str = "batchmean",
    log_target: bool = False,
) -> Tensor | LossOutput:
    """Kullback-Leibler divergence ``target * (log(target) - input)`` with ``input`` in log space.

    Args:
        input (Tensor[N, *]): float log-probabilities.
        target (Tensor[N, *]): float probabilities (log-probabilities if ``log_target``) of a
            shape that broadcasts with the input's, as in torch; receives a gradient.
        reduction (str): ``'batchmean'`` (sum / N, the KL divergence per sample; fat's default) |
            ``'sum'`` | ``'mean'`` (sum / every element) | ``'none'``. Default: ``'batchmean'``.
        log_target (bool): whether ``target`` is given as log-probabilities. Default: ``False``.

    Returns:
        Tensor: the loss; NaN for ``batchmean``/``mean`` over an empty batch, as in torch.

    Reference:
        ``torch.nn.KLDivLoss`` (torch 2.13) as built by fat's ``LossFactory``, which sets
        ``reduction='batchmean'`` unless configured (giovannipollo/fat@9abd3cf).
    """
    # Element-wise, then reduced: the same operations torch's kl_div runs, without its warning for 'mean'.
    pointwise = F.kl_div(input, target, reduction="none", log_target=log_target)
    notes: list[str] = []
    if reduction == "batchmean":
        loss = reduce_loss(pointwise, "sum")
        if input.dim() != 0:  # torch divides by the batch size only when there is a batch dimension
            loss = loss / input.shape[0]
            if input.shape[0] == 0:
                notes.append(
                    "upstream returns NaN: reduction='batchmean' over an empty batch divides 0 by 0"
                )
    else:
        loss = reduce_loss(pointwise, reduction)
    return _noted_result(loss, "kl_div", reduction, pointwise, notes)


def _make_regression_example(seed: int, params: dict) -> Any:
    def make(dtype: torch.dtype) -> tuple[tuple, dict, dict]:
        g = _gen(seed)
        pred = torch.randn(6, 4, generator=g).to(dtype)
        target = torch.randn(6, 4, generator=g).to(dtype)
        return (pred, target), {}, dict(params)

    return make


def _make_kl_div_example(dtype: torch.dtype) -> tuple[tuple, dict, dict]:
    g = _gen(3008)
    log_probs = torch.log_softmax(torch.randn(6, 5, generator=g), dim=1).to(dtype)
    target = torch.softmax(torch.randn(6, 5, generator=g), dim=1).to(dtype)
    return (log_probs, target), {}, {}


_REGRESSION_TARGET = "float targets, the input's shape (integer ones promoted, as in torch)"
# mse, l1 and smooth_l1 take the same forward: an integer target is promoted as torch promotes it.
_REGRESSION_INPUTS = _pair_inputs(
    "float predictions [*]", _REGRESSION_TARGET, broadcasts_with="input", promote_with="input"
)


def _pointwise_spec(
    fn: Callable[..., Any],
    torch_class: str,
    summary: str,
    seed: int,
    extra: tuple[Param, ...] = (),
    example_params: dict[str, float] | None = None,
) -> LossSpec:
    """mse, l1 and smooth_l1 are declared alike: one forward, a reduction (and ``extra``), the
    torch class fat builds, an example call with ``example_params``."""
    example_params = example_params or {}
    given = "".join(f", {key}={value!r}" for key, value in example_params.items())
    return LossSpec(
        name=fn.__name__,
        fn=fn,
        families=("fat",),
        summary=summary,
        inputs=_REGRESSION_INPUTS,
        params=(_REDUCTION, *extra),
        reference=f"torch.nn.{torch_class} ({_TORCH}) via {_FAT}",
        example=f'RemoteLoss("{fn.__name__}"{given})(pred, target)',
        make_example=_make_regression_example(seed, example_params),
    )


_BETA = Param("beta", "float", 1.0, minimum=0.0, doc="quadratic-to-linear threshold; 0 gives L1")

SPECS = (
    LossSpec(
        name="kl_div",
        fn=kl_div,
        families=("fat",),
        summary="KL divergence of log-probabilities from a target distribution; fat's default 'batchmean' (torch KLDivLoss).",
        inputs=_pair_inputs(
            "float log-probabilities [N, *]",
            "float probabilities (log if log_target), broadcastable",
        ),
        params=(
            Param(
                "reduction",
                "str",
                "batchmean",
                choices=KL_REDUCTIONS,
                doc="'batchmean' (fat's default) | 'sum' | 'mean' | 'none'",
            ),
            Param("log_target", "bool", False, doc="target given as log-probabilities"),
        ),
        reference=f"torch.nn.KLDivLoss ({_TORCH}) via {_FAT}",
        example='RemoteLoss("kl_div")(log_probs, target_probs)',
        make_example=_make_kl_div_example,
    ),
    _pointwise_spec(mse, "MSELoss", "Mean squared error (torch MSELoss).", 3003),
    _pointwise_spec(l1, "L1Loss", "Mean absolute error (torch L1Loss).", 3004),
    _pointwise_spec(
        smooth_l1,
        "SmoothL1Loss",
        "Smooth L1 / Huber-like loss with threshold beta (torch SmoothL1Loss).",
        3005,
        extra=(_BETA,),
        example_params={"beta": 0.5},
    ),
)
