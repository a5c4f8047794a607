"""Typed errors for every pdserve component, and their one mapping to gRPC status codes (and, for the
OpenAI-compatible HTTP API, from those codes to HTTP statuses and OpenAI's error object).

Raise the most specific class; servers translate with `grpc_status()` / `http_error()` in one place so a
client always gets a status code plus a human-readable message, never a stack trace.
"""

from __future__ import annotations

import grpc


class PDServeError(Exception):
    """Base class. `code` is the gRPC status a client sees for it; `param` names the request field at fault
    (OpenAI's error object carries it), `openai_code` is that object's `code` (None: the status's name)."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    openai_code: str | None = None

    def __init__(self, message: str = "", *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidRequest(PDServeError):
    """The request itself is wrong (empty prompt, bad sampling parameters, too long)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(PDServeError):
    """No API key, or not one the gateway knows (the request does not run)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    openai_code = "invalid_api_key"


class CapacityExceeded(PDServeError):
    """The request could never fit (e.g. needs more KV blocks than the instance has) or queues are full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(PDServeError):
    """No healthy instance of a needed role, or a peer went away. Retrying later may succeed."""

    code = grpc.StatusCode.UNAVAILABLE


class NotFound(PDServeError):
    """An id (request, transfer, lease) that the server does not know."""

    code = grpc.StatusCode.NOT_FOUND


class ModelNotFound(NotFound):
    """An HTTP request names a model this gateway does not serve."""

    openai_code = "model_not_found"


class Cancelled(PDServeError):
    """The request was cancelled by the client or by a deadline."""

    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(PDServeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ModelMismatch(PDServeError):
    """Two components disagree on the model (fingerprint differs)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map any exception to (status code, message). Unknown exceptions are INTERNAL."""
    if isinstance(exc, PDServeError):
        return exc.code, str(exc) or type(exc).__name__
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code = exc.code()
        details = exc.details() if hasattr(exc, "details") else ""
        return code, f"upstream: {details}"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


# gRPC status -> (HTTP status, OpenAI error type); any other code is 500 server_error.
HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


def http_error(exc: BaseException) -> tuple[int, dict]:
    """Map any exception to (HTTP status, OpenAI's error body `{"error": {message, type, param, code}}`),
    through its gRPC status so both front ends agree."""
    code, message = grpc_status(exc)
    status, kind = HTTP_STATUS.get(code, (500, "server_error"))
    param = getattr(exc, "param", None) if isinstance(exc, PDServeError) else None
    openai_code = exc.openai_code if isinstance(exc, PDServeError) else None
    body = {"message": message, "type": kind, "param": param, "code": openai_code or code.name.lower()}
    return status, {"error": body}
