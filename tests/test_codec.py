"""The shared tensor/value codec: exact round trips, and refusal of every malformed tensor."""

from __future__ import annotations

import tracemalloc

import pytest
import torch

from lossd.client._proto import lossd_pb2 as pb
from lossd.client.wire import codec
from tests.support.wirekit import ALL_DTYPES


def _sample(dtype: torch.dtype, shape=(3, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_tensor_round_trip_is_bit_exact(dtype):
    t = _sample(dtype)
    msg = codec.encode_tensor(t)
    assert len(msg.data) == t.numel() * t.element_size()  # 16-bit types travel as 16 bits
    back = codec.decode_tensor(pb.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == dtype and back.shape == t.shape
    same_bits = (
        back.view(torch.int16).equal(t.view(torch.int16))
        if t.element_size() == 2 and dtype.is_floating_point
        else back.equal(t)
    )
    assert same_bits


def test_special_float_values_survive():
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 5e-324], dtype=torch.float64)
    back = codec.decode_tensor(codec.encode_tensor(t))
    assert back.view(torch.int64).equal(t.view(torch.int64))


@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3), (1,) * 8])
def test_edge_shapes(shape):
    t = torch.zeros(shape)
    back = codec.decode_tensor(codec.encode_tensor(t))
    assert back.shape == t.shape


def test_non_contiguous_and_expanded_tensors_are_sent_as_their_values():
    base = torch.arange(12.0).reshape(3, 4)
    for t in (base.t(), base[:, ::2], torch.tensor(1.0).expand(3, 2), base.neg().conj()):
        back = codec.decode_tensor(codec.encode_tensor(t))
        assert back.equal(t.contiguous())


def test_decoded_tensor_is_writable_and_owns_its_memory():
    msg = codec.encode_tensor(torch.ones(4))
    back = codec.decode_tensor(msg)
    back += 1  # would fail or corrupt the message if it aliased protobuf's bytes
    assert back.tolist() == [2.0] * 4


def test_nested_values_round_trip_with_types_and_order():
    value = {
        "pred": [torch.ones(2, 3), torch.zeros(1)],
        "gt": [
            {"boxes": torch.rand(2, 4), "labels": torch.tensor([1, 0])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        ],
        "img_size": 64,
        "scale": 0.5,
        "name": "x",
        "flag": True,
        "nothing": None,
        "pair": (torch.tensor([1]), torch.tensor([0.5])),
        "z": {},
        "a": [],
    }
    back = codec.decode_value(pb.Value.FromString(codec.encode_value(value).SerializeToString()))
    assert list(back) == list(value)  # dict order preserved
    assert isinstance(back["pair"], tuple) and isinstance(back["pred"], list)
    assert back["img_size"] == 64 and isinstance(back["img_size"], int)
    assert back["flag"] is True and back["nothing"] is None and back["z"] == {} and back["a"] == []
    assert back["gt"][1]["boxes"].shape == (0, 4)
    assert [p for p, _ in codec.iter_tensors(back, "args[0]")] == [
        "args[0].pred[0]",
        "args[0].pred[1]",
        "args[0].gt[0].boxes",
        "args[0].gt[0].labels",
        "args[0].gt[1].boxes",
        "args[0].gt[1].labels",
        "args[0].pair[0]",
        "args[0].pair[1]",
    ]


def test_keys_that_are_not_identifiers_get_bracketed_paths():
    assert codec.join_key("kwargs", "weight") == "kwargs.weight"
    assert codec.join_key("args[0]", "a.b") == "args[0]['a.b']"


@pytest.mark.parametrize(
    "bad", [{1: 2}, {1, 2}, torch.zeros(2, dtype=torch.complex64), 1 << 70, object()]
)
def test_values_without_a_wire_form_are_refused_at_encode(bad):
    with pytest.raises(codec.EncodeError):
        codec.encode_value(bad)


def _tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=(2,), data=b"\0" * 8) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=list(shape), data=data)


@pytest.mark.parametrize(
    ("msg", "field", "words"),
    [
        (_tensor(data=b"\0" * 7), "t.data", "expected 8 bytes"),
        (_tensor(shape=(3,)), "t.data", "expected 12 bytes"),
        (_tensor(shape=(-1, 2)), "t.shape[0]", "size >= 0"),
        (_tensor(shape=(1,) * 9, data=b"\0" * 4), "t.shape", "exceeds the limit of 8"),
        (_tensor(dtype=0), "t.dtype", "<enum 0>"),
        (_tensor(dtype=99), "t.dtype", "<enum 99>"),
        (_tensor(dtype=pb.DATA_TYPE_BOOL, shape=(2,), data=b"\x00\x07"), "t.data", "0 or 1"),
    ],
)
def test_malformed_tensors_name_the_field_expected_and_got(msg, field, words):
    with pytest.raises(codec.DecodeError) as info:
        codec.decode_tensor(msg, "t")
    assert info.value.field == field
    assert words in str(info.value)


def test_a_terabyte_claim_with_tiny_data_allocates_nothing():
    msg = _tensor(shape=(1 << 20, 1 << 20), data=b"\0" * 16)
    tracemalloc.start()
    with pytest.raises(codec.DecodeError):
        codec.decode_tensor(msg, "t", codec.DecodeLimits(max_elements=1 << 50))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20


def test_an_empty_tensor_with_absurd_other_dims_is_refused():
    # numel is 0 so the byte count matches, but torch would overflow the strides building it.
    msg = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[0, 2**20, 2**62], data=b"")
    with pytest.raises(codec.LimitError, match="empty tensor whose other dims span"):
        codec.decode_tensor(msg, "args[0]")
    assert codec.decode_tensor(
        pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[0, 7], data=b"")
    ).shape == (0, 7)


def test_limits_name_the_setting():
    limits = codec.DecodeLimits(max_elements=4, max_depth=2, max_items=5)
    with pytest.raises(codec.LimitError, match="--max-elements"):
        codec.decode_tensor(codec.encode_tensor(torch.zeros(5)), "t", limits)
    with pytest.raises(codec.LimitError, match="--max-depth"):
        codec.decode_value(codec.encode_value([[[[1]]]]), "v", limits)
    with pytest.raises(codec.LimitError, match="--max-items"):
        codec.decode_value(codec.encode_value([1, 2, 3, 4, 5, 6]), "v", limits)


def test_duplicate_keys_and_empty_values_are_refused():
    msg = pb.ValueMap()
    for _ in range(2):
        entry = msg.entries.add(key="weight")
        entry.value.int_value = 1
    with pytest.raises(codec.DecodeError, match="duplicate key 'weight'"):
        codec.decode_map(msg, "params")
    with pytest.raises(codec.DecodeError, match="empty Value"):
        codec.decode_value(pb.Value(), "args[0]")
