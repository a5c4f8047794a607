"""The cluster registry in Redis: instances announce themselves with a TTL heartbeat; the
coordinator reads a snapshot. A dead instance stops heartbeating and its key expires (TTL), so it
drops out of every snapshot taken after `ttl_s` at the latest.

Keys: `pdserve:{cluster}:inst:{role}:{instance_id}` -> JSON of `InstanceInfo`, with `EX ttl_s`;
`pdserve:{cluster}:planner` -> JSON of the coordinator's latest replan assessment, with a TTL.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from pdserve.tls import TLSFiles, redis_kwargs

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "colocated")


@dataclass(frozen=True)
class InstanceInfo:
    instance_id: str
    role: str  # "prefill" | "decode" | "colocated"
    grpc_address: str  # host:port of the instance's gRPC service
    kv_address: str = ""  # prefill: where decode pulls KV (transport URL)
    transports: tuple[str, ...] = ()
    node: str = ""  # host name: same node -> shared memory / NVLink possible
    devices: str = ""  # e.g. "cpu:0" or "cuda:1" (rank 0's under TP/PP)
    tp: int = (
        1  # the instance's layout: tensor- and pipeline-parallel ranks (rank 0 is what the registry sees)
    )
    pp: int = 1
    rank_devices: tuple[str, ...] = ()  # device of each global rank (pp_rank * tp + tp_rank); () = (devices,)
    model_fingerprint: int = 0
    max_model_len: int = 0
    kv_blocks_total: int = 0
    block_size: int = 0
    # load, refreshed with every heartbeat
    queue_len: int = 0
    running: int = 0
    kv_blocks_free: int = 0
    leases: int = 0
    links: dict[str, float] = field(default_factory=dict)  # decode: prefill KV address -> measured bytes/s
    updated_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(raw: str | bytes) -> InstanceInfo:
        data = json.loads(raw)
        data["transports"] = tuple(data.get("transports", ()))
        data["rank_devices"] = tuple(data.get("rank_devices", ()))
        known = {f.name for f in dataclasses.fields(InstanceInfo)}
        return InstanceInfo(**{k: v for k, v in data.items() if k in known})


def _key(cluster: str, role: str, instance_id: str) -> str:
    return f"pdserve:{cluster}:inst:{role}:{instance_id}"


class Registry:
    """Thin client over one Redis database. A `rediss://` URL is TLS, with `tls`'s CA and this process's
    certificate (pdserve.tls.redis_kwargs); under --tls-ca only such a URL is accepted."""

    def __init__(self, url: str, cluster: str = "default", tls: TLSFiles | None = None) -> None:
        self.url = url
        self.cluster = cluster
        self._r = redis.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0, **redis_kwargs(url, tls or TLSFiles())
        )

    def announce(self, info: InstanceInfo, ttl_s: float) -> None:
        key = _key(self.cluster, info.role, info.instance_id)
        self._r.set(key, info.to_json(), px=max(1, int(ttl_s * 1000)))

    def withdraw(self, info: InstanceInfo) -> None:
        self._r.delete(_key(self.cluster, info.role, info.instance_id))

    def instances(self, role: str | None = None) -> list[InstanceInfo]:
        pattern = _key(self.cluster, role or "*", "*")
        keys = sorted(self._r.scan_iter(match=pattern, count=500))
        if not keys:
            return []
        out = []
        for raw in self._r.mget(keys):
            if raw is not None:  # expired between SCAN and MGET
                out.append(InstanceInfo.from_json(raw))
        return out

    def publish_planner(self, status: dict[str, Any], ttl_s: float) -> None:
        """The coordinator's latest replan assessment (coordinator/replanner.py), for `pdserve status` and
        `pdserve up --autoplan`; it expires when the coordinator stops refreshing it."""
        self._r.set(f"pdserve:{self.cluster}:planner", json.dumps(status), px=max(1, int(ttl_s * 1000)))

    def planner(self) -> dict[str, Any] | None:
        raw = self._r.get(f"pdserve:{self.cluster}:planner")
        return json.loads(raw) if raw else None

    def ping(self) -> bool:
        return bool(self._r.ping())

    def close(self) -> None:
        self._r.close()


class Heartbeat:
    """Background thread: re-announce `info_fn()` every ttl/3 seconds; withdraw on stop()."""

    def __init__(self, registry: Registry, info_fn: Callable[[], InstanceInfo], ttl_s: float = 3.0) -> None:
        self.registry = registry
        self.info_fn = info_fn
        self.ttl_s = ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-heartbeat", daemon=True)

    def start(self) -> None:
        self.registry.announce(self.info_fn(), self.ttl_s)  # registered before start() returns
        self._thread.start()

    def _run(self) -> None:
        # Every beat writes the whole record with a fresh TTL (SET, not EXPIRE), so a Redis restarted or
        # flushed has this instance back within one beat (ttl/3). No error ends the thread: a beat that
        # fails is logged and the next one tries again.
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.registry.announce(self.info_fn(), self.ttl_s)
            except Exception as exc:  # noqa: BLE001 - Redis down, or info_fn failing while stopping
                log.warning("heartbeat to %s failed: %s", self.registry.url, exc)

    def stop(self, timeout_s: float = 0.5) -> None:
        """Stop beating and withdraw the record, giving up after about `timeout_s` (an unreachable Redis
        must not hold a stopping instance: its key then expires by TTL)."""
        self._stop.set()
        if self._thread.is_alive():  # a beat in flight (not hung) lands before the withdraw
            self._thread.join(timeout_s / 2)

        def withdraw() -> None:
            try:
                self.registry.withdraw(self.info_fn())
            except Exception as exc:  # noqa: BLE001
                log.warning("withdraw from registry failed: %s (the record expires by TTL)", exc)

        t = threading.Thread(target=withdraw, name="registry-withdraw", daemon=True)
        t.start()
        t.join(timeout_s / 2)  # a hung Redis: the record expires by TTL
