"""``from_config`` reads the three trainers' loss configs verbatim."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lossd.client import RemoteLoss, RemoteLossSet, from_config
from lossd.server import registry


def _ce_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g)


# ------------------------------------------------------------------------------- fat


@pytest.mark.parametrize(
    "cfg",
    [{}, {"loss": None}, {"loss": {}}, {"loss": {"label_smoothing": 0.0}}, None],
    ids=["empty", "loss-null", "loss-empty", "no-name", "none"],
)
def test_fat_missing_loss_or_name_means_cross_entropy(cfg, endpoint):
    crit = from_config(cfg, endpoint=endpoint)
    x, t = _ce_inputs()
    assert crit.name == "cross_entropy"
    assert torch.equal(crit(x, t), F.cross_entropy(x, t))


def test_fat_names_are_lower_cased_and_forwarded_params_used(endpoint):
    crit = from_config(
        {"loss": {"name": "Cross_Entropy", "label_smoothing": 0.1, "weight": [1, 2, 1, 1]}},
        endpoint=endpoint,
    )
    x, t = _ce_inputs()
    assert crit.params == {"label_smoothing": 0.1, "weight": [1, 2, 1, 1]}
    expected = F.cross_entropy(x, t, label_smoothing=0.1, weight=torch.tensor([1.0, 2.0, 1.0, 1.0]))
    assert torch.equal(crit(x, t), expected)


def test_fat_drops_params_it_does_not_forward_with_a_warning(endpoint):
    with pytest.warns(UserWarning, match="does not forward reduction to mse"):
        crit = from_config({"loss": {"name": "mse", "reduction": "sum"}}, endpoint=endpoint)
    x, y = torch.randn(3, 2), torch.randn(3, 2)
    assert torch.equal(crit(x, y), F.mse_loss(x, y))  # still mean, as fat


def test_fat_kl_div_defaults_to_batchmean_and_forwards_reduction(endpoint):
    x, y = torch.randn(4, 3).log_softmax(-1), torch.randn(4, 3).softmax(-1)
    assert torch.equal(
        from_config({"loss": {"name": "kl_div"}}, endpoint=endpoint)(x, y),
        F.kl_div(x, y, reduction="batchmean"),
    )
    assert torch.equal(
        from_config({"loss": {"name": "kl_div", "reduction": "sum"}}, endpoint=endpoint)(x, y),
        F.kl_div(x, y, reduction="sum"),
    )


def test_fat_unknown_name_lists_the_nine():
    with pytest.raises(ValueError, match="sqr_hinge"):
        from_config({"loss": {"name": "hinge"}})


def test_yaml_text_and_path_work_like_mappings(tmp_path, endpoint):
    text = "loss:\n  name: smooth_l1\n  beta: 0.5\n"
    path = tmp_path / "train.yaml"
    path.write_text(text)
    x, y = torch.randn(5), torch.randn(5)
    expected = F.smooth_l1_loss(x, y, beta=0.5)
    assert torch.equal(from_config(text, endpoint=endpoint)(x, y), expected)
    assert torch.equal(from_config(path, endpoint=endpoint)(x, y), expected)
    assert torch.equal(from_config(str(path), endpoint=endpoint)(x, y), expected)


# ------------------------------------------------------------------------------- NetsPresso


def _onehot_case(seed=1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 3, generator=g, dtype=torch.float64)
    target = F.one_hot(torch.randint(0, 3, (5,), generator=g), 3).to(torch.float64)
    return {"pred": logits}, {"target": target}


def _focal(x, t, alpha=0.25, gamma=2.0):
    p = x.sigmoid()
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    return (ce * (1 - p_t) ** gamma * (alpha * t + (1 - alpha) * (1 - t))).mean()


@pytest.mark.parametrize(
    "cfg",
    [
        [
            {"criterion": "cross_entropy", "weight": None},
            {"criterion": "focal_loss", "alpha": 0.25, "gamma": 2.0, "weight": 0.5},
        ],
        {
            "losses": [
                {"criterion": "cross_entropy", "weight": None},
                {"criterion": "focal_loss", "alpha": 0.25, "gamma": 2.0, "weight": 0.5},
            ]
        },
        {
            "model": {
                "losses": [
                    {"criterion": "cross_entropy", "weight": None},
                    {"criterion": "focal_loss", "alpha": 0.25, "gamma": 2.0, "weight": 0.5},
                ]
            }
        },
        "model:\n  losses:\n    - criterion: cross_entropy\n      weight: ~\n    - criterion: focal_loss\n      alpha: 0.25\n      gamma: 2.0\n      weight: 0.5\n",
    ],
    ids=["list", "losses", "model.losses", "yaml"],
)
def test_netspresso_criteria_are_summed_with_weights_in_one_rpc(cfg, endpoint):
    crit = from_config(cfg, endpoint=endpoint)
    out, target = _onehot_case()
    pred = out["pred"].clone().requires_grad_(True)
    total = crit({"pred": pred}, target)
    ce = F.cross_entropy(out["pred"], target["target"])
    focal = _focal(out["pred"], target["target"])
    torch.testing.assert_close(total.detach(), ce + 0.5 * focal, rtol=1e-12, atol=0)
    components = crit.last_result.components
    torch.testing.assert_close(components["cross_entropy"], ce, rtol=1e-12, atol=0)
    torch.testing.assert_close(components["focal_loss"], focal, rtol=1e-12, atol=0)
    total.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


# ------------------------------------------------------------------------------- visdet


def test_visdet_type_dict_builds_that_loss(endpoint):
    crit = from_config({"type": "SmoothL1Loss", "beta": 1.0, "loss_weight": 2.0}, endpoint=endpoint)
    assert (
        isinstance(crit, RemoteLoss)
        and crit.name == "SmoothL1Loss"
        and crit.params == {"beta": 1.0, "loss_weight": 2.0}
    )
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    torch.testing.assert_close(crit(x, y), 2.0 * F.smooth_l1_loss(x, y))


# The sigmoid focal classification loss that RetinaNet, FCOS and ATSS configs share.
FOCAL_CLS = {
    "type": "FocalLoss",
    "use_sigmoid": True,
    "gamma": 2.0,
    "alpha": 0.25,
    "loss_weight": 1.0,
}

DETECTORS = {
    "RetinaNet": {
        "loss_cls": FOCAL_CLS,
        "loss_bbox": {"type": "SmoothL1Loss", "beta": 1.0, "loss_weight": 1.0},
    },
    "FCOS": {
        "loss_cls": FOCAL_CLS,
        "loss_bbox": {"type": "IoULoss", "mode": "log", "loss_weight": 1.0},
        "loss_centerness": {"type": "CrossEntropyLoss", "use_sigmoid": True, "loss_weight": 1.0},
    },
    "ATSS": {
        "loss_cls": FOCAL_CLS,
        "loss_bbox": {"type": "GIoULoss", "loss_weight": 2.0},
        "loss_centerness": {"type": "CrossEntropyLoss", "use_sigmoid": True, "loss_weight": 1.0},
    },
    "GFL": {
        "loss_cls": {
            "type": "QualityFocalLoss",
            "use_sigmoid": True,
            "beta": 2.0,
            "loss_weight": 1.0,
        },
        "loss_bbox": {"type": "GIoULoss", "loss_weight": 2.0},
        "loss_dfl": {"type": "DistributionFocalLoss", "loss_weight": 0.25},
    },
}


def _boxes(n, g):
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 10
    return torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=g, dtype=torch.float64) * 5], dim=1)


@pytest.mark.parametrize("detector", list(DETECTORS))
def test_detector_loss_sets_from_one_config(detector, endpoint):
    cfg = {"bbox_head": {"type": f"{detector}Head", "num_classes": 3, **DETECTORS[detector]}}
    losses = from_config(cfg, endpoint=endpoint)
    assert isinstance(losses, RemoteLossSet)
    assert set(losses) == {f"bbox_head__{k}" for k in DETECTORS[detector]}
    g = torch.Generator().manual_seed(2)
    n, c = 5, 3
    logits = torch.randn(n, c, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 3, 2, 3])  # 3 = background
    for key, crit in losses.items():
        kind = crit.name
        if kind == "FocalLoss":
            args, kwargs = (logits, labels), {"avg_factor": 3.0}
        elif kind == "QualityFocalLoss":
            args, kwargs = (logits, (labels, torch.rand(n, generator=g, dtype=torch.float64))), {}
        elif kind == "SmoothL1Loss":
            args, kwargs = (
                (
                    torch.randn(n, 4, generator=g, dtype=torch.float64),
                    torch.randn(n, 4, generator=g, dtype=torch.float64),
                ),
                {},
            )
        elif kind in ("IoULoss", "GIoULoss"):
            args, kwargs = (_boxes(n, g), _boxes(n, g)), {}
        elif kind == "CrossEntropyLoss":
            args, kwargs = (
                (
                    torch.randn(n, generator=g, dtype=torch.float64),
                    torch.rand(n, generator=g, dtype=torch.float64),
                ),
                {},
            )
        else:  # DistributionFocalLoss
            args, kwargs = (
                (
                    torch.randn(n, 8, generator=g, dtype=torch.float64),
                    torch.rand(n, generator=g, dtype=torch.float64) * 6.9,
                ),
                {},
            )
        value = crit(*args, **kwargs)
        # The config's parameters (loss_weight, gamma, mode, ...) reached the server's loss.
        spec = registry.get(kind)
        local = spec.fn(*args, **kwargs, **spec.canonical_params(crit.params))
        assert value.dim() == 0, key
        torch.testing.assert_close(
            value.detach(), getattr(local, "value", local).detach(), rtol=1e-12, atol=0
        )
    shared = {id(crit.client) for crit in losses.values()}
    assert len(shared) == 1, "a loss set shares one connection"
    losses.close()


def test_a_loss_sets_options_reach_every_loss_and_its_connection_is_shared(endpoint):
    cfg = {"bbox_head": {"type": "GFLHead", **DETECTORS["GFL"]}}
    losses = from_config(
        cfg,
        endpoint=endpoint,
        timeout=7.0,
        transport="unary",
        run_id="set-run",
        tags={"head": "gfl"},
    )
    try:
        assert {crit.transport.mode for crit in losses.values()} == {"unary"}
        assert {(crit.run_id, tuple(crit.tags.items())) for crit in losses.values()} == {
            ("set-run", (("head", "gfl"),))
        }
        assert {crit.client.timeout for crit in losses.values()} == {7.0}
    finally:
        losses.close()


# ------------------------------------------------------------------------------- client checks


def test_client_checks_parameters_against_the_servers_declaration_before_sending(endpoint):
    from lossd.client import LossdError

    big = torch.randn(64, 1000)
    with RemoteLoss("FocalLoss", endpoint=endpoint, gama=2.0) as crit:
        with pytest.raises(LossdError) as info:
            crit(big, torch.zeros(64, dtype=torch.long))
        assert info.value.field == "params.gama" and "did you mean gamma" in info.value.details
        assert crit.last_result is None, "nothing was computed"
    with (
        RemoteLoss("focal_loss", endpoint=endpoint, alpha=0.25) as crit,
        pytest.raises(LossdError, match="requires parameter 'gamma'"),
    ):
        crit({"pred": big}, {"target": big})
    with (
        RemoteLoss("FocalLoss", endpoint=endpoint, gamma="2") as crit,
        pytest.raises(LossdError, match="expected float, got str"),
    ):
        crit(big, torch.zeros(64, dtype=torch.long))


# ------------------------------------------------------------------------------- the whole registry


def _family_config(family: str, name: str, params: dict) -> object:
    """A config that names ``name`` the way its trainer's own config file would."""
    if family == "fat":
        return {"loss": {"name": name, **params}}
    if family == "visdet":
        return {"type": name, **params}
    if name == "losses":
        return {"losses": params["losses"]}
    # An entry's `weight` is NetsPresso's multiplier, never a loss parameter (fat's class weights).
    return {
        "losses": [
            {
                "criterion": name,
                **{k: v for k, v in params.items() if k != "weight"},
                "weight": None,
            }
        ]
    }


FAMILY_LOSSES = [(family, spec) for spec in registry.all_specs() for family in spec.families]


@pytest.mark.parametrize(
    ("family", "spec"), FAMILY_LOSSES, ids=[f"{f}-{s.name}" for f, s in FAMILY_LOSSES]
)
def test_every_loss_is_served_through_its_familys_config(family, spec, endpoint):
    from lossd.server.engine import Engine

    args, kwargs, params = spec.make_example(torch.float64)
    config = _family_config(family, spec.name, params)
    crit = from_config(config, endpoint=endpoint)
    with crit:
        value = crit(*args, **kwargs)
    if family == "netspresso":  # a criterion list, one RPC, summed with its weights
        assert crit.name == "losses" and crit.params["losses"] == config["losses"]
    else:
        assert crit.name == spec.name
    if family == "visdet":
        assert crit.params == params
    expected = Engine("cpu").evaluate(crit.name, crit.params, list(args), kwargs).value
    torch.testing.assert_close(
        value.detach().cpu(), expected, rtol=1e-10, atol=1e-12, equal_nan=True
    )
