"""Codec choice per link: hand-off time model, admissibility by quality, break-even bandwidth."""

from __future__ import annotations

import math

import pytest

from kv_transfer.choice import (
    CodecProfile,
    break_even_bps,
    choose_codec,
    load_profiles,
    pipelined_handoff_s,
    save_profiles,
)
from pdserve.errors import InvalidRequest

RAW = CodecProfile("raw", 1.0, math.inf, math.inf, 0.0)
INT8 = CodecProfile("int8", 0.25, 2e9, 2e9, 0.002)  # 4x smaller than fp32, fast
CG = CodecProfile("cachegen", 0.08, 2e8, 2e8, 0.008)  # ~12x smaller, slower to code

MB = 2**20


def test_handoff_time_model_by_hand() -> None:
    # 100 MB over 1 GB/s: raw = 0.1 s; int8 sequential = 0.05 + 0.025 + 0.05
    assert RAW.handoff_s(100e6, 1e9) == pytest.approx(0.1)
    assert INT8.handoff_s(100e6, 1e9, pipelined=False) == pytest.approx(0.125)
    # pipelined over 4 layers: sum/4 + 3/4 * max = 0.125/4 + 0.75 * 0.05
    assert INT8.handoff_s(100e6, 1e9, num_layers=4) == pytest.approx(0.125 / 4 + 0.75 * 0.05)


def test_pipelined_model_with_parallel_coders_by_hand() -> None:
    # 80 MB in 8 layers of 10 MB over 1 Gbit/s (125e6 B/s). One cachegen layer: encode 10e6 / 2e8 = 0.05 s,
    # send 10e6 * 0.08 / 125e6 = 0.0064 s, decode 0.05 s. Fill + drain = 0.1064 s, then 7 layers at the
    # bottleneck: with one coder per side 0.05 s each.
    assert pipelined_handoff_s(CG, 80e6, 125e6, 8) == pytest.approx(0.1064 + 7 * 0.05)
    # two coders per side: the bottleneck halves to 0.025 s; four: 0.0125 s
    assert pipelined_handoff_s(CG, 80e6, 125e6, 8, 2, 2) == pytest.approx(0.1064 + 7 * 0.025)
    assert pipelined_handoff_s(CG, 80e6, 125e6, 8, 4, 4) == pytest.approx(0.1064 + 7 * 0.0125)
    # sixteen: the link (0.0064 s a layer) is the bottleneck now
    assert pipelined_handoff_s(CG, 80e6, 125e6, 8, 16, 16) == pytest.approx(0.1064 + 7 * 0.0064)
    # only the slower side's workers matter: 4 encoders but 1 decoder is still decode-bound
    assert pipelined_handoff_s(CG, 80e6, 125e6, 8, 4, 1) == pytest.approx(0.1064 + 7 * 0.05)
    # raw: 8 layers of 0.08 s on the link = 0.64 s, the same as one piece; one layer = the sequential sum
    assert pipelined_handoff_s(RAW, 80e6, 125e6, 8) == pytest.approx(0.64)
    assert CG.handoff_s(80e6, 125e6, 1) == pytest.approx(CG.handoff_s(80e6, 125e6, 8, pipelined=False))
    assert CG.handoff_s(80e6, 125e6, 8, pipelined=False) == pytest.approx(0.4 + 0.0512 + 0.4)
    assert CG.handoff_s(80e6, 125e6, 8, True, 4, 4) == pipelined_handoff_s(CG, 80e6, 125e6, 8, 4, 4)


def test_parallel_coders_move_the_choice() -> None:
    # 10 Gbit/s (1.25e9 B/s), 80 MB in 80 layers of 1 MB: raw takes 0.064 s. cachegen, one layer: encode and
    # decode 0.005 s each, send 0.000064 s. One coder a side: 0.010064 + 79 * 0.005 = 0.405 s -> raw.
    # Sixteen: 0.010064 + 79 * 0.0003125 = 0.0348 s -> cachegen.
    profiles = [RAW, CG]
    assert choose_codec(80e6, 1.25e9, profiles, max_kl=1.0, num_layers=80).name == "raw"
    got = choose_codec(
        80e6, 1.25e9, profiles, max_kl=1.0, num_layers=80, encode_workers=16, decode_workers=16
    )
    assert got.name == "cachegen"
    assert CG.handoff_s(80e6, 1.25e9, 80, True, 16, 16) == pytest.approx(0.010064 + 79 * 0.0003125)


def test_fast_link_prefers_raw_slow_link_prefers_compression() -> None:
    profiles = [RAW, INT8, CG]
    assert choose_codec(64 * MB, 50e9, profiles, max_kl=1.0).name == "raw"  # NVLink-class
    # 1 Gbit/s: int8's link time (0.13 s) beats cachegen's coding time (0.34 s) -- by these profiles
    assert choose_codec(64 * MB, 125e6, profiles, max_kl=1.0, num_layers=8).name == "int8"
    assert choose_codec(64 * MB, 10e6, profiles, max_kl=1.0, num_layers=8).name == "cachegen"  # 80 Mbit/s


def test_quality_floor_excludes_lossy_codecs() -> None:
    profiles = [RAW, INT8, CG]
    assert choose_codec(64 * MB, 125e6, profiles, max_kl=0.0).name == "raw"
    assert choose_codec(64 * MB, 125e6, profiles, max_kl=0.005, num_layers=8).name == "int8"
    with pytest.raises(InvalidRequest):
        choose_codec(64 * MB, 125e6, [CG], max_kl=0.0)
    with pytest.raises(InvalidRequest):
        choose_codec(64 * MB, 0, profiles)


def test_break_even_bandwidth() -> None:
    be = break_even_bps(CG, RAW, raw_bytes=64 * MB)
    # below it cachegen is faster, above it raw is
    assert CG.handoff_s(64 * MB, be * 0.9) < RAW.handoff_s(64 * MB, be * 0.9)
    assert CG.handoff_s(64 * MB, be * 1.1) > RAW.handoff_s(64 * MB, be * 1.1)
    assert break_even_bps(RAW, RAW) == 0.0  # never strictly faster than itself


def test_profiles_round_trip_beside_model(tmp_path) -> None:
    assert [p.name for p in load_profiles(tmp_path)] == ["raw"]  # nothing measured: lossless default
    save_profiles(tmp_path, [INT8, CG])
    assert load_profiles(tmp_path) == (INT8, CG)


def test_per_layer_costs_by_hand() -> None:
    # 5 layers of 0.8 MB (4 MB) over 5 Gbit/s (625e6 B/s). cachegen: encode 0.8e6 / 1e9 = 0.8 ms + 0.2 ms fixed
    # = 1.0 ms; send 0.8e6 * 0.08 / 625e6 = 0.1024 ms; decode 0.8e6 / 1.6e9 = 0.5 ms + 0.3 ms fixed = 0.8 ms.
    # Fill + drain 1.9024 ms, then 4 layers at the prefill side's 1.0 ms.
    cg = CodecProfile("cachegen", 0.08, 1e9, 1.6e9, 0.0, encode_layer_s=2e-4, decode_layer_s=3e-4)
    assert cg.handoff_s(4e6, 625e6, 5) == pytest.approx(1.9024e-3 + 4 * 1.0e-3)
    # without pipelining every stage adds up: 4 + 0.512 + 2.5 ms of bytes + 5 * 0.5 ms fixed
    assert cg.handoff_s(4e6, 625e6, 5, pipelined=False) == pytest.approx(4e-3 + 0.512e-3 + 2.5e-3 + 2.5e-3)
    # raw with the same fixed costs: encode/decode free, send 1.28 ms a layer is the bottleneck:
    # 0.2 + 1.28 + 0.3 + 4 * 1.28 = 6.9 ms; cachegen (5.9024 ms) is faster on this link
    raw = CodecProfile("raw", 1.0, math.inf, math.inf, 0.0, encode_layer_s=2e-4, decode_layer_s=3e-4)
    assert raw.handoff_s(4e6, 625e6, 5) == pytest.approx(6.9e-3)
    assert choose_codec(4e6, 625e6, [raw, cg], max_kl=1.0, num_layers=5).name == "cachegen"
    # the fixed costs move the break-even: at 10 Gbit/s (1.25e9 B/s) raw's send is 0.64 ms a layer, under
    # cachegen's 1.0 ms encode: raw 0.2 + 0.64 + 0.3 + 4 * 0.64 = 3.7 ms < cachegen's 1.9512 + 4 = 5.9512 ms
    assert choose_codec(4e6, 1.25e9, [raw, cg], max_kl=1.0, num_layers=5).name == "raw"
    # break-even: raw 0.5 ms + 5 s = cachegen 5.8 ms + 0.08 s (s: raw's send per layer) -> s = 5.3 / 4.92 ms,
    # a link of 0.8e6 B / s = 742.6e6 B/s (5.94 Gbit/s)
    be = break_even_bps(cg, raw, 4e6, 5)
    assert be == pytest.approx(0.8e6 * 4.92 / 5.3e-3, rel=1e-6)
    assert cg.handoff_s(4e6, be, 5) == pytest.approx(raw.handoff_s(4e6, be, 5), rel=1e-6)


def test_profiles_without_layer_costs_load_as_zero(tmp_path) -> None:
    (tmp_path / "codec_profiles.json").write_text(
        '{"profiles": [{"name": "int8", "ratio": 0.25, "encode_bps": 2e9, "decode_bps": 2e9, "kl_mean": 0.002}]}'
    )
    (p,) = load_profiles(tmp_path)
    assert p == INT8 and p.encode_layer_s == 0.0 and p.decode_layer_s == 0.0
