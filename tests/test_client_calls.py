"""What the client reads off a call and an answer (client/functional.py): the tensors of a call
with their paths, and the RemoteResult of a response, field by field."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from lossd.client._proto import lossd_pb2 as pb
from lossd.client.functional import RemoteResult, _call_tensors, _result
from lossd.client.wire import codec


def _calls() -> list[tuple[tuple, dict]]:
    x, y = torch.randn(2, 3), torch.tensor([1, 0])
    return [
        ((), {}),
        ((x,), {}),
        ((x, y), {}),
        (tuple(torch.full((1,), float(i)) for i in range(8)), {}),
        (tuple(torch.full((1,), float(i)) for i in range(9)), {}),  # past the fast path's paths
        ((nn.Parameter(x), y), {}),  # a Tensor subclass
        ((x, 2.0, y), {}),  # a number between the tensors
        ((x, None), {}),
        (([x, y],), {}),
        ((x,), {"target": y}),
        ((), {"pred": x, "target": {"a": y}}),
    ]


@pytest.mark.parametrize("case", range(len(_calls())))
def test_the_tensors_of_a_call_are_the_walks_in_order_with_their_paths(case: int) -> None:
    args, kwargs = _calls()[case]
    found = _call_tensors(args, kwargs)
    expected = list(codec.call_tensors(args, kwargs))
    assert [path for path, _ in found] == [path for path, _ in expected]
    assert all(a is b for (_, a), (_, b) in zip(found, expected, strict=True))


def test_a_result_holds_each_field_of_the_response() -> None:
    response = pb.ComputeResponse(
        request_id="r" * 32,
        notes=["first", "second"],
        non_finite=False,
        device="cuda:1",
        lossd_version="9.8.7",
        audited=True,
    )
    response.timings.decode_ns, response.timings.compute_ns, response.timings.encode_ns = 1, 2, 3
    codec.encode_map({"iou": torch.tensor(0.5), "n": 4}, response.components)
    result = _result(response)
    assert isinstance(result, RemoteResult)
    fields = dataclasses.asdict(result)
    components = fields.pop("components")
    assert fields == {
        "request_id": "r" * 32,
        "notes": ["first", "second"],
        "non_finite": False,
        "device": "cuda:1",
        "timings_ns": {"decode": 1, "compute": 2, "encode": 3},
        "lossd_version": "9.8.7",
        "audited": True,
    }
    assert components.keys() == {"iou", "n"} and components["n"] == 4
    assert torch.equal(components["iou"], torch.tensor(0.5))
    empty = _result(pb.ComputeResponse(request_id="x"))
    assert (empty.components, empty.notes, empty.audited) == ({}, [], False)


def test_a_non_finite_result_warns_with_the_servers_notes() -> None:
    response = pb.ComputeResponse(request_id="x", non_finite=True, notes=["loss is nan"])
    with pytest.warns(RuntimeWarning, match="loss is nan"):
        assert _result(response).non_finite is True
