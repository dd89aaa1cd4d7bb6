"""CUDA callers: inputs on ``cuda:N`` get their loss, gradients, second derivatives and tangents
back on ``cuda:N``; under ``torch.autocast('cuda')`` a CUDA server gives local CUDA autocast's
numbers. Skipped without a GPU (``pytest --device cuda`` runs the server on one too)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from lossd.client import RemoteLoss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_inputs_get_everything_back_on_their_device(endpoint):
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    x = torch.randn(8, 5, device=device, requires_grad=True)
    t = torch.randint(0, 5, (8,), device=device)
    with RemoteLoss("cross_entropy", endpoint=endpoint) as crit:
        loss = crit(x, t)
        assert loss.device == device
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        assert g.device == device
        (g**2).sum().backward()
        assert x.grad.device == device
        with forward_ad.dual_level():
            dual = forward_ad.make_dual(x.detach(), torch.ones_like(x))
            tangent = forward_ad.unpack_dual(crit(dual, t)).tangent
        assert tangent.device == device
        none = RemoteLoss("mse", endpoint=endpoint, reduction="none")
        out = none(x, torch.zeros_like(x))
        out.backward(torch.ones_like(out))
        assert out.device == device and x.grad.device == device
        none.close()


def test_cuda_autocast_on_a_cuda_server_matches_local_cuda_autocast(endpoint, server):
    if server.engine.device.type != "cuda":
        pytest.skip("the server computes on CPU: it refuses a CUDA autocast region (test_autocast)")
    x = torch.randn(8, 5, device="cuda").half()
    t = torch.randint(0, 5, (8,), device="cuda")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with RemoteLoss("cross_entropy", endpoint=endpoint) as crit, torch.autocast("cuda"):
        remote, local = crit(xa, t), F.cross_entropy(xb, t)
        remote.backward()
        local.backward()
    assert remote.dtype == local.dtype == torch.float32
    torch.testing.assert_close(remote, local)
    torch.testing.assert_close(xa.grad, xb.grad)
