"""visdet / MMDetection classification losses: CrossEntropyLoss (softmax, sigmoid and mask
modes, ignore_index and avg_non_ignore), FocalLoss, QualityFocalLoss and DistributionFocalLoss,
by hand, at their edges and against bad targets; and the float64 gradcheck of every visdet loss
(the regression and box ones included).

Registration, golden values, the shared reduction chain, the regression and box losses and
devices: test_visdet.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.testing import assert_close

import lossd.server.losses  # noqa: F401  (registers every spec)
from lossd.server import registry
from lossd.server._reduction import AVG_FACTOR_EPS
from lossd.server.errors import InvalidArgument
from tests.support.losskit import F64, call, example, gen, notes, value


def bce_by_hand(x, t):
    """-(t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))), written out with logsigmoid."""
    return -(t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x))


# ------------------------------------------------------------------------------------------
# CrossEntropyLoss
# ------------------------------------------------------------------------------------------

LOGITS = torch.tensor(
    [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [1.0, 1.0, 1.0]], dtype=F64
)
LABELS = torch.tensor([0, 2, 1, 1])


def nll_by_hand(logits, labels):
    return -torch.log_softmax(logits, 1)[torch.arange(len(labels)), labels]


def test_ce_softmax_known_values():
    per = nll_by_hand(LOGITS, LABELS)
    assert_close(value(call("CrossEntropyLoss", LOGITS, LABELS)), per.mean())
    assert_close(value(call("CrossEntropyLoss", LOGITS, LABELS, reduction="none")), per)
    assert_close(value(call("CrossEntropyLoss", LOGITS, LABELS, reduction="sum")), per.sum())


def test_ce_class_weight_mean_divides_by_n_not_sum_of_weights():
    cw = [0.5, 2.0, 4.0]
    per = nll_by_hand(LOGITS, LABELS) * torch.tensor(cw, dtype=F64)[LABELS]
    got = value(call("CrossEntropyLoss", LOGITS, LABELS, class_weight=cw))
    assert_close(got, per.sum() / 4)
    torch_mean = F.cross_entropy(LOGITS, LABELS, weight=torch.tensor(cw, dtype=F64))
    assert not torch.allclose(got, torch_mean)
    with pytest.raises(InvalidArgument, match="class_weight"):
        call("CrossEntropyLoss", LOGITS, LABELS, class_weight=[1.0, 2.0])


def test_ce_sample_weight_is_cast_to_float32():
    w = torch.tensor([0.1, 0.7, 1.3, 2.9], dtype=F64)  # not exactly representable in float32
    per = nll_by_hand(LOGITS, LABELS)
    got = value(call("CrossEntropyLoss", LOGITS, LABELS, w))
    assert_close(got, (per * w.float()).mean(), rtol=1e-15, atol=0)
    assert got.item() != (per * w).mean().item()


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_ce_ignore_index(avg_non_ignore):
    labels = torch.tensor([0, 255, 1, 255])
    kept = nll_by_hand(LOGITS[[0, 2]], torch.tensor([0, 1]))
    got = value(
        call("CrossEntropyLoss", LOGITS, labels, ignore_index=255, avg_non_ignore=avg_non_ignore)
    )
    # mean counts ignored elements unless avg_non_ignore (then /(2 + eps))
    expected = kept.sum() / (2 + AVG_FACTOR_EPS) if avg_non_ignore else kept.sum() / 4
    assert_close(got, expected)
    # the call-time ignore_index (upstream forward argument) overrides the constructor's
    got2 = value(
        call(
            "CrossEntropyLoss",
            LOGITS,
            labels,
            None,
            None,
            None,
            255,
            ignore_index=7,
            avg_non_ignore=avg_non_ignore,
        )
    )
    assert_close(got2, expected)


def test_ce_ignore_index_without_avg_non_ignore_notes_upstream_warning():
    out = call("CrossEntropyLoss", LOGITS, LABELS, ignore_index=255)
    assert any("avg_non_ignore" in n for n in notes(out))
    assert not notes(
        call("CrossEntropyLoss", LOGITS, LABELS, ignore_index=255, avg_non_ignore=True)
    )
    assert not notes(call("CrossEntropyLoss", LOGITS, LABELS))


def test_ce_sigmoid_ignore_index_label():
    labels = torch.tensor([0, 255, 1, 3])
    onehot = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=F64)
    valid = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=F64)[:, None]
    got = value(
        call(
            "CrossEntropyLoss", LOGITS, labels, use_sigmoid=True, ignore_index=255, reduction="sum"
        )
    )
    assert_close(got, (bce_by_hand(LOGITS, onehot) * valid).sum().float())


def test_ce_avg_non_ignore_equals_torch_mean_and_default_minus_100():
    labels = torch.tensor([0, -100, 1, 2])
    got = value(call("CrossEntropyLoss", LOGITS, labels, avg_non_ignore=True))
    assert_close(got, F.cross_entropy(LOGITS, labels), rtol=1e-6, atol=0)
    none = value(call("CrossEntropyLoss", LOGITS, labels, reduction="none"))
    assert none[1].item() == 0.0


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_ce_all_ignored_is_zero(avg_non_ignore):
    labels = torch.full((4,), -100)
    got = value(call("CrossEntropyLoss", LOGITS, labels, avg_non_ignore=avg_non_ignore))
    assert got.item() == 0.0
    assert torch.isnan(F.cross_entropy(LOGITS, labels))  # unlike torch


@pytest.mark.parametrize("bad", [3, -1, 100])
def test_ce_label_out_of_range(bad):
    labels = torch.tensor([0, bad, 1, 1])
    with pytest.raises(InvalidArgument) as err:
        call("CrossEntropyLoss", LOGITS, labels)
    assert err.value.field == "label" and str(bad) in err.value.message


def test_ce_empty_is_nan_with_note():
    out = call("CrossEntropyLoss", torch.zeros(0, 3, dtype=F64), torch.zeros(0, dtype=torch.long))
    assert torch.isnan(value(out)) and notes(out)


def test_ce_softmax_spatial_and_probability_labels():
    gen_ = gen(8)
    logits = torch.randn(2, 3, 4, generator=gen_, dtype=F64)
    labels = torch.randint(0, 3, (2, 4), generator=gen_)
    got = value(call("CrossEntropyLoss", logits, labels, reduction="none"))
    assert_close(got, -torch.log_softmax(logits, 1).gather(1, labels[:, None])[:, 0])
    probs = torch.softmax(torch.randn(4, 3, generator=gen_, dtype=F64), 1)
    got = value(call("CrossEntropyLoss", LOGITS, probs))
    assert_close(got, -(probs * torch.log_softmax(LOGITS, 1)).sum(1).mean())


def test_ce_use_sigmoid_and_use_mask_exclusive():
    with pytest.raises(InvalidArgument, match="use_sigmoid"):
        call("CrossEntropyLoss", LOGITS, LABELS, use_sigmoid=True, use_mask=True)


def test_ce_sigmoid_index_labels():
    # 3 = C is background (all-zero row), -1 is invalid (weight 0), 255 ignored
    labels = torch.tensor([0, 3, -1, 2])
    onehot = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 1]], dtype=F64)
    valid = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=F64)[:, None]
    per = bce_by_hand(LOGITS, onehot) * valid
    got = value(call("CrossEntropyLoss", LOGITS, labels, use_sigmoid=True))
    # upstream feeds BCE float32 targets: the loss is float32 even for float64 logits
    assert got.dtype == torch.float32
    assert_close(got, per.mean().float())
    got = value(call("CrossEntropyLoss", LOGITS, labels, use_sigmoid=True, avg_non_ignore=True))
    assert_close(got, (per.sum() / (9 + AVG_FACTOR_EPS)).float())
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    got = value(call("CrossEntropyLoss", LOGITS, labels, w, use_sigmoid=True, reduction="sum"))
    assert_close(got, (per * w[:, None]).sum().float())
    with pytest.raises(InvalidArgument, match="weight"):
        call("CrossEntropyLoss", LOGITS, labels, torch.ones(3, dtype=F64), use_sigmoid=True)


def test_ce_sigmoid_class_weight_is_pos_weight():
    labels = torch.tensor([0, 3, 1, 2])
    onehot = F.one_hot(labels, 4)[:, :3].to(F64)
    pw = torch.tensor([2.0, 0.5, 3.0], dtype=F64)
    per = -(pw * onehot * F.logsigmoid(LOGITS) + (1 - onehot) * F.logsigmoid(-LOGITS))
    got = value(
        call("CrossEntropyLoss", LOGITS, labels, use_sigmoid=True, class_weight=pw.tolist())
    )
    assert_close(got, per.mean().float())


def test_ce_sigmoid_same_shape_labels_and_ignore():
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    per = bce_by_hand(LOGITS, labels.to(F64))
    assert_close(
        value(call("CrossEntropyLoss", LOGITS, labels, use_sigmoid=True)), per.mean().float()
    )
    # same-shape labels equal to ignore_index (or negative) get weight 0
    labels[0, 2] = -100
    labels[1, 0] = -5
    mask = torch.ones(4, 3, dtype=F64)
    mask[0, 2] = mask[1, 0] = 0
    got = value(call("CrossEntropyLoss", LOGITS, labels, use_sigmoid=True, avg_non_ignore=True))
    per = bce_by_hand(LOGITS, labels.to(F64)) * mask
    assert_close(got, (per.sum() / (10 + AVG_FACTOR_EPS)).float())


def test_ce_mask_mode():
    gen_ = gen(9)
    pred = torch.randn(3, 4, 2, 2, generator=gen_, dtype=F64)
    target = torch.rand(3, 2, 2, generator=gen_, dtype=F64)
    roi_labels = torch.tensor([2, 0, 3])
    out = value(call("CrossEntropyLoss", pred, target, roi_labels, use_mask=True, loss_weight=2.0))
    chosen = pred[torch.arange(3), roi_labels]
    assert out.shape == (1,)
    assert_close(out, 2.0 * bce_by_hand(chosen, target).mean()[None])
    cw = [1.0, 3.0]  # broadcasts over the last (W = 2) dim, as upstream's BCE weight
    out = value(call("CrossEntropyLoss", pred, target, roi_labels, use_mask=True, class_weight=cw))
    assert_close(out, (bce_by_hand(chosen, target) * torch.tensor(cw, dtype=F64)).mean()[None])


@pytest.mark.parametrize(
    ("args", "params", "field"),
    [
        ((None, "sum"), {}, "reduction"),
        ((7.0,), {}, "avg_factor"),
        ((None, None), {"ignore_index": 255}, "ignore_index"),
        ((None, None, 3), {}, "ignore_index"),
    ],
)
def test_ce_mask_mode_rejects_what_upstream_asserts(args, params, field):
    pred, target, roi_labels = (
        torch.zeros(2, 3, 2, 2, dtype=F64),
        torch.zeros(2, 2, 2, dtype=F64),
        torch.tensor([0, 1]),
    )
    with pytest.raises(InvalidArgument) as err:
        call("CrossEntropyLoss", pred, target, roi_labels, *args, use_mask=True, **params)
    assert err.value.field == field


def test_ce_mask_mode_label_checks():
    pred, target = torch.zeros(2, 3, 2, 2, dtype=F64), torch.zeros(2, 2, 2, dtype=F64)
    with pytest.raises(InvalidArgument, match="weight"):
        call("CrossEntropyLoss", pred, target, torch.tensor([0, 3]), use_mask=True)
    with pytest.raises(InvalidArgument, match="weight"):
        call("CrossEntropyLoss", pred, target, None, use_mask=True)
    with pytest.raises(InvalidArgument, match="label"):
        call(
            "CrossEntropyLoss",
            pred,
            torch.zeros(2, 3, 3, dtype=F64),
            torch.tensor([0, 1]),
            use_mask=True,
        )
    # Python-style negative indices are what upstream's pred[r, label[r]] accepts
    got = value(
        call(
            "CrossEntropyLoss",
            pred + torch.arange(3.0, dtype=F64)[:, None, None],
            target,
            torch.tensor([-1, 2]),
            use_mask=True,
        )
    )
    assert_close(got, bce_by_hand(torch.full((2, 2, 2), 2.0, dtype=F64), target).mean()[None])


# ------------------------------------------------------------------------------------------
# FocalLoss
# ------------------------------------------------------------------------------------------

FOCAL_LABELS = torch.tensor([0, 3, 2, 1])  # 3 == C: background


def focal_by_hand(x, t, gamma, alpha):
    p = torch.sigmoid(x)
    p_t = p * t + (1 - p) * (1 - t)
    return bce_by_hand(x, t) * (alpha * t + (1 - alpha) * (1 - t)) * (1 - p_t) ** gamma


def test_focal_gamma_zero_is_weighted_bce():
    onehot = F.one_hot(FOCAL_LABELS, 4)[:, :3].to(F64)
    got = value(call("FocalLoss", LOGITS, FOCAL_LABELS, gamma=0.0, alpha=0.5, reduction="none"))
    assert_close(got, 0.5 * bce_by_hand(LOGITS, onehot))
    got = value(call("FocalLoss", LOGITS, FOCAL_LABELS, gamma=0.0, alpha=0.75))
    assert_close(got, (bce_by_hand(LOGITS, onehot) * (0.75 * onehot + 0.25 * (1 - onehot))).mean())


@pytest.mark.parametrize(("gamma", "alpha"), [(2.0, 0.25), (1.5, 0.6), (0.5, 1.0)])
def test_focal_known_values(gamma, alpha):
    onehot = F.one_hot(FOCAL_LABELS, 4)[:, :3].to(F64)
    got = value(call("FocalLoss", LOGITS, FOCAL_LABELS, gamma=gamma, alpha=alpha, reduction="none"))
    assert_close(got, focal_by_hand(LOGITS, onehot, gamma, alpha))
    if alpha < 1:
        assert got[1].abs().sum() > 0  # the background row is all negatives, not ignored


def test_focal_one_hot_and_soft_targets_mmdet():
    onehot = F.one_hot(FOCAL_LABELS, 4)[:, :3].to(F64)
    assert_close(
        value(call("FocalLoss", LOGITS, onehot)), value(call("FocalLoss", LOGITS, FOCAL_LABELS))
    )
    soft = torch.rand(4, 3, generator=gen(4), dtype=F64)
    got = value(call("FocalLoss", LOGITS, soft, reduction="sum"))
    assert_close(got, focal_by_hand(LOGITS, soft, 2.0, 0.25).sum())


def test_focal_activated_mmdet():
    probs = torch.sigmoid(LOGITS)
    onehot = F.one_hot(FOCAL_LABELS, 4)[:, :3].to(F64)
    got = value(call("FocalLoss", probs, FOCAL_LABELS, activated=True))
    assert_close(got, value(call("FocalLoss", LOGITS, FOCAL_LABELS)), rtol=1e-10, atol=1e-12)
    assert_close(value(call("FocalLoss", probs, onehot, activated=True)), got)
    with pytest.raises(InvalidArgument, match="pred"):
        call("FocalLoss", LOGITS, FOCAL_LABELS, activated=True)


def test_focal_weight_shapes():
    none = value(call("FocalLoss", LOGITS, FOCAL_LABELS, reduction="none"))
    w = torch.tensor([1.0, 0.0, 2.0, 0.5], dtype=F64)
    assert_close(
        value(call("FocalLoss", LOGITS, FOCAL_LABELS, w, reduction="sum")),
        (none * w[:, None]).sum(),
    )
    wc = torch.rand(4, 3, generator=gen(6), dtype=F64)
    assert_close(
        value(call("FocalLoss", LOGITS, FOCAL_LABELS, wc, reduction="sum")), (none * wc).sum()
    )
    # a flattened (N*C,) weight is viewed as (N, C)
    assert_close(
        value(call("FocalLoss", LOGITS, FOCAL_LABELS, wc.flatten(), reduction="sum")),
        (none * wc).sum(),
    )
    with pytest.raises(InvalidArgument, match="weight"):
        call("FocalLoss", LOGITS, FOCAL_LABELS, torch.ones(5, dtype=F64))


def test_focal_avg_factor_num_pos():
    none = value(call("FocalLoss", LOGITS, FOCAL_LABELS, reduction="none"))
    got = value(call("FocalLoss", LOGITS, FOCAL_LABELS, None, 3, loss_weight=2.0))
    assert_close(got, 2.0 * none.sum() / (3 + AVG_FACTOR_EPS))


@pytest.mark.parametrize("bad", [4, -1])
def test_focal_index_out_of_range(bad):
    with pytest.raises(InvalidArgument) as err:
        call("FocalLoss", LOGITS, torch.tensor([0, bad, 1, 1]))
    assert err.value.field == "target" and "[0, 3]" in err.value.message


def test_focal_rejects_use_sigmoid_false_and_bad_targets():
    with pytest.raises(InvalidArgument, match="use_sigmoid"):
        call("FocalLoss", LOGITS, FOCAL_LABELS, use_sigmoid=False)  # a declared choice
    with pytest.raises(InvalidArgument):
        registry.get("FocalLoss").canonical_params({"use_sigmoid": False})
    with pytest.raises(InvalidArgument, match="target"):
        call("FocalLoss", LOGITS, torch.zeros(4, 2, dtype=F64))
    with pytest.raises(InvalidArgument, match="target"):
        call("FocalLoss", LOGITS, FOCAL_LABELS.to(torch.int32))


def test_focal_empty_is_nan_with_note():
    out = call(
        "FocalLoss",
        torch.zeros(0, 3, dtype=F64),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=F64),
    )
    assert torch.isnan(value(out)) and notes(out)


# ------------------------------------------------------------------------------------------
# QualityFocalLoss
# ------------------------------------------------------------------------------------------

QFL_LABELS = torch.tensor([1, 3, 0, -1])  # 3 == C and -1 are negatives
QFL_SCORES = torch.tensor([0.8, 0.0, 0.35, 0.9], dtype=F64)


def qfl_by_hand(x, labels, scores, beta):
    p = torch.sigmoid(x)
    loss = F.softplus(x) * p**beta  # BCE(x, 0) = softplus(x)
    for i, (lab, s) in enumerate(zip(labels.tolist(), scores, strict=True)):
        if 0 <= lab < x.size(1):
            loss[i, lab] = bce_by_hand(x[i, lab], s) * (s - p[i, lab]).abs() ** beta
    return loss.sum(1)


@pytest.mark.parametrize("beta", [2.0, 1.0, 0.5])
def test_qfl_known_values(beta):
    got = value(
        call("QualityFocalLoss", LOGITS, (QFL_LABELS, QFL_SCORES), beta=beta, reduction="none")
    )
    assert got.shape == (4,)
    assert_close(got, qfl_by_hand(LOGITS, QFL_LABELS, QFL_SCORES, beta))


def test_qfl_dense_target_matches_pair_mmdet():
    dense = torch.zeros(4, 3, dtype=F64)
    dense[0, 1], dense[2, 0] = 0.8, 0.35
    pair = value(call("QualityFocalLoss", LOGITS, [QFL_LABELS, QFL_SCORES], reduction="none"))
    assert_close(value(call("QualityFocalLoss", LOGITS, dense, reduction="none")), pair)


def test_qfl_activated_mmdet():
    probs = torch.sigmoid(LOGITS)
    got = value(call("QualityFocalLoss", probs, (QFL_LABELS, QFL_SCORES), activated=True))
    assert_close(
        got,
        value(call("QualityFocalLoss", LOGITS, (QFL_LABELS, QFL_SCORES))),
        rtol=1e-10,
        atol=1e-12,
    )
    dense = torch.zeros(4, 3, dtype=F64)
    dense[0, 1], dense[2, 0] = 0.8, 0.35
    assert_close(
        value(call("QualityFocalLoss", probs, dense, activated=True)), got, rtol=1e-10, atol=1e-12
    )
    with pytest.raises(InvalidArgument, match="pred"):
        call("QualityFocalLoss", LOGITS, (QFL_LABELS, QFL_SCORES), activated=True)


def test_qfl_weight_avg_factor_and_inputs_untouched():
    labels, scores = QFL_LABELS.clone(), QFL_SCORES.clone()
    none = value(call("QualityFocalLoss", LOGITS, (labels, scores), reduction="none"))
    w = torch.tensor([2.0, 1.0, 0.0, 0.5], dtype=F64)
    got = value(call("QualityFocalLoss", LOGITS, (labels, scores), w, 2.0))
    assert_close(got, (none * w).sum() / (2 + AVG_FACTOR_EPS))
    assert torch.equal(labels, QFL_LABELS) and torch.equal(scores, QFL_SCORES)


def test_qfl_bad_targets():
    with pytest.raises(InvalidArgument, match="target"):
        call("QualityFocalLoss", LOGITS, (QFL_LABELS,))
    with pytest.raises(InvalidArgument, match=r"target\[1\]"):
        call("QualityFocalLoss", LOGITS, (QFL_LABELS, QFL_SCORES[:3]))
    with pytest.raises(InvalidArgument, match="target"):
        call("QualityFocalLoss", LOGITS, torch.zeros(4, 2, dtype=F64))
    with pytest.raises(InvalidArgument, match="use_sigmoid"):
        call("QualityFocalLoss", LOGITS, (QFL_LABELS, QFL_SCORES), use_sigmoid=False)


# ------------------------------------------------------------------------------------------
# DistributionFocalLoss
# ------------------------------------------------------------------------------------------


def test_dfl_known_values():
    pred = torch.randn(3, 5, generator=gen(10), dtype=F64)
    target = torch.tensor([2.5, 0.25, 3.0], dtype=F64)
    logp = torch.log_softmax(pred, 1)
    expected = torch.stack(
        [
            -(0.5 * logp[0, 2] + 0.5 * logp[0, 3]),
            -(0.75 * logp[1, 0] + 0.25 * logp[1, 1]),
            -logp[2, 3],  # an integer distance uses only its own bin
        ]
    )
    assert_close(value(call("DistributionFocalLoss", pred, target, reduction="none")), expected)


def test_dfl_gradient_to_target():
    pred = torch.randn(2, 5, generator=gen(11), dtype=F64)
    target = torch.tensor([1.3, 3.6], dtype=F64, requires_grad=True)
    out = value(call("DistributionFocalLoss", pred, target, reduction="sum"))
    (g,) = torch.autograd.grad(out, target)
    logp = torch.log_softmax(pred, 1)
    # d/dy [CE_l (r - y) + CE_r (y - l)] = CE_r - CE_l
    assert_close(g, torch.stack([-logp[0, 2] + logp[0, 1], -logp[1, 4] + logp[1, 3]]))


@pytest.mark.parametrize("bad", [4.0, 4.5, -0.5, float("nan")])
def test_dfl_target_out_of_range(bad):
    pred = torch.zeros(2, 5, dtype=F64)  # n = 4: 0 <= y < 4
    with pytest.raises(InvalidArgument) as err:
        call("DistributionFocalLoss", pred, torch.tensor([1.0, bad], dtype=F64))
    assert err.value.field == "target" and "0 <= y < 4" in err.value.message


def test_dfl_target_just_below_n_is_fine():
    pred = torch.randn(1, 5, generator=gen(12), dtype=F64)
    got = value(call("DistributionFocalLoss", pred, torch.tensor([3.99], dtype=F64)))
    logp = torch.log_softmax(pred, 1)
    assert_close(got, -(0.01 * logp[0, 3] + 0.99 * logp[0, 4]))


# ------------------------------------------------------------------------------------------
# gradcheck (float64) for every differentiable input
# ------------------------------------------------------------------------------------------


def _gradcheck(fn, *inputs):
    inputs = [i.detach().clone().requires_grad_(True) for i in inputs]
    assert gradcheck(lambda *xs: value(fn(*xs)), inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    "name",
    ["L1Loss", "SmoothL1Loss", "MSELoss", "BalancedL1Loss", "GIoULoss", "DistributionFocalLoss"],
)
def test_gradcheck_pair_losses(name):
    args, _, _ = example(name)
    weight = (
        torch.rand(
            *args[0].shape[: 1 if name in ("GIoULoss", "DistributionFocalLoss") else 2],
            generator=gen(1),
            dtype=F64,
        )
        + 0.5
    )
    _gradcheck(lambda p, t: call(name, p, t, weight, loss_weight=1.5), *args)


@pytest.mark.parametrize("mode", ["linear", "square", "log"])
def test_gradcheck_iou(mode):
    args, _, _ = example("IoULoss")
    _gradcheck(lambda p, t: call("IoULoss", p, t, mode=mode, reduction="sum"), *args)


def test_gradcheck_ce():
    w = torch.tensor([1.0, 0.5, 2.0, 1.0, 1.0, 0.25], dtype=F64)
    args, _, _ = example("CrossEntropyLoss")
    _gradcheck(
        lambda p: call("CrossEntropyLoss", p, args[1], w, class_weight=[1.0, 2.0, 0.5, 1.0]),
        args[0],
    )
    probs = torch.softmax(torch.randn(6, 4, generator=gen(2), dtype=F64), 1)
    _gradcheck(lambda p, t: call("CrossEntropyLoss", p, t), args[0], probs)


def test_gradcheck_ce_mask_mode():
    pred = torch.randn(3, 4, 2, 2, generator=gen(3), dtype=F64)
    target = torch.rand(3, 2, 2, generator=gen(4), dtype=F64)
    _gradcheck(
        lambda p, t: call("CrossEntropyLoss", p, t, torch.tensor([1, 0, 3]), use_mask=True),
        pred,
        target,
    )


def test_ce_sigmoid_gradient_by_hand():
    # float32 BCE targets (upstream) make float64 gradcheck meaningless: check d/dx = (sigmoid - t) w / n
    labels = torch.tensor([0, 3, -1, 2])
    x = LOGITS.clone().requires_grad_(True)
    out = value(call("CrossEntropyLoss", x, labels, use_sigmoid=True))
    (g,) = torch.autograd.grad(out, x)
    onehot = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 1]], dtype=F64)
    valid = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=F64)[:, None]
    assert_close(g, (torch.sigmoid(LOGITS) - onehot) * valid / 12, rtol=1e-6, atol=1e-8)


def test_gradcheck_focal():
    args, _, _ = example("FocalLoss")
    _gradcheck(lambda p: call("FocalLoss", p, args[1], gamma=1.5, alpha=0.3), args[0])
    soft = torch.rand(6, 4, generator=gen(5), dtype=F64)
    _gradcheck(lambda p, t: call("FocalLoss", p, t, reduction="sum"), args[0], soft)
    _gradcheck(lambda p: call("FocalLoss", p, args[1], activated=True), torch.sigmoid(args[0]))


def test_gradcheck_qfl():
    args, _, _ = example("QualityFocalLoss")
    labels, scores = args[1]
    _gradcheck(lambda p, s: call("QualityFocalLoss", p, (labels, s)), args[0], scores)
    # zero entries of a dense target are negatives and get no gradient upstream (a one-sided
    # derivative there): gradcheck the target where every entry is a positive
    dense = torch.rand(6, 4, generator=gen(6), dtype=F64) * 0.8 + 0.1
    _gradcheck(lambda p, t: call("QualityFocalLoss", p, t, beta=1.5), args[0], dense)
    sparse = torch.zeros(6, 4, dtype=F64)
    sparse[0, 0], sparse[2, 1], sparse[5, 2] = 0.3, 0.6, 0.9
    _gradcheck(lambda p: call("QualityFocalLoss", p, sparse, beta=1.5), args[0])
