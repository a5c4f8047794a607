"""Codecs against exact references: raw is bit-exact, int8/fp8 stay inside their stated error bounds."""

from __future__ import annotations

import pytest
import torch

from kv_transfer.codec import CODEC_IDS, CODECS, CodecContext
from kv_transfer.errors import CodecError, FrameCorrupted, UnknownCodec
from kv_transfer.frame import decode_frame, encode_frame

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPE = (37, 4, 32)  # T, Hkv, D


def kv(dtype: torch.dtype, seed: int = 0, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(SHAPE, generator=g) * scale
    v = torch.randn(SHAPE, generator=g) * torch.logspace(-3, 2, SHAPE[0]).view(
        -1, 1, 1
    )  # varied token scales
    return k.to(dtype), v.to(dtype)


CODECS_CTX = CodecContext()  # no model: raw, int8, fp8 need none


def through_frame(
    name: str, k: torch.Tensor, v: torch.Tensor, out: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """encode -> frame -> decode_frame -> decode, as the server and puller do."""
    codec = CODECS_CTX.codec(name)
    params, parts = codec.encode_parts(k, v, layer=3)
    buf = encode_frame(
        codec_id=codec.codec_id,
        fingerprint=9,
        transfer_id="t",
        layer=3,
        shape=k.shape,
        dtype=k.dtype,
        params=params,
        payload=parts,
    )
    f = decode_frame(bytearray(buf), expect_fingerprint=9)
    assert f.codec_id == codec.codec_id
    return codec.decode(f.params, f.payload, f.shape, out, f.layer)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("dtype", DTYPES)
def test_raw_is_bit_exact(dtype: torch.dtype) -> None:
    k, v = kv(dtype)
    k[0, 0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, float("-inf")]).to(dtype)
    k2, v2 = through_frame("raw", k, v, dtype)
    assert k2.dtype == dtype and k2.shape == SHAPE
    assert torch.equal(bits(k2), bits(k)) and torch.equal(bits(v2), bits(v))


def test_raw_encode_bytes_matches_parts_and_noncontiguous_input() -> None:
    k, v = kv(torch.float32)
    kt = k.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    codec = CODECS_CTX.codec("raw")
    params, payload = codec.encode(kt, v, 0)
    k2, v2 = codec.decode(params, payload, SHAPE, torch.float32, 0)
    assert torch.equal(k2, k) and torch.equal(v2, v)


@pytest.mark.parametrize("src,out", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_raw_converts_to_requested_dtype(src: torch.dtype, out: torch.dtype) -> None:
    k, v = kv(src)
    k2, v2 = through_frame("raw", k, v, out)
    assert k2.dtype == out and torch.equal(k2, k.to(out)) and torch.equal(v2, v.to(out))


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_per_token_error_bound(dtype: torch.dtype) -> None:
    k, v = kv(dtype)
    k2, v2 = through_frame("int8", k, v, torch.float32)
    for x, y in ((k, k2), (v, v2)):
        xf = x.float()
        absmax = xf.abs().amax(dim=(1, 2), keepdim=True)  # per token
        bound = absmax / 254 * (1 + 1e-5) + 1e-30  # half a quantization step
        assert bool(((y - xf).abs() <= bound).all())
        # and it is a real 8-bit quantizer, not lossless by accident
        assert not torch.equal(y, xf)


def test_int8_payload_is_about_a_quarter_of_fp32() -> None:
    k, v = kv(torch.float32)
    params, payload = CODECS_CTX.codec("int8").encode(k, v, 0)
    assert len(payload) == 2 * k.numel() + 2 * 4 * SHAPE[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_error_bound(dtype: torch.dtype) -> None:
    k, v = kv(dtype)
    k2, v2 = through_frame("fp8", k, v, torch.float32)
    for x, y in ((k, k2), (v, v2)):
        xf = x.float()
        scale = xf.abs().max() / 448
        bound = torch.maximum(xf.abs() * 2**-4, scale * 2**-10) * (1 + 1e-5)
        assert bool(((y - xf).abs() <= bound).all())
        assert not torch.equal(y, xf)


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_lossy_codecs_output_dtype_and_zero_input(name: str) -> None:
    z = torch.zeros(SHAPE, dtype=torch.bfloat16)
    k2, v2 = through_frame(name, z, z, torch.bfloat16)
    assert k2.dtype == torch.bfloat16 and torch.equal(k2, z) and torch.equal(v2, z)


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_lossy_codecs_refuse_non_finite(name: str) -> None:
    k, v = kv(torch.float32)
    k[3, 1, 2] = float("nan")
    with pytest.raises(CodecError):
        CODECS_CTX.codec(name).encode(k, v, 0)


@pytest.mark.parametrize("name", ["raw", "int8", "fp8"])
def test_bad_inputs_and_payloads_are_typed(name: str) -> None:
    codec = CODECS_CTX.codec(name)
    k, v = kv(torch.float32)
    with pytest.raises(CodecError):
        codec.encode(k, v[:-1], 0)
    with pytest.raises(CodecError):
        codec.encode(k.to(torch.int32), v.to(torch.int32), 0)
    params, payload = codec.encode(k, v, 0)
    with pytest.raises(FrameCorrupted):
        codec.decode(params, payload[:-1], SHAPE, torch.float32, 0)
    with pytest.raises(FrameCorrupted):
        codec.decode(params, payload, (SHAPE[0] + 1, *SHAPE[1:]), torch.float32, 0)
    with pytest.raises(FrameCorrupted):
        codec.decode(params + b"x", payload, SHAPE, torch.float32, 0)


def test_registry() -> None:
    assert CODECS[:3] == ("raw", "int8", "fp8") and "cachegen" in CODECS
    assert len(set(CODEC_IDS.values())) == len(CODEC_IDS)
    ctx = CodecContext()
    assert ctx.available()[:3] == ["raw", "int8", "fp8"]
    for name in ctx.available():
        c = ctx.codec(name)
        assert c.name == name and ctx.codec_by_id(c.codec_id) is c
    assert ctx.codec("raw").lossless and not ctx.codec("int8").lossless
    with pytest.raises(UnknownCodec):
        ctx.codec("zstd")
    with pytest.raises(UnknownCodec):
        ctx.codec_by_id(999)
    if "cachegen" not in ctx.available():
        with pytest.raises(UnknownCodec, match="rANS"):
            ctx.codec("cachegen")
    # a context without a model asks for plain cachegen: it cannot recompute layer 0
    assert ctx.pull_codec("cachegen_l0") == "cachegen" and ctx.pull_codec("int8") == "int8"
