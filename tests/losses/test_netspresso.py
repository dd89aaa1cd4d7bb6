"""NetsPresso Trainer 1.4.1: focal_loss (SigmoidFocalLoss) and the model.losses criteria list."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import lossd.server.losses  # noqa: F401  (registers the specs)
from lossd.server import registry
from lossd.server.errors import InvalidArgument, LossNotFound
from lossd.server.losses.netspresso import criteria_list, focal_loss
from lossd.server.registry import Input, LossOutput, LossSpec
from tests.support.golden import GOLDEN, load_golden
from tests.support.losskit import GOLDEN_TOL, call, run_golden


def _run_golden(name: str):
    return run_golden(GOLDEN / "netspresso" / f"{name}.pt")


def _focal_by_hand(x: float, t: float, alpha: float, gamma: float) -> float:
    """Lin et al. eq. 5 for one element, with soft targets: BCE * (1 - p_t)^gamma * alpha_t."""
    p = 1.0 / (1.0 + math.exp(-x))
    ce = -(t * math.log(p) + (1.0 - t) * math.log(1.0 - p))
    p_t = p * t + (1.0 - p) * (1.0 - t)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss *= alpha * t + (1.0 - alpha) * (1.0 - t)
    return loss


X = [[0.5, -1.25, 2.0], [-0.3, 0.0, 3.5]]
T = [[1.0, 0.0, 0.0], [0.25, 1.0, 0.7]]


def _xt(dtype=torch.float64):
    return torch.tensor(X, dtype=dtype), torch.tensor(T, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# focal_loss


@pytest.mark.parametrize(
    ("alpha", "gamma"), [(0.25, 2.0), (0.5, 0.0), (0.9, 1.5), (-1.0, 2.0), (-0.3, 3.0), (1.7, 2.0)]
)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_focal_known_values(alpha, gamma, reduction):
    x, t = _xt()
    expected = torch.tensor(
        [
            [_focal_by_hand(a, b, alpha, gamma) for a, b in zip(xr, tr, strict=True)]
            for xr, tr in zip(X, T, strict=True)
        ],
        dtype=torch.float64,
    )
    expected = {"none": expected, "mean": expected.mean(), "sum": expected.sum()}[reduction]
    got = focal_loss({"pred": x}, {"target": t}, reduction, alpha=alpha, gamma=gamma)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_focal_alpha_minus_one_gamma_zero_is_bce_with_logits(reduction):
    x, t = _xt()
    got = focal_loss({"pred": x}, {"target": t}, reduction=reduction, alpha=-1, gamma=0)
    torch.testing.assert_close(
        got, F.binary_cross_entropy_with_logits(x, t, reduction=reduction), rtol=1e-15, atol=0
    )


def test_focal_any_negative_alpha_disables_weighting():
    x, t = _xt()
    a = focal_loss({"pred": x}, {"target": t}, alpha=-1.0, gamma=2.0)
    b = focal_loss({"pred": x}, {"target": t}, alpha=-0.01, gamma=2.0)
    c = focal_loss({"pred": x}, {"target": t}, alpha=0.25, gamma=2.0)
    assert a.item() == b.item() and a.item() != c.item()


def test_focal_reduction_defaults_to_mean_and_none_keeps_shape():
    x, t = _xt()
    none = focal_loss({"pred": x}, {"target": t}, "none", alpha=0.25, gamma=2.0)
    assert none.shape == x.shape
    assert (
        focal_loss({"pred": x}, {"target": t}, alpha=0.25, gamma=2.0).item() == none.mean().item()
    )


def test_focal_gradients_to_pred_and_target():
    x, t = _xt()
    x.requires_grad_(True)
    t.requires_grad_(True)
    focal_loss({"pred": x}, {"target": t}, "sum", alpha=0.25, gamma=2.0).backward()
    # d/dx of the gamma = 0, alpha < 0 case is sigmoid(x) - t; check the general case numerically below
    assert x.grad is not None and t.grad is not None and t.grad.abs().sum() > 0
    x2, t2 = _xt()
    x2.requires_grad_(True)
    focal_loss({"pred": x2}, {"target": t2}, "sum", alpha=-1, gamma=0).backward()
    torch.testing.assert_close(x2.grad, torch.sigmoid(x2.detach()) - t2, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_focal_gradcheck(reduction):
    x, t = _xt()
    x.requires_grad_(True)
    t.requires_grad_(True)
    assert gradcheck(
        lambda a, b: focal_loss({"pred": a}, {"target": b}, reduction, alpha=0.25, gamma=2.0),
        (x, t),
    )
    assert gradcheck(
        lambda a, b: focal_loss({"pred": a}, {"target": b}, reduction, alpha=-1, gamma=1.5), (x, t)
    )


def test_focal_empty_inputs():
    x, t = torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.float64)
    mean = focal_loss({"pred": x}, {"target": t}, "mean", alpha=0.25, gamma=2.0)
    assert isinstance(mean, LossOutput) and math.isnan(mean.value.item())
    assert any("NaN" in note for note in mean.notes)
    assert focal_loss({"pred": x}, {"target": t}, "sum", alpha=0.25, gamma=2.0).item() == 0.0
    assert focal_loss({"pred": x}, {"target": t}, "none", alpha=0.25, gamma=2.0).shape == (0, 3)


def test_focal_float32_and_purity():
    x, t = _xt(torch.float32)
    x0, t0 = x.clone(), t.clone()
    out = focal_loss({"pred": x}, {"target": t}, alpha=0.25, gamma=2.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out.double(),
        focal_loss({"pred": x.double()}, {"target": t.double()}, alpha=0.25, gamma=2.0),
        rtol=1e-6,
        atol=1e-7,
    )
    assert torch.equal(x, x0) and torch.equal(t, t0)


@pytest.mark.parametrize(
    ("out", "target", "reduction", "field"),
    [
        ({"pred": torch.zeros(4, 3)}, {"target": torch.zeros(4, 2)}, "mean", "target.target"),
        (
            {"pred": torch.zeros(4, 3)},
            {"target": torch.zeros(4, dtype=torch.int64)},
            "mean",
            "target.target",
        ),
        (
            {"pred": torch.zeros(4, 3)},
            {"target": torch.zeros(4, 3, dtype=torch.int64)},
            "mean",
            "target.target",
        ),
        (
            {"pred": torch.zeros(4, 3, dtype=torch.int64)},
            {"target": torch.zeros(4, 3)},
            "mean",
            "out.pred",
        ),
        ({"logits": torch.zeros(4, 3)}, {"target": torch.zeros(4, 3)}, "mean", "out.pred"),
        ({"pred": torch.zeros(4, 3)}, {"label": torch.zeros(4, 3)}, "mean", "target.target"),
        (torch.zeros(4, 3), {"target": torch.zeros(4, 3)}, "mean", "out"),
        ({"pred": torch.zeros(4, 3)}, {"target": [0.0, 1.0, 0.0]}, "mean", "target.target"),
        ({"pred": torch.zeros(4, 3)}, {"target": torch.zeros(4, 3)}, "avg", "reduction"),
    ],
)
def test_focal_invalid_inputs(out, target, reduction, field):
    with pytest.raises(InvalidArgument) as info:
        call("focal_loss", out, target, reduction, alpha=0.25, gamma=2.0)  # as the engine does
    assert info.value.field == field


def test_focal_spec():
    spec = registry.get("focal_loss")
    assert spec.families == ("netspresso",)
    assert [p.name for p in spec.params] == ["alpha", "gamma"] and all(
        p.required for p in spec.params
    )
    with pytest.raises(InvalidArgument) as info:
        spec.canonical_params({"alpha": 0.25})
    assert info.value.field == "params.gamma"
    assert spec.canonical_params({"alpha": 2, "gamma": 2}) == {
        "alpha": 2.0,
        "gamma": 2.0,
    }  # no range check
    assert spec.input("reduction").choices == ("none", "mean", "sum")
    for dtype in (torch.float32, torch.float64):
        args, kwargs, params = spec.make_example(dtype)
        value = spec.fn(*args, **kwargs, **params)
        assert value.dtype == dtype and torch.isfinite(value) and value > 0


# ---------------------------------------------------------------------------------------------
# The criteria list (model.losses)


def _focal(x, t, alpha=0.25, gamma=2.0):
    return focal_loss({"pred": x}, {"target": t}, alpha=alpha, gamma=gamma)


def _onehot_case(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, generator=gen, dtype=dtype)
    t = F.one_hot(torch.randint(0, 4, (6,), generator=gen), 4).to(dtype)
    return {"pred": x}, {"target": t}


def test_criteria_golden_ce_plus_focal():
    if "cross_entropy" not in {s.name for s in registry.all_specs()}:
        pytest.skip("cross_entropy is not registered yet")
    case, result = _run_golden("from_config__ce_1p0_plus_focal_0p5")
    assert list(result.components) == ["cross_entropy", "focal_loss"]
    out, target = case["args"]
    ce = F.cross_entropy(out["pred"].detach(), target["target"])
    torch.testing.assert_close(result.components["cross_entropy"], ce, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        result.components["focal_loss"],
        _focal(out["pred"].detach(), target["target"]),
        rtol=1e-12,
        atol=0,
    )


@pytest.mark.parametrize(
    ("weight", "factor"), [(0.5, 0.5), (2, 2.0), (None, 1.0), (-1.5, -1.5), ("missing", 1.0)]
)
def test_criteria_weight(weight, factor):
    out, target = _onehot_case()
    entry = {"criterion": "focal_loss", "alpha": 0.25, "gamma": 2.0}
    if weight != "missing":
        entry["weight"] = weight
    result = criteria_list(out, target, losses=[entry])
    focal = _focal(out["pred"], target["target"])
    torch.testing.assert_close(result.value, factor * focal, rtol=1e-15, atol=0)
    torch.testing.assert_close(result.components["focal_loss"], focal, rtol=0, atol=0)
    assert result.notes == []


def test_criteria_weighted_sum_components_and_gradients():
    # retinanet_loss returns a LossOutput: its value counts, its components come prefixed.
    spec = registry.get("retinanet_loss")
    (rout, rtarget), _, _ = spec.make_example(torch.float64)
    leaves = [*rout["cls_logits"], *rout["bbox_regression"]]
    for leaf in leaves:
        leaf.requires_grad_(True)
    x = rout["cls_logits"][0]
    out = {**rout, "pred": x}
    target = {**rtarget, "target": (x.detach() > 0).to(x.dtype)}
    result = criteria_list(
        out,
        target,
        losses=[
            {"criterion": "retinanet_loss", "weight": 0.3},
            {"criterion": "focal_loss", "alpha": 0.5, "gamma": 1.0, "weight": 2.0},
        ],
    )
    retina = spec.fn(rout, rtarget)
    focal = _focal(x, target["target"], alpha=0.5, gamma=1.0)
    assert list(result.components) == [
        "retinanet_loss",
        "retinanet_loss.cls",
        "retinanet_loss.box",
        "focal_loss",
    ]
    torch.testing.assert_close(
        result.components["retinanet_loss"], retina.value.detach(), rtol=0, atol=0
    )
    torch.testing.assert_close(
        result.components["retinanet_loss.cls"], retina.components["cls"], rtol=0, atol=0
    )
    torch.testing.assert_close(
        result.components["retinanet_loss.box"], retina.components["box"], rtol=0, atol=0
    )
    torch.testing.assert_close(result.value, 0.3 * retina.value + 2.0 * focal, rtol=1e-15, atol=0)
    assert all(not c.requires_grad for c in result.components.values())
    got = torch.autograd.grad(result.value, leaves)
    want = torch.autograd.grad(0.3 * retina.value + 2.0 * focal, leaves)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-15)


def test_criteria_duplicate_criterion_collapses_to_last():
    out, target = _onehot_case(seed=1)
    result = criteria_list(
        out,
        target,
        losses=[
            {"criterion": "focal_loss", "alpha": 0.25, "gamma": 2.0, "weight": 1.0},
            {"criterion": "focal_loss", "alpha": -1, "gamma": 0.0, "weight": 3.0},
        ],
    )
    bce = F.binary_cross_entropy_with_logits(out["pred"], target["target"])
    torch.testing.assert_close(result.value, 3.0 * bce, rtol=1e-15, atol=0)
    assert list(result.components) == ["focal_loss"]
    assert (
        len(result.notes) == 1
        and "params.losses[0]" in result.notes[0]
        and "params.losses[1]" in result.notes[0]
    )
    assert "last" in result.notes[0]


def test_criteria_duplicate_keeps_first_position():
    spec = registry.get("retinanet_loss")
    (rout, rtarget), _, _ = spec.make_example(torch.float64)
    x = rout["cls_logits"][1]
    out, target = {**rout, "pred": x}, {**rtarget, "target": torch.zeros_like(x)}
    result = criteria_list(
        out,
        target,
        losses=[
            {"criterion": "focal_loss", "alpha": 0.25, "gamma": 2.0},
            {"criterion": "retinanet_loss"},
            {"criterion": "focal_loss", "alpha": 0.5, "gamma": 1.0, "weight": 0.1},
        ],
    )
    assert list(result.components)[0] == "focal_loss"
    torch.testing.assert_close(
        result.components["focal_loss"], _focal(x, target["target"], 0.5, 1.0), rtol=0, atol=0
    )


def test_criteria_replaced_entry_is_still_validated():
    out, target = _onehot_case()
    with pytest.raises(InvalidArgument) as info:
        criteria_list(
            out,
            target,
            losses=[
                {"criterion": "focal_loss", "alpha": 0.25},
                {"criterion": "focal_loss", "alpha": 0.25, "gamma": 2.0},
            ],
        )
    assert info.value.field == "params.losses[0].gamma"


def test_criteria_ignored_keys_note():
    out, target = _onehot_case()
    result = criteria_list(
        out,
        target,
        losses=[
            {
                "criterion": "focal_loss",
                "alpha": 0.25,
                "gamma": 2.0,
                "reduction": "sum",
                "foo": 1,
                "cur_epoch": 4,
            }
        ],
    )
    # `reduction` is a forward argument upstream, so a config value never reaches it: still the mean.
    torch.testing.assert_close(result.value, _focal(out["pred"], target["target"]), rtol=0, atol=0)
    assert len(result.notes) == 1
    note = result.notes[0]
    assert (
        "params.losses[0]" in note
        and "'reduction'" in note
        and "'foo'" in note
        and "ignored" in note
    )
    assert "cur_epoch" not in note  # the trainer's epoch counter goes to every criterion


def test_criteria_propagates_criterion_notes():
    out, target = {"pred": torch.zeros(0, 3)}, {"target": torch.zeros(0, 3)}
    result = criteria_list(
        out, target, losses=[{"criterion": "focal_loss", "alpha": 0.25, "gamma": 2.0}]
    )
    assert math.isnan(result.value.item())
    assert any(n.startswith("focal_loss: upstream returns NaN") for n in result.notes)


def test_criteria_gradcheck():
    out, target = _onehot_case(seed=2)
    x = out["pred"].requires_grad_(True)
    entries = [{"criterion": "focal_loss", "alpha": 0.25, "gamma": 2.0, "weight": 0.7}]
    assert gradcheck(lambda p: criteria_list({"pred": p}, target, losses=entries).value, (x,))


def test_criteria_unknown_criterion_is_loss_not_found():
    out, target = _onehot_case()
    entries = [
        {"criterion": "focal_loss", "alpha": 0.25, "gamma": 2.0},
        {"criterion": "focal_los", "weight": 1.0},
    ]
    with pytest.raises(LossNotFound) as info:
        criteria_list(out, target, losses=entries)
    assert info.value.field == "params.losses[1].criterion"
    assert "focal_loss" in str(info.value)  # the did-you-mean hint


def test_criteria_rejects_non_netspresso_criteria(monkeypatch):
    fake = LossSpec(
        name="fake_other_family",
        fn=lambda pred, target: pred.sum(),
        families=("fat",),
        summary="a loss of another family",
        inputs=(Input("pred"), Input("target")),
    )
    monkeypatch.setitem(registry._REGISTRY, fake.name, fake)
    out, target = _onehot_case()
    for name in ("fake_other_family", "losses"):
        with pytest.raises(InvalidArgument) as info:
            criteria_list(out, target, losses=[{"criterion": name}])
        assert info.value.field == "params.losses[0].criterion"
        assert "NetsPresso criterion" in str(info.value)


@pytest.mark.parametrize(
    ("losses", "field"),
    [
        ([], "params.losses"),
        ({"criterion": "focal_loss"}, "params.losses"),
        (["focal_loss"], "params.losses[0]"),
        ([{"alpha": 0.25, "gamma": 2.0}], "params.losses[0].criterion"),
        ([{"criterion": 3}], "params.losses[0].criterion"),
        (
            [{"criterion": "focal_loss", "alpha": 0.25, "gamma": 2.0, "weight": "x"}],
            "params.losses[0].weight",
        ),
        ([{"criterion": "focal_loss", "alpha": "a", "gamma": 2.0}], "params.losses[0].alpha"),
    ],
)
def test_criteria_invalid_entries(losses, field):
    out, target = _onehot_case()
    with pytest.raises(InvalidArgument) as info:
        criteria_list(out, target, losses=losses)
    assert info.value.field == field


def test_criteria_spec():
    spec = registry.get("losses")
    assert spec.families == ("netspresso",)
    assert (
        [p.name for p in spec.params] == ["losses"]
        and spec.params[0].type == "list"
        and spec.params[0].required
    )
    with pytest.raises(InvalidArgument):
        spec.canonical_params({})
    for dtype in (torch.float32, torch.float64):
        args, kwargs, params = spec.make_example(dtype)
        result = spec.fn(*args, **kwargs, **spec.canonical_params(params))
        assert isinstance(result, LossOutput) and result.value.dtype == dtype
        weight = params["losses"][0]["weight"]
        torch.testing.assert_close(
            result.value, weight * result.components["focal_loss"], rtol=0, atol=0
        )


def _registered(name: str) -> bool:
    return name in {s.name for s in registry.all_specs()}


@pytest.mark.parametrize("golden", ["yolox_loss__l1_on", "pidnet_loss__ignore_255"])
def test_criteria_other_netspresso_criteria_golden(golden):
    case = load_golden(GOLDEN / "netspresso" / f"{golden}.pt")
    if not _registered(case["name"]):
        pytest.skip(f"{case['name']} is not registered yet")
    entry = {"criterion": case["name"], "weight": 2.0, **case["ctor"]}
    result = criteria_list(*case["args"], losses=[entry])
    torch.testing.assert_close(
        result.value, 2.0 * case["expected_loss"], **GOLDEN_TOL[case["precision"]]
    )
    torch.testing.assert_close(
        result.components[case["name"]], case["expected_loss"], **GOLDEN_TOL[case["precision"]]
    )
    assert result.notes == []


def test_criteria_cur_epoch_reaches_yolox_loss():
    if not _registered("yolox_loss"):
        pytest.skip("yolox_loss is not registered yet")
    case = load_golden(GOLDEN / "netspresso" / "yolox_loss__l1_on.pt")
    on = criteria_list(
        *case["args"], losses=[{"criterion": "yolox_loss", "l1_activate_epoch": 1, "cur_epoch": 3}]
    )
    off = criteria_list(
        *case["args"], losses=[{"criterion": "yolox_loss", "l1_activate_epoch": 1, "cur_epoch": 0}]
    )
    torch.testing.assert_close(on.value, case["expected_loss"], **GOLDEN_TOL[case["precision"]])
    assert off.value.item() < on.value.item()  # the L1 term is off before l1_activate_epoch
    assert on.notes == [] and off.notes == []
