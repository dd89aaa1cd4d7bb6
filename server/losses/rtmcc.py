"""NetsPresso Trainer 1.4.1 ``rtmcc_loss``: RTMPose's SimCC KL loss on x/y coordinate bins.

Upstream hard-codes everything (a 256 x 256 input, split ratio 2 so 512 bins per axis, gaussian
labels with sigma 5.66, logits and labels both scaled by 10) and takes no constructor parameter:
its ``**kwargs`` swallows whatever the config names. The keypoint weight is the raw visibility
value (2 for COCO's "visible" weighs twice), zeroed only for a labelled keypoint whose gaussian
lies wholly outside the bins. The per-keypoint losses are summed over the batch and divided by
the number of keypoints K, not averaged over the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InvalidArgument
from ..registry import Form, Input, LossOutput, LossSpec, Param
from ._checks import require_key, require_tensor
from .netspresso import model_output

SIMCC_SPLIT_RATIO = 2.0
INPUT_SIZE = (256, 256)
SIGMA = (5.66, 5.66)
BETA = 10.0
LABEL_BETA = 10.0
BINS_X = round(INPUT_SIZE[0] * SIMCC_SPLIT_RATIO)
BINS_Y = round(INPUT_SIZE[1] * SIMCC_SPLIT_RATIO)
# Upstream builds its gaussian labels (and the bin grid) in float32 whatever the input dtypes.
LABEL_DTYPE = torch.float32

# What a config may name (mmpose's KLDiscretLoss / RTMCCHead settings) and the value upstream
# uses regardless.
_HARD_CODED = {
    "beta": BETA,
    "label_softmax": True,
    "label_beta": LABEL_BETA,
    "use_target_weight": True,
    "mask": None,
    "mask_weight": 1.0,
    "simcc_split_ratio": SIMCC_SPLIT_RATIO,
    "input_size": INPUT_SIZE,
    "sigma": SIGMA,
    "normalize": False,
}


def simcc_labels(keypoints: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gaussian SimCC labels ``(N, K, 512)`` for x and y, and the keypoint weights ``(N, K)``.

    A keypoint with visibility < 0.5 keeps an all-zero label and its raw visibility as weight; a
    labelled one whose +-3 sigma window misses the bins entirely gets weight 0 (and a zero label).
    """
    xy, visible = keypoints[..., :2], keypoints[..., 2]
    centre = torch.round(xy * SIMCC_SPLIT_RATIO).to(torch.int64)
    radius = torch.tensor(SIGMA, device=keypoints.device) * 3
    low = centre - radius
    high = centre + radius + 1
    outside = (
        (low[..., 0] >= BINS_X) | (low[..., 1] >= BINS_Y) | (high[..., 0] < 0) | (high[..., 1] < 0)
    )
    labelled = ~(visible < 0.5)
    drawn = labelled & ~outside
    weights = torch.where(labelled & outside, torch.zeros_like(visible), visible)
    labels = []
    for axis, bins in ((0, BINS_X), (1, BINS_Y)):
        grid = torch.arange(0, bins, 1, dtype=LABEL_DTYPE, device=keypoints.device)
        gauss = torch.exp(-((grid - centre[..., axis : axis + 1]) ** 2) / (2 * SIGMA[axis] ** 2))
        labels.append(torch.where(drawn.unsqueeze(-1), gauss, torch.zeros_like(gauss)))
    return labels[0], labels[1], weights


def _check_inputs(out: Mapping[str, Any], target: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    pred = require_tensor(require_key(out, "pred", "out"), "out.pred", floating=True, dim=3)
    if pred.shape[-1] != BINS_X + BINS_Y:
        # Upstream splits the last dim in half and scores each half against 512 fixed bins.
        raise InvalidArgument.expected(
            "out.pred",
            f"SimCC logits (N, K, {BINS_X + BINS_Y}): {BINS_X} x-bins then {BINS_Y} y-bins "
            f"(upstream fixes a {INPUT_SIZE[0]}x{INPUT_SIZE[1]} input and split ratio {SIMCC_SPLIT_RATIO:g})",
            f"shape {list(pred.shape)}",
        )
    keypoints = require_tensor(
        require_key(target, "keypoints", "target"), "target.keypoints", floating=True, dim=3
    )
    if tuple(keypoints.shape[:2]) != tuple(pred.shape[:2]) or keypoints.shape[2] < 3:
        raise InvalidArgument.expected(
            "target.keypoints",
            f"shape [{pred.shape[0]}, {pred.shape[1]}, 3] (x, y in input pixels, visibility; N, K as out.pred)",
            f"shape {list(keypoints.shape)}",
        )
    return pred, keypoints


def rtmcc_loss(
    out: Mapping[str, Any],
    target: Mapping[str, Any],
    *,
    beta: float = BETA,
    label_softmax: bool = True,
    label_beta: float = LABEL_BETA,
    use_target_weight: bool = True,
    mask: Any = None,
    mask_weight: float = 1.0,
    simcc_split_ratio: float = SIMCC_SPLIT_RATIO,
    input_size: Any = INPUT_SIZE,
    sigma: Any = SIGMA,
    normalize: bool = False,
) -> Tensor | LossOutput:
    """RTMPose SimCC loss: KL divergence between softened logits and gaussian labels, per axis.

    For each keypoint, with labels from :func:`simcc_labels` (centre ``round(2 * xy)``, sigma
    5.66, float32) and ``w`` its weight (the raw visibility, 0 when its window misses the bins)::

        kl_axis = mean_bins KL(softmax(10 * label) || log_softmax(10 * pred_axis))
        loss = sum_{n, k} (kl_x + kl_y) * w / K

    Args:
        out (dict): ``{'pred': Tensor[N, K, 1024]}`` float SimCC logits, 512 x-bins then 512
            y-bins.
        target (dict): ``{'keypoints': Tensor[N, K, 3]}`` float ``x, y`` in pixels of the
            256 x 256 input and the visibility (used as the weight; < 0.5 means unlabelled).
        beta, label_softmax, label_beta, use_target_weight, mask, mask_weight,
            simcc_split_ratio, input_size, sigma, normalize: accepted and ignored, as upstream
            (which hard-codes 10, True, 10, True, None, 1, 2, (256, 256), (5.66, 5.66), False);
            a note says so when one differs.

    Returns:
        Tensor: a scalar in the promoted dtype of ``pred``, the keypoints and float32 (the labels).
        Gradients flow to ``pred`` and to the visibility channel of the keypoints (the weight);
        x and y get zero (they are rounded). NaN when K = 0, as upstream.

    Reference:
        ``netspresso_trainer.losses.pose_estimation.RTMCCLoss`` (netspresso-trainer 1.4.1), after
        mmpose's ``KLDiscretLoss``. Li et al., "SimCC", ECCV 2022; Jiang et al., "RTMPose",
        arXiv:2303.07399.
    """
    given = dict(
        beta=beta,
        label_softmax=label_softmax,
        label_beta=label_beta,
        use_target_weight=use_target_weight,
        mask=mask,
        mask_weight=mask_weight,
        simcc_split_ratio=simcc_split_ratio,
        input_size=input_size,
        sigma=sigma,
        normalize=normalize,
    )
    notes = [
        f"{name}={value!r} is ignored, as upstream RTMCCLoss (it always uses {_HARD_CODED[name]!r})"
        for name, value in given.items()
        if not _same(value, _HARD_CODED[name])
    ]
    pred, keypoints = _check_inputs(out, target)
    num_keypoints = pred.shape[1]
    label_x, label_y, weights = simcc_labels(keypoints)
    weight = weights.reshape(-1)
    loss: Any = 0
    for logits, labels in ((pred[..., :BINS_X], label_x), (pred[..., BINS_X:], label_y)):
        log_pt = F.log_softmax(logits.reshape(-1, logits.size(-1)) * BETA, dim=1)
        soft = F.softmax(labels.reshape(-1, labels.size(-1)) * LABEL_BETA, dim=1)
        per_keypoint = torch.mean(F.kl_div(log_pt, soft, reduction="none"), dim=1)
        loss = loss + per_keypoint.mul(weight).sum()
    if num_keypoints == 0:
        notes.append("upstream returns NaN: K = 0 keypoints, and the sum is divided by K")
    loss = loss / num_keypoints  # a tensor divided by 0 is NaN, as upstream
    return LossOutput(loss, notes=notes) if notes else loss


def _same(value: Any, expected: Any) -> bool:
    return (tuple(value) if isinstance(value, list) else value) == expected


def _make_example(dtype: torch.dtype) -> tuple[tuple, dict, dict]:
    gen = torch.Generator().manual_seed(2303)
    batch, num_keypoints = 3, 4
    pred = (0.3 * torch.randn(batch, num_keypoints, BINS_X + BINS_Y, generator=gen)).to(dtype)
    xy = torch.rand(batch, num_keypoints, 2, generator=gen) * 200 + 20
    visible = torch.tensor([[2.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.3, 2.0, 1.0]])
    keypoints = torch.cat([xy, visible.unsqueeze(-1)], dim=-1)
    keypoints[2, 3, :2] = torch.tensor([-40.0, 100.0])  # labelled but outside the bins: weight 0
    return ({"pred": pred}, {"keypoints": keypoints.to(dtype)}), {}, {}


_IGNORED = "accepted and ignored, as upstream (always {})"
_OUT = Form(
    kind="dict",
    keys=(("pred", Form(shape=("N", "K", BINS_X + BINS_Y), label="SimCC logits (N, K, 1024)")),),
)
# At least x, y and visibility (upstream reads columns 0-2; _check_inputs checks the count).
_TARGET = Form(kind="dict", keys=(("keypoints", Form(shape=("N", "K", "?"))),))

SPECS = (
    LossSpec(
        name="rtmcc_loss",
        fn=rtmcc_loss,
        families=("netspresso",),
        summary="RTMPose SimCC loss: KL of 10x-softened x/y bin logits against gaussian labels "
        "(sigma 5.66, 512 bins each), weighted by the raw visibility, summed, / K.",
        inputs=(
            model_output(
                "{'pred': Tensor[N, K, 1024] float SimCC logits, 512 x-bins then 512 y-bins}", _OUT
            ),
            Input(
                "target",
                kind="structure",
                forms=(_TARGET,),
                differentiable=True,
                doc="{'keypoints': Tensor[N, K, 3] float x, y (pixels of a 256x256 input), "
                "visibility (the weight; gets a gradient)}",
            ),
        ),
        params=(
            Param("beta", "float", BETA, doc=_IGNORED.format(BETA)),
            Param("label_softmax", "bool", True, doc=_IGNORED.format(True)),
            Param("label_beta", "float", LABEL_BETA, doc=_IGNORED.format(LABEL_BETA)),
            Param("use_target_weight", "bool", True, doc=_IGNORED.format(True)),
            Param("mask", "any", None, doc=_IGNORED.format(None)),
            Param("mask_weight", "float", 1.0, doc=_IGNORED.format(1.0)),
            Param(
                "simcc_split_ratio",
                "float",
                SIMCC_SPLIT_RATIO,
                doc=_IGNORED.format(SIMCC_SPLIT_RATIO),
            ),
            Param("input_size", "any", INPUT_SIZE, doc=_IGNORED.format(INPUT_SIZE)),
            Param("sigma", "any", SIGMA, doc=_IGNORED.format(SIGMA)),
            Param("normalize", "bool", False, doc=_IGNORED.format(False)),
        ),
        reference="netspresso_trainer.losses.pose_estimation.RTMCCLoss (netspresso-trainer==1.4.1); "
        "Jiang et al., RTMPose, arXiv:2303.07399",
        example='RemoteLoss("rtmcc_loss")({"pred": simcc_logits}, {"keypoints": keypoints})',
        make_example=_make_example,
    ),
)
