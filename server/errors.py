"""The one error hierarchy of the server, each class carrying its gRPC status code.

Loss functions, validation and the engine raise these; the servicer maps them to a status in
exactly one place (``service.py``). Anything else that escapes becomes INTERNAL, with the
traceback logged on the server only.

``InvalidArgument`` is also a ``ValueError`` so that loss functions called directly from Python
raise what Python users expect.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc


class ServiceError(Exception):
    """Base class: an error the server reports to the caller with a status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

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
    def expected(cls, field: str, expected: str, got: object) -> InvalidArgument:
        """The usual shape of a validation message: what was expected and what came."""
        return cls(f"expected {expected}, got {got}", field=field)


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
        ) from None
