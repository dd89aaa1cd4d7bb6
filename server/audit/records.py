"""Building audit records from finished evaluations, and their JSON forms.

A record is a flat row of plain values (``Row``): everything a reader needs without torch, and
enough to recompute the evaluation when the inputs were captured: the call's structure with each
tensor replaced by ``{"ref": PATH}``, and each tensor's path, dtype, shape and digest.

JSON forms (the ``params``, ``call`` and ``value`` columns), chosen to round-trip exactly:
- None, bool, int, str: themselves; float: itself (NaN and +/-Infinity as Python's json writes them);
- list: a JSON array; tuple: ``{"tuple": [...]}``; dict: ``{"dict": {...}}`` (keys in order);
- a tensor in ``params``/``call``: ``{"ref": PATH}``; in ``value``:
  ``{"tensor": {"dtype", "shape", "data"}}``, ``data`` a flat list (``null`` past VALUE_MAX_ELEMENTS,
  then ``sha256`` holds the digest).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from lossd.client.wire.audit import tensor_digest
from lossd.client.wire.codec import iter_tensors, join_key, tensor_bytes

from ..version import __version__

# Larger loss values (reduction='none' over big inputs) keep their digest, not their elements.
VALUE_MAX_ELEMENTS = 1 << 16


# Parameters and call structure longer than this (as JSON) are stored by their SHA-256 and size:
# a record stays small enough to read back through the API whatever the call held (the call's
# strings may each be escaped to 6 characters per control byte).
MAX_FIELD_CHARS = 64 << 10
OVERSIZED = "oversized"


def bounded(text: str) -> str:
    """``text``, or the digest form ``{"oversized": {"sha256", "chars"}}`` when it is too long."""
    if len(text) <= MAX_FIELD_CHARS:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()
    return dumps({OVERSIZED: {"sha256": digest, "chars": len(text)}})


def is_oversized(text: str) -> bool:
    return text.startswith('{"' + OVERSIZED + '":')


# How the store keeps a step, rank or micro-batch the caller did not give (the wire leaves it unset).
UNKNOWN = -1


@dataclass
class Row:
    """One audit record, exactly as stored (column order = ``COLUMNS``)."""

    request_id: str
    run_id: str
    step: int
    rank: int
    micro_batch: int
    tags: str
    recorded_at_ns: int
    peer: str
    principal: str
    loss: str
    params: str
    call: str
    lossd_version: str
    torch_version: str
    device: str
    dtype: str
    inputs: str
    value: str
    components: str
    grad_norms: str
    non_finite: bool
    decode_ns: int
    compute_ns: int
    encode_ns: int
    captured: bool
    session: str = ""  # the client's attempt: tells a reused run id apart
    capture: str = ""  # why the inputs were captured: "all", "first", "sample"; "" not chosen
    seq: int = 0  # position in the run's chain, from 1 (0: written before schema 2, unchained)
    prev_sha256: str = ""  # record_sha256 of the run's record at seq - 1 (GENESIS for seq 1)
    record_sha256: str = ""
    id: int = 0

    def digest(self) -> str:
        """SHA-256 over every stored field but ``id`` and the digest itself: the chain link,
        since it covers ``seq`` and ``prev_sha256``. A record from before schema 2 (seq 0) keeps
        the digest it was written with, over the version-1 fields."""
        chained = self.seq > 0
        h = hashlib.sha256(b"lossd-record-v2" if chained else b"lossd-record-v1")
        for name in HASHED if chained else HASHED_V1:
            value = getattr(self, name)
            if isinstance(value, bool):
                value = int(value)
            h.update(b"\x1f" + str(value).encode())
        return h.hexdigest()

    def values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in COLUMNS)

    @classmethod
    def from_db(cls, row: dict[str, Any]) -> Row:
        kwargs = {f.name: row[f.name] for f in fields(cls)}
        kwargs["non_finite"] = bool(kwargs["non_finite"])
        kwargs["captured"] = bool(kwargs["captured"])
        return cls(**kwargs)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


COLUMNS = tuple(f.name for f in fields(Row) if f.name != "id")
HASHED = tuple(c for c in COLUMNS if c != "record_sha256")
HASHED_V1 = tuple(c for c in HASHED if c not in ("session", "capture", "seq", "prev_sha256"))
# What the first record of every run links to.
GENESIS = "0" * 64


@dataclass
class Blob:
    """One captured input tensor, compressed."""

    digest: str
    codec: str
    raw_bytes: int
    data: bytes


@dataclass
class Pending:
    """What the hook hands the writer: the row and the blobs not yet known to be stored."""

    row: Row
    blobs: list[Blob]
    referenced: list[str]  # digests of captured inputs (their last-use time is refreshed)
    kept: list[tuple[str, Tensor]] = field(default_factory=list)  # uncaptured inputs, held


# --------------------------------------------------------------------------------------------
# JSON forms


def to_json(obj: Any, path: str, tensor: Callable[[str, Tensor], Any]) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Tensor):
        return tensor(path, obj)
    if isinstance(obj, tuple):
        return {"tuple": [to_json(v, f"{path}[{i}]", tensor) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [to_json(v, f"{path}[{i}]", tensor) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        return {
            "dict": {str(k): to_json(v, join_key(path, str(k)), tensor) for k, v in obj.items()}
        }
    return {
        "repr": type(obj).__name__
    }  # never reached for decoded requests; keeps records writable


def from_json(obj: Any, tensor: Callable[[Any], Any]) -> Any:
    """Inverse of ``to_json``; ``tensor`` receives the ``ref`` path or the ``tensor`` object."""
    if isinstance(obj, list):
        return [from_json(v, tensor) for v in obj]
    if isinstance(obj, dict):
        if "ref" in obj:
            return tensor(obj["ref"])
        if "tensor" in obj:
            return tensor(obj["tensor"])
        if "tuple" in obj:
            return tuple(from_json(v, tensor) for v in obj["tuple"])
        if "dict" in obj:
            return {k: from_json(v, tensor) for k, v in obj["dict"].items()}
        raise ValueError(f"unknown JSON form {sorted(obj)}")
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _ref(path: str, _tensor: Tensor) -> dict[str, str]:
    return {"ref": path}


def value_form(path: str, t: Tensor) -> dict[str, Any]:
    host = t.detach().cpu()
    form: dict[str, Any] = {"dtype": _dtype(host), "shape": list(host.shape)}
    if host.numel() <= VALUE_MAX_ELEMENTS:
        form["data"] = host.reshape(-1).tolist()
    else:
        form["data"] = None
        form["sha256"] = tensor_digest(host)
    return {"tensor": form}


def _dtype(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def scalar_of(value: Any) -> float:
    """The loss as one float when it is a one-element tensor (or a number); NaN otherwise."""
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value.detach().reshape(()).item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


def value_scalar(value_json: str) -> float:
    """``scalar_of`` from the stored JSON form."""
    obj = json.loads(value_json)
    if isinstance(obj, dict) and "tensor" in obj:
        data = obj["tensor"].get("data")
        if data is not None and len(data) == 1:
            return float(data[0])
        return math.nan
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return float(obj)
    return math.nan


# --------------------------------------------------------------------------------------------
# Building a record


def all_tensors(
    params: dict[str, Any], args: list[Any], kwargs: dict[str, Any]
) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of an evaluation, with its path: the call's, then tensor-valued params'."""
    yield from iter_tensors(list(args), "args")
    for key, value in kwargs.items():
        yield from iter_tensors(value, join_key("kwargs", key))
    for key, value in params.items():
        yield from iter_tensors(value, join_key("params", key))


def build(
    *,
    request_id: str,
    audit: Any,
    loss: str,
    params: dict[str, Any],
    args: list[Any],
    kwargs: dict[str, Any],
    value: Any,
    components: dict[str, Tensor],
    grads: dict[str, Tensor],
    non_finite: bool,
    device: str,
    timings: Any,
    peer: str,
    principal: str,
    capture: Callable[[str, Tensor], tuple[bool, Blob | None]] | None = None,
    capture_reason: str = "",
    keep: bool = False,
) -> Pending:
    """Build the record of one evaluation. ``capture(digest, tensor)`` stores an input and says
    whether it is stored (``(stored, new_blob)``); None records digests only."""
    tags = dict(audit.tags)  # checked when the request was decoded (messages.check_audit_context)
    inputs: list[dict[str, Any]] = []
    blobs: list[Blob] = []
    referenced: list[str] = []
    kept: list[tuple[str, Tensor]] = []
    for path, tensor in all_tensors(params, args, kwargs):
        host = tensor.detach()
        if host.device.type != "cpu":
            host = host.cpu()
        host = host.contiguous()
        digest = tensor_digest(host)
        stored = False
        if capture is not None:
            stored, blob = capture(digest, host)
            if blob is not None:
                blobs.append(blob)
            if stored:
                referenced.append(digest)
        elif keep:
            kept.append((digest, host))
        inputs.append(
            {
                "path": path,
                "dtype": _dtype(host),
                "shape": list(host.shape),
                "sha256": digest,
                "captured": stored,
            }
        )
    dtype = (
        _dtype(value)
        if isinstance(value, Tensor)
        else next((i["dtype"] for i in inputs if i["dtype"].startswith(("float", "bfloat"))), "")
    )
    row = Row(
        request_id=request_id,
        run_id=audit.run_id,
        # Unset (proto3 presence) is unknown, stored as -1 and read back as unset.
        step=audit.step if audit.HasField("step") else UNKNOWN,
        rank=audit.rank if audit.HasField("rank") else UNKNOWN,  # (an explicit -1 is UNKNOWN too)
        micro_batch=audit.micro_batch if audit.HasField("micro_batch") else UNKNOWN,
        tags=dumps(dict(sorted(tags.items()))),
        recorded_at_ns=time.time_ns(),
        peer=peer,
        principal=principal,
        loss=loss,
        params=bounded(dumps(to_json(params, "params", _ref)["dict"])),
        call=bounded(
            dumps(
                {
                    "args": to_json(list(args), "args", _ref),
                    "kwargs": to_json(kwargs, "kwargs", _ref)["dict"],
                }
            )
        ),
        lossd_version=__version__,
        torch_version=torch.__version__,
        device=device,
        dtype=dtype,
        inputs=dumps(inputs),
        value=dumps(to_json(value, "value", value_form)),
        components=dumps({k: scalar_of(v) for k, v in components.items()}),
        grad_norms=dumps(
            {
                p: float(torch.linalg.vector_norm(g.detach().double()).item())
                for p, g in grads.items()
            }
        ),
        non_finite=bool(non_finite),
        decode_ns=int(timings.decode_ns),
        compute_ns=int(timings.compute_ns),
        encode_ns=int(timings.encode_ns),
        captured=bool(inputs) and all(i["captured"] for i in inputs),
        session=str(getattr(audit, "session", "")),
        capture=capture_reason if capture is not None else "",
    )
    # seq, prev_sha256 and the digest are set by the store, under the run's chain lock.
    return Pending(row, blobs, referenced, kept)


def uncapture(row: Row, digests: set[str]) -> None:
    """Mark the inputs with these digests as not captured (their blobs are not in the store)."""
    inputs = json.loads(row.inputs)
    for i in inputs:
        if i["sha256"] in digests:
            i["captured"] = False
    row.inputs = dumps(inputs)
    row.captured = bool(inputs) and all(i["captured"] for i in inputs)


def raw_bytes(tensor: Tensor) -> memoryview:
    return tensor_bytes(tensor)
