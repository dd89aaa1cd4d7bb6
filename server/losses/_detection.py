"""Checks and box helpers shared by the NetsPresso detection losses (``detr_loss``,
``yolov9_loss``): the ``target = {'gt': [...], 'img_size': ..., 'num_classes': C}`` layout every
NetsPresso detector passes, and the xyxy / cxcywh conversions of ``transform_bbox``; and the
aligned cxcywh box areas of ``yolox_loss`` and ``yolofastest_loss``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import InvalidArgument
from ..registry import Input
from ._checks import check_class_indices, require_key, require_tensor

# The target of detr_loss and yolov9_loss: its layout is checked by ground_truth and image_hw.
GT_TARGET = Input(
    "target",
    kind="structure",
    doc="{'gt': [{'boxes': Tensor[n_i, 4] float xyxy pixels, 'labels': Tensor[n_i] int in [0, C)}] * B, "
    "'img_size': int or (H, W), 'num_classes': int C}",
)


def plain_int(value: Any, field: str, minimum: int) -> int:
    """A Python int (a one-element integer tensor is accepted), at least ``minimum``."""
    if (
        isinstance(value, Tensor)
        and value.numel() == 1
        and not value.is_floating_point()
        and value.dtype != torch.bool
    ):
        value = int(value.item())
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument.expected(field, "an int", type(value).__name__)
    if value < minimum:
        raise InvalidArgument.expected(field, f"an int >= {minimum}", value)
    return value


def image_hw(value: Any, field: str = "target.img_size") -> tuple[int, int]:
    """``img_size`` as upstream reads it: an int (square image) or an ``(H, W)`` pair."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise InvalidArgument.expected(field, "an int or an (H, W) pair", f"{len(value)} items")
        return plain_int(value[0], f"{field}[0]", 1), plain_int(value[1], f"{field}[1]", 1)
    side = plain_int(value, field, 1)
    return side, side


def sequence(value: Any, field: str, what: str) -> Sequence[Any]:
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes, Tensor)):
        raise InvalidArgument.expected(field, what, type(value).__name__)
    return value


def ground_truth(
    target: Mapping[str, Any], batch: int, num_classes: int, *, source: str
) -> list[tuple[Tensor, Tensor]]:
    """``target['gt']``: one ``(boxes (n_i, 4) float, labels (n_i,) int in [0, C))`` per image.

    ``source`` names the input whose batch size ``B`` the list must match (``'out.pred'``).
    """
    gts = sequence(
        require_key(target, "gt", "target"),
        "target.gt",
        "a list with one {'boxes', 'labels'} dict per image",
    )
    if len(gts) != batch:
        raise InvalidArgument.expected(
            "target.gt", f"one entry per image, B = {batch} (as {source})", f"{len(gts)} entries"
        )
    images = []
    for i, gt in enumerate(gts):
        where = f"target.gt[{i}]"
        labels = require_tensor(
            require_key(gt, "labels", where), f"{where}.labels", floating=False, dim=1
        )
        if labels.dtype == torch.bool:
            raise InvalidArgument.expected(f"{where}.labels", "an integer tensor", "bool")
        boxes = require_tensor(require_key(gt, "boxes", where), f"{where}.boxes", floating=True)
        if boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.shape[0] != labels.shape[0]:
            raise InvalidArgument.expected(
                f"{where}.boxes",
                f"shape ({labels.shape[0]}, 4), xyxy, one row per label",
                f"shape {list(boxes.shape)}",
            )
        # Before any kernel: an out-of-range label must never reach one_hot or an index on a GPU.
        check_class_indices(labels, num_classes, f"{where}.labels")
        images.append((boxes, labels))
    return images


def first_bad(bad: Tensor) -> tuple[int, ...] | None:
    """Index of the first True of a boolean mask, or None."""
    if not bool(bad.any()):
        return None
    return tuple(int(i) for i in bad.nonzero()[0])


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``transform_bbox(boxes, 'xyxy -> cxcywh')`` (its x1 scalings by 1.0 are exact no-ops)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``transform_bbox(boxes, 'cxcywh -> xyxy')``."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def aligned_areas_cxcywh(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Areas of row-aligned ``(K, 4)`` cxcywh boxes: ``pred``'s, ``target``'s and their
    intersection's (zero where they do not overlap), in YOLOX's ``IOUloss`` order of operations
    (shared by ``yolox_loss`` and ``yolofastest_loss``)."""
    top_left = torch.max(pred[:, :2] - pred[:, 2:] / 2, target[:, :2] - target[:, 2:] / 2)
    bottom_right = torch.min(pred[:, :2] + pred[:, 2:] / 2, target[:, :2] + target[:, 2:] / 2)
    area_p = torch.prod(pred[:, 2:], 1)
    area_g = torch.prod(target[:, 2:], 1)
    overlaps = (top_left < bottom_right).to(top_left.dtype).prod(dim=1)
    area_i = torch.prod(bottom_right - top_left, 1) * overlaps
    return area_p, area_g, area_i


def check_xyxy(boxes: Tensor, field: str, why: str) -> None:
    """Upstream asserts ``x2 >= x1`` and ``y2 >= y1`` (NaN fails it too) in ``transform_bbox``.

    ``boxes`` is ``(..., 4)`` xyxy; the error names the first bad box as ``field[i][j]``.
    """
    at = first_bad(~((boxes[..., 2] >= boxes[..., 0]) & (boxes[..., 3] >= boxes[..., 1])))
    if at is not None:
        raise InvalidArgument.expected(
            field + "".join(f"[{i}]" for i in at),
            f"a box with x2 >= x1 and y2 >= y1 ({why})",
            boxes[at].tolist(),
            upstream="AssertionError",
        )
