"""Contract tests over the whole registry: every declaration is complete and true.

Like torchvision's schema test, the registry is the single source of truth, so it is checked
for every loss: names of all three families, docstrings, references, examples that run, and
declarations that match the functions.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from lossd.server import registry
from lossd.server.engine import Engine
from lossd.server.losses import FAMILY_MODULES  # noqa: F401  (registers the losses)
from lossd.server.registry import REQUIRED
from tests.support.losskit import UPSTREAM_LOSSES, attach_leaves, differentiable_paths

REGISTRATIONS = 31
SPECS = registry.all_specs()


@pytest.mark.parametrize("family", sorted(UPSTREAM_LOSSES))
def test_each_familys_whole_upstream_registry_is_served_under_its_names(family):
    served, upstream = {s.name for s in registry.all_specs(family)}, set(UPSTREAM_LOSSES[family])
    assert served == upstream, f"missing {upstream - served}, extra {served - upstream}"


def test_there_are_31_registrations():
    assert len(SPECS) == REGISTRATIONS == len(set().union(*map(set, UPSTREAM_LOSSES.values())))
    assert [len(UPSTREAM_LOSSES[f]) for f in ("fat", "netspresso", "visdet")] == [9, 11, 12]


def test_a_netspresso_losses_list_may_name_every_netspresso_criterion():
    from lossd.server.losses.netspresso import NETSPRESSO_CRITERIA

    assert len(NETSPRESSO_CRITERIA) == 10
    assert set(NETSPRESSO_CRITERIA) == set(UPSTREAM_LOSSES["netspresso"]) - {"losses"}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_declaration_matches_the_function(spec):
    sig = inspect.signature(spec.fn)
    positional = [
        p for p in sig.parameters.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]
    keyword = [p for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert [p.name for p in positional] == [i.name for i in spec.inputs]
    assert [p.name for p in keyword] == [p.name for p in spec.params]
    for declared, actual in zip(spec.inputs, positional):
        if declared.optional:
            assert actual.default is not inspect.Parameter.empty, (
                f"{declared.name} is optional but has no default"
            )
    for declared, actual in zip(spec.params, keyword):
        assert (actual.default is inspect.Parameter.empty) == (declared.default is REQUIRED), (
            declared.name
        )
    assert not {i.name for i in spec.inputs} & {p.name for p in spec.params}, (
        "a name is both input and parameter"
    )
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()), (
        "**kwargs hides typos"
    )


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_declaration_is_documented(spec):
    assert spec.summary and spec.reference and spec.example, spec.name
    doc = inspect.getdoc(spec.fn) or ""
    assert len(doc) > 40, f"{spec.name} needs a docstring with shapes and a reference"
    assert spec.families and all(f in UPSTREAM_LOSSES for f in spec.families)
    for p in spec.params:
        assert p.doc, f"{spec.name}.{p.name} needs a doc line"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_defaults_satisfy_their_own_declaration(spec):
    for p in spec.params:
        if p.default is not REQUIRED and p.default is not None:
            assert p.coerce(p.default) == p.default or p.type in ("tensor", "float_list"), p.name


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_example_runs_through_the_engine_with_gradients(spec):
    assert spec.make_example is not None, f"{spec.name} has no make_example"
    args, kwargs, params = spec.make_example(torch.float64)
    wanted = differentiable_paths(spec, args, kwargs)
    result = Engine("cpu").evaluate(spec.name, params, list(args), kwargs, grad_paths=wanted)
    assert isinstance(result.value, torch.Tensor)
    if result.value.numel() == 1 and not result.non_finite:
        assert result.grads, f"{spec.name}: the example yields no gradient for {wanted}"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_value_and_gradients_through_remoteloss_equal_local_autograd(spec, endpoint):
    """Every loss's example, float64, through the RPC and the autograd Function, against the same
    evaluation run locally (non-scalar outputs with a random grad_output)."""
    from lossd.client import RemoteLoss

    args, kwargs, params = spec.make_example(torch.float64)
    wanted = differentiable_paths(spec, args, kwargs)
    leaves: dict[str, torch.Tensor] = {}
    remote_args = attach_leaves(list(args), "args", set(wanted), leaves)
    remote_kwargs = {
        k: attach_leaves(v, f"kwargs.{k}", set(wanted), leaves) for k, v in kwargs.items()
    }
    with RemoteLoss(spec.name, endpoint=endpoint, **params) as crit:
        value = crit(*remote_args, **remote_kwargs)
    grad_output = (
        None
        if value.dim() == 0
        else torch.randn(value.shape, dtype=value.dtype, generator=torch.Generator().manual_seed(0))
    )
    local = Engine("cpu").evaluate(
        spec.name, params, list(args), kwargs, grad_paths=wanted, grad_output=grad_output
    )
    torch.testing.assert_close(
        value.detach().cpu(), local.value, rtol=1e-12, atol=1e-12, equal_nan=True
    )
    assert set(leaves) == set(wanted) and wanted, spec.name
    value.backward(grad_output)
    for path in wanted:
        expected = local.grads.get(path)
        got = leaves[path].grad
        if expected is None:  # upstream gives this input no gradient in this call
            assert got is None or not got.any(), path
        else:
            torch.testing.assert_close(
                got.cpu(),
                expected,
                rtol=1e-12,
                atol=1e-12,
                equal_nan=True,
                msg=f"{spec.name} {path}",
            )
