"""Typed errors for every pdserve component, and their one mapping to gRPC status codes.

Raise the most specific class; servers translate with `grpc_status()` in one place so a client
always gets a status code plus a human-readable message, never a stack trace.
"""

from __future__ import annotations

import grpc


class PDServeError(Exception):
    """Base class. `code` is the gRPC status a client sees for it."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(PDServeError):
    """The request itself is wrong (empty prompt, bad sampling parameters, too long)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class CapacityExceeded(PDServeError):
    """The request could never fit (e.g. needs more KV blocks than the instance has) or queues are full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(PDServeError):
    """No healthy instance of a needed role, or a peer went away. Retrying later may succeed."""

    code = grpc.StatusCode.UNAVAILABLE


class NotFound(PDServeError):
    """An id (request, transfer, lease) that the server does not know."""

    code = grpc.StatusCode.NOT_FOUND


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
