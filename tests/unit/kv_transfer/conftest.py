"""Shared checks for the codec tests: damaged frames must raise typed errors (both cachegen formats)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from kv_transfer.codec.base import Codec
from kv_transfer.errors import FrameCorrupted, FrameForeign

Shape = tuple[int, int, int]


def _damaged_params_rejected(
    codec: Codec, params: bytes, payload: bytes, shape: Shape, layer: int, cuts: tuple[int, ...]
) -> None:
    """Flipped bits anywhere in the params -> FrameCorrupted or FrameForeign; params cut at `cuts` (and at
    half and one byte short), one byte too long, or read with another shape -> FrameCorrupted."""
    rng = np.random.default_rng(0)
    for pos in sorted(set(rng.integers(0, len(params), 150).tolist()) | {0, 2, 3, 10, len(params) - 1}):
        bad = bytearray(params)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises((FrameCorrupted, FrameForeign)):
            codec.decode(bytes(bad), payload, shape, torch.float32, layer)
    for cut in (*cuts, len(params) // 2, len(params) - 1):
        with pytest.raises(FrameCorrupted):
            codec.decode(params[:cut], payload, shape, torch.float32, layer)
    with pytest.raises(FrameCorrupted):
        codec.decode(params + b"\x00", payload, shape, torch.float32, layer)
    with pytest.raises(FrameCorrupted):  # the frame says another shape
        codec.decode(params, payload, (shape[0] + 1, *shape[1:]), torch.float32, layer)


def _damaged_payload_rejected(codec: Codec, params: bytes, payload: bytes, shape: Shape, layer: int) -> None:
    """Flipped bits in the payload, or a truncated payload -> FrameCorrupted."""
    rng = np.random.default_rng(1)
    for pos in rng.integers(0, len(payload), 50).tolist():
        bad = bytearray(payload)
        bad[pos] ^= 0x10
        with pytest.raises(FrameCorrupted):
            codec.decode(params, bytes(bad), shape, torch.float32, layer)
    for cut in (0, 4, len(payload) // 2, len(payload) - 4, len(payload) - 1):
        with pytest.raises(FrameCorrupted):
            codec.decode(params, payload[:cut], shape, torch.float32, layer)


@pytest.fixture
def damaged_params_rejected() -> Callable[..., None]:
    return _damaged_params_rejected


@pytest.fixture
def damaged_payload_rejected() -> Callable[..., None]:
    return _damaged_payload_rejected
