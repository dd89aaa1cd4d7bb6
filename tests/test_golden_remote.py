"""Every value recorded from the upstream packages, reproduced through the RPC.

Each golden case (tests/golden/README.md) is called through ``RemoteLoss`` (or ``from_config``
for config cases) exactly as the upstream module was called; the loss and every gradient must
match what upstream produced.
"""

from __future__ import annotations

import math

import pytest
import torch

from lossd.client import RemoteLoss, from_config
from lossd.client.wire.codec import join_key
from lossd.server import registry
from tests.support.golden import GOLDEN, GOLDEN_TOL, golden_region, load_golden
from tests.support.losskit import attach_leaves

CASES = sorted(GOLDEN.glob("*/*.pt"))


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_golden_case_through_rpc(path, endpoint):
    case = load_golden(path)
    name = case.get("name")
    if name is not None and name not in {s.name for s in registry.all_specs()}:
        pytest.fail(f"{name} is not registered")
    wanted, leaves = set(case["grad_paths"]), {}
    args = attach_leaves(list(case["args"]), "args", wanted, leaves)
    kwargs = {
        k: attach_leaves(v, join_key("kwargs", k), wanted, leaves)
        for k, v in case["kwargs"].items()
    }
    assert set(leaves) == wanted, f"golden paths not found: {wanted - set(leaves)}"

    crit = (
        from_config(case["config"], endpoint=endpoint)
        if "config" in case
        else RemoteLoss(name, endpoint=endpoint, **case["ctor"])
    )
    with crit, golden_region(case):  # the AMP cases: inside the autocast region upstream ran in
        loss = crit(*args, **kwargs)
    expected = case["expected_loss"]
    rtol, atol = GOLDEN_TOL[case["precision"]].values()
    assert loss.dtype == expected.dtype
    if case["expect_nan"]:
        assert math.isnan(float(loss))
        assert crit.last_result.non_finite
        return
    torch.testing.assert_close(loss.detach(), expected, rtol=rtol, atol=atol)
    (loss.sum() if loss.dim() else loss).backward()
    for grad_path, leaf in leaves.items():
        want = case["expected_grads"][grad_path]
        if want is None:
            assert leaf.grad is None, f"{grad_path}: upstream gives no gradient"
        else:
            assert leaf.grad is not None, f"{grad_path}: no gradient came back"
            torch.testing.assert_close(
                leaf.grad, want, rtol=rtol, atol=atol, msg=lambda m, p=grad_path: f"{p}: {m}"
            )
