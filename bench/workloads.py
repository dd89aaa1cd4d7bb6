"""Benchmark inputs: for each loss, a call whose tensors add up to about ``size`` bytes.

A workload is ``(args, kwargs, params)`` with the differentiable inputs marked
``requires_grad``; the same objects feed the floor (their byte count), the local evaluation and
the remote one, so every column of a row moves or computes the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Workload:
    loss: str
    size: int  # nominal payload, bytes
    args: list[Any]
    kwargs: dict[str, Any]
    params: dict[str, Any]
    shape: str  # human-readable description of the main input

    def tensors(self) -> list[Tensor]:
        out: list[Tensor] = []

        def walk(obj: Any) -> None:
            if isinstance(obj, Tensor):
                out.append(obj)
            elif isinstance(obj, (list, tuple)):
                for item in obj:
                    walk(item)
            elif isinstance(obj, dict):
                for item in obj.values():
                    walk(item)

        walk(self.args)
        walk(self.kwargs)
        return out

    @property
    def request_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def grad_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors() if t.requires_grad)

    def fresh(self) -> Workload:
        """Inputs with their ``.grad`` cleared (a training step starts from none)."""
        for t in self.tensors():
            t.grad = None
        return self


def _cross_entropy(size: int, gen: torch.Generator) -> Workload:
    classes = 1000 if size >= 1 << 20 else 100 if size >= 16 << 10 else 16
    n = max(1, size // (4 * classes))
    logits = torch.randn(n, classes, generator=gen).requires_grad_()
    target = torch.randint(0, classes, (n,), generator=gen)
    return Workload("cross_entropy", size, [logits, target], {}, {}, f"{n}x{classes} f32")


def _focal(size: int, gen: torch.Generator) -> Workload:
    classes = 80
    n = max(1, size // (4 * classes))
    pred = torch.randn(n, classes, generator=gen).requires_grad_()
    target = torch.randint(0, classes + 1, (n,), generator=gen)
    return Workload("FocalLoss", size, [pred, target], {}, {}, f"{n}x{classes} f32")


def _boxes(n: int, gen: torch.Generator) -> Tensor:
    xy = torch.rand(n, 2, generator=gen) * 600
    wh = torch.rand(n, 2, generator=gen) * 100 + 1
    return torch.cat([xy, xy + wh], dim=1)


def _giou(size: int, gen: torch.Generator) -> Workload:
    n = max(1, size // 32)  # pred and target, 4 float32 each
    target = _boxes(n, gen)
    pred = (target + torch.randn(n, 4, generator=gen) * 5).requires_grad_()
    return Workload("GIoULoss", size, [pred, target], {}, {}, f"{n}x4 f32 x2")


def _yolox(size: int, gen: torch.Generator) -> Workload:
    classes, images, img = 80, 8, 640
    channels = 5 + classes
    # One level, square, sized to the payload; stride = img / side.
    side = max(2, int(math.sqrt(size / (4 * channels * images))))
    level = (torch.randn(images, channels, side, side, generator=gen) * 0.5).requires_grad_()
    gt = []
    for _ in range(images):
        boxes = _boxes(6, gen).clamp(max=img - 1).double()
        gt.append({"boxes": boxes, "labels": torch.randint(0, classes, (6,), generator=gen)})
    target = {"gt": gt, "img_size": img, "num_classes": classes}
    return Workload(
        "yolox_loss",
        size,
        [{"pred": [level]}, target],
        {},
        {"l1_activate_epoch": 0},
        f"{images}x{channels}x{side}x{side} f32",
    )


def _gt(images: int, per_image: int, img: int, classes: int, gen: torch.Generator) -> list[dict]:
    gt = []
    for i in range(images):
        n = 0 if i == images - 1 and images > 1 else per_image  # the last image has no box
        xy = torch.rand(n, 2, generator=gen) * img * 0.6
        wh = (0.1 + torch.rand(n, 2, generator=gen) * 0.3) * img
        gt.append(
            {
                "boxes": torch.cat([xy, xy + wh], dim=1),
                "labels": torch.randint(0, classes, (n,), generator=gen),
            }
        )
    return gt


def _yolov9(size: int, gen: torch.Generator) -> Workload:
    # Small payloads keep the 10 anchor points upstream's top-10 needs with a slimmer head.
    small = size < 64 << 10
    classes, reg_max, images = (4, 4, 1) if small else (80, 16, 8)
    channels = 4 * reg_max + classes
    # One level, square, stride 8, sized to the payload.
    side = max(4, int(math.sqrt(size / (4 * channels * images))))
    level = torch.randn(images, channels, side, side, generator=gen).requires_grad_()
    img = 8 * side
    target = {"gt": _gt(images, 6, img, classes, gen), "img_size": img, "num_classes": classes}
    return Workload(
        "yolov9_loss",
        size,
        [{"pred": [level]}, target],
        {},
        {"l1_activate_epoch": None, "reg_max": reg_max},
        f"{images}x{channels}x{side}x{side} f32",
    )


def _detr(size: int, gen: torch.Generator) -> Workload:
    # RT-DETR's layout: the last layer, 2 auxiliary and 2 denoising layers (2 groups).
    small = size < 64 << 10
    classes, per_image = (4, 2) if small else (80, 6)
    images = 1 if size < 1 << 20 else 8
    groups, num_dn = 2, 2 * 2 * per_image
    # Payload: 3 layers of Q queries and 2 denoising layers, 4 + C floats per query and image.
    queries = max(8, (size // (4 * (4 + classes) * images) - 2 * num_dn) // 3)

    def layer(q: int) -> tuple[Tensor, Tensor]:
        boxes = torch.cat(
            [
                0.2 + 0.6 * torch.rand(images, q, 2, generator=gen),
                0.05 + 0.3 * torch.rand(images, q, 2, generator=gen),
            ],
            -1,
        )
        return boxes.requires_grad_(), torch.randn(
            images, q, classes, generator=gen
        ).requires_grad_()

    main_boxes, main_logits = layer(queries)
    pred = torch.cat([main_boxes, main_logits], -1).detach().requires_grad_()
    aux = [dict(zip(("pred_boxes", "pred_logits"), layer(queries), strict=True)) for _ in range(2)]
    dn = [dict(zip(("pred_boxes", "pred_logits"), layer(num_dn), strict=True)) for _ in range(2)]
    gt = _gt(images, per_image, 640, classes, gen)
    positive = tuple(
        torch.cat([torch.arange(g["labels"].shape[0]) + k * 2 * per_image for k in range(groups)])
        for g in gt
    )
    out = {
        "pred": pred,
        "aux_pred": aux,
        "dn_aux_pred": dn,
        "dn_meta": {
            "dn_positive_idx": positive,
            "dn_num_group": groups,
            "dn_num_split": [num_dn, queries],
        },
    }
    params = {
        "matcher": {
            "type": "HungarianMatcher",
            "weight_dict": {"cost_class": 2, "cost_bbox": 5, "cost_giou": 2},
            "alpha": 0.25,
            "gamma": 2.0,
            "use_focal_loss": True,
        },
        "weight_dict": {"loss_vfl": 1, "loss_bbox": 5, "loss_giou": 2},
        "losses": ["vfl", "boxes"],
        "alpha": 0.75,
    }
    target = {"gt": gt, "img_size": 640, "num_classes": classes}
    return Workload(
        "detr_loss", size, [out, target], {}, params, f"{images}x{queries}x{4 + classes} f32 x3"
    )


def _seg_cross_entropy(size: int, gen: torch.Generator) -> Workload:
    classes, images = 19, 4
    # (B, C, h, w) logits and (B, 2h, 2w) int64 labels: 4 * C + 8 * 4 bytes per logit pixel.
    side = max(1, int(math.sqrt(size / (images * (4 * classes + 32)))))
    pred = torch.randn(images, classes, side, side, generator=gen).requires_grad_()
    labels = torch.randint(0, classes, (images, 2 * side, 2 * side), generator=gen)
    return Workload(
        "seg_cross_entropy",
        size,
        [{"pred": pred}, {"target": labels}],
        {},
        {},
        f"{images}x{classes}x{side}x{side} f32",
    )


def _yolofastest(size: int, gen: torch.Generator) -> Workload:
    classes, images, anchors, img = 80, 8, 3, 640
    channels = 5 + classes
    side = max(2, int(math.sqrt(size / (4 * anchors * channels * images))))
    level = (
        torch.randn(images, anchors, channels, side, side, generator=gen) * 0.5
    ).requires_grad_()
    target = {
        "gt": _gt(images, 6, img, classes, gen),
        "img_size": img,
        "num_classes": classes,
    }
    return Workload(
        "yolofastest_loss",
        size,
        [{"pred": [level]}, target],
        {},
        {"anchors": [[12.0, 18.0, 37.0, 49.0, 52.0, 132.0]]},
        f"{images}x{anchors}x{channels}x{side}x{side} f32",
    )


def _rtmcc(size: int, gen: torch.Generator) -> Workload:
    keypoints = 17
    n = max(1, size // (4 * keypoints * 1024))
    pred = torch.randn(n, keypoints, 1024, generator=gen).requires_grad_()
    xy = torch.rand(n, keypoints, 2, generator=gen) * 256
    visible = (torch.rand(n, keypoints, 1, generator=gen) > 0.2).float() * 2
    return Workload(
        "rtmcc_loss",
        size,
        [{"pred": pred}, {"keypoints": torch.cat([xy, visible], -1)}],
        {},
        {},
        f"{n}x{keypoints}x1024 f32",
    )


def _gaussian_focal(size: int, gen: torch.Generator) -> Workload:
    classes, images = 80, 4
    side = max(1, int(math.sqrt(size / (8 * classes * images))))  # pred and target
    pred = torch.rand(images, classes, side, side, generator=gen).mul(0.98).add(0.01)
    target = torch.rand(images, classes, side, side, generator=gen) ** 8
    target[:, :, side // 2, side // 2] = 1.0
    return Workload(
        "GaussianFocalLoss",
        size,
        [pred.requires_grad_(), target],
        {"avg_factor": torch.tensor(images * classes)},
        {},
        f"{images}x{classes}x{side}x{side} f32 x2",
    )


def _dice(size: int, gen: torch.Generator) -> Workload:
    side = 28  # Mask R-CNN's mask size
    n = max(1, size // (8 * side * side))  # logits and masks
    pred = torch.randn(n, side, side, generator=gen).requires_grad_()
    target = (torch.rand(n, side, side, generator=gen) > 0.5).float()
    return Workload("DiceLoss", size, [pred, target], {}, {}, f"{n}x{side}x{side} f32 x2")


BUILDERS: dict[str, Callable[[int, torch.Generator], Workload]] = {
    "cross_entropy": _cross_entropy,
    "FocalLoss": _focal,
    "GIoULoss": _giou,
    "yolox_loss": _yolox,
    "yolov9_loss": _yolov9,
    "detr_loss": _detr,
    "seg_cross_entropy": _seg_cross_entropy,
    "yolofastest_loss": _yolofastest,
    "rtmcc_loss": _rtmcc,
    "GaussianFocalLoss": _gaussian_focal,
    "DiceLoss": _dice,
}

# SimOTA's cost grows with anchors x boxes; past this the row measures the assigner, not lossd.
MAX_SIZE = {
    "yolox_loss": 16 << 20,
    "yolov9_loss": 16 << 20,
    "detr_loss": 16 << 20,
    "yolofastest_loss": 16 << 20,
}
# --quick stays under two minutes: the large rows of the slow-to-compute losses are for the full run.
QUICK_MAX_SIZE = {
    "yolox_loss": 1 << 20,
    "GIoULoss": 1 << 20,
    "FocalLoss": 1 << 20,
    "yolov9_loss": 64 << 10,
    "detr_loss": 64 << 10,
}


def build(loss: str, size: int, seed: int = 0) -> Workload:
    return BUILDERS[loss](size, torch.Generator().manual_seed(seed))


def to_device(args: list[Any], device: torch.device) -> list[Any]:
    """The same inputs on ``device`` (the engine marks what needs a gradient itself)."""
    from lossd.client.wire import codec

    return codec.map_tensors(args, lambda t: t.detach().to(device))


def grad_paths(args: list[Any], original: list[Any] | None = None) -> list[str]:
    """Wire paths (``args[0].pred[0]``) of the inputs that require a gradient in ``original``."""
    from lossd.client.wire import codec

    return [
        p
        for p, t in codec.call_tensors(original if original is not None else args, {})
        if t.requires_grad
    ]
