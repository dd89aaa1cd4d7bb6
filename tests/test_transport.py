"""The transports give the same answers: unary ``Compute`` and chunked ``ComputeChunked``.

The server here sends its response data in 1000-byte chunks and puts every response tensor in
chunks (``chunk_outboard_bytes=0``); clients send 999-byte chunks. So every tensor crosses chunk
boundaries in both directions while the tensors stay small and the tests fast.
"""

from __future__ import annotations

import uuid

import grpc
import pytest
import torch

from lossd.client import LossClient, LossdError, RemoteLoss
from lossd.client import transport as wire
from lossd.client._proto import lossd_pb2 as pb
from lossd.client.connection import new_request_id
from lossd.client.functional import build_request
from lossd.client.wire import codec, framing
from lossd.client.wire.assembler import Assembler
from lossd.server.app import channel_options
from lossd.server.engine import Engine
from lossd.server.service import LossServicer
from tests.support.wirekit import in_process

LIMIT = 4 << 20  # message limit and chunked limit of the test server, bytes
# "chunked": ComputeChunked's data frames (shm=False, though the server is on this host);
# "shm": the same calls through shared memory, the default here (client/shm.py).
TRANSPORTS = ("unary", "chunked", "shm")


@pytest.fixture(scope="module")
def endpoint():
    servicer = LossServicer(
        Engine("cpu"),
        codec.DecodeLimits(),
        max_chunked_bytes=LIMIT,
        chunk_bytes=1000,
        chunk_outboard_bytes=0,
    )
    with in_process(servicer, LIMIT) as address:
        yield address


def _mode(transport: str) -> tuple[str, bool]:
    """(RemoteLoss transport, shm) of one of TRANSPORTS."""
    return ("chunked", True) if transport == "shm" else (transport, False)


def remote(endpoint: str, name: str, transport: str, **params) -> RemoteLoss:
    mode, shm = _mode(transport)
    module = RemoteLoss(name, endpoint=endpoint, transport=mode, timeout=60, shm=shm, **params)
    assert module.transport.shm == shm
    module.transport.chunk_bytes = 999  # odd: chunks straddle tensor boundaries
    return module


def cases() -> dict[str, tuple[str, dict, callable]]:
    """name -> (loss, params, make_args): fresh inputs (differentiable ones require grad)."""

    def ce():
        g = torch.Generator().manual_seed(1)
        return [
            torch.randn(300, 50, generator=g).requires_grad_(),
            torch.randint(0, 50, (300,), generator=g),
        ]

    def focal():
        g = torch.Generator().manual_seed(2)
        return [
            torch.randn(64, 80, generator=g).requires_grad_(),
            torch.randint(0, 81, (64,), generator=g),
        ]

    def giou():
        g = torch.Generator().manual_seed(3)
        xy = torch.rand(40, 2, generator=g) * 100
        target = torch.cat([xy, xy + torch.rand(40, 2, generator=g) * 20 + 1], dim=1)
        return [(target + torch.randn(40, 4, generator=g)).requires_grad_(), target]

    def yolox():
        g = torch.Generator().manual_seed(4)
        level = (torch.randn(2, 85, 4, 4, generator=g) * 0.5).requires_grad_()
        gt = []
        for _ in range(2):
            xy = torch.rand(3, 2, generator=g) * 80
            boxes = torch.cat([xy, xy + torch.rand(3, 2, generator=g) * 30 + 2], dim=1).double()
            gt.append({"boxes": boxes, "labels": torch.randint(0, 80, (3,), generator=g)})
        return [{"pred": [level]}, {"gt": gt, "img_size": 128, "num_classes": 80}]

    def mse_none():
        g = torch.Generator().manual_seed(5)
        return [torch.randn(30, 7, generator=g).requires_grad_(), torch.randn(30, 7, generator=g)]

    return {
        "cross_entropy": ("cross_entropy", {"label_smoothing": 0.1}, ce),
        "FocalLoss": ("FocalLoss", {}, focal),
        "GIoULoss": ("GIoULoss", {}, giou),
        "yolox_loss": ("yolox_loss", {"l1_activate_epoch": 0}, yolox),
        "mse_none": ("mse", {"reduction": "none"}, mse_none),
    }


def run_step(module: RemoteLoss, args: list) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward and backward (a random grad_output for a non-scalar loss); value and input grads."""
    value = module(*args)
    if value.numel() == 1:
        value.backward()
    else:
        value.backward(torch.randn(value.shape, generator=torch.Generator().manual_seed(9)))
    leaves = [t for _, t in codec.call_tensors(args, {}) if t.requires_grad]
    return value.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("case", list(cases()))
def test_chunked_equals_unary_bitwise(endpoint: str, case: str) -> None:
    loss, params, make = cases()[case]
    results = {}
    for transport in TRANSPORTS:
        with remote(endpoint, loss, transport, **params) as module:
            results[transport] = run_step(module, make())
    value, grads = results["unary"]
    assert grads and all(g is not None for g in grads)
    for transport in TRANSPORTS[1:]:
        other_value, other_grads = results[transport]
        assert torch.equal(other_value, value), transport
        assert len(other_grads) == len(grads)
        for a, b in zip(other_grads, grads):
            assert a.dtype == b.dtype and torch.equal(a, b), transport


def test_auto_picks_unary_below_threshold_and_chunks_above(endpoint: str) -> None:
    loss, params, make = cases()["cross_entropy"]
    args = make()  # 300x50 float32 + 300 int64 = 62,400 bytes
    with RemoteLoss(loss, endpoint=endpoint, chunk_threshold=100_000, **params) as module:
        assert module.transport.mode == "auto"
        run_step(module, args)
        assert module.transport._chunked is None
    with RemoteLoss(loss, endpoint=endpoint, chunk_threshold=50_000, **params) as module:
        value, _ = run_step(module, make())
        assert module.transport._chunked is not None
    with remote(endpoint, loss, "unary", **params) as module:
        assert torch.equal(run_step(module, make())[0], value)
    transport = RemoteLoss(loss, endpoint=endpoint, chunk_threshold=1000).transport
    tensors = [("args[0]", torch.zeros(250)), ("args[1]", torch.zeros(0))]
    assert transport.wants_chunks(tensors)  # 1000 bytes: the threshold is inclusive
    assert not transport.wants_chunks([("args[0]", torch.zeros(249))])
    with pytest.raises(ValueError, match="transport must be one of"):
        RemoteLoss(loss, endpoint=endpoint, transport="carrier-pigeon")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transport", ["chunked", "shm"])
def test_16_bit_dtypes_travel_as_16_bit(endpoint: str, dtype: torch.dtype, transport: str) -> None:
    g = torch.Generator().manual_seed(7)
    pred = torch.randn(123, 9, generator=g).to(dtype)
    target = torch.randn(123, 9, generator=g).to(dtype)
    outboard = codec.Outboard(0)
    request = build_request("mse", {}, [pred, target], {}, ["args[0]"], outboard=outboard)
    assert request.args[0].tensor_value.dtype == codec.wire_dtype(dtype)
    assert outboard.total_bytes == 2 * pred.numel() * 2  # two bytes per element, not widened
    results = []
    for mode in ("unary", transport):
        with remote(endpoint, "mse", mode) as module:
            leaf = pred.clone().requires_grad_()
            value = module(leaf, target)
            value.backward()
            results.append((value.detach(), leaf.grad))
    (v0, g0), (v1, g1) = results
    assert v1.dtype == dtype and g1.dtype == dtype
    assert torch.equal(v1, v0) and torch.equal(g1, g0)


def _outcomes(endpoint: str, transport: str, calls: list[tuple[str, dict, list]]) -> list:
    """Each call's (value, grads) or (code, field), in order, through one module per loss."""
    out = []
    mode, shm = _mode(transport)
    client = LossClient(endpoint, timeout=60, shm=shm)
    module_transport = wire.Transport(client, mode, chunk_bytes=999)
    from lossd.client.functional import remote_loss

    try:
        for loss, params, args in calls:
            try:
                value, _ = remote_loss(client, loss, params, args, transport=module_transport)
                value.backward()
                out.append(("ok", value.detach(), args[0].grad))
            except LossdError as error:
                out.append((error.code, error.field))
    finally:
        module_transport.close()
        client.close()
    return out


def test_errors_carry_the_same_codes_in_order_on_every_transport(endpoint: str) -> None:
    def logits():
        return torch.randn(20, 10, generator=torch.Generator().manual_seed(11)).requires_grad_()

    good = torch.arange(20) % 10
    bad = good.clone()
    bad[3] = 10  # out of range
    calls = [
        ("cross_entropy", {}, [logits(), good]),
        ("cross_entropy", {}, [logits(), bad]),  # INVALID_ARGUMENT naming args[1]
        ("cross_entropy", {}, [logits(), good]),  # and the next call goes on
        ("no_such_loss", {}, [logits(), good]),  # NOT_FOUND
        ("cross_entropy", {"label_smoothing": "lots"}, [logits(), good]),  # INVALID_ARGUMENT
        (
            "mse",
            {},
            [torch.zeros(LIMIT // 4 + 1).requires_grad_(), torch.zeros(LIMIT // 4 + 1)],
        ),  # over the limit
        ("cross_entropy", {"label_smoothing": 0.2}, [logits(), good]),
    ]
    fresh = [
        [
            (loss, params, [a.detach().clone().requires_grad_(a.requires_grad) for a in args])
            for loss, params, args in calls
        ]
        for _ in TRANSPORTS
    ]
    outcomes = {t: _outcomes(endpoint, t, c) for t, c in zip(TRANSPORTS, fresh)}
    unary = outcomes["unary"]
    codes = [o[0] for o in unary]
    assert codes == [
        "ok",
        grpc.StatusCode.INVALID_ARGUMENT,
        "ok",
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "ok",
    ]
    assert unary[1][1] == "args[1]"
    for transport in TRANSPORTS[1:]:
        got = outcomes[transport]
        assert [o[0] for o in got] == codes, transport
        for mine, theirs in zip(got, unary):
            if mine[0] == "ok":
                assert torch.equal(mine[1], theirs[1]) and torch.equal(mine[2], theirs[2]), (
                    transport
                )
            elif mine[0] == grpc.StatusCode.INVALID_ARGUMENT:
                assert mine[1] == theirs[1], transport  # the same field named


def _raw_chunked(endpoint: str, messages: list[bytes]) -> grpc.StatusCode:
    channel = grpc.insecure_channel(endpoint, options=channel_options(LIMIT))
    try:
        method = wire.chunked_method(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(method(iter(messages), timeout=30))
        return info.value.code()
    finally:
        channel.close()


def test_broken_chunked_streams_are_invalid_argument(endpoint: str) -> None:
    x = torch.randn(100)
    outboard = codec.Outboard(0)
    request = build_request("mse", {}, [x, x], {}, [], outboard=outboard)
    header = pb.ComputeChunkedRequest(
        header=pb.ChunkedRequestHeader(request=request, tensors=framing.refs(outboard.tensors))
    )
    data = list(framing.iter_frames(outboard.tensors, 300))
    ok_channel = grpc.insecure_channel(endpoint)
    try:
        answers = list(
            wire.chunked_method(ok_channel)(iter([header.SerializeToString(), *data]), timeout=30)
        )
        assert isinstance(answers[0], pb.ComputeChunkedResponse) and answers[
            0
        ].header.response.loss.HasField("tensor_value")
    finally:
        ok_channel.close()
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert _raw_chunked(endpoint, data) == invalid  # no header
    assert _raw_chunked(endpoint, [header.SerializeToString(), *data[:-1]]) == invalid  # truncated
    assert (
        _raw_chunked(endpoint, [header.SerializeToString(), *data, data[0]]) == invalid
    )  # bytes beyond the sizes
    assert (
        _raw_chunked(endpoint, [header.SerializeToString(), header.SerializeToString()]) == invalid
    )  # two headers
    lying = pb.ComputeChunkedRequest()
    lying.CopyFrom(header)
    lying.header.tensors[0].path = "args[7]"  # lands on no tensor of the request
    assert _raw_chunked(endpoint, [lying.SerializeToString(), *data]) == invalid
    huge = pb.ComputeChunkedRequest()
    huge.CopyFrom(header)
    huge.header.tensors[0].size_bytes = LIMIT + 1  # refused before anything is allocated
    assert _raw_chunked(endpoint, [huge.SerializeToString()]) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_few_megabytes_with_default_chunks_equal_unary(endpoint: str) -> None:
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(3000, 300, generator=g)  # 3.6 MB, several 1 MiB chunks each way
    target = torch.randint(0, 300, (3000,), generator=g)
    results = []
    for mode in ("unary", "chunked"):  # data frames: shared memory would carry no chunk
        with RemoteLoss(
            "cross_entropy", endpoint=endpoint, transport=mode, timeout=60, shm=False
        ) as module:
            leaf = logits.clone().requires_grad_()
            value = module(leaf, target)
            value.backward()
            results.append((value.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_chunked_assembler_decodes_zero_copy_views_of_one_buffer() -> None:
    tensors = [
        ("a", torch.arange(10, dtype=torch.float32)),
        ("b", torch.arange(7, dtype=torch.bfloat16)),
        ("c", torch.zeros(0)),
    ]
    flat = [(path, t.reshape(-1).view(torch.uint8)) for path, t in tensors]
    assembler = Assembler(framing.refs(flat), max_bytes=1 << 20)
    for frame in framing.iter_frames(flat, 5):
        parsed = framing.chunk_parser(pb.ComputeChunkedRequest.FromString)(frame)
        assert isinstance(parsed, memoryview)
        assembler.feed(parsed)
    assert assembler.complete
    got = assembler.tensors()
    base = assembler.buffer.data_ptr()
    for path, t in tensors:
        view = got[path]
        assert view.numel() == t.numel() * t.element_size()
        if view.numel():
            assert view.untyped_storage().data_ptr() == base  # one buffer, no per-tensor copies
            assert (view.data_ptr() - base) % framing.ALIGN == 0
            assert torch.equal(view.view(t.dtype), t)
    with pytest.raises(codec.LimitError):
        Assembler(framing.refs(flat), max_bytes=50)


def test_request_ids_are_random_version_4_uuids():
    # Made without a UUID object (client/connection.py), they must still read as uuid4().hex.
    ids = [new_request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for request_id in ids[:200]:
        parsed = uuid.UUID(hex=request_id)
        assert parsed.hex == request_id and parsed.version == 4 and parsed.variant == uuid.RFC_4122
