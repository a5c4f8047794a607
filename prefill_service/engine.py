"""The prefill step loop: batch queued prompts up to a token budget, run one forward pass that
publishes each layer's KV as soon as it is written, sample the first token, and keep the KV blocks
under a lease until a decode instance has pulled them (or the lease expires or is cancelled).

Threads: the step loop owns the model; the KV server's threads read leased blocks (disjoint from
the blocks being written) and call `_on_release`; gRPC handlers call `submit` / `cancel`.
Invariant: a request's blocks are freed exactly once, by the lease's release callback, or at once
if it is cancelled before it was scheduled.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from engine.runner import ModelRunner
from engine.step_loop import Job, StepEngine
from kv_transfer.server import KVServer
from pdserve.errors import Cancelled, PDServeError
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


@dataclass(eq=False)
class PrefillJob(Job):
    """`emit` gets Scheduled (the lease is open) then Done, or one PDServeError."""

    transfer_id: str = ""  # set by submit
    trace: Any = None  # OpenTelemetry Context: the parent of this job's spans (None: not traced)
    lease_span: Any = None


class PrefillEngine(StepEngine[PrefillJob]):
    queue_name = "prefill queue"

    def __init__(
        self, runner: ModelRunner, kv_server: KVServer, max_batch_tokens: int, max_queue: int
    ) -> None:
        super().__init__(runner, max_queue, thread_name="prefill-step")
        self.kv_server = kv_server
        self.max_batch_tokens = max_batch_tokens
        self._leased: dict[str, PrefillJob] = {}  # transfer_id -> job whose blocks are leased

    # ---- called from gRPC handlers (stats, check_integrity: StepEngine) ----------------------
    def submit(self, job: PrefillJob) -> None:
        self.validate_request(job.prompt_ids, job.params, len(job.prompt_ids))
        job.transfer_id = f"{job.request_id}:{uuid.uuid4().hex[:8]}"
        self._enqueue(job)

    def cancel(self, job: PrefillJob) -> None:
        """Drop a queued job, or release its lease if it already ran. Idempotent."""
        with self._cond:
            job.cancelled = True  # seen by _run if the lease is not open yet
            if job in self._waiting:
                self._waiting.remove(job)
                return
        if job.transfer_id:
            self.kv_server.cancel(job.transfer_id)

    def release(self, transfer_id: str) -> bool:
        return self.kv_server.cancel(transfer_id)

    # ---- lifecycle (start: StepEngine) ----------------------------------------------------
    def stop(self) -> None:
        """Queued jobs fail at once; the leases still open are released once the step loop is done."""
        with self._cond:
            pending = list(self._waiting)
            self._waiting.clear()
        for job in pending:
            job.emit(Cancelled("prefill instance shutting down"))
        super().stop()
        for transfer_id in list(self._leased):
            self.kv_server.cancel(transfer_id)

    # ---- step loop ------------------------------------------------------------------------
    def _owners(self) -> list[PrefillJob]:
        return list(self._leased.values())

    def _stats(self) -> dict[str, int]:
        return {"queue_len": len(self._waiting), "leases": len(self._leased)}

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
        while self._waiting:
            job = self._waiting[0]
            n = len(job.prompt_ids)
            if batch and tokens + n > self.max_batch_tokens:
                break
            if not self._reserve(job, n):
                break  # back-pressure: wait for leases to be pulled / expire
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
                # mypy#15459: mypy cannot type a lambda whose default binds a loop variable
                read_layer=lambda layer, b=seq.blocks, n=seq.num_prompt_tokens: _host_kv(  # type: ignore[misc]
                    cache.read(layer, b, n)
                ),
                on_release=self._on_release,
                token_ids=job.prompt_ids,
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
                self._free(job)
            self._cond.notify()
        log.debug("lease %s released (%s)", transfer_id, reason)


def _host_kv(kv: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The KV server hands codecs CPU tensors: a CUDA cache's gathered K/V [T, Hkv, D] come to the host.

    Runs on a KV connection thread. The gather was queued on the device's default stream after the
    layer's compute, so .cpu() (synchronous) returns the finished values.
    """
    k, v = kv
    return (k.cpu(), v.cpu()) if k.is_cuda else (k, v)
