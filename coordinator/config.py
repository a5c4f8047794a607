"""The coordinator process's one frozen config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CoordinatorConfig:
    model_dir: str  # tokenizer + config.json are read here; weights are never loaded by the gateway
    redis_url: str
    cluster: str = "default"
    host: str = "127.0.0.1"
    port: int = 50051  # gateway gRPC port; 0 = a free one (printed on stdout)
    expect_prefill: int = 1  # health reports SERVING once this many of each role are registered
    expect_decode: int = 1
    codec: str = "auto"  # KV codec: a name, or "auto" = chosen per link (kv_transfer/choice.py)
    max_kl: float = 0.01  # quality floor for "auto": mean per-token KL (nats) a lossy codec may cost
    layerwise: bool = True  # start decode's KV pull when prefill schedules (layer-wise streaming)
    refresh_s: float = 0.25  # registry snapshot period
    max_inflight: int = 4096  # requests in flight before RESOURCE_EXHAUSTED
    suspect_s: float = 5.0  # an instance that refused a connection is skipped this long
    colocated: bool = False  # baseline mode: proxy Generate to colocated instances (no prefill/decode)
    expect_colocated: int = 1  # colocated mode: SERVING once this many colocated instances are registered
