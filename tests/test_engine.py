"""The compute engine on its own, without gRPC."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from lossd.server import registry
from lossd.server.engine import Engine, bind_inputs
from lossd.server.errors import InvalidArgument, LossNotFound
from tests.support.losskit import differentiable_paths


@pytest.fixture(scope="module")
def engine(device) -> Engine:
    return Engine(device)


def test_value_and_gradients_equal_local_autograd(engine, device):
    x = torch.randn(6, 5, dtype=torch.float64)
    t = torch.randint(0, 5, (6,))
    result = engine.evaluate(
        "cross_entropy", {"label_smoothing": 0.2}, [x, t], grad_paths=["args[0]"]
    )
    leaf = x.clone().to(device).requires_grad_(True)
    expected = F.cross_entropy(leaf, t.to(device), label_smoothing=0.2)
    expected.backward()
    assert torch.equal(result.value, expected.detach())
    assert torch.equal(result.grads["args[0]"], leaf.grad)
    assert not x.requires_grad, "the caller's tensor must not be touched"
    assert result.params["label_smoothing"] == 0.2 and result.params["ignore_index"] == -100


def test_no_grad_paths_means_no_gradient_work(engine):
    result = engine.evaluate("mse", {}, [torch.randn(3), torch.randn(3)])
    assert result.grads == {} and not result.value.requires_grad


def test_non_scalar_loss_needs_grad_output_and_gives_the_exact_vjp(engine, device):
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    params = {"reduction": "none"}
    first = engine.evaluate("mse", params, [x, y], grad_paths=["args[0]"])
    assert first.grads == {}, "a non-scalar loss has no gradient without grad_output"
    go = torch.randn(4, 3, dtype=torch.float64)
    second = engine.evaluate(
        "mse", params, [x, y], grad_paths=["args[0]", "args[1]"], grad_output=go
    )
    leaf_x, leaf_y = x.to(device).requires_grad_(True), y.to(device).requires_grad_(True)
    F.mse_loss(leaf_x, leaf_y, reduction="none").backward(go.to(device))
    assert torch.equal(second.grads["args[0]"], leaf_x.grad)
    assert torch.equal(second.grads["args[1]"], leaf_y.grad)
    with pytest.raises(InvalidArgument) as info:
        engine.evaluate("mse", params, [x, y], grad_paths=["args[0]"], grad_output=torch.ones(3))
    assert info.value.field == "grad_output"


def test_keyword_arguments_bind_like_python(engine):
    x, y = torch.randn(3), torch.randn(3)
    by_keyword = engine.evaluate("l1", {}, [], {"input": x, "target": y})
    by_position = engine.evaluate("l1", {}, [x, y])
    assert torch.equal(by_keyword.value, by_position.value)


@pytest.mark.parametrize(
    ("args", "kwargs", "grad_paths", "field", "words"),
    [
        ([torch.randn(3)], {}, [], "args[1]", "needs argument 'target'"),
        ([torch.randn(3), torch.randn(3), torch.randn(3)], {}, [], "args", "at most 2 positional"),
        (
            [torch.randn(3), torch.randn(3)],
            {"reduction": "sum"},
            [],
            "kwargs.reduction",
            "constructor parameter",
        ),
        ([torch.randn(3), torch.randn(3)], {"beta": 1}, [], "kwargs.beta", "unexpected keyword"),
        (
            [torch.randn(3)],
            {"input": torch.randn(3)},
            [],
            "kwargs.input",
            "both positionally and by keyword",
        ),
        (
            [torch.randn(3), torch.randn(3)],
            {},
            ["args[2]"],
            "grad_paths[0]",
            "no input tensor at path",
        ),
        (
            [torch.randn(3), torch.randn(3)],
            {},
            ["args[0]", "args[0]"],
            "grad_paths[1]",
            "requested twice",
        ),
        ([torch.randn(3).long(), torch.randn(3)], {}, ["args[0]"], "args[0]", "dtype in"),
    ],
)
def test_bad_calls_name_the_field(engine, args, kwargs, grad_paths, field, words):
    with pytest.raises(InvalidArgument) as info:
        engine.evaluate("l1", {}, args, kwargs, grad_paths=grad_paths)
    assert info.value.field == field
    assert words in str(info.value)


def test_gradient_of_an_integer_input_is_refused(engine):
    with pytest.raises(InvalidArgument, match="floating-point tensor"):
        engine.evaluate(
            "nll",
            {},
            [torch.randn(3, 2).log_softmax(-1), torch.tensor([0, 1, 1])],
            grad_paths=["args[1]"],
        )


def test_unknown_loss_suggests_close_names(engine):
    with pytest.raises(LossNotFound, match="did you mean 'cross_entropy'"):
        engine.evaluate("cross_entropi", {}, [])
    with pytest.raises(LossNotFound, match="'FocalLoss'"):
        engine.evaluate("focalloss", {}, [])


def test_non_finite_results_are_flagged(engine):
    x = torch.tensor([[float("nan"), 0.0]])
    result = engine.evaluate("cross_entropy", {}, [x, torch.tensor([0])], grad_paths=["args[0]"])
    assert result.non_finite and math.isnan(result.value.item())
    ok = engine.evaluate(
        "cross_entropy", {}, [torch.zeros(1, 2), torch.tensor([0])], grad_paths=["args[0]"]
    )
    assert not ok.non_finite


def _pair_loss(input, target):
    return (input - target).sum()


PAIR = registry.LossSpec(
    name="pair",
    fn=_pair_loss,
    families=("test",),
    summary="",
    inputs=(
        registry.Input("input", shape=("N", "C")),
        registry.Input("target", shape=("N", 3, "*")),
    ),
)


def test_symbolic_shapes_bind_across_inputs():
    bind_inputs(PAIR, [torch.randn(4, 3), torch.randn(4, 3, 2, 2)], {})
    with pytest.raises(InvalidArgument) as info:
        bind_inputs(PAIR, [torch.randn(4, 3), torch.randn(5, 3)], {})
    assert info.value.field == "args[1]" and "N=4" in str(info.value)
    with pytest.raises(InvalidArgument, match="with 3 there"):
        bind_inputs(PAIR, [torch.randn(4, 3), torch.randn(4, 2)], {})
    with pytest.raises(InvalidArgument, match=r"shape \(N, C\)"):
        bind_inputs(PAIR, [torch.randn(4), torch.randn(4, 3)], {})


def test_a_forward_keyword_may_share_a_constructor_parameters_name(engine):
    """mmdet CrossEntropyLoss takes ignore_index both in the constructor and at call time."""
    score, label = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    ctor = engine.evaluate("CrossEntropyLoss", {"ignore_index": 1}, [score, label])
    call = engine.evaluate(
        "CrossEntropyLoss", {"ignore_index": 2}, [score, label], {"ignore_index": 1}
    )
    assert torch.equal(ctor.value, call.value)
    plain = engine.evaluate("CrossEntropyLoss", {}, [score, label])
    assert not torch.equal(plain.value, call.value)


def test_an_input_torch_refuses_inside_a_loss_is_invalid_argument_not_internal():
    # NaN logits make upstream's SimOTA binary_cross_entropy raise; lossd says so, as a client error.
    spec = registry.get("yolox_loss")
    args, kwargs, params = spec.make_example(torch.float32)
    args[0]["pred"][0] = torch.full_like(args[0]["pred"][0], math.nan)
    with pytest.raises(InvalidArgument, match="upstream raises the same"):
        Engine().evaluate("yolox_loss", params, list(args), kwargs, [])


def test_remembered_layouts_and_parameters_replay_only_what_they_checked(engine):
    """Argument layouts and plain parameters are checked once and remembered (bind_inputs,
    canonical_params): calls that differ only in a parameter's type or sign, in how an input
    was sent, or in a value check still get their own canonical form, result or refusal."""
    x = torch.randn(4, 3, dtype=torch.float64)
    target, bad = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 5, 1])
    for _ in range(2):  # the second round replays what the first remembered
        zero = engine.evaluate("cross_entropy", {"label_smoothing": 0.0}, [x, target])
        negative = engine.evaluate("cross_entropy", {"label_smoothing": -0.0}, [x, target])
        assert math.copysign(1, zero.params["label_smoothing"]) == 1
        assert math.copysign(1, negative.params["label_smoothing"]) == -1
        one = engine.evaluate("cross_entropy", {"ignore_index": 1}, [x, target])
        assert torch.equal(one.value, F.cross_entropy(x, target, ignore_index=1))
        for given, got in ((True, "bool"), (1.0, "float")):
            with pytest.raises(InvalidArgument, match=f"expected int, got {got}") as refused:
                engine.evaluate("cross_entropy", {"ignore_index": given}, [x, target])
            assert refused.value.field == "params.ignore_index"
        for args, kwargs, field in (
            ([x, bad], {}, "args[1]"),
            ([x], {"target": bad}, "kwargs.target"),
        ):
            with pytest.raises(InvalidArgument, match="got index 5") as refused:
                engine.evaluate("cross_entropy", {}, args, kwargs)
            assert refused.value.field == field
        by_keyword = engine.evaluate("cross_entropy", {}, [x], {"target": target})
        assert torch.equal(by_keyword.value, F.cross_entropy(x, target))
        with pytest.raises(InvalidArgument, match="given both positionally and by keyword"):
            engine.evaluate("cross_entropy", {}, [x, target], {"target": target})
        with pytest.raises(InvalidArgument, match="needs argument"):
            engine.evaluate("cross_entropy", {}, [x])


def test_remembered_layouts_and_parameters_are_bounded(engine, monkeypatch):
    """A caller varying its parameters or layouts without end cannot grow what is remembered
    past MAX_LAYOUTS entries (each): beyond, it is forgotten and checked again."""
    from lossd.server import engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_LAYOUTS", 4)
    monkeypatch.setattr(engine_module, "_LAYOUTS", {})
    monkeypatch.setattr(engine_module, "_CANONICAL", {})
    x, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    layouts = [  # (args, kwargs): four ways to send the same two inputs
        ([x, target], {}),
        ([x], {"target": target}),
        ([], {"input": x, "target": target}),
        ([], {"target": target, "input": x}),
    ]
    for i in range(20):
        smoothing = i / 100
        args, kwargs = layouts[i % 4]
        result = engine.evaluate("cross_entropy", {"label_smoothing": smoothing}, args, kwargs)
        assert result.params["label_smoothing"] == smoothing
        assert torch.equal(result.value, F.cross_entropy(x, target, label_smoothing=smoothing))
        args, kwargs = layouts[(i + 1) % 4]
        same = {k: x for k in kwargs}
        assert torch.equal(
            engine.evaluate("mse", {}, [x] * len(args), same).value, torch.tensor(0.0)
        )
        assert len(engine_module._CANONICAL) <= 4 and len(engine_module._LAYOUTS) <= 4


def test_a_memo_of_the_input_checks_replays_only_for_the_symbols_it_was_found_with(engine):
    """A layout's memo (server/prepared.py keeps one per request layout) holds the checks found
    with its symbols: a call whose scalar inputs or parameters differ (a scalar sent as a tensor
    does) is checked afresh, never by checks whose bounds came from other values."""
    x = torch.randn(4, 5)
    label = torch.tensor([0, 1, 7, 2])  # 7: out of range unless it is the ignored label
    memo: dict = {}
    for _ in range(2):
        ignored = engine.evaluate(
            "CrossEntropyLoss", {}, [x, label], {"ignore_index": 7}, [], memo=memo
        )
    assert "checks" in memo
    # visdet's mean without avg_non_ignore: over every label, the ignored one included
    expected = F.cross_entropy(x, label, ignore_index=7, reduction="none").sum() / 4
    assert torch.allclose(ignored.value, expected)
    with pytest.raises(InvalidArgument, match="got index 7") as refused:
        engine.evaluate("CrossEntropyLoss", {}, [x, label], {"ignore_index": -100}, [], memo=memo)
    assert refused.value.field == "args[1]"
    # A tensor among the symbols (a `tensor` parameter), whose repr elides, keys no memo.
    assert registry._symbols_key({"gamma": 2.0, "weight": torch.ones(2000)}) is None
    assert registry._symbols_key({"gamma": 2.0}) != registry._symbols_key({"gamma": -2.0})


@pytest.mark.parametrize("spec", registry.all_specs(), ids=lambda spec: spec.name)
def test_every_loss_example_evaluates_without_a_warning_from_lossd(engine, spec):
    """A warning lossd's own code raises on a plain call lands in every server's log once per
    process and says nothing the caller did (a float() of the loss value with grad did)."""
    args, kwargs, params = spec.make_example(torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.evaluate(spec.name, params, args, kwargs, differentiable_paths(spec, args, kwargs))
    ours = [w for w in caught if "/server/" in w.filename or "/client/" in w.filename]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
