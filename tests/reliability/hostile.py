"""What the hostile-input suite builds on: the valid requests every case starts from, the places in
a request where a mutation can act, the special values hostile input is drawn from, the tally of
what was sent, and whether two responses carry the same result.

Every case starts from a *valid* call of a registered loss (its spec's ``make_example``,
serialized once: ``seed_request``), so the mutations (hostile_mutations.py) reach deep into each
loss's validation instead of bouncing off the first check; hostile_bytes.py makes bytes that are
not even protobuf and hostile ComputeChunked frame sequences.

Nothing here talks to a server: the tests (test_hostile.py, and the load test through load.py)
send what these modules build.
"""

from __future__ import annotations

import math
from collections import Counter
from functools import cache

import torch

from lossd.client._proto import lossd_pb2 as pb
from lossd.client.functional import build_request
from lossd.client.wire import codec
from lossd.server import registry

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
VALID_ENUMS = tuple(range(1, 11))
ITEMSIZE = {1: 2, 2: 2, 3: 4, 4: 8, 5: 1, 6: 1, 7: 2, 8: 4, 9: 8, 10: 1}
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

SPECIAL_FLOATS = (
    math.nan,
    math.inf,
    -math.inf,
    0.0,
    -0.0,
    1e-45,
    -1.0,
    1.0,
    0.5,
    1e38,
    -1e38,
    65504.0,
    1e300,
)
SPECIAL_INTS = (
    -1,
    -2,
    -100,
    0,
    1,
    2,
    3,
    4,
    7,
    15,
    16,
    79,
    80,
    81,
    255,
    256,
    1000,
    1 << 31,
    -(1 << 31),
    INT64_MAX,
    INT64_MIN,
    1 << 40,
)
SPECIAL_NUMBERS = (math.nan, math.inf, -math.inf, -1e308, 1e308, -1.0, 0.0, 1e-300, 2.0, 1e6)
HUGE_DIMS = (1 << 20, 1 << 31, 1 << 32, 1 << 40, 1 << 62, INT64_MAX)

# What the generators actually did (a mutation that found nothing to act on is not counted):
# the suite checks at the end that every kind of hostile input was sent at least once.
APPLIED: Counter[str] = Counter()


def all_specs() -> list[registry.LossSpec]:
    return [s for s in registry.all_specs() if s.make_example is not None]


@cache
def seed_bytes(name: str, dtype: torch.dtype, with_grads: bool) -> bytes:
    """A valid request for ``name`` (serialized once, so every case starts from the same call)."""
    torch.manual_seed(0)
    args, kwargs, params = registry.get(name).make_example(dtype)
    paths = (
        [p for p, t in codec.call_tensors(args, kwargs) if t.is_floating_point()]
        if with_grads
        else []
    )
    request = build_request(name, params, args, kwargs, paths)
    request.request_id = ""
    return request.SerializeToString()


def seed_request(name: str, dtype: torch.dtype, with_grads: bool) -> pb.ComputeRequest:
    return pb.ComputeRequest.FromString(seed_bytes(name, dtype, with_grads))


# --------------------------------------------------------------------------------------------
# Where a mutation can act


def value_slots(request: pb.ComputeRequest) -> list[tuple[str, pb.Value]]:
    """Every Value in the request (nested ones included), with its path."""
    out: list[tuple[str, pb.Value]] = []

    def walk(value: pb.Value, path: str) -> None:
        out.append((path, value))
        kind = value.WhichOneof("kind")
        if kind in ("list_value", "tuple_value"):
            for i, item in enumerate(getattr(value, kind).items):
                walk(item, f"{path}[{i}]")
        elif kind == "dict_value":
            for entry in value.dict_value.entries:
                walk(entry.value, codec.join_key(path, entry.key))

    for entry in request.params.entries:
        walk(entry.value, codec.join_key("params", entry.key))
    for i, arg in enumerate(request.args):
        walk(arg, f"args[{i}]")
    for entry in request.kwargs.entries:
        walk(entry.value, codec.join_key("kwargs", entry.key))
    return out


def tensor_slots(request: pb.ComputeRequest) -> list[tuple[str, pb.Tensor]]:
    out = [
        (path, v.tensor_value)
        for path, v in value_slots(request)
        if v.WhichOneof("kind") == "tensor_value"
    ]
    if request.HasField("grad_output"):
        out.append(("grad_output", request.grad_output))
    return out


def map_slots(request: pb.ComputeRequest) -> list[tuple[str, pb.ValueMap]]:
    out = [("params", request.params), ("kwargs", request.kwargs)]
    out += [
        (path, v.dict_value)
        for path, v in value_slots(request)
        if v.WhichOneof("kind") == "dict_value"
    ]
    return out


def sequence_slots(request: pb.ComputeRequest) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = [("args", request.args)]
    for path, v in value_slots(request):
        kind = v.WhichOneof("kind")
        if kind in ("list_value", "tuple_value"):
            out.append((path, getattr(v, kind).items))
    return out


# --------------------------------------------------------------------------------------------
# Checking results


def same_result(
    got: pb.ComputeResponse, want: pb.ComputeResponse, *, rtol: float, atol: float
) -> str:
    """'' when two responses carry the same value, gradients and flags; else what differs."""
    if got.non_finite != want.non_finite:
        return f"non_finite {got.non_finite} != {want.non_finite}"
    g_value, w_value = codec.decode_value(got.loss, "loss"), codec.decode_value(want.loss, "loss")
    why = _same(g_value, w_value, "loss", rtol, atol)
    if why:
        return why
    g_grads = {g.path: codec.decode_tensor(g.grad, g.path) for g in got.grads}
    w_grads = {g.path: codec.decode_tensor(g.grad, g.path) for g in want.grads}
    if list(g_grads) != list(w_grads):
        return f"gradient paths {list(g_grads)} != {list(w_grads)}"
    for path in g_grads:
        why = _same(g_grads[path], w_grads[path], path, rtol, atol)
        if why:
            return why
    return ""


def _same(got: object, want: object, path: str, rtol: float, atol: float) -> str:
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            return f"{path}: {_describe(got)} != {_describe(want)}"
        if want.is_floating_point():
            if not torch.allclose(
                got.double(), want.double(), rtol=rtol, atol=atol, equal_nan=True
            ):
                return f"{path}: values differ (max abs diff {float((got.double() - want.double()).abs().nan_to_num(0).max()) if got.numel() else 0})"
        elif not torch.equal(got, want):
            return f"{path}: values differ"
        return ""
    if isinstance(want, (list, tuple)):
        if type(got) is not type(want) or len(got) != len(want):
            return f"{path}: {_describe(got)} != {_describe(want)}"
        return next(
            (
                w
                for w in (
                    _same(g, x, f"{path}[{i}]", rtol, atol)
                    for i, (g, x) in enumerate(zip(got, want))
                )
                if w
            ),
            "",
        )
    if isinstance(want, dict):
        if not isinstance(got, dict) or list(got) != list(want):
            return f"{path}: {_describe(got)} != {_describe(want)}"
        return next(
            (w for w in (_same(got[k], want[k], f"{path}.{k}", rtol, atol) for k in want) if w), ""
        )
    if isinstance(want, float) and isinstance(got, float) and math.isnan(want) and math.isnan(got):
        return ""
    return "" if got == want else f"{path}: {got!r} != {want!r}"


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor({str(value.dtype).removeprefix('torch.')}, {list(value.shape)})"
    return type(value).__name__
