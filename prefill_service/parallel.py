"""The prefill engine of a TP x PP instance: every rank hands over its own KV shard.

Rank 0 (this process) opens its lease on its own KVServer, over its rectangle (its layers x its KV heads), and
has every other canonical rank open one under the same transfer id and token (kv_transfer.ranks, over the
control pipes) before the pass runs and the handle (with every rank's KV address) goes out. After the pass,
each rank's lease is finished with the first token. A job's blocks are freed only when the leases of ALL its
ranks are released (each rank's blocks are the same block ids, in its own cache): a lease released without
being pulled (expired, cancelled) cancels the others.

Rank 0 publishes its layers as they are computed; the other ranks publish theirs when the pass ends.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any

from engine.parallel.runner import ParallelRunner
from kv_transfer.reshard import is_canonical
from kv_transfer.server import KVServer
from pdserve.errors import PDServeError, Unavailable
from prefill_service.engine import PrefillEngine, PrefillJob, read_host_kv

log = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 10.0  # the other ranks confirm their leases within this, or the pass fails


class ParallelPrefillEngine(PrefillEngine):
    def __init__(
        self, runner: ParallelRunner, kv_server: KVServer, max_batch_tokens: int, max_queue: int
    ) -> None:
        super().__init__(runner, kv_server, max_batch_tokens, max_queue)
        cfg, layout = runner.config, runner.layout
        self.prunner = runner
        self.rect = layout.owned(0, cfg.num_layers, cfg.num_kv_heads)  # rank 0's (layers, heads)
        self.leasing = [r for r in range(1, layout.world_size) if is_canonical(layout, r, cfg.num_kv_heads)]
        self._held: dict[str, set[int]] = {}  # transfer id -> ranks whose lease is not released yet
        self._opened: dict[str, set[int]] = {}  # transfer id -> ranks that confirmed their lease
        self._ranks_cond = threading.Condition()
        runner.kv_addresses[0] = kv_server.address
        runner.on_message = self._on_rank_message

    def _open_leases(self, jobs: list[PrefillJob]) -> None:
        cache, num_layers = self.runner.kv_cache, self.runner.config.num_layers
        leases: list[dict[str, Any]] = []
        for job in jobs:
            seq, tid = job.seq, job.transfer_id
            with self._ranks_cond:
                self._held[tid] = {0, *self.leasing}
                self._opened[tid] = set()
            job.kv_token = self.kv_server.open_lease(
                tid,
                num_layers,
                seq.num_prompt_tokens,
                read_layer=functools.partial(read_host_kv, cache, seq.blocks, seq.num_prompt_tokens),
                on_release=lambda t, reason: self._rank_released(t, 0, reason),
                token_ids=job.prompt_ids,
                layers=self.rect[0],
                heads=self.rect[1],
            )
            leases.append(
                {
                    "tid": tid,
                    "token": job.kv_token.hex(),
                    "num_tokens": seq.num_prompt_tokens,
                    "blocks": list(seq.blocks),
                    "token_ids": list(job.prompt_ids),
                }
            )
        for rank in self.leasing:
            self.prunner.send(rank, {"op": "open", "leases": leases})
        deadline = time.monotonic() + OPEN_TIMEOUT_S
        want = set(self.leasing)
        with self._ranks_cond:
            while not all(self._opened.get(j.transfer_id, want) >= want for j in jobs):
                if self.prunner.lost is not None or not self._ranks_cond.wait(deadline - time.monotonic()):
                    raise Unavailable(
                        f"the ranks did not open their KV leases ({self.prunner.lost or 'timeout'})"
                    )
            for job in jobs:
                self._opened.pop(job.transfer_id, None)

    def _finish_lease(self, transfer_id: str, first_token: int) -> None:
        self.kv_server.finish(transfer_id, first_token)
        for rank in self.leasing:
            self._send(rank, {"op": "finish", "tid": transfer_id, "first_token": first_token})

    def _cancel_lease(self, transfer_id: str) -> bool:
        with self._ranks_cond:
            ranks = sorted(self._held.get(transfer_id, ()))
        for rank in ranks:
            if rank != 0:
                self._send(rank, {"op": "cancel", "tid": transfer_id})
        return self.kv_server.cancel(transfer_id) or bool(ranks)

    def _send(self, rank: int, msg: dict[str, Any]) -> None:
        """A message to a rank; if the rank is gone, its lease counts as released (its KV is gone with it)."""
        try:
            self.prunner.send(rank, msg)
        except PDServeError as exc:
            log.warning("rank %d: %s", rank, exc)
            if "tid" in msg:
                self._rank_released(msg["tid"], rank, "cancelled")

    def _on_rank_message(self, rank: int, msg: dict[str, Any]) -> None:
        """From a rank's control pipe (a reader thread)."""
        if msg["op"] == "opened":
            with self._ranks_cond:
                for tid in msg["tids"]:
                    if tid in self._opened:
                        self._opened[tid].add(rank)
                self._ranks_cond.notify_all()
        elif msg["op"] == "released":
            self._rank_released(msg["tid"], rank, msg["reason"])

    def _rank_released(self, transfer_id: str, rank: int, reason: str) -> None:
        """One rank's lease is released; once every rank's is, the job's blocks are freed."""
        with self._ranks_cond:
            held = self._held.get(transfer_id)
            if held is None or rank not in held:
                return
            held.discard(rank)
            done = not held
            if done:
                del self._held[transfer_id]
            others = sorted(held)
        if not done and reason != "pulled":  # nobody will pull the rest: release it now, not at expiry
            for other in others:
                if other == 0:
                    self.kv_server.cancel(transfer_id)
                else:
                    self._send(other, {"op": "cancel", "tid": transfer_id})
        if done:
            self._on_release(transfer_id, reason)
