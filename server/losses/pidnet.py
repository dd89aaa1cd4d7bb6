"""NetsPresso Trainer 1.4.1 ``pidnet_loss``: PIDNet's three-branch segmentation objective.

Upstream resizes the three head outputs to the label size and then sums the P-branch auxiliary
cross-entropy (x0.4), the main cross-entropy, the D-branch class-balanced boundary BCE (x20) and
the boundary-aware cross-entropy (main logits, labels kept only where the D branch is confident).
The OHEM cross-entropy of the official PIDNet is commented out upstream, so it is absent here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InvalidArgument
from ..registry import Form, Input, LossOutput, LossSpec, Param
from ._checks import check_class_indices, require_key, require_tensor
from .netspresso import model_output

IGNORE_INDEX_NONE_VALUE = -100
EXTRA_P_WEIGHT = 0.4
PRED_WEIGHT = 1.0
BOUNDARY_BCE_WEIGHT = 20.0
BOUNDARY_THRESHOLD = 0.8


def _resize(logits: Tensor, size: torch.Size) -> Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def boundary_weighted_bce(extra_d: Tensor, bd_gt: Tensor) -> Tensor:
    """Class-balanced BCE of the boundary logits, as upstream ``BoundaryLoss.weighted_bce``.

    Pixels with ``bd_gt == 1`` are weighted by the fraction of ``bd_gt == 0`` pixels and vice
    versa; any other value gets weight 0. The mean runs over every pixel (zero-weighted included).
    """
    logits = extra_d.permute(0, 2, 3, 1).reshape(1, -1)
    target = bd_gt.reshape(1, -1)
    positive = target == 1
    negative = target == 0
    pos_num = positive.sum()
    neg_num = negative.sum()
    total = pos_num + neg_num
    # Upstream computes `count * 1.0 / total` on integer tensors, which gives float32 ratios
    # (torch's default dtype) that are then stored into a weight tensor of the logits' dtype.
    weight = torch.zeros_like(logits)
    weight[positive] = (neg_num.to(torch.float32) / total.to(torch.float32)).to(weight.dtype)
    weight[negative] = (pos_num.to(torch.float32) / total.to(torch.float32)).to(weight.dtype)
    # The criterion's own "mean" (not reduce_loss): its fused backward rounds differently from
    # mean-after-"none", and upstream's gradients must be matched to the last bit.
    return F.binary_cross_entropy_with_logits(logits, target, weight, reduction="mean")


def _cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    # torch's own "mean" divides by the number of non-ignored pixels (NaN when there are none)
    # and gives zero gradients in that case; upstream uses exactly this criterion.
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="mean")


def _nonempty_map(logits: Tensor, field: str) -> Tensor:
    """A declared (B, C, h, w) map, which F.interpolate needs non-empty."""
    if logits.shape[2] == 0 or logits.shape[3] == 0:
        raise InvalidArgument.expected(
            field, "non-empty spatial size (h, w >= 1)", f"shape {list(logits.shape)}"
        )
    return logits


def pidnet_loss(
    out: Mapping[str, Any],
    target: Mapping[str, Any],
    *,
    ignore_index: int = IGNORE_INDEX_NONE_VALUE,
    weight: Any = None,
) -> LossOutput:
    """PIDNet loss: auxiliary + main cross-entropy, boundary BCE and boundary-aware cross-entropy.

    The three outputs are resized (bilinear, ``align_corners=True``) to the label size (H, W);
    the caller's ``out`` is left untouched (upstream writes the resized maps back into it). Then::

        total = 0.4 * extra_p_ce + 1.0 * pred_ce + 20 * boundary_bce + boundary_ce

    where ``*_ce`` are torch cross-entropies averaged over the non-ignored pixels,
    ``boundary_bce`` is the class-balanced BCE of ``extra_d`` against ``bd_gt`` (weights: positives
    get #neg/(#pos+#neg), negatives #pos/(#pos+#neg), computed as float32 ratios like upstream;
    other values get 0; mean over all pixels, so an all-zero ``bd_gt`` gives 0), and
    ``boundary_ce`` is the cross-entropy of ``pred`` against the labels kept only where
    ``sigmoid(extra_d) > 0.8`` (``ignore_index`` elsewhere).

    When no non-ignored pixel passes 0.8 (typical early in training) or every label is ignored,
    a cross-entropy averages over zero pixels and the total is NaN, exactly as upstream; a note
    says so. When ``out['extra_p']`` is None (an eval-mode head) upstream returns
    ``sum(pred - pred)``, a zero connected to ``pred``, without reading anything else.

    Args:
        out (dict): ``'pred'``: Tensor[B, C, h, w] float main logits; ``'extra_p'``:
            Tensor[B, C, h', w'] float P-branch logits, or None; ``'extra_d'``:
            Tensor[B, 1, h'', w''] float boundary logits.
        target (dict): ``'target'``: Tensor[B, H, W] int64 labels in [0, C) or ``ignore_index``;
            ``'bd_gt'``: Tensor[B, H, W] float boundary map (1 = edge, 0 = not; other values are
            ignored by the BCE).
        ignore_index (int): label value excluded from the cross-entropies. Default: ``-100``.
        weight: accepted and ignored, as upstream ``PIDNetLoss`` (a note says so when given).
            Default: ``None``.

    Returns:
        LossOutput: ``value`` the scalar total; components ``'extra_p_ce'``, ``'pred_ce'``,
        ``'boundary_bce'`` and ``'boundary_ce'`` are the unweighted terms (the total is
        0.4, 1, 20 and 1 times them). Gradients flow to ``pred``, ``extra_p`` and ``extra_d``.

    Reference:
        ``netspresso_trainer.losses.segmentation.pidnet.PIDNetLoss`` (netspresso-trainer 1.4.1).
        Xu et al., "PIDNet: A Real-time Semantic Segmentation Network Inspired by PID
        Controllers", CVPR 2023, https://arxiv.org/abs/2206.02066.
    """
    notes = []
    if weight is not None:
        notes.append(
            "weight is accepted and ignored, as upstream PIDNetLoss (the criterion's YAML weight multiplies the loss outside)"
        )
    # Declared (_OUT): pred (B, C, h, w); extra_p (B, C', h', w') and extra_d (B, 1, h'', w''),
    # or extra_p None (an eval-mode head, whose target upstream never reads).
    pred = _nonempty_map(out["pred"], "out.pred")
    extra_p = out["extra_p"]
    if extra_p is None:
        notes.append(
            "out.extra_p is None (eval-mode head): upstream returns sum(pred - pred), a zero, without reading extra_d or target"
        )
        return LossOutput(torch.sum(pred - pred), notes=notes)
    batch, num_classes = pred.shape[:2]
    extra_p = _nonempty_map(extra_p, "out.extra_p")
    extra_d = _nonempty_map(out["extra_d"], "out.extra_d")

    labels = require_tensor(require_key(target, "target", "target"), "target.target", dim=3)
    if labels.dtype != torch.int64:
        raise InvalidArgument.expected(
            "target.target", "an int64 label tensor", str(labels.dtype).removeprefix("torch.")
        )
    if labels.shape[0] != batch:
        raise InvalidArgument.expected(
            "target.target", f"batch size {batch} (as in out.pred)", f"shape {list(labels.shape)}"
        )
    if labels.shape[1] == 0 or labels.shape[2] == 0:
        raise InvalidArgument.expected(
            "target.target", "non-empty spatial size (H, W >= 1)", f"shape {list(labels.shape)}"
        )
    bd_gt = require_tensor(require_key(target, "bd_gt", "target"), "target.bd_gt", floating=True)
    if bd_gt.shape != labels.shape:
        raise InvalidArgument.expected(
            "target.bd_gt",
            f"shape {list(labels.shape)} (as target.target)",
            f"shape {list(bd_gt.shape)}",
        )
    # Both heads are scored against the same labels: each must be a valid class of both.
    check_class_indices(
        labels,
        min(num_classes, extra_p.shape[1]),
        "target.target",
        ignore_index=ignore_index,
        upstream="IndexError",  # torch's cross-entropy kernel
    )

    size = labels.shape[-2:]
    pred = _resize(pred, size)
    extra_p = _resize(extra_p, size)
    extra_d = _resize(extra_d, size)

    extra_p_ce = _cross_entropy(extra_p, labels, ignore_index)
    pred_ce = _cross_entropy(pred, labels, ignore_index)
    boundary_bce = boundary_weighted_bce(extra_d, bd_gt)
    confident = torch.sigmoid(extra_d[:, 0, :, :]) > BOUNDARY_THRESHOLD
    bd_label = torch.where(confident, labels, torch.full_like(labels, ignore_index))
    boundary_ce = _cross_entropy(pred, bd_label, ignore_index)

    # Same association as upstream: (0.4 * p + 1.0 * main) + 20 * bce + boundary-aware ce.
    total = (
        (EXTRA_P_WEIGHT * extra_p_ce + PRED_WEIGHT * pred_ce)
        + BOUNDARY_BCE_WEIGHT * boundary_bce
        + boundary_ce
    )

    if not bool((labels != ignore_index).any()):
        notes.append(
            "upstream returns NaN: every label equals ignore_index, so each cross-entropy averages over zero pixels"
        )
    elif not bool((bd_label != ignore_index).any()):
        notes.append(
            "upstream returns NaN: no non-ignored pixel has sigmoid(extra_d) > 0.8, so the boundary-aware "
            "cross-entropy averages over zero pixels (typical early in training)"
        )
    components = {
        "extra_p_ce": extra_p_ce.detach(),
        "pred_ce": pred_ce.detach(),
        "boundary_bce": boundary_bce.detach(),
        "boundary_ce": boundary_ce.detach(),
    }
    return LossOutput(total, components=components, notes=notes)


def _make_example(dtype: torch.dtype) -> tuple[tuple, dict, dict]:
    gen = torch.Generator().manual_seed(2206)
    batch, num_classes, size = 2, 3, 8
    out = {
        "pred": torch.randn(batch, num_classes, 4, 4, generator=gen).to(dtype),
        "extra_p": torch.randn(batch, num_classes, 4, 4, generator=gen).to(dtype),
        # Shifted up so that some pixels pass sigmoid > 0.8 and the boundary-aware term is finite.
        "extra_d": (torch.randn(batch, 1, 4, 4, generator=gen) + 1.5).to(dtype),
    }
    labels = torch.randint(0, num_classes, (batch, size, size), generator=gen)
    labels[0, 0, :3] = 255
    bd_gt = (torch.rand(batch, size, size, generator=gen) < 0.25).to(dtype)
    return (out, {"target": labels, "bd_gt": bd_gt}), {}, {"ignore_index": 255}


_PRED = ("pred", Form(shape=("B", "C", "?", "?"), label="float logits (B, C, h, w)"))
_OUT = (
    Form(
        kind="dict",
        keys=(
            _PRED,
            ("extra_p", Form(shape=("B", "?", "?", "?"), label="float logits (B, C, h', w')")),
            ("extra_d", Form(shape=("B", 1, "?", "?"), label="boundary logits (B, 1, h'', w'')")),
        ),
        label="{'pred', 'extra_p', 'extra_d'}",
    ),
    Form(kind="dict", keys=(_PRED, ("extra_p", Form(kind="none"))), label="an eval-mode output"),
)

SPECS = (
    LossSpec(
        name="pidnet_loss",
        fn=pidnet_loss,
        families=("netspresso",),
        summary="PIDNet loss: 0.4*CE(P branch) + CE(main) + 20*balanced BCE(D branch) + boundary-aware CE, "
        "outputs resized bilinearly to the labels.",
        inputs=(
            model_output(
                "{'pred': Tensor[B, C, h, w], 'extra_p': Tensor[B, C, h', w'] or None, "
                "'extra_d': Tensor[B, 1, h'', w'']} float logits",
                *_OUT,
            ),
            Input(
                "target",
                kind="structure",
                doc="{'target': Tensor[B, H, W] int64 labels in [0, C) or ignore_index, "
                "'bd_gt': Tensor[B, H, W] float boundary map (1 edge, 0 not)}",
            ),
        ),
        params=(
            Param(
                "ignore_index",
                "int",
                IGNORE_INDEX_NONE_VALUE,
                doc="label value excluded from the cross-entropies",
            ),
            Param(
                "weight",
                "any",
                None,
                doc="accepted and ignored, as upstream (class weights are never applied)",
            ),
        ),
        reference="netspresso_trainer.losses.segmentation.pidnet.PIDNetLoss (netspresso-trainer==1.4.1); "
        "Xu et al., PIDNet, CVPR 2023",
        example='RemoteLoss("pidnet_loss", ignore_index=255)({"pred": pred, "extra_p": extra_p, "extra_d": extra_d}, '
        '{"target": labels, "bd_gt": bd_gt})',
        make_example=_make_example,
    ),
)
