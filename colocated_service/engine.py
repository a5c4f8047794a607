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

from dataclasses import dataclass

from engine.runner import ModelRunner
from engine.step_loop import Batch, Job, StepEngine
from pdserve.errors import PDServeError


@dataclass
class Tokens:
    token_ids: list[int]
    text: str  # text delta for these tokens (held back while a stop string may still complete)
    finish_reason: str | None = None  # "stop" | "length" on the last event


Event = Tokens | PDServeError


@dataclass(eq=False)
class ColocatedJob(Job):
    """`emit` gets Tokens events, the last one with a finish_reason, or one PDServeError."""


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

    # ---- the policy (the step loop: StepEngine) ---------------------------------------------
    def _stats(self) -> dict[str, int]:
        return {"queue_len": len(self._waiting), "running": len(self._admitted) + len(self._running)}

    def _schedule(self) -> list[Batch[ColocatedJob]]:
        """Admit while `max_running` allows; one pass: every decode, then prefill work in FIFO order."""
        self._admit(max_jobs=self.max_running - len(self._admitted) - len(self._running))
        work, num_new = list(self._running), [1] * len(self._running)
        if self.chunk_tokens is None:
            budget = self.max_batch_tokens
            for job in self._admitted:
                n = _uncached(job)
                if len(work) > len(self._running) and n > budget:
                    break  # the first prompt always goes, whatever its length
                work.append(job)
                num_new.append(n)
                budget -= n
        else:
            budget = self.chunk_tokens - len(self._running)
            for job in self._admitted:
                if budget <= 0:
                    break
                n = min(_uncached(job), budget)
                work.append(job)
                num_new.append(n)
                budget -= n
        if not work:
            return []
        prefills = len(work) > len(self._running)
        return [Batch(work, num_new if prefills else None)]

    def _token_event(self, job: ColocatedJob, token: int, first: bool) -> Tokens:
        assert job.stop is not None
        return Tokens([token], job.stop.take_text(), job.seq.finish_reason)


def _uncached(job: ColocatedJob) -> int:
    return job.seq.num_prompt_tokens - job.seq.num_cached
