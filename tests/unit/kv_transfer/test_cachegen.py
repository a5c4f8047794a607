"""CacheGen format v1 (`cachegen_v1`: a context without a transform): error bound per element, compression on
structured KV, static and chunk tables, typed errors on damaged input, the frame round trip, and the GPU
quantization path (when CUDA is present)."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from calibration.plan import profile_tables
from kv_transfer.codec import CodecContext
from kv_transfer.codec.cachegen import CacheGenCodec
from kv_transfer.codec.cachegen_core import LEVELS
from kv_transfer.codec.cachegen_tables import TABLES_FILE, CacheGenTables, load_model_tables
from kv_transfer.codec.cachegen_v1 import FLAG_WIDE, error_allowance, error_bounds, parse_params
from kv_transfer.codec.int8 import Int8Codec
from kv_transfer.errors import CodecError, FrameForeign, KVTransferError
from kv_transfer.frame import decode_frame, encode_frame
from pdserve.errors import PDServeError

torch.set_num_threads(1)

NUM_LAYERS = 8
HKV, D = 4, 64


def synthetic_kv(
    t: int,
    layer: int = 0,
    seed: int = 0,
    *,
    hkv: int = HKV,
    d: int = D,
    rho: float = 0.8,
    model_seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A structured stand-in for a trained model's KV of one layer ([t, hkv, d] fp32 each).

    The model (model_seed, layer) fixes per-channel offsets and gains, a few outlier channels (x6 in K, x4 in
    V) and the projections; the content (seed) is a rank-16 AR(1) process (neighbouring tokens correlate with
    rho) plus noise (Student-t in V). Keys get RoPE; token 0 is a sink (large keys, small values).
    """
    mrng = np.random.default_rng([model_seed, layer])
    rng = np.random.default_rng([model_seed, layer, seed, 1])
    c, r = hkv * d, 16

    def gains(p_out: float, big: float) -> np.ndarray:
        g = np.exp(0.4 * mrng.standard_normal(c))
        g[mrng.random(c) < p_out] *= big
        return g

    gk, gv = gains(0.04, 6.0), gains(0.02, 4.0)
    k_off = mrng.standard_normal(c) * 0.8 * gk
    wk, wv = mrng.standard_normal((r, c)) / 4, mrng.standard_normal((r, c)) / 4
    e = rng.standard_normal((t, r))
    z = np.empty((t, r))
    z[0] = e[0]
    for i in range(1, t):
        z[i] = rho * z[i - 1] + math.sqrt(1 - rho * rho) * e[i]
    k = (k_off + gk * (0.8 * z @ wk + 0.5 * rng.standard_normal((t, c)))).reshape(t, hkv, d)
    ang = np.arange(t)[:, None] * (10000.0 ** (-np.arange(0, d, 2) / d))[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    k1, k2 = k[..., : d // 2], k[..., d // 2 :]
    k = np.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=-1)
    v = (gv * (0.6 * z @ wv + 0.6 * rng.standard_t(5, size=(t, c)))).reshape(t, hkv, d)
    k[0] *= 3.0
    v[0] *= 0.1
    return torch.from_numpy(k).float(), torch.from_numpy(v).float()


def v1_codec(
    level: str = "default", tables: CacheGenTables | None = None, num_layers: int | None = NUM_LAYERS, **kw
) -> CacheGenCodec:
    """A cachegen codec whose context holds the model's depth and `tables` but no transform: format v1."""
    return CacheGenCodec(CodecContext(num_layers, tables), level, **kw)


def assert_within_bound(x: torch.Tensor, x_hat: torch.Tensor, bound: torch.Tensor) -> None:
    """|x - x_hat| <= the quantizer's bound, plus fp32 arithmetic and the output dtype's rounding."""
    excess = (x.float() - x_hat.float()).abs() - error_allowance(x, x_hat, bound)
    assert float(excess.max()) <= 0, f"error exceeds the bound by {float(excess.max())}"


def roundtrip(codec: CacheGenCodec, k: torch.Tensor, v: torch.Tensor, layer: int, **kw):
    params, payload = codec.encode(k, v, layer)
    k2, v2 = codec.decode(params, payload, tuple(k.shape), k.dtype, layer, **kw)
    return params, payload, k2, v2


# ---- error bound -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 37, 1201])
def test_roundtrip_within_error_bound(dtype: torch.dtype, t: int) -> None:
    k, v = synthetic_kv(t, layer=1)
    k, v = k.to(dtype), v.to(dtype)
    for level in LEVELS:
        codec = v1_codec(level, chunk_tokens=512)
        params, _, k2, v2 = roundtrip(codec, k, v, 1)
        assert k2.dtype == dtype and k2.shape == k.shape and v2.shape == v.shape
        kb, vb = error_bounds(params, tuple(k.shape))
        assert_within_bound(k, k2, kb)
        assert_within_bound(v, v2, vb)


def test_error_bound_is_the_quantizer_step() -> None:
    """The bound is half a quantization step: h_c / (2M) for keys (per channel), s_t / (2M) for values."""
    k, v = synthetic_kv(300, layer=5)
    params, _ = v1_codec().encode(k, v, 5)
    p = parse_params(params, tuple(k.shape))
    kb, vb = error_bounds(params, tuple(k.shape))
    (ch,) = p.chunks
    assert ch.start == 0 and ch.tokens == 300
    mk, mv = p.k_bins // 2 - 1, p.v_bins // 2 - 1
    kf, vf = k.reshape(300, -1), v.reshape(300, -1)
    half_range = (kf.amax(0) - kf.amin(0)) / 2
    # stored scales are rounded up: never below the exact ones, and only slightly above
    assert torch.all(ch.scales[1] >= half_range * (1 - 1e-3))
    assert torch.all(ch.scales[1] <= half_range * 1.002 + 1e-4)
    assert torch.all(ch.scales[2] >= vf.abs().amax(1))
    assert torch.all(ch.scales[2] <= vf.abs().amax(1) * 2 ** (1 / 16) * 1.0001)
    torch.testing.assert_close(kb.reshape(300, -1)[1], ch.scales[1] / (2 * mk))
    torch.testing.assert_close(vb.reshape(300, -1)[:, 0], ch.scales[2] / (2 * mv))


def test_constant_and_zero_inputs() -> None:
    codec = v1_codec()
    for k in (torch.zeros(50, 2, 8), torch.full((50, 2, 8), 3.25)):
        _, _, k2, v2 = roundtrip(codec, k, torch.zeros_like(k), 0)
        torch.testing.assert_close(k2, k, atol=2e-3, rtol=0)
        assert torch.equal(v2, torch.zeros_like(k))


def test_large_values_use_fp32_scales() -> None:
    k, v = synthetic_kv(64)
    k, v = (k * 1e6).to(torch.bfloat16), v.to(torch.bfloat16)  # beyond fp16's range
    params, _, k2, v2 = roundtrip(v1_codec(), k, v, 0)
    assert parse_params(params, tuple(k.shape)).flags & FLAG_WIDE
    kb, vb = error_bounds(params, tuple(k.shape))
    assert_within_bound(k, k2, kb)
    assert_within_bound(v, v2, vb)


# ---- compression -------------------------------------------------------------------------------------


def model_bits(codec: CacheGenCodec, t: int = 1024, seed: int = 0) -> tuple[int, int, int]:
    """(cachegen bytes, int8 bytes, fp16 bytes) of all NUM_LAYERS layers of synthetic KV."""
    ours = int8 = fp16 = 0
    for layer in range(NUM_LAYERS):
        k, v = synthetic_kv(t, layer, seed)
        params, payload = codec.encode(k.half(), v.half(), layer)
        ours += len(params) + len(payload)
        p8, pay8 = Int8Codec().encode(k.half(), v.half(), layer)
        int8 += len(p8) + len(pay8)
        fp16 += 2 * 2 * k.numel()
    return ours, int8, fp16


# No compression ratio is claimed on synthetic_kv (whose spread this file chooses): the size bound on real KV
# is test_cachegen_klt.py's test_shipped_model_default_level_beats_cachegen_quantizers (the shipped model).


def test_levels_order_size_and_shallow_layers_get_more_bins() -> None:
    sizes = {lv: model_bits(v1_codec(lv), t=256)[0] for lv in LEVELS}
    assert sizes["high"] > sizes["default"] > sizes["low"]
    for lv in LEVELS:
        codec = v1_codec(lv)
        k0, v0 = codec.bins_for(0)
        kn, vn = codec.bins_for(NUM_LAYERS - 1)
        assert k0 >= kn and v0 >= vn and (k0 > kn or v0 > vn)


def test_short_chunks_fall_back_to_one_shared_table() -> None:
    """Per-channel tables would cost more than they save on a few tokens: the encoder picks a shared one."""
    k, v = synthetic_kv(4, layer=6)
    p = parse_params(v1_codec().encode(k, v, 6)[0], tuple(k.shape))
    assert (p.chunks[0].k_mode, p.chunks[0].v_mode) == (1, 1)
    k, v = synthetic_kv(1024, layer=6)
    p = parse_params(v1_codec().encode(k, v, 6)[0], tuple(k.shape))
    assert (p.chunks[0].k_mode, p.chunks[0].v_mode) == (0, 0)


# ---- static tables -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tables() -> CacheGenTables:
    samples = [(layer, *synthetic_kv(512, layer, seed)) for layer in (0, 7) for seed in (1, 2)]
    return profile_tables(samples, NUM_LAYERS)


def test_static_tables_roundtrip_and_save_load(tables: CacheGenTables, tmp_path) -> None:
    k, v = synthetic_kv(700, 7, seed=0)
    static = v1_codec(tables=tables, num_layers=None)
    params, payload, k2, v2 = roundtrip(static, k, v, 7)
    p = parse_params(params, tuple(k.shape))
    assert p.table_id == tables.table_id and {p.chunks[0].k_mode, p.chunks[0].v_mode} == {2}
    kb, vb = error_bounds(params, tuple(k.shape))
    assert_within_bound(k, k2, kb)
    assert_within_bound(v, v2, vb)
    chunk_params, chunk_payload = v1_codec().encode(k, v, 7)
    assert len(params) < len(chunk_params)  # no tables shipped
    static_bytes, chunk_bytes = len(params) + len(payload), len(chunk_params) + len(chunk_payload)
    assert static_bytes < 1.05 * chunk_bytes, (static_bytes, chunk_bytes)
    # a layer the tables do not cover falls back to chunk tables
    p3 = parse_params(static.encode(k, v, 3)[0], tuple(k.shape))
    assert p3.table_id == 0 and p3.chunks[0].k_mode in (0, 1)
    # saved beside the model and loaded back: same id, decodes what the first instance encoded
    tables.save(tmp_path / TABLES_FILE)
    loaded = load_model_tables(tmp_path)
    assert loaded is not None and loaded.table_id == tables.table_id
    k3, v3 = v1_codec(tables=loaded).decode(params, payload, tuple(k.shape), k.dtype, 7)
    assert torch.equal(k3, k2) and torch.equal(v3, v2)
    assert load_model_tables(tmp_path / "nowhere") is None


def test_static_table_unknown_to_the_decoder_is_a_typed_error(tables: CacheGenTables) -> None:
    k, v = synthetic_kv(64, 0)
    other = profile_tables([(0, *synthetic_kv(64, 0, model_seed=9))], NUM_LAYERS)
    params, payload = v1_codec(tables=other).encode(k, v, 0)
    for ctx in (CodecContext(NUM_LAYERS), CodecContext(NUM_LAYERS, tables)):  # no tables, or another model's
        with pytest.raises(FrameForeign):
            CacheGenCodec(ctx).decode(params, payload, tuple(k.shape), k.dtype, 0)
    v1_codec(tables=other).decode(params, payload, tuple(k.shape), k.dtype, 0)


def test_the_contexts_tables_are_used_where_they_cover_the_layer(tables: CacheGenTables) -> None:
    k, v = synthetic_kv(64, 7)
    params, payload, _, _ = roundtrip(v1_codec(tables=tables), k, v, 7)
    assert parse_params(params, tuple(k.shape)).table_id == tables.table_id
    assert parse_params(v1_codec().encode(k, v, 7)[0], tuple(k.shape)).table_id == 0


def test_bad_table_file_is_a_typed_error(tmp_path) -> None:
    (tmp_path / TABLES_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(CodecError):
        load_model_tables(tmp_path)


def test_a_models_tables_code_its_kv(tiny_model_dir, tmp_path) -> None:
    """Tables profiled on a checkpoint's KV (as the calibration does) code that model's KV within the bound;
    a context made from the model directory knows its depth, so the level rule picks its shallow layers."""
    from engine.runner import ModelRunner
    from engine.sequence import Sequence

    runner = ModelRunner(str(tiny_model_dir), num_kv_blocks=16)
    ids = torch.randint(
        0, runner.config.vocab_size, (200,), generator=torch.Generator().manual_seed(3)
    ).tolist()
    seq = Sequence("kv", ids, blocks=list(range(13)))
    runner.prefill([seq])
    kv = [runner.kv_cache.read(layer, seq.blocks, len(ids)) for layer in range(runner.config.num_layers)]
    tables = profile_tables([(layer, k, v) for layer, (k, v) in enumerate(kv)], runner.config.num_layers)
    tables.save(tmp_path / TABLES_FILE)
    codec = v1_codec(tables=CacheGenTables.load(tmp_path / TABLES_FILE))
    for layer, (k, v) in enumerate(kv):
        params, payload, k2, v2 = roundtrip(codec, k, v, layer)
        assert parse_params(params, tuple(k.shape)).table_id == tables.table_id
        kb, vb = error_bounds(params, tuple(k.shape))
        assert_within_bound(k, k2, kb)
        assert_within_bound(v, v2, vb)
    ctx = CodecContext.from_model_dir(tiny_model_dir)  # no calibration files beside this model
    assert ctx.num_layers == 2 and ctx.tables is None and ctx.transform is None and ctx.layer0 is None
    assert [CacheGenCodec(ctx).bins_for(layer) for layer in (0, 1)] == [(16, 16), (8, 8)]
    assert CacheGenCodec().bins_for(1) == (16, 16)  # unknown depth: 32 layers assumed, 0-3 shallow


# ---- damaged input -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoded() -> tuple[bytes, bytes, tuple[int, ...]]:
    k, v = synthetic_kv(300, 3)
    params, payload = v1_codec(chunk_tokens=128).encode(k, v, 3)
    return params, payload, tuple(k.shape)


def test_damaged_params_raise_typed_errors(encoded, damaged_params_rejected) -> None:
    params, payload, shape = encoded
    damaged_params_rejected(CacheGenCodec(), params, payload, shape, 3, cuts=(0, 5))


def test_damaged_payload_raises_typed_errors(encoded, damaged_payload_rejected) -> None:
    params, payload, shape = encoded
    damaged_payload_rejected(CacheGenCodec(), params, payload, shape, 3)


def test_consistent_but_wrong_payload_is_caught_by_the_entropy_decoder(encoded) -> None:
    """With the crc recomputed (as if the encoder itself were wrong), bad words are still a typed error."""
    params, payload, shape = encoded
    words = np.frombuffer(payload, dtype="<u4").copy()
    words[len(words) // 3] ^= 0x00FF00FF
    bad_payload = words.tobytes()
    bad_params = bytearray(params[:-4])
    bad_params[22:26] = zlib.crc32(bad_payload).to_bytes(4, "little")
    bad_params += zlib.crc32(bytes(bad_params)).to_bytes(4, "little")
    with pytest.raises(PDServeError):
        CacheGenCodec().decode(bytes(bad_params), bad_payload, shape, torch.float32, 3)


def test_random_params_never_crash() -> None:
    rng = np.random.default_rng(2)
    for n in (0, 1, 30, 200):
        for _ in range(20):
            junk = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            with pytest.raises(KVTransferError):
                CacheGenCodec().decode(b"CG" + junk, junk, (16, 2, 8), torch.float32, 0)


def test_bad_input_to_encode_is_a_codec_error() -> None:
    k, v = synthetic_kv(8)
    codec = CacheGenCodec()
    bad_k = k.clone()
    bad_k[3, 0, 0] = float("nan")
    for a, b in ((bad_k, v), (k, v[:4]), (k.reshape(8, -1), v.reshape(8, -1)), (k, v.half()), (k[:0], v[:0])):
        with pytest.raises(CodecError):
            codec.encode(a, b, 0)
    with pytest.raises(CodecError):
        CacheGenCodec(level="ultra")
    with pytest.raises(CodecError):
        CacheGenCodec(chunk_tokens=1)


# ---- integration -----------------------------------------------------------------------------------------


def test_frame_roundtrip_and_registry() -> None:
    codec = CodecContext().codec("cachegen")
    assert isinstance(codec, CacheGenCodec) and codec.codec_id == 4 and not codec.lossless
    k, v = synthetic_kv(200, 2)
    k, v = k.half(), v.half()
    params, parts = codec.encode_parts(k, v, 2)
    buf = encode_frame(
        codec_id=codec.codec_id,
        fingerprint=7,
        transfer_id="t1",
        layer=2,
        shape=tuple(k.shape),
        dtype=k.dtype,
        params=params,
        payload=parts,
    )
    f = decode_frame(buf, expect_fingerprint=7)
    k2, v2 = codec.decode(f.params, f.payload, f.shape, f.dtype, f.layer)
    kb, vb = error_bounds(f.params, f.shape)
    assert_within_bound(k, k2, kb)
    assert_within_bound(v, v2, vb)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_quantization_matches_cpu_bound() -> None:
    k, v = synthetic_kv(900, 1)
    codec = v1_codec()
    params, payload = codec.encode(k.cuda().half(), v.cuda().half(), 1)
    for device in (None, "cuda"):
        k2, v2 = codec.decode(params, payload, tuple(k.shape), torch.float16, 1, device=device)
        assert k2.device.type == (device or "cpu")
        kb, vb = error_bounds(params, tuple(k.shape))
        assert_within_bound(k.half(), k2.cpu(), kb)
        assert_within_bound(v.half(), v2.cpu(), vb)
    cpu_params, cpu_payload = codec.encode(k.half(), v.half(), 1)
    assert abs(len(cpu_payload) - len(payload)) <= 0.01 * len(payload)


# ---- frames of older builds --------------------------------------------------------------------------


def test_older_builds_v1_options_are_foreign(encoded) -> None:
    """Raw tokens, anchor/delta grouping and constriction coding were removed: such frames (crc intact) are
    FrameForeign, never misread."""
    params, payload, shape = encoded
    for offset, value in ((7, 1), (8, 10), (6, params[6] & ~2)):  # raw tokens, anchor group, FLAG_RANS off
        bad = bytearray(params[:-4])
        bad[offset] = value
        bad += zlib.crc32(bytes(bad)).to_bytes(4, "little")
        with pytest.raises(FrameForeign):
            CacheGenCodec().decode(bytes(bad), payload, shape, torch.float32, 3)
