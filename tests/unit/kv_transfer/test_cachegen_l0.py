"""cachegen_l0: layer 0 sent as the prompt's token ids and recomputed by the decoder's model
(kv_transfer.codec.layer0), checked against the engine's own prefill on a real (random) model."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

from engine.kv_probe import KVProbe
from kv_transfer.codec import CodecContext, layer0, rans
from kv_transfer.codec.cachegen import CacheGenL0Codec
from kv_transfer.codec.layer0 import Layer0
from kv_transfer.errors import FrameCorrupted, FrameForeign
from kv_transfer.frame import FrameBuffer, decode_frame

PROMPT = [(11 * i + 5) % 2000 for i in range(70)]


@pytest.fixture(scope="module")
def probe(tiny_model_dir: Path) -> KVProbe:
    return KVProbe(str(tiny_model_dir), 128)


@pytest.fixture(scope="module")
def ctx(probe: KVProbe, tiny_model_dir: Path) -> CodecContext:
    """The model's codec context, as a service builds it: it holds the model's layer-0 function."""
    ctx = CodecContext.from_model_dir(tiny_model_dir, probe.runner.model, probe.runner.fingerprint)
    assert ctx.layer0 is not None
    return ctx


def _kv(probe: KVProbe) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return probe.prefill(PROMPT)


def _ids() -> torch.Tensor:
    return torch.tensor(PROMPT, dtype=torch.long)


def test_the_model_computes_layer0_kv_exactly_as_prefill_writes_it(probe: KVProbe) -> None:
    k0, v0 = _kv(probe)[0]
    k, v = probe.runner.model.layer0_kv(_ids())
    assert torch.equal(k, k0) and torch.equal(v, v0)


def test_layer0_travels_as_ids_and_comes_back_exact(probe: KVProbe, ctx: CodecContext) -> None:
    kv = _kv(probe)
    codec = ctx.codec("cachegen_l0")
    k, v = kv[0]
    params, parts = codec.encode_parts(k, v, 0, _ids())
    payload = b"".join(bytes(p) for p in parts)
    assert layer0.is_layer0_frame(bytes(params)) and len(payload) == 4 * len(PROMPT)
    ko, vo = codec.decode(params, payload, tuple(k.shape), k.dtype, 0)
    assert torch.equal(ko, k) and torch.equal(vo, v)
    # through the framed container, as the KV server sends it
    frame = FrameBuffer().encode(
        codec_id=codec.codec_id,
        fingerprint=7,
        transfer_id="t",
        layer=0,
        shape=tuple(k.shape),
        dtype=k.dtype,
        params=params,
        payload=parts,
    )
    f = decode_frame(bytes(frame), expect_fingerprint=7)
    ko, vo = CacheGenL0Codec(ctx).decode(f.params, f.payload, f.shape, f.dtype, 0)
    assert torch.equal(ko, k)
    # deeper layers are coded as cachegen codes them (lossy, bounded), not as ids
    k1, v1 = kv[1]
    p1, _ = codec.encode_parts(k1, v1, 1, _ids())
    assert not layer0.is_layer0_frame(bytes(p1))


def test_without_ids_or_a_match_layer0_is_coded_as_usual(probe: KVProbe, ctx: CodecContext) -> None:
    k, v = _kv(probe)[0]
    codec = CacheGenL0Codec(ctx)
    params, _ = codec.encode_parts(k, v, 0)  # no ids given
    assert not layer0.is_layer0_frame(bytes(params))
    wrong = _ids().roll(1)  # the ids of other K/V: the encoder's check refuses them
    params, _ = codec.encode_parts(k, v, 0, wrong)
    assert not layer0.is_layer0_frame(bytes(params))
    params, _ = codec.encode_parts(k + 1e-2, v, 0, _ids())  # K/V not what the model computes
    assert not layer0.is_layer0_frame(bytes(params))
    params, _ = codec.encode_parts(k, v, 0, torch.tensor([10**6] * len(PROMPT)))  # outside the vocab
    assert not layer0.is_layer0_frame(bytes(params))


def test_without_its_model_an_encoder_codes_layer0_as_usual(probe: KVProbe) -> None:
    k, v = _kv(probe)[0]
    params, _ = CacheGenL0Codec().encode_parts(k, v, 0, _ids())
    assert not layer0.is_layer0_frame(bytes(params))


def test_a_decoder_without_the_model_or_with_another_refuses_the_frame(
    probe: KVProbe, ctx: CodecContext
) -> None:
    k, v = _kv(probe)[0]
    params, parts = CacheGenL0Codec(ctx).encode_parts(k, v, 0, _ids())
    payload = b"".join(bytes(p) for p in parts)
    assert layer0.is_layer0_frame(bytes(params))
    with pytest.raises(FrameForeign, match="no layer-0 function"):
        CacheGenL0Codec().decode(params, payload, tuple(k.shape), k.dtype, 0)
    l0 = ctx.layer0
    assert l0 is not None
    other = CodecContext(ctx.num_layers, layer0=Layer0(l0.fn, l0.model_id + 1, l0.vocab_size))
    with pytest.raises(FrameForeign, match="model"):
        CacheGenL0Codec(other).decode(params, payload, tuple(k.shape), k.dtype, 0)


def test_damaged_layer0_frames_are_frame_corrupted(probe: KVProbe, ctx: CodecContext) -> None:
    k, v = _kv(probe)[0]
    codec = CacheGenL0Codec(ctx)
    params, parts = codec.encode_parts(k, v, 0, _ids())
    params, payload = bytes(params), b"".join(bytes(p) for p in parts)
    shape = tuple(k.shape)
    bad_payload = bytearray(payload)
    bad_payload[5] ^= 0x10
    bad_params = bytearray(params)
    bad_params[4] ^= 0x01
    cases = [
        (params, bytes(bad_payload), shape),  # a flipped bit in the ids: payload CRC
        (bytes(bad_params), payload, shape),  # in the header: params CRC
        (params[:-1], payload, shape),  # truncated params
        (params, payload[:-4], shape),  # truncated payload
        (params, payload, (shape[0] + 1, *shape[1:])),  # the frame's shape disagrees
    ]
    for p, pay, shp in cases:
        with pytest.raises(FrameCorrupted):
            codec.decode(p, pay, shp, k.dtype, 0)
    # well-formed, CRC'd, but an id outside the vocabulary: refused before the model reads it
    ids = _ids().clone()
    ids[3] = 10**6
    forged = ids.numpy().astype("<u4").tobytes()
    assert ctx.layer0 is not None
    head = layer0._HEADER.pack(b"CG", layer0.VERSION, len(PROMPT), ctx.layer0.model_id, zlib.crc32(forged))
    forged_params = head + layer0._CRC.pack(zlib.crc32(head))
    with pytest.raises(FrameCorrupted, match="vocabulary"):
        codec.decode(forged_params, forged, shape, k.dtype, 0)


def test_a_decoder_asks_for_cachegen_l0_only_where_it_can_recompute(ctx: CodecContext) -> None:
    bare = CodecContext()
    assert bare.pull_codec("cachegen") == "cachegen" and bare.pull_codec("cachegen_l0") == "cachegen"
    assert bare.pull_codec("int8") == "int8"
    assert ctx.pull_codec("cachegen") == "cachegen_l0"
    assert ctx.pull_codec("raw") == "raw"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_prefill_layer0_travels_as_ids(tiny_model_dir: Path) -> None:
    """On a GPU (bf16 cache): prefill's layer 0, read to the host as the KV server does, passes the encoder's
    check, crosses as ids, and decodes to the model's own recomputation (within one bf16 rounding)."""
    from engine.device import Device
    from engine.params import SamplingParams
    from engine.runner import ModelRunner
    from engine.sequence import Sequence

    runner = ModelRunner(str(tiny_model_dir), Device.cuda(0), num_kv_blocks=16, block_size=16)
    blocks = list(range(runner.kv_cache.num_blocks))
    runner.prefill([Sequence("l0", list(PROMPT), SamplingParams(max_tokens=1), blocks=blocks)])
    k, v = (x.cpu() for x in runner.kv_cache.read(0, blocks, len(PROMPT)))
    ctx = CodecContext.from_model_dir(tiny_model_dir, runner.model, runner.fingerprint)
    assert ctx.layer0 is not None
    codec = CacheGenL0Codec(ctx)
    params, parts = codec.encode_parts(k, v, 0, _ids())
    assert layer0.is_layer0_frame(bytes(params))
    ko, vo = codec.decode(params, b"".join(bytes(p) for p in parts), tuple(k.shape), k.dtype, 0)
    for x, y in ((k, ko), (v, vo)):
        assert float((x.float() - y.float()).abs().max()) <= layer0.TOL[torch.bfloat16] * float(x.abs().max())


def test_layer0_comes_from_the_vocabulary_table_as_the_model_computes_it(
    probe: KVProbe, ctx: CodecContext
) -> None:
    """The context's layer 0 is a table (3 MiB-class for small vocabularies), and its gather + RoPE gives
    exactly the model's own layer 0 (fp32: no fused multiply-add in the C rotation)."""
    l0 = ctx.layer0
    assert l0 is not None and l0.mode == "table" and l0.table is not None
    assert l0.table.vocab == probe.cfg.vocab_size and l0.table.nbytes < layer0.TABLE_MAX_BYTES
    ids = torch.tensor([0, probe.cfg.vocab_size - 1, *PROMPT])
    got = l0.table.kv(ids.numpy().astype("uint32"))
    assert got is not None
    k, v = probe.runner.model.layer0_kv(ids)
    assert torch.equal(got[0], k) and torch.equal(got[1], v)
    assert l0.table.kv(torch.tensor([1, probe.cfg.vocab_size]).numpy().astype("uint32")) is None


def test_the_table_writes_fp16_and_checks_fp16_in_one_pass(probe: KVProbe, ctx: CodecContext) -> None:
    """fp16 out of the gather is the fp32 result rounded as torch rounds it (`.half()`), and the check reads
    fp16 input as its fp32 values: the same error maxima as checking `.float()` of it; a perturbed fp16 K fails
    the codec's check, so that layer is coded, not sent as ids; fp16 frames decode to fp16 without a copy."""
    assert ctx.layer0 is not None and ctx.layer0.table is not None
    tab = ctx.layer0.table
    ids = torch.tensor([0, probe.cfg.vocab_size - 1, *PROMPT])
    ids32 = ids.numpy().astype("uint32")
    got32, got16 = tab.kv(ids32), tab.kv(ids32, torch.float16)
    assert got32 is not None and got16 is not None
    (k32, v32), (k16, v16) = got32, got16
    assert k16.dtype == v16.dtype == torch.float16
    assert torch.equal(k16, k32.half()) and torch.equal(v16, v32.half())
    a = (tab.tk, tab.tv, ids32, tab.cos, tab.sin)
    e16 = rans.l0_check(*a, k16.numpy(), v16.numpy())
    e32 = rans.l0_check(*a, k16.float().numpy(), v16.float().numpy())
    assert e16 is not None and e16 == e32 and e16[0] > 0  # fp16 rounding is seen, as through .float()
    assert tab.matches(k16, v16, ids32)
    bad = k16.clone()
    bad[3, 1, 7] += 0.5
    assert not tab.matches(bad, v16, ids32)
    nan = v16.clone()
    nan[0, 0, 0] = float("nan")
    assert rans.l0_check(*a, k16.numpy(), nan.numpy()) is None
    codec = ctx.codec("cachegen_l0")
    params, parts = codec.encode_parts(k16, v16, 0, ids)
    assert layer0.is_layer0_frame(bytes(params))
    ko, vo = codec.decode(params, b"".join(bytes(p) for p in parts), tuple(k16.shape), torch.float16, 0)
    assert torch.equal(ko, k16) and torch.equal(vo, v16)
    params, _ = codec.encode_parts(bad, v16, 0, ids)
    assert not layer0.is_layer0_frame(bytes(params))


def test_a_vocabulary_too_large_for_the_table_recomputes(
    probe: KVProbe, ctx: CodecContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past TABLE_MAX_BYTES there is no table (mode "recompute"), and either mode decodes the other's frames
    to the same K/V."""
    monkeypatch.setattr(layer0, "TABLE_MAX_BYTES", 1024)
    model = probe.runner.model
    slow = Layer0.from_model(model, probe.runner.fingerprint)
    assert slow is not None and slow.mode == "recompute" and slow.table is None
    k, v = _kv(probe)[0]
    fast_codec, slow_codec = CacheGenL0Codec(ctx), CacheGenL0Codec(CodecContext(ctx.num_layers, layer0=slow))
    for enc, dec in ((fast_codec, slow_codec), (slow_codec, fast_codec)):
        params, parts = enc.encode_parts(k, v, 0, _ids())
        assert layer0.is_layer0_frame(bytes(params))
        ko, vo = dec.decode(params, b"".join(bytes(p) for p in parts), tuple(k.shape), k.dtype, 0)
        assert torch.equal(ko, k) and torch.equal(vo, v)


def test_the_tables_check_refuses_what_the_model_would_not_compute(probe: KVProbe, ctx: CodecContext) -> None:
    """The table's check (the encoder's `matches`) sees a changed value, a non-finite one, an fp16 copy within
    TOL, and a prompt longer than its RoPE positions falls back to the model."""
    l0 = ctx.layer0
    assert l0 is not None and l0.table is not None
    k, v = _kv(probe)[0]
    assert l0.matches(k, v, _ids()) and l0.matches(k.half(), v.half(), _ids())
    for i, bad in ((0, float("nan")), (1, float("inf")), (0, 1e-2)):
        kb, vb = k.clone(), v.clone()
        (kb if i == 0 else vb)[5, 1, 3] += bad
        assert not l0.matches(kb, vb, _ids())
    assert l0.table.covers(len(PROMPT), k.shape[1], k.shape[2])
    assert not l0.table.covers(l0.table.positions + 1, k.shape[1], k.shape[2])


SHIPPED = Path(__file__).resolve().parents[3] / "models" / "pdserve-tiny-py"


def test_decode_into_writes_what_decode_returns_and_nothing_on_a_damaged_frame(
    probe: KVProbe, ctx: CodecContext
) -> None:
    """decode_into (what a puller given a KV cache's views uses), on the shipped model (its transform: format
    v5) and on a model without one (older formats, which it declines): every layer it takes, layer 0 from its
    ids and the coded ones, bit for bit decode()'s values in the caller's tensors; a damaged frame raises
    before writing; tensors it cannot write get False and nothing."""
    shipped = KVProbe(str(SHIPPED), 128)
    cases = [
        (
            CodecContext.from_model_dir(SHIPPED, shipped.runner.model, shipped.runner.fingerprint),
            shipped,
            True,
        ),
        (ctx, probe, False),  # a random model without a calibrated transform: v1 frames past layer 0
    ]
    for context, model, calibrated in cases:
        codec = context.codec("cachegen_l0")
        for layer, (k, v) in enumerate(model.prefill(PROMPT)):
            params, parts = codec.encode_parts(k, v, layer, _ids())
            payload = b"".join(bytes(p) for p in parts)
            shape = tuple(k.shape)
            want_k, want_v = codec.decode(params, payload, shape, k.dtype, layer)
            out = torch.full((2, *shape), float("nan")).unbind()
            takes = layer == 0 or calibrated
            assert codec.decode_into(params, payload, shape, layer, *out) == takes, (calibrated, layer)
            if not takes:
                assert bool(out[0].isnan().all() and out[1].isnan().all())
                continue
            assert torch.equal(out[0], want_k) and torch.equal(out[1], want_v), (calibrated, layer)
            bad = bytearray(payload)
            bad[len(bad) // 2] ^= 0x10
            untouched = torch.full((2, *shape), 7.0).unbind()
            with pytest.raises(FrameCorrupted):
                codec.decode_into(params, bytes(bad), shape, layer, *untouched)
            assert bool((untouched[0] == 7).all() and (untouched[1] == 7).all()), layer
            wide = torch.zeros((shape[0], shape[1], 2 * shape[2]))[:, :, : shape[2]]  # not contiguous
            assert not codec.decode_into(params, payload, shape, layer, wide, wide.clone())
            bf16 = torch.zeros((2, *shape), dtype=torch.bfloat16).unbind()
            assert not codec.decode_into(params, payload, shape, layer, *bf16)
            assert not bool(wide.any() or bf16[0].any())
