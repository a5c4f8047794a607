"""The KV hand-off of one rank process (rank > 0) of a TP x PP instance, on its own KV shard.

Rank 0 (the instance) drives it with JSON messages over the rank's control pipe (engine.parallel.runner):

prefill rank (a KVServer of its own, serving its layers x KV heads):
    {"op": "open", "leases": [{"tid", "token" (hex), "num_tokens", "blocks", "token_ids"}]}
        -> opens each lease under rank 0's transfer id and token; answers {"op": "opened", "tids": [...]}
    {"op": "finish", "tid", "first_token"}   the pass is done (every layer's KV is in the cache)
    {"op": "cancel", "tid"}
    a lease released here (pulled, expired, cancelled) -> {"op": "released", "tid", "reason"}
decode rank (a KVPuller of its own, pulling its rectangle into its cache):
    {"op": "pull", "tid", "handle": {tp, pp, num_layers, num_kv_heads, rank_addresses}, "codec", "token"
     (hex), "blocks", "num_tokens", "max_kl" (optional: the request's quality floor)} -> {"op": "pulled", "tid", "first_token"} or {"op": "pulled", "tid",
     "error", "kind"} (kind: the error's class name, so rank 0 raises the same typed error)

Nothing is gathered on rank 0: each rank's KV leaves or enters its own cache.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from engine.kv_cache import KVCache
from engine.parallel.layout import Layout
from kv_transfer.client import KVPuller
from kv_transfer.codec import CodecContext
from kv_transfer.reshard import decode_replica, is_canonical
from kv_transfer.server import KVServer
from kv_transfer.transport import default_scheme, transport_for
from kv_transfer.wire import Replica

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], None]  # a message to rank 0 (thread-safe)


@dataclass(frozen=True)
class RankKVConfig:
    """The instance's KV settings a rank process needs (part of its RankSpec)."""

    role: str  # "prefill" | "decode"
    transport: str = "auto"
    host: str = "127.0.0.1"
    advertise_host: str = ""
    lease_ttl_s: float = 30.0
    pull_timeout_s: float = 30.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RankKVConfig:
        return RankKVConfig(**d)


def read_shard(
    cache: KVCache, layer0: int, blocks: list[int], num_tokens: int, layer: int
) -> tuple[Tensor, Tensor]:
    """A rank's `read_layer`: global `layer` -> this rank's K/V [T, local heads, D] on the host."""
    k, v = cache.read(layer - layer0, blocks, num_tokens)
    return (k.cpu(), v.cpu()) if k.is_cuda else (k, v)


class PrefillRankKV:
    """A prefill rank's KVServer over its shard (module doc)."""

    def __init__(
        self, cfg: RankKVConfig, layout: Layout, rank: int, model_dir: str, cache: KVCache, fingerprint: int
    ) -> None:
        from engine.config import ModelConfig

        mc = ModelConfig.from_hf_dir(model_dir)
        self.num_layers = mc.num_layers
        self.layers, self.heads = layout.owned(rank, mc.num_layers, mc.num_kv_heads)
        self.leasing = is_canonical(layout, rank, mc.num_kv_heads)  # a replica's KV is never pulled
        self.cache = cache
        scheme = default_scheme() if cfg.transport == "auto" else cfg.transport
        self.server = KVServer(
            transport_for(scheme),
            cfg.host,
            fingerprint=fingerprint,
            lease_ttl_s=cfg.lease_ttl_s,
            codecs=CodecContext.from_model_dir(model_dir),
            advertise_host=cfg.advertise_host,
        )
        self.server.start()
        self.address = self.server.address
        self.send: Send = lambda msg: None

    def handle(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "open":
            tids = []
            for lease in msg["leases"]:
                if self.leasing:
                    self.server.open_lease(
                        lease["tid"],
                        self.num_layers,
                        lease["num_tokens"],
                        functools.partial(
                            read_shard, self.cache, self.layers[0], lease["blocks"], lease["num_tokens"]
                        ),
                        self._on_release,
                        token_ids=lease["token_ids"],
                        layers=self.layers,
                        heads=self.heads,
                        token=bytes.fromhex(lease["token"]),
                    )
                tids.append(lease["tid"])
            self.send({"op": "opened", "tids": tids})
        elif op == "finish":
            self.server.finish(msg["tid"], msg["first_token"])
        elif op == "cancel":
            self.server.cancel(msg["tid"])
        else:
            raise ValueError(f"prefill rank: unknown op {op!r}")

    def _on_release(self, tid: str, reason: str) -> None:
        self.send({"op": "released", "tid": tid, "reason": reason})

    def close(self) -> None:
        self.server.stop()


class DecodeRankKV:
    """A decode rank's KVPuller into its shard (module doc)."""

    def __init__(
        self, cfg: RankKVConfig, layout: Layout, rank: int, model_dir: str, cache: KVCache, fingerprint: int
    ) -> None:
        from engine.config import ModelConfig

        mc = ModelConfig.from_hf_dir(model_dir)
        self.layers, self.heads = layout.owned(rank, mc.num_layers, mc.num_kv_heads)
        self.replica = decode_replica(layout, rank, mc.num_kv_heads)  # replicated KV heads: all copies pull
        self.cache = cache
        self.puller = KVPuller(fingerprint=fingerprint, timeout_s=cfg.pull_timeout_s)
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rank-pull")
        self.address = ""
        self.send: Send = lambda msg: None

    def handle(self, msg: dict[str, Any]) -> None:
        if msg["op"] != "pull":
            raise ValueError(f"decode rank: unknown op {msg['op']!r}")
        self.pool.submit(self._pull, msg)

    def _pull(self, msg: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"op": "pulled", "tid": msg["tid"]}
        try:
            trailer = pull_shard(
                self.puller,
                self.cache,
                self.layers,
                self.heads,
                msg["handle"],
                msg["tid"],
                msg["codec"],
                bytes.fromhex(msg["token"]),
                msg["blocks"],
                replica=self.replica,
                max_kl=msg.get("max_kl"),
            )
            if trailer.num_tokens != msg["num_tokens"]:
                raise ValueError(f"KV stream has {trailer.num_tokens} tokens, prompt has {msg['num_tokens']}")
            reply["first_token"] = trailer.first_token_id
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, which fails the request
            reply["error"], reply["kind"] = str(exc), type(exc).__name__
        self.send(reply)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def pull_shard(
    puller: KVPuller,
    cache: KVCache,
    layers: tuple[int, int],
    heads: tuple[int, int],
    handle: dict[str, Any],
    tid: str,
    codec: str,
    token: bytes,
    blocks: list[int],
    *,
    replica: Replica = Replica(),
    max_kl: float | None = None,
) -> Any:
    """Pull this rank's rectangle `layers` x `heads` of transfer `tid` into `cache` (its local layers and heads)
    at `blocks`. handle: the prefill side's {tp, pp, num_layers, num_kv_heads, rank_addresses}. replica: this
    rank's place among the decode ranks holding the same KV heads (reshard.decode_replica). max_kl: the
    request's quality floor, sent in every PULL (KVPuller.pull). -> Trailer."""

    def write_piece(layer: int, head_start: int, k: Tensor, v: Tensor) -> None:  # k, v [T, h, D]
        a = head_start - heads[0]  # the piece's heads in this rank's cache
        cache.write(layer - layers[0], blocks, 0, k, v, heads=(a, a + k.shape[1]))

    return puller.pull_pieces(
        Layout(handle["tp"], handle["pp"]),
        handle["rank_addresses"],
        tid,
        codec,
        layers,
        heads,
        write_piece,
        token=token,
        num_layers=handle["num_layers"],
        num_kv_heads=handle["num_kv_heads"],
        replica=replica,
        max_kl=max_kl,
    )


def make_rank_kv(
    cfg: RankKVConfig, layout: Layout, rank: int, model_dir: str, cache: KVCache, fingerprint: int
) -> PrefillRankKV | DecodeRankKV:
    cls = PrefillRankKV if cfg.role == "prefill" else DecodeRankKV
    return cls(cfg, layout, rank, model_dir, cache, fingerprint)
