"""Property-based fuzzing (hypothesis) of the KV wire: every input to decode_frame / decode_control is
either a valid message or raises a typed FrameError (never another exception, never a hang), and every
valid message round-trips. PDSERVE_FUZZ_EXAMPLES sets the examples per property (the long run:
`PDSERVE_FUZZ_EXAMPLES=50000 pytest tests/unit/kv_transfer/test_kvt_fuzz.py`)."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kv_transfer.errors import FrameError
from kv_transfer.frame import decode_frame, encode_frame
from kv_transfer.wire import (
    MAX_CODEC_NAME_BYTES,
    Ack,
    ErrorCode,
    ErrorMsg,
    Pull,
    TrailerMsg,
    decode_control,
    encode_control,
)

EXAMPLES = int(os.environ.get("PDSERVE_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FINGERPRINT = 0x1234_5678_9ABC_DEF0

tids = st.text(min_size=1, max_size=40).filter(lambda s: 0 < len(s.encode()) <= 200)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
secs = st.floats(min_value=0, max_value=1e6, allow_nan=False)

controls = st.one_of(
    st.builds(
        Pull,
        fingerprint=u64,
        transfer_id=tids,
        codec=st.text(max_size=20).filter(lambda s: len(s.encode()) <= MAX_CODEC_NAME_BYTES),
        token=st.binary(max_size=32),
    ),
    st.builds(
        TrailerMsg,
        transfer_id=tids,
        first_token_id=st.integers(-(2**63), 2**63 - 1),
        num_tokens=u32,
        num_layers=u32,
        bytes_on_wire=u64,
        raw_bytes=u64,
        payload_bytes=u64,
        read_s=secs,
        encode_s=secs,
        wait_s=secs,
        send_s=secs,
    ),
    st.builds(Ack, transfer_id=tids),
    st.builds(ErrorMsg, code=st.sampled_from(ErrorCode), transfer_id=tids, message=st.text(max_size=100)),
)


def _frame(t: int, h: int, d: int, tid: str, layer: int) -> bytes:
    payload = bytes(range(256)) * (t * h * d * 8 // 256) + bytes(t * h * d * 8 % 256)  # K and V, fp32
    return encode_frame(
        codec_id=0,
        fingerprint=FINGERPRINT,
        transfer_id=tid,
        layer=layer,
        shape=(t, h, d),
        dtype=torch.float32,
        params=b"",
        payload=payload,
    )


frames = st.builds(_frame, st.integers(1, 4), st.integers(1, 3), st.integers(1, 8), tids, st.integers(0, 63))


def _mutate(data: bytes, draw: Callable[[st.SearchStrategy[Any]], Any]) -> bytes:
    """Flip bytes, truncate, extend, or splice: what a corrupted or hostile peer sends."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "extend", "set"]))
        if op == "flip" and buf:
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del buf[draw(st.integers(0, len(buf))) :]
        elif op == "extend":
            buf += draw(st.binary(min_size=1, max_size=16))
        elif op == "set" and len(buf) >= 8:  # a plausible header field set to an extreme value
            i = draw(st.integers(0, len(buf) - 4))
            buf[i : i + 4] = struct.pack("<I", draw(st.sampled_from([0, 1, 2**31, 2**32 - 1])))
    return bytes(buf)


def _recrc(data: bytes) -> bytes:
    """The same bytes with a CRC32 that matches (a peer that computes CRCs over garbage)."""
    if len(data) < 4:
        return data
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


@FUZZ
@given(controls)
def test_control_messages_round_trip(msg) -> None:
    assert decode_control(encode_control(msg)) == msg


@FUZZ
@given(st.data())
def test_any_control_bytes_decode_or_raise_a_frame_error(data: st.DataObject) -> None:
    raw = data.draw(st.one_of(st.binary(max_size=300), controls.map(encode_control)))
    mutated = _mutate(raw, data.draw)
    for buf in (mutated, _recrc(mutated)):
        try:
            decode_control(buf)
        except FrameError:
            pass


@FUZZ
@given(st.data())
def test_any_frame_bytes_decode_or_raise_a_frame_error(data: st.DataObject) -> None:
    raw = data.draw(st.one_of(st.binary(max_size=300), frames))
    mutated = _mutate(raw, data.draw)
    for buf in (mutated, _recrc(mutated)):
        try:
            frame = decode_frame(buf, expect_fingerprint=FINGERPRINT)
        except FrameError:
            continue
        assert frame.transfer_id and frame.shape[0] >= 1  # a frame that decodes is a whole, valid one
