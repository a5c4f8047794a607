"""The decode step loop with continuous batching.

A request waits in FIFO order until `prompt + max_tokens` KV blocks are free (admission by free
blocks = back-pressure: KV is pulled only into memory that is already reserved), then a pull thread
imports its prompt KV from the prefill instance, and from the next step on it decodes with every
other running sequence. Requests join and leave between steps; tokens are emitted every step.

A `local_prefill` request (the gateway's conditional disaggregation: a short prompt while the prefill
pool is busy) has no KV to pull: the step loop prefills it here, between two decode steps (the running
sequences stall for that pass, as in a colocated engine), and emits its first token itself.

Invariant: every allocated block is freed exactly once, when its sequence finishes, fails, or is
cancelled (whatever phase it is in), so `check_integrity()` holds whenever the engine is idle.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from decode_service import tracing
from engine.runner import ModelRunner
from engine.step_loop import Job, StepEngine
from engine.stream import StopChecker
from kv_transfer.client import KVPuller
from pdserve.errors import Cancelled, InvalidRequest, PDServeError, Unavailable

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
    admitted: float = 0.0
    transfer_s: float = 0.0
    stop: StopChecker | None = None  # set by submit
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
        self._local: list[DecodeJob] = []  # admitted local_prefill jobs, prompt not computed yet (FIFO)
        self._pulling: set[DecodeJob] = set()  # admitted, KV pull in flight on a pull thread
        self._pulled: list[tuple[DecodeJob, BaseException | int]] = []  # (job, error or first token)
        self._running: list[DecodeJob] = []  # decoding
        self.links: dict[str, float] = {}  # prefill KV address -> measured bytes/s (EWMA)
        self._pull_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-pull")

    # ---- called from gRPC handlers (cancel, stats, check_integrity: StepEngine) --------------
    def submit(self, job: DecodeJob) -> None:
        self.validate_request(job.prompt_ids, job.params, len(job.prompt_ids) + job.params.max_tokens)
        vocab_size = self.runner.config.vocab_size
        if job.first_token_id is not None and not 0 <= job.first_token_id < vocab_size:
            raise InvalidRequest(f"first_token_id must be in [0, {vocab_size})")
        job.stop = StopChecker(self.runner.tokenizer, job.params)
        self._enqueue(job)

    # ---- lifecycle (start: StepEngine) ----------------------------------------------------
    def stop(self) -> None:
        super().stop()
        self._pull_pool.shutdown(wait=True, cancel_futures=True)

    # ---- step loop ------------------------------------------------------------------------
    def _owners(self) -> list[DecodeJob]:
        return [*self._local, *self._pulling, *self._running, *(job for job, _ in self._pulled)]

    def _stats(self) -> dict[str, int]:
        queued = len(self._waiting) + len(self._pulling) + len(self._local)
        return {"queue_len": queued, "running": len(self._running)}

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._reap_cancelled()
                self._admit()
                self._join_pulled()
                while not self._stop and not self._running and not self._pulled and not self._local:
                    self._cond.wait(0.05)
                    self._reap_cancelled()
                    self._admit()
                self._join_pulled()
                if self._stop and not self._pulling:
                    self._reap_cancelled()
                    return
                local = self._take_local()
                batch = list(self._running)
            if local:
                self._prefill_local(local)
            if batch:  # the sequences running before the pass (the new ones join the next step)
                self._step(batch)

    def _admit(self) -> None:
        """FIFO admission: reserve prompt + max_tokens blocks, then pull the KV on a pull thread (or, for a
        local_prefill job, queue it for the step loop's next prefill pass)."""
        while self._waiting and len(self._running) + len(self._pulling) + len(self._local) < self.max_running:
            job = self._waiting[0]
            if not self._reserve(job, len(job.prompt_ids) + job.params.max_tokens):
                return
            job.admitted = time.monotonic()
            if job.local_prefill:
                self._local.append(job)
                continue
            self._pulling.add(job)
            self._pull_pool.submit(self._pull, job)

    def _take_local(self) -> list[DecodeJob]:
        """FIFO local prefills for the next pass, up to `max_batch_tokens` prompt tokens (the first always).
        They stay in `_local` (owned, reaped on stop) until `_prefill_local` is done with them."""
        batch: list[DecodeJob] = []
        tokens = 0
        for job in self._local:
            n = len(job.prompt_ids)
            if batch and tokens + n > self.max_batch_tokens:
                break
            batch.append(job)
            tokens += n
        return batch

    def _prefill_local(self, batch: list[DecodeJob]) -> None:
        """One prefill pass over local_prefill prompts (the running sequences wait for it); each job's
        first token is emitted and it joins the running batch."""
        started = time.monotonic()
        try:
            tokens = self.runner.prefill([job.seq for job in batch])  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - a failed pass fails its requests, not the instance
            self._fail(batch, self._local, "local prefill", exc)
            return
        ended = time.monotonic()
        batch_tokens = sum(len(job.prompt_ids) for job in batch)
        for job in batch:
            tracing.record_local_prefill(job, started, ended, batch_tokens)
        with self._cond:
            for job, token in zip(batch, tokens, strict=True):
                assert token is not None  # whole prompts are prefilled here
                self._local.remove(job)
                if job.cancelled:
                    self._free(job)
                    job.emit(Cancelled("request cancelled"))
                    continue
                self._append(job, token, wait_s=job.admitted - job.arrived)

    def _pull(self, job: DecodeJob) -> None:
        seq = job.seq
        assert seq is not None
        cache = self.runner.kv_cache
        result: BaseException | int
        trailer = None
        started = time.monotonic()
        try:
            trailer = self.puller.pull(
                job.kv_address,
                job.transfer_id,
                job.codec,
                write_layer=lambda layer, k, v: cache.write(layer, seq.blocks, 0, k, v),
                token=job.kv_token,
            )
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
            self._pulling.discard(job)
            self._pulled.append((job, result))
            self._cond.notify()

    def _observe_link(self, kv_address: str, bytes_per_s: float) -> None:
        """EWMA of the wire bandwidth from each prefill KV server (published in the registry)."""
        old = self.links.get(kv_address)
        self.links[kv_address] = bytes_per_s if old is None else 0.8 * old + 0.2 * bytes_per_s

    def _join_pulled(self) -> None:
        for job, result in self._pulled:
            seq = job.seq
            assert seq is not None
            if job.cancelled:
                self._free(job)
                job.emit(Cancelled("request cancelled"))
                continue
            if isinstance(result, BaseException):
                self._free(job)
                err = result if isinstance(result, PDServeError) else Unavailable(f"KV pull failed: {result}")
                job.emit(err)
                continue
            seq.num_cached = len(seq.prompt_ids)
            self._append(job, result, wait_s=job.admitted - job.arrived)
        self._pulled.clear()

    def _append(self, job: DecodeJob, token: int, wait_s: float = 0.0) -> None:
        """Add one sampled token; emit it (the first token is not re-emitted); finish if a stop hits."""
        seq = job.seq
        assert seq is not None and job.stop is not None
        first = not seq.output_ids
        seq.output_ids.append(token)
        reason = job.stop.push(token)
        new = [] if first and not job.local_prefill else [token]
        if not first:
            job.steps += 1
        if reason is not None:
            tracing.end_steps(job, reason)
            self._free(job)
            if job in self._running:
                self._running.remove(job)
        elif first:
            tracing.start_steps(job)
            self._running.append(job)
        if new or reason is not None or first:
            job.emit(
                Tokens(new, reason, admission_wait_s=wait_s, transfer_s=job.transfer_s if first else 0.0)
            )

    def _step(self, batch: list[DecodeJob]) -> None:
        try:
            tokens = self.runner.decode([job.seq for job in batch])  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the instance
            self._fail(batch, self._running, "decode step", exc)
            return
        with self._cond:
            for job, token in zip(batch, tokens, strict=True):
                if job in self._running:
                    self._append(job, token)

    def _fail(self, batch: list[DecodeJob], owner: list[DecodeJob], what: str, exc: Exception) -> None:
        """A forward pass raised: its jobs leave `owner`, free their blocks and fail (the instance lives on)."""
        log.exception("%s failed", what)
        with self._cond:
            for job in batch:
                owner.remove(job)
                self._free(job)
                job.emit(PDServeError(f"{what} failed: {exc}"))

    def _reap_cancelled(self) -> None:
        self._reap_waiting()
        for owner in (self._local, self._running):
            for job in [j for j in owner if j.cancelled]:
                owner.remove(job)
                self._free(job)
                job.emit(Cancelled("request cancelled"))
        # pulling jobs are reaped in _join_pulled once their pull thread returns

    def _free(self, job: DecodeJob) -> None:
        tracing.end_steps(job, None)  # no-op unless it left the batch early (failed, cancelled)
        super()._free(job)
