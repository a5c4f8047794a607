"""Gateway policies (pure policy code: the router's in-flight counts and the coordinator config; the serving
paths are in tests/e2e): conditional disaggregation (when a prompt is prefilled on a decode instance),
layer-wise streaming (when decode starts pulling the KV) and the hand-off's codec under a request's quality
floor."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.gateway import kv_floor_from_request, pick_codec
from coordinator.registry import InstanceInfo, Registry
from coordinator.router import Router
from kv_transfer.choice import CodecProfile
from pdserve.errors import InvalidRequest
from pdserve.v1 import generation_pb2

FP = 7


def _router(prefill: int = 1, decode: int = 1) -> Router:
    router = Router(
        registry=Registry("redis://x"), fingerprint=FP
    )  # never queried: the snapshot is set by hand
    router.snapshot = [
        InstanceInfo(f"p{i}", "prefill", f"127.0.0.1:{1000 + i}", model_fingerprint=FP)
        for i in range(prefill)
    ] + [
        InstanceInfo(f"d{i}", "decode", f"127.0.0.1:{2000 + i}", model_fingerprint=FP) for i in range(decode)
    ]
    return router


def _inst(router: Router, instance_id: str) -> InstanceInfo:
    return next(i for i in router.snapshot if i.instance_id == instance_id)


def test_prefill_busy_counts_this_gateways_requests_on_every_prefill_instance() -> None:
    router = _router(prefill=2)
    assert not router.prefill_busy(1)
    with router.track(_inst(router, "p0")):
        assert not router.prefill_busy(1)  # p1 is idle: a new prompt would not queue
        with router.track(_inst(router, "p1")):
            assert router.prefill_busy(1)
            assert not router.prefill_busy(2)
            with router.track(_inst(router, "p0")), router.track(_inst(router, "p1")):
                assert router.prefill_busy(2)
    assert not router.prefill_busy(1)  # track() gives the counts back


def test_no_prefill_instance_counts_as_busy() -> None:
    assert _router(prefill=0).prefill_busy(1)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"local_prefill": "sometimes"}, "local_prefill"),
        ({"local_prefill": "busy", "local_prefill_max_tokens": 0}, "local_prefill_max_tokens"),
        ({"local_prefill": "busy", "local_prefill_depth": 0}, "local_prefill_depth"),
    ],
)
def test_config_rejects_bad_local_prefill_settings(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        CoordinatorConfig(model_dir="m", redis_url="redis://x", **kwargs)


def test_gateway_policy(tiny_model_dir: Path) -> None:
    from coordinator.gateway import Gateway
    from engine.config import ModelConfig
    from engine.tokenizer import Tokenizer

    def gateway(**kw: Any) -> Gateway:
        cfg = CoordinatorConfig(model_dir=str(tiny_model_dir), redis_url="redis://x", **kw)
        model = ModelConfig.from_hf_dir(tiny_model_dir)
        return Gateway(cfg, router, Tokenizer(str(tiny_model_dir)), model)

    router = _router(prefill=1, decode=1)
    assert not gateway()._prefill_locally(8)  # off by default: pure disaggregation
    always = gateway(local_prefill="always", local_prefill_max_tokens=64)
    assert always._prefill_locally(64)
    assert not always._prefill_locally(65)  # too long for a decode instance to stall on
    busy = gateway(local_prefill="busy", local_prefill_depth=2)
    p0 = _inst(router, "p0")
    with router.track(p0):
        assert not busy._prefill_locally(8)  # one pass ahead: wait for the prefill instance
        with router.track(p0):
            assert busy._prefill_locally(8)
            assert not busy._prefill_locally(129)
            busy.local_pending = 1  # one local prefill per decode instance at a time
            assert not busy._prefill_locally(8)


def test_layerwise_streaming_by_default_only_from_cuda_prefill_instances(tiny_model_dir: Path) -> None:
    from coordinator.gateway import Gateway
    from engine.config import ModelConfig
    from engine.tokenizer import Tokenizer

    model = ModelConfig.from_hf_dir(tiny_model_dir)
    cpu = InstanceInfo("p0", "prefill", "127.0.0.1:1000", devices="cpu:0")
    gpu = InstanceInfo("p1", "prefill", "127.0.0.1:1001", devices="cuda:0")

    def layerwise(policy: str, inst: InstanceInfo) -> bool:
        cfg = CoordinatorConfig(model_dir=str(tiny_model_dir), redis_url="redis://x", layerwise=policy)
        return Gateway(cfg, _router(), Tokenizer(str(tiny_model_dir)), model)._layerwise(inst)

    assert CoordinatorConfig(model_dir="m", redis_url="redis://x").layerwise == "auto"
    assert layerwise("auto", gpu) and not layerwise("auto", cpu)
    assert layerwise("on", cpu) and layerwise("on", gpu)
    assert not layerwise("off", cpu) and not layerwise("off", gpu)
    with pytest.raises(ValueError, match="layerwise"):
        CoordinatorConfig(model_dir="m", redis_url="redis://x", layerwise="sometimes")


# ---- the codec of a hand-off, and a request's KV quality floor (max_kv_kl) ---------------------------------

PROFILES = (
    CodecProfile("raw", 1.0, math.inf, math.inf, 0.0),
    CodecProfile("int8", 0.53, 1.4e9, 4.4e9, 6e-6),
    CodecProfile("cachegen", 0.16, 3.0e8, 3.0e8, 1e-4),
)
MiB = 2**20


def _pick(codec: str, link_bps: float | None, floor: float | None, profiles=PROFILES, **kw) -> str:
    cfg = CoordinatorConfig(model_dir="m", redis_url="redis://x", codec=codec, **kw)
    return pick_codec(cfg, profiles, 8 * MiB, link_bps, 5, floor)


def test_a_fixed_codec_is_used_as_configured_without_a_request_floor() -> None:
    assert _pick("cachegen", None, None) == "cachegen"
    assert _pick("cachegen", 1e6, None, profiles=()) == "cachegen"  # unmeasured: the operator's choice


@pytest.mark.parametrize(
    "codec, floor, want",
    [
        ("cachegen", 0.0, "raw"),  # lossless asked: a lossy codec is replaced by raw
        ("cachegen", 5e-5, "raw"),  # measured 1e-4 > the floor
        ("cachegen", 1e-4, "cachegen"),  # within it
        ("int8", 1e-5, "int8"),
        ("raw", 0.0, "raw"),
        ("fp8", 1.0, "raw"),  # no profile: its quality is unknown, so the floor cannot be vouched for
    ],
)
def test_a_request_floor_overrides_a_fixed_codec_it_does_not_meet(
    codec: str, floor: float, want: str
) -> None:
    assert _pick(codec, 1.25e8, floor) == want


def test_auto_picks_the_fastest_codec_within_the_request_floor_else_the_clusters() -> None:
    slow = 1.25e8  # 1 Gbit/s: compression pays
    assert _pick("auto", slow, None, max_kl=0.01) == "cachegen"
    assert _pick("auto", slow, 1e-5) == "int8"  # the request's floor replaces --max-kl
    assert _pick("auto", slow, 0.0) == "raw"
    assert _pick("auto", slow, None, max_kl=0.0) == "raw"
    assert _pick("auto", None, 1.0) == "raw"  # link not measured yet: lossless
    assert _pick("auto", slow, 0.0, profiles=PROFILES[1:]) == "raw"  # nothing measured is lossless enough


@pytest.mark.parametrize("value", [-1e-3, math.nan, math.inf])
def test_a_bad_floor_is_invalid_argument(value: float) -> None:
    req = generation_pb2.GenerateRequest(prompt="x", max_tokens=1, max_kv_kl=value)
    with pytest.raises(InvalidRequest, match="max_kv_kl"):
        kv_floor_from_request(req)


def test_an_unset_floor_is_none_and_zero_is_zero() -> None:
    assert kv_floor_from_request(generation_pb2.GenerateRequest(prompt="x", max_tokens=1)) is None
    req = generation_pb2.GenerateRequest(prompt="x", max_tokens=1, max_kv_kl=0.0)
    assert kv_floor_from_request(req) == 0.0


@pytest.mark.parametrize("budget", [-1.0, math.inf, math.nan])
def test_config_rejects_a_bad_kv_budget(budget: float) -> None:
    with pytest.raises(ValueError, match="kv_budget"):
        CoordinatorConfig(model_dir="m", redis_url="redis://x", kv_budget=budget)


def test_kv_budget_counts_reserved_tokens_against_the_decode_instances_capacity(tiny_model_dir: Path) -> None:
    from dataclasses import replace

    from coordinator.gateway import Gateway
    from engine.config import ModelConfig
    from engine.tokenizer import Tokenizer
    from pdserve.errors import CapacityExceeded

    router = _router(prefill=1, decode=2)
    # two decode instances of 8 blocks x 16 tokens: 256 tokens of KV in all
    router.snapshot = [
        replace(i, kv_blocks_total=8, block_size=16) if i.role == "decode" else i for i in router.snapshot
    ]
    assert router.kv_capacity("decode") == 256 and router.kv_capacity("prefill") == 0

    def gateway(**kw: Any) -> Gateway:
        cfg = CoordinatorConfig(model_dir=str(tiny_model_dir), redis_url="redis://x", **kw)
        return Gateway(cfg, router, Tokenizer(str(tiny_model_dir)), ModelConfig.from_hf_dir(tiny_model_dir))

    off = gateway()
    off.kv_reserved = 10**9
    off._check_kv_budget(1)  # 0 = off: nothing is refused for KV
    half = gateway(kv_budget=0.5)  # 128 tokens
    half._check_kv_budget(128)
    half.kv_reserved = 100
    half._check_kv_budget(28)
    with pytest.raises(CapacityExceeded, match="KV budget"):
        half._check_kv_budget(29)
    router.snapshot = [i for i in router.snapshot if i.role != "decode"]
    half._check_kv_budget(10**6)  # no decode instance registered: no capacity to refuse by (failover waits)


def _planned_router(links: list[tuple[str, str, str]]) -> Router:
    """Two prefill instances (KV servers tcp://p0, tcp://p1) and three decode instances, with `links`."""
    router = Router(registry=Registry("redis://x"), fingerprint=FP, kv_links=links)
    router.snapshot = [
        InstanceInfo(
            f"p{i}", "prefill", f"127.0.0.1:{1000 + i}", kv_address=f"tcp://p{i}", model_fingerprint=FP
        )
        for i in range(2)
    ] + [
        InstanceInfo(
            f"d{i}",
            "decode",
            f"127.0.0.1:{2000 + i}",
            model_fingerprint=FP,
            kv_blocks_total=100,
            block_size=16,
        )
        for i in range(3)
    ]
    return router


def test_router_pairs_each_prefill_instance_with_the_decode_instances_the_plan_links() -> None:
    router = _planned_router([("p0", "d0", "raw"), ("p0", "d1", "int8"), ("p1", "d2", "fp8")])
    picks = []
    for _ in range(4):  # d0 and d1 share p0's KV by free blocks; d2 (the most free) is never p0's
        inst = router.pick_decode(64, "tcp://p0")
        picks.append(inst.instance_id)
        router._reserved_blocks[inst.instance_id] += 10
    assert sorted(set(picks)) == ["d0", "d1"] and picks.count("d0") == picks.count("d1") == 2
    assert router.pick_decode(64, "tcp://p1").instance_id == "d2"
    assert router.link_codec("tcp://p0", "d1") == "int8" and router.link_codec("tcp://p1", "d2") == "fp8"
    assert router.link_codec("tcp://p1", "d0") is None  # not a planned link
    assert router.link_codec("tcp://gone", "d0") is None  # a prefill instance the snapshot lacks
    # a local prefill (no KV to move) may go anywhere: the most free decode instance
    router._reserved_blocks["d2"] = 50
    assert router.pick_decode(64, "").instance_id in {"d0", "d1"}


def test_router_falls_back_to_any_decode_instance_when_the_linked_ones_are_gone() -> None:
    router = _planned_router([("p0", "d0", "raw")])
    assert router.pick_decode(64, "tcp://p0").instance_id == "d0"
    router.snapshot = [i for i in router.snapshot if i.instance_id != "d0"]  # d0 died
    assert router.pick_decode(64, "tcp://p0").instance_id in {"d1", "d2"}
    unplanned = _planned_router([])
    assert unplanned.link_codec("tcp://p0", "d0") is None
    assert unplanned.pick_decode(64, "tcp://p0").instance_id == "d0"  # most free, lowest in-flight: first


def test_a_planned_link_codec_stands_in_for_the_configured_one() -> None:
    cfg = CoordinatorConfig(model_dir="m", redis_url="redis://x", codec="auto")
    profiles = (CodecProfile("raw", 1.0, math.inf, math.inf), CodecProfile("int8", 0.25, 1e9, 1e9, 0.001))
    assert pick_codec(cfg, profiles, 8 * MiB, None, 5, None, codec="int8") == "int8"
    assert pick_codec(cfg, profiles, 8 * MiB, None, 5, 0.0, codec="int8") == "raw"  # the request's floor wins
    assert pick_codec(cfg, profiles, 8 * MiB, None, 5, None) == "raw"  # auto, link unmeasured
