"""Hostile ComputeRequests, built at the protobuf level for the property suite.

Every case starts from a valid call of a registered loss (``hostile.seed_request``), then applies
one to three mutations drawn by hypothesis: byte counts that disagree with the shape, shapes that
claim terabytes, negative/huge dims, rank 9+, deep nesting, thousands of items, unknown dtype and
enum values, NaN/Inf, out-of-range and negative indices, floats where indices are expected and
the reverse, boxes with x2 < x1, empty tensors, ill-typed and out-of-range parameters,
duplicate/missing/unknown keys, wrong loss names, bad gradient paths and grad_output.

Nothing here talks to a server: ``draw_request`` returns a message and a description of what was
done to it; the tests send it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from hypothesis import strategies as st

from lossd.client._proto import lossd_pb2 as pb
from lossd.client.wire import codec
from lossd.server import registry
from tests.reliability.hostile import (
    APPLIED,
    FLOAT_DTYPES,
    HUGE_DIMS,
    INT64_MAX,
    INT64_MIN,
    ITEMSIZE,
    SPECIAL_FLOATS,
    SPECIAL_INTS,
    SPECIAL_NUMBERS,
    VALID_ENUMS,
    all_specs,
    map_slots,
    seed_request,
    sequence_slots,
    tensor_slots,
    value_slots,
)

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
