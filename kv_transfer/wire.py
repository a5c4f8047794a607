"""Control messages of the pull protocol (PULL, TRAILER, ACK, ERROR): struct-packed, versioned, CRC'd.

Envelope (little-endian), version 5:

    magic b"PDKC" | version u16 | type u8 | flags u8 (= 0) | body_len u32 | body | crc32 u32 (over all before)

Bodies (strings are length-prefixed utf-8; every body must be consumed exactly):

    PULL     fingerprint u64 | tid (u16 len) | codec name (u8 len) | lease token (u8 len, raw bytes) |
             layer_start u32 | layer_end u32 | head_start u32 | head_end u32 | copies u8 | replica u8 |
             max_kl f64
    TRAILER  first_token_id i64 | num_tokens u32 | num_layers u32 | bytes_on_wire u64 | raw_bytes u64 |
             payload_bytes u64 | read_s f64 | encode_s f64 | wait_s f64 | send_s f64 | tid (u16 len)
    ACK      tid (u16 len)
    ERROR    code u16 | tid (u16 len) | message (u16 len)

Conversation on one channel (several pulls may follow each other on the same channel):
    puller -> PULL; server -> one KV frame per layer of the PULL's rectangle, in layer order, each holding
    exactly the rectangle's KV heads; server -> TRAILER (num_layers = layers sent); puller -> ACK.
    The rectangle [layer_start, layer_end) x [head_start, head_end) is in the model's global numbering;
    (0, 0) for a range means "all the lease holds". A rectangle outside the lease gets ERROR
    LAYOUT_MISMATCH before any frame, and the lease is left as it was.
    Instead of any frame or the trailer the server may send ERROR, which ends that pull.
    copies = how many decode ranks pull this rectangle (> 1 when the decode instance replicates KV heads,
    tp > num_kv_heads), replica = which of them this puller is, in [0, copies); the lease is released once
    every cell it holds was ACKed by that many distinct replicas (kv_transfer.coverage). 1 and 0 for one
    puller per cell; copies 0 or > MAX_COPIES, or replica >= copies, is InvalidCopies (BAD_REQUEST).
    The lease token is the secret the server issued with the lease (KVHandle.token); a PULL whose token
    differs gets ERROR UNAUTHORIZED before any frame, and the lease is left as it was.
    max_kl is the request's quality floor (max_kv_kl, mean per-token KL in nats) that a rate-controlled
    codec's encoder spends (Codec.at_floor); -1 = none given (the server's codec context decides). Any other
    value must be a finite KL >= 0 (else the message is FrameCorrupted).

Version 2 added the PULL's lease token (version 1 had none); version 3 the PULL's rectangle; version 4 its
copies and replica; version 5 its max_kl. Versions do not interoperate: a peer of another version gets
FrameForeign ("control message version N, this build reads 5").
"""

from __future__ import annotations

import enum
import math
import struct
import zlib
from dataclasses import dataclass

from kv_transfer.errors import FrameCorrupted, FrameForeign, FrameTooLarge, InvalidCopies
from kv_transfer.frame import MAX_TRANSFER_ID_BYTES, Buffer, as_bytes_view

MAGIC = b"PDKC"
VERSION = 5
MAX_BODY_BYTES = 64 << 10
MAX_CODEC_NAME_BYTES = 64
MAX_ERROR_MESSAGE_BYTES = 4096
MAX_TOKEN_BYTES = 64
MAX_COPIES = 64  # decode ranks pulling one cell (a decode TP degree over the model's KV heads)

_ENVELOPE = struct.Struct("<4sHBBI")
_CRC = struct.Struct("<I")
_U16 = struct.Struct("<H")
_U8 = struct.Struct("<B")
_PULL = struct.Struct("<Q")
_RECT = struct.Struct("<IIII")
_COPIES = struct.Struct("<BB")
_F64 = struct.Struct("<d")
_NO_FLOOR = -1.0  # PULL max_kl on the wire when none is given
_TRAILER = struct.Struct("<qIIQQQdddd")
_ERROR = struct.Struct("<H")


class MsgType(enum.IntEnum):
    PULL = 1
    TRAILER = 2
    ACK = 3
    ERROR = 4


class ErrorCode(enum.IntEnum):
    """Why the server ended a pull; the puller maps each to a typed error."""

    UNKNOWN_TRANSFER = 1
    FINGERPRINT_MISMATCH = 2
    UNKNOWN_CODEC = 3
    CANCELLED = 4
    EXPIRED = 5
    BAD_REQUEST = 6
    INTERNAL = 7
    SUPERSEDED = 8  # a newer PULL for the same transfer took over
    SHUTTING_DOWN = 9
    UNAUTHORIZED = 10  # the PULL's lease token is wrong or missing
    LAYOUT_MISMATCH = 11  # the PULL's rectangle is not inside what the lease holds


@dataclass(frozen=True)
class Pull:
    fingerprint: int
    transfer_id: str
    codec: str
    token: bytes = b""  # the lease's secret (KVHandle.token); b"" = none given
    layers: tuple[int, int] = (0, 0)  # global layers [start, end) wanted; (0, 0) = all the lease holds
    heads: tuple[int, int] = (0, 0)  # global KV heads [start, end) wanted; (0, 0) = all the lease holds
    copies: int = 1  # decode ranks pulling this rectangle (replicated KV heads); 1 = only this one
    replica: int = 0  # which of them this puller is, in [0, copies)
    max_kl: float | None = None  # the request's quality floor for the encoder (nats/token); None = not given

    def __repr__(self) -> str:  # never print the secret
        return (
            f"Pull(fingerprint={self.fingerprint:#x}, transfer_id={self.transfer_id!r}, codec={self.codec!r}, "
            f"layers={self.layers}, heads={self.heads}, copies={self.copies}, replica={self.replica}, "
            f"max_kl={self.max_kl})"
        )


@dataclass(frozen=True)
class Replica:
    """Which of `copies` decode ranks pulling the same rectangle a puller is (`index` in [0, copies)): a
    decode instance with more TP ranks than the model has KV heads holds each head on copies ranks, and each
    pulls it. Replica() = the only puller of its cells."""

    index: int = 0
    copies: int = 1

    def __post_init__(self) -> None:
        check_copies(self.copies, self.index)


def check_copies(copies: int, replica: int) -> None:
    """InvalidCopies unless 1 <= copies <= MAX_COPIES and 0 <= replica < copies."""
    if not 1 <= copies <= MAX_COPIES:
        raise InvalidCopies(f"copies must be 1..{MAX_COPIES}, got {copies}")
    if not 0 <= replica < copies:
        raise InvalidCopies(f"replica must be 0..{copies - 1} for {copies} copies, got {replica}")


@dataclass(frozen=True)
class TrailerMsg:
    """The server's closing message of a pull; durations in seconds, sizes in bytes."""

    transfer_id: str
    first_token_id: int
    num_tokens: int
    num_layers: int
    bytes_on_wire: int  # every message the server sent for this pull, this trailer excluded
    raw_bytes: int  # K and V as read from the cache, uncompressed
    payload_bytes: int  # codec payload + params of all frames
    read_s: float  # read_layer calls
    encode_s: float  # codec encode + frame assembly
    wait_s: float  # waiting for layers to become ready (prefill still running)
    send_s: float  # transport send calls


@dataclass(frozen=True)
class Ack:
    transfer_id: str


@dataclass(frozen=True)
class ErrorMsg:
    code: ErrorCode
    transfer_id: str
    message: str


ControlMsg = Pull | TrailerMsg | Ack | ErrorMsg


# --- encoding --------------------------------------------------------------------------------------
def _str(s: str, cap: int, width: struct.Struct, what: str, truncate: bool = False) -> bytes:
    b = s.encode("utf-8")
    if len(b) > cap:
        if not truncate:
            raise ValueError(f"{what} is {len(b)} bytes > {cap}")
        b = b[:cap].decode("utf-8", errors="ignore").encode("utf-8")
    return width.pack(len(b)) + b


def _blob(b: bytes, cap: int, what: str) -> bytes:
    if len(b) > cap:
        raise ValueError(f"{what} is {len(b)} bytes > {cap}")
    return _U8.pack(len(b)) + bytes(b)


def _envelope(kind: MsgType, body: bytes) -> bytes:
    head = _ENVELOPE.pack(MAGIC, VERSION, kind, 0, len(body)) + body
    return head + _CRC.pack(zlib.crc32(head))


def encode_control(msg: ControlMsg) -> bytes:
    if isinstance(msg, Pull):
        check_copies(msg.copies, msg.replica)
        if msg.max_kl is not None and not (math.isfinite(msg.max_kl) and msg.max_kl >= 0):
            raise ValueError(f"PULL max_kl must be a finite KL >= 0, got {msg.max_kl}")
        body = (
            _PULL.pack(msg.fingerprint & 0xFFFFFFFFFFFFFFFF)
            + _str(msg.transfer_id, MAX_TRANSFER_ID_BYTES, _U16, "transfer id")
            + _str(msg.codec, MAX_CODEC_NAME_BYTES, _U8, "codec name")
            + _blob(msg.token, MAX_TOKEN_BYTES, "lease token")
            + _RECT.pack(*msg.layers, *msg.heads)
            + _COPIES.pack(msg.copies, msg.replica)
            + _F64.pack(_NO_FLOOR if msg.max_kl is None else msg.max_kl)
        )
        return _envelope(MsgType.PULL, body)
    if isinstance(msg, TrailerMsg):
        body = _TRAILER.pack(
            msg.first_token_id,
            msg.num_tokens,
            msg.num_layers,
            msg.bytes_on_wire,
            msg.raw_bytes,
            msg.payload_bytes,
            msg.read_s,
            msg.encode_s,
            msg.wait_s,
            msg.send_s,
        ) + _str(msg.transfer_id, MAX_TRANSFER_ID_BYTES, _U16, "transfer id")
        return _envelope(MsgType.TRAILER, body)
    if isinstance(msg, Ack):
        return _envelope(MsgType.ACK, _str(msg.transfer_id, MAX_TRANSFER_ID_BYTES, _U16, "transfer id"))
    if isinstance(msg, ErrorMsg):
        body = (
            _ERROR.pack(int(msg.code))
            + _str(msg.transfer_id, MAX_TRANSFER_ID_BYTES, _U16, "transfer id", truncate=True)
            + _str(msg.message, MAX_ERROR_MESSAGE_BYTES, _U16, "error message", truncate=True)
        )
        return _envelope(MsgType.ERROR, body)
    raise TypeError(f"not a control message: {type(msg).__name__}")


# --- decoding --------------------------------------------------------------------------------------
class _Reader:
    """Cursor over a body; every read is bounds-checked (FrameCorrupted on overrun)."""

    def __init__(self, body: memoryview) -> None:
        self.body, self.off = body, 0

    def unpack(self, st: struct.Struct) -> tuple:
        if self.off + st.size > len(self.body):
            raise FrameCorrupted("control message body too short")
        vals = st.unpack_from(self.body, self.off)
        self.off += st.size
        return vals

    def string(self, width: struct.Struct, cap: int) -> str:
        (n,) = self.unpack(width)
        if n > cap or self.off + n > len(self.body):
            raise FrameCorrupted(f"string of {n} bytes overruns the control message")
        raw = bytes(self.body[self.off : self.off + n])
        self.off += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FrameForeign(f"control message string is not utf-8: {e}") from None

    def blob(self, cap: int) -> bytes:
        (n,) = self.unpack(_U8)
        if n > cap or self.off + n > len(self.body):
            raise FrameCorrupted(f"field of {n} bytes overruns the control message")
        raw = bytes(self.body[self.off : self.off + n])
        self.off += n
        return raw

    def done(self) -> None:
        if self.off != len(self.body):
            raise FrameCorrupted(f"{len(self.body) - self.off} trailing bytes in control message body")


def is_control(buf: Buffer) -> bool:
    return bytes(as_bytes_view(buf)[:4]) == MAGIC


def decode_control(buf: Buffer) -> ControlMsg:
    """Validate and parse one control message; FrameError subclasses on anything wrong."""
    mv = as_bytes_view(buf)
    n = len(mv)
    head = bytes(mv[:4])
    if head != MAGIC[: len(head)]:
        raise FrameForeign(f"not a control message: magic {head!r}")
    if n < _ENVELOPE.size + _CRC.size:
        raise FrameCorrupted(f"truncated control message: {n} bytes")
    _, version, kind, flags, body_len = _ENVELOPE.unpack_from(mv, 0)
    if version != VERSION:
        raise FrameForeign(f"control message version {version}, this build reads {VERSION}")
    if body_len > MAX_BODY_BYTES:
        raise FrameTooLarge(f"control body claims {body_len} bytes > {MAX_BODY_BYTES}")
    total = _ENVELOPE.size + body_len + _CRC.size
    if total != n:
        raise FrameCorrupted(f"control message length {n} != header's {total}")
    (crc,) = _CRC.unpack_from(mv, n - _CRC.size)
    if zlib.crc32(mv[: n - _CRC.size]) != crc:
        raise FrameCorrupted("control message CRC32 mismatch")
    if flags != 0:
        raise FrameForeign(f"unknown control flags {flags:#x}")
    r = _Reader(mv[_ENVELOPE.size : n - _CRC.size])
    msg: ControlMsg
    if kind == MsgType.PULL:
        (fp,) = r.unpack(_PULL)
        tid = r.string(_U16, MAX_TRANSFER_ID_BYTES)
        codec = r.string(_U8, MAX_CODEC_NAME_BYTES)
        token = r.blob(MAX_TOKEN_BYTES)
        l0, l1, h0, h1 = r.unpack(_RECT)
        copies, replica = r.unpack(_COPIES)
        check_copies(copies, replica)
        (floor,) = r.unpack(_F64)
        if floor != _NO_FLOOR and not (math.isfinite(floor) and floor >= 0):
            raise FrameCorrupted(f"PULL max_kl {floor} is not a KL >= 0")
        max_kl = None if floor == _NO_FLOOR else floor
        msg = Pull(fp, tid, codec, token, (l0, l1), (h0, h1), copies, replica, max_kl)
    elif kind == MsgType.TRAILER:
        vals = r.unpack(_TRAILER)
        tid = r.string(_U16, MAX_TRANSFER_ID_BYTES)
        msg = TrailerMsg(tid, *vals)
    elif kind == MsgType.ACK:
        msg = Ack(r.string(_U16, MAX_TRANSFER_ID_BYTES))
    elif kind == MsgType.ERROR:
        (code,) = r.unpack(_ERROR)
        tid = r.string(_U16, MAX_TRANSFER_ID_BYTES)
        text = r.string(_U16, MAX_ERROR_MESSAGE_BYTES)
        try:
            ecode = ErrorCode(code)
        except ValueError:
            ecode = ErrorCode.INTERNAL
            text = f"(unknown error code {code}) {text}"
        msg = ErrorMsg(ecode, tid, text)
    else:
        raise FrameForeign(f"unknown control message type {kind}")
    r.done()
    return msg
