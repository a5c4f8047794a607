"""Codec choice per link: hand-off time model, admissibility by quality, break-even bandwidth."""

from __future__ import annotations

import math

import pytest

from kv_transfer.choice import CodecProfile, break_even_bps, choose_codec, load_profiles, save_profiles
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
