"""The gRPC servicer: decode, compute, encode. Errors map to status codes here and only here."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError as ProtobufDecodeError

from lossd.client._proto import lossd_pb2 as pb
from lossd.client._proto import lossd_pb2_grpc as pb_grpc
from lossd.client.wire import codec

from . import bulk, chunked, prepared, registry, shm
from .budget import (
    MemoryBudget,
    RawRequest,
    Reservation,
    decoded_estimate,
    prescan,
    scan_budget,
    tensor_bytes,
    working_set,
)
from .engine import Engine, Evaluation
from .errors import (
    Cancelled,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ServiceError,
    abort,
    clip,
    to_service_error,
)
from .limits import caller_gone
from .messages import ComputeCall, decode_compute, encode_compute, loss_info
from .version import __version__
from .watchdog import Watchdog

log = logging.getLogger("lossd.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LossService"].full_name


class Malformed:
    """Stands in for a request whose bytes are not a valid protobuf message (``error``: or one
    the pre-scan refused before parsing it)."""

    def __init__(self, type_name: str, reason: str, error: ServiceError | None = None) -> None:
        self.type_name = type_name
        self.reason = reason
        self.error = error


def safe_parser(
    message_type: type, limits: codec.DecodeLimits | None = None
) -> Callable[[bytes], Any]:
    """A request deserializer that turns malformed bytes into INVALID_ARGUMENT, not INTERNAL.
    With ``limits``, a message holding more values or deeper nesting than they allow is refused
    by a pre-scan of its wire format, before the parse (budget.prescan)."""
    name = message_type.DESCRIPTOR.full_name
    descriptor = message_type.DESCRIPTOR
    # Every value the pre-scan counts holds two bytes of its own (a tag and a length or value
    # byte), so a message under twice its budget cannot exceed it; the pre-scan's other refusals
    # (broken wire format, nesting past 100) are messages protobuf's parser refuses too. Such a
    # message is parsed first and scanned only when the parse fails, for the scan's reason.
    scan_first = 2 * scan_budget(limits) if limits is not None else 0

    def parse(data: bytes) -> Any:
        try:
            if limits is not None and len(data) > scan_first:
                prescan(data, descriptor, limits)
            try:
                return message_type.FromString(data)
            except (ProtobufDecodeError, RuntimeError, ValueError):
                if limits is not None:
                    prescan(data, descriptor, limits)
                raise
        except codec.LimitError as exc:  # the pre-scan's refusal: too many values
            return Malformed(name, exc.message, to_service_error(exc))
        except InvalidArgument as exc:  # the pre-scan found broken wire format
            return Malformed(name, exc.message)
        except (ProtobufDecodeError, RuntimeError, ValueError) as exc:
            return Malformed(name, str(exc) or type(exc).__name__)

    return parse


def unary_handler(
    method: Callable[..., Any], request: type, response: type, *, stream: bool = False
) -> grpc.RpcMethodHandler:
    """A unary-request handler for ``method``, its request parsed by :func:`safe_parser`."""
    make = grpc.unary_stream_rpc_method_handler if stream else grpc.unary_unary_rpc_method_handler
    return make(
        method,
        request_deserializer=safe_parser(request),
        response_serializer=response.SerializeToString,
    )


def _check_parsed(request: Any) -> None:
    if isinstance(request, Malformed):
        if request.error is not None:
            raise request.error
        raise InvalidArgument(f"request is not a valid {request.type_name}: {request.reason}")


def _fail(context: grpc.ServicerContext, exc: Exception, method: str) -> None:
    """End the RPC for ``exc``: every failure becomes a status, never a crash."""
    if _is_abort(exc):
        raise exc
    error = to_service_error(exc)
    if type(error) is ServiceError:  # (an Internal error was logged where it was raised)
        log.error("internal error in %s", method, exc_info=exc)
    else:
        log.info("%s refused: %s %s", method, error.code.name, clip(str(error)))
    abort(context, error)


def handles_errors(method: Callable) -> Callable:
    """Unary-response methods: malformed requests and raised errors become statuses."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext, *rest: Any) -> Any:
        try:
            _check_parsed(request)
            return method(self, request, context, *rest)
        except Exception as exc:  # noqa: BLE001 - mapped to a status by _fail
            _fail(context, exc, method.__name__)

    return wrapper


def handles_stream_errors(method: Callable) -> Callable:
    """``handles_errors`` for server-streaming methods (errors raised while iterating)."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            _check_parsed(request)
            yield from method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status by _fail
            _fail(context, exc, method.__name__)

    return wrapper


def _is_abort(exc: Exception) -> bool:
    # context.abort raises a bare Exception subclass private to grpc; let it through untouched.
    return type(exc).__module__.startswith("grpc")


@dataclass
class ComputeEvent:
    """One finished evaluation, handed to every ``after_compute`` hook (audit, metrics)."""

    call: ComputeCall
    result: Evaluation
    response: pb.ComputeResponse
    request_bytes: int
    context: grpc.ServicerContext | None


class LossServicer(pb_grpc.LossServiceServicer):
    """Thin adapter between the wire and the engine.

    ``after_compute`` hooks run after each successful evaluation, before the response is sent;
    they may annotate the response (the audit recorder sets ``audited``).
    """

    def __init__(
        self,
        engine: Engine,
        limits: codec.DecodeLimits,
        after_compute: Sequence[Callable[[ComputeEvent], None]] = (),
        *,
        max_chunked_bytes: int = 256 << 20,
        chunk_bytes: int = 1 << 20,
        chunk_outboard_bytes: int = 64 << 10,
        max_evaluations: int = 0,
        budget: MemoryBudget | None = None,
        stream_idle_timeout_s: float = 30.0,
        stream_send_timeout_s: float = 60.0,
        shm_mode: str = "loopback",
        shm_max_bytes: int = 1 << 30,
        bulk_listener: bulk.BulkListener | None = None,
        max_plans: int = prepared.MAX_PLANS,
    ) -> None:
        self.bulk = bulk_listener  # --bulk-port: chunked calls' bytes on a plain TCP connection
        self.shm_mode = shm_mode  # --shm: which connections may hand over shared memory
        self.shm_max_bytes = shm_max_bytes  # --shm-max-mb: the largest region accepted
        self.watchdog = Watchdog()
        self.computing = 0  # evaluations in progress (the drain waits for them)
        self._idle_waiters = 0  # drains waiting for computing == 0: only they need a notify
        self._busy_lock = threading.Condition()
        self.stream_idle_timeout_s = stream_idle_timeout_s  # header -> data, between frames
        self.stream_send_timeout_s = stream_send_timeout_s  # an answer left unread
        self.engine = engine
        self.budget = budget  # --memory-budget-mb: every request reserves before it allocates
        self.limits = limits
        self.after_compute = list(after_compute)
        self.max_chunked_bytes = max_chunked_bytes  # all tensor bytes of one ComputeChunked request
        self.chunk_bytes = chunk_bytes  # size of the response's data chunks
        self.chunk_outboard_bytes = chunk_outboard_bytes  # response tensors this large go in chunks
        # At most this many evaluations at once (0: no bound); RPCs waiting on a stream hold no slot.
        self._slots = threading.BoundedSemaphore(max_evaluations) if max_evaluations > 0 else None
        self._compute_parser = safe_parser(pb.ComputeRequest, limits)  # built once, not per call
        # Repeated unary layouts skip the parse and the decode's structural checks; only requests
        # the parser would not pre-scan (server/prepared.py).
        self.plans = (
            prepared.RequestPlans(limits, min(1 << 20, 2 * scan_budget(limits)), max_plans)
            if max_plans > 0
            else None
        )

    def compute(
        self,
        request: pb.ComputeRequest,
        context: grpc.ServicerContext | None = None,
        *,
        external: dict[str, Any] | None = None,
        outboard: codec.Outboard | None = None,
        held: Reservation | None = None,
        after_forward: Callable[[], None] | None = None,
        planned: prepared.Planned | None = None,
    ) -> pb.ComputeResponse:
        """Every transport ends here. ``external``/``outboard``: the chunked transport's tensors
        that travel outside the request/response message (see server/chunked.py). ``held``: the
        memory reserved for decoding this request, when the transport reserved it already.
        ``after_forward``: called between the loss and its gradients (Engine.evaluate).
        ``planned``: the call a prepared plan decoded (``request`` is then None)."""
        with self._busy_lock:
            self.computing += 1
        try:
            if planned is not None:
                return self._compute(planned, context, None, outboard, held, after_forward)
            return self._reserved_compute(request, context, external, outboard, held, after_forward)
        finally:
            with self._busy_lock:
                self.computing -= 1
                if self._idle_waiters and not self.computing:
                    self._busy_lock.notify_all()

    @contextlib.contextmanager
    def bounded(
        self, loss: str, params: Any, args: Any, kwargs: Any, context: Any = None
    ) -> Iterator[None]:
        """A worker slot and the memory of one evaluation that does not come through Compute
        (VerifyRun's recomputations): the same --workers and --memory-budget-mb bound both."""
        with contextlib.ExitStack() as stack:
            if self.budget is not None:
                need = tensor_bytes((params, args, kwargs)) + working_set(
                    loss, args, kwargs, params
                )
                stack.enter_context(self.budget.held(need, context, f"recomputing {loss}"))
            if self._slots is not None:
                stack.enter_context(self._slots)
            yield

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` until no evaluation is running (a drain); True when none is."""
        with self._busy_lock:
            self._idle_waiters += 1
            try:
                return self._busy_lock.wait_for(
                    lambda: self.computing == 0, timeout=max(timeout, 0)
                )
            finally:
                self._idle_waiters -= 1

    def _reserved_compute(
        self,
        request: pb.ComputeRequest,
        context: grpc.ServicerContext | None,
        external: dict[str, Any] | None,
        outboard: codec.Outboard | None,
        held: Reservation | None,
        after_forward: Callable[[], None] | None,
    ) -> pb.ComputeResponse:
        if self.budget is None:
            return self._compute(request, context, external, outboard, None, after_forward)
        if held is not None:
            return self._compute(request, context, external, outboard, held, after_forward)
        with self.budget.held(
            decoded_estimate(request.ByteSize()), context, "decoding the request"
        ) as reservation:
            return self._compute(request, context, external, outboard, reservation, after_forward)

    def _compute(
        self,
        request: pb.ComputeRequest | prepared.Planned,
        context: grpc.ServicerContext | None,
        external: dict[str, Any] | None,
        outboard: codec.Outboard | None,
        reservation: Reservation | None,
        after_forward: Callable[[], None] | None,
    ) -> pb.ComputeResponse:
        t0 = time.perf_counter_ns()
        if type(request) is prepared.Planned:
            call = request.call
            t0 -= request.decode_ns
        else:
            call = decode_compute(request, self.limits, external)
        t1 = time.perf_counter_ns()
        if self.budget is not None and reservation is not None:
            # The evaluation's working set, estimated from the decoded shapes, before it runs.
            need = working_set(call.loss, call.args, call.kwargs, call.params)
            what = f"evaluating {call.loss}"
            if not self.budget.try_grow(reservation, need, what):
                self.budget.regrow(reservation, reservation.nbytes + need, context, what)
        if self._slots is None:
            result = self._evaluate(call, after_forward)
        else:
            with self._slots:
                gone = caller_gone(
                    context, "a worker was free to compute it"
                )  # waited past its deadline
                if gone is not None:
                    raise gone
                result = self._evaluate(call, after_forward)
        t2 = time.perf_counter_ns()
        response = encode_compute(result, call.request_id, __version__, outboard)
        t3 = time.perf_counter_ns()
        response.timings.decode_ns = t1 - t0
        response.timings.compute_ns = t2 - t1
        response.timings.encode_ns = t3 - t2
        if self.after_compute:
            size = request.size if type(request) is prepared.Planned else request.ByteSize()
            if external:
                size += sum(t.numel() for t in external.values())
            event = ComputeEvent(call, result, response, size, context)
            for hook in self.after_compute:
                hook(event)
        return response

    def _evaluate(
        self, call: ComputeCall, after_forward: Callable[[], None] | None = None
    ) -> Evaluation:
        """The engine's evaluation; an exception that is no deliberate refusal is lossd's bug."""
        try:
            return self.engine.evaluate(
                call.loss,
                call.params,
                call.args,
                call.kwargs,
                call.grad_paths,
                call.grad_output,
                autocast=call.autocast,
                grad_output_batched=call.grad_output_batched,
                grad_grads=call.grad_grads,
                after_forward=after_forward,
                memo=call.memo,
            )
        except (ServiceError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: logged here, answered INTERNAL
            log.error(
                "internal error evaluating %s (request id %s)",
                call.loss,
                call.request_id,
                exc_info=exc,
            )
            raise Internal(
                f"internal error in lossd evaluating {call.loss} (request id {call.request_id}); "
                "the server log has the traceback under that request id"
            ) from None

    @handles_errors
    def Compute(
        self, request: pb.ComputeRequest | RawRequest, context: grpc.ServicerContext
    ) -> pb.ComputeResponse:
        if not isinstance(request, RawRequest):
            return self.compute(request, context)
        # Parsed only once its decoded bytes are reserved: nothing decodes before its reservation.
        if self.budget is None:
            return self._compute_bytes(request.data, context, None)
        with self.budget.held(
            decoded_estimate(len(request.data)), context, "decoding the request"
        ) as reservation:
            return self._compute_bytes(request.data, context, reservation)

    def _compute_bytes(
        self, data: bytes, context: grpc.ServicerContext, held: Reservation | None
    ) -> pb.ComputeResponse:
        plans = self.plans
        if plans is None:
            return self.compute(self._parse_compute(data), context, held=held)
        planned = plans.decode(data)
        if planned is not None:
            return self.compute(None, context, held=held, planned=planned)
        request = self._parse_compute(data)
        response = self.compute(request, context, held=held)
        try:
            plans.learn(data, request)
        except Exception as exc:  # noqa: BLE001 - a bug in learning: this call's answer stands
            log.error("internal error learning a prepared plan", exc_info=exc)
        return response

    def _parse_compute(self, data: bytes) -> pb.ComputeRequest:
        parsed = self._compute_parser(data)
        _check_parsed(parsed)
        return parsed

    def ComputeChunked(
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        watch = self.watchdog.watch(context)
        with contextlib.ExitStack() as hold:  # the memory reserved, until the answer is sent
            response, outboard, regions, conn = self._chunked_one(
                self._timed(request_iterator, watch), context, hold
            )
            frames = conn is None
            metadata = []
            if regions is not None:  # the caller's shared memory: its answer goes there if it fits
                frames = not regions.write(outboard.tensors)
                metadata.append((shm.ACCEPTED_KEY, "in" if frames else "in,out"))
            if conn is not None:  # the caller's bulk data connection: the answer's bytes too
                metadata.append((bulk.ACCEPTED_KEY, "1"))
            elif self.bulk is not None:
                metadata.append((bulk.PORT_KEY, str(self.bulk.port)))
            if metadata:
                context.send_initial_metadata(tuple(metadata))
            for message in chunked.answer(response, outboard, self.chunk_bytes, frames=frames):
                # gRPC resumes this generator once the message is sent: a caller that does not
                # read its answer is cut off after --stream-send-timeout-s.
                with watch.waiting(
                    self.stream_send_timeout_s,
                    f"the caller read no answer for {self.stream_send_timeout_s:g} s (--stream-send-timeout-s)",
                ):
                    yield message
            if conn is not None:  # after the header, which lists these bytes
                conn.settimeout(self.stream_send_timeout_s or None)
                try:
                    sent = bulk.send_tensors(conn, outboard.tensors)
                except OSError as exc:
                    _fail(context, Cancelled(f"bulk: sending the answer failed: {exc}"), "bulk")
                bulk.moved(context, sent=sent)

    def _timed(self, requests: Iterator[Any], watch: Any) -> Iterator[Any]:
        """``requests``, each one awaited at most --stream-idle-timeout-s (the header, then each
        data frame): a stalled caller holds no slot, thread or memory past that."""
        seconds = self.stream_idle_timeout_s
        first = True
        while True:
            what = "the header" if first else "the next data frame"
            why = f"no progress: {what} did not come within {seconds:g} s (--stream-idle-timeout-s)"
            try:
                with watch.waiting(seconds, why):
                    message = next(requests, None)
            except grpc.RpcError:
                if watch.expired:
                    raise Cancelled(f"the server cancelled the stream: {watch.expired}") from None
                raise
            if message is None:
                return
            first = False
            yield message

    @handles_errors
    def _chunked_one(
        self,
        request_iterator: Iterator[Any],
        context: grpc.ServicerContext,
        hold: contextlib.ExitStack,
    ) -> tuple[pb.ComputeResponse, codec.Outboard, shm.Regions | None, Any]:
        reservation: list[Reservation] = []
        regions: list[shm.Regions] = []
        conns: list[Any] = []
        handle = shm.handle_of(context)
        named = bulk.ticket_of(context)
        fill = None
        if named is not None:
            ticket, server_id = named
            if handle is not None:
                raise InvalidArgument(
                    "a call hands over shared memory or a bulk ticket, not both",
                    field=bulk.METADATA_KEY,
                )
            if self.bulk is None:
                raise FailedPrecondition(
                    "bulk: this server has no --bulk-port; send the data instead"
                )
            if server_id != self.bulk.server_id:
                raise FailedPrecondition(
                    "bulk: the data connection reached another server (replicas behind one "
                    "address?); send the data instead"
                )

            def fill(assembler: Any) -> None:
                # After the header was checked and its memory reserved: only now is data read.
                conn = self.bulk.claim(ticket, context.is_active)
                hold.callback(conn.close)
                conns.append(conn)
                conn.settimeout(self.stream_idle_timeout_s or None)
                try:
                    assembler.read_from(conn.recv_into)
                except OSError as exc:  # a stall past --stream-idle-timeout-s, or a reset
                    raise Cancelled(
                        f"bulk: the data connection failed after {assembler.received} of "
                        f"{assembler.total} bytes: {exc}"
                    ) from None
                bulk.moved(context, received=assembler.total)

        shared = None
        if handle is not None:
            refused = shm.refusal(self.shm_mode, context)
            if refused:
                raise FailedPrecondition(refused)

            def shared(header: pb.ChunkedRequestHeader) -> dict[str, Any]:
                region = shm.Regions(
                    handle, header.tensors, self.shm_max_bytes, self.max_chunked_bytes
                )
                inputs = region.inputs()  # views that keep IN mapped, whenever close() comes
                hold.callback(region.close)  # also when the call fails
                context.add_callback(region.close)  # and when its caller is gone mid-call
                regions.append(region)
                return inputs

        def reserve(header: pb.ChunkedRequestHeader, listed: int) -> None:
            # Before the buffer that assembles the data is allocated (and before any data is read).
            if self.budget is not None:
                size = decoded_estimate(header.ByteSize()) + listed
                reservation.append(
                    hold.enter_context(self.budget.held(size, context, "receiving the request"))
                )

        request, external = chunked.receive(
            request_iterator, self.max_chunked_bytes, reserve, shared, fill
        )
        outboard = codec.Outboard(self.chunk_outboard_bytes)  # large gradients go back in chunks
        held = reservation[0] if reservation else None
        released = regions[0].forward_done if regions else None
        response = self.compute(
            request,
            context,
            external=external,
            outboard=outboard,
            held=held,
            after_forward=released,
        )
        return response, outboard, (regions[0] if regions else None), (conns[0] if conns else None)

    @handles_errors
    def ListLosses(
        self, request: pb.ListLossesRequest, context: grpc.ServicerContext
    ) -> pb.ListLossesResponse:
        specs = registry.all_specs(request.family or None)
        return pb.ListLossesResponse(
            losses=[loss_info(s) for s in sorted(specs, key=lambda s: s.name)]
        )

    @handles_errors
    def DescribeLoss(
        self, request: pb.DescribeLossRequest, context: grpc.ServicerContext
    ) -> pb.DescribeLossResponse:
        return pb.DescribeLossResponse(loss=loss_info(registry.get(request.name, field="name")))


def method_handlers(servicer: LossServicer) -> grpc.GenericRpcHandler:
    """LossService's handlers, with deserializers that never fail (malformed → INVALID_ARGUMENT)."""
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Compute": grpc.unary_unary_rpc_method_handler(
                servicer.Compute,
                # The bytes as received: Compute parses them once their memory is reserved.
                request_deserializer=RawRequest,
                response_serializer=pb.ComputeResponse.SerializeToString,
            ),
            "ComputeChunked": chunked.method_handler(
                servicer, safe_parser(pb.ComputeChunkedRequest, servicer.limits)
            ),
            "ListLosses": unary_handler(
                servicer.ListLosses, pb.ListLossesRequest, pb.ListLossesResponse
            ),
            "DescribeLoss": unary_handler(
                servicer.DescribeLoss, pb.DescribeLossRequest, pb.DescribeLossResponse
            ),
        },
    )
