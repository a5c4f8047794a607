"""The planner's pure core on hand-worked cases: fits, DistServe import, queues, KV memory, placement, codecs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from coordinator.planner.distserve import SHIPPED, is_distserve, profile_from_distserve
from coordinator.planner.latency import (
    Coeffs,
    Layout,
    LayoutLatency,
    Profile,
    fit_decode,
    fit_decode_split,
    fit_prefill,
)
from coordinator.planner.model import OPT_13B_CONFIG, ModelSpec, spec_from_config
from coordinator.planner.search import PlanError, SearchInput, kv_capacity_tokens, search
from coordinator.planner.simulator import DecodeInstance, Link, PrefillInstance, Request, simulate
from coordinator.planner.topology import Device, Topology, uniform
from kv_transfer.choice import CodecProfile


def const_latency(prefill_s: float, step_s: float, tp: int = 1) -> LayoutLatency:
    return LayoutLatency(Layout(tp, 1), Coeffs(prefill_s, 0, 0), Coeffs(step_s, 0, 0), Coeffs(step_s, 0, 0))


def test_planner_imports_neither_numpy_nor_torch() -> None:
    code = "import sys, coordinator.planner.search; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_fits_recover_exact_coefficients() -> None:
    a, b, c = 0.012, 3e-5, 2e-8
    batches = [[100], [500], [1000, 200], [2000], [300, 300, 300], [50, 1500]]
    pts = [(ls, a + b * sum(ls) + c * sum(x * x for x in ls)) for ls in batches]
    got, err = fit_prefill(pts)
    assert got.a == pytest.approx(a, rel=1e-6) and got.b == pytest.approx(b, rel=1e-6)
    assert got.c == pytest.approx(c, rel=1e-5) and err < 1e-9
    da, db, dc = 0.004, 2e-7, 1e-4
    dpts = [
        (bs, ctx, da + db * ctx + dc * bs) for bs, ctx in [(1, 100), (4, 900), (16, 2000), (8, 8000), (2, 50)]
    ]
    got, err = fit_decode(dpts)
    assert (got.a, got.b, got.c) == pytest.approx((da, db, dc), rel=1e-6) and err < 1e-9


def test_model_spec_opt13b_and_llama() -> None:
    opt = spec_from_config(OPT_13B_CONFIG)
    assert 12.8e9 < opt.params < 12.9e9  # OPT-13B has 12.85 B parameters
    assert opt.kv_bytes_per_token == 2 * 40 * 5120 * 2  # K and V, 40 layers, hidden 5120, fp16
    llama = spec_from_config(
        {
            "num_hidden_layers": 5,
            "hidden_size": 256,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "intermediate_size": 768,
            "vocab_size": 6144,
            "tie_word_embeddings": True,
            "dtype": "float32",
        }
    )
    assert llama.kv_bytes_per_token == 2 * 5 * 2 * 32 * 4
    assert llama.params == 6144 * 256 + 5 * (256 * 12 * 32 + 256 * 256 + 3 * 256 * 768 + 2 * 256) + 256


def test_distserve_conversion() -> None:
    data = json.loads(SHIPPED.read_text())
    assert is_distserve(data)
    prof = profile_from_distserve(data, "facebook/opt-13b")
    assert prof.tps() == (1, 2, 4)
    lat = prof.latency(Layout(1, 1))
    e = data["facebook/opt-13b"]["1"]
    # prefill ms = a + b sum(l) + c sum(l^2), plus their simulator's 2 ms + 1e-4 ms/token step overhead
    lens = [300, 700]
    want_ms = e["prefill"][0] + e["prefill"][1] * 1000 + e["prefill"][2] * (300**2 + 700**2) + 2 + 1e-4 * 1000
    assert lat.prefill_s(1000, 300**2 + 700**2) == pytest.approx(want_ms / 1e3)
    assert sum(lens) == 1000
    # decode ms = a + b sum(ctx + 1) + c batch (small batch), same overhead
    a, b, c = e["decoding_smallbs"]
    ctx = [100, 400, 900]
    want_ms = a + b * sum(x + 1 for x in ctx) + c * 3 + 2 + 1e-4 * sum(ctx)
    assert lat.decode_s(3, sum(ctx)) == pytest.approx(want_ms / 1e3, rel=1e-3)
    big = e["decoding_largebs"]
    assert lat.decode_s(200, 200 * 500) == pytest.approx(
        (big[0] + big[1] * 200 * 501 + big[2] * 200 + 2 + 1e-4 * 200 * 500) / 1e3, rel=1e-3
    )
    with pytest.raises(KeyError):
        prof.latency(Layout(8, 1))
    assert prof.latency(Layout(2, 2)).layout == Layout(2, 2)  # PP extrapolated from TP=2


def test_topology_bandwidth_overrides() -> None:
    t = Topology.from_dict(
        {
            "nodes": [
                {"name": "n0", "devices": 2, "device_memory_gib": 80, "intra_gbytes_per_s": 300},
                {"name": "n1", "devices": 2, "device_memory_gib": 80, "intra_gbytes_per_s": 300},
                {"name": "n2", "devices": 2, "device_memory_gib": 80, "intra_gbytes_per_s": 300},
            ],
            "inter_node_gbytes_per_s": 3.1,
            "links": [
                {"a": "n0", "b": "n1", "gbytes_per_s": 12.5},
                {"a": "n0/1", "b": "n2/0", "gbytes_per_s": 50},
            ],
        }
    )
    assert t.gbytes_per_s(Device("n0", 0), Device("n0", 1)) == 300
    assert t.gbytes_per_s(Device("n1", 1), Device("n0", 0)) == 12.5
    assert t.gbytes_per_s(Device("n0", 0), Device("n2", 0)) == 3.1
    assert t.gbytes_per_s(Device("n2", 0), Device("n0", 1)) == 50
    assert Topology.from_dict(t.to_dict()) == t
    with pytest.raises(ValueError, match="names no node"):
        Topology.from_dict({**t.to_dict(), "links": [{"a": "n9", "b": "n0", "gbytes_per_s": 1}]})


def test_fifo_queue_attainment_by_hand() -> None:
    """One prefill instance taking 1 s per batch, arrivals every 0.5 s. Without batching it is a D/D/1 queue:
    starts 0, 1, 2, 3 -> TTFT 1, 1.5, 2, 2.5. With batching the second batch takes the two that queued:
    TTFT 1, 1.5, 1, 1.5. Decode: one 0.1 s step each -> TPOT 0.1."""
    reqs = [Request(0.5 * i, 10, 2) for i in range(4)]
    dec = [DecodeInstance(const_latency(0, 0.1), 10_000)]
    link = [[Link(0.0)]]
    one = simulate(reqs, [PrefillInstance(const_latency(1.0, 0), max_batch_tokens=10)], dec, link)
    assert one.ttft_s == pytest.approx((1.0, 1.5, 2.0, 2.5))
    assert one.tpot_s == pytest.approx((0.1,) * 4)
    assert one.attainment(1.6, 0.1 + 1e-9) == 0.5  # TTFT 1 and 1.5 meet 1.6 s
    assert one.attainment(1.6, 0.05) == 0.0  # nobody meets TPOT 50 ms
    batched = simulate(reqs, [PrefillInstance(const_latency(1.0, 0))], dec, link)
    assert batched.ttft_s == pytest.approx((1.0, 1.5, 1.0, 1.5))
    assert batched.attainment(1.2, 1.0) == 0.5
    # a 0.2 s per-token link adds 10 x 0.2 s to the second token: TPOT 2.1 for a 10-token prompt
    slow = simulate(reqs, [PrefillInstance(const_latency(1.0, 0))], dec, [[Link(0.2)]])
    assert slow.tpot_s[0] == pytest.approx(2.1)


def test_kv_memory_limits_decode_batch() -> None:
    """Capacity 64 tokens, each request reserves 32 (prompt 15 + output 17 in 16-token blocks): two run at a
    time. Steps of 0.1 s, 16 per request: r0 runs steps 1-16 (ends 1.6), r1 joins at step 1 (ends 1.7), r2
    takes r0's place (ends 3.2), r3 r1's (3.3), r4 4.8, r5 4.9; all got their first token at 0."""
    reqs = [Request(0.0, 15, 17) for _ in range(6)]
    res = simulate(
        reqs,
        [PrefillInstance(const_latency(0, 0))],
        [DecodeInstance(const_latency(0, 0.1), kv_capacity_tokens=64, block_tokens=16)],
        [[Link(0.0)]],
    )
    assert res.decode_batch_max == 2
    assert res.tpot_s == pytest.approx(tuple(f / 16 for f in (1.6, 1.7, 3.2, 3.3, 4.8, 4.9)))
    assert res.attainment(1.0, 0.15) == pytest.approx(2 / 6)
    # the same with room for all six: one batch of six, everyone done at 1.6 + one step of lag for joiners
    roomy = simulate(
        reqs,
        [PrefillInstance(const_latency(0, 0))],
        [DecodeInstance(const_latency(0, 0.1), kv_capacity_tokens=6 * 32)],
        [[Link(0.0)]],
    )
    assert roomy.decode_batch_max == 6
    # and capacity from device memory: (devices x memory x fraction - weights) / KV bytes per token
    spec = ModelSpec("m", 2, 64, 4, 4, 16, params=2**30, dtype_bytes=2)  # 2 GiB of weights, 512 B/token
    inp = SearchInput(spec, Profile("x", "m", ()), uniform(1, 1, 4, 100, 100), 1, 1, ((10, 10),))
    assert kv_capacity_tokens(inp, Layout(1, 1), 4) == int((4 * 2**30 * 0.9 - 2 * 2**30) // 512)


# ---- search on a synthetic model: KV of 1 MB per token, TP=1 only --------------------------------------
BIG_KV = ModelSpec(
    "big-kv", layers=4, hidden=1024, heads=8, kv_heads=8, head_dim=8192, params=10**9, dtype_bytes=2
)
assert BIG_KV.kv_bytes_per_token == 2**20
PROFILE = Profile(
    "synthetic",
    "big-kv",
    (LayoutLatency(Layout(1, 1), Coeffs(0.01, 1e-5, 0), Coeffs(0.01, 0, 0.001), Coeffs(0.01, 0, 0.001)),),
)
SAMPLES = ((100, 11),)  # 100 prompt tokens = 100 MiB of KV; 10 decode steps


def test_slow_inter_node_link_keeps_kv_inside_a_node() -> None:
    slow = 0.01  # GB/s between nodes: 10 s per hand-off; intra-node 100 GB/s: 1 ms
    plan = search(
        SearchInput(BIG_KV, PROFILE, uniform(2, 2, 80, 100, slow), 0.5, 0.05, SAMPLES, pp_choices=(1,))
    )
    node = {p.instance: p.node for p in plan.placement}
    assert plan.kv_links and all(node[k.prefill] == node[k.decode] for k in plan.kv_links)
    assert all(k.gbytes_per_s == 100 for k in plan.kv_links)
    assert plan.predicted.goodput_rps > 0
    # one device per node: every plan must cross the slow link, and none meets the TPOT SLO
    with pytest.raises(PlanError, match="KV transfer"):
        search(
            SearchInput(BIG_KV, PROFILE, uniform(2, 1, 80, 100, slow), 0.5, 0.05, SAMPLES, pp_choices=(1,))
        )
    # with a fast inter-node network the same one-device nodes are fine
    fast = search(
        SearchInput(BIG_KV, PROFILE, uniform(2, 1, 80, 100, 100), 0.5, 0.05, SAMPLES, pp_choices=(1,))
    )
    assert fast.predicted.goodput_rps > 0


def test_compressing_codec_wins_a_slow_link() -> None:
    """Nodes of one device, 1 GB/s between them. Raw: 100 MiB in 0.105 s + 10 steps of 11 ms -> TPOT 21.5 ms,
    over the 15 ms SLO; int8 (a quarter of the bytes, fast) -> 0.026 s + 0.11 s -> TPOT 13.6 ms."""
    topo = uniform(2, 1, 80, 100, 1.0)
    raw = CodecProfile("raw", 1.0, math.inf, math.inf, 0.0)
    int8 = CodecProfile("int8", 0.25, 100e9, 100e9, 1e-5)
    with pytest.raises(PlanError):
        search(SearchInput(BIG_KV, PROFILE, topo, 0.5, 0.015, SAMPLES, codecs=(raw,), pp_choices=(1,)))
    plan = search(
        SearchInput(BIG_KV, PROFILE, topo, 0.5, 0.015, SAMPLES, codecs=(raw, int8), pp_choices=(1,))
    )
    assert [k.codec for k in plan.kv_links] == ["int8"]
    # a quality floor that excludes int8 leaves only raw: no plan
    with pytest.raises(PlanError):
        search(
            SearchInput(
                BIG_KV, PROFILE, topo, 0.5, 0.015, SAMPLES, codecs=(raw, int8), max_kl=0.0, pp_choices=(1,)
            )
        )


def test_plan_json_fields_and_a_4x8_search_is_consistent() -> None:
    prof = profile_from_distserve(json.loads(SHIPPED.read_text()), "facebook/opt-13b")
    samples = tuple((100 + 37 * i % 900, 20 + 13 * i % 300) for i in range(200))
    plan = search(
        SearchInput(spec_from_config(OPT_13B_CONFIG), prof, uniform(4, 8, 80, 300, 3.1), 0.2, 0.1, samples)
    )
    d = plan.to_dict()
    assert {"prefill", "decode", "placement", "kv_links", "predicted", "search_s"} <= set(d)
    assert set(d["prefill"]) == {"tp", "pp", "instances"} == set(d["decode"])
    assert set(d["predicted"]) >= {"goodput_rps", "per_device_goodput_rps", "attainment"}
    used = [(p["node"], dev) for p in d["placement"] for dev in p["devices"]]
    assert len(used) == len(set(used)) <= 32  # no device twice
    for p in d["placement"]:
        layout = d[p["phase"]]
        assert len(p["devices"]) == layout["tp"] * layout["pp"]
    names = {p["instance"] for p in d["placement"]}
    assert all(k["prefill"] in names and k["decode"] in names for k in d["kv_links"])
    assert d["prefill"]["instances"] == sum(1 for p in d["placement"] if p["phase"] == "prefill")
    assert 0 < d["predicted"]["per_device_goodput_rps"] <= d["predicted"]["goodput_rps"]
    json.dumps(d)  # serialisable


def test_decode_fit_in_two_pieces() -> None:
    """Small batches: 4 ms + 0.5 ms a sequence; large: 6 ms + 0.375 ms a sequence (the two agree at 16, where
    both pieces take the points); 1e-7 s per context token in both. Each piece is recovered exactly, and the
    model picks the piece by batch size; with no batch above 16 the large piece is the small one."""
    small = (0.004, 1e-7, 0.0005)
    large = (0.006, 1e-7, 0.000375)

    def t(c: tuple[float, float, float], bs: int, ctx: int) -> float:
        return c[0] + c[1] * ctx + c[2] * bs

    cases_small = [(1, 100), (4, 400), (8, 1000), (16, 2000), (16, 500)]
    cases_large = [(32, 3000), (64, 6000), (64, 9000)]
    pts = [(bs, ctx, t(small, bs, ctx)) for bs, ctx in cases_small]
    pts += [(bs, ctx, t(large, bs, ctx)) for bs, ctx in cases_large]
    got_s, got_l, err = fit_decode_split(pts, 16)
    assert (got_s.a, got_s.b, got_s.c) == pytest.approx(small, rel=1e-6)
    assert (got_l.a, got_l.b, got_l.c) == pytest.approx(large, rel=1e-6)
    assert err < 1e-9
    lat = LayoutLatency(Layout(1, 1), Coeffs(0, 0, 0), got_s, got_l, threshold=16)
    assert lat.decode_s(8, 1000) == pytest.approx(t(small, 8, 1000))
    assert lat.decode_s(64, 6000) == pytest.approx(0.006 + 0.0006 + 0.024)
    # one line fitted on the small batches alone over-predicts batch 64 (the cost per sequence falls)
    one, _ = fit_decode(pts[:5])
    assert one.a + one.b * 6000 + one.c * 64 > lat.decode_s(64, 6000)
    only_small_s, only_small_l, _ = fit_decode_split(pts[:5], 16)
    assert only_small_l == only_small_s
