"""The colocated step loop: prefill and decode of the same requests in one engine (continuous batching).

A request waits FIFO until `prompt + max_tokens` KV blocks are free and fewer than `max_running` requests
are admitted; from then on it is part of every step until it finishes. One step is one forward pass over
  * one token for every decoding sequence (decodes are never paused), and
  * prefill work: whole prompts up to `max_batch_tokens` (plain continuous batching: a long prompt stalls
    the decodes batched with it for a whole prefill), or, with `chunk_tokens` set, prompt chunks filling
    the step's token budget left after the decodes (Sarathi-Serve's stall-free chunked prefill).
Every sampled token is emitted after its step. This is the baseline the disaggregated system is compared
against: same engine (`ModelRunner`), same devices, same public API.

Invariant: every allocated block is freed exactly once, when its sequence finishes, fails or is cancelled
(cancelled jobs are reaped by the step loop between steps, never while a forward pass reads their blocks),
so `check_integrity()` holds whenever the engine is idle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from engine.runner import ModelRunner
from engine.step_loop import Job, StepEngine
from engine.stream import StopChecker
from pdserve.errors import Cancelled, PDServeError

log = logging.getLogger(__name__)


@dataclass
class Tokens:
    token_ids: list[int]
    text: str  # text delta for these tokens (held back while a stop string may still complete)
    finish_reason: str | None = None  # "stop" | "length" on the last event


Event = Tokens | PDServeError


@dataclass(eq=False)
class ColocatedJob(Job):
    """`emit` gets Tokens events, the last one with a finish_reason, or one PDServeError."""

    stop: StopChecker | None = None  # set by submit


class ColocatedEngine(StepEngine[ColocatedJob]):
    def __init__(
        self,
        runner: ModelRunner,
        max_running: int,
        max_queue: int,
        max_batch_tokens: int,
        chunk_tokens: int | None = None,
    ) -> None:
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        super().__init__(runner, max_queue, thread_name="colocated-step")
        self.max_running = max_running
        self.max_batch_tokens = max_batch_tokens
        self.chunk_tokens = chunk_tokens
        self._prefilling: list[ColocatedJob] = []  # admitted, prompt not fully cached yet (FIFO)
        self._running: list[ColocatedJob] = []  # decoding

    # ---- called from gRPC handlers (cancel, stats, check_integrity: StepEngine) --------------
    def submit(self, job: ColocatedJob) -> None:
        self.validate_request(job.prompt_ids, job.params, len(job.prompt_ids) + job.params.max_tokens)
        job.stop = StopChecker(self.runner.tokenizer, job.params)
        self._enqueue(job)

    # ---- step loop ------------------------------------------------------------------------
    def _owners(self) -> list[ColocatedJob]:
        return [*self._prefilling, *self._running]

    def _stats(self) -> dict[str, int]:
        return {"queue_len": len(self._waiting), "running": len(self._prefilling) + len(self._running)}

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._reap_cancelled()
                self._admit()
                while not self._stop and not self._prefilling and not self._running:
                    self._cond.wait(0.05)
                    self._reap_cancelled()
                    self._admit()
                if self._stop:
                    self._reap_cancelled()
                    return
                work = self._schedule()
            self._step(work)

    def _admit(self) -> None:
        """FIFO: reserve prompt + max_tokens blocks while they fit and `max_running` allows."""
        while self._waiting and len(self._prefilling) + len(self._running) < self.max_running:
            job = self._waiting[0]
            if not self._reserve(job, len(job.prompt_ids) + job.params.max_tokens):
                return
            self._prefilling.append(job)

    def _schedule(self) -> list[tuple[ColocatedJob, int]]:
        """(job, new tokens) for the next forward: every decode, then prefill work in FIFO order."""
        work = [(job, 1) for job in self._running]
        if self.chunk_tokens is None:
            budget = self.max_batch_tokens
            for job in self._prefilling:
                n = _uncached(job)
                if len(work) > len(self._running) and n > budget:
                    break  # the first prompt always goes, whatever its length
                work.append((job, n))
                budget -= n
        else:
            budget = self.chunk_tokens - len(self._running)
            for job in self._prefilling:
                if budget <= 0:
                    break
                n = min(_uncached(job), budget)
                work.append((job, n))
                budget -= n
        return work

    def _step(self, work: list[tuple[ColocatedJob, int]]) -> None:
        seqs = [job.seq for job, _ in work]
        num_new = [n for _, n in work]
        try:
            if all(job.seq is not None and job.seq.prefill_done for job, _ in work):
                tokens: list[int | None] = list(self.runner.decode(seqs))  # type: ignore[arg-type]
            else:
                tokens = self.runner.prefill(seqs, num_new=num_new)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the instance
            log.exception("colocated step failed")
            with self._cond:
                for job, _ in work:
                    self._remove(job)
                    self._free(job)
                    job.emit(PDServeError(f"step failed: {exc}"))
            return
        with self._cond:
            for (job, _), token in zip(work, tokens, strict=True):
                if token is not None and not job.cancelled:  # None: a prompt chunk, not the last one
                    self._append(job, token)

    def _append(self, job: ColocatedJob, token: int) -> None:
        """Add one sampled token, emit it, and finish the request if a stop condition hits."""
        seq, stop = job.seq, job.stop
        assert seq is not None and stop is not None
        seq.output_ids.append(token)
        reason = stop.push(token)
        if job in self._prefilling:  # its first token: the prompt is fully cached now
            self._prefilling.remove(job)
            if reason is None:
                self._running.append(job)
        elif reason is not None:
            self._running.remove(job)
        if reason is not None:
            self._free(job)
        job.emit(Tokens([token], stop.take_text(), reason))

    def _reap_cancelled(self) -> None:
        self._reap_waiting()
        for job in [j for j in (*self._prefilling, *self._running) if j.cancelled]:
            self._remove(job)
            self._free(job)
            job.emit(Cancelled("request cancelled"))

    def _remove(self, job: ColocatedJob) -> None:
        for group in (self._prefilling, self._running):
            if job in group:
                group.remove(job)


def _uncached(job: ColocatedJob) -> int:
    assert job.seq is not None
    return job.seq.num_prompt_tokens - job.seq.num_cached
