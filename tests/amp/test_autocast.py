"""Autocast parity: RemoteLoss inside ``torch.autocast`` gives what the loss gives in-process
inside the same region (loss dtype, value, gradients), for every loss in the registry; the torch
losses also equal torch's own functions, and the AMP golden cases upstream's recorded numbers.
"""

from __future__ import annotations

import grpc
import pytest
import torch
import torch.nn.functional as F

from lossd.client import LossdError, RemoteLoss
from lossd.client._proto import lossd_pb2 as pb
from lossd.client.functional import build_request
from lossd.server import registry
from lossd.server.errors import InvalidArgument
from lossd.server.registry import LossOutput
from tests.support.losskit import attach_leaves, differentiable_paths

SPECS = registry.all_specs()
BF16 = torch.bfloat16


def _in_process(spec, params, args, kwargs, wanted, dtype):
    """The loss called directly (no lossd engine), forward and backward inside autocast."""
    leaves: dict[str, torch.Tensor] = {}
    args = attach_leaves(list(args), "args", set(wanted), leaves)
    kwargs = {k: attach_leaves(v, f"kwargs.{k}", set(wanted), leaves) for k, v in kwargs.items()}
    with torch.autocast("cpu", dtype=dtype):
        out = spec.fn(*args, **kwargs, **spec.canonical_params(params))
        value = out.value if isinstance(out, LossOutput) else out
        paths = list(leaves)
        grads = torch.autograd.grad(value.sum(), [leaves[p] for p in paths], allow_unused=True)
    return value.detach(), dict(zip(paths, grads))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_loss_under_autocast_bf16_equals_the_loss_in_process(spec, endpoint):
    try:  # bfloat16 model outputs, as an autocast region makes them
        args, kwargs, params = spec.make_example(BF16)
        wanted = differentiable_paths(spec, args, kwargs)
        expected, expected_grads = _in_process(spec, params, args, kwargs, wanted, BF16)
    except InvalidArgument:  # a loss that takes float32 outputs only (autocast still applies)
        args, kwargs, params = spec.make_example(torch.float32)
        wanted = differentiable_paths(spec, args, kwargs)
        expected, expected_grads = _in_process(spec, params, args, kwargs, wanted, BF16)

    leaves: dict[str, torch.Tensor] = {}
    remote_args = attach_leaves(list(args), "args", set(wanted), leaves)
    remote_kwargs = {
        k: attach_leaves(v, f"kwargs.{k}", set(wanted), leaves) for k, v in kwargs.items()
    }
    with (
        RemoteLoss(spec.name, endpoint=endpoint, **params) as crit,
        torch.autocast("cpu", dtype=BF16),
    ):
        loss = crit(*remote_args, **remote_kwargs)
        loss.sum().backward()
    assert loss.dtype == expected.dtype, spec.name
    torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=0, equal_nan=True)
    for path, want in expected_grads.items():
        got = leaves[path].grad
        if want is None:
            assert got is None or not got.any(), path
        else:
            assert got.dtype == want.dtype, path
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=path)


TORCH_LOSSES = [
    ("cross_entropy", F.cross_entropy, "index", {"label_smoothing": 0.1}),
    ("nll", F.nll_loss, "index", {}),
    ("mse", F.mse_loss, "same", {}),
    ("l1", F.l1_loss, "same", {}),
    ("smooth_l1", F.smooth_l1_loss, "same", {"beta": 0.5}),
    ("bce_with_logits", F.binary_cross_entropy_with_logits, "same", {}),
    ("kl_div", F.kl_div, "same", {"reduction": "batchmean"}),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("name", "fn", "target", "params"), TORCH_LOSSES, ids=[c[0] for c in TORCH_LOSSES]
)
def test_torch_losses_under_autocast_equal_torch(name, fn, target, params, dtype, endpoint):
    """The fat losses are torch's: under autocast the RPC gives torch's dtype, value and grads."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 5, generator=g).to(dtype)
    t = (
        torch.randint(0, 5, (8,), generator=g)
        if target == "index"
        else torch.rand(8, 5, generator=g)
    )
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with RemoteLoss(name, endpoint=endpoint, **params) as crit, torch.autocast("cpu", dtype=dtype):
        remote = crit(xa, t)
        local = fn(xb, t, **params)
        remote.backward()
        local.backward()
    assert remote.dtype == local.dtype == torch.float32
    assert torch.equal(remote.detach(), local.detach())
    assert xa.grad.dtype == dtype and torch.equal(xa.grad, xb.grad)


def test_without_autocast_a_bf16_call_stays_bf16(endpoint):
    x = torch.randn(8, 5).to(BF16)
    t = torch.randint(0, 5, (8,))
    with RemoteLoss("cross_entropy", endpoint=endpoint) as crit:
        assert crit(x, t).dtype == F.cross_entropy(x, t).dtype == BF16
        with torch.autocast("cpu", dtype=BF16, enabled=False):
            assert crit(x, t).dtype == BF16


def test_a_cuda_autocast_region_is_refused_by_a_cpu_server_naming_why(client, server):
    if server.engine.device.type != "cpu":
        pytest.skip("the server computes on CUDA: it reproduces CUDA autocast")
    request = build_request("mse", {}, [torch.randn(3), torch.randn(3)], {})
    request.autocast.CopyFrom(
        pb.Autocast(enabled=True, device_type="cuda", dtype=pb.DATA_TYPE_FLOAT16)
    )
    with pytest.raises(LossdError) as info:
        client.compute(request)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.field == "autocast"
    assert "torch.autocast('cuda')" in info.value.details and "cpu" in info.value.details


@pytest.mark.parametrize(
    ("autocast", "field"),
    [
        (
            pb.Autocast(enabled=True, device_type="tpu", dtype=pb.DATA_TYPE_BFLOAT16),
            "autocast.device_type",
        ),
        (pb.Autocast(enabled=True, device_type="cpu", dtype=pb.DATA_TYPE_INT8), "autocast.dtype"),
    ],
)
def test_a_malformed_autocast_state_is_invalid_argument(client, autocast, field):
    request = build_request("mse", {}, [torch.randn(3), torch.randn(3)], {})
    request.autocast.CopyFrom(autocast)
    with pytest.raises(LossdError) as info:
        client.compute(request)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.field == field
