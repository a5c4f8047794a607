"""Typed errors of the KV data plane; each maps to one gRPC status via `pdserve.errors.grpc_status`.

Where a pdserve-wide class already names the situation (Unavailable, NotFound, ...) the KV error
subclasses it too, so callers may catch either the specific or the generic class.
"""

from __future__ import annotations

import grpc

from pdserve.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    ModelMismatch,
    NotFound,
    PDServeError,
    Unavailable,
)


class KVTransferError(PDServeError):
    """Base class of every kv_transfer error."""

    code = grpc.StatusCode.INTERNAL


# --- frames and control messages -------------------------------------------------------------------
class FrameError(KVTransferError):
    """A message on the wire could not be accepted (base of the frame errors)."""

    code = grpc.StatusCode.DATA_LOSS


class FrameCorrupted(FrameError):
    """Truncated, bad CRC, inconsistent lengths: the bytes were damaged on the way."""

    code = grpc.StatusCode.DATA_LOSS


class FrameForeign(FrameError):
    """Not ours: other magic, other format version, unknown dtype/flags. (A flipped bit in the magic
    or version field also reads as foreign: it fails before the CRC can be located.)"""

    code = grpc.StatusCode.INVALID_ARGUMENT


class FingerprintMismatch(FrameForeign, ModelMismatch):
    """A well-formed frame or request from a different model (u64 fingerprints differ)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class FrameTooLarge(FrameError):
    """A header claims more elements/bytes than the receiver's cap; refused before allocating."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ProtocolError(FrameError):
    """Well-formed messages in the wrong order or contradicting each other (layer order, shapes)."""

    code = grpc.StatusCode.DATA_LOSS


# --- transport -------------------------------------------------------------------------------------
class PeerClosed(KVTransferError, Unavailable):
    """The other end closed the connection or died (EOF, reset, broken pipe)."""

    code = grpc.StatusCode.UNAVAILABLE


class TransferTimeout(KVTransferError, DeadlineExceeded):
    """Nothing arrived (or could be sent) within the allowed time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class TransportUnavailable(KVTransferError, Unavailable):
    """The transport cannot be used in this process (e.g. `import ucxx` failed)."""

    code = grpc.StatusCode.UNAVAILABLE


class UnknownTransport(KVTransferError, InvalidRequest):
    """An address scheme that no transport serves."""

    code = grpc.StatusCode.INVALID_ARGUMENT


# --- codecs ----------------------------------------------------------------------------------------
class UnknownCodec(KVTransferError, InvalidRequest):
    """A codec name or id that is not registered (or whose module is not installed)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class CodecError(KVTransferError, InvalidRequest):
    """A codec cannot encode its input (wrong shape/dtype, non-finite values)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


# --- leases and pulls ------------------------------------------------------------------------------
class UnknownTransfer(KVTransferError, NotFound):
    """The server holds no lease for this transfer id (never opened, or already released)."""

    code = grpc.StatusCode.NOT_FOUND


class LeaseExists(KVTransferError, InvalidRequest):
    """open_lease() with a transfer id that already has a live lease."""

    code = grpc.StatusCode.ALREADY_EXISTS


class ServerStopped(KVTransferError, Unavailable):
    """The KVServer is stopped (or was never started) and takes no new leases."""

    code = grpc.StatusCode.UNAVAILABLE


class LeaseExpired(KVTransferError):
    """The lease ran past its TTL and its KV was released; the prefill must be redone."""

    code = grpc.StatusCode.ABORTED


class TransferCancelled(KVTransferError, Cancelled):
    """The server cancelled the lease (or the puller aborted the pull)."""

    code = grpc.StatusCode.CANCELLED


class RemoteError(KVTransferError):
    """The server reported an internal failure while serving the pull."""

    code = grpc.StatusCode.INTERNAL


class PullUnauthorized(KVTransferError):
    """The PULL's lease token is wrong or missing: only the decode instance the gateway handed the lease's
    token to may pull it. The server sent no KV and keeps the lease for the right puller."""

    code = grpc.StatusCode.PERMISSION_DENIED


class LayoutMismatch(KVTransferError, InvalidRequest):
    """A pull asked for KV (layers x KV heads) outside what the lease holds, or a frame held other layers or
    heads than were asked for: the two sides disagree on the prefill layout. Never a silently wrong cache."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class InvalidCopies(ProtocolError, InvalidRequest):
    """A PULL declares a nonsense replica count: `copies` outside [1, wire.MAX_COPIES] or `replica` outside
    [0, copies). Raised before anything is sent (puller) or answered BAD_REQUEST (server); no lease changes."""

    code = grpc.StatusCode.INVALID_ARGUMENT
