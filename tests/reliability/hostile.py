"""Hostile ComputeRequests, built at the protobuf level for the property suite.

Every case starts from a *valid* call of a registered loss (its spec's ``make_example``), so the
mutations reach deep into each loss's validation instead of bouncing off the first check, then
applies one to three mutations drawn by hypothesis: byte counts that disagree with the shape,
shapes that claim terabytes, negative/huge dims, rank 9+, deep nesting, thousands of items,
unknown dtype and enum values, NaN/Inf, out-of-range and negative indices, floats where indices
are expected and the reverse, boxes with x2 < x1, empty tensors, ill-typed and out-of-range
parameters, duplicate/missing/unknown keys, wrong loss names, bad gradient paths and grad_output.

Nothing here talks to a server: ``draw_request`` returns a message and a description of what was
done to it; the tests send it (and ``draw_raw_bytes`` for bytes that are not even protobuf).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from functools import cache

import torch
from hypothesis import strategies as st

from lossd.client._proto import lossd_pb2 as pb
from lossd.client.functional import build_request
from lossd.client.wire import codec, framing
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
# Building blocks


def raw_tensors() -> st.SearchStrategy[pb.Tensor]:
    """Arbitrary wire tensors: mostly consistent, sometimes not."""

    @st.composite
    def build(draw: st.DrawFn) -> pb.Tensor:
        dtype = draw(
            st.one_of(st.sampled_from(VALID_ENUMS), st.sampled_from((0, 11, 99, -1, 1 << 30)))
        )
        shape = draw(st.lists(st.integers(0, 5), max_size=4))
        numel = math.prod(shape)
        size = numel * ITEMSIZE.get(dtype, 4)
        if draw(st.booleans()):
            size = draw(st.integers(0, size + 16))
        return pb.Tensor(
            dtype=dtype, shape=shape, data=draw(st.binary(min_size=size, max_size=size))
        )

    return build()


def raw_values(max_leaves: int = 6) -> st.SearchStrategy[pb.Value]:
    """Arbitrary wire values of every kind, nested a little."""
    leaves = st.one_of(
        st.just(pb.Value(none_value=pb.NoneValue())),
        st.builds(lambda b: pb.Value(bool_value=b), st.booleans()),
        st.builds(
            lambda i: pb.Value(int_value=i),
            st.one_of(st.sampled_from(SPECIAL_INTS), st.integers(INT64_MIN, INT64_MAX)),
        ),
        st.builds(
            lambda f: pb.Value(float_value=f),
            st.one_of(st.sampled_from(SPECIAL_NUMBERS), st.floats()),
        ),
        st.builds(
            lambda s: pb.Value(string_value=s),
            st.one_of(
                st.sampled_from(("", "mean", "sum", "none", "ciou", "x" * 5000)),
                st.text(max_size=20),
            ),
        ),
        st.builds(lambda t: pb.Value(tensor_value=t), raw_tensors()),
        st.just(pb.Value()),  # no kind set
    )

    def containers(children: st.SearchStrategy[pb.Value]) -> st.SearchStrategy[pb.Value]:
        return st.one_of(
            st.builds(
                lambda xs: pb.Value(list_value=pb.ValueList(items=xs)),
                st.lists(children, max_size=3),
            ),
            st.builds(
                lambda xs: pb.Value(tuple_value=pb.ValueList(items=xs)),
                st.lists(children, max_size=3),
            ),
            st.builds(
                lambda kv: pb.Value(
                    dict_value=pb.ValueMap(entries=[pb.ValueEntry(key=k, value=v) for k, v in kv])
                ),
                st.lists(
                    st.tuples(
                        st.sampled_from(("pred", "gt", "boxes", "labels", "x", "")), children
                    ),
                    max_size=3,
                ),
            ),
        )

    return st.recursive(leaves, containers, max_leaves=max_leaves)


def _pick(data: st.DataObject, items: list, label: str):
    return items[data.draw(st.integers(0, len(items) - 1), label=label)] if items else None


def _decode(t: pb.Tensor) -> torch.Tensor | None:
    try:
        return codec.decode_tensor(t, "t")
    except codec.DecodeError:
        return None


def _replace_decoded(
    data: st.DataObject,
    req: pb.ComputeRequest,
    rewrite: Callable[[torch.Tensor], tuple[torch.Tensor, str]],
) -> str:
    """Replace a drawn tensor of the request by ``rewrite(its decoded value)``, which returns the
    new value and what it did ("": no tensor, or an undecodable one)."""
    path, t = _pick(data, tensor_slots(req), "tensor") or (None, None)
    old = None if t is None else _decode(t)
    if old is None:
        return ""
    new, what = rewrite(old)
    codec.encode_tensor(new, t)
    return f"{path}: {what}"


def _fill(data: st.DataObject, tensor: torch.Tensor, values: tuple) -> torch.Tensor:
    """Overwrite a few elements (or all) of ``tensor`` with special values, cast to its dtype."""
    flat = tensor.reshape(-1).clone()
    if flat.numel() == 0:
        return tensor
    count = data.draw(st.integers(1, min(flat.numel(), 8)), label="how many")
    everywhere = data.draw(st.booleans(), label="fill all")
    for _ in range(count):
        value = data.draw(st.sampled_from(values), label="special value")
        if flat.is_floating_point():
            value = torch.tensor(float(value), dtype=torch.float64).to(
                flat.dtype
            )  # overflow -> inf
        elif flat.dtype == torch.bool:
            value = bool(value)
        else:
            info = torch.iinfo(flat.dtype)
            value = int(min(max(value, info.min), info.max)) if not isinstance(value, float) else 0
        if everywhere:
            flat.fill_(value)
        else:
            flat[data.draw(st.integers(0, flat.numel() - 1), label="index")] = value
    return flat.reshape(tensor.shape)


# --------------------------------------------------------------------------------------------
# Mutations. Each acts in place and returns a short description ("" when it found nothing to do).


def m_byte_count(data: st.DataObject, req: pb.ComputeRequest) -> str:
    path, t = _pick(data, tensor_slots(req), "tensor") or (None, None)
    if t is None:
        return ""
    raw = t.data
    n = data.draw(st.integers(-len(raw), 64).filter(lambda d: d != 0), label="byte delta")
    t.data = raw[: len(raw) + n] if n < 0 else raw + bytes(n)
    return f"{path}: {n:+d} bytes"


def m_huge_shape(data: st.DataObject, req: pb.ComputeRequest) -> str:
    path, t = _pick(data, tensor_slots(req), "tensor") or (None, None)
    if t is None:
        return ""
    t.shape[:] = data.draw(
        st.lists(st.sampled_from(HUGE_DIMS + (1, 4)), min_size=1, max_size=4), label="huge shape"
    )
    return f"{path}: shape {list(t.shape)} with {len(t.data)} bytes"


def m_negative_dim(data: st.DataObject, req: pb.ComputeRequest) -> str:
    path, t = _pick(data, tensor_slots(req), "tensor") or (None, None)
    if t is None:
        return ""
    if not t.shape:
        t.shape.append(1)
    i = data.draw(st.integers(0, len(t.shape) - 1), label="dim")
    t.shape[i] = data.draw(
        st.one_of(st.sampled_from((-1, INT64_MIN)), st.integers(INT64_MIN, -1)), label="negative"
    )
    return f"{path}: shape {list(t.shape)}"


def m_high_rank(data: st.DataObject, req: pb.ComputeRequest) -> str:
    path, t = _pick(data, tensor_slots(req), "tensor") or (None, None)
    if t is None:
        return ""
    rank = data.draw(st.integers(9, 64), label="rank")
    t.shape[:] = [1] * rank
    t.data = bytes(ITEMSIZE.get(t.dtype, 4))
    return f"{path}: rank {rank}"


def m_dtype_enum(data: st.DataObject, req: pb.ComputeRequest) -> str:
    path, t = _pick(data, tensor_slots(req), "tensor") or (None, None)
    if t is None:
        return ""
    t.dtype = data.draw(
        st.one_of(
            st.sampled_from((0, 11, 12, 255)),
            st.integers(-(1 << 31), (1 << 31) - 1).filter(lambda v: v not in VALID_ENUMS),
        ),
        label="dtype enum",
    )
    return f"{path}: dtype enum {t.dtype}"


def m_retype(data: st.DataObject, req: pb.ComputeRequest) -> str:
    """Same shape, another valid dtype: floats where indices are expected and the reverse."""

    def retype(old: torch.Tensor) -> tuple[torch.Tensor, str]:
        new = data.draw(st.sampled_from(VALID_ENUMS), label="new dtype")
        target = codec.torch_dtype(new)
        if target.is_floating_point:
            converted = (
                old.to(torch.float64).to(target) if old.dtype != torch.bool else old.to(target)
            )
        elif target == torch.bool:
            converted = old != 0
        else:
            info = torch.iinfo(target)
            converted = old.to(torch.float64).nan_to_num(0.0).clamp(info.min, info.max).to(target)
        return converted, f"{old.dtype} -> {target}"

    return _replace_decoded(data, req, retype)


def m_special_values(data: st.DataObject, req: pb.ComputeRequest) -> str:
    """NaN/Inf in floats; negative, huge and off-by-one indices in integers."""

    def special(old: torch.Tensor) -> tuple[torch.Tensor, str]:
        values = SPECIAL_FLOATS if old.is_floating_point() else SPECIAL_INTS
        return _fill(data, old, values), "special values"

    return _replace_decoded(data, req, special)


def m_random_bytes(data: st.DataObject, req: pb.ComputeRequest) -> str:
    path, t = _pick(data, tensor_slots(req), "tensor") or (None, None)
    if t is None or len(t.data) > 4096:
        return ""
    t.data = data.draw(st.binary(min_size=len(t.data), max_size=len(t.data)), label="bytes")
    if t.dtype == pb.DATA_TYPE_BOOL:
        return f"{path}: random bool bytes"
    return f"{path}: random bytes"


def m_reshape(data: st.DataObject, req: pb.ComputeRequest) -> str:
    """Same bytes, another consistent shape: a transpose, a flattening, extra or fewer dims."""
    path, t = _pick(data, tensor_slots(req), "tensor") or (None, None)
    if t is None:
        return ""
    numel = math.prod(t.shape)
    if numel >= 2**63 or any(d < 0 for d in t.shape):
        return ""  # an earlier mutation made the shape absurd; reshaping it says nothing new
    choice = data.draw(
        st.sampled_from(("flat", "unsqueeze", "reverse", "split", "scalar")), label="reshape"
    )
    if choice == "flat":
        t.shape[:] = [numel]
    elif choice == "unsqueeze":
        shape = list(t.shape)
        shape.insert(data.draw(st.integers(0, len(shape)), label="at"), 1)
        t.shape[:] = shape
    elif choice == "reverse":
        t.shape[:] = list(reversed(t.shape))
    elif choice == "split":
        factors = [d for d in range(2, 9) if numel % d == 0]
        if not factors:
            return ""
        d = data.draw(st.sampled_from(factors), label="factor")
        t.shape[:] = [d, numel // d]
    elif numel == 1:
        t.shape[:] = []
    else:
        return ""
    return f"{path}: shape {list(t.shape)}"


def m_empty(data: st.DataObject, req: pb.ComputeRequest) -> str:
    path, t = _pick(data, tensor_slots(req), "tensor") or (None, None)
    if t is None:
        return ""
    shape = list(t.shape) or [1]
    shape[data.draw(st.integers(0, len(shape) - 1), label="dim")] = 0
    t.shape[:] = shape
    t.data = b""
    return f"{path}: empty {shape}"


def m_inverted_boxes(data: st.DataObject, req: pb.ComputeRequest) -> str:
    """x2 < x1 (and/or y2 < y1) in a float tensor whose last dim is 4, or zero-area boxes."""
    candidates = [
        (p, t)
        for p, t in tensor_slots(req)
        if t.shape and t.shape[-1] == 4 and t.dtype in (1, 2, 3, 4)
    ]
    path, t = _pick(data, candidates, "box tensor") or (None, None)
    if t is None:
        return ""
    boxes = _decode(t)
    if boxes is None or boxes.numel() == 0:
        return ""
    boxes = boxes.clone()
    mode = data.draw(
        st.sampled_from(("swap_x", "swap_y", "swap_both", "degenerate")), label="box mode"
    )
    if mode in ("swap_x", "swap_both"):
        boxes[..., [0, 2]] = boxes[..., [2, 0]] - 1
    if mode in ("swap_y", "swap_both"):
        boxes[..., [1, 3]] = boxes[..., [3, 1]] - 1
    if mode == "degenerate":
        boxes[..., 2:] = boxes[..., :2]
    codec.encode_tensor(boxes, t)
    return f"{path}: boxes {mode}"


def m_replace_value(data: st.DataObject, req: pb.ComputeRequest) -> str:
    path, v = _pick(data, value_slots(req), "value") or (None, None)
    if v is None:
        return ""
    v.CopyFrom(data.draw(raw_values(), label="replacement"))
    return f"{path}: replaced by {v.WhichOneof('kind')}"


# Past the cap (16) and, at 200, past what upb itself parses (100): such a request can be sent
# but no longer copied into another message here, so it is the last mutation of a request and
# callers that must wrap it (the chunked header) ask for ``shallow`` depths only.
_NESTING_DEPTHS = [(15, 16, 17, 18, 40, 200)]
# Each nesting step is two protobuf levels (Value -> ValueList -> Value), and the chunked header
# wraps the request three more deep: 44 steps stay within upb's 100 once wrapped.
_SHALLOW_DEPTHS = (15, 16, 17, 18, 40, 44)


def m_deep_nesting(data: st.DataObject, req: pb.ComputeRequest) -> str:
    path, v = _pick(data, value_slots(req), "value") or (None, None)
    if v is None:
        return ""
    depth = data.draw(st.sampled_from(_NESTING_DEPTHS[-1]), label="depth")
    inner = pb.Value()
    inner.CopyFrom(v)
    for _ in range(depth):
        outer = pb.Value()
        getattr(
            outer, data.draw(st.sampled_from(("list_value", "tuple_value")), label="kind")
        ).items.add().CopyFrom(inner)
        inner = outer
    v.CopyFrom(inner)
    return f"{path}: wrapped {depth} deep"


def m_many_items(data: st.DataObject, req: pb.ComputeRequest) -> str:
    """Thousands of positional args, list items or dict entries."""
    count = data.draw(st.sampled_from((1000, 3000, 5000)), label="count")
    item = data.draw(st.sampled_from(("int", "tensor", "none")), label="item")
    value = {
        "int": pb.Value(int_value=1),
        "tensor": pb.Value(tensor_value=pb.Tensor(dtype=3, shape=[1], data=bytes(4))),
        "none": pb.Value(none_value=pb.NoneValue()),
    }[item]
    where = data.draw(st.sampled_from(("sequence", "map")), label="where")
    if where == "sequence":
        path, seq = _pick(data, sequence_slots(req), "sequence")
        for _ in range(count):
            seq.add().CopyFrom(value)
    else:
        path, m = _pick(data, map_slots(req), "map")
        for i in range(count):
            m.entries.add(key=f"k{i}").value.CopyFrom(value)
    return f"{path}: {count} more {item} items"


def m_drop(data: st.DataObject, req: pb.ComputeRequest) -> str:
    """A missing argument, parameter, kwarg or dict key."""
    if data.draw(st.booleans(), label="from a map"):
        path, m = _pick(data, [(p, m) for p, m in map_slots(req) if len(m.entries)], "map") or (
            None,
            None,
        )
        if m is None:
            return ""
        i = data.draw(st.integers(0, len(m.entries) - 1), label="entry")
        key = m.entries[i].key
        del m.entries[i]
        return f"{path}: dropped key {key!r}"
    path, seq = _pick(data, [(p, s) for p, s in sequence_slots(req) if len(s)], "sequence") or (
        None,
        None,
    )
    if seq is None:
        return ""
    i = data.draw(st.integers(0, len(seq) - 1), label="item")
    del seq[i]
    return f"{path}: dropped item {i}"


def m_duplicate_key(data: st.DataObject, req: pb.ComputeRequest) -> str:
    path, m = _pick(data, [(p, m) for p, m in map_slots(req) if len(m.entries)], "map") or (
        None,
        None,
    )
    if m is None:
        return ""
    entry = m.entries[data.draw(st.integers(0, len(m.entries) - 1), label="entry")]
    copy = m.entries.add(key=entry.key)
    copy.value.CopyFrom(
        entry.value
        if data.draw(st.booleans(), label="same value")
        else data.draw(raw_values(), label="value")
    )
    return f"{path}: duplicate key {entry.key!r}"


def m_unknown_key(data: st.DataObject, req: pb.ComputeRequest) -> str:
    path, m = _pick(data, map_slots(req), "map")
    key = data.draw(
        st.one_of(
            st.sampled_from(
                ("weight", "reduction", "ignore_index", "avg_factor", "", "x" * 5000, "a.b")
            ),
            st.text(max_size=12),
        ),
        label="key",
    )
    m.entries.add(key=key).value.CopyFrom(data.draw(raw_values(), label="value"))
    return f"{path}: extra key {key[:20]!r}"


def m_swap_kind(data: st.DataObject, req: pb.ComputeRequest) -> str:
    """list <-> tuple, dict -> list of its values, tensor -> list of numbers."""
    path, v = _pick(data, value_slots(req), "value") or (None, None)
    if v is None:
        return ""
    kind = v.WhichOneof("kind")
    if kind in ("list_value", "tuple_value"):
        items = list(getattr(v, kind).items)
        other = "tuple_value" if kind == "list_value" else "list_value"
        new = pb.Value()
        getattr(new, other).items.extend(items)
        getattr(new, other).SetInParent()
        v.CopyFrom(new)
    elif kind == "dict_value":
        new = pb.Value()
        new.list_value.items.extend([e.value for e in v.dict_value.entries])
        new.list_value.SetInParent()
        v.CopyFrom(new)
    elif kind == "tensor_value":
        t = _decode(v.tensor_value)
        if t is None or t.numel() > 64:
            return ""
        v.CopyFrom(codec.encode_value(t.reshape(-1).tolist()))
    else:
        return ""
    return f"{path}: {kind} -> {v.WhichOneof('kind')}"


def m_param(data: st.DataObject, req: pb.ComputeRequest) -> str:
    """A declared constructor parameter of the wrong type or out of range."""
    spec = _spec(req)
    if spec is None or not spec.params:
        return ""
    param = spec.params[data.draw(st.integers(0, len(spec.params) - 1), label="param")]
    value = data.draw(
        st.one_of(
            raw_values(),
            st.builds(lambda f: pb.Value(float_value=f), st.sampled_from(SPECIAL_NUMBERS)),
            st.builds(lambda i: pb.Value(int_value=i), st.sampled_from(SPECIAL_INTS)),
            st.builds(
                lambda xs: codec.encode_value(xs),
                st.lists(st.sampled_from(SPECIAL_NUMBERS), max_size=5),
            ),
        ),
        label="param value",
    )
    for entry in req.params.entries:
        if entry.key == param.name:
            entry.value.CopyFrom(value)
            break
    else:
        req.params.entries.add(key=param.name).value.CopyFrom(value)
    return f"params.{param.name}: {value.WhichOneof('kind')}"


def m_loss_name(data: st.DataObject, req: pb.ComputeRequest) -> str:
    """Another loss's name on this call (valid tensors for the wrong loss), or no such loss."""
    names = [s.name for s in all_specs()]
    req.loss = data.draw(
        st.one_of(
            st.sampled_from(names),
            st.sampled_from(("", "FOCALLOSS", "x" * 5000)),
            st.text(max_size=16),
        ),
        label="loss",
    )
    return f"loss {req.loss[:30]!r}"


def m_grad_paths(data: st.DataObject, req: pb.ComputeRequest) -> str:
    paths = [p for p, _ in tensor_slots(req) if p.startswith(("args", "kwargs"))]
    choice = data.draw(st.sampled_from(("unknown", "duplicate", "all", "many")), label="grad mode")
    if choice == "unknown":
        req.grad_paths.append(
            data.draw(
                st.one_of(
                    st.sampled_from(("args[0]", "args[9]", "params.weight", "", "args[0][0]")),
                    st.text(max_size=20),
                ),
                label="path",
            )
        )
    elif choice == "duplicate" and req.grad_paths:
        req.grad_paths.append(req.grad_paths[0])
    elif choice == "all":
        req.grad_paths[:] = paths  # integer inputs included
    else:
        req.grad_paths.extend(["args[0]"] * 3000)
    return f"grad_paths {choice}"


def m_grad_output(data: st.DataObject, req: pb.ComputeRequest) -> str:
    if data.draw(st.booleans(), label="raw"):
        req.grad_output.CopyFrom(data.draw(raw_tensors(), label="grad_output"))
    else:  # well-formed but of some shape: the right one only by chance
        shape = data.draw(st.lists(st.integers(0, 4), max_size=3), label="shape")
        value = data.draw(st.sampled_from((1.0, math.nan, math.inf, 0.0)), label="fill")
        codec.encode_tensor(
            torch.full(shape, value, dtype=data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")),
            req.grad_output,
        )
    return f"grad_output {list(req.grad_output.shape)}"


def m_audit(data: st.DataObject, req: pb.ComputeRequest) -> str:
    """Odd audit contexts and request ids: long, empty, non-ASCII, many tags."""
    req.request_id = data.draw(
        st.one_of(st.just(""), st.text(max_size=40), st.just("r" * 10000)), label="request id"
    )
    if data.draw(st.booleans(), label="tags"):
        for i in range(data.draw(st.sampled_from((1, 100, 1000)), label="tag count")):
            req.audit.tags[f"t{i}"] = "v" * data.draw(
                st.sampled_from((0, 10, 5000)), label="tag size"
            )
    req.audit.step = data.draw(st.sampled_from((0, -1, INT64_MIN, INT64_MAX)), label="step")
    req.audit.rank = data.draw(st.sampled_from((0, -1, -(1 << 31), (1 << 31) - 1)), label="rank")
    return f"audit ({len(req.audit.tags)} tags, request id of {len(req.request_id)})"


MUTATIONS: dict[str, Callable[[st.DataObject, pb.ComputeRequest], str]] = {
    "byte_count": m_byte_count,
    "huge_shape": m_huge_shape,
    "negative_dim": m_negative_dim,
    "high_rank": m_high_rank,
    "dtype_enum": m_dtype_enum,
    "retype": m_retype,
    "special_values": m_special_values,
    "random_bytes": m_random_bytes,
    "reshape": m_reshape,
    "empty": m_empty,
    "inverted_boxes": m_inverted_boxes,
    "replace_value": m_replace_value,
    "deep_nesting": m_deep_nesting,
    "many_items": m_many_items,
    "drop": m_drop,
    "duplicate_key": m_duplicate_key,
    "unknown_key": m_unknown_key,
    "swap_kind": m_swap_kind,
    "param": m_param,
    "loss_name": m_loss_name,
    "grad_paths": m_grad_paths,
    "grad_output": m_grad_output,
    "audit": m_audit,
}

# Mutations that keep the call well-formed but change its content are drawn more often: they
# are the ones that reach the losses' own checks (decode-level ones stop at the codec).
_WEIGHTED = [*MUTATIONS] + [
    "special_values",
    "retype",
    "reshape",
    "empty",
    "param",
    "swap_kind",
    "inverted_boxes",
    "random_bytes",
] * 2


def _spec(req: pb.ComputeRequest) -> registry.LossSpec | None:
    try:
        return registry.get(req.loss)
    except KeyError:
        return None


def draw_request(
    data: st.DataObject, *, max_mutations: int = 3, shallow: bool = False
) -> tuple[pb.ComputeRequest, list[str]]:
    """A valid call of a random loss, then 0..max_mutations mutations; returns it and what was done.
    ``shallow``: nesting stays within what protobuf can copy into another message."""
    specs = all_specs()
    spec = specs[data.draw(st.integers(0, len(specs) - 1), label="loss")]
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    request = seed_request(spec.name, dtype, data.draw(st.booleans(), label="with grads"))
    done = [f"{spec.name} {str(dtype).removeprefix('torch.')}"]
    for _ in range(data.draw(st.integers(0, max_mutations), label="mutations")):
        name = data.draw(st.sampled_from(_WEIGHTED), label="mutation")
        if shallow:
            _NESTING_DEPTHS.append(_SHALLOW_DEPTHS)
        try:
            what = MUTATIONS[name](data, request)
        finally:
            if shallow:
                _NESTING_DEPTHS.pop()
        if what:
            APPLIED[name] += 1
            done.append(f"{name}: {what}")
        if name == "deep_nesting":
            break  # any further copy of the request may exceed protobuf's own depth limit
    return request, done


RAW_KINDS = ("noise", "truncated", "flipped", "appended", "varint")


def draw_raw_bytes(data: st.DataObject) -> tuple[bytes, str]:
    """Bytes that are not (or not quite) a ComputeRequest: noise, truncations, flipped bytes."""
    choice = data.draw(st.sampled_from(RAW_KINDS), label="raw kind")
    APPLIED[f"raw:{choice}"] += 1
    if choice == "noise":
        return data.draw(st.binary(max_size=512), label="noise"), choice
    specs = all_specs()
    spec = specs[data.draw(st.integers(0, len(specs) - 1), label="loss")]
    valid = seed_bytes(spec.name, data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype"), True)
    if choice == "truncated":
        cut = data.draw(st.integers(0, len(valid) - 1), label="cut")
        return valid[:cut], f"{spec.name} truncated at {cut}/{len(valid)}"
    if choice == "flipped":
        raw = bytearray(valid)
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            raw[data.draw(st.integers(0, len(raw) - 1), label="at")] = data.draw(
                st.integers(0, 255), label="byte"
            )
        return bytes(raw), f"{spec.name} with flipped bytes"
    if choice == "appended":
        return valid + data.draw(
            st.binary(min_size=1, max_size=64), label="tail"
        ), f"{spec.name} with a tail"
    # A length prefix claiming far more than follows, on a random field number.
    field = data.draw(st.integers(1, 20), label="field")
    return bytes([(field << 3) | 2]) + _varint(
        data.draw(st.sampled_from((1 << 20, 1 << 31, (1 << 63) - 1)), label="len")
    ) + b"\x00" * 4, "huge length prefix"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# --------------------------------------------------------------------------------------------
# ComputeChunked: hostile sequences of frames


def to_chunked(request: pb.ComputeRequest) -> tuple[pb.ChunkedRequestHeader, list[bytes]]:
    """As the client's chunked transport does: every non-empty tensor's bytes leave the message
    and are listed in the header, in order."""
    refs: list[pb.ChunkedTensor] = []
    blobs: list[bytes] = []
    for path, t in tensor_slots(request):
        if t.data:
            refs.append(pb.ChunkedTensor(path=path, size_bytes=len(t.data)))
            blobs.append(t.data)
            t.data = b""
    return pb.ChunkedRequestHeader(request=request, tensors=refs), blobs


CHUNK_FAULTS = (
    "valid", "truncated", "extra_bytes", "dropped_chunk", "duplicated_chunk", "reordered", "size_mismatch",
    "negative_size", "huge_size", "big_claim", "unknown_path", "duplicate_path", "inline_and_chunked",
    "no_header", "two_headers", "empty_stream", "garbage_frame",
)  # fmt: skip

REF_FAULTS = (
    "size_mismatch", "negative_size", "huge_size", "big_claim", "unknown_path", "duplicate_path",
    "inline_and_chunked",
)  # fmt: skip


def draw_chunked(data: st.DataObject, max_bytes: int) -> tuple[list[bytes], list[str]]:
    """The serialized messages of one ComputeChunked call: a (possibly mutated) request moved to
    chunks, then one framing fault: chunk sequences cut short or too long, chunks dropped,
    repeated or reordered (bytes landing at the wrong offsets), byte counts that disagree with
    the header or the shapes, claims of more than ``max_bytes``, bad paths, headers missing or
    repeated, garbage frames."""
    request, done = draw_request(data, max_mutations=1, shallow=True)
    header, blobs = to_chunked(request)
    stream = b"".join(blobs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6), label="cuts"))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    refs = header.tensors
    # A fault on a listed tensor is drawn only when the header lists one, so that no fault's
    # coverage depends on how often the request happens to carry tensors.
    faults = CHUNK_FAULTS if refs else tuple(f for f in CHUNK_FAULTS if f not in REF_FAULTS)
    fault = data.draw(st.sampled_from(faults), label="chunk fault")
    first = [pb.ComputeChunkedRequest(header=header).SerializeToString()]
    if fault == "truncated" and stream:
        # Cut the byte stream short, keeping the chunk boundaries before the cut (some chunks
        # may be empty, so cutting by chunk count alone could cut nothing).
        cut, kept, sent = data.draw(st.integers(0, len(stream) - 1), label="cut"), [], 0
        for chunk in chunks:
            if sent + len(chunk) > cut:
                kept.append(chunk[: cut - sent])
                break
            kept.append(chunk)
            sent += len(chunk)
        chunks = kept
    elif fault == "extra_bytes":
        chunks.append(data.draw(st.binary(min_size=1, max_size=64), label="extra"))
    elif fault in ("dropped_chunk", "duplicated_chunk") and chunks:
        i = data.draw(st.integers(0, len(chunks) - 1), label="chunk")
        chunks[i : i + 1] = [] if fault == "dropped_chunk" else [chunks[i], chunks[i]]
    elif fault == "reordered" and len(stream) > 1:
        pieces = [c for c in chunks if c]  # reversing around empty chunks would move nothing
        if len(pieces) < 2:
            pieces = [stream[: len(stream) // 2], stream[len(stream) // 2 :]]
        chunks = pieces[::-1]
    elif fault in REF_FAULTS and refs:
        i = data.draw(st.integers(0, len(refs) - 1), label="ref")
        ref = refs[i]
        if (
            fault == "size_mismatch"
        ):  # the header disagrees with the shape; the bytes agree with the header
            delta = data.draw(
                st.integers(-ref.size_bytes, 64).filter(lambda d: d != 0), label="delta"
            )
            ref.size_bytes += delta
            chunks = [
                b"".join(blobs[:i])
                + blobs[i][: len(blobs[i]) + delta]
                + bytes(max(delta, 0))
                + b"".join(blobs[i + 1 :])
            ]
        elif fault == "negative_size":
            ref.size_bytes = data.draw(
                st.sampled_from((-1, -(1 << 20), INT64_MIN)), label="negative size"
            )
        elif fault == "huge_size":
            ref.size_bytes = data.draw(
                st.sampled_from((max_bytes + 1, 1 << 40, INT64_MAX)), label="huge size"
            )
        elif fault == "big_claim":  # just under the limit, with a few bytes behind it
            ref.size_bytes = max_bytes - sum(r.size_bytes for j, r in enumerate(refs) if j != i)
        elif fault == "unknown_path":
            ref.path = data.draw(
                st.sampled_from(
                    ("args[9]", "params.nothing", "grad_output", "", "loss", "args[0][0]")
                ),
                label="path",
            )
        elif fault == "duplicate_path":
            refs.add().CopyFrom(ref)
            chunks.append(blobs[i])
        else:  # the bytes both inline and listed
            _, tensor = [s for s in tensor_slots(header.request) if s[0] == ref.path][0]
            tensor.data = blobs[i]
        first = [pb.ComputeChunkedRequest(header=header).SerializeToString()]
    elif fault == "no_header":
        first = []
    elif fault == "two_headers":
        first = first * 2
    elif fault == "empty_stream":
        first, chunks = [], []
    elif fault == "garbage_frame":
        at = data.draw(st.integers(0, len(chunks)), label="at")
        garbage = data.draw(
            st.one_of(st.binary(max_size=64), st.just(b"\x12\xff\xff\xff\xff\x0f")), label="garbage"
        )
        APPLIED[f"chunked:{fault}"] += 1
        return first + [framing.frame_data(memoryview(c)) for c in chunks[:at]] + [garbage] + [
            framing.frame_data(memoryview(c)) for c in chunks[at:]
        ], [*done, f"chunked {fault} at {at}"]
    else:
        fault = "valid" if fault != "valid" else fault  # nothing to act on: a valid framing
    APPLIED[f"chunked:{fault}"] += 1
    return first + [framing.frame_data(memoryview(c)) for c in chunks], [
        *done,
        f"chunked {fault}, {len(chunks)} chunks of {[len(c) for c in chunks]}",
    ]


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
