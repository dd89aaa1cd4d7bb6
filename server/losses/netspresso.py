"""NetsPresso Trainer 1.4.1 losses: ``focal_loss``, ``seg_cross_entropy`` and the ``model.losses``
criteria list.

NetsPresso losses are called as ``loss(out, target)`` with the model's output dict and the
batch's target dict; each criterion reads the keys it needs (``out['pred']``,
``target['target']``, ...). The trainer builds every entry of the YAML ``model.losses`` list and
adds them up, ``total = sum(weight_i * loss_i)``; the ``losses`` entry below serves that list as
one loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import registry
from .._reduction import reduce_loss
from ..errors import InvalidArgument, LossNotFound, ServiceError
from ..registry import REQUIRED, Form, Input, LossOutput, LossSpec, Param
from .fat import cross_entropy
from .fat._torch import LABEL_SMOOTHING

_UPSTREAM = "netspresso-trainer==1.4.1"


def model_output(doc: str, *forms: Form) -> Input:
    """The ``out`` argument of a NetsPresso criterion: the model's output dict, whose tensors get
    the gradient; ``forms`` declare its layout (none: the criterion checks it)."""
    return Input("out", kind="structure", forms=forms, differentiable=True, doc=doc)


def _sigmoid_focal_elementwise(pred: Tensor, target: Tensor, alpha: float, gamma: float) -> Tensor:
    """Element-wise sigmoid focal loss, same operations and order as upstream/torchvision."""
    prob = torch.sigmoid(pred)
    bce = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
    # p_t is the probability given to the true outcome; (1 - p_t)^gamma down-weights easy ones.
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = bce * ((1 - p_t) ** gamma)
    # Upstream treats any negative alpha as "no class balancing" and never range-checks alpha.
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss


def focal_loss(
    out: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    reduction: str = "mean",
    *,
    alpha: float,
    gamma: float,
) -> Tensor | LossOutput:
    """Sigmoid focal loss on same-shape logits and float (one-hot or soft) targets.

    ``FL = BCEWithLogits(x, t) * (1 - p_t)^gamma``, times ``alpha * t + (1 - alpha) * (1 - t)``
    when ``alpha >= 0``, with ``p = sigmoid(x)`` and ``p_t = p * t + (1 - p) * (1 - t)``.

    Args:
        out (dict): ``{'pred': Tensor[*]}``, float logits of any shape (e.g. ``(N, C)``).
        target (dict): ``{'target': Tensor[*]}``, a float tensor of exactly ``pred``'s shape with
            values in [0, 1] (one-hot or soft). Class indices are rejected: one-hot encode them.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'`` over all elements. Default: ``'mean'``.
        alpha (float): class-balance weight of positives; any negative value disables the
            weighting (no [0, 1] range check, as upstream). Required, no default.
        gamma (float): focusing exponent. Required, no default.

    Returns:
        Tensor: a scalar for ``mean``/``sum``, ``pred``'s shape for ``none``. Gradients flow to
        ``pred`` and to ``target``. An empty input with ``mean`` gives NaN, as upstream.

    Reference:
        ``netspresso_trainer.losses.common.SigmoidFocalLoss`` (netspresso-trainer 1.4.1), the same
        maths as ``torchvision.ops.sigmoid_focal_loss``. Lin et al., "Focal Loss for Dense Object
        Detection", ICCV 2017, https://arxiv.org/abs/1708.02002.
    """
    pred, tgt = out["pred"], target["target"]  # declared: float logits, float of pred's shape
    loss = reduce_loss(_sigmoid_focal_elementwise(pred, tgt, alpha, gamma), reduction)
    if reduction == "mean" and pred.numel() == 0:
        return LossOutput(loss, notes=["upstream returns NaN: mean over an empty out.pred"])
    return loss


def _make_focal_example(dtype: torch.dtype) -> tuple[tuple, dict, dict]:
    gen = torch.Generator().manual_seed(1708)
    pred = torch.randn(6, 4, generator=gen).to(dtype)
    labels = torch.randint(0, 4, (6,), generator=gen)
    onehot = F.one_hot(labels, 4).to(dtype)
    return ({"pred": pred}, {"target": onehot}), {}, {"alpha": 0.25, "gamma": 2.0}


# --------------------------------------------------------------------------------------------
# seg_cross_entropy (SegCrossEntropyLoss)


def _seg_inputs(out: Mapping[str, Any], target: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    # Declared: out.pred [B, C, h, w] float; target.target [B, H, W] class indices of C (or
    # ignore_index), or soft targets [B, C, H, W]. Left here: F.interpolate's own condition.
    pred, labels = out["pred"], target["target"]
    if pred.shape[2] == 0 or pred.shape[3] == 0:
        # F.interpolate refuses an empty input map.
        raise InvalidArgument.expected(
            "out.pred", "non-empty spatial size (h, w >= 1)", f"shape {list(pred.shape)}"
        )
    if labels.shape[-1] == 0 or labels.shape[-2] == 0:
        raise InvalidArgument.expected(
            "target.target", "non-empty spatial size (H, W >= 1)", f"shape {list(labels.shape)}"
        )
    return pred, labels


def seg_cross_entropy(
    out: Mapping[str, Any],
    target: Mapping[str, Any],
    *,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    label_smoothing: float = 0.0,
) -> Tensor | LossOutput:
    """Segmentation cross-entropy: logits resized to the label size, then torch cross-entropy.

    ``out['pred']`` is resized with ``F.interpolate(mode='bilinear', align_corners=False)`` to the
    last two dims ``(H, W)`` of ``target['target']`` (a new tensor; the caller's is untouched),
    then scored exactly as NetsPresso's ``cross_entropy``: torch ``CrossEntropyLoss`` with
    ``reduction='mean'`` unless the legacy ``size_average``/``reduce`` pair overrides it (torch's
    rule: ``reduce=False`` gives per-pixel losses, ``size_average=False`` a sum).

    Args:
        out (dict): ``{'pred': Tensor[B, C, h, w]}`` float logits (any h, w >= 1).
        target (dict): ``{'target': Tensor[B, H, W]}`` int64 labels in ``[0, C)`` or
            ``ignore_index``; or float soft targets ``Tensor[B, C, H, W]`` (class probabilities,
            which get a gradient; ``ignore_index`` does not apply to them, as in torch).
        weight (Tensor[C], optional): per-class weight; the mean divides by the summed weight of
            the counted pixels (a NetsPresso YAML ``weight`` is the criterion's multiplier
            instead, so this is set only through RemoteLoss). Default: ``None``.
        size_average (bool, optional): deprecated torch argument (see above). Default: ``None``.
        ignore_index (int): label excluded from loss and count. Default: ``-100``.
        reduce (bool, optional): deprecated torch argument (see above). Default: ``None``.
        label_smoothing (float): in [0, 1]. Default: ``0.0``.

    Returns:
        Tensor: a scalar (``[B, H, W]`` when ``reduce=False``). NaN with the mean when no pixel is
        counted (every label ignored), as upstream; a note says so. Gradients flow to
        ``out['pred']`` (through the interpolation) and to soft targets.

    Reference:
        ``netspresso_trainer.losses.segmentation.SegCrossEntropyLoss`` (netspresso-trainer 1.4.1).
    """
    pred, labels = _seg_inputs(out, target)
    resized = F.interpolate(pred, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return cross_entropy(
        {"pred": resized},
        {"target": labels},
        weight=weight,
        size_average=size_average,
        ignore_index=ignore_index,
        reduce=reduce,
        label_smoothing=label_smoothing,
    )


_SEG_TARGET = (
    Form(
        dtypes=("int64", "uint8"),
        shape=("B", "H", "W"),
        index_of="C",
        index_ignore=("ignore_index",),
        upstream="IndexError",  # torch's cross-entropy kernel
        label="int64 labels [B, H, W] in [0, C) or ignore_index",
    ),
    Form(shape=("B", "C", "H", "W"), label="float soft targets [B, C, H, W]"),
)


def _make_seg_example(dtype: torch.dtype) -> tuple[tuple, dict, dict]:
    gen = torch.Generator().manual_seed(1505)
    pred = torch.randn(2, 3, 4, 5, generator=gen).to(dtype)
    labels = torch.randint(0, 3, (2, 7, 9), generator=gen)
    labels[1] = 255  # the second image has no labelled pixel
    labels[0, :2] = 255
    return ({"pred": pred}, {"target": labels}), {}, {"ignore_index": 255, "label_smoothing": 0.1}


# --------------------------------------------------------------------------------------------
# The criteria list (NetsPresso's `model.losses`)

#: Criteria a ``model.losses`` entry may name: the NetsPresso Trainer criteria lossd serves.
NETSPRESSO_CRITERIA = (
    "cross_entropy",
    "seg_cross_entropy",
    "focal_loss",
    "yolox_loss",
    "yolofastest_loss",
    "retinanet_loss",
    "pidnet_loss",
    "yolov9_loss",
    "detr_loss",
    "rtmcc_loss",
)

# The trainer passes its epoch counter to every criterion, and all of them swallow it through
# **kwargs; only yolox_loss reads it. It is therefore never reported as an ignored key.
_TRAINER_KEYS = ("cur_epoch",)

_ENTRY_WEIGHT = Param("weight", "float", None, doc="multiplier of this criterion", nullable=True)


def _reraise_under(err: ServiceError, prefix: str) -> ServiceError:
    """The same error, with its field moved under ``prefix`` (``params.alpha`` -> ``params.losses[1].alpha``)."""
    field = err.field or ""
    field = f"{prefix}.{field.removeprefix('params.')}" if field else prefix
    return type(err)(err.message, field=field)


def _resolve_entry(entry: Any, i: int) -> tuple[str, registry.LossSpec, float, dict, list[str]]:
    where = f"params.losses[{i}]"
    if not isinstance(entry, Mapping):
        raise InvalidArgument.expected(
            where, "a mapping {criterion: ..., weight: ..., <params>}", type(entry).__name__
        )
    if "criterion" not in entry:
        keys = ", ".join(repr(k) for k in entry) or "none"
        raise InvalidArgument(
            f"missing key 'criterion' (keys given: {keys})", field=f"{where}.criterion"
        )
    name = entry["criterion"]
    if not isinstance(name, str):
        raise InvalidArgument.expected(
            f"{where}.criterion", "a criterion name (str)", type(name).__name__
        )
    try:
        spec = registry.get(name)
    except LossNotFound as err:
        raise LossNotFound(err.message, field=f"{where}.criterion") from None
    if name not in NETSPRESSO_CRITERIA:
        raise InvalidArgument.expected(
            f"{where}.criterion",
            f"a NetsPresso criterion ({', '.join(NETSPRESSO_CRITERIA)})",
            repr(name),
        )
    weight = _ENTRY_WEIGHT.coerce(entry.get("weight"), f"{where}.weight")
    weight = 1.0 if weight is None else weight
    given = {k: v for k, v in entry.items() if k not in ("criterion", "weight")}
    ignored = [k for k in given if spec.param(k) is None and k not in _TRAINER_KEYS]
    accepted = {k: v for k, v in given.items() if spec.param(k) is not None}
    try:
        params = spec.canonical_params(accepted)
    except ServiceError as err:
        raise _reraise_under(err, where) from None
    return name, spec, weight, params, ignored


def criteria_list(
    out: Mapping[str, Any],
    target: Mapping[str, Any],
    *,
    losses: list,
) -> LossOutput:
    """NetsPresso Trainer's ``model.losses``: a weighted sum of criteria on the same ``(out, target)``.

    Each entry is ``{criterion: <name>, weight: <float | None>, <constructor params>...}``
    exactly as in the trainer's YAML; ``weight: null`` means 1.0. Every criterion is called
    with the same ``out`` and ``target`` dicts, and ``total = sum(weight_i * loss_i)``.

    Upstream rules kept here:

    * two entries with the same criterion collapse to the **last** one (the trainer keys its
      losses by criterion name), at the position of the first;
    * keys a criterion does not accept are ignored (upstream's ``**kwargs`` swallows them),
      except that ``cur_epoch`` reaches the criteria that take it (``yolox_loss``);
    * only NetsPresso criteria may be named.

    Args:
        out (dict): the model output dict every criterion reads (e.g. ``{'pred': Tensor[N, C]}``).
        target (dict): the target dict every criterion reads (e.g. ``{'target': Tensor[N, C]}``).
        losses (list): the ``model.losses`` entries, at least one.

    Returns:
        LossOutput: ``value`` is the weighted total (a scalar tensor, differentiable like its
        terms); ``components`` holds each criterion's unweighted loss (detached) under its name,
        plus that criterion's own components as ``<name>.<component>``.

    Reference:
        ``netspresso_trainer.losses.builder.LossFactory`` (netspresso-trainer 1.4.1).
    """
    if not isinstance(losses, (list, tuple)) or not losses:
        got = (
            f"{len(losses)} entries" if isinstance(losses, (list, tuple)) else type(losses).__name__
        )
        raise InvalidArgument.expected(
            "params.losses", "a non-empty list of criterion entries", got
        )

    # Upstream builds every entry (so a bad one fails even when a later one replaces it), then
    # keeps one per criterion name: the last entry's settings, in the first entry's place.
    chosen: dict[str, tuple[int, registry.LossSpec, float, dict, list[str]]] = {}
    positions: dict[str, list[int]] = {}
    for i, entry in enumerate(losses):
        name, spec, weight, params, ignored = _resolve_entry(entry, i)
        chosen[name] = (i, spec, weight, params, ignored)
        positions.setdefault(name, []).append(i)

    notes: list[str] = []
    for name, where in positions.items():
        if len(where) > 1:
            listed = ", ".join(f"params.losses[{i}]" for i in where)
            notes.append(
                f"criterion {name!r} appears in {listed}; upstream keys losses by criterion name, "
                f"so only the last entry (params.losses[{where[-1]}]) is used"
            )

    total: Any = 0
    components: dict[str, Tensor] = {}
    for name, (i, spec, weight, params, ignored) in chosen.items():
        if ignored:
            keys = ", ".join(repr(k) for k in ignored)
            notes.append(
                f"params.losses[{i}]: {keys} not accepted by {name!r}; upstream's **kwargs "
                "swallows them, so they are ignored"
            )
        # Each criterion's declaration, checked here as the engine checks a call's.
        first, second = (i.name for i in spec.inputs[:2])
        registry.check_inputs(
            spec, {first: out, second: target}, {first: "out", second: "target"}, params
        )
        result = spec.fn(out, target, **params)
        if isinstance(result, LossOutput):
            value = result.value
            components[name] = value.detach()
            for key, comp in result.components.items():
                components[f"{name}.{key}"] = comp.detach()
            notes.extend(f"{name}: {note}" for note in result.notes)
        else:
            value = result
            components[name] = value.detach()
        total = total + value * weight
    return LossOutput(total, components=components, notes=notes)


def _make_criteria_example(dtype: torch.dtype) -> tuple[tuple, dict, dict]:
    gen = torch.Generator().manual_seed(1310)
    pred = torch.randn(6, 4, generator=gen).to(dtype)
    onehot = F.one_hot(torch.randint(0, 4, (6,), generator=gen), 4).to(dtype)
    entries = [{"criterion": "focal_loss", "alpha": 0.25, "gamma": 2.0, "weight": 0.5}]
    return ({"pred": pred}, {"target": onehot}), {}, {"losses": entries}


SPECS = (
    LossSpec(
        name="focal_loss",
        fn=focal_loss,
        families=("netspresso",),
        summary="Sigmoid focal loss on same-shape logits and float targets (NetsPresso SigmoidFocalLoss).",
        inputs=(
            model_output(
                "{'pred': Tensor[*] float logits}",
                Form(kind="dict", keys=(("pred", Form(label="float logits")),)),
            ),
            Input(
                "target",
                kind="structure",
                forms=(
                    Form(
                        kind="dict",
                        keys=(
                            (
                                "target",
                                Form(
                                    same_shape="out.pred",
                                    label="a float one-hot or soft target of out.pred's shape; "
                                    "class indices are not accepted",
                                ),
                            ),
                        ),
                    ),
                ),
                differentiable=True,
                doc="{'target': Tensor[*] float, same shape as out.pred, one-hot or soft in [0, 1]}",
            ),
            Input(
                "reduction",
                kind="str",
                optional=True,
                default="mean",
                choices=("none", "mean", "sum"),
                doc="reduction over all elements (a forward argument upstream)",
            ),
        ),
        params=(
            Param(
                "alpha",
                "float",
                REQUIRED,
                doc="weight of positives; negative disables class balancing",
            ),
            Param("gamma", "float", REQUIRED, doc="focusing exponent on (1 - p_t)"),
        ),
        reference=f"netspresso_trainer.losses.common.SigmoidFocalLoss ({_UPSTREAM}); "
        "Lin et al., Focal Loss for Dense Object Detection, ICCV 2017",
        example='RemoteLoss("focal_loss", alpha=0.25, gamma=2.0)({"pred": logits}, {"target": onehot})',
        make_example=_make_focal_example,
    ),
    LossSpec(
        name="seg_cross_entropy",
        fn=seg_cross_entropy,
        families=("netspresso",),
        summary="Segmentation cross-entropy: logits resized bilinearly (align_corners=False) to the "
        "label size, then torch CrossEntropyLoss (NetsPresso SegCrossEntropyLoss).",
        inputs=(
            model_output(
                "{'pred': Tensor[B, C, h, w] float logits}",
                Form(kind="dict", keys=(("pred", Form(shape=("B", "C", "h", "w"))),)),
            ),
            Input(
                "target",
                kind="structure",
                forms=(Form(kind="dict", keys=(("target", _SEG_TARGET),)),),
                differentiable=True,
                doc="{'target': Tensor[B, H, W] int64 labels in [0, C) or ignore_index, "
                "or Tensor[B, C, H, W] float soft targets (these get a gradient)}",
            ),
        ),
        params=(
            Param("weight", "tensor", None, nullable=True, doc="per-class weight, shape [C]"),
            Param(
                "size_average",
                "bool",
                None,
                nullable=True,
                doc="deprecated torch argument; with reduce, overrides the mean when set",
            ),
            Param("ignore_index", "int", -100, doc="label that is neither counted nor penalised"),
            Param(
                "reduce",
                "bool",
                None,
                nullable=True,
                doc="deprecated torch argument; False gives per-pixel losses",
            ),
            LABEL_SMOOTHING,
        ),
        reference=f"netspresso_trainer.losses.segmentation.SegCrossEntropyLoss ({_UPSTREAM})",
        example='RemoteLoss("seg_cross_entropy", ignore_index=255)({"pred": logits}, {"target": labels})',
        make_example=_make_seg_example,
    ),
    LossSpec(
        name="losses",
        fn=criteria_list,
        families=("netspresso",),
        summary="NetsPresso model.losses: weighted sum of criteria called on the same (out, target).",
        inputs=(
            model_output("model output dict passed to every criterion"),
            Input(
                "target",
                kind="structure",
                differentiable=True,
                doc="target dict passed to every criterion (float targets get gradients where the criterion gives them)",
            ),
        ),
        params=(
            Param(
                "losses",
                "list",
                REQUIRED,
                doc="model.losses entries {criterion, weight (null = 1.0), ...params}; criteria: "
                + ", ".join(NETSPRESSO_CRITERIA),
            ),
        ),
        reference=f"netspresso_trainer.losses.builder.LossFactory ({_UPSTREAM})",
        example='RemoteLoss("losses", losses=[{"criterion": "cross_entropy", "weight": 1.0}, '
        '{"criterion": "focal_loss", "alpha": 0.25, "gamma": 2.0, "weight": 0.5}])'
        '({"pred": logits}, {"target": onehot})',
        make_example=_make_criteria_example,
    ),
)
