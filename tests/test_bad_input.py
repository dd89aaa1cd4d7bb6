"""Every kind of bad input gets a precise gRPC error, and the server keeps serving.

Requests are built at the protobuf level (not only through the client), so the server is tested
against what any client could send.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from lossd.client import LossdError, RemoteLoss
from lossd.client._proto import lossd_pb2 as pb
from lossd.client._proto import lossd_pb2_grpc as pb_grpc
from lossd.client.errors import from_rpc_error
from lossd.client.wire import codec
from lossd.server.app import create_server
from lossd.server.budget import prescan
from lossd.server.config import ServerConfig
from lossd.server.errors import InvalidArgument
from lossd.server.service import Malformed, safe_parser


@pytest.fixture(scope="module")
def stub(endpoint):
    channel = grpc.insecure_channel(endpoint, options=[("grpc.max_send_message_length", 1 << 30)])
    yield pb_grpc.LossServiceStub(channel)
    channel.close()


def request(
    loss="cross_entropy", params=None, args=None, kwargs=None, grad_paths=()
) -> pb.ComputeRequest:
    msg = pb.ComputeRequest(loss=loss, grad_paths=list(grad_paths))
    codec.encode_map(params or {}, msg.params)
    for a in args if args is not None else [torch.randn(4, 3), torch.tensor([0, 1, 2, 0])]:
        codec.encode_value(a, msg.args.add())
    codec.encode_map(kwargs or {}, msg.kwargs)
    return msg


def raw_tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=(4, 3), data=None) -> pb.Value:
    value = pb.Value()
    value.tensor_value.dtype = dtype
    value.tensor_value.shape[:] = shape
    value.tensor_value.data = bytes(48) if data is None else data
    return value


def nested(depth: int) -> pb.Value:
    value = pb.Value(int_value=1)
    for _ in range(depth):
        outer = pb.Value()
        outer.list_value.items.add().CopyFrom(value)
        value = outer
    return value


def call(stub, msg) -> LossdError:
    with pytest.raises(grpc.RpcError) as info:
        stub.Compute(msg, timeout=30)
    return from_rpc_error(info.value)


def assert_still_serving(stub):
    response = stub.Compute(request(grad_paths=["args[0]"]), timeout=30)
    assert response.loss.tensor_value.dtype == pb.DATA_TYPE_FLOAT32 and len(response.grads) == 1


def _with_arg(index: int, value: pb.Value) -> pb.ComputeRequest:
    msg = request()
    msg.args[index].CopyFrom(value)
    return msg


def _with_audit(run_id: str = "run", tags: dict[str, str] | None = None) -> pb.ComputeRequest:
    msg = request()
    msg.audit.run_id = run_id
    msg.audit.tags.update(tags or {})
    return msg


BAD = {
    "byte count below shape": (
        _with_arg(0, raw_tensor(data=bytes(47))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "args[0].data",
        "expected 48 bytes",
    ),
    "byte count above shape": (
        _with_arg(0, raw_tensor(data=bytes(52))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "args[0].data",
        "got 52",
    ),
    "terabyte claim": (
        _with_arg(0, raw_tensor(shape=(1 << 20, 1 << 20), data=bytes(48))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "args[0].shape",
        "--max-elements",
    ),
    "negative dim": (
        _with_arg(0, raw_tensor(shape=(-4, -3))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "args[0].shape[0]",
        "size >= 0",
    ),
    # A configured limit, like every other (issue 16: it was INVALID_ARGUMENT without the flag).
    "rank 9": (
        _with_arg(0, raw_tensor(shape=(1,) * 9, data=bytes(4))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "args[0].shape",
        "rank 9 exceeds the limit of 8 (raise it with --max-rank)",
    ),
    "unknown dtype enum": (
        _with_arg(0, raw_tensor(dtype=42)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "args[0].dtype",
        "<enum 42>",
    ),
    "unspecified dtype": (
        _with_arg(0, raw_tensor(dtype=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "args[0].dtype",
        "<enum 0>",
    ),
    "wrong dtype": (
        request(args=[torch.randn(4, 3), torch.tensor([0.0, 1.0, 2.0, 0.0], dtype=torch.float64)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "args[1]",
        "expected",
    ),
    "wrong shape": (
        request(args=[torch.randn(4, 3), torch.tensor([0, 1])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "args[1]",
        "shape",
    ),
    "class index too large": (
        request(args=[torch.randn(4, 3), torch.tensor([0, 1, 3, 0])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "args[1]",
        "index 3",
    ),
    "negative class index": (
        request(args=[torch.randn(4, 3), torch.tensor([0, -5, 1, 0])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "args[1]",
        "index -5",
    ),
    "unknown loss": (
        request(loss="cross_entrpy"),
        grpc.StatusCode.NOT_FOUND,
        "loss",
        "did you mean 'cross_entropy'",
    ),
    "unknown parameter": (
        request(params={"label_smothing": 0.1}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "params.label_smothing",
        "did you mean label_smoothing",
    ),
    "ill-typed parameter": (
        request(params={"ignore_index": "x"}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "params.ignore_index",
        "expected int, got str",
    ),
    "parameter out of range": (
        request(params={"label_smoothing": 1.5}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "params.label_smoothing",
        "<= 1.0",
    ),
    "NaN parameter": (
        request(params={"label_smoothing": float("nan")}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "params.label_smoothing",
        "NaN",
    ),
    "bad choice": (
        request(params={"reduction": "avg"}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "params.reduction",
        "one of",
    ),
    "missing argument": (
        request(args=[torch.randn(4, 3)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "args[1]",
        "target",
    ),
    "too many arguments": (
        request(args=[torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.ones(1)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "args",
        "at most 2",
    ),
    "unknown keyword": (
        request(kwargs={"avg_factor": 2.0}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "kwargs.avg_factor",
        "unexpected keyword",
    ),
    "grad of unknown path": (
        request(grad_paths=["args[0].pred"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "grad_paths[0]",
        "no input tensor",
    ),
    "grad of integer input": (
        request(grad_paths=["args[1]"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "grad_paths[0]",
        "floating-point",
    ),
    "deep nesting": (
        _with_arg(0, nested(40)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "args[0]" + "[0]" * 17,
        "--max-depth",
    ),
    "empty value": (
        _with_arg(0, pb.Value()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "args[0]",
        "empty Value",
    ),
    "run id too long": (
        _with_audit("r" * 300),
        grpc.StatusCode.INVALID_ARGUMENT,
        "audit.run_id",
        "at most 256 characters, got 300",
    ),
    "NUL in run id": (_with_audit("a\0b"), grpc.StatusCode.INVALID_ARGUMENT, "audit.run_id", "NUL"),
    "too many tags": (
        _with_audit(tags={f"t{i}": "v" for i in range(65)}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "audit.tags",
        "at most 64 tags, got 65",
    ),
    "empty tag key": (
        _with_audit(tags={"": "v"}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "audit.tags",
        "got a key of 0",
    ),
    "tag value too long": (
        _with_audit(tags={"k": "v" * 2000}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "audit.tags",
        "a value of 2000",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_request_gets_precise_error_and_server_keeps_serving(stub, case):
    msg, code, field, words = BAD[case]
    error = call(stub, msg)
    assert error.code == code, error
    assert error.field == field, error
    assert words in error.details, error
    assert_still_serving(stub)


def test_duplicate_keys_are_refused(stub):
    msg = request(params={"ignore_index": 1})
    msg.params.entries.add(key="ignore_index").value.int_value = 2
    error = call(stub, msg)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "duplicate key" in error.details
    assert_still_serving(stub)


def test_thousands_of_inputs_hit_the_item_cap(endpoint):
    running = create_server(ServerConfig(port=0, device="cpu", max_items=1000))
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        stub = pb_grpc.LossServiceStub(channel)
        msg = request(kwargs={})
        for _ in range(2000):
            codec.encode_value(1, msg.args.add())
        error = call(stub, msg)
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-items" in error.details
        assert_still_serving(stub)
        channel.close()
    finally:
        running.stop(0)


@pytest.mark.parametrize(
    "garbage",
    [b"\xff\xff\xff", b"\x0a\xff\x01", bytes(range(256))],
    ids=["varint", "truncated", "noise"],
)
def test_malformed_protobuf_is_invalid_argument(endpoint, stub, garbage):
    channel = grpc.insecure_channel(endpoint)
    raw = channel.unary_unary(
        "/lossd.v1.LossService/Compute",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError) as info:
        raw(garbage, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid lossd.v1.ComputeRequest" in info.value.details()
    channel.close()
    assert_still_serving(stub)


def test_oversized_message_is_resource_exhausted_and_names_the_setting():
    running = create_server(ServerConfig(port=0, device="cpu", max_message_mb=1))
    try:
        endpoint = f"127.0.0.1:{running.port}"
        big = torch.randn(1 << 19)  # 2 MiB of float32 > 1 MiB server limit
        # 4 MiB of tensors: "auto" sends them chunked; the server's one limit bounds that path too.
        for transport in ("unary", "auto"):
            with (
                RemoteLoss("mse", endpoint=endpoint, transport=transport) as crit,
                pytest.raises(LossdError) as info,
            ):
                crit(big, big)
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, transport
            assert "--max-message-mb" in info.value.details, transport
        with (
            RemoteLoss("mse", endpoint=endpoint, max_message_mb=1, transport="unary") as crit,
            pytest.raises(LossdError) as info,
        ):
            crit(big, big)  # refused by the client before sending
        assert (
            info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            and "max_message_mb" in info.value.details
        )
        with RemoteLoss("mse", endpoint=endpoint) as crit:
            assert crit(torch.ones(3), torch.zeros(3)).item() == 1.0
    finally:
        running.stop(0)


def test_nan_inputs_are_computed_and_flagged(endpoint):
    x = torch.randn(4, 3)
    x[1, 1] = float("nan")
    with (
        RemoteLoss("cross_entropy", endpoint=endpoint) as crit,
        pytest.warns(RuntimeWarning, match="non-finite"),
    ):
        loss = crit(x.requires_grad_(True), torch.tensor([0, 1, 2, 0]))
    assert torch.isnan(loss) and crit.last_result.non_finite


def test_errors_surface_as_one_exception_type_with_code_and_message(endpoint):
    with RemoteLoss("no_such_loss", endpoint=endpoint) as crit, pytest.raises(LossdError) as info:
        crit(torch.ones(1))
    assert info.value.code == grpc.StatusCode.NOT_FOUND and "no_such_loss" in str(info.value)
    with RemoteLoss("cross_entropy", endpoint=endpoint) as crit, pytest.raises(LossdError) as info:
        crit(torch.randn(2, 3), torch.tensor([0, 7]))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.field == "args[1]"
    assert len(info.value.request_id) == 32, (
        "the failed call's request id is kept for the server log"
    )


def _nested_request(depth: int) -> bytes:
    inner = pb.Value(bool_value=True)
    for _ in range(depth):
        outer = pb.Value()
        outer.list_value.items.append(inner)
        inner = outer
    msg = pb.ComputeRequest(loss="mse")
    msg.args.append(inner)
    return msg.SerializeToString()


def test_the_pre_scan_refuses_as_before_whether_it_runs_before_or_after_the_parse():
    # A message under twice the scan's value budget is parsed first and scanned only when the
    # parse fails (safe_parser); the refusal and its reason must be the pre-scan's either way.
    limits = codec.DecodeLimits(max_items=10)  # a budget of 1,084 values: 2,168 bytes
    parse = safe_parser(pb.ComputeRequest, limits)
    for data in (_nested_request(50), b"\x0a\xff\x01", b"\x0a\x05mse"):  # 101 deep, truncated
        assert len(data) < 2168
        with pytest.raises(InvalidArgument) as scanned:
            prescan(data, pb.ComputeRequest.DESCRIPTOR, limits)
        parsed = parse(data)
        assert isinstance(parsed, Malformed) and parsed.error is None
        assert parsed.reason == scanned.value.message
    assert not isinstance(parse(_nested_request(49)), Malformed)  # 99 deep: within both limits
    bomb = b"\x0a\x03mse" + b"\x1a\x02\x0a\x00" * 600  # 1,201 values in 2,405 bytes: scanned first
    parsed = parse(bomb)
    assert isinstance(parsed, Malformed) and parsed.error is not None
    assert "--max-items" in str(parsed.error) and "before parsing" in parsed.reason


def test_a_group_does_not_hide_the_fields_after_it_from_the_pre_scan():
    # protobuf keeps an unknown group as an unknown field; a scan that stopped at one would let
    # a bomb of values behind it reach the parser unreserved.
    limits = codec.DecodeLimits(max_items=10)
    parse = safe_parser(pb.ComputeRequest, limits)
    bomb = b"\x0a\x03mse" + b"\x7b\x7c" + b"\x1a\x02\x0a\x00" * 1200  # field 15: an empty group
    for data in (bomb, b"\x0a\x03mse\x7b\x7c"):
        with pytest.raises(InvalidArgument, match="field 15 has wire type 3"):
            prescan(data, pb.ComputeRequest.DESCRIPTOR, limits)
    parsed = parse(bomb)
    assert isinstance(parsed, Malformed) and "wire type 3" in parsed.reason


def test_the_memory_budget_counts_every_tensor_of_a_nested_value():
    """budget.tensor_bytes (what a request reserves) walks what codec.iter_tensors walks."""
    from collections import OrderedDict

    from lossd.client.wire.codec import iter_tensors
    from lossd.server.budget import tensor_bytes

    f16, i64 = torch.zeros(3, 5, dtype=torch.float16), torch.zeros(7, dtype=torch.int64)
    param = torch.nn.Parameter(torch.zeros(2, 2))  # a Tensor subclass
    nested = [f16, (i64, [param, None, 1.5, "s"]), {"a": f16, "b": {"c": (i64,)}}]
    for value in (
        f16,
        nested,
        tuple(nested),
        {"x": nested},
        OrderedDict(x=nested),  # a Mapping that is not a dict
        [],
        {},
        None,
        3,
        object(),
    ):
        expected = sum(t.numel() * t.element_size() for _, t in iter_tensors(value, ""))
        assert tensor_bytes(value) == expected
    assert tensor_bytes(nested) == 2 * (30 + 56) + 16
