"""Declared inputs: symbolic shapes, relations, forms and nested structures, checked once by the
engine before the loss runs, and (their structural part) by the client from DescribeLoss."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
import pytest
import torch

from lossd.client.schema import (
    Checker,
    Form,
    SchemaError,
    check_call,
    check_params,
    form_from_message,
    form_message,
)
from lossd.server import messages, registry
from lossd.server.engine import Engine, bind_inputs
from lossd.server.errors import InvalidArgument
from lossd.server.registry import Input, LossSpec

INDEX = Form(
    dtypes=("int64",),
    shape=("N",),
    shapes=(("pred", ("N", "C")),),
    index_of="C",
    label="class indices",
)
SOFT = Form(same_shape="pred", label="a soft target of pred's shape")


def _spec(*inputs: Input, params=()) -> LossSpec:
    def fn(*args, **kwargs):
        return torch.zeros(())

    return LossSpec(
        name="probe", fn=fn, families=("test",), summary="", inputs=inputs, params=params
    )


TARGETS = _spec(Input("pred", shape=("N", "*")), Input("target", forms=(INDEX, SOFT)))


def test_forms_accept_either_layout_and_bind_symbols():
    bind_inputs(TARGETS, [torch.randn(4, 3), torch.tensor([0, 2, 1, 0])], {})
    bind_inputs(TARGETS, [torch.randn(4, 3), torch.rand(4, 3)], {})


@pytest.mark.parametrize(
    "target, words",
    [
        (
            torch.tensor([0, 1]),
            "expected N=4 (as in args[0]) (class indices), got N=2",
        ),  # the int64 form
        (torch.rand(4, 2), "expected shape [4, 3] (pred's) (a soft target"),  # the float form
        (torch.tensor([0, 1, 2, 3]), "class indices in [0, 2], got index 3"),  # C from pred
        (
            torch.zeros(4, dtype=torch.int32),
            "dtype in {int64, float16, bfloat16, float32, float64} (class indices; or a soft",
        ),
    ],
)
def test_the_form_of_the_values_kind_explains_the_error(target, words):
    with pytest.raises(InvalidArgument) as info:
        bind_inputs(TARGETS, [torch.randn(4, 3), target], {})
    assert info.value.field == "args[1]" and words in info.value.message, info.value.message


def test_index_form_needs_pred_of_its_shape():
    with pytest.raises(InvalidArgument) as info:
        bind_inputs(TARGETS, [torch.randn(4, 3, 2), torch.tensor([0, 1, 2, 0])], {})
    assert "pred of shape (N, C)" in info.value.message and info.value.field == "args[1]"


def test_relations_broadcast_and_dtype():
    spec = _spec(
        Input("pred"),
        Input("target", same_dtype="pred", broadcasts_with="pred"),
        Input("weight", optional=True, broadcast_to="pred"),
    )
    bind_inputs(spec, [torch.randn(4, 3), torch.randn(3), torch.ones(4, 1)], {})
    for args, field, words in (
        ([torch.randn(4, 3), torch.randn(3).double()], "args[1]", "dtype float32 (pred's)"),
        ([torch.randn(4, 3), torch.randn(2)], "args[1]", "broadcasts with [4, 3]"),
        ([torch.randn(4, 3), torch.randn(3), torch.ones(2, 4, 3)], "args[2]", "broadcasts to"),
    ):
        with pytest.raises(InvalidArgument) as info:
            bind_inputs(spec, args, {})
        assert info.value.field == field and words in info.value.message, info.value.message


def test_named_star_binds_trailing_dims():
    spec = _spec(
        Input("input", shape=("N", "C", "*d")),
        Input("target", dtypes=("int64",), shape=("N", "*d")),
    )
    bind_inputs(spec, [torch.randn(2, 3, 5, 6), torch.zeros(2, 5, 6, dtype=torch.long)], {})
    with pytest.raises(InvalidArgument, match=r"\*d=\(5, 6\) \(as in args\[0\]\)"):
        bind_inputs(spec, [torch.randn(2, 3, 5, 6), torch.zeros(2, 5, 7, dtype=torch.long)], {})


def test_nested_structures_name_the_bad_element():
    level = Form(shape=("B", "*", "K"))
    out = Form(kind="dict", keys=(("pred", Form(kind="list", each=level, min_items=1)),))
    spec = _spec(Input("out", kind="structure", forms=(out,)))
    bind_inputs(spec, [{"pred": [torch.randn(2, 5, 3), torch.randn(2, 7, 3)]}], {})
    with pytest.raises(InvalidArgument) as info:
        bind_inputs(spec, [{"pred": [torch.randn(2, 5, 3), torch.randn(3, 7, 3)]}], {})
    assert (
        info.value.field == "args[0].pred[1]"
        and "B=2 (as in args[0].pred[0])" in info.value.message
    )
    with pytest.raises(InvalidArgument) as info:
        bind_inputs(spec, [{"pred": [torch.randn(2, 5, 3), "x"]}], {})
    assert info.value.field == "args[0].pred[1]"
    with pytest.raises(InvalidArgument) as info:
        bind_inputs(spec, [{"logits": []}], {})
    assert info.value.field == "args[0].pred" and "keys given: 'logits'" in info.value.message


def test_forms_may_depend_on_parameters():
    spec = _spec(
        Input("pred"),
        Input(
            "target",
            forms=(
                Form(values=(0.0, 1.0), when=(("activated", True),)),
                Form(when=(("activated", False),)),
            ),
        ),
    )
    bind_inputs(spec, [torch.randn(3), torch.randn(3) + 5], {}, {"activated": False})
    with pytest.raises(InvalidArgument, match=r"every value in \[0, 1\]"):
        bind_inputs(spec, [torch.randn(3), torch.randn(3) + 5], {}, {"activated": True})


def test_every_declaration_survives_the_wire():
    for spec in registry.all_specs():
        for declared in spec.inputs:
            for form in declared.schema:
                assert form_from_message(form_message(form)) == form, (spec.name, declared.name)


def test_client_derives_the_structural_checks_from_describe_loss():
    info = messages.loss_info(registry.get("FocalLoss"))
    check_call(info, {}, [torch.randn(4, 3), torch.tensor([0, 1, 2, 3])], {})
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the client's LossdError
        check_call(info, {}, [torch.randn(4, 3), torch.tensor([0, 1])], {})
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and caught.value.field == "args[1]"
    # The value rules (index ranges) are the server's: the client does not read tensor data.
    check_call(info, {}, [torch.randn(4, 3), torch.tensor([0, 1, 2, 9])], {})


@contextlib.contextmanager
def _counting_checks() -> Iterator[list[str]]:
    """The declared paths Checker.check is called for, while the block runs."""
    checks: list[str] = []
    original = Checker.check

    def counted(self, *args):
        checks.append(args[2])
        return original(self, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Checker, "check", counted)
        yield checks


def test_a_call_signature_that_passed_is_not_checked_again_and_any_other_is():
    info = messages.loss_info(registry.get("FocalLoss"))
    with _counting_checks() as checks:
        check_call(info, {}, [torch.randn(4, 3), torch.tensor([0, 1, 2, 3])], {})
        passed = len(checks)
        check_call(info, {}, [torch.randn(4, 3), torch.tensor([3, 2, 1, 0])], {})
        assert len(checks) == passed  # same layout, dtypes and shapes: remembered
        # Another shape, dtype or parameter is checked, and refused where it is wrong.
        for target, params in (
            (torch.tensor([0, 1]), {}),
            (torch.tensor([0, 1, 2, 3], dtype=torch.int32), {}),
            (torch.tensor([0, 1]), {"gamma": 3.0}),
        ):
            with pytest.raises(Exception) as caught:  # noqa: PT011 - the client's LossdError
                check_call(info, params, [torch.randn(4, 3), target], {})
            assert caught.value.field == "args[1]"
        assert len(checks) > passed


def test_a_remembered_call_signature_runs_the_value_checks_and_promotions_again():
    spec = _spec(
        Input("pred", shape=("N", "C")),
        Input("target", forms=(INDEX,)),
        Input("scale", forms=(Form(dtypes=("float32",), promote_with="pred", shape=("N",)),)),
    )
    good = [torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 3, 4])]
    bad = [torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 4])]
    with pytest.raises(InvalidArgument) as cold:
        bind_inputs(spec, list(bad), {})  # nothing remembered: checked in full
    with _counting_checks() as checks:
        first = bind_inputs(spec, list(good), {})  # passes: its signature is remembered
        passed = len(checks)
        again = bind_inputs(spec, list(good), {})
        with pytest.raises(InvalidArgument) as warm:
            bind_inputs(spec, list(bad), {})
        assert len(checks) == passed  # the structural checks ran once
        bind_inputs(spec, [torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1]), torch.arange(5)], {})
        assert len(checks) > passed  # another shape: checked in full
    assert (warm.value.field, warm.value.message) == (cold.value.field, cold.value.message)
    assert first["scale"].dtype == again["scale"].dtype == torch.float32  # promoted both times
    assert torch.equal(again["scale"], torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_schema_errors_carry_the_field():
    checker = Checker()
    with pytest.raises(SchemaError) as info:
        checker.check((Form(shape=("N", 4)),), torch.randn(3, 5), "pred", "kwargs.pred")
    assert info.value.field == "kwargs.pred" and "with 4 there (dim 1)" in info.value.message


@pytest.mark.parametrize(
    "loss, params",
    [
        ("FocalLoss", {"reduction": "avg"}),
        ("SmoothL1Loss", {"beta": 0.0}),
        ("cross_entropy", {"label_smoothing": 1.5}),
        ("cross_entropy", {"weight": "heavy"}),
        ("IoULoss", {"mode": "cubic"}),
    ],
)
def test_client_refuses_parameters_with_the_servers_rules_and_words(loss, params):
    spec = registry.get(loss)
    with pytest.raises(InvalidArgument) as server:
        spec.canonical_params(params)
    with pytest.raises(Exception) as client:  # noqa: PT011 - the client's LossdError
        check_params(messages.loss_info(spec), params)
    assert client.value.field == server.value.field
    assert client.value.details == str(server.value)


def test_the_engine_checks_the_declaration_once_before_the_loss_runs(monkeypatch):
    calls = []

    def probe(pred, target):
        calls.append((pred.shape, target.shape))
        return (pred - target).abs().sum()

    spec = LossSpec(
        name="schema_probe",
        fn=probe,
        families=("test",),
        summary="",
        inputs=(Input("pred", shape=("N", 4)), Input("target", same_shape="pred")),
    )
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
    engine = Engine("cpu")
    with pytest.raises(InvalidArgument) as info:
        engine.evaluate("schema_probe", args=[torch.randn(3, 4), torch.randn(3, 5)])
    assert info.value.field == "args[1]" and "shape [3, 4] (pred's)" in info.value.message
    assert calls == []  # refused before the body ran
    engine.evaluate("schema_probe", args=[torch.randn(3, 4), torch.randn(3, 4)])
    assert calls == [((3, 4), (3, 4))]
