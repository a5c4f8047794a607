"""The prefill step loop: batch queued prompts up to a token budget, run one forward pass that
publishes each layer's KV as soon as it is written, sample the first token, and keep the KV blocks
under a lease until a decode instance has pulled them (or the lease expires or is cancelled).

Threads: the step loop owns the model; the KV server's threads read leased blocks (disjoint from
the blocks being written) and call `_on_release`; gRPC handlers call `submit` / `cancel`.
Phases (`engine.step_loop.Phase`): WAITING -> LEASED (blocks reserved at admission; the lease opens
as its pass starts) -> DONE. Invariant: a request's blocks are freed exactly once, by the lease's
release callback (or by `_fail` if its pass failed before the lease opened), and never while its pass
runs: a lease released mid-pass (cancelled, expired) only marks the job, and `_end_pass` frees its
blocks once the model is done with them. A job cancelled while queued owns none.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from engine.kv_cache import KVCache, slot_runs
from engine.runner import ModelRunner
from engine.step_loop import Batch, Job, Phase, StepEngine, prompt_pass
from kv_transfer.server import KVServer
from pdserve.errors import PDServeError
from prefill_service import tracing

log = logging.getLogger(__name__)


@dataclass
class Scheduled:
    transfer_id: str
    num_tokens: int
    token: bytes = field(default=b"", repr=False)  # the lease's secret: goes into the KV handle only


@dataclass
class Done:
    transfer_id: str
    first_token_id: int
    num_tokens: int
    queue_s: float
    compute_s: float
    token: bytes = field(default=b"", repr=False)  # the lease's secret: goes into the KV handle only


Event = Scheduled | Done | PDServeError


@dataclass(eq=False)
class PrefillJob(Job):
    """`emit` gets Scheduled (the lease is open) then Done, or one PDServeError."""

    transfer_id: str = ""  # set by submit
    kv_token: bytes = field(default=b"", repr=False)  # the lease's secret, set when the lease opens
    trace: Any = None  # OpenTelemetry Context: the parent of this job's spans (None: not traced)
    lease_span: Any = None
    computing: bool = False  # its pass is running: the model writes its blocks (under the engine lock)
    released: bool = False  # its lease was released while `computing`: `_end_pass` frees its blocks


class PrefillEngine(StepEngine[PrefillJob]):
    queue_name = "prefill queue"

    def __init__(
        self, runner: ModelRunner, kv_server: KVServer, max_batch_tokens: int, max_queue: int
    ) -> None:
        super().__init__(runner, max_queue, thread_name="prefill-step")
        self.kv_server = kv_server
        self.max_batch_tokens = max_batch_tokens

    # ---- called from gRPC handlers (stats, check_integrity: StepEngine) ----------------------
    def submit(self, job: PrefillJob) -> None:
        self.validate_request(job)
        job.transfer_id = f"{job.request_id}:{uuid.uuid4().hex[:8]}"
        self._enqueue(job)

    def cancel(self, job: PrefillJob) -> None:
        """A queued job is dropped by the step loop; a leased one's lease is released (if it is not open
        yet, `_postprocess` releases it after the pass). Idempotent."""
        super().cancel(job)
        self._cancel_lease(job.transfer_id)

    def release(self, transfer_id: str) -> bool:
        return self._cancel_lease(transfer_id)

    # ---- lifecycle (start: StepEngine) ----------------------------------------------------
    def stop(self) -> None:
        """Queued jobs fail at once; the leases still open are released once the step loop is done."""
        super().stop()
        with self._cond:
            leased = list(self._admitted)
        for job in leased:
            self._cancel_lease(job.transfer_id)

    # ---- the policy (the step loop: StepEngine) ---------------------------------------------
    def _stats(self) -> dict[str, int]:
        return {
            "queue_len": len(self._waiting),
            "leases": len(self._admitted),
            "kv_unauthorized_pulls": self.kv_server.counters().unauthorized_pulls,
        }

    def _reserve_tokens(self, job: PrefillJob) -> int:
        return len(job.prompt_ids)  # the prompt's KV only: decoding happens elsewhere

    def _schedule(self) -> list[Batch[PrefillJob]]:
        """FIFO: queued prompts up to `max_batch_tokens` (the first always), while their blocks fit (else
        back-pressure: wait for leases to be pulled or to expire). Their blocks belong to a lease now."""
        batch = self._admit(max_tokens=self.max_batch_tokens)
        for job in batch:
            job.phase = Phase.LEASED
            job.computing = True
        return [prompt_pass(batch)] if batch else []

    def _forward(self, batch: Batch[PrefillJob], on_layer: Any = None) -> list[int | None]:
        """Open each job's lease (emit Scheduled), then prefill, publishing each layer as it is written."""
        num_layers = self.runner.config.num_layers
        for job in batch.jobs:
            tracing.open_lease(job, num_layers)
        self._open_leases(batch.jobs)
        for job in batch.jobs:
            job.emit(Scheduled(job.transfer_id, job.seq.num_prompt_tokens, job.kv_token))
        spans = tracing.BatchSpans(batch.jobs, time.monotonic())

        def publish(layer: int) -> None:
            for job in batch.jobs:
                self.kv_server.mark_ready(job.transfer_id, layer + 1)
            spans.layer_ready(layer)

        try:
            tokens = super()._forward(batch, on_layer=publish)
        except BaseException as exc:
            spans.end(exc)
            raise
        spans.end()
        return tokens

    # ---- the KV leases (ParallelPrefillEngine: one per rank) --------------------------------------
    def _open_leases(self, jobs: list[PrefillJob]) -> None:
        """Open each job's lease (sets `job.kv_token`)."""
        cache = self.runner.kv_cache
        for job in jobs:
            seq = job.seq
            job.kv_token = self.kv_server.open_lease(
                job.transfer_id,
                self.runner.config.num_layers,
                seq.num_prompt_tokens,
                read_layer=functools.partial(read_host_kv, cache, seq.blocks, seq.num_prompt_tokens),
                on_release=self._on_release,
                token_ids=job.prompt_ids,
            )

    def _finish_lease(self, transfer_id: str, first_token: int) -> None:
        self.kv_server.finish(transfer_id, first_token)

    def _cancel_lease(self, transfer_id: str) -> bool:
        """Release a lease (its blocks are freed by `_on_release`); False if it is not open."""
        return self.kv_server.cancel(transfer_id)

    def _postprocess(self, batch: Batch[PrefillJob], tokens: list[int | None]) -> None:
        """Finish each lease with its first token (outside the lock: a release calls `_on_release`)."""
        compute_s = batch.ended - batch.started
        for job, token in zip(batch.jobs, tokens, strict=True):
            assert token is not None  # whole prompts, never a partial chunk, are prefilled here
            self._finish_lease(job.transfer_id, token)
            job.emit(
                Done(
                    job.transfer_id,
                    token,
                    len(job.prompt_ids),
                    batch.started - job.arrived,
                    compute_s,
                    job.kv_token,
                )
            )
            if job.cancelled:  # cancelled while computing: nobody will pull this KV
                self._cancel_lease(job.transfer_id)
        self._end_pass(batch.jobs, never_leased=[])

    def _fail(self, batch: Batch[PrefillJob], exc: Exception) -> None:
        """Release the batch's leases (which frees their blocks), and fail its jobs."""
        err = exc if isinstance(exc, PDServeError) else PDServeError(f"prefill failed: {exc}")
        never_leased = [job for job in batch.jobs if not self._cancel_lease(job.transfer_id)]
        self._end_pass(batch.jobs, never_leased)
        for job in batch.jobs:
            job.emit(err)

    def _end_pass(self, jobs: list[PrefillJob], never_leased: list[PrefillJob]) -> None:
        """The model is done with `jobs`' blocks: free those whose lease was released during the pass, and
        those of `never_leased` (a failed pass before their lease opened)."""
        with self._cond:
            for job in jobs:
                job.computing = False
                if job.phase is not Phase.DONE and (job.released or job in never_leased):
                    self._retire(job)
            self._cond.notify()  # the blocks may admit the head of the queue

    def _on_release(self, transfer_id: str, reason: str) -> None:
        """The lease is released (pulled, expired or cancelled): its blocks are free (on a KV thread), or,
        if its pass is still running, once the pass ends (`_end_pass`)."""
        with self._cond:
            job = next((j for j in self._admitted if j.transfer_id == transfer_id), None)
            if job is not None:
                tracing.end_lease(job, reason)
                if job.computing:
                    job.released = True
                else:
                    self._retire(job)
            self._cond.notify()  # the blocks may admit the head of the queue
        log.debug("lease %s released (%s)", transfer_id, reason)


def read_host_kv(cache: KVCache, blocks: list[int], num_tokens: int, layer: int) -> tuple[Tensor, Tensor]:
    """A lease's `read_layer`: the layer's K/V [T, Hkv, D] as CPU tensors (the KV server hands codecs CPU
    tensors, so a CUDA cache's gathered K/V come to the host).

    Where positions [0, T) lie in one run of consecutive blocks (a fresh sequence's usually do) on a CPU cache,
    k and v are views of the cache, not copies (an indexed gather of a 1536-token fp32 layer cost 0.25-0.5 ms,
    a third of the codec's time per layer; bench.handoff_timeline): the lease holds the blocks until it is
    released, the KV server reads a layer only under the lease's reader count (its release waits for it), and
    the engine writes no position of a layer it marked ready. Otherwise a gather (copies).

    Runs on a KV connection thread. The gather was queued on the device's default stream after the
    layer's compute, so .cpu() (synchronous) returns the finished values.
    """
    if isinstance(cache, KVCache) and cache.device.type == "cpu":
        runs = slot_runs(blocks, 0, num_tokens, cache.block_size)
        if len(runs) == 1:
            slot, _, n = runs[0]
            return cache.k[layer].flatten(0, 1)[slot : slot + n], cache.v[layer].flatten(0, 1)[
                slot : slot + n
            ]
    k, v = cache.read(layer, blocks, num_tokens)
    return (k.cpu(), v.cpu()) if k.is_cuda else (k, v)
