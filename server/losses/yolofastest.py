"""NetsPresso Trainer 1.4.1 ``yolofastest_loss``: YOLO-Fastest's anchor-based head under YOLOX's
SimOTA assignment and terms, with a GIoU box term and no L1 term.

Each level carries ``A`` anchors (the ``anchors`` parameter: flat ``(w, h)`` pixel pairs per
level); a level's prediction is ``(B, A, 5 + C, H, W)`` or the same channels flattened,
``(B, A * (5 + C), H, W)``. Anchors are flattened anchor-major (anchor, row, column), levels in
order, and decoded as ``cx = (sigmoid(tx) + col) * s``, ``w = 2 * (tanh(tw / 2 - 0.549306) + 1)
* anchor_w`` (``s = img_size // W``). Assignment, objectness and classification are YOLOX's
(``yolox.simota_losses``); the box term is ``1 - clamp(GIoU, -1, 1)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import InvalidArgument
from ..registry import Form, LossOutput, LossSpec, Param
from ._checks import require_key, require_tensor
from ._detection import aligned_areas_cxcywh, plain_int
from .netspresso import model_output
from .yolox import TARGET_INPUT, check_target, concat_levels, level_outputs, simota_losses

GIOU_EPS = 1e-7
TANH_OFFSET = 0.549306  # atanh(0.5): a zero logit decodes to exactly the anchor size
# Upstream stores the anchors with torch.tensor(..., dtype=torch.float).
ANCHOR_DTYPE = torch.float32


def giou_cxcywh(pred: Tensor, target: Tensor, eps: float = GIOU_EPS) -> Tensor:
    """GIoU of row-aligned ``(K, 4)`` cxcywh boxes (union + eps, enclosing area clamped at eps).

    Each corner is computed afresh where it is used, as upstream does: reusing one tensor would
    sum the gradient contributions in another order and differ from upstream in the last bit.
    """
    area_p, area_g, area_i = aligned_areas_cxcywh(pred, target)
    area_u = area_p + area_g - area_i
    iou = area_i / (area_u + eps)
    enclose_tl = torch.min(pred[:, :2] - pred[:, 2:] / 2, target[:, :2] - target[:, 2:] / 2)
    enclose_br = torch.max(pred[:, :2] + pred[:, 2:] / 2, target[:, :2] + target[:, 2:] / 2)
    area_c = torch.prod(enclose_br - enclose_tl, 1)
    return iou - (area_c - area_u) / area_c.clamp(eps)


def _giou_loss(pred: Tensor, target: Tensor) -> Tensor:
    return 1 - giou_cxcywh(pred, target).clamp(min=-1.0, max=1.0)


def _anchor_tensors(anchors: Any, num_levels: int) -> tuple[list[Tensor], list[str]]:
    if not isinstance(anchors, (list, tuple)) or not anchors:
        raise InvalidArgument.expected(
            "params.anchors",
            "a list with one flat [w0, h0, w1, h1, ...] list per level",
            type(anchors).__name__,
        )
    tensors = []
    for k, level in enumerate(anchors):
        where = f"params.anchors[{k}]"
        ok = isinstance(level, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in level
        )
        if not ok or not level or len(level) % 2:
            got = f"{len(level)} numbers" if ok else type(level).__name__
            raise InvalidArgument.expected(where, "a non-empty flat list of (w, h) pairs", got)
        tensors.append(torch.tensor([float(v) for v in level], dtype=ANCHOR_DTYPE).view(-1, 2))
        if tensors[k].shape[0] != tensors[0].shape[0]:
            # Upstream sizes every level by the first level's anchor count.
            raise InvalidArgument.expected(
                where,
                f"{tensors[0].shape[0]} anchors (as params.anchors[0])",
                f"{tensors[k].shape[0]} anchors",
            )
    if len(tensors) < num_levels:
        raise InvalidArgument.expected(
            "params.anchors",
            f"anchors for each of the {num_levels} levels of out.pred",
            len(tensors),
        )
    notes = []
    if len(tensors) > num_levels:
        notes.append(
            f"params.anchors has {len(tensors)} levels and out.pred {num_levels}; as upstream, the "
            f"anchors of the last {len(tensors) - num_levels} level(s) are unused"
        )
    return tensors[:num_levels], notes


def _levels(value: Any, num_anchors: int, num_classes: int) -> list[Tensor]:
    """Each level as ``(B, A, 5 + C, H, W)`` (a view of a 4-d level)."""
    if isinstance(value, Tensor) or not isinstance(value, Sequence) or isinstance(value, str):
        raise InvalidArgument.expected(
            "out.pred", "a list with one (B, A, 5 + C, H, W) tensor per level", type(value).__name__
        )
    if not value:
        raise InvalidArgument.expected("out.pred", "at least one level", "an empty list")
    channels = 5 + num_classes
    levels: list[Tensor] = []
    for k, level in enumerate(value):
        where = f"out.pred[{k}]"
        level = require_tensor(level, where, floating=True)
        shape = list(level.shape)
        if level.dim() == 4 and shape[1] == num_anchors * channels:
            level = level.view(shape[0], num_anchors, channels, shape[2], shape[3])
        elif level.dim() != 5 or shape[1:3] != [num_anchors, channels]:
            raise InvalidArgument.expected(
                where,
                f"(B, {num_anchors}, 5 + num_classes = {channels}, H, W) or "
                f"(B, {num_anchors * channels}, H, W) for {num_anchors} anchors per level",
                f"shape {shape}",
            )
        if level.shape[3] == 0 or level.shape[4] == 0:
            raise InvalidArgument.expected(where, "non-empty H, W", f"shape {shape}")
        if levels and level.shape[0] != levels[0].shape[0]:
            raise InvalidArgument.expected(
                where, f"batch size {levels[0].shape[0]} (as out.pred[0])", f"shape {shape}"
            )
        if levels and level.device != levels[0].device:
            raise InvalidArgument.expected(
                where, f"device {levels[0].device} (as out.pred[0])", str(level.device)
            )
        levels.append(level)
    return levels


def _decode(levels: list[Tensor], anchors: list[Tensor], img_size: int):
    decoded, raw, xs, ys, strides = [], [], [], [], []
    for level, level_anchors in zip(levels, anchors):
        batch, num_anchors, channels, height, width = level.shape
        stride = img_size // width
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        grid = (
            torch.stack((cols, rows), 2)
            .repeat(num_anchors, 1, 1, 1)
            .view(1, num_anchors, height, width, 2)
            .to(device=level.device, dtype=level.dtype)
        )
        size = level_anchors.view(1, num_anchors, 1, 1, 2).to(level.device)
        flat = level.permute(0, 1, 3, 4, 2)
        out = torch.cat(
            (
                (flat[..., :2].sigmoid() + grid) * stride,
                2.0 * (torch.tanh(flat[..., 2:4] / 2 - TANH_OFFSET) + 1.0) * size,
                flat[..., 4:],
            ),
            dim=-1,
        ).reshape(batch, height * width * num_anchors, -1)
        decoded.append(out)
        raw.append(flat[..., :4].reshape(batch, -1, 4))
        grid = grid.view(1, -1, 2)
        xs.append(grid[0, :, 0])
        ys.append(grid[0, :, 1])
        strides.append(
            torch.full((grid.shape[1],), float(stride), device=out.device, dtype=out.dtype)
        )
    return concat_levels(decoded, raw, xs, ys, strides)


def yolofastest_loss(
    out: Mapping[str, Any],
    target: Mapping[str, Any],
    *,
    anchors: list,
    l1_activate_epoch: int | None = None,
    cur_epoch: int | None = None,
) -> LossOutput:
    """YOLO-Fastest loss: anchor-based decoding, SimOTA assignment, GIoU + objectness + class BCE.

    Decoding (per level of stride ``s = img_size // W``, anchors ``(w_a, h_a)`` in pixels)::

        cx = (sigmoid(tx) + col) * s          w = 2 * (tanh(tw / 2 - 0.549306) + 1) * w_a
        cy = (sigmoid(ty) + row) * s          h = 2 * (tanh(th / 2 - 0.549306) + 1) * h_a

    Everything else is YOLOX's (see ``yolox_loss``): GT boxes converted to cxcywh in a copy (the
    caller's target is not modified, unlike upstream) and packed as float32 rows, SimOTA with the
    1.5-stride centre prior and dynamic k, and with ``num_fg`` the matched anchors (at least 1)::

        total = 5 * giou + obj + cls
        giou = sum_fg (1 - clamp(GIoU(pred, gt), -1, 1)) / num_fg   (union + 1e-7, enclosure >= 1e-7)
        obj  = sum_all BCEWithLogits(obj, fg) / num_fg
        cls  = sum_fg BCEWithLogits(cls, onehot * IoU) / num_fg     (IoU detached)

    There is never an L1 term (upstream switches it off for this loss).

    Args:
        out (dict): ``'pred'``: list over levels of Tensor[B, A, 5 + C, H_l, W_l] float raw
            outputs (channels ``tx, ty, tw, th, obj, cls_0..C-1``), or Tensor[B, A * (5 + C),
            H_l, W_l] with the same channels anchor by anchor.
        target (dict): ``'gt'``: list of B dicts ``{'boxes': Tensor[n_i, 4] float xyxy absolute
            pixels, 'labels': Tensor[n_i] int in [0, C)}`` (``n_i`` may be 0); ``'img_size'``:
            int image width; ``'num_classes'``: int C.
        anchors (list): per level a flat ``[w0, h0, w1, h1, ...]`` list of anchor sizes in
            pixels, the same count A on every level. Required.
        l1_activate_epoch (int, optional): accepted and unused, as upstream. Default: ``None``.
        cur_epoch (int, optional): accepted and unused, as upstream. Default: ``None``.

    Returns:
        LossOutput: ``value`` the scalar total; components ``'iou'`` (the GIoU term), ``'obj'``
        and ``'cls'``, so ``total = 5 * iou + obj + cls``. Gradients flow to every level of
        ``out['pred']``; the target gets none.

    Raises:
        InvalidArgument: anchors that are not (w, h) pairs or differ in count between levels,
            fewer anchor levels than prediction levels, a level of the wrong shape, labels
            outside [0, C), an xyxy box with x2 < x1 or y2 < y1, a batch size mismatch, or an
            image whose GTs have no candidate anchor at all (as ``yolox_loss``).

    Reference:
        ``netspresso_trainer.losses.detection.yolo.YOLOFastestLoss`` (netspresso-trainer 1.4.1),
        a subclass of its YOLOXLoss. dog-qiuqiu, Yolo-FastestV2 (2021).
    """
    num_classes = plain_int(require_key(target, "num_classes", "target"), "target.num_classes", 0)
    pred = require_key(out, "pred", "out")
    num_levels = len(pred) if isinstance(pred, (list, tuple)) else 0
    level_anchors, notes = _anchor_tensors(anchors, max(num_levels, 1))
    levels = _levels(pred, level_anchors[0].shape[0], num_classes)
    images, img_size, num_classes = check_target(target, levels[0].shape[0])
    decoded = _decode(levels, level_anchors, img_size)
    result = simota_losses(*decoded, images, num_classes, levels[0].dtype, False, _giou_loss)
    result.components.pop("l1")
    result.notes[:0] = notes
    return result


def _make_example(dtype: torch.dtype) -> tuple[tuple, dict, dict]:
    # Box logits of -6 decode to boxes ~0.01 of their anchor, so only the anchors set to fit a GT
    # are cheap for SimOTA and no assignment is near a tie (finite differences cannot flip it).
    gen = torch.Generator().manual_seed(2021)
    batch, num_classes, img_size = 3, 2, 32
    anchors = [[4.0, 6.0, 10.0, 8.0], [12.0, 16.0, 20.0, 18.0]]
    pred = []
    for n in (4, 2):
        level = 0.5 * torch.randn(
            batch, 2, 5 + num_classes, n, n, generator=gen, dtype=torch.float64
        )
        level[:, :, 2:4] = -6.0
        pred.append(level)
    # image 0, GT (label 1) cxcywh (12, 12, 10, 8): level 0 (stride 8), anchor 1, row 1, col 1.
    pred[0][0, 1, :4, 1, 1] = torch.tensor([0.3, 0.2, 0.1, -0.2], dtype=torch.float64)
    # image 2, GT (label 0) cxcywh (20, 20, 20, 18): level 1 (stride 16), anchor 1, row 1, col 1.
    pred[1][2, 1, :4, 1, 1] = torch.tensor([-0.4, -0.2, 0.05, 0.1], dtype=torch.float64)
    # Matched class logits of 0: the derivative of the (detached, as upstream) IoU class target
    # vanishes there, so finite differences agree with autograd.
    pred[0][0, 1, 5:, 1, 1] = 0.0
    pred[1][2, 1, 5:, 1, 1] = 0.0
    gt = [
        {"boxes": torch.tensor([[7.0, 8.0, 17.0, 16.0]], dtype=dtype), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4, dtype=dtype), "labels": torch.zeros(0, dtype=torch.int64)},
        {
            "boxes": torch.tensor([[10.0, 11.0, 30.0, 29.0]], dtype=dtype),
            "labels": torch.tensor([0]),
        },
    ]
    # The second level in the flattened 4-d layout.
    levels = [pred[0].to(dtype), pred[1].reshape(batch, -1, 2, 2).to(dtype)]
    target = {"gt": gt, "img_size": img_size, "num_classes": num_classes}
    return ({"pred": levels}, target), {}, {"anchors": anchors}


# Level shapes depend on the anchors parameter and num_classes: _levels checks them.
_OUT = level_outputs(
    (Form(shape=("B", "?", "?", "?", "?")), Form(shape=("B", "?", "?", "?"))),
    "a list with one (B, A, 5 + C, H_l, W_l) or (B, A * (5 + C), H_l, W_l) tensor per level",
)

SPECS = (
    LossSpec(
        name="yolofastest_loss",
        fn=yolofastest_loss,
        families=("netspresso",),
        summary="YOLO-Fastest loss: anchor-based decoding, YOLOX's SimOTA assignment, "
        "5*GIoU + objectness BCE + IoU-soft class BCE, / num_fg.",
        inputs=(
            model_output(
                "{'pred': [Tensor[B, A, 5 + C, H_l, W_l] or Tensor[B, A * (5 + C), H_l, W_l]] per level, "
                "channels tx, ty, tw, th, obj, cls_0..C-1}",
                _OUT,
            ),
            TARGET_INPUT,
        ),
        params=(
            Param(
                "anchors",
                "list",
                doc="per level a flat [w0, h0, w1, h1, ...] list of anchor sizes in pixels (same count per level)",
            ),
            Param(
                "l1_activate_epoch",
                "int",
                None,
                doc="accepted and unused (upstream never adds L1 here)",
            ),
            Param(
                "cur_epoch", "int", None, doc="accepted and unused (upstream never adds L1 here)"
            ),
        ),
        reference="netspresso_trainer.losses.detection.yolo.YOLOFastestLoss (netspresso-trainer==1.4.1); "
        "dog-qiuqiu, Yolo-FastestV2",
        example='RemoteLoss("yolofastest_loss", anchors=[[12, 18, 37, 49, 52, 132], [115, 73, 119, 199, 242, 238]])'
        '({"pred": [p4, p5]}, {"gt": [{"boxes": boxes, "labels": labels}, ...], "img_size": 352, "num_classes": 80})',
        make_example=_make_example,
    ),
)
