"""visdet (BinItAI's MMDetection fork) losses: classification, regression, box-IoU and dense
(heat-map, mask) losses.

Every loss follows the MMDetection calling convention: an element-wise loss, then
``weight -> reduce -> avg_factor (+ float32 eps) -> * loss_weight`` (one shared path,
``_weighted_reduce`` over ``_reduction.weight_reduce_loss``), with a per-call
``reduction_override`` in {None, 'none', 'mean', 'sum'}. Forward arguments come first, in upstream
order, then the constructor parameters as keyword-only arguments with upstream defaults.

Upstream: visdet git HEAD f72e8d1 (``visdet/models/losses``), identical to mmdet 3.3.0 for every
loss here, except that mmdet's FocalLoss and QualityFocalLoss accept more target forms and
``activated=True``; lossd follows mmdet 3.3.0 there. Upstream crashes (assertions, IndexError,
broadcast errors) become ``InvalidArgument`` before any kernel runs; where upstream returns NaN
lossd returns the same NaN, with a note.
"""

from __future__ import annotations

from . import box_iou, classification, dense, regression
from .box_iou import giou_loss, iou_loss
from .classification import (
    cross_entropy_loss,
    distribution_focal_loss,
    focal_loss,
    quality_focal_loss,
)
from .dense import dice_loss, gaussian_focal_loss
from .regression import balanced_l1_loss, l1_loss, mse_loss, smooth_l1_loss

SPECS = (*classification.SPECS, *regression.SPECS, *box_iou.SPECS, *dense.SPECS)

__all__ = [
    "SPECS",
    "balanced_l1_loss",
    "cross_entropy_loss",
    "dice_loss",
    "distribution_focal_loss",
    "focal_loss",
    "gaussian_focal_loss",
    "giou_loss",
    "iou_loss",
    "l1_loss",
    "mse_loss",
    "quality_focal_loss",
    "smooth_l1_loss",
]
