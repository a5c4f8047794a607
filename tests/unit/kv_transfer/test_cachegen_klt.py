"""CacheGen transform coding (params v5): deterministic Laplace tables, the per-token error bound, profiling a
checkpoint, the shipped model's quality at its default level against CacheGen's own quantizers, and typed
errors on damaged, foreign or random input."""

from __future__ import annotations

import hashlib
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from kv_transfer.codec import CodecContext, rans
from kv_transfer.codec import cachegen_klt as klt
from kv_transfer.codec.cachegen import CacheGenCodec
from kv_transfer.codec.cachegen_core import FP16_SAFE, store_scale_np
from kv_transfer.codec.cachegen_klt import KLTransform
from kv_transfer.errors import CodecError, FrameCorrupted, FrameForeign, KVTransferError
from pdserve.errors import PDServeError

pytestmark = pytest.mark.skipif(not rans.available(), reason="transform coding needs the compiled rANS coder")
torch.set_num_threads(1)

SHIPPED = Path(__file__).resolve().parents[3] / "models" / "pdserve-tiny-py"
HKV, D, LAYERS = 2, 16, 3


def random_transform(seed: int = 0, layers: int = LAYERS) -> KLTransform:
    """A well-conditioned random transform (orthogonal times a diagonal), like a profiled one in shape."""
    g = torch.Generator().manual_seed(seed)
    c = HKV * D
    fwd = np.zeros((layers, 2, c, c), np.float32)
    for i in range(layers):
        for kind in range(2):
            q, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
            s = torch.exp(0.5 * torch.randn(c, generator=g, dtype=torch.float64))
            fwd[i, kind] = (q * s).numpy()
    inv = np.linalg.inv(fwd.astype(np.float64)).astype(np.float32)
    inv_freq = (1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32)
    steps = {
        lv: np.full((layers, 2), s, np.float32) for lv, s in (("high", 0.02), ("default", 0.05), ("low", 0.2))
    }
    return KLTransform(fwd, inv, inv_freq, HKV, steps)


def kv(t: int, seed: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, HKV, D, generator=g) * 2
    k = base + torch.randn(t, HKV, D, generator=g) * torch.linspace(0.1, 2, D)
    v = torch.randn(t, HKV, D, generator=g) * torch.linspace(2, 0.1, D)
    return k * scale, v * scale


def klt_codec(tr: KLTransform, level: str = "default", **kw) -> CacheGenCodec:
    """A cachegen codec whose context holds the transform `tr`: format v4 where it covers the layer."""
    return CacheGenCodec(CodecContext(LAYERS, transform=tr), level, **kw)


def roundtrip(codec: CacheGenCodec, k, v, layer: int, **kw):
    params, payload = codec.encode(k, v, layer)
    k2, v2 = codec.decode(params, payload, tuple(k.shape), k.dtype, layer, **kw)
    return params, payload, k2, v2


def assert_token_bound(x: torch.Tensor, x_hat: torch.Tensor, bound: torch.Tensor) -> None:
    """Per-token L2 error <= the frame's bound + fp32 arithmetic + the output dtype's rounding."""
    eps = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[x_hat.dtype]
    err = (x.float() - x_hat.float()).flatten(1).norm(dim=1)
    slack = bound * 1e-4 + eps * x.float().flatten(1).norm(dim=1) * 2 + 1e-5
    assert bool((err <= bound + slack).all()), f"max excess {float((err - bound - slack).max())}"


# ---- Laplace tables ------------------------------------------------------------------------------------------


def test_laplace_weights_are_bit_identical_everywhere() -> None:
    """The weights come from IEEE products only; this digest pins them, so a host that computes them
    differently (and would build other rANS tables than its peer) fails here, not on the wire."""
    w = klt._laplace_weights()
    assert w.shape == (256, klt.QMAX + 1)
    assert w[0, 0] == 1 << 20 and w[0, 1] == 0  # rho 0: all mass at 0
    assert (np.diff(w, axis=1) <= 0).all()
    assert hashlib.sha256(w.tobytes()).hexdigest()[:16] == LAPLACE_DIGEST


LAPLACE_DIGEST = "944514f8e54dc37a"


def test_laplace_tables_cover_exactly_the_support() -> None:
    rho = np.array([0, 40, 200, 255], np.uint8)
    amax = np.array([0, 3, 127, 50], np.uint8)
    tab = klt.laplace_tables(rho, amax)
    assert (tab.freq.sum(1) == rans.PROB_SCALE).all()
    mags = np.abs(np.arange(-klt.QMAX, klt.QMAX + 1))
    for c in range(4):
        inside = mags <= amax[c]
        assert (tab.freq[c][inside] >= 1).all() and (tab.freq[c][~inside] == 0).all()


def _w() -> np.ndarray:
    return klt._symbol_weights()


def test_fitted_models_prefer_the_matching_spread_and_round_trip() -> None:
    g = np.random.default_rng(0)
    narrow = np.clip(np.round(g.laplace(0, 0.5, (1, 4000))), -127, 127)
    wide = np.clip(np.round(g.laplace(0, 20, (1, 4000))), -127, 127)
    sym = (np.stack([narrow, wide]) + klt.QMAX).astype(np.uint8)  # one chunk: [2 parts, 1 component, 4000]
    bounds = np.array([0, 4000])
    words, nw, rho, amax = rans.code5(sym, 1, bounds, klt.QMAX, _w())
    assert rho[0, 0, 0] < rho[0, 1, 0]  # wider spread: r closer to 1, a larger rho
    assert amax[0, :, 0].tolist() == np.abs(sym.astype(int) - klt.QMAX).max((1, 2)).tolist()
    assert nw[0, 0] < nw[0, 1]  # the narrow part costs fewer words
    back = rans.uncode5(words, nw, rho, amax, bounds, klt.QMAX, _w())
    assert np.array_equal(back, sym.reshape(-1))
    with pytest.raises(FrameCorrupted):  # each part's words only decode with their own models
        rans.uncode5(words, nw, rho[:, ::-1], amax[:, ::-1], bounds, klt.QMAX, _w())


@pytest.mark.parametrize("t", [1, 2, 3, 5, 8, 15, 16, 17, 31, 33, 63, 513, 1030])
def test_coder_round_trips_every_row_length_on_both_paths(t: int) -> None:
    """Rows of lengths around the 16 states and the 8-lane vectors (the scalar tails), several chunks, odd
    channel counts, and rows of a single symbol (amax 0: coded as nothing); the AVX2 coder (where the CPU has
    it) and the portable one write the same words and each decodes the other's."""
    g = np.random.default_rng(t)
    c = 5
    spread = np.array([0.0, 0.3, 2.0, 9.0, 60.0])[:, None]
    bounds = np.array([0, t] if t < 4 else [0, t // 3, t])
    blocks = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        q = np.clip(np.round(g.laplace(0, 1, (2, c, b - a)) * spread), -127, 127)
        blocks.append((q + klt.QMAX).astype(np.uint8).reshape(-1))
    sym = np.concatenate(blocks)
    words, nw, rho, amax = rans.code5(sym, c, bounds, klt.QMAX, _w(), simd=False)
    assert words.size == nw.sum() and (nw >= 2 * rans.STATES).all()
    w_simd, nw_simd, _, _ = rans.code5(sym, c, bounds, klt.QMAX, _w(), simd=True)
    assert np.array_equal(w_simd, words) and np.array_equal(nw_simd, nw)
    for simd in (False, True):
        assert np.array_equal(rans.uncode5(words, nw, rho, amax, bounds, klt.QMAX, _w(), simd=simd), sym)


@pytest.mark.parametrize("t", [1, 7, 31, 32, 33, 64, 95, 513])
def test_encoder_quantizes_alike_on_both_paths(t: int) -> None:
    """encode5 (statistics given: centre, step) with the AVX2 quantizer (32 values a step, a scalar tail) and
    with the portable loop: the same words, counts and fitted models -- over row lengths around the vector
    width, values clamped at +-QMAX, exact .5 ties (round to even) and steps that are not powers of two."""
    g = np.random.default_rng(t)
    c = 16
    y0 = (g.laplace(0, 1, (c, t)) * np.geomspace(0.01, 400, c)[:, None]).astype(np.float32)
    y1 = (g.standard_normal((c, t)) * 3).astype(np.float32)
    y1[0] = np.arange(t, dtype=np.float32) * 0.5 - 7.5  # ties on steps of 1 (centre 0 below)
    bounds = np.array([0, t] if t < 4 else [0, t // 3, t])
    nch = bounds.size - 1
    centre = np.zeros((nch, 2, c), np.float32)
    centre[:, 0] = g.standard_normal((nch, c)).astype(np.float32) * 0.1
    step = np.full((nch, 2, c), 0.37, np.float32)
    step[:, 1, 0] = 1.0
    out = {
        simd: rans.encode5(y0, y1, bounds, centre, step, klt.QMAX, _w(), simd=simd) for simd in (False, True)
    }
    for a, b in zip(out[False], out[True], strict=True):
        assert np.array_equal(a, b)
    words, nw, rho, amax = out[True]
    assert (amax[:, 0].max() == klt.QMAX) and (amax <= klt.QMAX).all()  # some rows clamp
    sym = rans.uncode5(words, nw, rho, amax, bounds, klt.QMAX, _w())
    t0, t1 = int(bounds[0]), int(bounds[1])
    want = np.clip(np.rint((y1[0, t0:t1] - centre[0, 1, 0]) / np.float32(1.0)), -127, 127) + klt.QMAX
    assert np.array_equal(sym[c * (t1 - t0) : c * (t1 - t0) + (t1 - t0)], want.astype(np.uint8))  # V row 0


def test_compiled_laplace_rows_are_the_same_on_both_paths() -> None:
    """The coders' AVX2 rows (exact division, vector prefix sums) equal the portable ones for every amax and a
    spread of rho (the ends of both ranges included): encoder and decoder build identical tables on any CPU."""
    amax = np.arange(klt.QMAX + 1, dtype=np.uint8)
    for rho in sorted({0, 1, 2, 31, 32, 33, 127, 128, 200, 254, 255, *range(3, 256, 23)}):
        r = np.full(amax.size, rho, np.uint8)
        fast = rans.lap_tables(r, amax, klt.QMAX, _w(), False, simd=True)
        portable = rans.lap_tables(r, amax, klt.QMAX, _w(), False, simd=False)
        assert np.array_equal(fast.freq, portable.freq) and np.array_equal(fast.cum, portable.cum), rho
        assert (fast.freq.sum(1) == rans.PROB_SCALE).all()


def test_compiled_weights_are_cachegen_klts() -> None:
    """The AVX2 table builders read the library's own copy of the Laplace weights: it equals cachegen_klt's
    (checked when those are first built), and a different table is refused."""
    rans.check_weights(_w(), klt.QMAX)
    other = _w().copy()
    other[7, klt.QMAX + 3] += 1
    with pytest.raises(CodecError):
        rans.check_weights(other, klt.QMAX)


@pytest.mark.parametrize("simd", [False, True])
def test_coder_rejects_damaged_words_and_counts(simd: bool) -> None:
    g = np.random.default_rng(1)
    c, t = 3, 600
    sym = (np.clip(np.round(g.laplace(0, 3, 2 * c * t)), -127, 127) + klt.QMAX).astype(np.uint8)
    bounds = np.array([0, t])
    words, nw, rho, amax = rans.code5(sym, c, bounds, klt.QMAX, _w(), simd=simd)
    for i in (0, 3, 8, words.size // 2, words.size - 1):
        bad = words.copy()
        bad[i] ^= 0x1234
        try:
            got = rans.uncode5(bad, nw, rho, amax, bounds, klt.QMAX, _w(), simd=simd)
        except FrameCorrupted:
            continue
        assert not np.array_equal(got, sym)  # an altered word never passes as the original
    for cut in (1, 9):
        short = nw.copy()
        short[0, 1] -= cut
        with pytest.raises(FrameCorrupted):
            rans.uncode5(words[:-cut], short, rho, amax, bounds, klt.QMAX, _w(), simd=simd)
    with pytest.raises(FrameCorrupted):  # words left over
        rans.uncode5(np.append(words, np.uint16(7)), nw, rho, amax, bounds, klt.QMAX, _w(), simd=simd)


def _layer_input(t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    yk, yv = torch.randn(64, t, generator=g) * 3, torch.randn(64, t, generator=g) * 0.2
    bounds = [0, t] if t < 4 else [0, t // 2, t]
    stats = rans.stats4(yk.numpy(), yv.numpy(), np.array(bounds))
    plan = np.tile(np.array([[0.3, 0.05]], np.float32), (len(bounds) - 1, 1))
    return yk, yv, np.array(bounds), stats, plan


def _side_reference(stats: np.ndarray, plan: np.ndarray) -> tuple[bool, np.ndarray, np.ndarray]:
    """The side-information rule in numpy (what rans.side5 computes in C): (wide, centre, step) as stored."""
    wide = float(np.abs(stats[:, :, 1:]).max()) > FP16_SAFE or float(plan.max()) > FP16_SAFE / klt.QMAX
    centre = store_scale_np(stats[:, :, 0], wide, up=False)
    c = centre.astype(np.float32)
    spread = np.maximum(stats[:, :, 2] - c, c - stats[:, :, 1])
    step = np.maximum(spread / np.float32(klt.QMAX - 0.5), plan.astype(np.float32)[:, :, None])
    return wide, centre, store_scale_np(step, wide, up=True)


def test_compiled_side_information_is_the_numpy_rule() -> None:
    """rans.side5 (fp16 conversion in C) stores exactly what the numpy rule stores, fp16 and fp32, including
    values near fp16's subnormals and its largest finite values."""
    g = np.random.default_rng(3)
    for scale, t in ((1.0, 300), (1e-5, 40), (3e-8, 9), (400.0, 50), (7e4, 20)):
        yk = (g.standard_normal((64, t)) * scale).astype(np.float32)
        yv = (g.standard_normal((64, t)) * scale * 0.1).astype(np.float32)
        bounds = np.array([0, t // 2, t])
        stats = rans.stats4(yk, yv, bounds)
        for plan_step in (1e-7, 0.05, 3.0, 600.0):
            plan = np.full((2, 2), plan_step, np.float32)
            wide, centre, step = _side_reference(stats, plan)
            side = rans.side5(stats, plan, klt.QMAX)
            assert side.wide == wide
            assert (
                side.data.tobytes()
                == centre.astype(centre.dtype.newbyteorder("<")).tobytes()
                + step.astype(step.dtype.newbyteorder("<")).tobytes()
            )
            assert np.array_equal(side.centre, centre.astype(np.float32))
            assert np.array_equal(side.step, step.astype(np.float32))
            q = np.abs(np.rint((yk[:, : t // 2] - side.centre[0, 0][:, None]) / side.step[0, 0][:, None]))
            assert q.max() <= klt.QMAX


def test_torch_quantizer_makes_the_compiled_encoders_stream() -> None:
    """The path CUDA tensors take (torch quantization where y lives, fit and code on the host) run on CPU
    tensors produces the compiled encoder's exact words and side information from the same statistics."""
    for t in (1, 2, 7, 300):
        yk, yv, bounds, stats, plan = _layer_input(t, t)
        for scale in (1.0, 1e5):  # fp16 side information, fp32 (wide)
            y0, y1 = (yk * scale).contiguous(), (yv * scale).contiguous()
            side = rans.side5(rans.stats4(y0.numpy(), y1.numpy(), bounds), plan, klt.QMAX)
            assert side.wide == (scale > 1)
            layer = rans.encode5_layer(y0.numpy(), y1.numpy(), bounds, plan, klt.QMAX, _w())
            assert layer[0].wide == side.wide and layer[0].data.tobytes() == side.data.tobytes()
            fused = rans.encode5(y0.numpy(), y1.numpy(), bounds, side.centre, side.step, klt.QMAX, _w())
            sym = klt.quantize_torch(y0, y1, bounds.tolist(), side.centre, side.step).numpy()
            generic = rans.code5(sym, 64, bounds, klt.QMAX, _w())
            for a, b, c in zip(fused, generic, layer[1:], strict=True):
                assert np.array_equal(a, b) and np.array_equal(a, c)


def test_torch_statistics_match_the_compiled_ones() -> None:
    yk, yv, bounds, stats, _ = _layer_input(300, 4)
    np.testing.assert_allclose(klt._stats_torch(yk, yv, bounds.tolist()), stats, rtol=1e-5, atol=1e-6)
    bad = yk.clone()
    bad[3, 7] = float("nan")
    with pytest.raises(CodecError):
        rans.stats4(bad.numpy(), yv.numpy(), bounds)
    with pytest.raises(CodecError):
        klt._stats_torch(bad, yv, bounds.tolist())


def test_generic_paths_match_the_fused_ones() -> None:
    """Encode with torch statistics and quantizer (what CUDA inputs take) and decode with host rANS + torch
    dequantization (what CUDA outputs take): within the bound, and the generic decoder equals the fused one."""
    tr = random_transform()
    k, v = kv(150, 1)
    for fused_enc in (True, False):
        params, words = klt.encode(tr, "default", k, v, 1, [(0, 64), (64, 128), (128, 150)], fused=fused_enc)
        p = klt.parse(params, tuple(k.shape), 1, tr)
        allw = np.concatenate(words)
        fused = klt.decode(p, allw, tuple(k.shape), torch.float32, 1, torch.device("cpu"))
        generic = klt.decode(p, allw, tuple(k.shape), torch.float32, 1, torch.device("cpu"), fused=False)
        for a, b in zip(fused, generic, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        kb, vb = klt.error_bounds_klt(params, tuple(k.shape), 1, tr)
        assert_token_bound(k, fused[0], kb)
        assert_token_bound(v, fused[1], vb)


@pytest.mark.parametrize("simd", [False, True])
def test_compiled_rope_with_fp16_on_one_side_matches_torch(simd: bool) -> None:
    """fp16 in -> fp32 out and fp32 in -> fp16 out, head sizes with and without a scalar tail: the rotation of
    torch's conversion, and the conversion torch makes (round to nearest even) of the rotation."""
    g = torch.Generator().manual_seed(6)
    for d in (32, 20):
        x = torch.randn(37, 3, d, generator=g) * 40
        cos, sin = klt.rope_tables(torch.rand(d // 2, generator=g), 0, 64, x.device)
        for sign in (1.0, -1.0):
            ref = klt._rotate(x.half().float(), cos[:37], sign * sin[:37])
            out = torch.empty_like(x)
            rans.rope_f16(x.half(), cos, sin, sign, out, simd=simd)
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
            out16 = torch.empty(x.shape, dtype=torch.float16)
            rans.rope_f16(x, cos, sin, sign, out16, simd=simd)
            ref16 = klt._rotate(x, cos[:37], sign * sin[:37])
            assert (out16.float() - ref16).abs().max() <= 1e-3 * ref16.abs().max()
            # the same rounding of the same products (an FMA may move a value across a rounding boundary)
            assert (out16 != ref16.half()).float().mean() < 0.01


def test_compiled_rope_matches_torch() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, 2, 32, generator=g)
    cos, sin = klt.rope_tables(torch.rand(16, generator=g), 0, 64, x.device)
    for sign in (1.0, -1.0):
        out = torch.empty_like(x)
        klt.rans.rope(x.numpy(), cos.numpy(), sin.numpy(), sign, out.numpy())
        torch.testing.assert_close(out, klt._rotate(x, cos[:37], sign * sin[:37]), rtol=1e-5, atol=1e-6)


# ---- round trips and the error bound ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 2, 37, 700])
def test_roundtrip_within_token_bound(dtype: torch.dtype, t: int) -> None:
    tr = random_transform()
    codec = klt_codec(tr, chunk_tokens=256)
    for layer in range(LAYERS):
        k, v = (x.to(dtype) for x in kv(t, layer))
        params, _, k2, v2 = roundtrip(codec, k, v, layer)
        assert params[2] == klt.VERSION
        assert k2.dtype == dtype and k2.shape == k.shape
        kb, vb = klt.error_bounds_klt(params, tuple(k.shape), layer, tr)
        assert_token_bound(k, k2, kb)
        assert_token_bound(v, v2, vb)


def test_levels_trade_size_for_error() -> None:
    tr = random_transform()
    k, v = kv(500)
    sizes, errs = [], []
    for level in ("high", "default", "low"):
        params, payload, k2, v2 = roundtrip(klt_codec(tr, level), k, v, 1)
        sizes.append(len(params) + len(payload))
        errs.append(float((k - k2).pow(2).mean() + (v - v2).pow(2).mean()))
    assert sizes[0] > sizes[1] > sizes[2]
    assert errs[0] < errs[1] < errs[2]


def test_constant_zero_and_huge_inputs() -> None:
    tr = random_transform()
    codec = klt_codec(tr)
    for k, v in (
        (torch.zeros(9, HKV, D), torch.zeros(9, HKV, D)),
        (torch.full((9, HKV, D), 3.0), torch.full((9, HKV, D), -1.5)),
        kv(64, scale=1e5),  # beyond fp16: centres and steps travel as fp32
    ):
        params, _, k2, v2 = roundtrip(codec, k, v, 0)
        assert (params[4] & klt.FLAG_WIDE) == (float(k.abs().max()) > 1e4)
        kb, vb = klt.error_bounds_klt(params, tuple(k.shape), 0, tr)
        assert_token_bound(k, k2, kb)
        assert_token_bound(v, v2, vb)


def test_no_transform_or_uncovered_layers_use_format_v1() -> None:
    tr = random_transform()
    k, v = kv(40)
    assert klt_codec(tr).encode(k, v, 0)[0][2] == klt.VERSION
    assert CacheGenCodec().encode(k, v, 0)[0][2] == 1
    assert klt_codec(tr).encode(k, v, LAYERS)[0][2] == 1  # layer beyond the transform
    k8, v8 = torch.randn(40, HKV, 8), torch.randn(40, HKV, 8)  # another head size
    assert klt_codec(tr).encode(k8, v8, 0)[0][2] == 1


def test_a_saved_transform_keeps_its_id_and_decodes_what_the_original_coded(tmp_path) -> None:
    tr = random_transform(seed=5)
    path = tmp_path / klt.TRANSFORM_FILE
    tr.save(path)
    back = KLTransform.load(path)
    assert back.transform_id == tr.transform_id
    for a, b in ((tr.fwd, back.fwd), (tr.inv, back.inv), (tr.steps["default"], back.steps["default"])):
        assert np.array_equal(a, b)
    k, v = kv(30)
    params, payload = klt_codec(tr).encode(k, v, 2)
    assert params[2] == klt.VERSION
    assert int.from_bytes(params[9:17], "little") == tr.transform_id
    k2, v2 = klt_codec(back).decode(params, payload, tuple(k.shape), torch.float32, 2)
    k3, v3 = klt_codec(tr).decode(params, payload, tuple(k.shape), torch.float32, 2)
    assert torch.equal(k2, k3) and torch.equal(v2, v3)
    with pytest.raises(CodecError):
        KLTransform.load(SHIPPED / "config.json")


def test_bad_transforms_are_codec_errors() -> None:
    tr = random_transform()
    with pytest.raises(CodecError):
        KLTransform(tr.fwd[:, :1], tr.inv[:, :1], tr.inv_freq, HKV, tr.steps)
    with pytest.raises(CodecError):
        KLTransform(tr.fwd, tr.inv, tr.inv_freq[:-1], HKV, tr.steps)
    with pytest.raises(CodecError):
        KLTransform(tr.fwd, tr.inv, tr.inv_freq, HKV, {"default": -tr.steps["default"]})
    bad = tr.fwd.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(CodecError):
        KLTransform(bad, tr.inv, tr.inv_freq, HKV, tr.steps)


# ---- damaged and foreign input -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoded():
    tr = random_transform(seed=1)
    k, v = kv(300, 3)
    params, payload = klt_codec(tr, chunk_tokens=128).encode(k, v, 1)
    return tr, params, payload, tuple(k.shape)


def test_damaged_params_raise_typed_errors(encoded, damaged_params_rejected) -> None:
    tr, params, payload, shape = encoded
    codec = klt_codec(tr)
    damaged_params_rejected(codec, params, payload, shape, 1, cuts=(3, 5))
    with pytest.raises(FrameForeign):  # a layer the transform does not have
        codec.decode(params, payload, shape, torch.float32, LAYERS)


def test_damaged_payload_raises_typed_errors(encoded, damaged_payload_rejected) -> None:
    tr, params, payload, shape = encoded
    damaged_payload_rejected(klt_codec(tr), params, payload, shape, 1)


def test_consistent_but_wrong_payload_is_caught_by_the_entropy_decoder(encoded) -> None:
    tr, params, payload, shape = encoded
    words = np.frombuffer(payload, dtype="<u2").copy()
    words[len(words) // 3] ^= 0x0FF0
    bad_payload = words.tobytes()
    crc_at = klt._HEADER4.size - 4
    bad_params = bytearray(params[:-4])
    bad_params[crc_at : crc_at + 4] = zlib.crc32(bad_payload).to_bytes(4, "little")
    bad_params += zlib.crc32(bytes(bad_params)).to_bytes(4, "little")
    with pytest.raises(PDServeError):
        klt_codec(tr).decode(bytes(bad_params), bad_payload, shape, torch.float32, 1)


def test_forged_side_information_with_a_valid_crc_is_frame_corrupted(encoded) -> None:
    """What the params' crc32 cannot see (a consistent forgery) the compiled side check does: a directory that
    does not add up to T or claims too few or too many words, a NaN centre, a step <= 0 or infinite, an amax
    past 127 -> FrameCorrupted, nothing decoded."""
    tr, params, payload, shape = encoded
    n = klt._HEADER4.unpack_from(params)[4]  # chunks
    c = shape[1] * shape[2]
    directory, side = klt._HEADER4.size, klt._HEADER4.size + 12 * n
    cases = [
        (directory, (shape[0] + 1).to_bytes(4, "little")),  # chunk 0 has one token more: sum != T
        (directory, (0).to_bytes(4, "little")),  # a chunk of no tokens
        (directory + 4, (3).to_bytes(4, "little")),  # fewer words than the 16 final states
        (directory + 4, (10**8).to_bytes(4, "little")),  # more words than symbols
        (side + 2 * 5, np.float16(np.nan).tobytes()),  # a centre
        (side + 2 * (n * 2 * c + 7), np.float16(0).tobytes()),  # a step of 0
        (side + 2 * (n * 2 * c + 8), np.float16(-1).tobytes()),  # a negative step
        (side + 2 * (n * 2 * c + 9), np.float16(np.inf).tobytes()),  # an infinite step
        (side + 2 * 2 * n * 2 * c + n * 2 * c + 3, bytes([128])),  # an amax past QMAX
    ]
    for at, value in cases:
        bad = bytearray(params[:-4])
        bad[at : at + len(value)] = value
        bad += zlib.crc32(bytes(bad)).to_bytes(4, "little")
        with pytest.raises(FrameCorrupted):
            klt_codec(tr).decode(bytes(bad), payload, shape, torch.float32, 1)


def test_unknown_transform_is_foreign(encoded) -> None:
    tr, params, payload, shape = encoded
    tid_at = 9
    bad = bytearray(params[:-4])
    bad[tid_at : tid_at + 8] = (tr.transform_id ^ 1).to_bytes(8, "little")
    bad += zlib.crc32(bytes(bad)).to_bytes(4, "little")
    with pytest.raises(FrameForeign, match="not loaded"):
        CacheGenCodec().decode(bytes(bad), payload, shape, torch.float32, 1)


def test_random_v5_params_never_crash() -> None:
    rng = np.random.default_rng(2)
    for n in (0, 1, 30, 200):
        for _ in range(20):
            junk = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            with pytest.raises(KVTransferError):
                CacheGenCodec().decode(b"CG\x04" + junk, junk, (16, HKV, D), torch.float32, 0)


@pytest.mark.parametrize("version", [0, 2, 4, 6, 255])
def test_unknown_format_versions_are_foreign(encoded, version: int) -> None:
    """v2 and v4 (retired coders) and versions this build does not know: FrameForeign, before any parsing."""
    tr, params, payload, shape = encoded
    bad = bytearray(params)
    bad[2] = version
    with pytest.raises(FrameForeign, match="version"):
        klt_codec(tr).decode(bytes(bad), payload, shape, torch.float32, 1)


# ---- a real checkpoint ---------------------------------------------------------------------------------------


def test_profile_a_checkpoint_and_code_its_kv(tiny_model_dir, tmp_path) -> None:
    """The calibration profiles a checkpoint (random ids: it ships no held-out text) into a transform whose
    inverse undoes it, with each level at its budget on the calibration prompts; the model's KV then
    round-trips within the bound."""
    from calibration import transform as prof
    from engine.kv_probe import KVProbe

    tr = prof.profile(tiny_model_dir, 512, window=256)
    tr.save(tmp_path / klt.TRANSFORM_FILE)
    tr = KLTransform.load(tmp_path / klt.TRANSFORM_FILE)
    eye = np.eye(tr.channels, dtype=np.float32)
    assert np.abs(tr.fwd @ tr.inv - eye).max() < 1e-3
    import json

    cal = json.loads(tr.meta["calibration"])
    for level, budget in prof.BUDGETS.items():
        assert abs(cal["levels"][level]["bits"] - budget) < 0.05 * budget
    assert (
        cal["levels"]["high"]["calib_kl"]
        <= cal["levels"]["default"]["calib_kl"]
        <= cal["levels"]["low"]["calib_kl"]
    )
    probe = KVProbe(str(tiny_model_dir), 200)
    ids = torch.randint(0, probe.cfg.vocab_size, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    codec = klt_codec(tr)
    for layer, (k, v) in enumerate(probe.prefill(ids)):
        params, _, k2, v2 = roundtrip(codec, k, v, layer)
        assert params[2] == klt.VERSION
        kb, vb = klt.error_bounds_klt(params, tuple(k.shape), layer, tr)
        assert_token_bound(k, k2, kb)
        assert_token_bound(v, v2, vb)


@pytest.mark.skipif(not (SHIPPED / klt.TRANSFORM_FILE).exists(), reason="the shipped model has no transform")
def test_shipped_model_default_level_beats_cachegen_quantizers() -> None:
    """On a held-out 1024-token prompt after the calibration span (bench.codec's prompt length; the last
    RECENT tokens' finer steps cost relatively more on shorter prompts): at the default level, transform
    coding is >= 6x smaller than fp16, and its mean per-token KL is <= 1e-3 nats and at least 5x below
    CacheGen's own quantizers (v1) at the same level -- which are themselves coded no smaller."""
    from bench.codec import SKIP_TOKENS, heldout_ids
    from engine.kv_probe import KVProbe, kl_per_token

    ctx = CodecContext.from_model_dir(SHIPPED)
    v1_ctx = CodecContext(ctx.num_layers, ctx.tables)  # the model's bit plan and tables, no transform
    probe = KVProbe(str(SHIPPED), 1200)
    ids = heldout_ids(str(SHIPPED))[SKIP_TOKENS + 3000 : SKIP_TOKENS + 3000 + 1152]
    prompt, feed = ids[:1024], ids[1024:]
    ref_kv = probe.prefill(prompt)
    ref = torch.log_softmax(probe.continuation_logits(len(prompt), feed), -1)
    result = {}
    for name, codec in (("klt", CacheGenCodec(ctx)), ("v1", CacheGenCodec(v1_ctx))):
        coded, nbytes = [], 0
        for layer, (k, v) in enumerate(ref_kv):
            params, payload, k2, v2 = roundtrip(codec, k, v, layer)
            assert params[2] == (klt.VERSION if name == "klt" else 1)
            nbytes += len(params) + len(payload)
            coded.append((k2, v2))
        probe.set_prompt_kv(coded)
        kl = float(kl_per_token(ref, probe.continuation_logits(len(prompt), feed)).mean())
        elements = sum(2 * k.numel() for k, _ in ref_kv)
        result[name] = (16 * elements / (8 * nbytes), kl)
    ratio, kl = result["klt"]
    assert ratio >= 6.0, result
    assert kl <= 1e-3 and kl * 5 <= result["v1"][1], result
    assert result["v1"][0] <= ratio * 1.1, result


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_transform_on_the_gpu() -> None:
    tr = random_transform()
    k, v = kv(600, 2)
    codec = klt_codec(tr)
    params, payload = codec.encode(k.cuda().half(), v.cuda().half(), 1)
    cpu_params, cpu_payload = codec.encode(k.half(), v.half(), 1)
    assert abs(len(cpu_payload) - len(payload)) <= 0.01 * len(payload)
    kb, vb = klt.error_bounds_klt(params, tuple(k.shape), 1, tr)
    for device in (None, "cuda"):
        k2, v2 = codec.decode(params, payload, tuple(k.shape), torch.float16, 1, device=device)
        assert k2.device.type == (device or "cpu")
        assert_token_bound(k.half(), k2.cpu(), kb)
        assert_token_bound(v.half(), v2.cpu(), vb)
    assert math.isfinite(float(k2.float().sum()))


@pytest.mark.skipif(not (SHIPPED / klt.TRANSFORM_FILE).exists(), reason="the shipped model has no transform")
@pytest.mark.parametrize("simd", ["1", "0"])
def test_shipped_model_kv_round_trips_within_the_bound_at_odd_lengths(simd: str, monkeypatch) -> None:
    """The shipped model's real KV (held-out text), with its rate table in force (steps scaled per length),
    through both the compiled path and the device path, with the AVX2 coder (where the CPU has it) and the
    portable one (PDSERVE_RANS_SIMD=0): every token within the frame's stated bound, at odd and even lengths
    around the chunk and RECENT boundaries."""
    monkeypatch.setenv("PDSERVE_RANS_SIMD", simd)
    from bench.codec import SKIP_TOKENS, heldout_ids
    from engine.kv_probe import KVProbe

    ctx = CodecContext.from_model_dir(SHIPPED)
    assert ctx.rate is not None and ctx.transform is not None
    probe = KVProbe(str(SHIPPED), 1100)
    ids = heldout_ids(str(SHIPPED))[SKIP_TOKENS + 5000 :]
    for t in (1, 3, 65, 257, 1027):
        kv = probe.prefill(ids[:t])
        for device_path in (False, True):
            codec = CacheGenCodec(ctx)
            codec.device_path = device_path
            for layer, (k, v) in enumerate(kv):
                params, _, k2, v2 = roundtrip(codec, k.half(), v.half(), layer)
                assert params[2] == klt.VERSION
                kb, vb = klt.error_bounds_klt(params, tuple(k.shape), layer, ctx.transform)
                assert_token_bound(k.half(), k2, kb)
                assert_token_bound(v.half(), v2, vb)


def test_rate_control_scales_the_steps_within_the_floor() -> None:
    """With a rate table in the context, the encoder takes the chosen setting (coarser steps: smaller frames,
    still within the bound); a zero floor (or a frame's max_kl of 0) takes the finest point; the decoder needs
    nothing."""
    from kv_transfer.codec.rate import RatePoint, RateTable

    tr = random_transform()
    points = tuple(RatePoint("plain", 256, s, 8.0, 4.0 / s, 1e-6 * s, 1.0) for s in (1.0, 3.0))
    rated = CacheGenCodec(CodecContext(LAYERS, transform=tr, rate=RateTable(points, {"plain": 1.0})))
    plain = klt_codec(tr)
    k, v = kv(300, 4)
    sizes = {}
    for name, codec, max_kl in (("plan", plain, None), ("rated", rated, None), ("zero", rated, 0.0)):
        params, parts = codec.encode_parts(k, v, 1, max_kl=max_kl)
        payload = b"".join(bytes(p) for p in parts)
        sizes[name] = len(params) + len(payload)
        k2, v2 = plain.decode(params, payload, tuple(k.shape), torch.float32, 1)  # any context decodes it
        kb, vb = klt.error_bounds_klt(params, tuple(k.shape), 1, tr)
        assert_token_bound(k, k2, kb)
        assert_token_bound(v, v2, vb)
    assert sizes["rated"] < 0.9 * sizes["plan"] and sizes["zero"] == sizes["plan"]
    assert (
        rated.rate_choice(300) is not None
        and CacheGenCodec(CodecContext(LAYERS, transform=tr)).rate_choice(300) is None
    )


def _reference_decode(tr: KLTransform, params: bytes, words: np.ndarray, shape, dtype, layer: int):
    """The two-step CPU decoder (decode5 into rows, then torch's inverse): what decode5_kv fuses."""
    p = klt.parse(params, shape, layer, tr)
    t, c = shape[0], shape[1] * shape[2]
    rows = np.empty((2, c, t), np.float32)
    rans.decode5(
        words, p.nw, p.rho, p.amax, p.centre, p.step, p.bounds, klt.QMAX, klt._symbol_weights(), *rows
    )
    return tr.inverse(torch.from_numpy(rows[0]), torch.from_numpy(rows[1]), layer, dtype)


@pytest.mark.parametrize("simd", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("t", [150, 7, 64])
def test_one_call_layer_encoder_and_decoder(simd: bool, dtype: torch.dtype, t: int) -> None:
    """encode5_kv / decode5_kv (transform, coding, inverse and RoPE in one call each), on the AVX2 path and the
    portable one, token counts with and without a partial 8-token tile: the frame decodes within the error
    bound; decode5_kv equals the two-step decoder (decode5 + torch's inverse) to fp32 rounding; the other
    path's decoder reads the frame too."""
    tr = random_transform()
    k, v = (x.to(dtype) for x in kv(t, 3))
    bounds = np.array([0, max(1, t - 20), t] if t > 21 else [0, t], np.int64)
    plan = np.full((bounds.size - 1, 2), 0.05, np.float32)
    cos, sin = tr._cos_sin(t, k.device)
    side, words, nw, rho, amax, crc = rans.encode5_kv(
        k, v, tr.fwd[1, 0], tr.fwd[1, 1], cos, sin, bounds, plan, klt.QMAX, klt._symbol_weights(), simd=simd
    )
    yk, yv = tr.forward(k, v, 1)  # torch's transform: the same frame up to the products' last bits
    ref = rans.encode5_layer(yk.numpy(), yv.numpy(), bounds, plan, klt.QMAX, klt._symbol_weights(), simd=simd)
    assert abs(words.size - ref[1].size) <= 8 and side.wide == ref[0].wide
    assert crc == zlib.crc32(words.astype("<u2").tobytes())
    # a v5 frame of these parts, as klt.encode writes it
    chunks = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    params, got = klt.encode(tr, "default", k, v, 1, chunks, steps=(0.05, 0.05), recent=(0, 1.0))
    allw = np.concatenate(got)
    shape = tuple(k.shape)
    for dec_simd in (simd, not simd):
        kd, vd = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
        n = bounds.size - 1
        rans.decode5_kv(
            params[klt._HEADER4.size : -4], n, t, False, klt.QMAX, allw, klt._symbol_weights(), tr.inv[1, 0],
            tr.inv[1, 1], cos, sin, kd, vd, simd=dec_simd,
        )  # fmt: skip
        rk, rv = _reference_decode(tr, params, allw, shape, dtype, 1)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(kd, rk, rtol=tol, atol=tol)
        torch.testing.assert_close(vd, rv, rtol=tol, atol=tol)
        kb, vb = klt.error_bounds_klt(params, shape, 1, tr)
        if dtype == torch.float32:
            assert_token_bound(k, kd, kb)
            assert_token_bound(v, vd, vb)


def test_one_call_decoder_rejects_damaged_frames() -> None:
    """decode_cpu (the CPU decoder the codec uses): a payload cut by a word, a payload of an odd byte count, a
    flipped word (CRC recomputed), and a directory whose counts do not match the payload are FrameCorrupted,
    not a crash or garbage."""
    tr = random_transform()
    k, v = kv(100, 4)
    shape = tuple(k.shape)
    params, words = klt.encode(tr, "default", k, v, 1, [(0, 64), (64, 100)])
    pay = np.concatenate(words).astype("<u2").tobytes()
    k0, _ = klt.decode_cpu(params, memoryview(pay), shape, torch.float32, 1, tr)
    assert torch.isfinite(k0).all()

    def with_crc(p: bytes, payload: bytes) -> bytes:
        head = bytearray(p)
        head[klt._HEADER4.size - 4 : klt._HEADER4.size] = zlib.crc32(payload).to_bytes(4, "little")
        head[-4:] = zlib.crc32(bytes(head[:-4])).to_bytes(4, "little")
        return bytes(head)

    flipped = bytearray(pay)
    flipped[200] ^= 0x5A
    for payload in (pay[:-2], pay[:-1], bytes(flipped), pay + b"\0\0"):
        with pytest.raises(FrameCorrupted):
            klt.decode_cpu(with_crc(params, payload), memoryview(payload), shape, torch.float32, 1, tr)
    with pytest.raises(FrameCorrupted):  # the header's CRC of the payload
        klt.decode_cpu(params, memoryview(bytes(flipped)), shape, torch.float32, 1, tr)


@pytest.mark.parametrize("simd", [False, True])
def test_crc32_equals_zlib(simd: bool) -> None:
    """rans.crc32 (PCLMULQDQ folding over 16-byte blocks where it runs, a byte table for the rest) is zlib.crc32
    at every length around the folding's boundaries and with any starting value."""
    rng = np.random.default_rng(9)
    for n in [*range(0, 200), 1000, 4099, 65536 + 7]:
        a = rng.integers(0, 256, n, dtype=np.uint8)
        for seed in (0, 1, 0xFFFFFFFF, int(rng.integers(0, 2**32))):
            assert rans.crc32(a, seed, simd=simd) == zlib.crc32(a.tobytes(), seed)
