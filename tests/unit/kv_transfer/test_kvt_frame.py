"""Frame and control-message containers: round trips, and every kind of damage -> a typed error."""

from __future__ import annotations

import random
import struct
import tracemalloc
import zlib

import pytest
import torch

from kv_transfer.errors import (
    FingerprintMismatch,
    FrameCorrupted,
    FrameError,
    FrameForeign,
    FrameTooLarge,
)
from kv_transfer.frame import (
    HEADER_SIZE,
    MAGIC,
    PAYLOAD_ALIGN,
    FrameBuffer,
    decode_frame,
    encode_frame,
    frame_payload_bytes,
    is_frame,
)
from kv_transfer.wire import (
    Ack,
    ErrorCode,
    ErrorMsg,
    Pull,
    TrailerMsg,
    decode_control,
    encode_control,
    is_control,
)

FP = 0xDEADBEEF12345678


def make_frame(t: int = 3, h: int = 2, d: int = 4, payload: bytes | None = None, **kw: object) -> bytes:
    payload = payload if payload is not None else bytes(range(256))[: 2 * t * h * d]
    args = dict(
        codec_id=1,
        fingerprint=FP,
        transfer_id="req-ü-7",
        layer=5,
        shape=(t, h, d),
        dtype=torch.float16,
        params=b"\x01\x02",
        payload=payload,
    )
    args.update(kw)
    return encode_frame(**args)  # type: ignore[arg-type]


def test_round_trip_fields_and_views() -> None:
    buf = make_frame()
    f = decode_frame(buf, expect_fingerprint=FP)
    assert (f.codec_id, f.fingerprint, f.transfer_id, f.layer, f.shape, f.dtype) == (
        1,
        FP,
        "req-ü-7",
        5,
        (3, 2, 4),
        torch.float16,
    )
    assert bytes(f.params) == b"\x01\x02"
    assert bytes(f.payload) == bytes(range(48))
    assert f.nbytes == len(buf) and is_frame(buf) and not is_control(buf)
    # payload is aligned within the frame (tensors viewed over it are aligned)
    start = bytes(buf).index(bytes(range(48)), HEADER_SIZE)
    assert start % PAYLOAD_ALIGN == 0


def test_payload_parts_concatenate_and_framebuffer_reuse() -> None:
    fb = FrameBuffer()
    a = fb.encode(
        codec_id=2,
        fingerprint=1,
        transfer_id="x",
        layer=0,
        shape=(1, 1, 2),
        dtype=torch.float32,
        params=b"",
        payload=[b"ab", memoryview(b"cd"), bytearray(b"ef")],
    )
    assert bytes(decode_frame(a).payload) == b"abcdef"
    assert frame_payload_bytes(a) == 6  # no params: the payload's 6 bytes, as the header says
    b = fb.encode(
        codec_id=2,
        fingerprint=1,
        transfer_id="y",
        layer=1,
        shape=(1, 1, 1),
        dtype=torch.float32,
        params=b"p",
        payload=b"z",
    )
    f = decode_frame(b)
    assert (f.transfer_id, bytes(f.params), bytes(f.payload)) == ("y", b"p", b"z")
    assert frame_payload_bytes(b) == len(f.params) + len(f.payload) == 2


def test_every_truncation_is_typed() -> None:
    buf = make_frame()
    for n in range(len(buf)):
        with pytest.raises(FrameCorrupted):
            decode_frame(buf[:n])
    with pytest.raises(FrameCorrupted):
        decode_frame(buf + b"\x00")  # trailing garbage


def test_every_single_bit_flip_is_detected() -> None:
    buf = make_frame()
    for i in range(len(buf) * 8):
        bad = bytearray(buf)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(FrameError):
            decode_frame(bad, expect_fingerprint=FP)
    # flips after the magic/version words are CRC-checked: always FrameCorrupted or a length/size error
    for i in range(64, len(buf) * 8):
        bad = bytearray(buf)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises((FrameCorrupted, FrameTooLarge)):
            decode_frame(bad)


def test_random_multi_bit_damage_in_a_large_frame() -> None:
    rng = random.Random(0)
    buf = make_frame(t=64, h=4, d=32, payload=bytes(rng.randrange(256) for _ in range(2 * 64 * 4 * 32)))
    for _ in range(200):
        bad = bytearray(buf)
        for _ in range(rng.randint(1, 8)):
            bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        if bad == buf:
            continue
        with pytest.raises(FrameError):
            decode_frame(bad, expect_fingerprint=FP)


def test_foreign_frames() -> None:
    buf = bytearray(make_frame())
    with pytest.raises(FrameForeign):
        decode_frame(b"GET / HTTP/1.1\r\n\r\n" + bytes(100))
    other_version = bytearray(buf)
    other_version[4:6] = struct.pack("<H", 3)
    with pytest.raises(FrameForeign):
        decode_frame(other_version)
    with pytest.raises(FingerprintMismatch):
        decode_frame(buf, expect_fingerprint=FP ^ 1)
    assert isinstance(FingerprintMismatch("x"), FrameForeign)


def _recrc(buf: bytearray) -> bytearray:
    buf[-4:] = struct.pack("<I", zlib.crc32(bytes(buf[:-4])))
    return buf


def test_unknown_dtype_or_flags_with_valid_crc_is_foreign() -> None:
    buf = bytearray(make_frame())
    bad_dtype = bytearray(buf)
    bad_dtype[10] = 99
    with pytest.raises(FrameForeign):
        decode_frame(_recrc(bad_dtype))
    bad_flags = bytearray(buf)
    bad_flags[8] = 1
    with pytest.raises(FrameForeign):
        decode_frame(_recrc(bad_flags))


def test_oversized_claims_are_refused_without_allocation() -> None:
    # a well-formed frame (valid CRC) whose shape claims 2**32-1 * 2**32-1 * 2**32-1 elements
    huge = make_frame(t=2**32 - 1, h=2**32 - 1, d=2**32 - 1, payload=b"")
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge):
            decode_frame(huge, max_elements=1 << 20)
        # header claiming 4 GiB of codec params in a 100-byte buffer
        claim = bytearray(make_frame())
        claim[38:42] = struct.pack("<I", 2**32 - 1)
        with pytest.raises(FrameTooLarge):
            decode_frame(claim)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # nothing near the claimed sizes was allocated


def test_encode_rejects_bad_fields() -> None:
    with pytest.raises(ValueError):
        make_frame(transfer_id="")
    with pytest.raises(ValueError):
        make_frame(transfer_id="x" * 300)
    with pytest.raises(ValueError):
        make_frame(dtype=torch.int32)
    with pytest.raises(ValueError):
        make_frame(shape=(0, 1, 1))


# --- control messages ------------------------------------------------------------------------------
CONTROL = [
    Pull(FP, "req-1", "int8", token=bytes(range(16))),
    Pull(FP, "req-1", "raw"),  # no token (refused by the server, but well-formed)
    TrailerMsg("req-1", 42, 100, 8, 1 << 40, 1 << 41, 12345, 0.5, 0.25, 0.125, 1e-3),
    Ack("req-1"),
    ErrorMsg(ErrorCode.EXPIRED, "req-1", "lease expired ✓"),
]


@pytest.mark.parametrize("msg", CONTROL, ids=lambda m: f"{type(m).__name__}-{len(encode_control(m))}")
def test_control_round_trip_and_damage(msg: object) -> None:
    buf = encode_control(msg)  # type: ignore[arg-type]
    assert is_control(buf) and not is_frame(buf)
    assert decode_control(buf) == msg
    for n in range(len(buf)):
        with pytest.raises(FrameError):
            decode_control(buf[:n])
    for i in range(len(buf) * 8):
        bad = bytearray(buf)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(FrameError):
            decode_control(bad)
    with pytest.raises(FrameCorrupted):
        decode_control(buf + b"\x00")


def test_control_rejects_foreign_and_oversized() -> None:
    with pytest.raises(FrameForeign):
        decode_control(MAGIC + bytes(20))  # a frame is not a control message
    claim = bytearray(encode_control(Ack("x")))
    claim[8:12] = struct.pack("<I", 2**31)
    with pytest.raises(FrameTooLarge):
        decode_control(claim)
    unknown_type = bytearray(encode_control(Ack("x")))
    unknown_type[6] = 77
    with pytest.raises(FrameForeign):
        decode_control(_recrc(unknown_type))


def test_pull_token_is_bounded_and_never_printed() -> None:
    with pytest.raises(ValueError, match="lease token"):
        encode_control(Pull(FP, "t", "raw", token=bytes(65)))
    msg = decode_control(encode_control(Pull(FP, "t", "raw", token=b"\xaa" * 64)))
    assert isinstance(msg, Pull) and msg.token == b"\xaa" * 64
    assert "aa" not in repr(msg).replace(f"{FP:#x}", "")
    v1 = bytearray(encode_control(Pull(FP, "t", "raw", token=b"k")))
    v1[4:6] = struct.pack("<H", 1)  # a version-1 peer (PULL without a token) is refused, not misread
    with pytest.raises(FrameForeign, match="version 1"):
        decode_control(_recrc(v1))


def test_error_message_is_truncated_not_refused() -> None:
    msg = decode_control(encode_control(ErrorMsg(ErrorCode.INTERNAL, "t", "é" * 5000)))
    assert isinstance(msg, ErrorMsg) and 0 < len(msg.message.encode()) <= 4096


def test_frame_carries_its_head_range_and_version_1_frames_still_read() -> None:
    f = decode_frame(make_frame(h=2, head_start=3), expect_fingerprint=FP)
    assert f.head_start == 3 and f.heads == (3, 5) and f.version == 2
    v2 = bytearray(make_frame(h=2))
    # a version-1 frame: the same fields without head_start (4 bytes fewer header, payload realigned)
    tid_len, params_len, payload_len = struct.unpack_from("<HIQ", v2, 36)
    body = bytes(v2[HEADER_SIZE : HEADER_SIZE + tid_len + params_len])
    head = bytearray(v2[:50])
    head[4:6] = struct.pack("<H", 1)
    off = 50 + len(body)
    pad = bytes(-off % PAYLOAD_ALIGN)
    payload = bytes(decode_frame(bytes(v2)).payload)
    v1 = bytearray(bytes(head) + body + pad + payload + bytes(4))
    f1 = decode_frame(_recrc(v1), expect_fingerprint=FP)
    assert (
        f1.version == 1
        and f1.heads == (0, 2)
        and bytes(f1.payload) == payload
        and payload_len == len(payload)
    )


def test_pull_carries_the_requests_quality_floor() -> None:
    """max_kl (the request's max_kv_kl) crosses in the PULL; none given stays None; a negative or non-finite
    floor is refused on both ends; a version-4 peer (PULL without it) is refused, not misread."""
    for floor in (None, 0.0, 1.5e-5, 0.25):
        msg = decode_control(encode_control(Pull(FP, "t", "cachegen", token=b"k", max_kl=floor)))
        assert isinstance(msg, Pull) and msg.max_kl == floor
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max_kl"):
            encode_control(Pull(FP, "t", "cachegen", token=b"k", max_kl=bad))
        raw = bytearray(encode_control(Pull(FP, "t", "cachegen", token=b"k")))
        raw[-12:-4] = struct.pack("<d", bad)
        with pytest.raises(FrameCorrupted, match="max_kl"):
            decode_control(_recrc(raw))
    v4 = bytearray(encode_control(Pull(FP, "t", "cachegen", token=b"k", max_kl=0.01)))
    v4[4:6] = struct.pack("<H", 4)
    with pytest.raises(FrameForeign, match="version 4, this build reads 5"):
        decode_control(_recrc(v4))


def test_pull_carries_its_rectangle() -> None:
    msg = decode_control(encode_control(Pull(FP, "t", "raw", token=b"k", layers=(2, 5), heads=(1, 3))))
    assert isinstance(msg, Pull) and (msg.layers, msg.heads) == ((2, 5), (1, 3))
    whole = decode_control(encode_control(Pull(FP, "t", "raw", token=b"k")))
    assert isinstance(whole, Pull) and (whole.layers, whole.heads) == ((0, 0), (0, 0))
    assert "layers=(0, 0)" in repr(whole)
