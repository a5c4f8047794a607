"""What `pdserve bench compare` compares: the serving systems on the same 2 cores, and starting and stopping
them (every system runs as a `LocalCluster`: gateway, Redis, instances)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bench.serving import run_load
from bench.workload import Uniform, Workload, make_requests

log = logging.getLogger("bench.compare")

DISAGG = "disagg-1P1D"
# The same two instances with conditional disaggregation (coordinator `--local-prefill busy`): a prompt of at
# most 128 tokens is prefilled on the decode instance while the prefill instance has two requests in flight.
DISAGG_COND = "disagg-1P1D-cond"
KV_BLOCKS = 2048  # per instance, every system: 64 running requests of the longest full-mode workload fit


@dataclass(frozen=True)
class System:
    """One serving configuration on `devices` cores: prefill + decode instances, or colocated replicas."""

    name: str
    devices: int
    prefill: int = 0
    decode: int = 0
    colocated: int = 0
    chunk_tokens: int | None = None
    local_prefill: str = "off"  # coordinator --local-prefill (conditional disaggregation)


def systems(budgets: tuple[int, ...]) -> list[System]:
    """Disaggregated 1P + 1D against every colocated configuration on 2 cores."""
    out = [
        System(DISAGG, 2, prefill=1, decode=1),
        System(DISAGG_COND, 2, prefill=1, decode=1, local_prefill="busy"),
        System("colocated-2x1core", 2, colocated=2),
        System("colocated-1x2core", 2, colocated=1),
    ]
    for b in budgets:
        out.append(System(f"colocated-2x1core-chunk{b}", 2, colocated=2, chunk_tokens=b))
        out.append(System(f"colocated-1x2core-chunk{b}", 2, colocated=1, chunk_tokens=b))
    return out


def start_system(system: System, model_dir: str, cpus: tuple[int, ...], log_dir: str):
    from pdserve.launcher import ClusterConfig, LocalCluster

    cfg = ClusterConfig(
        model_dir=model_dir,
        port=0,
        prefill=system.prefill,
        decode=system.decode,
        colocated=system.colocated,
        chunk_tokens=system.chunk_tokens,
        local_prefill=system.local_prefill,
        cpus=cpus,
        use_cuda=False,
        heartbeat_ttl_s=1.5,
        num_kv_blocks=KV_BLOCKS,
        log_dir=os.path.join(log_dir, system.name),
    )
    return LocalCluster(cfg).start(timeout_s=180)


def warm_up(address: str, source: list[int]) -> None:
    """A few requests through every instance, so first-call costs are not in the measurements."""
    wl = Workload("warmup", n_requests=6, rate=20.0, prompt=Uniform(16, 64), output=Uniform(4, 8), seed=99)
    asyncio.run(run_load(address, make_requests(wl, source), request_timeout_s=60, drain_s=60))


def start_all(chosen: list[System], model_dir: str, cpus: tuple[int, ...], log_dir: str) -> dict[str, Any]:
    """Start every system at once (they idle while others run load); all or none."""
    from pdserve.launcher import LocalCluster

    t = time.monotonic()
    clusters: dict[str, LocalCluster] = {}
    with ThreadPoolExecutor(len(chosen)) as pool:
        futures = {s.name: pool.submit(start_system, s, model_dir, cpus, log_dir) for s in chosen}
        errors = []
        for name, fut in futures.items():
            try:
                clusters[name] = fut.result()
            except Exception as exc:  # noqa: BLE001 - reported after the others are stopped
                errors.append(f"{name}: {exc}")
    if errors:
        stop_all(list(clusters.values()))
        raise RuntimeError("could not start every system: " + "; ".join(errors))
    log.info("%d systems up in %.1fs", len(clusters), time.monotonic() - t)
    return clusters


def stop_all(clusters: list[Any]) -> None:
    """Stop clusters in parallel (each waits for its processes' graceful shutdown)."""
    with ThreadPoolExecutor(max(1, len(clusters))) as pool:
        list(pool.map(lambda c: c.stop(), clusters))
