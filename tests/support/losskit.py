"""Helpers the loss tests share: a spec's example call, calling a loss as the server does, reading
its output, choosing and attaching the inputs that need gradients."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

import lossd.server.losses  # noqa: F401  (registers every spec)
from lossd.client.wire.codec import call_tensors, join_key
from lossd.server import registry
from lossd.server.engine import bind_inputs
from lossd.server.registry import LossOutput, LossSpec
from tests.support.golden import GOLDEN_TOL, get_path, golden_region, load_golden

# The upstream registries in full: netspresso-trainer 1.4.1's LOSS_DICT (10 criteria) plus the
# `losses` criteria list, fat@9abd3cf's LossFactory (9) and visdet f72e8d1's
# visdet.models.losses exports (12). cross_entropy is both fat's and NetsPresso's: 31 in all.
UPSTREAM_LOSSES = {
    "netspresso": (
        "cross_entropy",
        "seg_cross_entropy",
        "pidnet_loss",
        "yolox_loss",
        "yolofastest_loss",
        "yolov9_loss",
        "retinanet_loss",
        "detr_loss",
        "focal_loss",
        "rtmcc_loss",
        "losses",
    ),
    "fat": (
        "cross_entropy",
        "nll",
        "mse",
        "l1",
        "smooth_l1",
        "bce",
        "bce_with_logits",
        "kl_div",
        "sqr_hinge",
    ),
    "visdet": (
        "CrossEntropyLoss",
        "FocalLoss",
        "QualityFocalLoss",
        "DistributionFocalLoss",
        "L1Loss",
        "SmoothL1Loss",
        "MSELoss",
        "BalancedL1Loss",
        "IoULoss",
        "GIoULoss",
        "GaussianFocalLoss",
        "DiceLoss",
    ),
}


F64 = torch.float64


def example(name: str, dtype=F64):
    """The example call of the loss registered as ``name``, at ``dtype``: (args as a list, kwargs,
    constructor params)."""
    args, kwargs, params = registry.get(name).make_example(dtype)
    return list(args), kwargs, params


def value(out):
    return out.value if isinstance(out, LossOutput) else out


def notes(out) -> list[str]:
    return out.notes if isinstance(out, LossOutput) else []


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def call(name: str, *args, **params):
    """Call through the registry as the engine does: parameters canonicalised, the arguments
    checked against their declaration (errors name them as the loss does: ``target``)."""
    spec = registry.get(name)
    canonical = spec.canonical_params(params)
    bound = bind_inputs(spec, list(args), {}, canonical, by_name=True)
    return spec.fn(*(bound.get(i.name) for i in spec.inputs[: len(args)]), **canonical)


def run_example(spec: LossSpec, dtype: torch.dtype) -> LossOutput:
    """The spec's own example at ``dtype``, run directly: its value is finite and of that dtype."""
    args, kwargs, params = spec.make_example(dtype)
    result = spec.fn(*args, **kwargs, **spec.canonical_params(params))
    assert result.value.dtype == dtype and torch.isfinite(result.value)
    return result


def differentiable_paths(spec: LossSpec, args: Any, kwargs: dict) -> list[str]:
    """Paths of the floating-point tensors of a call that its declaration marks differentiable
    (``args[12].pred`` is under the 13th input, ``kwargs.weight[0]`` under ``weight``)."""
    diff = {i.name for i in spec.inputs if i.differentiable}
    names = [i.name for i in spec.inputs]

    def input_name(path: str) -> str:
        index, key = re.match(r"args\[(\d+)\]|kwargs\.(\w+)", path).groups()
        return names[int(index)] if index is not None else key

    return [
        p for p, t in call_tensors(args, kwargs) if t.is_floating_point() and input_name(p) in diff
    ]


def attach_leaves(obj: Any, path: str, wanted: set[str], leaves: dict[str, torch.Tensor]) -> Any:
    """Rebuild ``obj`` with the tensors at ``wanted`` paths replaced by leaves requiring grad."""
    if isinstance(obj, torch.Tensor):
        if path not in wanted:
            return obj
        leaves[path] = obj.detach().clone().requires_grad_(True)
        return leaves[path]
    if isinstance(obj, (list, tuple)):
        items = [attach_leaves(o, f"{path}[{i}]", wanted, leaves) for i, o in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        return {k: attach_leaves(v, join_key(path, k), wanted, leaves) for k, v in obj.items()}
    return obj


def assert_same_gradients(
    got: torch.Tensor, expected: torch.Tensor, inputs: tuple[torch.Tensor, ...], **tolerance: float
) -> None:
    """The gradients of ``got.sum()`` and ``expected.sum()`` with respect to ``inputs`` agree."""
    for a, b in zip(
        torch.autograd.grad(got.sum(), inputs),
        torch.autograd.grad(expected.sum(), inputs),
        strict=True,
    ):
        torch.testing.assert_close(a, b, **tolerance)


def golden_call(case: dict) -> tuple[str, dict]:
    """The registered loss and constructor parameters of a golden case; a config case in its
    family's format: fat's ``{loss: {name, ...}}``, visdet's ``{type, ...}`` or NetsPresso's
    criteria list (the ``losses`` loss)."""
    config = case.get("config")
    if config is None:
        return case["name"], case["ctor"]
    if isinstance(config, dict) and "type" in config:
        return config["type"], {k: v for k, v in config.items() if k != "type"}
    if isinstance(config, dict) and "loss" in config:
        params = dict(config["loss"])
        return params.pop("name"), params
    return "losses", {"losses": config}


def run_golden(path: Path) -> tuple[dict, Any]:
    """Call a golden case's loss through the registry, in the autocast region upstream ran in,
    and check the loss (its dtype, NaN where upstream's is NaN) and every gradient of its sum
    (None where upstream gives none) against upstream's, within GOLDEN_TOL; (case, result)."""
    case = load_golden(path)
    args, kwargs = case["args"], case["kwargs"]
    leaves = [get_path(args, kwargs, p).requires_grad_(True) for p in case["grad_paths"]]
    name, params = golden_call(case)
    spec = registry.get(name)
    with golden_region(case):
        result = spec.fn(*args, **kwargs, **spec.canonical_params(params))
        loss = value(result)
    tol = GOLDEN_TOL[case["precision"]]
    want = case["expected_loss"]
    assert str(loss.dtype).removeprefix("torch.") == str(case["expected_loss_dtype"]).removeprefix(
        "torch."
    )
    assert bool(torch.isnan(loss).all()) == bool(case.get("expect_nan")), loss
    torch.testing.assert_close(loss, want, **tol, equal_nan=True)
    with golden_region(case):
        grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
    for grad_path, grad in zip(case["grad_paths"], grads, strict=True):
        expected = case["expected_grads"][grad_path]
        if expected is None:
            assert grad is None, f"{grad_path}: upstream gives no gradient"
        else:
            torch.testing.assert_close(
                grad, expected, **tol, msg=lambda m, p=grad_path: f"{p}: {m}"
            )
    return case, result


def assert_refused_then_served(
    endpoint: str, name: str, params: dict, bad: tuple, good: tuple, field: str
) -> None:
    """Through the RPC: ``bad`` args get INVALID_ARGUMENT naming ``field``, and the same server
    then computes ``good`` args."""
    import grpc
    import pytest

    from lossd.client import LossdError, RemoteLoss

    with RemoteLoss(name, endpoint=endpoint, **params) as crit:
        with pytest.raises(LossdError) as info:
            crit(*bad)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert info.value.field == field, (
            info.value.field,
            info.value.details,
        )
        assert torch.isfinite(crit(*good)).all()
