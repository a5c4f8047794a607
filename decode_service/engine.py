"""The decode step loop with continuous batching.

A request waits in FIFO order until `prompt + max_tokens` KV blocks are free (admission by free
blocks = back-pressure: KV is pulled only into memory that is already reserved), then a pull thread
imports its prompt KV from the prefill instance (a request with nothing queued ahead is admitted by `submit`
itself, so its pull does not wait for the decode step in progress to end), and from the next step on it decodes with every
other running sequence. Requests join and leave between steps; tokens are emitted every step.

A `local_prefill` request (the gateway's conditional disaggregation: a short prompt while the prefill
pool is busy) has no KV to pull: the step loop prefills it here, between two decode steps (the running
sequences stall for that pass, as in a colocated engine), and emits its first token itself.

Phases (`engine.step_loop.Phase`): WAITING -> PULLING -> PULLED -> RUNNING -> DONE, or, for a local
prefill, WAITING -> PREFILL -> RUNNING -> DONE. Invariant: every allocated block is freed exactly once,
when its sequence finishes, fails, or is cancelled (whatever phase it is in), so `check_integrity()`
holds whenever the engine is idle.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from decode_service import tracing
from engine.runner import ModelRunner
from engine.step_loop import Batch, Job, Phase, StepEngine, prompt_pass
from kv_transfer.client import KVPuller, Trailer
from kv_transfer.ranks import pull_shard
from pdserve.errors import InvalidRequest, PDServeError, Unavailable

log = logging.getLogger(__name__)


@dataclass
class Tokens:
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" on the last event
    admission_wait_s: float = 0.0
    transfer_s: float = 0.0


Event = Tokens | PDServeError


@dataclass(eq=False)
class DecodeJob(Job):
    """`emit` gets Tokens events (the first one after the pull, with no token: the prefill instance
    sampled it), the last one with a finish_reason, or one PDServeError."""

    kv_address: str
    transfer_id: str
    codec: str
    first_token_id: int | None
    kv_token: bytes = field(default=b"", repr=False)  # the lease's secret from the KV handle
    local_prefill: bool = False  # no KV handle: the step loop prefills the prompt here
    # the prefill side's layout from the KV handle ({tp, pp, num_layers, num_kv_heads, rank_addresses}) when
    # the KV is sharded there or here (kv_transfer.ranks.pull_shard); None: one rank at `kv_address` holds it all
    kv_layout: dict[str, Any] | None = None
    max_kl: float | None = None  # the request's max_kv_kl from the KV handle, sent in the PULL (None: unset)
    pulled: BaseException | int | None = None  # the pull's outcome (PULLED): the first token, or why not
    transfer_s: float = 0.0
    trace: Any = None  # OpenTelemetry Context: the parent of this job's spans (None: not traced)
    steps_span: Any = None
    steps: int = 0  # decode steps this sequence took part in


class DecodeEngine(StepEngine[DecodeJob]):
    queue_name = "decode admission queue"

    def __init__(
        self,
        runner: ModelRunner,
        puller: KVPuller,
        max_running: int,
        max_queue: int,
        max_batch_tokens: int,
    ) -> None:
        super().__init__(runner, max_queue, thread_name="decode-step")
        self.puller = puller
        self.max_running = max_running
        # local prefill: prompt tokens per pass (the first always goes), the instance's --max-batch-tokens
        self.max_batch_tokens = max_batch_tokens
        self.links: dict[str, float] = {}  # prefill KV address -> measured bytes/s (EWMA)
        self._pull_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-pull")

    # ---- called from gRPC handlers (cancel, stats, check_integrity: StepEngine) --------------
    def submit(self, job: DecodeJob) -> None:
        vocab_size = self.runner.config.vocab_size
        if job.first_token_id is not None and not 0 <= job.first_token_id < vocab_size:
            raise InvalidRequest(f"first_token_id must be in [0, {vocab_size})")
        super().submit(job)
        with self._cond:  # nothing queued ahead of it: admit now, so its pull overlaps the step in progress
            if not self._stop and len(self._waiting) == 1 and self._waiting[0] is job:
                self._admit_and_pull()

    # ---- lifecycle (start: StepEngine) ----------------------------------------------------
    def stop(self) -> None:
        super().stop()
        self._pull_pool.shutdown(wait=True, cancel_futures=True)

    # ---- the policy (the step loop: StepEngine) ---------------------------------------------
    def _stats(self) -> dict[str, int]:
        return {"queue_len": len(self._waiting) + len(self._admitted), "running": len(self._running)}

    def _schedule(self) -> list[Batch[DecodeJob]]:
        """Admit while `max_running` allows (a KV pull starts for each, or it waits for a local prefill
        pass); pulled sequences join the batch. The step: one prefill pass over local prompts (FIFO, up
        to `max_batch_tokens`, the first always), then one decode step of the sequences running before."""
        self._admit_and_pull()
        self._join_pulled()
        step: list[Batch[DecodeJob]] = []
        local = self._take_local()
        if local:
            step.append(prompt_pass(local))
        if self._running:
            step.append(Batch(list(self._running)))
        return step

    def _admit_and_pull(self) -> None:
        """Admit while `max_running` allows; a KV pull starts at once for each admitted job that has KV to
        pull (a local prefill waits for the step loop's next pass). Under the lock: called by the step loop
        and by `submit` (for a job with nothing queued ahead of it, so the pull need not wait for the step
        that is running to end)."""
        for job in self._admit(max_jobs=self.max_running - len(self._admitted) - len(self._running)):
            if not job.local_prefill:
                job.phase = Phase.PULLING
                self._pull_pool.submit(self._pull, job)

    def _take_local(self) -> list[DecodeJob]:
        """Admitted local prefills for the next pass, FIFO, up to `max_batch_tokens` (the first always)."""
        batch: list[DecodeJob] = []
        tokens = 0
        for job in self._admitted:
            if job.phase is not Phase.PREFILL:
                continue
            n = len(job.prompt_ids)
            if batch and tokens + n > self.max_batch_tokens:
                break
            batch.append(job)
            tokens += n
        return batch

    def _join_pulled(self) -> None:
        """Sequences whose pull returned start decoding (in the order the pulls returned) or fail."""
        for job in [j for j in self._admitted if j.phase is Phase.PULLED]:
            if isinstance(job.pulled, BaseException):
                err = job.pulled
                self._retire(
                    job, err if isinstance(err, PDServeError) else Unavailable(f"KV pull failed: {err}")
                )
            else:
                assert job.pulled is not None
                job.seq.num_cached = len(job.prompt_ids)
                self._append(job, job.pulled)

    def _forward(self, batch: Batch[DecodeJob], on_layer: Any = None) -> list[int | None]:
        tokens = super()._forward(batch)
        if batch.num_new is not None:  # a local prefill pass
            batch_tokens = sum(batch.num_new)
            for job in batch.jobs:
                tracing.record_local_prefill(job, batch.started, batch.ended, batch_tokens)
        return tokens

    def _token_event(self, job: DecodeJob, token: int, first: bool) -> Tokens:
        """Every token but a pulled job's first (the prefill instance sampled it, the gateway streamed it);
        the first event carries the admission wait and the KV transfer time."""
        reason = job.seq.finish_reason
        if not first:
            job.steps += 1
            return Tokens([token], reason)
        if reason is None:
            tracing.start_steps(job)
        new = [token] if job.local_prefill else []
        return Tokens(new, reason, admission_wait_s=job.admitted - job.arrived, transfer_s=job.transfer_s)

    def _retire(self, job: DecodeJob, event: Any = None) -> None:
        tracing.end_steps(job, job.seq.finish_reason)  # no-op unless it was running
        super()._retire(job, event)

    # ---- the pull threads -------------------------------------------------------------------
    def _pull(self, job: DecodeJob) -> None:
        """Import the prompt KV into the job's blocks (layer by layer, as the prefill instance publishes
        them), then hand the outcome to the step loop (PULLED)."""
        result: BaseException | int
        trailer = None
        started = time.monotonic()
        try:
            trailer = self._pull_kv(job)
            if trailer.num_tokens != len(job.prompt_ids):
                raise Unavailable(
                    f"KV stream has {trailer.num_tokens} tokens, prompt has {len(job.prompt_ids)}"
                )
            if job.first_token_id is not None and trailer.first_token_id != job.first_token_id:
                raise Unavailable("first token in the KV trailer differs from the one in the request")
            result = trailer.first_token_id
        except BaseException as exc:  # noqa: BLE001 - handed to the step loop, which fails the request
            result = exc
        ended = time.monotonic()
        job.transfer_s = ended - job.admitted
        tracing.record_pull(
            job, started, ended, trailer, result if isinstance(result, BaseException) else None
        )
        with self._cond:
            if trailer is not None and trailer.stats.server_send_s > 0:
                self._observe_link(job.kv_address, trailer.stats.bytes_on_wire / trailer.stats.server_send_s)
            job.pulled, job.phase = result, Phase.PULLED
            self._admitted.remove(job)  # to the end: pulled jobs join the batch in the order they returned
            self._admitted.append(job)
            self._cond.notify()

    def _pull_kv(self, job: DecodeJob) -> Trailer:
        """Import the job's prompt KV into its blocks (ParallelDecodeEngine: every rank its own shard)."""
        seq, cache = job.seq, self.runner.kv_cache
        if job.kv_layout is not None:  # a sharded prefill instance: one piece from each of its ranks
            cfg = self.runner.config
            return pull_shard(
                self.puller,
                cache,
                (0, cfg.num_layers),
                (0, cfg.num_kv_heads),
                job.kv_layout,
                job.transfer_id,
                job.codec,
                job.kv_token,
                seq.blocks,
                max_kl=job.max_kl,
            )
        return self.puller.pull(
            job.kv_address,
            job.transfer_id,
            job.codec,
            write_layer=lambda layer, k, v: cache.write(layer, seq.blocks, 0, k, v),
            token=job.kv_token,
            max_kl=job.max_kl,
            dest=lambda layer, shape: cache.run_views(layer, seq.blocks, 0, shape[0]),
        )

    def _observe_link(self, kv_address: str, bytes_per_s: float) -> None:
        """EWMA of the wire bandwidth from each prefill KV server (published in the registry)."""
        old = self.links.get(kv_address)
        self.links[kv_address] = bytes_per_s if old is None else 0.8 * old + 0.2 * bytes_per_s
