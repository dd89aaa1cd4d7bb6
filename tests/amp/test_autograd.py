"""Autograd beyond ``loss.backward()`` through RemoteLoss: double backward (server-side second
derivatives), forward-mode AD, the backward under ``vmap`` (gradcheck's check_batched_grad), and
``torch.compile`` with the loss as a clean graph break.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad

from lossd.client import RemoteLoss
from lossd.client.wire.codec import join_key
from lossd.server import registry
from lossd.server.registry import LossOutput
from tests.support.losskit import attach_leaves, differentiable_paths

SPECS = registry.all_specs()
# Inputs held fixed in gradcheck: RetinaNet's anchors decide the IoU matching, a step function
# of them, so finite differences across a matching change are meaningless (upstream's too).
FIXED = {"retinanet_loss": {"args[0].anchors"}}


def _replace(obj, path: str, by: dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        return by.get(path, obj)
    if isinstance(obj, (list, tuple)):
        items = [_replace(o, f"{path}[{i}]", by) for i, o in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        return {k: _replace(v, join_key(path, k), by) for k, v in obj.items()}
    return obj


def _as_function(spec, loss, args, kwargs):
    """(f(*tensors) -> loss, the differentiable leaves f takes) for a registry example."""
    wanted = [
        p for p in differentiable_paths(spec, args, kwargs) if p not in FIXED.get(spec.name, ())
    ]
    leaves: dict[str, torch.Tensor] = {}
    attach_leaves(list(args), "args", set(wanted), leaves)
    attach_leaves(kwargs, "kwargs", set(wanted), leaves)
    paths = list(leaves)

    def f(*tensors):
        by = dict(zip(paths, tensors))
        call_args = _replace(list(args), "args", by)
        call_kwargs = {k: _replace(v, join_key("kwargs", k), by) for k, v in kwargs.items()}
        out = loss(*call_args, **call_kwargs)
        return out.value if isinstance(out, LossOutput) else out

    return f, tuple(leaves[p] for p in paths)


def _batched_grad_matches(out: torch.Tensor, leaves: tuple[torch.Tensor, ...]) -> None:
    """What gradcheck's check_batched_grad checks: the backward vmapped over a batch of
    cotangents equals the backward run once per cotangent."""
    from torch._vmap_internals import vmap

    def vjp(v):
        found = torch.autograd.grad(out, leaves, v, retain_graph=True, allow_unused=True)
        return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(found, leaves))

    cotangents = torch.randn(
        (3, *out.shape), dtype=out.dtype, generator=torch.Generator().manual_seed(2)
    )
    expected = [torch.stack(rows) for rows in zip(*(vjp(v) for v in cotangents))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = vmap(vjp)(cotangents)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_gradcheck_with_batched_grad_passes_for_every_loss(spec, endpoint):
    """gradcheck(check_batched_grad=True) through the RPC passes wherever it passes for the loss
    in-process (a few examples sit on a matching step, where finite differences are meaningless
    for upstream too); the batched-grad check itself holds for every loss."""
    args, kwargs, params = spec.make_example(torch.float64)
    local, local_leaves = f_local(spec, params, args, kwargs)
    smooth = torch.autograd.gradcheck(local, local_leaves, fast_mode=True, raise_exception=False)
    with RemoteLoss(spec.name, endpoint=endpoint, **params) as crit:
        f, leaves = _as_function(spec, crit, args, kwargs)
        if smooth:
            assert torch.autograd.gradcheck(f, leaves, check_batched_grad=True, fast_mode=True)
        _batched_grad_matches(f(*leaves), leaves)


FAT = ["bce", "bce_with_logits", "cross_entropy", "kl_div", "l1", "mse", "nll", "smooth_l1"]


@pytest.mark.parametrize("name", FAT)
def test_non_scalar_backward_under_vmap_is_one_batched_rpc_and_exact(name, endpoint):
    """reduction='none': the batched backward asks the server for a batch of products."""
    spec = registry.get(name)
    args, kwargs, params = spec.make_example(torch.float64)
    params = {**params, "reduction": "none"}
    with RemoteLoss(name, endpoint=endpoint, **params) as crit:
        f, leaves = _as_function(spec, crit, args, kwargs)
        assert torch.autograd.gradcheck(f, leaves, check_batched_grad=True, fast_mode=True)
        out = f(*leaves)
        jacobian = torch.func.vmap(
            lambda v: torch.autograd.grad(out, leaves[0], v, retain_graph=True)[0]
        )(torch.eye(out.numel(), dtype=out.dtype).reshape(-1, *out.shape))
    local_out = f_local(spec, params, args, kwargs)
    expected = torch.autograd.functional.jacobian(local_out[0], local_out[1])[0]
    torch.testing.assert_close(jacobian.reshape(expected.shape), expected, rtol=1e-12, atol=1e-12)


def f_local(spec, params, args, kwargs):
    canonical = spec.canonical_params(params)
    f, leaves = _as_function(spec, lambda *a, **k: spec.fn(*a, **k, **canonical), args, kwargs)
    return (lambda *xs: f(*xs)), leaves


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_double_backward_equals_local_autograd_for_every_loss(spec, endpoint):
    """A gradient penalty: d/dx |d loss/dx|^2, through the RPC and in-process."""
    args, kwargs, params = spec.make_example(torch.float64)
    results = []
    for remote in (True, False):
        if remote:
            crit = RemoteLoss(spec.name, endpoint=endpoint, **params)
            f, leaves = _as_function(spec, crit, args, kwargs)
        else:
            f, leaves = f_local(spec, params, args, kwargs)
        out = f(*leaves)
        grads = torch.autograd.grad(out.sum(), leaves, create_graph=True, allow_unused=True)
        assert all(g is None or g.requires_grad for g in grads) or not remote
        penalty = sum((g**2).sum() for g in grads if g is not None and g.requires_grad)
        second = (
            torch.autograd.grad(penalty, leaves, allow_unused=True)
            if isinstance(penalty, torch.Tensor)
            else (None,) * len(leaves)
        )
        results.append(
            (out.detach(), [g.detach() if g is not None else None for g in grads], second)
        )
        if remote:
            crit.close()
    (v_r, g_r, s_r), (v_l, g_l, s_l) = results
    torch.testing.assert_close(v_r, v_l, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_r, g_l):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(s_r, s_l):
        if b is None or not b.any():
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", FAT)
def test_gradgradcheck_of_the_torch_losses(name, reduction, endpoint):
    spec = registry.get(name)
    args, kwargs, params = spec.make_example(torch.float64)
    with RemoteLoss(name, endpoint=endpoint, **{**params, "reduction": reduction}) as crit:
        f, leaves = _as_function(spec, crit, args, kwargs)
        assert torch.autograd.gradgradcheck(f, leaves, fast_mode=True)


def test_a_third_derivative_is_refused_naming_the_feature(endpoint):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with RemoteLoss("bce_with_logits", endpoint=endpoint) as crit:
        loss = crit(x, torch.rand(4, 3, dtype=torch.float64))
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        (h,) = torch.autograd.grad((g**2).sum(), x, create_graph=True)  # second order: fine
        with pytest.raises(NotImplementedError, match="second order"):
            h.sum().backward()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    ("name", "fn"),
    [
        ("mse", F.mse_loss),
        ("cross_entropy", F.cross_entropy),
        ("bce_with_logits", F.binary_cross_entropy_with_logits),
    ],
)
def test_forward_mode_ad_equals_torch(name, fn, reduction, endpoint):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, dtype=torch.float64, generator=g)
    tangent = torch.randn(6, 4, dtype=torch.float64, generator=g)
    t = (
        torch.randint(0, 4, (6,), generator=g)
        if name == "cross_entropy"
        else torch.rand(6, 4, dtype=torch.float64, generator=g)
    )
    with RemoteLoss(name, endpoint=endpoint, reduction=reduction) as crit, forward_ad.dual_level():
        remote = forward_ad.unpack_dual(crit(forward_ad.make_dual(x, tangent), t))
        local = forward_ad.unpack_dual(fn(forward_ad.make_dual(x, tangent), t, reduction=reduction))
    torch.testing.assert_close(remote.primal, local.primal, rtol=1e-12, atol=1e-12)
    assert remote.tangent is not None, "no tangent came back"
    torch.testing.assert_close(remote.tangent, local.tangent, rtol=1e-10, atol=1e-12)


def test_a_torch_func_transform_over_the_inputs_is_refused_naming_lossd(endpoint):
    x, t = torch.randn(6, 4, dtype=torch.float64), torch.rand(6, 4, dtype=torch.float64)
    with RemoteLoss("mse", endpoint=endpoint) as crit:
        for transform in (
            lambda: torch.func.jvp(lambda v: crit(v, t), (x,), (x,)),
            lambda: torch.func.grad(lambda v: crit(v, t))(x),
        ):
            with pytest.raises(
                NotImplementedError, match="lossd: mse cannot be called inside a torch.func"
            ):
                transform()


# --------------------------------------------------------------------------- torch.compile


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def _train(model, crit, step_fn_wrapper=lambda f: f, steps=4):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g))
        for _ in range(steps)
    ]

    def step(x, y):
        opt.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    step = step_fn_wrapper(step)
    return [step(x, y) for x, y in data], [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("what", ["step_fn", "model"])
def test_torch_compile_gives_eager_numbers(what, endpoint):
    with RemoteLoss("cross_entropy", endpoint=endpoint) as crit:
        eager_losses, eager_params = _train(_model(), crit)
        model = _model()
        if what == "model":
            compiled_losses, compiled_params = _train(torch.compile(model, backend="eager"), crit)
        else:
            compiled_losses, compiled_params = _train(
                model, crit, lambda f: torch.compile(f, backend="eager", fullgraph=False)
            )
    for a, b in zip(eager_losses, compiled_losses):
        assert torch.equal(a, b)
    for a, b in zip(eager_params, compiled_params):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_raises_naming_lossd(endpoint):
    with RemoteLoss("cross_entropy", endpoint=endpoint) as crit:
        model = _model()

        @torch.compile(backend="eager", fullgraph=True)
        def step(x, y):
            return crit(model(x), y)

        with pytest.raises(Exception, match="lossd") as info:
            step(torch.randn(8, 6), torch.randint(0, 4, (8,)))
    assert "fullgraph=False" in str(info.value)
