"""fat trainer losses: golden values from upstream, hand-derived values, torch parity, edge cases."""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

import lossd.server.losses  # noqa: F401  (registers every spec)
from lossd.server import registry
from lossd.server.errors import InvalidArgument
from lossd.server.losses import fat
from tests.support.golden import (
    golden_files,
)
from tests.support.losskit import UPSTREAM_LOSSES, assert_same_gradients, call, gen, notes, value

FAT_LOSSES = UPSTREAM_LOSSES["fat"]


# --------------------------------------------------------------------------- golden values
# (each case is run by tests/losses/test_golden.py)


def test_golden_files_are_all_covered():
    # one recorded case per fat loss, plus the LossFactory config case
    assert {p.stem.split("__")[0] for p in golden_files("fat")} == set(FAT_LOSSES) | {"from_config"}


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", FAT_LOSSES)
def test_spec_registered(name):
    spec = registry.get(name)
    assert spec.fn is getattr(fat, name)
    assert "fat" in spec.families
    assert spec.families == (("fat", "netspresso") if name == "cross_entropy" else ("fat",))
    assert spec.example.startswith(f'RemoteLoss("{name}"')
    assert spec.reference and spec.summary


@pytest.mark.parametrize("name", FAT_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_make_example_runs(name, dtype):
    spec = registry.get(name)
    args, kwargs, params = spec.make_example(dtype)
    assert args[0].dtype == dtype
    loss = value(spec.fn(*args, **kwargs, **spec.canonical_params(params)))
    assert loss.dim() == 0 and torch.isfinite(loss)
    # sqr_hinge's float32 +-1 code promotes half inputs; every other loss keeps the input dtype.
    expected = (
        torch.float32 if name == "sqr_hinge" and dtype in (torch.float16, torch.bfloat16) else dtype
    )
    assert loss.dtype == expected
    # Deterministic: a second build gives the same call.
    args2, _, params2 = spec.make_example(dtype)
    assert all(torch.equal(a, b) for a, b in zip(args, args2, strict=True)) and params == params2


@pytest.mark.parametrize("name", FAT_LOSSES)
def test_make_example_half_precision_close_to_float64(name):
    spec = registry.get(name)
    ref_args, kw, params = spec.make_example(torch.float64)
    ref = value(spec.fn(*ref_args, **kw, **spec.canonical_params(params)))
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 6e-2)):
        args, kw, params = spec.make_example(dtype)
        got = value(spec.fn(*args, **kw, **spec.canonical_params(params)))
        assert_close(got.double(), ref, rtol=tol, atol=tol)


def test_kl_div_default_is_fats_batchmean_not_torchs_mean():
    assert registry.get("kl_div").param("reduction").default == "batchmean"
    assert nn.KLDivLoss().reduction == "mean"


def test_integer_weight_lists_are_accepted_as_floats():
    # fat's torch.tensor([1, 2, 1]) is int64 and crashes upstream; lossd accepts it on purpose.
    params = registry.get("cross_entropy").canonical_params({"weight": [1, 2, 1]})
    assert params["weight"].dtype == torch.float32
    x, y = torch.randn(5, 3, dtype=torch.float64, generator=gen(1)), torch.tensor([0, 1, 2, 1, 1])
    with pytest.raises(RuntimeError):
        nn.CrossEntropyLoss(weight=torch.tensor([1, 2, 1]))(x, y)
    expected = F.cross_entropy(x, y, weight=torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64))
    assert_close(value(call("cross_entropy", x, y, weight=[1, 2, 1])), expected)
    assert_close(
        value(fat.nll(x, y, weight=[1, 2, 1])),
        F.nll_loss(x, y, weight=torch.tensor([1.0, 2, 1], dtype=torch.float64)),
    )


def test_params_are_range_checked_by_the_registry():
    with pytest.raises(InvalidArgument, match="label_smoothing"):
        registry.get("cross_entropy").canonical_params({"label_smoothing": 1.5})
    with pytest.raises(InvalidArgument, match="beta"):
        registry.get("smooth_l1").canonical_params({"beta": -0.1})
    with pytest.raises(InvalidArgument, match="reduction"):
        registry.get("kl_div").canonical_params({"reduction": "avg"})


# --------------------------------------------------------------------------- cross_entropy


def test_cross_entropy_hand_value():
    # -log softmax([1, 2, 3])[2] = log(1 + e^-1 + e^-2)
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    assert_close(
        value(fat.cross_entropy(x, torch.tensor([2]))),
        torch.tensor(math.log(1 + math.exp(-1) + math.exp(-2)), dtype=torch.float64),
    )


def _ce_reference(x, y, weight=None, ignore_index=-100, reduction="mean", eps=0.0):
    """A re-derivation with torch primitives: (1-eps)*nll + eps*mean_c(-w_c log p_c), / sum of w[y]."""
    logp = x.log_softmax(1)
    c = x.shape[1]
    w = torch.ones(c, dtype=x.dtype) if weight is None else weight
    keep = y != ignore_index
    ys = torch.where(keep, y, 0)
    nll = -logp.gather(1, ys[:, None])[:, 0] * w[ys]
    smooth = -(logp * w).sum(1) / c
    per = torch.where(keep, (1 - eps) * nll + eps * smooth, torch.zeros_like(nll))
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / w[ys][keep].sum()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_rederivation_and_torch(reduction, eps, weighted):
    x = torch.randn(7, 4, dtype=torch.float64, generator=gen(2))
    y = torch.tensor([0, 3, 1, 7, 2, 7, 1])  # 7 = ignore_index
    w = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64) if weighted else None
    got = value(
        fat.cross_entropy(x, y, weight=w, ignore_index=7, reduction=reduction, label_smoothing=eps)
    )
    assert_close(got, _ce_reference(x, y, w, 7, reduction, eps))
    upstream = nn.CrossEntropyLoss(
        weight=w, ignore_index=7, reduction=reduction, label_smoothing=eps
    )
    assert_close(got, upstream(x, y), rtol=0, atol=0)
    if reduction == "none":
        assert got[3] == 0 and got[5] == 0


def test_cross_entropy_probability_targets():
    x = torch.randn(5, 3, dtype=torch.float64, generator=gen(3), requires_grad=True)
    t = torch.softmax(torch.randn(5, 3, dtype=torch.float64, generator=gen(4)), 1).requires_grad_()
    loss = value(fat.cross_entropy(x, t))
    assert_close(loss, -(t * x.log_softmax(1)).sum(1).mean())
    (gt,) = torch.autograd.grad(loss, t)  # soft targets get a gradient, as in torch
    assert_close(gt, -x.log_softmax(1).detach() / 5)
    # label smoothing mixes the target with the uniform distribution
    smoothed = value(fat.cross_entropy(x, t, label_smoothing=0.3))
    assert_close(smoothed, -((0.7 * t + 0.1) * x.log_softmax(1)).sum(1).mean())
    # class weights with probabilities: mean divides by N, not by a weight sum (torch)
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    assert_close(
        value(fat.cross_entropy(x, t, weight=w)), -(t * w * x.log_softmax(1)).sum(1).mean()
    )


def test_cross_entropy_spatial_and_unbatched():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=gen(5))
    y = torch.randint(0, 3, (2, 4, 5), generator=gen(6))
    flat_x, flat_y = x.permute(0, 2, 3, 1).reshape(-1, 3), y.reshape(-1)
    assert_close(value(fat.cross_entropy(x, y)), value(fat.cross_entropy(flat_x, flat_y)))
    assert value(fat.cross_entropy(x, y, reduction="none")).shape == (2, 4, 5)
    v = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert_close(
        value(fat.cross_entropy(v, torch.tensor(0))),
        torch.tensor(math.log(1 + math.exp(1) + math.exp(2)), dtype=torch.float64),
    )


def test_cross_entropy_uint8_targets_like_torch():
    x = torch.randn(4, 3, generator=gen(7))
    y = torch.tensor([0, 2, 1, 2], dtype=torch.uint8)
    assert_close(value(fat.cross_entropy(x, y)), F.cross_entropy(x, y.long()))


def test_cross_entropy_all_ignored_is_nan_with_note():
    x = torch.randn(3, 4, generator=gen(8))
    out = fat.cross_entropy(x, torch.full((3,), -100))
    assert torch.isnan(value(out)) and torch.isnan(nn.CrossEntropyLoss()(x, torch.full((3,), -100)))
    assert "NaN" in notes(out)[0] and "ignore_index" in notes(out)[0]
    # 'sum' over nothing is 0, no note
    out = fat.cross_entropy(x, torch.full((3,), -100), reduction="sum")
    assert value(out) == 0 and not notes(out)


def test_cross_entropy_empty_batch_and_zero_weights_are_nan():
    out = fat.cross_entropy(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert torch.isnan(value(out)) and notes(out)
    out = fat.cross_entropy(torch.zeros(0, 4), torch.zeros(0, 4))
    assert torch.isnan(value(out)) and notes(out)
    x = torch.randn(3, 3, generator=gen(9))
    out = fat.cross_entropy(x, torch.tensor([0, 0, 2]), weight=torch.tensor([0.0, 1.0, 0.0]))
    assert torch.isnan(value(out)) and "sum to 0" in notes(out)[0]
    out = fat.cross_entropy(x, torch.tensor([0, 1, 2]), weight=torch.tensor([0.0, 1.0, 0.0]))
    assert torch.isfinite(value(out)) and not notes(out)


@pytest.mark.parametrize("name", ["cross_entropy", "nll"])
def test_the_nan_note_is_given_exactly_when_its_cause_holds(name):
    """The note's causes are looked for only when the mean is not finite; over ignored targets,
    zero class weights, empty batches and label smoothing, a cause holds exactly when the mean is
    NaN, and the note is there exactly then."""
    fn, g = getattr(fat, name), gen(21)
    for trial in range(120):
        n = int(torch.randint(0, 5, (1,), generator=g))
        x = torch.randn(n, 3, generator=g)
        y = torch.randint(0, 3, (n,), generator=g)
        y[torch.rand(n, generator=g) < 0.4] = -100
        w = (torch.rand(3, generator=g) < 0.5).float() if trial % 2 else None
        smoothing = {"label_smoothing": 0.1} if name == "cross_entropy" and trial % 3 == 0 else {}
        out = fn(x.log_softmax(1) if name == "nll" else x, y, weight=w, **smoothing)
        counted = y != -100
        cause = not bool(counted.any()) or (w is not None and float(w[y[counted]].sum()) == 0)
        assert bool(torch.isnan(value(out))) == cause, (trial, n, y, w)
        assert bool(notes(out)) == cause, (trial, n, y, w)


def test_cross_entropy_class_weight_follows_input_dtype():
    x = torch.randn(4, 3, dtype=torch.float64, generator=gen(10))
    y = torch.tensor([0, 1, 2, 1])
    w32 = torch.tensor([1.0, 3.0, 0.5])
    out = value(fat.cross_entropy(x, y, weight=w32))
    assert out.dtype == torch.float64
    assert_close(out, F.cross_entropy(x, y, weight=w32.double()))
    # torch itself would refuse the float32 weight for a float64 input
    with pytest.raises(RuntimeError):
        F.cross_entropy(x, y, weight=w32)


def test_cross_entropy_legacy_size_average_and_reduce():
    x = torch.randn(4, 3, dtype=torch.float64, generator=gen(11))
    y = torch.tensor([0, 1, 2, 1])
    out = fat.cross_entropy(x, y, reduce=False)
    assert value(out).shape == (4,) and "deprecated" in notes(out)[0]
    assert_close(
        value(fat.cross_entropy(x, y, size_average=False)), F.cross_entropy(x, y, reduction="sum")
    )
    assert_close(
        value(fat.cross_entropy(x, y, size_average=True, reduce=True, reduction="sum")),
        F.cross_entropy(x, y),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(
            value(fat.cross_entropy(x, y, size_average=False, reduction="none")),
            nn.CrossEntropyLoss(size_average=False, reduction="none")(x, y),
        )


@pytest.mark.parametrize(
    "target, match",
    [
        (torch.tensor([0, 3, 1]), r"class indices in \[0, 2\]"),
        (torch.tensor([0, -1, 1]), "index -1"),
        (torch.tensor([0, 1, 1], dtype=torch.int32), "int64 or uint8"),
        (torch.tensor([0.0, 1.0, 1.0]), "probabilities of the input's shape"),
        (torch.tensor([[0, 1, 1]]), r"N=3 \(as in input\)"),
        ([0, 1, 1], "a tensor"),
    ],
)
def test_cross_entropy_rejects_bad_targets(target, match):
    with pytest.raises(InvalidArgument, match=match) as info:
        call("cross_entropy", torch.randn(3, 3), target)
    assert info.value.field == "target"


def test_cross_entropy_ignore_index_may_be_out_of_range():
    x = torch.randn(3, 3, dtype=torch.float64, generator=gen(12))
    y = torch.tensor([0, 255, 2])
    assert_close(
        value(call("cross_entropy", x, y, ignore_index=255)),
        F.cross_entropy(x, y, ignore_index=255),
    )
    with pytest.raises(InvalidArgument):
        call("cross_entropy", x, y)  # 255 is a class index when it is not ignored


def test_cross_entropy_rejects_bad_input_and_params():
    y = torch.tensor([0, 1])
    with pytest.raises(InvalidArgument, match=r"dtype in \{float16, bfloat16, float32, float64\}"):
        call("cross_entropy", torch.ones(2, 3, dtype=torch.long), y)
    with pytest.raises(InvalidArgument, match=r"unbatched logits \[C\].*got float32 of shape \[\]"):
        call("cross_entropy", torch.tensor(1.0), y)
    with pytest.raises(InvalidArgument, match=r"shape \[3\]") as info:
        call("cross_entropy", torch.randn(2, 3), y, weight=[1.0, 2.0])
    assert info.value.field == "weight"
    with pytest.raises(InvalidArgument) as info:
        call("cross_entropy", torch.randn(2, 3), y, label_smoothing=-0.1)
    assert info.value.field == "params.label_smoothing"
    with pytest.raises(InvalidArgument):
        call("cross_entropy", torch.randn(2, 3), y, reduction="avg")


def test_cross_entropy_netspresso_dict_form():
    x = torch.randn(6, 4, dtype=torch.float64, generator=gen(13), requires_grad=True)
    y = torch.randint(0, 4, (6,), generator=gen(14))
    plain = value(fat.cross_entropy(x, y, label_smoothing=0.1))
    ns = fat.cross_entropy({"pred": x}, {"target": y}, label_smoothing=0.1)
    assert_close(value(ns), plain, rtol=0, atol=0) and not notes(ns)
    (g1,) = torch.autograd.grad(plain, x)
    (g2,) = torch.autograd.grad(value(ns), x)
    assert_close(g1, g2, rtol=0, atol=0)
    # reduction is fixed to 'mean' upstream: a reduction parameter is swallowed, with a note
    out = fat.cross_entropy({"pred": x}, {"target": y}, reduction="sum")
    assert_close(value(out), value(fat.cross_entropy(x, y))) and "fixes reduction='mean'" in notes(
        out
    )[0]
    # the legacy pair still reaches torch
    assert value(fat.cross_entropy({"pred": x}, {"target": y}, reduce=False)).shape == (6,)
    # extra keys are ignored, as upstream reads only 'pred' / 'target'
    assert_close(
        value(fat.cross_entropy({"pred": x, "aux": 1}, {"target": y, "x": 2})),
        value(fat.cross_entropy(x, y)),
    )


@pytest.mark.parametrize(
    "out, target, field",
    [
        ({"logits": torch.randn(2, 3)}, {"target": torch.tensor([0, 1])}, "input.pred"),
        ({"pred": torch.randn(2, 3)}, {"label": torch.tensor([0, 1])}, "target.target"),
        ({"pred": torch.randn(2, 3)}, torch.tensor([0, 1]), "target"),
        (torch.randn(2, 3), {"target": torch.tensor([0, 1])}, "input"),
        ({"pred": torch.randn(2, 3)}, {"target": torch.tensor([0, 5])}, "target.target"),
        (
            {"pred": torch.ones(2, 3, dtype=torch.long)},
            {"target": torch.tensor([0, 1])},
            "input.pred",
        ),
    ],
)
def test_cross_entropy_netspresso_dict_errors_name_the_field(out, target, field):
    with pytest.raises(InvalidArgument) as info:
        call("cross_entropy", out, target)
    assert info.value.field == field


def test_cross_entropy_does_not_mutate_inputs():
    x = torch.randn(4, 3, generator=gen(15))
    y = torch.tensor([0, -100, 2, 1])
    x0, y0 = x.clone(), y.clone()
    fat.cross_entropy(x, y, label_smoothing=0.1, weight=[1.0, 2.0, 3.0])
    assert torch.equal(x, x0) and torch.equal(y, y0)


# --------------------------------------------------------------------------- nll


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_nll_matches_rederivation_and_torch(reduction, weighted):
    x = torch.randn(6, 4, dtype=torch.float64, generator=gen(20)).log_softmax(1)
    y = torch.tensor([0, 3, -100, 2, 1, 3])
    w = (
        torch.tensor([1.0, 0.5, 2.0, 3.0], dtype=torch.float64)
        if weighted
        else torch.ones(4, dtype=torch.float64)
    )
    keep = y != -100
    ys = torch.where(keep, y, 0)
    per = torch.where(keep, -x[torch.arange(6), ys] * w[ys], torch.zeros(6, dtype=torch.float64))
    expected = {"none": per, "sum": per.sum(), "mean": per.sum() / w[ys][keep].sum()}[reduction]
    got = value(fat.nll(x, y, weight=w if weighted else None, reduction=reduction))
    assert_close(got, expected)
    assert_close(
        got, nn.NLLLoss(weight=w if weighted else None, reduction=reduction)(x, y), rtol=0, atol=0
    )


def test_nll_hand_value_and_edges():
    x = torch.tensor([[-0.5, -1.0], [-2.0, -0.25]])
    assert_close(value(call("nll", x, torch.tensor([1, 0]))), torch.tensor(1.5))
    assert_close(value(call("nll", x, torch.tensor([1, 0]), ignore_index=0)), torch.tensor(1.0))
    out = call("nll", x, torch.tensor([-100, -100]))
    assert torch.isnan(value(out)) and "NaN" in notes(out)[0]
    with pytest.raises(InvalidArgument, match="index 2"):
        call("nll", x, torch.tensor([2, 0]))
    with pytest.raises(InvalidArgument, match="int64 or uint8"):
        call("nll", x, torch.tensor([1.0, 0.0]))
    with pytest.raises(InvalidArgument, match=r"N=2 \(as in input\)"):
        call("nll", x, torch.tensor([1, 0, 1]))
    assert_close(value(call("nll", x, torch.tensor([1, 0], dtype=torch.uint8))), torch.tensor(1.5))


# --------------------------------------------------------------------------- mse / l1 / smooth_l1


def test_regression_hand_values():
    x = torch.tensor([1.0, -2.0, 0.5])
    t = torch.tensor([0.5, 0.0, 0.5])
    assert_close(value(fat.mse(x, t)), torch.tensor((0.25 + 4.0 + 0.0) / 3))
    assert_close(value(fat.l1(x, t)), torch.tensor((0.5 + 2.0 + 0.0) / 3))
    # |d| = 0.5 < 1: 0.5 * 0.25; |d| = 2: 2 - 0.5; 0
    assert_close(value(fat.smooth_l1(x, t)), torch.tensor((0.125 + 1.5 + 0.0) / 3))
    # beta = 4: all quadratic, 0.5 d^2 / 4
    assert_close(value(fat.smooth_l1(x, t, beta=4.0)), torch.tensor((0.25 + 4.0) / 8 / 3))
    assert_close(value(fat.mse(x, t, reduction="sum")), torch.tensor(4.25))
    assert_close(value(fat.l1(x, t, reduction="none")), torch.tensor([0.5, 2.0, 0.0]))


@pytest.mark.parametrize("name", ["mse", "l1", "smooth_l1"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_regression_matches_torch(name, reduction):
    x = torch.randn(5, 3, dtype=torch.float64, generator=gen(21), requires_grad=True)
    t = torch.randn(5, 3, dtype=torch.float64, generator=gen(22), requires_grad=True)
    torch_cls = {"mse": nn.MSELoss, "l1": nn.L1Loss, "smooth_l1": nn.SmoothL1Loss}[name]
    extra = {"beta": 0.7} if name == "smooth_l1" else {}
    got = value(getattr(fat, name)(x, t, reduction=reduction, **extra))
    expected = torch_cls(reduction=reduction, **extra)(x, t)
    assert_close(got, expected, rtol=0, atol=0)
    assert_same_gradients(got, expected, (x, t), rtol=0, atol=0)


def test_smooth_l1_beta_zero_is_l1():
    x = torch.randn(4, 3, dtype=torch.float64, generator=gen(23), requires_grad=True)
    t = torch.randn(4, 3, dtype=torch.float64, generator=gen(24))
    a = value(call("smooth_l1", x, t, beta=0.0))
    b = value(call("l1", x, t))
    assert_close(a, b, rtol=0, atol=0)
    assert_close(torch.autograd.grad(a, x)[0], torch.autograd.grad(b, x)[0])
    with pytest.raises(InvalidArgument) as info:
        call("smooth_l1", x, t, beta=-1.0)
    assert info.value.field == "params.beta"


def test_regression_broadcasting_follows_torch_with_a_note():
    x = torch.randn(4, 3, dtype=torch.float64, generator=gen(25), requires_grad=True)
    t = torch.randn(1, 3, dtype=torch.float64, generator=gen(26), requires_grad=True)
    out = call("mse", x, t)
    assert "broadcasts" in notes(out)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = nn.MSELoss()(x, t)
    assert_close(value(out), expected)
    assert_close(torch.autograd.grad(value(out), t)[0], torch.autograd.grad(expected, t)[0])
    with pytest.raises(InvalidArgument) as info:
        call("l1", x, torch.randn(2, 3))
    assert info.value.field == "target"


@pytest.mark.parametrize("name", ["mse", "l1", "smooth_l1", "bce", "bce_with_logits"])
def test_empty_mean_is_nan_with_note(name):
    out = getattr(fat, name)(torch.zeros(0, 3), torch.zeros(0, 3))
    assert torch.isnan(value(out)) and "NaN" in notes(out)[0]
    out = getattr(fat, name)(torch.zeros(0, 3), torch.zeros(0, 3), reduction="sum")
    assert value(out) == 0 and not notes(out)


@pytest.mark.parametrize("name", ["mse", "l1", "smooth_l1", "bce", "bce_with_logits", "nll"])
def test_bad_reduction_and_non_float_input(name):
    fn = functools.partial(call, name)
    tgt = torch.tensor([0, 1]) if name == "nll" else torch.full((2, 2), 0.5)
    with pytest.raises(InvalidArgument) as info:
        fn(torch.full((2, 2), 0.5), tgt, reduction="batchmean")
    assert info.value.field == "params.reduction"
    with pytest.raises(InvalidArgument) as info:
        fn(torch.ones(2, 2, dtype=torch.long), tgt)
    assert info.value.field == "input"


# --------------------------------------------------------------------------- bce / bce_with_logits


def test_bce_hand_values_hard_and_soft():
    p = torch.tensor([0.9, 0.2, 0.5], dtype=torch.float64)
    hard = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.5)) / 3
    assert_close(value(fat.bce(p, hard)), torch.tensor(expected, dtype=torch.float64))
    soft = torch.tensor([0.7, 0.1, 0.5], dtype=torch.float64)
    per = -(soft * p.log() + (1 - soft) * (1 - p).log())
    assert_close(value(fat.bce(p, soft, reduction="none")), per)
    w = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    assert_close(value(fat.bce(p, soft, weight=w, reduction="sum")), (per * w).sum())
    # torch clamps each log at -100: a certain wrong prediction costs exactly 100
    assert_close(value(fat.bce(torch.tensor([0.0]), torch.tensor([1.0]))), torch.tensor(100.0))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_bce_matches_torch_including_target_gradient(reduction):
    p = (torch.rand(5, 4, dtype=torch.float64, generator=gen(30)) * 0.9 + 0.05).requires_grad_()
    t = torch.rand(5, 4, dtype=torch.float64, generator=gen(31)).requires_grad_()
    w = torch.tensor([1.0, 2.0, 0.5, 0.0])
    got = value(fat.bce(p, t, weight=w, reduction=reduction))
    expected = nn.BCELoss(weight=w.double(), reduction=reduction)(p, t)
    assert_close(got, expected, rtol=0, atol=0)
    assert_same_gradients(got, expected, (p, t))


@pytest.mark.parametrize(
    "inp, tgt, field, match",
    [
        (torch.tensor([1.5, 0.5]), torch.tensor([1.0, 0.0]), "input", r"\[0, 1\]"),
        (torch.tensor([-0.1, 0.5]), torch.tensor([1.0, 0.0]), "input", r"\[0, 1\]"),
        (torch.tensor([float("nan"), 0.5]), torch.tensor([1.0, 0.0]), "input", r"\[0, 1\]"),
        (torch.tensor([0.5, 0.5]), torch.tensor([2.0, 0.0]), "target", r"\[0, 1\]"),
        (torch.tensor([0.5, 0.5]), torch.tensor([[1.0, 0.0]]), "target", "shape"),
        (
            torch.tensor([0.5, 0.5]),
            torch.tensor([1.0, 0.0], dtype=torch.float64),
            "target",
            "dtype",
        ),
    ],
)
def test_bce_rejects_what_torch_crashes_on(inp, tgt, field, match):
    with pytest.raises(InvalidArgument, match=match) as info:
        call("bce", inp, tgt)
    assert info.value.field == field


def test_bce_weight_must_broadcast_to_input():
    with pytest.raises(InvalidArgument) as info:
        fat.bce(torch.full((2, 3), 0.5), torch.ones(2, 3), weight=torch.ones(2, 2, 3))
    assert info.value.field == "weight"


def test_bce_with_logits_hand_values():
    x = torch.tensor([0.0, 2.0, -1.0], dtype=torch.float64)
    t = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)

    def log_sigmoid(v):
        return -math.log1p(math.exp(-v))

    per = [-log_sigmoid(0.0), -log_sigmoid(-2.0), -log_sigmoid(-1.0)]
    assert_close(
        value(fat.bce_with_logits(x, t, reduction="none")), torch.tensor(per, dtype=torch.float64)
    )
    # pos_weight multiplies the positive term only
    pw = [3.0, 3.0, 3.0]
    per_pw = [3 * per[0], per[1], 3 * per[2]]
    assert_close(
        value(fat.bce_with_logits(x, t, pos_weight=pw)),
        torch.tensor(sum(per_pw) / 3, dtype=torch.float64),
    )


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_bce_with_logits_matches_torch(reduction):
    x = torch.randn(5, 3, dtype=torch.float64, generator=gen(32), requires_grad=True)
    t = torch.rand(5, 3, dtype=torch.float64, generator=gen(33), requires_grad=True)
    pw, w = torch.tensor([2.0, 0.5, 1.0]), torch.tensor([1.0, 0.0, 3.0])
    got = value(fat.bce_with_logits(x, t, weight=w, reduction=reduction, pos_weight=pw))
    expected = nn.BCEWithLogitsLoss(weight=w.double(), reduction=reduction, pos_weight=pw.double())(
        x, t
    )
    assert got.dtype == torch.float64  # float32 weights follow the input's dtype
    assert_close(got, expected, rtol=0, atol=0)
    assert_same_gradients(got, expected, (x, t))


def test_bce_with_logits_rejects_bad_shapes():
    x = torch.randn(4, 3)
    with pytest.raises(InvalidArgument) as info:
        call("bce_with_logits", x, torch.rand(1, 3))
    assert info.value.field == "target"
    with pytest.raises(InvalidArgument) as info:
        call("bce_with_logits", x, torch.rand(4, 3), pos_weight=[1.0, 2.0])
    assert info.value.field == "pos_weight"
    with pytest.raises(InvalidArgument, match="list of numbers") as info:
        call("bce_with_logits", x, torch.rand(4, 3), pos_weight="2")
    assert info.value.field == "params.pos_weight"


# --------------------------------------------------------------------------- kl_div


def test_kl_div_reductions_hand_derived():
    x = torch.randn(4, 5, dtype=torch.float64, generator=gen(40)).log_softmax(1)
    t = torch.softmax(torch.randn(4, 5, dtype=torch.float64, generator=gen(41)), 1)
    t[0, 0] = 0.0  # 0 * log 0 counts as 0
    per = torch.where(t > 0, t * (t.log() - x), torch.zeros_like(t))
    assert_close(value(fat.kl_div(x, t)), per.sum() / 4)  # fat's default: batchmean
    assert_close(value(fat.kl_div(x, t, reduction="sum")), per.sum())
    assert_close(value(fat.kl_div(x, t, reduction="mean")), per.sum() / 20)
    assert_close(value(fat.kl_div(x, t, reduction="none")), per)
    lt = t.clamp_min(1e-12).log()
    assert_close(value(fat.kl_div(x, lt, log_target=True)), (lt.exp() * (lt - x)).sum() / 4)


@pytest.mark.parametrize("reduction", ["none", "batchmean", "sum", "mean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_matches_torch(reduction, log_target):
    x = torch.randn(3, 4, dtype=torch.float64, generator=gen(42)).log_softmax(1).requires_grad_()
    t = torch.softmax(torch.randn(3, 4, dtype=torch.float64, generator=gen(43)), 1)
    t = (t.log() if log_target else t).requires_grad_()
    got = value(fat.kl_div(x, t, reduction=reduction, log_target=log_target))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about 'mean'
        expected = nn.KLDivLoss(reduction=reduction, log_target=log_target)(x, t)
    assert_close(got, expected, rtol=0, atol=0)
    assert_same_gradients(got, expected, (x, t))


def test_kl_div_edges():
    out = call("kl_div", torch.zeros(0, 3), torch.zeros(0, 3))
    assert torch.isnan(value(out)) and "batchmean" in notes(out)[0]
    out = call("kl_div", torch.zeros(0, 3), torch.zeros(0, 3), reduction="mean")
    assert torch.isnan(value(out)) and notes(out)
    # 0-d input: torch does not divide by a batch size
    assert_close(
        value(call("kl_div", torch.tensor(-1.0), torch.tensor(0.5))),
        torch.tensor(0.5 * (math.log(0.5) + 1.0)),
    )
    # broadcasting like torch (batchmean still divides by the input's first dimension)
    x = torch.randn(4, 3, dtype=torch.float64, generator=gen(44))
    t = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    assert_close(value(call("kl_div", x, t)), F.kl_div(x, t, reduction="batchmean"))
    with pytest.raises(InvalidArgument) as info:
        call("kl_div", x, torch.rand(2, 3))
    assert info.value.field == "target"
    with pytest.raises(InvalidArgument) as info:
        call("kl_div", x, x.exp(), reduction="avg")
    assert info.value.field == "params.reduction"


# --------------------------------------------------------------------------- sqr_hinge


def test_sqr_hinge_hand_value_and_gradient():
    scores = torch.tensor([[2.0, -0.5], [0.25, 0.5]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 0])
    # codes [1, -1] and [1, -1]; margins max(0, 1 - y f): [0, 0.5], [0.75, 1.5]
    loss = value(fat.sqr_hinge(scores, target))
    assert_close(loss, torch.tensor((0 + 0.25 + 0.5625 + 2.25) / 4, dtype=torch.float64))
    # upstream's gradient: -2 y margin / (N C), times the incoming gradient (x3 here)
    (grad,) = torch.autograd.grad(3 * loss, scores)
    expected = 3 * torch.tensor([[0.0, 2 * 0.5], [-2 * 0.75, 2 * 1.5]], dtype=torch.float64) / 4
    assert_close(grad, expected)


def test_sqr_hinge_code_target_equals_index_target_and_gets_no_gradient():
    scores = torch.randn(5, 4, dtype=torch.float64, generator=gen(50), requires_grad=True)
    labels = torch.randint(0, 4, (5,), generator=gen(51))
    code = (2.0 * F.one_hot(labels, 4) - 1.0).double().requires_grad_()
    a = value(fat.sqr_hinge(scores, labels))
    b = value(fat.sqr_hinge(scores, code))
    assert_close(a, b, rtol=0, atol=0)
    assert_close(a, ((1 - scores * code).clamp_min(0) ** 2).mean())
    b.backward()
    assert code.grad is None and scores.grad is not None
    # a code that broadcasts to [N, C] is used as is
    row = torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=torch.float64)
    assert_close(value(fat.sqr_hinge(scores, row)), ((1 - scores * row).clamp_min(0) ** 2).mean())


def test_sqr_hinge_dtypes_follow_the_float32_code():
    labels = torch.tensor([0, 2, 1])
    s64 = torch.randn(3, 3, dtype=torch.float64, generator=gen(52))
    assert value(fat.sqr_hinge(s64, labels)).dtype == torch.float64
    s16 = s64.half().requires_grad_()
    loss = value(fat.sqr_hinge(s16, labels))
    assert loss.dtype == torch.float32
    assert_close(loss, value(fat.sqr_hinge(s16.detach().float(), labels)))
    (g,) = torch.autograd.grad(loss, s16)
    assert g.dtype == torch.float16
    assert value(fat.sqr_hinge(s16, (2.0 * F.one_hot(labels, 3) - 1).half())).dtype == torch.float16


def test_sqr_hinge_edges():
    out = call("sqr_hinge", torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert torch.isnan(value(out)) and "empty batch" in notes(out)[0]
    scores = torch.randn(3, 3)
    for bad in (torch.tensor([0, 3, 1]), torch.tensor([0, -1, 1])):
        with pytest.raises(InvalidArgument, match="class indices") as info:
            call("sqr_hinge", scores, bad)
        assert info.value.field == "target"
    for bad, match in (
        (torch.tensor([0, 1, 1], dtype=torch.int32), "int64"),
        (torch.tensor([0, 1]), r"N=3 \(as in input\)"),
        (torch.ones(3, 2), r"\[3, 3\]"),
        (torch.ones(3, 3, 1), r"a \+-1 code \[N, C\]\), got shape \[3, 3, 1\]"),
    ):
        with pytest.raises(InvalidArgument, match=match):
            call("sqr_hinge", scores, bad)
    with pytest.raises(InvalidArgument) as info:
        call("sqr_hinge", torch.randn(3), torch.tensor([0, 1, 2]))
    assert info.value.field == "input"
    labels = torch.tensor([0, 1, 2])
    s0, l0 = scores.clone(), labels.clone()
    call("sqr_hinge", scores, labels)
    assert torch.equal(scores, s0) and torch.equal(labels, l0)


# --------------------------------------------------------------------------- gradcheck


def _gc(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_gradcheck_all_fat_losses():
    g = gen(60)
    logits = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([0, 2, -100, 1])
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    probs = torch.softmax(torch.randn(4, 3, dtype=torch.float64, generator=g), 1).requires_grad_()
    _gc(lambda x: value(fat.cross_entropy(x, labels, weight=w, label_smoothing=0.1)), logits)
    _gc(lambda x, t: value(fat.cross_entropy(x, t, label_smoothing=0.2)), logits, probs)
    _gc(lambda x: value(fat.cross_entropy({"pred": x}, {"target": labels})), logits)
    _gc(lambda x: value(fat.nll(x, labels, weight=w, reduction="sum")), logits)

    a = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    _gc(lambda x, t: value(fat.mse(x, t)), a, b)
    _gc(lambda x, t: value(fat.l1(x, t, reduction="sum")), a, b)
    _gc(lambda x, t: value(fat.smooth_l1(x, t, beta=0.8)), a, b)

    p = (torch.rand(3, 4, dtype=torch.float64, generator=g) * 0.8 + 0.1).requires_grad_()
    q = (torch.rand(3, 4, dtype=torch.float64, generator=g) * 0.8 + 0.1).requires_grad_()
    _gc(lambda x, t: value(fat.bce(x, t, weight=[1.0, 2.0, 0.5, 1.0])), p, q)
    _gc(lambda x, t: value(fat.bce_with_logits(x, t, pos_weight=[2.0, 1.0, 0.5, 3.0])), a, q)

    lp = torch.randn(3, 4, dtype=torch.float64, generator=g).log_softmax(1).requires_grad_()
    _gc(lambda x, t: value(fat.kl_div(x, t)), lp, q)
    _gc(lambda x, t: value(fat.kl_div(x, t, log_target=True, reduction="sum")), lp, b)

    _gc(lambda x: value(fat.sqr_hinge(x, torch.tensor([0, 3, 1]))), a)
    _gc(
        lambda x: value(
            fat.sqr_hinge(x, torch.tensor([[1.0, -1, -1, -1]] * 3, dtype=torch.float64))
        ),
        a,
    )


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("name", FAT_LOSSES)
def test_runs_on_device_with_weights_moved(device, name):
    spec = registry.get(name)
    args, kwargs, params = spec.make_example(torch.float32)
    params = spec.canonical_params(params)  # list weights become CPU float32 tensors
    args = tuple(a.to(device) for a in args)
    loss = value(spec.fn(*args, **kwargs, **params))
    assert loss.device.type == device.type
    cpu = value(spec.fn(*(a.cpu() for a in args), **kwargs, **params))
    assert_close(loss.cpu(), cpu, rtol=1e-5, atol=1e-6)


def test_bad_index_never_reaches_the_device(device):
    """Checked as the engine checks them (declared index ranges), before any kernel runs: on
    CUDA (``pytest --device cuda``) a device-side assert would kill the context."""
    x = torch.randn(3, 4, device=device)
    for name in ("cross_entropy", "nll", "sqr_hinge"):
        with pytest.raises(InvalidArgument):
            call(name, x, torch.tensor([0, 4, 1], device=device))
    with pytest.raises(InvalidArgument):
        call("bce", torch.full((3,), 1.5, device=device), torch.ones(3, device=device))
    # the context is still usable
    assert value(call("cross_entropy", x, torch.tensor([0, 3, 1], device=device))).isfinite()
