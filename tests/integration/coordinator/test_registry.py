"""The Redis registry against a real redis-server: announce, snapshot, TTL expiry, withdraw."""

from __future__ import annotations

import time

from coordinator.registry import Heartbeat, InstanceInfo, Registry
from pdserve.redis_server import RedisServer


def _info(i: int, role: str = "decode") -> InstanceInfo:
    return InstanceInfo(
        instance_id=f"{role}-{i}", role=role, grpc_address=f"127.0.0.1:{5000 + i}", kv_blocks_total=64
    )


def test_announce_snapshot_and_ttl_expiry(redis_server: RedisServer) -> None:
    reg = Registry(redis_server.url, cluster="ttl-test")
    announced = time.monotonic()
    reg.announce(_info(1), ttl_s=0.5)
    reg.announce(_info(2, "prefill"), ttl_s=30)
    assert [i.instance_id for i in reg.instances("decode")] == ["decode-1"]
    assert {i.role for i in reg.instances()} == {"decode", "prefill"}
    while reg.instances("decode"):  # an instance that stopped heartbeating drops out after its TTL
        assert time.monotonic() - announced < 5.0, "decode-1 still registered 10 TTLs after its announce"
        time.sleep(0.02)
    assert time.monotonic() - announced >= 0.45, "decode-1 dropped out before its 0.5 s TTL"
    assert [i.instance_id for i in reg.instances("prefill")] == ["prefill-2"]


def test_clusters_are_isolated(redis_server: RedisServer) -> None:
    a, b = Registry(redis_server.url, cluster="a"), Registry(redis_server.url, cluster="b")
    a.announce(_info(1), ttl_s=10)
    assert b.instances() == []
    assert len(a.instances()) == 1


def test_heartbeat_keeps_alive_and_withdraws_on_stop(redis_server: RedisServer) -> None:
    reg = Registry(redis_server.url, cluster="hb-test")
    load = {"free": 64}
    hb = Heartbeat(
        reg, lambda: InstanceInfo("d-1", "decode", "127.0.0.1:1", kv_blocks_free=load["free"]), ttl_s=0.6
    )
    hb.start()
    try:
        assert len(reg.instances()) == 1  # registered before start() returns
        load["free"] = 7
        start = time.monotonic()
        while time.monotonic() - start < 1.2:  # two TTLs: registered throughout only by the heartbeat
            assert len(reg.instances()) == 1, f"dropped out {time.monotonic() - start:.2f} s in"
            time.sleep(0.05)
        (inst,) = reg.instances()
        assert inst.kv_blocks_free == 7, "heartbeats must carry fresh load"
    finally:
        hb.stop()
    assert reg.instances() == [], "stop() must withdraw the instance at once"


def test_round_trip_json_ignores_unknown_fields() -> None:
    info = _info(3)
    raw = info.to_json().replace("{", '{"future_field": 1, ', 1)
    assert InstanceInfo.from_json(raw) == info
