"""The bulk data plane at bulk sizes: tensors of every dtype through the chunked framing and the
huge-page assembly buffer, large calls equal to local torch, and the buffer freed with its views."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from lossd.client import RemoteLoss
from lossd.client._proto import lossd_pb2 as pb
from lossd.client.wire import codec, framing
from lossd.client.wire.assembler import HUGE_PAGES_MIN_BYTES, Assembler, empty_bytes
from lossd.server.engine import Engine
from lossd.server.service import LossServicer
from tests.support.wirekit import ALL_DTYPES, in_process

LIMIT = 64 << 20


def _random(dtype: torch.dtype, numel: int, seed: int) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaNs and infinities included for floats)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, (numel,), generator=g).bool()
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * size,), dtype=torch.uint8, generator=g)
    return raw.view(dtype)


def test_every_dtype_round_trips_bitwise_through_frames_and_a_huge_page_buffer() -> None:
    originals = {
        f"args[{i}]": _random(dtype, (HUGE_PAGES_MIN_BYTES // 8) + 13 * i + 1, i).reshape(-1, 1)
        for i, dtype in enumerate(ALL_DTYPES)
    }
    outboard = codec.Outboard(0)
    messages = {
        path: codec.encode_tensor(t, outboard=outboard, path=path) for path, t in originals.items()
    }
    assert [path for path, _ in outboard.tensors] == list(originals)
    assembler = Assembler(framing.refs(outboard.tensors), max_bytes=LIMIT)
    assert assembler.buffer.numel() >= HUGE_PAGES_MIN_BYTES  # the mapped buffer, not torch.empty
    parse = framing.chunk_parser(pb.ComputeChunkedRequest.FromString)
    for frame in framing.iter_frames(outboard.tensors, framing.DEFAULT_CHUNK_BYTES):
        assembler.feed(parse(frame))
    assert assembler.complete
    received = assembler.tensors()
    del assembler
    gc.collect()  # the views keep the mapping alive on their own
    for path, original in originals.items():
        got = codec.decode_tensor(messages[path], path, data=received[path])
        assert got.dtype == original.dtype and got.shape == original.shape
        assert got.data_ptr() % framing.ALIGN == 0
        # Compared as bytes: NaN payloads and signed zeros must survive too.
        assert torch.equal(got.view(torch.uint8), original.view(torch.uint8)), path


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_large_buffer_is_given_back_when_its_last_view_goes() -> None:
    size = 64 << 20
    before = _rss_bytes()
    buffer = empty_bytes(size)
    view = buffer[size // 2 :]
    del buffer
    buffer_alive = _rss_bytes()
    view.fill_(7)  # writable, and touched: now resident
    assert _rss_bytes() - buffer_alive >= size // 2 - (4 << 20)
    assert int(view[-1]) == 7
    del view
    gc.collect()
    assert _rss_bytes() - before < 8 << 20  # unmapped, not kept in an arena


@pytest.fixture(scope="module")
def endpoint():
    servicer = LossServicer(Engine("cpu"), codec.DecodeLimits(), max_chunked_bytes=LIMIT)
    with in_process(servicer, LIMIT) as address:
        yield address


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_bulk_call_equals_local_torch_bitwise(endpoint: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(21)
    n = (12 << 20) // (2 * torch.empty(0, dtype=dtype).element_size())  # 12 MB up, 6 MB back
    pred = torch.randn(n, generator=g).to(dtype)
    target = torch.randn(n, generator=g).to(dtype)
    local = pred.clone().requires_grad_()
    expected = torch.nn.functional.mse_loss(local, target)
    expected.backward()
    with RemoteLoss("mse", endpoint=endpoint, transport="chunked", timeout=120) as module:
        leaf = pred.clone().requires_grad_()
        value = module(leaf, target)
        value.backward()
    assert value.dtype == dtype and torch.equal(value.detach(), expected.detach())
    assert leaf.grad.dtype == dtype and torch.equal(leaf.grad, local.grad)
