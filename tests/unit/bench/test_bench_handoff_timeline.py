"""bench.handoff_timeline's arithmetic on a hand-made timeline: the per-layer costs besides the codec (what
kv_transfer.choice's model adds) and the stage sums."""

from __future__ import annotations

import pytest

from bench.handoff_timeline import _table, layer_costs


def _trial() -> dict:
    # 3 layers, ms after the PULL at t0 = 100 s. Prefill: encode 1 ms each, 0.2 / 0.4 ms between encodes.
    # Decode: frame received, 0.1 ms to decode start, decode 0.8 ms, written 0.3 ms later.
    ms = 1e-3
    t0 = 100.0
    pre, dec = [], []
    enc_starts = [0.3, 1.5, 2.9]
    for i, e0 in enumerate(enc_starts):
        pre += [("enc0", i, t0 + e0 * ms), ("enc1", i, t0 + (e0 + 1.0) * ms)]
        pre += [("send0", -1, t0 + (e0 + 1.0) * ms), ("send1", -1, t0 + (e0 + 1.05) * ms)]
        r1 = e0 + 1.1
        dec += [("recv0", -1, t0 + (r1 - 0.5) * ms), ("recv1", -1, t0 + r1 * ms)]
        dec += [("dec0", i, t0 + (r1 + 0.1) * ms), ("dec1", i, t0 + (r1 + 0.9) * ms)]
        dec += [("write1", i, t0 + (r1 + 1.2) * ms)]
    return {
        "t0": t0,
        "ready": 5.3 * ms,
        "decode_cpu": 3.0 * ms,
        "prefill_cpu": 4.0 * ms,
        "prefill": pre,
        "decode": dec,
    }


def test_layer_costs_are_the_gaps_around_the_codec():
    pre, dec = layer_costs(_trial())
    assert pre == pytest.approx(0.3e-3)  # median of 0.2 and 0.4 ms
    assert dec == pytest.approx(0.4e-3)  # 0.1 before decode + 0.3 after it, every layer


def test_table_sums_each_stage():
    text, sums = _table(_trial())
    assert sums["encode"] == pytest.approx(3.0)
    assert sums["decode"] == pytest.approx(2.4)
    assert sums["send"] == pytest.approx(0.15)
    assert sums["recv_wait"] == pytest.approx(1.5)
    assert sums["first_enc0"] == pytest.approx(0.3)
    assert sums["last_send1"] == pytest.approx(3.95)
    assert len(text.splitlines()) == 4  # header + 3 layers
