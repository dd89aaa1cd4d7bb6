"""The one error hierarchy of the server, each class carrying its gRPC status code.

Loss functions, validation and the engine raise these; ``to_service_error`` maps anything raised
while serving to one of them, and ``abort`` ends an RPC with its status, in exactly one place.
Anything else that escapes becomes INTERNAL, with the traceback logged on the server only.

``InvalidArgument`` is also a ``ValueError`` so that loss functions called directly from Python
raise what Python users expect.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from google.protobuf.any_pb2 import Any as AnyMessage
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from lossd.client.wire.limits import DecodeError, EncodeError, LimitError

# The Python exception classes upstream raises on inputs it refuses, which a refusal may name
# (``upstream=``): the client then raises a LossdError that is also that class.
UPSTREAM_EXCEPTIONS = (
    "ValueError",
    "TypeError",
    "IndexError",
    "RuntimeError",
    "AssertionError",
    "NotImplementedError",
)
UPSTREAM_DOMAIN = "lossd.upstream"  # google.rpc.ErrorInfo.domain of that detail


QUOTE_CHARS = 64


def quote(text: str, limit: int = QUOTE_CHARS) -> str:
    """``repr(text)``, or the repr of its first ``limit`` characters and its size: client text
    echoed in an error or a log line stays bounded however long it came."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text.encode('utf-8', 'surrogatepass'))} bytes in all)"


class ServiceError(Exception):
    """Base class: an error the server reports to the caller with a status code.

    ``upstream``: the Python exception class upstream raises for the same input (one of
    ``UPSTREAM_EXCEPTIONS``), when lossd refuses an input upstream refuses too."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(
        self, message: str, *, field: str | None = None, upstream: str | None = None
    ) -> None:
        super().__init__(message)
        if upstream is not None and upstream not in UPSTREAM_EXCEPTIONS:
            raise ValueError(f"upstream={upstream!r} is not one of {UPSTREAM_EXCEPTIONS}")
        self.message = message
        self.field = field
        self.upstream = upstream

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class Internal(ServiceError):
    """A bug in lossd (an exception nobody meant to raise); already logged with its traceback.

    The caller's message names only the request id, which finds the traceback in the log."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError, ValueError):
    """The request is well-formed protobuf but its content is not acceptable."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    @classmethod
    def expected(
        cls, field: str, expected: str, got: object, *, upstream: str | None = None
    ) -> InvalidArgument:
        """The usual shape of a validation message: what was expected and what came (``got``
        bounded to a prefix: it is often the caller's own text)."""
        got = str(got)
        if len(got) > 2 * QUOTE_CHARS:
            got = f"{got[:QUOTE_CHARS]}... ({len(got)} characters in all)"
        return cls(f"expected {expected}, got {got}", field=field, upstream=upstream)


class LossNotFound(ServiceError, KeyError):
    """No loss of that name is registered."""

    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError would repr() the message
        return ServiceError.__str__(self)


class ResourceExhausted(ServiceError):
    """A configured limit was exceeded; the message names the setting that controls it."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Cancelled(ServiceError):
    """The caller cancelled the call (or went away) before its result was ready."""

    code = grpc.StatusCode.CANCELLED


@contextmanager
def upstream_raises(site: str, field: str | None = None) -> Iterator[None]:
    """Marks a call where upstream itself raises on some inputs (``site`` names it): torch's
    RuntimeError or IndexError there is the caller's input refused, INVALID_ARGUMENT. Anywhere
    else the same exception is a bug in lossd and is answered INTERNAL."""
    try:
        yield
    except (RuntimeError, IndexError) as exc:
        if "CUDA error" in str(exc):
            raise  # a poisoned device context is the server's problem, not the caller's
        reason = str(exc).strip().split("\n")[0]
        raise InvalidArgument(
            f"{site} cannot be evaluated on these inputs (upstream raises the same): "
            f"{type(exc).__name__}: {reason}",
            field=field,
            upstream=type(exc).__name__ if type(exc).__name__ in UPSTREAM_EXCEPTIONS else None,
        ) from None


def to_service_error(exc: BaseException) -> ServiceError:
    """The one mapping from anything raised while serving to a status-carrying error."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, LimitError):
        return ResourceExhausted(exc.message, field=exc.field)
    if isinstance(exc, (DecodeError, EncodeError)):
        return InvalidArgument(getattr(exc, "message", str(exc)), field=getattr(exc, "field", None))
    if isinstance(exc, MemoryError):
        return ResourceExhausted("the server ran out of memory for this request")
    return ServiceError("internal error; the server log has the details")


# Messages echo client data (a loss name, a path); the status travels in trailers, which gRPC
# caps at 8 KiB by default, so an unclipped echo would turn the error into RESOURCE_EXHAUSTED.
MAX_ERROR_CHARS = 1024


def clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    if len(text) <= limit:
        return text
    return f"{text[: limit - 40]}... ({len(text) - limit + 40} more characters)"


def abort(context: grpc.ServicerContext, error: ServiceError) -> None:
    """Abort the RPC with ``error``'s code, message and, when it names a field, a BadRequest detail."""
    status = status_pb2.Status(code=error.code.value[0], message=clip(str(error)))
    if error.field:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=clip(error.field, 256), description=clip(error.message)
        )
        detail = AnyMessage()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        status.details.append(detail)
    if getattr(error, "upstream", None):
        detail = AnyMessage()
        detail.Pack(
            error_details_pb2.ErrorInfo(
                reason=error.upstream,
                domain=UPSTREAM_DOMAIN,
                metadata={"exception": error.upstream},
            )
        )
        status.details.append(detail)
    context.abort_with_status(rpc_status.to_status(status))
