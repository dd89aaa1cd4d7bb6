"""visdet / MMDetection losses, what they share and the regression ones: registration, golden
values from upstream through the engine, the shared reduction chain (weight, avg_factor and its
float32 eps, loss_weight), L1 / SmoothL1 / MSE / BalancedL1 and IoU / GIoU by hand and at their
edges (empty inputs, the all-zero-weight shortcut, fp16 boxes), and devices.

CrossEntropy, Focal, QualityFocal and DistributionFocal, and the float64 gradcheck of every loss:
test_visdet_classification.py; GaussianFocalLoss and DiceLoss: test_visdet_dense.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import lossd.server.losses  # noqa: F401  (registers every spec)
from lossd.server import registry
from lossd.server._reduction import AVG_FACTOR_EPS
from lossd.server.engine import AutocastPolicy, Engine
from lossd.server.errors import InvalidArgument
from lossd.server.losses import visdet
from lossd.server.registry import LossOutput
from tests.support.golden import (
    GOLDEN_TOL,
    golden_autocast,
    golden_files,
    load_golden,
)
from tests.support.losskit import (
    F64,
    UPSTREAM_LOSSES,
    call,
    example,
    gen,
    golden_call,
    notes,
    value,
)

# GaussianFocalLoss and DiceLoss (visdet/dense) have their own tests: test_visdet_dense.py
VISDET_LOSSES = tuple(
    n for n in UPSTREAM_LOSSES["visdet"] if n not in ("GaussianFocalLoss", "DiceLoss")
)


def boxes(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VISDET_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spec_registered_and_example_runs(name, dtype):
    spec = registry.get(name)
    assert spec.families == ("visdet",)
    assert spec.example.startswith(f'RemoteLoss("{name}"')
    assert spec.reference and spec.summary
    args, kwargs, params = spec.make_example(dtype)
    out = value(spec.fn(*args, **kwargs, **spec.canonical_params(params)))
    assert out.dtype == dtype
    assert out.dim() == 0 and torch.isfinite(out) and out.item() > 0
    again = value(spec.fn(*spec.make_example(dtype)[0], **spec.canonical_params(params)))
    assert torch.equal(out, again)  # deterministic


@pytest.mark.parametrize("name", VISDET_LOSSES)
def test_spec_params_have_upstream_defaults(name):
    canonical = registry.get(name).canonical_params({})
    assert canonical["reduction"] == "mean" and canonical["loss_weight"] == 1.0
    with pytest.raises(InvalidArgument):
        registry.get(name).canonical_params({"reduction": "avg"})


# ------------------------------------------------------------------------------------------
# Golden values recorded from upstream visdet f72e8d1 (each case: tests/losses/test_golden.py)
# ------------------------------------------------------------------------------------------

GOLDEN_FILES = [p for p in golden_files("visdet")]


@pytest.mark.parametrize(
    "path", [p for p in GOLDEN_FILES if "config" not in load_golden(p)], ids=lambda p: p.stem
)
def test_golden_through_engine(path):
    """The declarations (dtypes, symbolic shapes, kinds) accept upstream's calls; grads by path."""
    case = load_golden(path)
    region = golden_autocast(case)
    result = Engine("cpu").evaluate(
        case["name"],
        case["ctor"],
        list(case["args"]),
        dict(case["kwargs"]),
        grad_paths=case["grad_paths"],
        autocast=None if region is None else AutocastPolicy(*region),
    )
    assert result.value.dtype == case["expected_loss"].dtype
    tol = GOLDEN_TOL["float64"]  # the engine's numbers are upstream's to float64 precision
    assert_close(result.value, case["expected_loss"], **tol)
    for p in case["grad_paths"]:
        assert_close(result.grads[p], case["expected_grads"][p], **tol)


@pytest.mark.parametrize(
    ("name", "args", "params"),
    [
        (
            "CrossEntropyLoss",
            (torch.zeros(2, 3, 2, 2), torch.rand(2, 2, 2), torch.tensor([0, 2])),
            {"use_mask": True},
        ),
        (
            "CrossEntropyLoss",
            (torch.zeros(4, 3), torch.tensor([0, 3, -1, 2])),
            {"use_sigmoid": True},
        ),
        ("FocalLoss", (torch.zeros(4, 3), torch.eye(4, 3)), {}),
        ("QualityFocalLoss", (torch.zeros(4, 3), torch.rand(4, 3)), {}),
        ("L1Loss", (torch.zeros(0, 4), torch.zeros(0, 4)), {}),
        ("IoULoss", (torch.zeros(0, 4), torch.zeros(0, 4)), {"mode": "square"}),
    ],
    ids=["ce_mask", "ce_sigmoid", "focal_onehot", "qfl_dense", "l1_empty", "iou_empty"],
)
def test_engine_accepts_other_upstream_forms(name, args, params):
    result = Engine("cpu").evaluate(name, params, list(args))
    assert torch.equal(result.value.isnan(), value(call(name, *args, **params)).isnan())


def test_golden_inputs_not_mutated():
    for path in GOLDEN_FILES:
        case = load_golden(path)
        before = _clone(case["args"])
        name, params = golden_call(case)
        call(name, *case["args"], **params)
        for a, b in zip(before, case["args"], strict=True):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b)
            else:
                assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------------------
# Shared reduction chain: weight -> reduce -> avg_factor (+ float32 eps) -> loss_weight
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VISDET_LOSSES)
def test_reductions_and_override(name):
    args, _, _ = example(name)
    none = value(call(name, *args, reduction="none"))
    assert none.shape == args[0].shape[: none.dim()]
    assert_close(value(call(name, *args)), none.mean())
    assert_close(value(call(name, *args, reduction="sum")), none.sum())
    # reduction_override replaces the constructor's reduction for this call
    assert_close(value(call(name, *args, None, None, "sum", reduction="none")), none.sum())
    assert_close(value(call(name, *args, None, None, "none", reduction="sum")), none)
    assert_close(value(call(name, *args, None, None, "mean", reduction="sum")), none.mean())
    with pytest.raises(InvalidArgument, match="reduction_override"):
        call(name, *args, None, None, "avg")
    with pytest.raises(InvalidArgument):
        visdet_fn = registry.get(name).fn
        visdet_fn(*args, reduction="max")


@pytest.mark.parametrize("name", VISDET_LOSSES)
def test_avg_factor_and_loss_weight(name):
    args, _, _ = example(name)
    none = value(call(name, *args, reduction="none"))
    got = value(call(name, *args, None, 7))
    assert_close(got, none.sum() / (7 + AVG_FACTOR_EPS))
    assert got.item() != pytest.approx(none.sum().item() / 7, rel=1e-12, abs=0)  # the eps is there
    # avg_factor = 0 divides by float32's eps: finite, never inf
    assert_close(value(call(name, *args, None, 0)), none.sum() / AVG_FACTOR_EPS)
    # avg_factor as a 1-element tensor, as detectors pass it
    assert_close(value(call(name, *args, None, torch.tensor(7.0, dtype=F64))), got)
    # 'none' ignores avg_factor
    assert_close(value(call(name, *args, None, 7, "none")), none)
    with pytest.raises(InvalidArgument, match="avg_factor can not be used"):
        call(name, *args, None, 7, "sum")
    assert_close(value(call(name, *args, loss_weight=2.5)), 2.5 * none.mean())
    assert_close(value(call(name, *args, None, 7, loss_weight=-3.0)), -3.0 * got)


def test_avg_factor_must_be_a_number():
    args, _, _ = example("L1Loss")
    with pytest.raises(InvalidArgument, match="avg_factor"):
        call("L1Loss", *args, None, "7")  # avg_factor is a declared number: checked by the engine
    with pytest.raises(InvalidArgument, match="avg_factor"):
        call("L1Loss", *args, None, torch.ones(2))


# ------------------------------------------------------------------------------------------
# L1 / SmoothL1 / MSE / BalancedL1
# ------------------------------------------------------------------------------------------

PRED = torch.tensor([[0.5, -2.0, 3.0, 0.25]], dtype=F64)
TARGET = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=F64)


def test_l1_known_values():
    assert_close(value(call("L1Loss", PRED, TARGET)), torch.tensor(5.75 / 4, dtype=F64))
    assert_close(
        value(call("L1Loss", PRED, TARGET, reduction="sum")), torch.tensor(5.75, dtype=F64)
    )
    w = torch.tensor([[1.0, 0.0, 2.0, 4.0]], dtype=F64)
    # zero-weighted elements still count in the mean
    assert_close(
        value(call("L1Loss", PRED, TARGET, w)), torch.tensor((0.5 + 6.0 + 1.0) / 4, dtype=F64)
    )


@pytest.mark.parametrize(
    ("beta", "expected"),
    [
        # |d| = .5, 2, 3, .25 -> 0.5 d^2 / beta below beta, |d| - beta / 2 above
        (1.0, [0.125, 1.5, 2.5, 0.03125]),
        (2.0, [0.0625, 1.0, 2.0, 0.015625]),
        (0.25, [0.375, 1.875, 2.875, 0.125]),
    ],
)
def test_smooth_l1_known_values(beta, expected):
    got = value(call("SmoothL1Loss", PRED, TARGET, beta=beta, reduction="none"))
    assert_close(got, torch.tensor([expected], dtype=F64))


def test_smooth_l1_beta_must_be_positive():
    with pytest.raises(InvalidArgument, match="beta"):
        registry.get("SmoothL1Loss").canonical_params({"beta": 0.0})
    with pytest.raises(InvalidArgument, match="beta"):
        call("SmoothL1Loss", PRED, TARGET, beta=-1.0)  # a declared range: checked once


def test_mse_known_values():
    got = value(call("MSELoss", PRED, TARGET, reduction="none"))
    assert_close(got, torch.tensor([[0.25, 4.0, 9.0, 0.0625]], dtype=F64))
    assert_close(value(call("MSELoss", PRED, TARGET)), torch.tensor(13.3125 / 4, dtype=F64))


def test_mse_broadcasts_target_like_f_mse_loss():
    target = torch.tensor([[1.0]], dtype=F64)
    got = value(call("MSELoss", PRED, target, reduction="none"))
    assert_close(got, (PRED - 1.0) ** 2)
    with pytest.raises(InvalidArgument, match="target"):
        call("MSELoss", PRED, torch.zeros(3, dtype=F64))


@pytest.mark.parametrize(
    ("alpha", "gamma", "beta"), [(0.5, 1.5, 1.0), (0.3, 2.0, 2.5), (1.0, 0.5, 0.5)]
)
def test_balanced_l1_known_values(alpha, gamma, beta):
    got = value(
        call("BalancedL1Loss", PRED, TARGET, alpha=alpha, gamma=gamma, beta=beta, reduction="none")
    )
    b = math.exp(gamma / alpha) - 1
    expected = []
    for d in (0.5, 2.0, 3.0, 0.25):
        if d < beta:
            expected.append(alpha / b * (b * d + 1) * math.log(b * d / beta + 1) - alpha * d)
        else:
            expected.append(gamma * d + gamma / b - alpha * beta)
    assert_close(got, torch.tensor([expected], dtype=F64))


def test_balanced_l1_is_continuous_at_beta():
    # Libra R-CNN picks gamma/b - alpha*beta so the two branches meet at |d| = beta.
    below = value(
        call("BalancedL1Loss", torch.tensor([1.0 - 1e-9], dtype=F64), torch.zeros(1, dtype=F64))
    )
    above = value(call("BalancedL1Loss", torch.tensor([1.0], dtype=F64), torch.zeros(1, dtype=F64)))
    assert_close(below, above, rtol=1e-7, atol=1e-7)


def test_balanced_l1_degenerate_params():
    with pytest.raises(InvalidArgument, match="alpha"):
        visdet.balanced_l1_loss(PRED, TARGET, alpha=0.0)
    with pytest.raises(InvalidArgument, match="gamma"):
        visdet.balanced_l1_loss(PRED, TARGET, gamma=0.0)
    with pytest.raises(InvalidArgument, match="beta"):
        call("BalancedL1Loss", PRED, TARGET, beta=0.0)  # a declared range: checked once


@pytest.mark.parametrize("name", ["L1Loss", "SmoothL1Loss", "MSELoss", "BalancedL1Loss"])
def test_regression_weight_broadcasting(name):
    gen_ = gen(3)
    pred, target = (
        torch.randn(3, 4, generator=gen_, dtype=F64),
        torch.randn(3, 4, generator=gen_, dtype=F64),
    )
    none = value(call(name, pred, target, reduction="none"))
    w = torch.rand(3, 4, generator=gen_, dtype=F64)
    assert_close(value(call(name, pred, target, w, reduction="sum")), (none * w).sum())
    # (N, 1) broadcasts over the 4 coordinates
    w1 = torch.rand(3, 1, generator=gen_, dtype=F64)
    assert_close(value(call(name, pred, target, w1)), (none * w1).mean())
    # an (N,) weight does not broadcast against (N, 4): upstream fails, lossd says why
    with pytest.raises(InvalidArgument, match="weight") as err:
        call(name, pred, target, torch.ones(3, dtype=F64))
    assert err.value.field == "weight"
    assert "[3, 4]" in err.value.message and "[3]" in err.value.message


@pytest.mark.parametrize("name", ["L1Loss", "SmoothL1Loss", "BalancedL1Loss"])
def test_regression_shape_mismatch(name):
    with pytest.raises(InvalidArgument, match="target"):
        call(name, torch.zeros(3, 4, dtype=F64), torch.zeros(3, 2, dtype=F64))


@pytest.mark.parametrize("name", ["L1Loss", "SmoothL1Loss", "BalancedL1Loss"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_regression_empty_gives_zero_with_graph(name, reduction):
    pred = torch.zeros(0, 4, dtype=F64, requires_grad=True)
    out = call(name, pred, torch.zeros(0, 4, dtype=F64), reduction=reduction, loss_weight=3.0)
    v = value(out)
    assert v.dim() == 0 and v.item() == 0.0 and not notes(out)
    (g,) = torch.autograd.grad(v, pred)
    assert g.shape == (0, 4)


def test_regression_empty_target_short_circuits_before_shape_check():
    # upstream checks target.numel() == 0 first: pred.sum() * 0
    pred = torch.ones(2, 4, dtype=F64, requires_grad=True)
    v = value(call("L1Loss", pred, torch.zeros(0, dtype=F64)))
    assert v.item() == 0.0 and v.requires_grad


def test_mse_empty_is_nan_with_note():
    out = call("MSELoss", torch.zeros(0, 4, dtype=F64), torch.zeros(0, 4, dtype=F64))
    assert torch.isnan(value(out)) and any("NaN" in n for n in notes(out))
    assert (
        value(
            call(
                "MSELoss",
                torch.zeros(0, 4, dtype=F64),
                torch.zeros(0, 4, dtype=F64),
                reduction="sum",
            )
        ).item()
        == 0.0
    )


@pytest.mark.parametrize("name", ["L1Loss", "SmoothL1Loss", "IoULoss", "GIoULoss"])
def test_all_zero_weight_shortcut(name):
    args, _, _ = example(name)
    pred = args[0].clone().requires_grad_(True)
    weight = torch.zeros(pred.size(0), dtype=F64)
    if name in ("L1Loss", "SmoothL1Loss"):
        weight = torch.zeros_like(pred)
    out = call(name, pred, args[1], weight, loss_weight=5.0)
    assert isinstance(out, LossOutput) and any("short-circuits" in n for n in out.notes)
    assert out.value.dim() == 0 and out.value.item() == 0.0
    (g,) = torch.autograd.grad(out.value, pred)
    assert torch.equal(g, torch.zeros_like(pred))


@pytest.mark.parametrize("name", ["L1Loss", "SmoothL1Loss", "IoULoss", "GIoULoss"])
def test_negative_weights_shortcut_returns_weighted_pred_sum(name):
    # "no weight > 0" includes negative weights: upstream returns (pred * weight).sum(), not 0,
    # and ignores loss_weight.
    args, _, _ = example(name)
    pred = args[0]
    weight = -torch.ones(pred.size(0), dtype=F64)
    got = value(call(name, pred, args[1], weight, loss_weight=5.0))
    assert_close(got, -pred.sum())


def test_iou_shortcut_not_taken_with_reduction_none():
    args, _, _ = example("IoULoss")
    out = call("IoULoss", *args, torch.zeros(6, dtype=F64), reduction="none")
    assert not notes(out)
    assert_close(value(out), torch.zeros(6, dtype=F64))
    # GIoU short-circuits whatever the reduction
    out = call("GIoULoss", *args, torch.zeros(6, dtype=F64), reduction="none")
    assert value(out).dim() == 0 and notes(out)


@pytest.mark.parametrize("name", ["MSELoss", "BalancedL1Loss"])
def test_no_shortcut_for_mse_and_balanced_l1(name):
    args, _, _ = example(name)
    out = call(name, *args, torch.zeros_like(args[0]), loss_weight=5.0)
    assert not notes(out) and value(out).item() == 0.0


def test_some_positive_weight_disables_shortcut():
    w = torch.tensor([[0.0, 0.0, 0.0, 2.0]], dtype=F64)
    out = call("L1Loss", PRED, TARGET, w, loss_weight=3.0)
    assert not notes(out)
    assert_close(value(out), torch.tensor(3.0 * 0.5 / 4, dtype=F64))


# ------------------------------------------------------------------------------------------
# IoULoss / GIoULoss
# ------------------------------------------------------------------------------------------

UNIT = [0.0, 0.0, 1.0, 1.0]
GIOU_CASES = {
    "identical": ([1.0, 2.0, 4.0, 6.0], [1.0, 2.0, 4.0, 6.0], 0.0),
    "quarter_inside": (UNIT, [0.0, 0.0, 2.0, 2.0], 0.75),
    "side_by_side": (UNIT, [1.0, 0.0, 2.0, 1.0], 1.0),
    "diagonal": (UNIT, [1.0, 1.0, 2.0, 2.0], 1.5),
    "zero_area": ([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], 1.0),
}


@pytest.mark.parametrize("case", list(GIOU_CASES), ids=str)
def test_giou_known_values(case):
    p, t, expected = GIOU_CASES[case]
    got = value(call("GIoULoss", boxes(p), boxes(t), reduction="none"))
    assert_close(got, torch.tensor([expected], dtype=F64), rtol=0, atol=1e-12)


def test_giou_far_apart_approaches_two():
    got = value(call("GIoULoss", boxes(UNIT), boxes([99.0, 99.0, 100.0, 100.0])))
    assert 1.99 < got.item() < 2.0


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        # two zero-area boxes side by side: union 0 -> eps = 0.5, enclosure 1:
        # GIoU = 0 - (1 - 0.5) / 1
        ([1.0, 0.0, 1.0, 1.0], 1.5),
        # stacked on one vertical line: the enclosure (area 0) is clamped too:
        # GIoU = 0 - (0.5 - 0.5) / 0.5
        ([0.0, 2.0, 0.0, 3.0], 1.0),
    ],
    ids=["side-by-side", "stacked"],
)
def test_giou_eps_clamps_union_and_enclosure(target, expected):
    pred = boxes([0.0, 0.0, 0.0, 1.0])
    got = value(call("GIoULoss", pred, boxes(target), eps=0.5, reduction="none"))
    assert_close(got, torch.tensor([expected], dtype=F64))


@pytest.mark.parametrize(
    ("mode", "expected"), [("linear", 0.75), ("square", 1 - 0.0625), ("log", math.log(4.0))]
)
def test_iou_modes(mode, expected):
    got = value(call("IoULoss", boxes(UNIT), boxes([0.0, 0.0, 2.0, 2.0]), mode=mode))
    assert_close(got, torch.tensor(expected, dtype=F64))


def test_iou_linear_flag_overrides_mode_with_note():
    out = call("IoULoss", boxes(UNIT), boxes([0.0, 0.0, 2.0, 2.0]), linear=True, mode="square")
    assert_close(value(out), torch.tensor(0.75, dtype=F64))
    assert any("deprecated" in n for n in notes(out))


@pytest.mark.parametrize(("eps", "expected"), [(1e-6, -math.log(1e-6)), (0.1, -math.log(0.1))])
def test_iou_disjoint_is_clamped_to_eps(eps, expected):
    got = value(call("IoULoss", boxes(UNIT), boxes([5.0, 5.0, 6.0, 6.0]), eps=eps))
    assert_close(got, torch.tensor(expected, dtype=F64))


def test_iou_bad_mode():
    with pytest.raises(InvalidArgument, match="mode"):
        call("IoULoss", boxes(UNIT), boxes(UNIT), mode="cubic")  # a declared choice


@pytest.mark.parametrize("name", ["IoULoss", "GIoULoss"])
def test_box_weight_forms(name):
    args, _, _ = example(name)
    none = value(call(name, *args, reduction="none"))
    w = torch.linspace(0.5, 2.0, 6, dtype=F64)
    assert_close(value(call(name, *args, w, reduction="sum")), (none * w).sum())
    w4 = torch.rand(6, 4, generator=gen(5), dtype=F64)
    assert_close(value(call(name, *args, w4, reduction="sum")), (none * w4.mean(-1)).sum())
    with pytest.raises(InvalidArgument, match="weight"):
        call(name, *args, torch.ones(6, 2, dtype=F64))
    with pytest.raises(InvalidArgument, match="weight"):
        call(name, *args, torch.ones(5, dtype=F64))


@pytest.mark.parametrize("name", ["IoULoss", "GIoULoss"])
def test_box_shapes_validated(name):
    with pytest.raises(InvalidArgument, match="pred"):
        call(name, torch.zeros(3, 5, dtype=F64), torch.zeros(3, 5, dtype=F64))
    with pytest.raises(InvalidArgument, match="target"):
        call(name, torch.zeros(3, 4, dtype=F64), torch.zeros(2, 4, dtype=F64))


@pytest.mark.parametrize("name", ["IoULoss", "GIoULoss"])
def test_box_empty_mean_is_nan_sum_is_zero(name):
    empty = torch.zeros(0, 4, dtype=F64)
    out = call(name, empty, empty)
    assert torch.isnan(value(out)) and any("NaN" in n for n in notes(out))
    assert value(call(name, empty, empty, reduction="sum")).item() == 0.0
    assert value(call(name, empty, empty, reduction="none")).shape == (0,)


@pytest.mark.parametrize("name", ["IoULoss", "GIoULoss"])
def test_box_fp16_computed_in_fp32_and_cast_back(name):
    p, t = (
        boxes(UNIT, [0.0, 0.0, 300.0, 300.0]),
        boxes([0.0, 0.0, 2.0, 2.0], [100.0, 100.0, 400.0, 400.0]),
    )
    half = value(call(name, p.half(), t.half(), reduction="none"))
    assert half.dtype == torch.float16
    # only pred is upcast: the fp16 target's area (90000 > 65504) still overflows, as upstream
    ref = value(call(name, p.float(), t.half(), reduction="none"))
    assert ref.dtype == torch.float32
    assert_close(half, ref.half())
    assert_close(
        half[0], torch.tensor(0.75 if name == "GIoULoss" else math.log(4.0), dtype=torch.float16)
    )


# ------------------------------------------------------------------------------------------
# Devices
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VISDET_LOSSES)
def test_device_agnostic(name, device):
    args, kwargs, params = registry.get(name).make_example(torch.float32)
    moved = [
        a.to(device) if isinstance(a, torch.Tensor) else tuple(x.to(device) for x in a)
        for a in args
    ]
    out = value(call(name, *moved, **kwargs, **params))
    assert out.device.type == device.type
    ref = value(call(name, *args, **kwargs, **params))
    assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["IoULoss", "GIoULoss"])
def test_box_fp16_pred_with_fp32_target_returns_fp32_as_upstream(name):
    # Upstream (mmdet bbox_overlaps, then 1 - ious / -log) is plain torch arithmetic on the
    # pair, so a float16 pred against a float32 target promotes to float32, as does its loss.
    p = boxes(UNIT, [0.0, 0.0, 300.0, 300.0])
    t = boxes([0.0, 0.0, 2.0, 2.0], [100.0, 100.0, 400.0, 400.0])
    mixed = value(call(name, p.half(), t.float(), reduction="none"))
    assert mixed.dtype == torch.promote_types(torch.float16, torch.float32) == torch.float32
    ref = value(call(name, p.half().float(), t.float(), reduction="none"))  # the same numbers
    assert_close(mixed, ref)
    mean = value(call(name, p.half(), t.float()))
    assert mean.dtype == torch.float32
