"""fat's classification losses: cross_entropy (also NetsPresso's), nll, bce, bce_with_logits
and sqr_hinge."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._reduction import REDUCTIONS, reduce_loss
from ...errors import InvalidArgument
from ...registry import FLOAT_DTYPES, Form, Input, LossOutput, LossSpec, Param
from ._torch import (
    _FAT,
    _NETSPRESSO,
    _REDUCTION,
    _TORCH,
    LABEL_SMOOTHING,
    _broadcast_weight,
    _class_weight,
    _empty_mean_note,
    _gen,
    _legacy_reduction,
    _noted_result,
    _pair_inputs,
    _result,
)


def _check_byte_target(labels: Tensor, logits: Tensor, field: str) -> None:
    """torch's class-index kernels take uint8 targets only for (N, C) or (C,) input; with spatial
    dims they raise "expected scalar type Long but found Byte" (a RuntimeError)."""
    if labels.dtype == torch.uint8 and logits.dim() > 2:
        raise InvalidArgument.expected(
            field,
            f"int64 class indices (torch takes uint8 only for [N, C] or [C] input, this one is "
            f"{list(logits.shape)})",
            "uint8",
            upstream="RuntimeError",
        )


def _index_mean_nan_note(
    loss: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int
) -> list[str]:
    """Why a ``mean`` over class indices is NaN (torch divides by the counted weight, 0 here).

    Either cause makes the mean 0 / 0, so a finite mean has neither and nothing is counted: the
    masks and the reduction below cost a small call's server ~7 % of its handler time.
    """
    if math.isfinite(loss.item()):  # item(): float() of a loss with grad warns
        return []
    counted = target != ignore_index
    if not bool(counted.any()):
        return [
            "upstream returns NaN: no target is counted (empty batch, or every target equals "
            f"ignore_index={ignore_index}), and torch's mean divides by zero"
        ]
    if weight is not None and float(weight[target[counted].long()].sum()) == 0.0:
        return [
            "upstream returns NaN: the class weights of the counted targets sum to 0, and torch's mean divides by that sum"
        ]
    return []


def cross_entropy(
    input: Any,
    target: Any,
    *,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor | LossOutput:
    """Softmax cross-entropy between logits and class indices or class probabilities.

    Called with tensors, this is fat's ``nn.CrossEntropyLoss``. Called with dicts
    ``({'pred': logits}, {'target': target})`` it is NetsPresso's ``CrossEntropyLoss``, which wraps
    the same torch loss with ``reduction`` fixed to ``'mean'``: a ``reduction`` parameter is
    ignored there (upstream swallows it in ``**kwargs``; a note says so), while the legacy
    ``size_average``/``reduce`` pair still reaches torch.

    Args:
        input (Tensor[N, C, d1, ...] or Tensor[C] | dict): float logits, or ``{'pred': logits}``.
        target (Tensor | dict): int64 (or uint8) class indices of shape ``[N, d1, ...]`` (``[]``
            for unbatched logits), each in ``[0, C)`` or equal to ``ignore_index``; or float class
            probabilities of the input's shape (these receive a gradient, as in torch); or
            ``{'target': ...}`` with either.
        weight (Tensor[C], optional): per-class rescaling weight. With ``mean`` torch divides by
            the summed weight of the counted targets. Moved to the input's device and dtype.
            Default: ``None``.
        size_average (bool, optional): deprecated torch argument; with ``reduce`` it overrides
            ``reduction`` when either is set. Default: ``None``.
        ignore_index (int): class index that contributes neither loss nor count (index targets
            only). Default: ``-100``.
        reduce (bool, optional): deprecated torch argument, see ``size_average``. Default: ``None``.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'mean'``.
        label_smoothing (float): in [0, 1]; mixes the target with the uniform distribution.
            Default: ``0.0``.

    Returns:
        Tensor: the loss, a scalar unless ``reduction='none'`` (then ``[N, d1, ...]``). NaN with
        ``mean`` when no target is counted (all ignored, or an empty batch), as in torch.

    Reference:
        ``torch.nn.CrossEntropyLoss`` (torch 2.13) as built by fat's ``LossFactory``
        (giovannipollo/fat@9abd3cf); ``netspresso_trainer.losses.common.CrossEntropyLoss``
        (netspresso-trainer 1.4.1).
    """
    notes: list[str] = []
    if isinstance(input, Mapping) or isinstance(target, Mapping):
        logits, labels = input["pred"], target["target"]  # the declared NetsPresso form
        label_field = "target.target"
        if reduction != "mean":
            notes.append(
                f"NetsPresso's CrossEntropyLoss fixes reduction='mean' and ignores a reduction "
                f"parameter; reduction={reduction!r} was ignored, as upstream"
            )
        reduction = "mean"
    else:
        logits, labels = input, target
        label_field = "target"
    _check_byte_target(labels, logits, label_field)
    reduction, legacy_notes = _legacy_reduction(size_average, reduce, reduction)
    notes += legacy_notes
    num_classes = logits.shape[1] if logits.dim() >= 2 else logits.shape[0]
    weight = _class_weight(weight, num_classes, logits)
    probabilities = labels.is_floating_point()
    if probabilities and ignore_index != -100:
        # torch: "ignore_index is not supported for floating point target" (a RuntimeError).
        raise InvalidArgument.expected(
            "params.ignore_index",
            "the default -100 with probability targets (torch supports no ignore_index for them)",
            ignore_index,
            upstream="RuntimeError",
        )
    loss = F.cross_entropy(
        logits,
        labels,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    if reduction == "mean":
        if probabilities and labels.numel() == 0:
            notes += _empty_mean_note("cross_entropy")
        elif not probabilities:
            notes += _index_mean_nan_note(loss, labels, weight, ignore_index)
    return _result(loss, notes)


def nll(
    input: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor | LossOutput:
    """Negative log-likelihood of class indices under log-probabilities: ``-input[n, target[n]]``.

    Args:
        input (Tensor[N, C, d1, ...] or Tensor[C]): float log-probabilities (e.g. ``log_softmax``).
        target (Tensor[N, d1, ...] or Tensor[]): int64 (or uint8) class indices in ``[0, C)`` or
            equal to ``ignore_index``.
        weight (Tensor[C], optional): per-class weight; ``mean`` divides by the summed weight of
            the counted targets. Moved to the input's device and dtype. Default: ``None``.
        ignore_index (int): class index that contributes neither loss nor count. Default: ``-100``.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'mean'``.

    Returns:
        Tensor: the loss; NaN with ``mean`` when no target is counted, as in torch.

    Reference:
        ``torch.nn.NLLLoss`` (torch 2.13) as built by fat's ``LossFactory`` (giovannipollo/fat@9abd3cf).
    """
    _check_byte_target(target, input, "target")
    weight = _class_weight(weight, input.shape[1] if input.dim() >= 2 else input.shape[0], input)
    loss = F.nll_loss(input, target, weight=weight, ignore_index=ignore_index, reduction=reduction)
    notes = _index_mean_nan_note(loss, target, weight, ignore_index) if reduction == "mean" else []
    return _result(loss, notes)


def bce(
    input: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor | LossOutput:
    """Binary cross-entropy between probabilities and same-shape targets in [0, 1].

    ``-w * (t * log(p) + (1 - t) * log(1 - p))``, with torch's clamp of each log at -100.

    Args:
        input (Tensor[*]): float probabilities, every value in [0, 1].
        target (Tensor[*]): same shape and dtype as ``input``, values in [0, 1] (hard or soft);
            receives a gradient, as in torch.
        weight (Tensor, optional): element weight broadcast to the input's shape (a list is a
            per-last-dimension weight). Moved to the input's device and dtype. Default: ``None``.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'mean'``.

    Returns:
        Tensor: the loss; NaN for ``mean`` over an empty input, as in torch.

    Reference:
        ``torch.nn.BCELoss`` (torch 2.13) as built by fat's ``LossFactory`` (giovannipollo/fat@9abd3cf).
    """
    # Shapes, dtypes and values in [0, 1] are declared (torch checks the values inside the
    # kernel: a RuntimeError on CPU, a device-side assert on CUDA).
    weight = _broadcast_weight(weight, "weight", input)
    loss = F.binary_cross_entropy(input, target, weight=weight, reduction=reduction)
    return _noted_result(loss, "bce", reduction, input, [])


def bce_with_logits(
    input: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor | LossOutput:
    """Sigmoid + binary cross-entropy in one numerically stable step.

    ``-w * (pw * t * log(sigmoid(x)) + (1 - t) * log(1 - sigmoid(x)))``.

    Args:
        input (Tensor[*]): float logits.
        target (Tensor[*]): float targets of the input's shape (usually in [0, 1]; not checked, as
            in torch); receives a gradient.
        weight (Tensor, optional): element weight broadcast to the input's shape. Default: ``None``.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'mean'``.
        pos_weight (Tensor, optional): weight of positive examples, broadcast along the last
            dimension (one value per class, e.g. ``[2.0]``). Default: ``None``.

    Both weights are moved to the input's device and dtype.

    Returns:
        Tensor: the loss; NaN for ``mean`` over an empty input, as in torch.

    Reference:
        ``torch.nn.BCEWithLogitsLoss`` (torch 2.13) as built by fat's ``LossFactory``
        (giovannipollo/fat@9abd3cf).
    """
    weight = _broadcast_weight(weight, "weight", input)
    pos_weight = _broadcast_weight(pos_weight, "pos_weight", input)
    loss = F.binary_cross_entropy_with_logits(
        input, target, weight=weight, reduction=reduction, pos_weight=pos_weight
    )
    return _noted_result(loss, "bce_with_logits", reduction, input, [])


def sqr_hinge(input: Tensor, target: Tensor) -> Tensor | LossOutput:
    """Squared hinge loss ``mean(max(0, 1 - y * f)^2)`` over all ``N * C`` scores (fat SqrHingeLoss).

    Class indices are turned into a float32 +-1 code (+1 at the class, -1 elsewhere), so a
    float16 input gives a float32 loss while float64 stays float64. The gradient is upstream's
    custom one, ``-2 * y * max(0, 1 - y * f) / (N * C)`` times the incoming gradient, and the
    target never receives a gradient.

    Args:
        input (Tensor[N, C]): float class scores.
        target (Tensor[N] or Tensor[N, C]): int64 class indices in ``[0, C)``, or a +-1 code used
            as is (values are not checked; a shape that broadcasts to ``[N, C]`` is accepted).

    Returns:
        Tensor: the scalar loss; NaN for an empty batch, as upstream.

    Reference:
        ``SqrHingeLoss`` in fat ``utils/losses/sqr_hinge.py`` (giovannipollo/fat@9abd3cf), after
        the BNN-PYNQ example in Xilinx Brevitas; Courbariaux et al., "Binarized Neural Networks",
        2016.
    """
    n, c = input.shape
    if target.dim() == 1:  # the two declared forms: class indices [N], or a +-1 code [N, C]
        code = torch.full((n, c), -1.0, dtype=torch.float32, device=target.device)
        code.scatter_(1, target.unsqueeze(1), 1.0)
    else:
        # Upstream returns no gradient for the code; detaching makes that explicit.
        code = target.detach()
    loss = _SquaredHinge.apply(input, code)
    notes = (
        ["upstream returns NaN: the mean over an empty batch divides by zero"]
        if n == 0 or c == 0
        else []
    )
    return _result(loss, notes)


def _hinge_margin(scores: Tensor, code: Tensor) -> Tensor:
    """``max(0, 1 - y * f)`` as upstream zeroes it: entries ``<= 0`` become 0, NaN stays NaN."""
    margin = 1.0 - scores * code
    return margin.masked_fill(margin <= 0.0, 0.0)


class _SquaredHinge(torch.autograd.Function):
    """Upstream's hand-written gradient, kept so that lossd's gradients are upstream's."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, code: Tensor) -> Tensor:
        ctx.save_for_backward(scores, code)
        margin = _hinge_margin(scores, code)
        return reduce_loss(margin * margin, "mean")

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        scores, code = ctx.saved_tensors
        margin = _hinge_margin(scores, code)
        # Same operations in the same order as upstream, so float results agree bit for bit.
        grad = code * -2.0 * margin / scores.numel()
        return grad * grad_output, None


def _make_cross_entropy_example(dtype: torch.dtype) -> tuple[tuple, dict, dict]:
    g = _gen(3001)
    logits = torch.randn(6, 5, generator=g).to(dtype)
    labels = torch.randint(0, 5, (6,), generator=g)
    return (logits, labels), {}, {"label_smoothing": 0.1, "weight": [1.0, 2.0, 1.0, 0.5, 1.0]}


def _make_nll_example(dtype: torch.dtype) -> tuple[tuple, dict, dict]:
    g = _gen(3002)
    log_probs = torch.log_softmax(torch.randn(6, 5, generator=g), dim=1).to(dtype)
    labels = torch.randint(0, 5, (6,), generator=g)
    return (log_probs, labels), {}, {}


def _make_bce_example(dtype: torch.dtype) -> tuple[tuple, dict, dict]:
    g = _gen(3006)
    probs = (torch.rand(6, 4, generator=g) * 0.9 + 0.05).to(dtype)
    target = (torch.rand(6, 4, generator=g) * 0.8 + 0.1).to(
        dtype
    )  # soft, away from 0/1 for gradcheck
    return (probs, target), {}, {}


def _make_bce_with_logits_example(dtype: torch.dtype) -> tuple[tuple, dict, dict]:
    g = _gen(3007)
    logits = torch.randn(6, 4, generator=g).to(dtype)
    target = (torch.rand(6, 4, generator=g) > 0.5).to(dtype)
    return (logits, target), {}, {"pos_weight": [2.0, 1.0, 0.5, 1.0]}


def _make_sqr_hinge_example(dtype: torch.dtype) -> tuple[tuple, dict, dict]:
    g = _gen(3009)
    scores = torch.randn(6, 5, generator=g).to(dtype)
    labels = torch.randint(0, 5, (6,), generator=g)
    return (scores, labels), {}, {}


_WEIGHT_DOC = "per-class weight [C] (integer lists accepted as floats; fat itself crashes on them)"


_INDEX_DOC = "class indices [N, d1, ...] int64 or uint8, in [0, C) or == ignore_index"


_INDEX_TARGET = ("int64", "uint8")  # torch's class-index losses: "expected ... Long or Byte"


def _class_inputs(where: str) -> tuple[tuple[Form, ...], tuple[Form, ...]]:
    """Logits [N, C, d1, ...] or [C], and class-index targets of them, ``where`` the logits sit."""
    logits = (
        Form(shape=("N", "C", "*d"), label="logits [N, C, d1, ...]"),
        Form(shape=("C",), label="unbatched logits [C]"),
    )
    indices = (
        Form(
            dtypes=_INDEX_TARGET,
            shape=("N", "*d"),
            shapes=((where, ("N", "C", "*d")),),
            index_of="C",
            index_ignore=("ignore_index",),
            upstream="IndexError",  # torch's nll/cross-entropy kernels: "Target k is out of bounds"
            label=f"class indices [N, d1, ...] of dtype int64 or uint8 for {where} [N, C, d1, ...]",
        ),
        Form(
            dtypes=_INDEX_TARGET,
            shape=(),
            shapes=((where, ("C",)),),
            index_of="C",
            index_ignore=("ignore_index",),
            upstream="IndexError",
            label=f"a class index [] of dtype int64 or uint8 for {where} [C]",
        ),
    )
    return logits, indices


_LOGITS, _INDICES = _class_inputs("input")


_NS_LOGITS, _NS_INDICES = _class_inputs("input.pred")


def _probabilities(where: str) -> Form:
    return Form(same_shape=where, label="class probabilities of the input's shape")


_CE_INPUT = (*_LOGITS, Form(kind="dict", keys=(("pred", _NS_LOGITS),), label="{'pred': logits}"))


_CE_TARGET = (
    *_INDICES,
    _probabilities("input"),
    Form(
        kind="dict",
        keys=(("target", (*_NS_INDICES, _probabilities("input.pred"))),),
        label="{'target': ...}",
    ),
)


# bce's and bce_with_logits' weight.
_ELEMENT_WEIGHT = Param(
    "weight", "tensor", None, nullable=True, doc="element weight broadcast to the input's shape"
)

SPECS = (
    LossSpec(
        name="cross_entropy",
        fn=cross_entropy,
        families=("fat", "netspresso"),
        summary="Softmax cross-entropy on class indices or probabilities (torch CrossEntropyLoss; "
        "NetsPresso's when called with {'pred'}/{'target'} dicts).",
        inputs=(
            Input(
                "input",
                kind="structure",
                forms=_CE_INPUT,
                differentiable=True,
                doc="Tensor[N, C, d1, ...] (or [C]) float logits; NetsPresso form: {'pred': logits}",
            ),
            Input(
                "target",
                kind="structure",
                forms=_CE_TARGET,
                differentiable=False,
                doc=f"Tensor: {_INDEX_DOC}, or float probabilities of the input's shape (these get a "
                "gradient); NetsPresso form: {'target': ...}",
            ),
        ),
        params=(
            Param("weight", "tensor", None, nullable=True, doc=_WEIGHT_DOC, same_dtype="input"),
            Param(
                "size_average",
                "bool",
                None,
                nullable=True,
                doc="deprecated torch argument; overrides reduction when set",
            ),
            Param(
                "ignore_index",
                "int",
                -100,
                doc="index target that is neither counted nor penalised",
            ),
            Param(
                "reduce",
                "bool",
                None,
                nullable=True,
                doc="deprecated torch argument; overrides reduction when set",
            ),
            Param(
                "reduction",
                "str",
                "mean",
                choices=REDUCTIONS,
                doc="'none' | 'mean' | 'sum' (NetsPresso form: always 'mean')",
            ),
            LABEL_SMOOTHING,
        ),
        reference=f"torch.nn.CrossEntropyLoss ({_TORCH}) via {_FAT}; "
        f"netspresso_trainer.losses.common.CrossEntropyLoss ({_NETSPRESSO})",
        example='RemoteLoss("cross_entropy", label_smoothing=0.1)(logits, labels)',
        make_example=_make_cross_entropy_example,
    ),
    LossSpec(
        name="nll",
        fn=nll,
        families=("fat",),
        summary="Negative log-likelihood of class indices under log-probabilities (torch NLLLoss).",
        inputs=(
            Input(
                "input",
                forms=_LOGITS,
                differentiable=True,
                doc="log-probabilities [N, C, d1, ...] or [C]",
            ),
            Input("target", forms=_INDICES, doc=_INDEX_DOC),
        ),
        params=(
            Param("weight", "tensor", None, nullable=True, doc=_WEIGHT_DOC, same_dtype="input"),
            Param(
                "ignore_index",
                "int",
                -100,
                doc="index target that is neither counted nor penalised",
            ),
            _REDUCTION,
        ),
        reference=f"torch.nn.NLLLoss ({_TORCH}) via {_FAT}",
        example='RemoteLoss("nll")(log_probs, labels)',
        make_example=_make_nll_example,
    ),
    LossSpec(
        name="bce",
        fn=bce,
        families=("fat",),
        summary="Binary cross-entropy on probabilities in [0, 1] (torch BCELoss).",
        inputs=(
            Input(
                "input",
                values=(0.0, 1.0),
                differentiable=True,
                doc="float probabilities [*] in [0, 1]",
            ),
            Input(
                "target",
                same_shape="input",
                same_dtype="input",
                values=(0.0, 1.0),
                differentiable=True,
                doc="same shape and dtype, values in [0, 1]",
            ),
        ),
        params=(
            _ELEMENT_WEIGHT,
            _REDUCTION,
        ),
        reference=f"torch.nn.BCELoss ({_TORCH}) via {_FAT}",
        example='RemoteLoss("bce")(probs, target)',
        make_example=_make_bce_example,
    ),
    LossSpec(
        name="bce_with_logits",
        fn=bce_with_logits,
        families=("fat",),
        summary="Sigmoid + binary cross-entropy on logits, with optional pos_weight (torch BCEWithLogitsLoss).",
        inputs=_pair_inputs(
            "float logits [*]", "float targets of the input's shape", same_shape="input"
        ),
        params=(
            _ELEMENT_WEIGHT,
            _REDUCTION,
            Param(
                "pos_weight",
                "tensor",
                None,
                nullable=True,
                doc="weight of positives, broadcast along the last dimension",
            ),
        ),
        reference=f"torch.nn.BCEWithLogitsLoss ({_TORCH}) via {_FAT}",
        example='RemoteLoss("bce_with_logits", pos_weight=[2.0])(logits, target)',
        make_example=_make_bce_with_logits_example,
    ),
    LossSpec(
        name="sqr_hinge",
        fn=sqr_hinge,
        families=("fat",),
        summary="Squared hinge loss mean(max(0, 1 - y*f)^2) with a +-1 class code (fat SqrHingeLoss).",
        inputs=(
            Input(
                "input",
                dtypes=FLOAT_DTYPES,
                shape=("N", "C"),
                differentiable=True,
                doc="float class scores [N, C]",
            ),
            Input(
                "target",
                forms=(
                    Form(
                        dtypes=("int64",),
                        shape=("N",),
                        index_of="C",
                        upstream="RuntimeError",  # F.one_hot's
                        label="int64 class indices [N]",
                    ),
                    Form(
                        dtypes=(*FLOAT_DTYPES, "int64"),
                        shape=("?", "?"),
                        broadcast_to="input",
                        label="a +-1 code [N, C]",
                    ),
                ),
                doc="int64 class indices [N] (turned into a float32 +-1 code) or a +-1 code [N, C]; no gradient",
            ),
        ),
        params=(),
        reference="SqrHingeLoss, giovannipollo/fat@9abd3cf utils/losses/sqr_hinge.py (after Xilinx Brevitas BNN-PYNQ)",
        example='RemoteLoss("sqr_hinge")(scores, labels)',
        make_example=_make_sqr_hinge_example,
    ),
)
