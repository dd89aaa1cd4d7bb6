"""Prepared requests (client/prepared.py): the bytes a prepared call sends are the plain
serialization of its request, byte for byte, and a layout is never replayed for another call."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import torch

from lossd.client._proto import lossd_pb2 as pb
from lossd.client.connection import LossClient, new_request_id
from lossd.client.errors import LossdError
from lossd.client.functional import build_request, remote_loss
from lossd.client.prepared import MAX_SIGNATURES, Answer, PreparedRequests, tail
from lossd.client.signature import call_signature
from lossd.client.transport import Transport
from lossd.client.wire import codec


class _Recorder(LossClient):
    """A client that records each request as the server would parse it, and answers with a
    scalar loss (the sum of the first input, in ``loss_dtype``) and gradients of twice each
    input asked for, with a note when ``note`` is set."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1:1", timeout=1.0)  # never reached: no call is sent
        self.sent: list[tuple[str, pb.ComputeRequest]] = []
        self.loss_dtype = torch.float32
        self.note = ""

    def compute(self, request: pb.ComputeRequest) -> pb.ComputeResponse:
        return self._answer("plain", request.SerializeToString())

    def compute_serialized(self, data: bytes, request_id: str) -> bytes:
        return self._answer("prepared", data).SerializeToString()

    def _answer(self, how: str, data: bytes) -> pb.ComputeResponse:
        request = pb.ComputeRequest.FromString(data)
        self.sent.append((how, request))
        args = [codec.decode_value(v) for v in request.args]
        kwargs = codec.decode_map(request.kwargs, "kwargs")
        tensors = dict(codec.call_tensors(args, kwargs))
        response = pb.ComputeResponse(
            request_id=request.request_id, notes=[self.note] * bool(self.note)
        )
        response.timings.decode_ns = len(self.sent)  # a field after the tensors that changes
        first = next(iter(tensors.values()))
        codec.encode_value(first.to(self.loss_dtype).sum(), response.loss)
        for path in request.grad_paths:
            codec.encode_tensor(2 * tensors[path], response.grads.add(path=path).grad)
        return response


def _expected(name, params, args, kwargs, sent: pb.ComputeRequest) -> pb.ComputeRequest:
    """The request the plain path builds for this call (with the id and fields the call got)."""
    grad_paths = [p for p, t in codec.call_tensors(args, kwargs) if t.requires_grad]
    request = build_request(name, params, args, kwargs, grad_paths)
    request.request_id = sent.request_id
    return request


def _trees() -> list[tuple[dict[str, Any], tuple[Any, ...], dict[str, Any]]]:
    """Calls of several kinds: dtypes, nested trees, parameters, empty and 0-d tensors."""
    x = torch.randn(4, 3, requires_grad=True)
    return [
        ({}, (x, torch.tensor([0, 1, 2, 0])), {}),
        ({"gamma": 2.0, "reduction": "sum", "weights": [1.0, -0.0]}, (x,), {"y": torch.ones(4)}),
        ({"nested": {"a": 1, "b": (True, None)}}, ([x, {"t": torch.arange(3)}],), {}),
        ({}, (x.t(),), {"mask": torch.tensor([True, False]), "empty": torch.zeros(0, 3)}),
        ({}, (torch.randn(2, 2, dtype=torch.float64, requires_grad=True),), {"s": torch.tensor(3)}),
        ({}, (torch.randn(5).half().requires_grad_(), torch.randn(5).bfloat16()), {}),
        ({}, (torch.tensor([1, -2], dtype=torch.int8), torch.tensor([7], dtype=torch.uint8)), {}),
        ({}, (torch.tensor([1], dtype=torch.int16), torch.tensor([2], dtype=torch.int32)), {}),
    ]


@pytest.mark.parametrize("case", range(len(_trees())))
def test_a_layout_fills_in_the_plain_serialization_byte_for_byte(case: int) -> None:
    params, args, kwargs = _trees()[case]
    tensors = [t for _, t in codec.call_tensors(args, kwargs)]
    grad_paths = [p for p, t in codec.call_tensors(args, kwargs) if t.requires_grad]

    def body(a, k):
        request = build_request("loss", params, a, k, grad_paths)
        request.ClearField("request_id")
        return request

    audit = pb.AuditContext(run_id="run", step=3, tags={"k": "v"})
    autocast = pb.Autocast(enabled=True, device_type="cpu", dtype=pb.DATA_TYPE_BFLOAT16)
    prepared = PreparedRequests()
    for extra in ({}, {"audit": audit}, {"audit": audit, "autocast": autocast}):
        request_id = new_request_id()
        plain = build_request("loss", params, args, kwargs, grad_paths, extra.get("audit"))
        plain.request_id = request_id
        if "autocast" in extra:
            plain.autocast.CopyFrom(autocast)
        prepared.learn("key", tensors, body, args, kwargs, plain)
    layout = prepared.layout("key")
    assert layout is not None  # prepared at its second sighting
    for extra in ({}, {"audit": audit}, {"autocast": autocast}):
        request_id = new_request_id()
        data = layout.fill(tensors, tail(request_id, extra.get("audit"), extra.get("autocast")))
        plain = build_request("loss", params, args, kwargs, grad_paths, extra.get("audit"))
        plain.request_id = request_id
        if "autocast" in extra:
            plain.autocast.CopyFrom(autocast)
        assert data == plain.SerializeToString()
        assert pb.ComputeRequest.FromString(data) == plain


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.int64]
)
def test_a_layout_fills_in_tensors_held_unlike_the_ones_it_was_learned_from(dtype) -> None:
    """Learned from plain contiguous tensors, a layout sends another call's tensors of the same
    signature as the plain path does: requiring grad, transposed, negated views, offset views."""
    base = torch.arange(12.0).reshape(3, 4).sub(5).to(dtype)

    def body(a, k):
        request = build_request("loss", {}, a, k)
        request.ClearField("request_id")
        return request

    prepared = PreparedRequests()
    for _ in range(2):
        plain = build_request("loss", {}, (base.clone(),), {})
        prepared.learn("key", [base.clone()], body, (base.clone(),), {}, plain)
    layout = prepared.layout("key")
    assert layout is not None
    wide = torch.arange(24.0).reshape(6, 4).to(dtype)
    held = [
        base.float().requires_grad_().to(dtype) if dtype.is_floating_point else base,
        torch.arange(12.0).reshape(4, 3).t().to(dtype) if dtype is not torch.bool else base.t().t(),
        torch.arange(12.0).reshape(4, 3).to(dtype).t(),  # not contiguous
        torch._neg_view(base) if dtype.is_floating_point else base,  # negated lazily
        wide[3:],  # a view at an offset into its storage
    ]
    for tensor in held:
        request_id = new_request_id()
        plain = build_request("loss", {}, (tensor,), {})
        plain.request_id = request_id
        assert layout.fill([tensor], tail(request_id, None, None)) == plain.SerializeToString()


def _call(client: _Recorder, transport: Transport, params, args, kwargs) -> pb.ComputeRequest:
    signature = call_signature(params, args, kwargs)
    value, _ = remote_loss(
        client, "loss", params, args, kwargs, transport=transport, _signature=signature
    )
    if value.requires_grad:
        value.backward()
    return client.sent[-1][1]


def test_calls_that_differ_only_in_a_param_shape_dtype_or_place_get_their_own_request() -> None:
    x = torch.randn(12, requires_grad=True)
    calls = [
        ({"gamma": 2.0}, (x, torch.zeros(12)), {}),
        ({"gamma": 3.0}, (x, torch.zeros(12)), {}),
        ({"gamma": -0.0}, (x, torch.zeros(12)), {}),
        ({"gamma": 0.0}, (x, torch.zeros(12)), {}),
        ({"gamma": 2}, (x, torch.zeros(12)), {}),  # an int, not the float 2.0
        ({"gamma": 2.0}, (x.view(3, 4), torch.zeros(12)), {}),
        ({"gamma": 2.0}, (x.view(4, 3), torch.zeros(12)), {}),
        ({"gamma": 2.0}, (x, torch.zeros(12, dtype=torch.int32)), {}),
        ({"gamma": 2.0}, (x,), {"target": torch.zeros(12)}),
        ({"gamma": 2.0}, ([x], torch.zeros(12)), {}),
        ({"gamma": 2.0}, ((x,), torch.zeros(12)), {}),
        ({"gamma": 2.0}, (torch.zeros(12), x), {}),
        ({"gamma": 2.0}, (x.detach(), torch.zeros(12)), {}),  # no grad path
    ]
    client = _Recorder()
    transport = Transport(client, "unary")
    for _ in range(3):  # the second round prepares each, the third replays them
        for params, args, kwargs in calls:
            x.grad = None
            sent = _call(client, transport, params, args, kwargs)
            assert sent == _expected("loss", params, args, kwargs, sent)
    assert [how for how, _ in client.sent[-len(calls) :]] == ["prepared"] * len(calls)
    assert [how for how, _ in client.sent[: len(calls)]] == ["plain"] * len(calls)


def test_new_data_travels_in_a_prepared_request_and_gradients_arrive() -> None:
    client = _Recorder()
    transport = Transport(client, "unary")
    for step in range(4):
        x = torch.full((2, 3), float(step), requires_grad=True)
        target = torch.tensor([step, step + 1])
        sent = _call(client, transport, {}, (x, target), {})
        assert sent == _expected("loss", {}, (x, target), {}, sent)
        assert torch.equal(codec.decode_value(sent.args[0]), x.detach())
        assert x.grad is not None and torch.equal(x.grad, 2 * x.detach())
    assert client.sent[-1][0] == "prepared"


def test_a_prepared_answer_decodes_as_the_plain_decode_and_a_changed_one_falls_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read: list[bool] = []  # per answer read at its layout: whether its headers held
    decode = Answer.decode
    monkeypatch.setattr(
        Answer,
        "decode",
        lambda self, raw: read.append(decode(self, raw) is not None) or decode(self, raw),
    )
    client = _Recorder()
    transport = Transport(client, "unary")
    target = torch.tensor([1.0, 2.0, 3.0])
    for step in range(8):
        if step == 5:
            client.loss_dtype = torch.float64  # another header: read by the plain decode
        if step == 6:
            client.loss_dtype = torch.float32
            client.note = "a note"  # a field after the tensors: the answer's layout holds
        x = torch.arange(6.0).reshape(2, 3).add(step).requires_grad_()
        value, result = remote_loss(
            client,
            "loss",
            {},
            (x, target),
            {},
            transport=transport,
            _signature=call_signature({}, (x, target), {}),
        )
        assert value.dtype == client.loss_dtype and value.shape == ()
        assert value.item() == x.detach().sum().item()
        value.backward()
        assert torch.equal(x.grad, 2 * x.detach())
        assert x.grad.dtype == torch.float32 and x.grad.shape == (2, 3)
        assert result.timings_ns["decode"] == len(client.sent) and result.notes == (
            [client.note] if client.note else []
        )
        assert result.request_id == client.sent[-1][1].request_id
    layout = transport.prepared.layout(("loss", call_signature({}, (x, target), {}), "args[0]"))
    assert layout is not None and isinstance(layout.answer, Answer)
    # Prepared at the second call, its answer learned (and checked) at the third: read at its
    # layout from the fourth on, but for the sixth call's float64 loss.
    assert read == [True, True, True, False, True, True]


def test_shapes_that_change_every_call_keep_the_layouts_bounded() -> None:
    client = _Recorder()
    transport = Transport(client, "unary")
    for n in range(1, 3 * MAX_SIGNATURES):
        for _ in range(2):
            x = torch.randn(n, requires_grad=True)
            sent = _call(client, transport, {}, (x,), {})
            assert sent == _expected("loss", {}, (x,), {}, sent)
        assert len(transport.prepared) <= MAX_SIGNATURES
    # The newest signatures are kept and replayed; the oldest were let go.
    x = torch.randn(3 * MAX_SIGNATURES - 1, requires_grad=True)
    _call(client, transport, {}, (x,), {})
    assert client.sent[-1][0] == "prepared"
    _call(client, transport, {}, (torch.randn(1, requires_grad=True),), {})
    assert client.sent[-1][0] == "plain"


def test_without_a_signature_nothing_is_prepared() -> None:
    client = _Recorder()
    x = torch.randn(4, requires_grad=True)
    for _ in range(3):
        remote_loss(client, "loss", {}, (x,), {}, transport=Transport(client, "unary"))
        params = {"weight": torch.ones(4)}  # a tensor parameter: no signature
        signature = call_signature(params, (x,), {})
        transport = Transport(client, "unary")
        remote_loss(client, "loss", params, (x,), {}, transport=transport, _signature=signature)
    assert {how for how, _ in client.sent} == {"plain"}


@pytest.mark.parametrize("request_id", ["", "a", "0" * 32, "y" * 127, "z" * 128, "é" * 64])
def test_the_per_call_fields_serialize_as_protobuf_does(request_id: str) -> None:
    audit = pb.AuditContext(run_id="run", step=1)
    autocast = pb.Autocast(enabled=True, device_type="cpu", dtype=pb.DATA_TYPE_FLOAT16)
    for extra in ({}, {"audit": audit}, {"autocast": autocast}):
        assert tail(request_id, extra.get("audit"), extra.get("autocast")) == (
            pb.ComputeRequest(request_id=request_id, **extra).SerializeToString()
        )


class _Garbling(_Recorder):
    """Answers its ``good`` first prepared calls well, then with a good answer followed by bytes
    that do not parse (so an answer read in place fails in the fields after its tensors)."""

    def __init__(self, good: int) -> None:
        super().__init__()
        self.good = good

    def compute_serialized(self, data: bytes, request_id: str) -> bytes:
        answer = super().compute_serialized(data, request_id)
        self.good -= 1
        return answer if self.good >= 0 else answer + b"\x0a\xff\xff"


@pytest.mark.parametrize("good", [0, 1, 3], ids=["learning", "learned-once", "read-in-place"])
def test_an_unparseable_answer_to_a_prepared_call_is_a_lossd_error(good: int) -> None:
    """As on the plain path, where gRPC's deserializer turns it into INTERNAL with the id."""
    client = _Garbling(good)
    transport = Transport(client, "unary")
    x = torch.randn(3, requires_grad=True)
    signature = call_signature({}, (x,), {})
    for _ in range(2):  # plain: the signature is met, then prepared; the third call is prepared
        remote_loss(client, "loss", {}, (x,), {}, transport=transport, _signature=signature)
    assert [how for how, _ in client.sent] == ["plain", "plain"]
    with pytest.raises(LossdError) as caught:
        for _ in range(good + 1):
            remote_loss(client, "loss", {}, (x,), {}, transport=transport, _signature=signature)
    assert client.sent[-1][0] == "prepared"
    assert caught.value.code == grpc.StatusCode.INTERNAL
    assert caught.value.request_id == client.sent[-1][1].request_id


def test_a_nan_first_answer_does_not_rule_the_answer_layout_out() -> None:
    client = _Recorder()
    transport = Transport(client, "unary")
    signature = None
    for step in range(4):
        x = torch.tensor([float("nan") if step < 3 else 1.0, 2.0], requires_grad=True)
        signature = call_signature({}, (x,), {})
        value, _ = remote_loss(
            client, "loss", {}, (x,), {}, transport=transport, _signature=signature
        )
        assert value.isnan().item() == (step < 3)
    layout = transport.prepared.layout(("loss", signature, "args[0]"))
    assert layout is not None and isinstance(layout.answer, Answer)
