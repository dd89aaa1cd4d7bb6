"""The one exception every lossd RPC failure surfaces as: ``LossdError``, and, when the server
says which Python exception class upstream raises for the refused input, the LossdError
subclass that is also that class (``except ValueError`` keeps working for code written
against the upstream module)."""

from __future__ import annotations

import grpc


class LossdError(RuntimeError):
    """A lossd call failed.

    Attributes:
        code: the gRPC status code (``grpc.StatusCode``).
        details: the server's message (it names the field, what was expected and what came).
        field: the offending request field, when the server named one (e.g. ``args[1]``).
        request_id: the request id of the failed call, when there was one.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        field: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.field = field
        self.request_id = request_id


class LossdValueError(LossdError, ValueError):
    """A refusal where upstream raises ValueError (e.g. mmdet's avg_factor with reduction='sum')."""


class LossdTypeError(LossdError, TypeError):
    """A refusal where upstream raises TypeError."""


class LossdIndexError(LossdError, IndexError):
    """A refusal where upstream raises IndexError (e.g. torch's class index out of bounds)."""


class LossdRuntimeError(LossdError):
    """A refusal where upstream raises RuntimeError (LossdError is one already)."""


class LossdAssertionError(LossdError, AssertionError):
    """A refusal where upstream fails an assertion (mmdet, NetsPresso box checks)."""


class LossdNotImplementedError(LossdError, NotImplementedError):
    """A refusal where upstream raises NotImplementedError."""


UPSTREAM_DOMAIN = "lossd.upstream"  # the google.rpc.ErrorInfo domain the server names it with
UPSTREAM_CLASSES: dict[str, type[LossdError]] = {
    "ValueError": LossdValueError,
    "TypeError": LossdTypeError,
    "IndexError": LossdIndexError,
    "RuntimeError": LossdRuntimeError,
    "AssertionError": LossdAssertionError,
    "NotImplementedError": LossdNotImplementedError,
}


def from_rpc_error(
    error: grpc.RpcError, request_id: str | None = None, target: str | None = None
) -> LossdError:
    """Convert a grpc.RpcError, keeping the field named in a google.rpc.BadRequest detail and
    the upstream exception class named in a google.rpc.ErrorInfo detail."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    field = None
    cls: type[LossdError] = LossdError
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(error)
        for detail in status.details if status else ():
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                if bad.field_violations:
                    field = bad.field_violations[0].field
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                if info.domain == UPSTREAM_DOMAIN:
                    cls = UPSTREAM_CLASSES.get(info.reason, LossdError)
    except Exception:  # noqa: BLE001 - details are a bonus; the code and message are what matter
        pass
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        details += " (the server's limit is `lossd serve --max-message-mb`; the client's is RemoteLoss(max_message_mb=...))"
    if code == grpc.StatusCode.UNAVAILABLE and _unreachable(details):
        where = f" at {target}" if target else ""
        details += (
            f" (no lossd server is answering{where}: start one with `lossd serve`, or point the "
            "client at one with endpoint=... or $LOSSD_ENDPOINT)"
        )
    return cls(code, details, field=field, request_id=request_id)


def _unreachable(details: str) -> bool:
    text = details.lower()
    return any(
        s in text
        for s in ("connection refused", "failed to connect", "connect failed", "name resolution")
    )
