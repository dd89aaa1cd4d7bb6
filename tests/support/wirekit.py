"""What the wire and transport tests share: every dtype the wire carries, and a bare in-process
server of a servicer."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
import torch

from lossd.server.app import channel_options
from lossd.server.service import LossServicer, method_handlers

# Every dtype a Tensor message can carry (lossd.proto's DataType).
ALL_DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
]


@contextmanager
def in_process(servicer: LossServicer, limit: int) -> Iterator[str]:
    """``servicer`` behind a plain gRPC server in this process (no interceptors, no settings),
    ``limit`` bytes its message limit both ways; yields its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=channel_options(limit))
    server.add_generic_rpc_handlers((method_handlers(servicer),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)
