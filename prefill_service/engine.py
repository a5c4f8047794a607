"""The prefill step loop: batch queued prompts up to a token budget, run one forward pass that
publishes each layer's KV as soon as it is written, sample the first token, and keep the KV blocks
under a lease until a decode instance has pulled them (or the lease expires or is cancelled).

Threads: the step loop owns the model; the KV server's threads read leased blocks (disjoint from
the blocks being written) and call `_on_release`; gRPC handlers call `submit` / `cancel`.
Invariant: a request's blocks are freed exactly once, by the lease's release callback, or at once
if it is cancelled before it was scheduled.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.block_manager import BlockManager
from engine.runner import ModelRunner
from engine.sampling import SamplingParams
from engine.sequence import Sequence
from kv_transfer.server import KVServer
from pdserve.errors import Cancelled, CapacityExceeded, InvalidRequest, PDServeError
from prefill_service import tracing

log = logging.getLogger(__name__)


@dataclass
class Scheduled:
    transfer_id: str
    num_tokens: int


@dataclass
class Done:
    transfer_id: str
    first_token_id: int
    num_tokens: int
    queue_s: float
    compute_s: float


Event = Scheduled | Done | PDServeError


@dataclass(eq=False)  # identity semantics: jobs live in sets and are compared by object
class PrefillJob:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]  # called from the step loop thread; must not block
    transfer_id: str = ""
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)
    seq: Sequence | None = None
    trace: Any = None  # OpenTelemetry Context: the parent of this job's spans (None: not traced)
    lease_span: Any = None


class PrefillEngine:
    def __init__(
        self, runner: ModelRunner, kv_server: KVServer, max_batch_tokens: int, max_queue: int
    ) -> None:
        self.runner = runner
        self.kv_server = kv_server
        self.block_manager = BlockManager(runner.kv_cache.num_blocks, runner.block_size)
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self._queue: collections.deque[PrefillJob] = collections.deque()
        self._leased: dict[str, PrefillJob] = {}  # transfer_id -> job whose blocks are leased
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="prefill-step", daemon=True)

    # ---- called from gRPC handlers -------------------------------------------------------
    def submit(self, job: PrefillJob) -> None:
        max_len = self.runner.config.max_position_embeddings
        job.params.validate(len(job.prompt_ids), max_len)
        if any(t < 0 or t >= self.runner.config.vocab_size for t in job.prompt_ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {self.runner.config.vocab_size})")
        need = self.block_manager.blocks_needed(len(job.prompt_ids))
        if need > self.block_manager.num_blocks:
            raise CapacityExceeded(
                f"prompt needs {need} KV blocks, this instance has {self.block_manager.num_blocks} in total"
            )
        job.transfer_id = f"{job.request_id}:{uuid.uuid4().hex[:8]}"
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise CapacityExceeded(f"prefill queue full ({self.max_queue} requests waiting)")
            self._queue.append(job)
            self._cond.notify()

    def cancel(self, job: PrefillJob) -> None:
        """Drop a queued job, or release its lease if it already ran. Idempotent."""
        with self._cond:
            job.cancelled = True  # seen by _run if the lease is not open yet
            if job in self._queue:
                self._queue.remove(job)
                return
        if job.transfer_id:
            self.kv_server.cancel(job.transfer_id)

    def release(self, transfer_id: str) -> bool:
        return self.kv_server.cancel(transfer_id)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"queue_len": len(self._queue), "leases": len(self._leased)}

    def check_integrity(self) -> None:
        """Block manager consistent, and every used block owned by exactly the live leases."""
        with self._cond:
            owners = [job.seq.blocks for job in self._leased.values() if job.seq is not None]
            self.block_manager.check_integrity(owners=owners)

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            job.emit(Cancelled("prefill instance shutting down"))
        self._thread.join(10.0)
        for transfer_id in list(self._leased):
            self.kv_server.cancel(transfer_id)

    # ---- step loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not (batch := self._schedule()):
                    self._cond.wait(0.05)
                if self._stop:
                    return
            try:
                self._run(batch)
            except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, not the instance
                log.exception("prefill batch failed")
                for job in batch:
                    if job.transfer_id in self._leased:
                        self.kv_server.cancel(job.transfer_id)
                    job.emit(exc if isinstance(exc, PDServeError) else PDServeError(f"prefill failed: {exc}"))

    def _schedule(self) -> list[PrefillJob]:
        """FIFO: take queued jobs while their prompt tokens fit the budget and their blocks fit memory."""
        batch: list[PrefillJob] = []
        tokens = 0
        while self._queue:
            job = self._queue[0]
            n = len(job.prompt_ids)
            if batch and tokens + n > self.max_batch_tokens:
                break
            if not self.block_manager.can_allocate(n):
                break  # back-pressure: wait for leases to be pulled / expire
            self._queue.popleft()
            seq = Sequence(job.request_id, list(job.prompt_ids), job.params)
            seq.blocks = self.block_manager.allocate(n)
            job.seq = seq
            self._leased[job.transfer_id] = job
            batch.append(job)
            tokens += n
        return batch

    def _run(self, batch: list[PrefillJob]) -> None:
        cache = self.runner.kv_cache
        num_layers = self.runner.config.num_layers
        for job in batch:
            seq = job.seq
            assert seq is not None
            tracing.open_lease(job, num_layers)
            self.kv_server.open_lease(
                job.transfer_id,
                num_layers,
                seq.num_prompt_tokens,
                read_layer=lambda layer, b=seq.blocks, n=seq.num_prompt_tokens: cache.read(layer, b, n),
                on_release=self._on_release,
            )
            job.emit(Scheduled(job.transfer_id, seq.num_prompt_tokens))
        started = time.monotonic()
        spans = tracing.BatchSpans(batch, started)

        def on_layer(layer: int) -> None:
            for job in batch:
                self.kv_server.mark_ready(job.transfer_id, layer + 1)
            spans.layer_ready(layer)

        try:
            first_tokens = self.runner.prefill([job.seq for job in batch], on_layer=on_layer)  # type: ignore[misc]
        except BaseException as exc:
            spans.end(exc)
            raise
        compute_s = time.monotonic() - started
        spans.end()
        for job, token in zip(batch, first_tokens, strict=True):
            assert token is not None  # whole prompts, never a partial chunk, are prefilled here
            self.kv_server.finish(job.transfer_id, token)
            job.emit(Done(job.transfer_id, token, len(job.prompt_ids), started - job.arrived, compute_s))
            if job.cancelled:  # cancelled while computing: nobody will pull this KV
                self.kv_server.cancel(job.transfer_id)

    def _on_release(self, transfer_id: str, reason: str) -> None:
        with self._cond:
            job = self._leased.pop(transfer_id, None)
            if job is not None:
                tracing.end_lease(job, reason)
            if job is not None and job.seq is not None:
                self.block_manager.free(job.seq.blocks)
                job.seq.blocks = []
            self._cond.notify()
        log.debug("lease %s released (%s)", transfer_id, reason)
