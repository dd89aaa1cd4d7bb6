"""Cross-host bulk rows (``python -m bench --bulk``): large tensors over loopback TCP.

Each row moves a ``mse`` call of ``size`` bytes (prediction and target, float32) up and the
prediction's gradient (half as many bytes) back. Columns, measured interleaved call by call as
the main table's (bench/measure.py):

- ``grpc_echo``: a bare gRPC bidi stream of exactly lossd's chunked framing: a header, then data
  frames of ``chunk_bytes``, assembled on the server into one buffer by lossd's ``Assembler``, and
  the answer's bytes back the same way. No decode, no compute: the floor of lossd's data plane.
- ``flight_echo`` (when pyarrow is installed): Apache Arrow Flight ``DoExchange`` of the same
  bytes as uint8 record batches of 4 MiB each way (Flight's C++ data plane), assembled on both
  sides into one buffer as lossd would need them.
- ``local``: the server's engine in this process (``mse`` forward + ``autograd.grad``).
- ``lossd``: ``RemoteLoss('mse', transport='chunked')`` forward + backward, end to end, its
  tensors in gRPC data frames (the server's bulk port turned off on this client).
- ``lossd_bulk``: the same call to the same server (``lossd serve --bulk-port 0``), its tensors'
  bytes on the bulk data connection (client/bulk.py, server/bulk.py).

CPU is milliseconds per call of this process (the client, all its threads) and of the server
process of the column (read from /proc around each call). MB/s is (request + gradient bytes) / p50, MB = 2**20 bytes as everywhere in the bench. ``moves`` is the same bytes over a lossd column's
time less the server's own compute (``timings.compute_ns`` of each answer): what its transport
moves.

``python -m bench.bulk --port 0 [--flight-port N]`` runs the echo servers on their own.
"""

from __future__ import annotations

import argparse
import functools
import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from lossd.client._proto import lossd_pb2 as pb
from lossd.client.wire.assembler import Assembler
from lossd.client.wire.framing import DEFAULT_CHUNK_BYTES, chunk_parser, iter_frames, refs

from .measure import MB, stats
from .report import size_text
from .servers import ROOT, START_TIMEOUT_S, lossd_server, network_path

QUICK_SIZES = [16 * MB, 64 * MB]
FULL_SIZES = [16 * MB, 64 * MB, 256 * MB]
ECHO = "/bench.Bulk/Echo"
FLIGHT_BATCH = 4 * MB
TARGET_MBPS = 1000  # issue 14: 64 MB and larger move >= 1 GB/s of request + gradient bytes
TARGET_FROM = 64 * MB
LOSSD_CELLS = ("lossd", "lossd_bulk")


def _options(limit: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


# --------------------------------------------------------------------------------------------
# The echo servers (a child process)


def _header(listed: list[pb.ChunkedTensor]) -> bytes:
    return pb.ComputeChunkedResponse(
        header=pb.ChunkedResponseHeader(tensors=listed)
    ).SerializeToString()


def _grpc_echo(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[bytes]:
    header = next(requests)
    assembler = Assembler(header.header.tensors, 1 << 40)
    while not assembler.complete:
        assembler.feed(next(requests))
    down = int(dict(context.invocation_metadata())["x-response-bytes"])
    answer = [("grad", assembler.buffer[:down])]
    yield _header(refs(answer))
    yield from iter_frames(answer, DEFAULT_CHUNK_BYTES)


def _flight_server(port: int) -> Any:
    import pyarrow as pa
    import pyarrow.flight as flight

    class Echo(flight.FlightServerBase):
        def do_exchange(self, context: Any, descriptor: Any, reader: Any, writer: Any) -> None:
            up, down = json.loads(descriptor.command)
            buffer = _gather((chunk.data.column(0) for chunk in reader), up)
            _send_batches(writer, pa.py_buffer(buffer[:down]), down)

    return Echo(f"grpc://127.0.0.1:{port}")


def _gather(columns: Iterator[Any], size: int) -> np.ndarray:
    """The bytes of uint8 arrays, copied into one buffer (what an assembled request needs)."""
    buffer = np.empty(size, np.uint8)
    pos = 0
    for column in columns:
        data = np.frombuffer(column.buffers()[1], np.uint8, count=len(column), offset=column.offset)
        buffer[pos : pos + len(data)] = data
        pos += len(data)
    if pos != size:
        raise ValueError(f"expected {size} bytes, got {pos}")
    return buffer


def _send_batches(writer: Any, buffer: Any, size: int) -> None:
    import pyarrow as pa

    array = pa.Array.from_buffers(pa.uint8(), size, [None, buffer])
    writer.begin(pa.schema([("b", pa.uint8())]))
    for start in range(0, size, FLIGHT_BATCH):
        writer.write_batch(pa.record_batch([array.slice(start, FLIGHT_BATCH)], names=["b"]))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bulk")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--flight-port", type=int, default=0, help="0: no Flight server")
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=_options(1 << 30))
    parse = chunk_parser(pb.ComputeChunkedRequest.FromString)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Bulk",
                {"Echo": grpc.stream_stream_rpc_method_handler(_grpc_echo, parse)},
            ),
        )
    )
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    if args.flight_port:
        flight = _flight_server(args.flight_port)
        threading.Thread(target=flight.serve, daemon=True).start()
    print(f"bulk listening on 127.0.0.1:{port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(0).wait()
    return 0


# --------------------------------------------------------------------------------------------
# The bench side


class _Clients:
    def __init__(self, address: str, flight_port: int) -> None:
        self.channel = grpc.insecure_channel(address, options=_options(1 << 30))
        self._echo = self.channel.stream_stream(
            ECHO, request_serializer=None, response_deserializer=chunk_parser(lambda data: data)
        )
        self.flight = None
        if flight_port:
            import pyarrow.flight as flight

            self.flight = flight.connect(f"grpc://127.0.0.1:{flight_port}")

    def grpc_echo(self, flat: torch.Tensor, down: int) -> int:
        tensors = [("data", flat)]
        header = pb.ComputeChunkedRequest(
            header=pb.ChunkedRequestHeader(tensors=refs(tensors))
        ).SerializeToString()

        def messages() -> Iterator[bytes]:
            yield header
            yield from iter_frames(tensors, DEFAULT_CHUNK_BYTES)

        answers = self._echo(messages(), metadata=(("x-response-bytes", str(down)),))
        first = pb.ComputeChunkedResponse.FromString(next(answers))
        assembler = Assembler(first.header.tensors, 1 << 40)
        for chunk in answers:
            assembler.feed(chunk)
        return assembler.received

    def flight_echo(self, flat: torch.Tensor, down: int) -> int:
        import pyarrow as pa
        import pyarrow.flight as flight

        up = flat.numel()
        descriptor = flight.FlightDescriptor.for_command(json.dumps([up, down]))
        writer, reader = self.flight.do_exchange(descriptor)
        _send_batches(writer, pa.py_buffer(flat.numpy()), up)
        writer.done_writing()
        got = _gather(iter(reader.read_all().column(0).chunks), down)
        writer.close()
        return len(got)

    def close(self) -> None:
        self.channel.close()
        if self.flight is not None:
            self.flight.close()


def _flight_available() -> bool:
    try:
        import pyarrow.flight  # noqa: F401
    except ImportError:
        return False
    return True


def bulk(opts: argparse.Namespace, workdir: Path, sizes: list[int]) -> dict[str, Any]:
    from tests.support.serverproc import ChildProcess, free_port

    flight_port = free_port() if _flight_available() else 0
    argv = ["-m", "bench.bulk", "--port", "0", "--flight-port", str(flight_port)]
    import sys

    echo_proc = ChildProcess(
        [sys.executable, *argv], "bulk listening on ", timeout=START_TIMEOUT_S, cwd=ROOT
    ).start()
    lossd_proc = lossd_server(opts, workdir)
    lossd_proc.argv = [*lossd_proc.argv, "--bulk-port", "0"]
    lossd_proc.start()
    rows = []
    try:
        clients = _Clients(echo_proc.address, flight_port)
        if flight_port:
            _wait_flight(clients)
        for size in sizes:
            row = _row(size, clients, lossd_proc.address, opts, echo_proc.pid, lossd_proc.pid)
            rows.append(row)
            print(
                f"bulk {size_text(size):>7}  "
                + "  ".join(
                    f"{name} {row[name]['p50'] * 1e3:.0f} ms"
                    for name in ("grpc_echo", "flight_echo", "local", *LOSSD_CELLS)
                    if "p50" in row.get(name, {})
                ),
                flush=True,
            )
        clients.close()
    finally:
        echo_proc.stop()
        lossd_proc.stop()
    return {"rows": rows, "flight": bool(flight_port)}


def _wait_flight(clients: _Clients) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            clients.flight_echo(torch.zeros(8, dtype=torch.uint8), 8)
            return
        except Exception:  # noqa: BLE001 - not listening yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _row(
    size: int,
    clients: _Clients,
    address: str,
    opts: argparse.Namespace,
    echo_pid: int,
    lossd_pid: int,
) -> dict[str, Any]:
    from lossd.client import RemoteLoss
    from tests.support.serverproc import cpu_seconds

    n = size // 8
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(n, generator=gen).requires_grad_()
    target = torch.randn(n, generator=gen)
    flat = torch.cat([pred.detach().view(torch.uint8), target.view(torch.uint8)])
    up, down = 8 * n, 4 * n
    modules = {
        name: RemoteLoss(
            "mse",
            endpoint=address,
            transport="chunked",
            max_message_mb=opts.max_message_mb,
            **network_path(),
        )
        for name in LOSSD_CELLS
    }
    modules["lossd"].transport.plane.off()  # data frames
    compute_ns: dict[str, list[int]] = {name: [] for name in modules}

    def local() -> None:
        p = pred.detach().requires_grad_()
        torch.autograd.grad(torch.nn.functional.mse_loss(p, target), [p])

    def remote(name: str) -> None:
        pred.grad = None
        modules[name](pred, target).backward()
        compute_ns[name].append(modules[name].last_result.timings_ns["compute"])

    cells: dict[str, Any] = {"grpc_echo": lambda: clients.grpc_echo(flat, down), "local": local}
    if clients.flight is not None:
        cells["flight_echo"] = lambda: clients.flight_echo(flat, down)
    for name in modules:
        cells[name] = functools.partial(remote, name)
    times: dict[str, list[float]] = {name: [] for name in cells}
    cpu = {name: [0.0, 0.0] for name in cells}  # client, server seconds over the rounds
    server_pid = {"local": None, "lossd": lossd_pid, "lossd_bulk": lossd_pid}
    rounds = 3 if size >= 256 * MB else 5 if opts.quick else 9
    try:
        for fn in cells.values():
            fn()  # warm-up (lossd_bulk's first call learns the port)
        for values in compute_ns.values():
            values.clear()
        for _ in range(rounds):
            for name, fn in cells.items():
                pid = server_pid.get(name, echo_pid)
                c0, s0 = time.process_time(), cpu_seconds(pid) if pid else 0.0
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name][0] += time.process_time() - c0
                cpu[name][1] += cpu_seconds(pid) - s0 if pid else 0.0
    finally:
        for module in modules.values():
            module.close()
    row: dict[str, Any] = {"size": size, "request_bytes": up, "grad_bytes": down}
    for name, values in times.items():
        row[name] = stats(values)
        row[name]["cpu_client"], row[name]["cpu_server"] = (c / rounds for c in cpu[name])
    for name in modules:
        moves = [t - ns / 1e9 for t, ns in zip(times[name], compute_ns[name])]
        row[f"{name}_moves"] = stats(moves)
    return row


def mbps(row: dict[str, Any], cell: str) -> float:
    return (row["request_bytes"] + row["grad_bytes"]) / row[cell]["p50"] / MB


def render(result: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The Markdown table and the targets it shows."""
    timed = ["grpc_echo", "flight_echo", "lossd", "lossd_bulk"]
    cols = ["payload", "up + back MB", "local p50", *(f"{c} p50 (MB/s)" for c in timed),
            "lossd moves MB/s", "lossd_bulk moves MB/s",
            *(f"CPU ms client / server: {c}" for c in timed)]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    found = []

    def cell(row: dict[str, Any], name: str) -> str:
        if "p50" not in row.get(name, {}):
            return "–"
        return f"{row[name]['p50'] * 1e3:.0f} ({mbps(row, name):,.0f})"

    def cpu(row: dict[str, Any], name: str) -> str:
        if "cpu_client" not in row.get(name, {}):
            return "–"
        return f"{row[name]['cpu_client'] * 1e3:.0f} / {row[name]['cpu_server'] * 1e3:.0f}"

    for row in result["rows"]:
        moved = (row["request_bytes"] + row["grad_bytes"]) / MB
        values = [size_text(row["size"]), f"{moved:.0f}", f"{row['local']['p50'] * 1e3:.0f}",
                  *(cell(row, c) for c in timed),
                  *(f"{mbps(row, f'{c}_moves'):,.0f}" for c in LOSSD_CELLS),
                  *(cpu(row, c) for c in timed)]  # fmt: skip
        lines.append("| " + " | ".join(values) + " |")
        if row["size"] >= TARGET_FROM:
            best = max(LOSSD_CELLS, key=lambda c: mbps(row, f"{c}_moves"))
            found.append(
                {
                    "target": f"mse {size_text(row['size'])} over TCP: lossd moves >= {TARGET_MBPS} MB/s "
                    f"of request + gradient (time less server compute; {best})",
                    "value": mbps(row, f"{best}_moves"),
                    "met": mbps(row, f"{best}_moves") >= TARGET_MBPS,
                    "group": "network path",
                }
            )
    return "\n".join(lines), found


if __name__ == "__main__":
    raise SystemExit(main())
