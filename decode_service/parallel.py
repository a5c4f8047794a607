"""The decode engine of a TP x PP instance: every rank pulls its own KV shard.

For each job, rank 0 (this process) asks every other rank to pull its rectangle (its layers x its KV heads)
into its own cache (kv_transfer.ranks, over the control pipes), pulls its own, and waits for all: the pull
succeeds when every rank's did and all agree on the first token. Nothing is gathered on rank 0. A KV head
replicated on several decode ranks (num_kv_heads < tp) is pulled by each of them, every PULL declaring its
replica index and the copies (reshard.decode_replica); the prefill lease waits for all copies.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from decode_service.engine import DecodeEngine, DecodeJob
from engine.parallel.runner import ParallelRunner
from kv_transfer.client import KVPuller, Trailer
from kv_transfer.ranks import pull_shard
from kv_transfer.reshard import decode_replica
from pdserve.errors import Unavailable


class ParallelDecodeEngine(DecodeEngine):
    def __init__(
        self,
        runner: ParallelRunner,
        puller: KVPuller,
        max_running: int,
        max_queue: int,
        max_batch_tokens: int,
    ) -> None:
        cfg, layout = runner.config, runner.layout
        super().__init__(runner, puller, max_running, max_queue, max_batch_tokens)
        self.prunner = runner
        self.rect = layout.owned(0, cfg.num_layers, cfg.num_kv_heads)  # rank 0's (layers, heads)
        self.replica = decode_replica(layout, 0, cfg.num_kv_heads)
        self._replies: dict[str, dict[int, dict[str, Any]]] = {}  # transfer id -> rank -> its "pulled"
        self._replies_cond = threading.Condition()
        runner.on_message = self._on_rank_message

    def _pull_kv(self, job: DecodeJob) -> Trailer:
        cfg = self.runner.config
        handle = job.kv_layout or {
            "tp": 1,
            "pp": 1,
            "num_layers": cfg.num_layers,
            "num_kv_heads": cfg.num_kv_heads,
            "rank_addresses": [job.kv_address],
        }
        tid, others = job.transfer_id, range(1, self.prunner.layout.world_size)
        with self._replies_cond:
            self._replies[tid] = {}
        msg = {
            "op": "pull",
            "tid": tid,
            "handle": handle,
            "codec": job.codec,
            "token": job.kv_token.hex(),
            "blocks": list(job.seq.blocks),
            "num_tokens": len(job.prompt_ids),
            "max_kl": job.max_kl,
        }
        try:
            for rank in others:
                self.prunner.send(rank, msg)
            trailer = pull_shard(
                self.puller,
                self.runner.kv_cache,
                *self.rect,
                handle,
                tid,
                job.codec,
                job.kv_token,
                job.seq.blocks,
                replica=self.replica,
                max_kl=job.max_kl,
            )
            # every rank answers (its own pull has the same timeout); the margin covers the control pipes
            deadline = time.monotonic() + self.puller.timeout_s + 5.0
            with self._replies_cond:
                while len(self._replies[tid]) < len(others):
                    if self.prunner.lost is not None or not self._replies_cond.wait(
                        deadline - time.monotonic()
                    ):
                        raise Unavailable(
                            f"the ranks did not finish their KV pulls ({self.prunner.lost or 'timeout'})"
                        )
                replies = self._replies[tid]
        finally:
            with self._replies_cond:
                self._replies.pop(tid, None)
        for rank, reply in sorted(replies.items()):
            if "error" in reply:
                raise Unavailable(f"rank {rank}'s KV pull failed: {reply['kind']}: {reply['error']}")
            if reply["first_token"] != trailer.first_token_id:
                raise Unavailable(f"rank {rank}'s KV trailer names another first token")
        return trailer

    def _on_rank_message(self, rank: int, msg: dict[str, Any]) -> None:
        if msg["op"] != "pulled":
            return
        with self._replies_cond:
            if msg["tid"] in self._replies:
                self._replies[msg["tid"]][rank] = msg
                self._replies_cond.notify_all()
