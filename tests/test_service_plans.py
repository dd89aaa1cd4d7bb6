"""Compute through a prepared plan (server/prepared.py wired into LossServicer.Compute): the same
bytes get the same answer or the same error as from a servicer without plans, and every check of
the values still runs when a layout's plan decodes them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from lossd.client._proto import lossd_pb2 as pb
from lossd.client.functional import build_request
from lossd.client.wire import codec
from lossd.server import registry
from lossd.server.budget import MemoryBudget, RawRequest
from lossd.server.config import ServerConfig
from lossd.server.engine import Engine
from lossd.server.errors import InvalidArgument
from lossd.server.service import ComputeEvent, LossServicer
from tests.support.losskit import differentiable_paths

LIMITS = ServerConfig().limits


class Aborted(Exception):
    pass


class Context:
    """What Compute reads of a gRPC context here; an abort raises with its status."""

    def abort_with_status(self, status: Any) -> None:
        raise Aborted((status.code, status.details, status.trailing_metadata))

    def is_active(self) -> bool:
        return True

    def time_remaining(self) -> None:
        return None


class Recorded:
    """An after_compute hook keeping what each event saw."""

    def __init__(self) -> None:
        self.events: list[ComputeEvent] = []

    def __call__(self, event: ComputeEvent) -> None:
        self.events.append(event)


def _servicer(max_plans: int, hook: Recorded | None = None) -> LossServicer:
    return LossServicer(
        Engine("cpu"),
        LIMITS,
        [hook] if hook is not None else [],
        max_plans=max_plans,
        budget=MemoryBudget(1 << 30),
    )


def _answer(servicer: LossServicer, data: bytes) -> tuple[str, Any]:
    """("ok", the response's bytes without its timings) or ("error", the status)."""
    try:
        response = servicer.Compute(RawRequest(data), Context())
    except Aborted as exc:
        return "error", exc.args[0]
    response.ClearField("timings")
    return "ok", response.SerializeToString(deterministic=True)


def _request(loss: str, args, kwargs=None, params=None, grad_paths=(), **fields) -> bytes:
    request = build_request(loss, params or {}, args, kwargs or {}, grad_paths)
    request.request_id = fields.pop("request_id", "call")
    for name, value in fields.items():
        getattr(request, name).CopyFrom(value)
    return request.SerializeToString()


def _example(spec: registry.LossSpec, seed: int) -> bytes:
    torch.manual_seed(seed)
    args, kwargs, params = spec.make_example(torch.float32)
    paths = differentiable_paths(spec, args, kwargs)
    value = Engine("cpu").evaluate(spec.name, params, list(args), kwargs).value
    request = build_request(spec.name, params, list(args), kwargs, paths)
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        grad_output = torch.randn(value.shape, generator=torch.Generator().manual_seed(seed))
        codec.encode_tensor(grad_output.to(value.dtype), request.grad_output)
    request.request_id = f"example-{seed}"
    return request.SerializeToString()


@pytest.mark.parametrize("spec", registry.all_specs(), ids=lambda s: s.name)
def test_every_loss_example_gets_the_plain_answer_from_its_plan(spec):
    planned, plain = _servicer(16), _servicer(0)
    # Learned on the second plain success; the third call, the first through the plan, fills
    # the engine's memo of the input checks, which the fourth replays.
    for seed in range(4):
        data = _example(spec, seed)
        assert _answer(planned, data) == _answer(plain, data)
    hit = planned.plans.decode(data)
    assert hit is not None, f"{spec.name}'s example has no plan"
    assert plain.plans is None


AUDIT = pb.AuditContext(run_id="run", rank=1, micro_batch=0, tags={"step": "3"})
AUTOCAST = pb.Autocast(enabled=True, device_type="cpu", dtype=pb.DATA_TYPE_BFLOAT16)


@pytest.mark.parametrize(
    "fields",
    [{}, {"audit": AUDIT}, {"autocast": AUTOCAST}, {"audit": AUDIT, "autocast": AUTOCAST}],
    ids=["none", "audit", "autocast", "both"],
)
def test_the_per_call_fields_reach_the_call_and_its_hooks_as_on_the_plain_path(fields):
    seen = {True: Recorded(), False: Recorded()}
    servicers = {True: _servicer(16, seen[True]), False: _servicer(0, seen[False])}
    x = torch.randn(8, 5)
    for i in range(3):
        data = _request(
            "cross_entropy",
            [x + i, torch.arange(8) % 5],
            grad_paths=["args[0]"],
            request_id=f"id-{i}",
            **fields,
        )
        assert _answer(servicers[True], data) == _answer(servicers[False], data)
    assert servicers[True].plans.decode(data) is not None
    a, b = seen[True].events[-1], seen[False].events[-1]
    assert a.request_bytes == b.request_bytes == len(data)
    assert a.call.request_id == b.call.request_id == "id-2"
    assert a.call.audit.SerializeToString(deterministic=True) == b.call.audit.SerializeToString(
        deterministic=True
    )
    assert a.call.autocast == b.call.autocast
    assert torch.equal(a.call.args[0], b.call.args[0]) and torch.equal(
        a.call.args[1], b.call.args[1]
    )


def _learned(loss: str, args, **kw) -> tuple[LossServicer, LossServicer]:
    """A servicer with this layout's plan (its engine memo filled by a call through it) and one
    without plans."""
    planned, plain = _servicer(16), _servicer(0)
    for i in range(3):
        data = _request(loss, args, request_id=f"learn-{i}", **kw)
        assert _answer(planned, data)[0] == "ok"
    hit = planned.plans.decode(data)
    assert hit is not None and "checks" in hit.call.memo
    return planned, plain


def test_an_out_of_range_class_index_is_refused_on_a_plan_as_on_the_plain_path():
    x = torch.randn(6, 4)
    planned, plain = _learned("cross_entropy", [x, torch.tensor([0, 1, 2, 3, 0, 1])])
    data = _request("cross_entropy", [x, torch.tensor([0, 1, 2, 9, 0, 1])])
    assert planned.plans.decode(data) is not None  # the same layout: its plan decodes it
    kind, status = _answer(planned, data)
    assert (kind, status) == _answer(plain, data)
    assert kind == "error" and "args[1]" in status[1], status


def test_a_nan_box_in_a_nested_target_is_refused_on_a_plan_as_on_the_plain_path():
    spec = registry.get("detr_loss")
    planned, plain = _servicer(16), _servicer(0)
    for seed in range(3):
        assert _answer(planned, _example(spec, seed))[0] == "ok"
    torch.manual_seed(3)
    args, kwargs, params = spec.make_example(torch.float32)
    boxes = dict(codec.call_tensors(args, kwargs))["args[1].gt[0].boxes"]
    boxes[1, 0] = float("nan")
    request = build_request(
        spec.name, params, list(args), kwargs, differentiable_paths(spec, args, kwargs)
    )
    request.request_id = "nan"
    data = request.SerializeToString()
    hit = planned.plans.decode(data)  # the same layout: its plan decodes it, its memo is set
    assert hit is not None and "checks" in hit.call.memo
    kind, status = _answer(planned, data)
    assert (kind, status) == _answer(plain, data)
    assert kind == "error" and "args[1].gt[0].boxes[1]" in status[1], status


def test_a_nan_input_gets_the_plain_answer_on_a_plan():
    x = torch.randn(6, 4)
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    planned, plain = _learned("cross_entropy", [x, target], grad_paths=["args[0]"])
    x[2, 1] = float("nan")
    data = _request("cross_entropy", [x, target], grad_paths=["args[0]"])
    assert planned.plans.decode(data) is not None
    answer = _answer(planned, data)
    assert answer == _answer(plain, data)
    assert pb.ComputeResponse.FromString(answer[1]).non_finite


@pytest.mark.parametrize("change", ["shape", "dtype", "param", "loss"])
def test_a_changed_constant_byte_gets_the_plain_answer_or_error(change):
    x = torch.randn(6, 4)
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    planned, plain = _learned("cross_entropy", [x, target], grad_paths=["args[0]"])
    args, params, loss = [x, target], {}, "cross_entropy"
    if change == "shape":
        args = [x, target.reshape(2, 3)]  # refused by the shape check
    elif change == "dtype":
        args = [x.double(), target]
    elif change == "param":
        params = {"label_smoothing": 0.1}
    else:
        loss = "cross_entropX"
    data = _request(loss, args, params=params, grad_paths=["args[0]"])
    assert planned.plans.decode(data) is None
    assert _answer(planned, data) == _answer(plain, data)


def test_a_tail_with_another_field_falls_back_to_the_plain_path():
    x = torch.randn(6, 4)
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    planned, plain = _learned("cross_entropy", [x, target], grad_paths=["args[0]"])
    body = _request("cross_entropy", [x, target], grad_paths=["args[0]"], request_id="")
    # The loss name again, last: protobuf keeps the last one, so this asks for another loss.
    data = body + pb.ComputeRequest(loss="nll", request_id="t").SerializeToString()
    assert planned.plans.decode(data) is None
    answer = _answer(planned, data)
    assert answer == _answer(plain, data)
    assert answer[0] == "ok"


def test_threads_sharing_the_plans_get_the_plain_answers_and_keep_the_bound():
    planned, plain = _servicer(4), _servicer(0)
    datas = [
        _request(
            "cross_entropy",
            [torch.randn(n + 2, 3), torch.arange(n + 2) % 3],
            grad_paths=["args[0]"],
            request_id=f"{n}-{i}",
        )
        for n in range(8)  # 8 layouts, 6 calls each in turn, over a bound of 4
        for i in range(6)
    ]
    expected = [_answer(plain, data) for data in datas]
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda data: _answer(planned, data), datas))
    assert got == expected
    assert 0 < len(planned.plans) <= 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_each_float_dtype_gets_the_plain_answer_from_its_plan(dtype):
    planned, plain = _servicer(16), _servicer(0)
    for i in range(3):
        args = [torch.randn(5, 3).to(dtype), torch.randn(5, 3).to(dtype)]
        data = _request("mse", args, grad_paths=["args[0]", "args[1]"], request_id=f"{i}")
        assert _answer(planned, data) == _answer(plain, data)
    assert planned.plans.decode(data) is not None


@pytest.mark.parametrize(
    "fields",
    [
        {"request_id": "a\x00b"},
        {"request_id": "x" * 129},
        {"audit": pb.AuditContext(rank=-2)},
        {"autocast": pb.Autocast(enabled=True, device_type="mps", dtype=pb.DATA_TYPE_FLOAT16)},
        {"autocast": pb.Autocast(enabled=True, device_type="cuda", dtype=pb.DATA_TYPE_FLOAT16)},
    ],
    ids=["nul in id", "long id", "rank", "autocast device", "cuda autocast on cpu"],
)
def test_bad_per_call_fields_get_the_plain_error_on_a_plan(fields):
    x = torch.randn(6, 4)
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    planned, plain = _learned("cross_entropy", [x, target], grad_paths=["args[0]"])
    data = _request("cross_entropy", [x, target], grad_paths=["args[0]"], **fields)
    if fields.get("autocast", pb.Autocast()).device_type == "cuda":  # refused by the engine
        assert planned.plans.decode(data) is not None
    else:  # refused by the plan's own checks of the per-call fields, not left to the plain path
        with pytest.raises(InvalidArgument):
            planned.plans.decode(data)
    answer = _answer(planned, data)
    assert answer == _answer(plain, data)
    assert answer[0] == "error"
