"""The server's prepared plans (server/prepared.py): a request decoded by its layout's plan is the
call the plain parse and decode make of the same bytes, bit for bit; any other request (another
constant byte, another tail, bool bytes the decode refuses) is left to the plain path."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lossd.client._proto import lossd_pb2 as pb
from lossd.client.functional import build_request
from lossd.client.wire import codec
from lossd.server.config import ServerConfig
from lossd.server.messages import ComputeCall, decode_compute
from lossd.server.prepared import (
    MAX_LAYOUT_BYTES,
    MAX_PLANS,
    QUIET_AFTER,
    QUIET_EVERY,
    RequestPlans,
)
from tests.support.wirekit import ALL_DTYPES

LIMITS = ServerConfig().limits
GEN = torch.Generator().manual_seed(0)


def _plans(limit: int = MAX_PLANS) -> RequestPlans:
    return RequestPlans(LIMITS, 1 << 20, limit)


def _taught(request: pb.ComputeRequest, plans: RequestPlans | None = None) -> RequestPlans:
    """``plans`` (new ones by default) once ``request`` went the plain way twice."""
    plans = _plans() if plans is None else plans
    data = request.SerializeToString()
    for _ in range(2):
        assert plans.decode(data) is None
        plans.learn(data, request)
    return plans


def _planned(plans: RequestPlans, data: bytes) -> ComputeCall | None:
    found = plans.decode(data)
    return found.call if found is not None else None


def _random(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype is torch.bool:
        return torch.rand(shape, generator=GEN) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=GEN).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=GEN).to(dtype)


def _request(args, kwargs=None, params=None, *, loss="any_loss", grad_paths=(), **fields):
    request = build_request(loss, params or {}, args, kwargs or {}, grad_paths)
    for name, value in fields.items():
        if isinstance(value, (pb.AuditContext, pb.Autocast, pb.Tensor)):
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


def _calls_equal(a: ComputeCall, b: ComputeCall) -> None:
    """Every field, and every tensor by dtype, shape, strides and bits, and writable and fresh."""

    def tensors(call: ComputeCall) -> list[tuple[str, torch.Tensor]]:
        found = [*codec.iter_tensors(call.params, "params")]
        found += codec.call_tensors(call.args, call.kwargs)
        return found + ([("grad_output", call.grad_output)] if call.grad_output is not None else [])

    left, right = tensors(a), tensors(b)
    assert [p for p, _ in left] == [p for p, _ in right]
    for (path, x), (_, y) in zip(left, right):
        assert (x.dtype, x.shape, x.stride()) == (y.dtype, y.shape, y.stride()), path
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), path
        assert not x.requires_grad and x.is_cpu, path
    strip = lambda c: codec.map_tensors([c.params, c.args, c.kwargs], type)  # noqa: E731
    assert repr(strip(a)) == repr(strip(b))
    for name in ("loss", "grad_paths", "request_id", "autocast", "grad_output_batched"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.audit.SerializeToString(deterministic=True) == b.audit.SerializeToString(
        deterministic=True
    )
    assert a.grad_grads == b.grad_grads == {}


def _plain(data: bytes) -> ComputeCall:
    return decode_compute(pb.ComputeRequest.FromString(data), LIMITS)


def _variety() -> dict[str, tuple[pb.ComputeRequest, Any]]:
    """Requests of many layouts, each with a function making another call of the same layout
    (new tensor values of the same dtypes and shapes, another request id)."""

    def same_layout(args, kwargs=None, params=None, **fields):
        def make(seed: int) -> pb.ComputeRequest:
            fresh = lambda t: _random(t.dtype, tuple(t.shape))  # noqa: E731
            return _request(
                codec.map_tensors(args, fresh),
                codec.map_tensors(kwargs or {}, fresh),
                codec.map_tensors(params or {}, fresh),
                **{"request_id": f"call-{seed}", **fields},
            )

        return make(0), make

    audit = pb.AuditContext(run_id="run-1", rank=0, micro_batch=3, tags={"k": "v"})
    autocast = pb.Autocast(enabled=True, device_type="cpu", dtype=pb.DATA_TYPE_BFLOAT16)
    cases = {
        f"dtype-{dtype}": same_layout([_random(dtype, (3, 5)), _random(dtype, (7,))])
        for dtype in ALL_DTYPES
    }
    cases["0-d and empty"] = same_layout(
        [_random(torch.float32, ()), torch.empty(0, 4), torch.empty(2, 0, dtype=torch.int64)]
    )
    cases["nested trees"] = same_layout(
        [{"pred": [_random(torch.float32, (2, 3)), (1, 2.5, None)], "w": "mean"}, [[]], ()],
        {"target": (_random(torch.int64, (2,)), {"mask": _random(torch.bool, (2, 3))}), "x": 3},
        {"alpha": 0.25, "weight": _random(torch.float64, (3,)), "names": ["a", "b"]},
        grad_paths=["args[0].pred[0]"],
    )
    cases["grad_output"] = same_layout(
        [_random(torch.float32, (4, 2))],
        grad_output=codec.encode_tensor(_random(torch.float32, (4,))),
    )
    cases["audit"] = same_layout([_random(torch.float32, (4, 2))], audit=audit)
    cases["autocast"] = same_layout([_random(torch.float32, (4, 2))], autocast=autocast)
    cases["audit and autocast"] = same_layout(
        [_random(torch.float32, (4, 2))], audit=audit, autocast=autocast
    )
    cases["no request id"] = same_layout([_random(torch.float32, (4, 2))], request_id="")
    return cases


VARIETY = _variety()


@pytest.mark.parametrize("name", list(VARIETY))
def test_a_planned_decode_is_the_plain_decode_of_the_same_bytes(name):
    first, make = VARIETY[name]
    plans = _taught(first)
    assert len(plans) == 1
    for seed in (1, 2):
        data = make(seed).SerializeToString()
        planned, plain = _planned(plans, data), _plain(data)
        assert planned is not None, "a request of a learned layout is decoded by its plan"
        if name == "no request id":  # each call gets an id of its own, as on the plain path
            assert planned.request_id != plain.request_id and len(planned.request_id) == 32
            planned.request_id = plain.request_id
        _calls_equal(planned, plain)
        tensors = [t for _, t in codec.call_tensors(planned.args, planned.kwargs) if t.numel()]
        tensors[0].view(-1)[0] = tensors[0].view(-1)[0]  # writable
        assert _planned(plans, data).args is not planned.args  # fresh trees every call


def test_a_request_is_planned_only_from_its_second_plain_success():
    request = _request([_random(torch.float32, (4, 2))], request_id="a")
    data = request.SerializeToString()
    plans = _plans()
    plans.learn(data, request)
    assert _planned(plans, data) is None and len(plans) == 0
    plans.learn(data, request)
    assert _planned(plans, data) is not None and len(plans) == 1


def _one_byte_changed(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1 and len(old) == len(new)
    return data.replace(old, new)


@pytest.mark.parametrize(
    "change",
    ["shape", "dtype", "param", "loss name", "grad path", "length"],
)
def test_a_changed_constant_byte_is_left_to_the_plain_path(change):
    x = _random(torch.float32, (4, 2))
    request = _request([x], params={"alpha": 0.25}, grad_paths=["args[0]"], request_id="id-1")
    plans = _taught(request)
    data = request.SerializeToString()
    if change == "shape":  # (4, 2) -> (2, 4): the same byte count, another tensor
        other = _request([x.reshape(2, 4)], params={"alpha": 0.25}, grad_paths=["args[0]"])
    elif change == "dtype":  # float32 -> int32: the same byte count
        other = _request([x.view(torch.int32)], params={"alpha": 0.25}, grad_paths=["args[0]"])
    elif change == "param":
        other = _request([x], params={"alpha": 0.5}, grad_paths=["args[0]"])
    elif change == "loss name":
        other = pb.ComputeRequest.FromString(_one_byte_changed(data, b"any_loss", b"any_lost"))
    elif change == "grad path":
        other = _request([x], params={"alpha": 0.25}, grad_paths=["args[1]"])
    else:  # a tensor's bytes one longer: its length prefix and the message's change
        other = _request([x], params={"alpha": 0.25}, grad_paths=["args[0]"])
        other.args[0].tensor_value.data += b"\0"
    other.request_id = "id-2"
    changed = other.SerializeToString()
    assert len(changed) != len(data) or changed != data
    assert _planned(plans, changed) is None
    assert _planned(plans, data.replace(b"id-1", b"id-3")) is not None  # the layout still is


def test_bool_bytes_the_decode_refuses_are_left_to_the_plain_path():
    mask = _random(torch.bool, (6,))
    request = _request([mask], request_id="id-1")
    plans = _taught(request)
    bad = bytearray(request.SerializeToString())
    assert bytes(bad).count(codec.wire_array(mask).tobytes()) == 1
    at = bytes(bad).index(codec.wire_array(mask).tobytes())
    bad[at + 2] = 2
    assert _planned(plans, bytes(bad)) is None
    with pytest.raises(codec.DecodeError, match="args\\[0\\].data: expected bool bytes of 0 or 1"):
        _plain(bytes(bad))


@pytest.mark.parametrize(
    "tail",
    [
        "another field",  # the loss name again: it would replace the learned one
        "an unknown field",
        "a repeated request id",
        "an empty request id field",
        "broken utf-8",
        "a truncated field",
    ],
)
def test_a_tail_with_anything_but_fields_7_to_9_is_left_to_the_plain_path(tail):
    request = _request([_random(torch.float32, (4, 2))], request_id="")
    plans = _taught(request)
    body = request.SerializeToString()
    extra = {
        "another field": pb.ComputeRequest(loss="other").SerializeToString(),
        "an unknown field": b"\x3a\x02id" + b"\xa0\x06\x01",  # field 100, a varint
        "a repeated request id": b"\x3a\x02id\x3a\x02ie",
        "an empty request id field": b"\x3a\x00",
        "broken utf-8": b"\x3a\x02\xff\xfe",
        "a truncated field": b"\x3a\x05id",
    }[tail]
    assert _planned(plans, body + extra) is None
    assert _planned(plans, body + b"\x3a\x02id").request_id == "id"


def test_the_per_call_fields_are_checked_on_a_plan_as_on_the_plain_path():
    request = _request([_random(torch.float32, (4, 2))], request_id="fine")
    plans = _taught(request)
    for bad in (
        _request([_random(torch.float32, (4, 2))], request_id="a\x00b"),
        _request([_random(torch.float32, (4, 2))], request_id="x" * 129),
        _request([_random(torch.float32, (4, 2))], audit=pb.AuditContext(rank=-2)),
        _request(
            [_random(torch.float32, (4, 2))],
            autocast=pb.Autocast(enabled=True, device_type="mps", dtype=pb.DATA_TYPE_FLOAT16),
        ),
    ):
        data = bad.SerializeToString()
        with pytest.raises(Exception) as plain:
            _plain(data)
        with pytest.raises(type(plain.value)) as planned:
            plans.decode(data)
        assert str(planned.value) == str(plain.value)
        assert planned.value.field == plain.value.field


def test_many_layouts_keep_the_plans_at_their_bound():
    plans = _plans(limit=8)
    requests = [_request([_random(torch.float32, (n + 1,))], request_id="r") for n in range(20)]
    for request in requests:
        _taught(request, plans)
        assert len(plans) <= 8
    assert len(plans) == 8
    newest, oldest = requests[-1].SerializeToString(), requests[0].SerializeToString()
    assert _planned(plans, newest) is not None and _planned(plans, oldest) is None


def test_layouts_that_have_no_plan():
    x = _random(torch.float32, (4, 2))
    products = _request([x], grad_paths=["args[0]"], request_id="r")
    products.grad_grads.add(path="args[0]").grad.CopyFrom(codec.encode_tensor(x))
    batched = _request(  # field 11, after the per-call fields
        [x],
        grad_paths=["args[0]"],
        grad_output=codec.encode_tensor(_random(torch.float32, (3,))),
        grad_output_batched=True,
        request_id="r",
    )
    too_many = _request([_random(torch.float32, (1,)) for _ in range(256)], request_id="r")
    # fields 7-9 not last: the per-call fields are not a tail
    shuffled = _request([x], request_id="").SerializeToString() + b"\x3a\x01r" + b"\x2a\x07args[0]"
    for data, request in (
        (products.SerializeToString(), products),
        (batched.SerializeToString(), batched),
        (too_many.SerializeToString(), too_many),
        (shuffled, pb.ComputeRequest.FromString(shuffled)),
    ):
        plans = _plans()
        plans.learn(data, request)
        plans.learn(data, request)
        assert len(plans) == 0 and _planned(plans, data) is None


def test_a_loss_whose_layouts_never_come_again_is_noted_only_now_and_then():
    plans = _plans()
    for n in range(QUIET_AFTER):  # each call a new shape: every one noted
        request = _request([_random(torch.float32, (n + 1,))], request_id="r")
        plans.learn(request.SerializeToString(), request)
    assert len(plans._known) == QUIET_AFTER
    for n in range(QUIET_AFTER, QUIET_AFTER + 4 * QUIET_EVERY):
        request = _request([_random(torch.float32, (n + 1,))], request_id="r")
        plans.learn(request.SerializeToString(), request)
    assert len(plans._known) == QUIET_AFTER + 4  # one call in QUIET_EVERY
    other = _request([_random(torch.float32, (3,))], loss="another_loss", request_id="r")
    _taught(other, plans)  # another loss is noted as before
    # A layout that comes again is planned once two of its calls were noted, and then the loss
    # is noted call by call again.
    again = _request([_random(torch.float32, (2, 2))], request_id="r")
    data = again.SerializeToString()
    for _ in range(2 * QUIET_EVERY):
        plans.learn(data, again)
    assert _planned(plans, data) is not None
    assert plans._new_in_a_row["any_loss"] == 0


def test_the_plans_memory_is_bounded_by_their_constant_bytes():
    """Each plan keeps its layout's constant bytes (twice): a layout of more than
    MAX_LAYOUT_BYTES (a long list of numbers among the parameters) is never noted, so however
    many such layouts a caller sends, the plans hold at most MAX_PLANS x that."""
    plans = _plans(limit=8)
    x = _random(torch.float32, (4,))
    long_params = [float(n) for n in range(MAX_LAYOUT_BYTES // 8 + 1)]
    for n in range(20):
        big = _request([x], params={"weights": [*long_params, float(n)]}, request_id="r")
        assert len(big.SerializeToString()) > MAX_LAYOUT_BYTES
        _taught(big, plans)
    assert len(plans._known) == 0 and len(plans) == 0
    small = _request([x], params={"weights": long_params[:100]}, request_id="r")
    _taught(small, plans)  # a usual one is planned as before
    assert _planned(plans, small.SerializeToString()) is not None
    for n in range(20):
        _taught(_request([_random(torch.float32, (n + 1,))], request_id="r"), plans)
    assert all(len(key) <= MAX_LAYOUT_BYTES for key in plans._known)
