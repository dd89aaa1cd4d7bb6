"""A grpc.aio (asyncio) server for the concurrency comparison: ``python -m bench.aio_server``.

``--kind floor`` serves the same trivial ``bench.Floor/Echo`` as ``bench.floor``; ``--kind lossd``
serves ``lossd.v1.LossService/Compute`` through the very ``LossServicer.compute`` that the
threaded server runs (decode, engine, encode, the metrics hook), awaited from a coroutine on the
loop's default executor. It is a measurement prototype, not a server to deploy: no auth, no health, no
interceptors, happy path only. Prints ``aio listening on HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
from google.protobuf.wrappers_pb2 import BytesValue


async def serve(kind: str, host: str, port: int, max_message_mb: int, device: str) -> None:
    limit = max_message_mb << 20
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ]
    )
    if kind == "floor":
        from . import floor

        async def echo(request: BytesValue, context: grpc.aio.ServicerContext) -> bytes:
            return floor._response(context)

        handler = grpc.method_handlers_generic_handler(
            floor.SERVICE,
            {
                "Echo": grpc.unary_unary_rpc_method_handler(
                    echo, request_deserializer=BytesValue.FromString
                )
            },
        )
    else:
        from lossd.client._proto import lossd_pb2 as pb
        from lossd.server.config import ServerConfig
        from lossd.server.engine import Engine
        from lossd.server.metrics import Metrics
        from lossd.server.service import SERVICE_NAME, LossServicer

        engine = Engine(device)
        metrics = Metrics(device=str(engine.device))
        servicer = LossServicer(
            engine, ServerConfig().limits, after_compute=[metrics.after_compute]
        )

        async def compute(
            request: pb.ComputeRequest, context: grpc.aio.ServicerContext
        ) -> pb.ComputeResponse:
            # CPU-bound: off the event loop, on the loop's executor (the usual asyncio pattern; run
            # inline on the loop's main thread, torch's OpenMP regions were 10x slower under load).
            return await asyncio.get_running_loop().run_in_executor(None, servicer.compute, request)

        async def describe(
            request: pb.DescribeLossRequest, context: grpc.aio.ServicerContext
        ) -> pb.DescribeLossResponse:
            return servicer.DescribeLoss(request, context)

        handler = grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Compute": grpc.unary_unary_rpc_method_handler(
                    compute,
                    request_deserializer=pb.ComputeRequest.FromString,
                    response_serializer=pb.ComputeResponse.SerializeToString,
                ),
                "DescribeLoss": grpc.unary_unary_rpc_method_handler(
                    describe,
                    request_deserializer=pb.DescribeLossRequest.FromString,
                    response_serializer=pb.DescribeLossResponse.SerializeToString,
                ),
            },
        )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"aio listening on {host}:{bound}", flush=True)
    await server.wait_for_termination()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aio_server")
    parser.add_argument("--kind", choices=("floor", "lossd"), required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-message-mb", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    asyncio.run(serve(args.kind, args.host, args.port, args.max_message_mb, args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
