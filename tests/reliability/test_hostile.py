"""Generated hostile input against a real ``lossd serve`` process, across every registered loss.

Each case is a ComputeRequest built at the protobuf level (``hostile_mutations.py``: a valid
call of a random loss, then mutations) or raw bytes sent through a generic channel
(``hostile_bytes.py``: not even protobuf, or a ComputeChunked call's frames with a fault). The
property: the server answers every case with either

- a well-formed gRPC error whose code is one a caller can act on (never INTERNAL or UNKNOWN,
  never a dropped connection), or
- a result identical to what the same request gives when evaluated in this process (so a
  hostile input that is "accepted" is accepted correctly, not garbage in, garbage out).

Afterwards the server is still SERVING, its memory is bounded (nothing was allocated from a
claimed size) and a valid call still returns the right value. ``--device cuda`` runs the same
suite against a CUDA server, so a device-side assert would show up as a dead context here.
"""

from __future__ import annotations

from collections import Counter

import grpc
import pytest
import torch
import torch.nn.functional as F
from grpc_status import rpc_status
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from lossd.client import transport as wire
from lossd.client._proto import lossd_pb2 as pb
from lossd.client.wire import codec, framing
from lossd.client.wire.assembler import Assembler
from lossd.server import chunked
from lossd.server.config import ServerConfig
from lossd.server.engine import Engine
from lossd.server.errors import InvalidArgument, to_service_error
from lossd.server.service import LossServicer, Malformed, safe_parser
from tests.reliability import hostile, hostile_bytes, hostile_mutations
from tests.support.budget import LONG, examples
from tests.support.serverproc import rss_kib, serving

pytestmark = pytest.mark.hostile

# Codes that tell the caller what to fix; anything else (INTERNAL, UNKNOWN, UNAVAILABLE from a
# dead process, ...) is a server bug.
ACCEPTABLE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}
MIN_CI_REQUESTS = 2000
MIN_LONG_REQUESTS = 50_000
RSS_GROWTH_LIMIT_MIB = 512  # after thousands of cases, over the warmed-up baseline
PEAK_GROWTH_LIMIT_MIB = 1024  # the high-water mark: nothing may be sized by a claimed shape

PARSE_COMPUTE = safe_parser(pb.ComputeRequest)
PARSE_CHUNKED = framing.chunk_parser(safe_parser(pb.ComputeChunkedRequest))  # as the server parses
SENT: Counter[str] = Counter()  # outcomes, by code name (the module's request count)
STATE: dict[str, int] = {}


@pytest.fixture(scope="module")
def address(lossd_process) -> str:
    return lossd_process.address


@pytest.fixture(scope="module")
def channel(address):
    limit = 512 << 20
    ch = grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ],
    )
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def compute_raw(channel):
    """Compute with the request as raw bytes: the server sees exactly what we built."""
    return channel.unary_unary(
        "/lossd.v1.LossService/Compute",
        request_serializer=lambda b: b,
        response_deserializer=pb.ComputeResponse.FromString,
    )


@pytest.fixture(scope="module")
def chunked_raw(channel):
    """ComputeChunked with each message as raw bytes; answers parsed as the client parses them."""
    return wire.chunked_method(channel)


@pytest.fixture(scope="module")
def reference(device) -> LossServicer:
    """The same servicer code, in this process, on the device under test: the expected answer."""
    return LossServicer(Engine(device), ServerConfig().limits)


def tolerances(device: torch.device, request: pb.ComputeRequest) -> tuple[float, float]:
    half = any(
        t.dtype in (pb.DATA_TYPE_FLOAT16, pb.DATA_TYPE_BFLOAT16)
        for _, t in hostile.tensor_slots(request)
    )
    if device.type == "cuda":
        return (5e-2, 5e-3) if half else (1e-3, 1e-5)
    return (1e-2, 1e-3) if half else (1e-5, 1e-7)


def send(compute_raw, payload: bytes) -> tuple[pb.ComputeResponse | None, grpc.RpcError | None]:
    try:
        response = compute_raw(payload, timeout=120)
    except grpc.RpcError as error:
        SENT[error.code().name] += 1
        return None, error
    SENT["OK"] += 1
    return response, None


def check_error(error: grpc.RpcError, what: str) -> None:
    code = error.code()
    assert code in ACCEPTABLE, f"{what}\n-> {code.name}: {error.details()}"
    assert error.details(), f"{what}\n-> {code.name} with no message"
    status = rpc_status.from_call(error)
    if status is not None:  # a rich status, when present, agrees with the plain one
        assert status.code == code.value[0], what


def expect(reference, payload: bytes) -> tuple[pb.ComputeResponse | None, Exception | None]:
    """The same bytes through the same code, here (deserialized as the server does)."""
    try:
        parsed = PARSE_COMPUTE(payload)
        if isinstance(parsed, Malformed):
            raise InvalidArgument(f"request is not a valid {parsed.type_name}: {parsed.reason}")
        return reference.compute(parsed), None
    except Exception as exc:  # noqa: BLE001 - any failure is compared as its status
        return None, to_service_error(exc)


def compare(
    device, request: pb.ComputeRequest | None, response, error, expected, local_error, what: str
) -> None:
    """A server answer (response or error) against the local one."""
    if response is not None:
        assert local_error is None, (
            f"{what}\n-> server OK, but here {local_error.code.name}: {local_error}"
        )
        rtol, atol = tolerances(device, request) if request is not None else (1e-2, 1e-3)
        assert not hostile.same_result(response, expected, rtol=rtol, atol=atol), (
            f"{what}\n-> {hostile.same_result(response, expected, rtol=rtol, atol=atol)}"
        )
    elif device.type == "cpu":  # on CUDA an error may legitimately differ (out of memory)
        assert local_error is not None, (
            f"{what}\n-> server {error.code().name}: {error.details()}, but here OK"
        )
        assert local_error.code == error.code(), (
            f"{what}\n-> server {error.code().name}, here {local_error.code.name}"
        )


def check_case(compute_raw, reference, device, request: pb.ComputeRequest, what: str) -> None:
    payload = request.SerializeToString()
    response, error = send(compute_raw, payload)
    if error is not None:
        check_error(error, what)
    expected, local_error = expect(reference, payload)
    compare(device, request, response, error, expected, local_error, what)


def test_warm_baseline(lossd_process, compute_raw, reference, device):
    """Every loss's valid call (four dtypes, with and without gradients) is right; then the
    server's memory is taken as the baseline for the bound at the end."""
    for spec in hostile.all_specs():
        for dtype in hostile.FLOAT_DTYPES:
            for grads in (False, True):
                request = hostile.seed_request(spec.name, dtype, grads)
                check_case(
                    compute_raw,
                    reference,
                    device,
                    request,
                    f"valid {spec.name} {dtype} grads={grads}",
                )
    STATE["rss_kib"], STATE["peak_kib"] = rss_kib(lossd_process.proc.pid)


@hsettings(max_examples=examples(16))
@given(data=st.data())
def test_mutated_calls(compute_raw, reference, device, data):
    request, done = hostile_mutations.draw_request(data)
    check_case(compute_raw, reference, device, request, "\n  ".join(done))


@hsettings(max_examples=examples(3))
@given(data=st.data())
def test_raw_bytes(compute_raw, data):
    """Noise, truncations and flipped bytes: INVALID_ARGUMENT (or a correct result by chance)."""
    payload, what = hostile_bytes.draw_raw_bytes(data)
    response, error = send(compute_raw, payload)
    if error is not None:
        check_error(error, what)
    else:
        assert response.lossd_version, what


@hsettings(max_examples=examples(2))
@given(
    loss=st.sampled_from([s.name for s in hostile.all_specs()]),
    args=st.lists(hostile_mutations.raw_values(), max_size=4),
)
def test_arbitrary_arguments(compute_raw, reference, device, loss, args):
    """A loss's name with arguments of any kind and shape, none of them built to fit."""
    request = pb.ComputeRequest(loss=loss, args=args)
    check_case(
        compute_raw,
        reference,
        device,
        request,
        f"{loss} with arbitrary args {[a.WhichOneof('kind') for a in args]}",
    )


def inline(response: pb.ComputeResponse, tensors: dict) -> pb.ComputeResponse:
    """Put a chunked response's outboard bytes back into its message (paths `loss`, `grads[i]`)."""
    for path, flat in tensors.items():
        if path == "loss":
            response.loss.tensor_value.data = flat.numpy().tobytes()
        else:
            assert path.startswith("grads["), f"unexpected response path {path!r}"
            response.grads[int(path[6:-1])].grad.data = flat.numpy().tobytes()
    return response


@hsettings(max_examples=examples(5))  # (3 + the 2 of the removed ComputeStream frames test)
@given(data=st.data())
def test_chunked_frames(chunked_raw, reference, device, data):
    """ComputeChunked with chunk sequences cut short, too long, reordered or disagreeing with the
    header: a well-formed error (nothing sized from a claim) or the same result as here."""
    frames, done = hostile_bytes.draw_chunked(data, reference.max_chunked_bytes)
    what = "\n  ".join(done)
    response = error = None
    try:
        answers = chunked_raw(iter(frames), timeout=120)
        first = next(answers)
        assert (
            isinstance(first, pb.ComputeChunkedResponse) and first.WhichOneof("part") == "header"
        ), what
        assembler = Assembler(first.header.tensors, reference.max_chunked_bytes, "response.tensors")
        while not assembler.complete:
            chunk = next(answers)
            assert isinstance(chunk, memoryview), (
                f"{what}\n-> response ended after {assembler.received} of {assembler.total} bytes"
            )
            assembler.feed(chunk)
        response = inline(first.header.response, assembler.tensors())
        answers.cancel()
    except grpc.RpcError as exc:
        error = exc
    SENT[error.code().name if error is not None else "OK"] += 1
    if error is not None:
        check_error(error, what)
    try:  # the same messages through the same code, here
        request, external = chunked.receive(
            iter([PARSE_CHUNKED(f) for f in frames]), reference.max_chunked_bytes
        )
        outboard = codec.Outboard(64 << 10)
        expected = reference.compute(request, None, external=external, outboard=outboard)
        expected, local_error = inline(expected, {p: t for p, t in outboard.tensors}), None
    except Exception as exc:  # noqa: BLE001 - compared as its status
        request, expected, local_error = None, None, to_service_error(exc)
    compare(device, request, response, error, expected, local_error, what)


def test_every_hostile_kind_was_sent():
    """Each mutation, raw-bytes kind and chunk fault acted at least once (so a
    refactor that silently stops generating one kind of input fails here)."""
    if hsettings.default.max_examples < 100:
        pytest.skip("a reduced budget need not reach every kind")
    wanted = set(hostile_mutations.MUTATIONS) | {f"raw:{k}" for k in hostile_bytes.RAW_KINDS}
    wanted |= {f"chunked:{k}" for k in hostile_bytes.CHUNK_FAULTS}
    if not hostile.APPLIED:
        pytest.skip("the generating tests did not run (selected out)")
    missing = sorted(wanted - set(hostile.APPLIED))
    print(f"\nhostile kinds: {dict(sorted(hostile.APPLIED.items()))}")
    assert not missing, f"never generated: {missing}"


def test_server_survived(lossd_process, address, compute_raw, device):
    """After thousands of cases: SERVING, memory bounded, and a valid call still exact."""
    assert lossd_process.proc.poll() is None, "the server process died:\n" + "".join(
        lossd_process.stderr_lines[-30:]
    )
    assert serving(address)
    torch.manual_seed(1)
    logits, target = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 5, (8,))
    request = pb.ComputeRequest(loss="cross_entropy", grad_paths=["args[0]"])
    codec.encode_value(logits, request.args.add())
    codec.encode_value(target, request.args.add())
    response, error = send(compute_raw, request.SerializeToString())
    assert error is None, error
    leaf = logits.clone().requires_grad_()
    want = F.cross_entropy(leaf, target)
    want.backward()
    assert torch.equal(
        codec.decode_value(response.loss), want.detach().to(torch.float64)
    ) or torch.allclose(codec.decode_value(response.loss), want.detach(), rtol=1e-12, atol=0)
    assert torch.allclose(
        codec.decode_tensor(response.grads[0].grad), leaf.grad, rtol=1e-12, atol=1e-15
    )

    rss, peak = rss_kib(lossd_process.proc.pid)
    total = sum(SENT.values())
    print(
        f"\nhostile: {total} requests {dict(SENT)}; server RSS {STATE.get('rss_kib', 0) // 1024} -> {rss // 1024} MiB, peak {peak // 1024} MiB"
    )
    if "rss_kib" in STATE:
        assert rss - STATE["rss_kib"] < RSS_GROWTH_LIMIT_MIB * 1024, (
            f"RSS grew {(rss - STATE['rss_kib']) // 1024} MiB"
        )
        assert peak - STATE["rss_kib"] < PEAK_GROWTH_LIMIT_MIB * 1024, (
            f"peak RSS {(peak - STATE['rss_kib']) // 1024} MiB over baseline"
        )
    if hsettings.default.max_examples >= 100 and "rss_kib" in STATE:
        assert total >= (MIN_LONG_REQUESTS if LONG else MIN_CI_REQUESTS), (
            f"only {total} requests were generated"
        )
    if device.type == "cuda":  # the context is alive: a fresh CUDA computation works on the server
        assert response.device.startswith("cuda")
