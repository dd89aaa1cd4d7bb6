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


BUILDERS: dict[str, Callable[[int, torch.Generator], Workload]] = {
    "cross_entropy": _cross_entropy,
    "FocalLoss": _focal,
    "GIoULoss": _giou,
    "yolox_loss": _yolox,
}

# SimOTA's cost grows with anchors x boxes; past this the row measures the assigner, not lossd.
MAX_SIZE = {"yolox_loss": 16 << 20}
# --quick stays under two minutes: the large rows of the slow-to-compute losses are for the full run.
QUICK_MAX_SIZE = {"yolox_loss": 1 << 20, "GIoULoss": 1 << 20, "FocalLoss": 1 << 20}


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
