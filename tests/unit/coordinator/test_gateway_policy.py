"""Gateway policies (pure policy code: the router's in-flight counts and the coordinator config; the serving
paths are in tests/e2e): conditional disaggregation (when a prompt is prefilled on a decode instance) and
layer-wise streaming (when decode starts pulling the KV)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.registry import InstanceInfo
from coordinator.router import Router

FP = 7


def _router(prefill: int = 1, decode: int = 1) -> Router:
    router = Router(registry=None, fingerprint=FP)  # type: ignore[arg-type] - the snapshot is set by hand
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

    def gateway(**kw: object) -> Gateway:
        cfg = CoordinatorConfig(model_dir=str(tiny_model_dir), redis_url="redis://x", **kw)  # type: ignore[arg-type]
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
