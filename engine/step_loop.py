"""What the prefill, decode and colocated engines share: the job record, a FIFO admission queue, request
validation, cancellation, the step-loop thread's lifecycle and the KV block integrity check.

Each engine adds its own phases (the collections of admitted jobs), its `_loop` and its events.
Invariants every engine keeps:
  * all engine state (queue, phases, `cancelled` flags) is read and written under `self._cond`; the
    model runs outside it, and the condition is notified on every change the loop may wait for;
  * a job owns KV blocks from `_reserve` (at admission) until `_free`, which gives them back exactly once;
  * `_owners()` lists exactly the jobs that own blocks, so `check_integrity()` holds between steps.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Generic, TypeVar

from engine.block_manager import BlockManager
from engine.params import SamplingParams
from engine.runner import ModelRunner
from engine.sequence import Sequence
from pdserve.errors import Cancelled, CapacityExceeded, InvalidRequest


@dataclass(eq=False)  # identity semantics: jobs live in queues and sets and are compared by object
class Job:
    """One request inside an engine. Subclasses add their fields (and must keep `eq=False`)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Any], None]  # takes the engine's events; called from engine threads, must not block
    _: KW_ONLY
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by `cancel` / `stop`; the engine reaps the job and frees its blocks
    seq: Sequence | None = None  # set at admission; `seq.blocks` are the job's KV blocks


J = TypeVar("J", bound=Job)


class StepEngine(Generic[J]):
    """An engine whose one step-loop thread (`_loop`, in the subclass) owns the model."""

    queue_name = "admission queue"  # names the queue in the CapacityExceeded message when it is full

    def __init__(self, runner: ModelRunner, max_queue: int, thread_name: str) -> None:
        self.runner = runner
        self.block_manager = BlockManager(runner.kv_cache.num_blocks, runner.block_size)
        self.max_queue = max_queue
        self._waiting: collections.deque[J] = collections.deque()  # submitted, owning no blocks (FIFO)
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)

    # ---- what each engine defines ----------------------------------------------------------
    def submit(self, job: J) -> None:
        """Check `job` and queue it (`_enqueue`); called from gRPC handlers."""
        raise NotImplementedError

    def _loop(self) -> None:
        raise NotImplementedError

    def _owners(self) -> list[J]:
        """Every job that owns KV blocks now (called under the lock)."""
        raise NotImplementedError

    def _stats(self) -> dict[str, int]:
        """Load gauges: `queue_len` and `running` or `leases` (called under the lock)."""
        raise NotImplementedError

    # ---- called from gRPC handlers -------------------------------------------------------
    def validate_request(self, prompt_ids: list[int], params: SamplingParams, reserve_tokens: int) -> None:
        """Raise InvalidRequest for a bad request, CapacityExceeded if `reserve_tokens` tokens (the KV
        admission will reserve) can never fit this instance's blocks."""
        cfg = self.runner.config
        params.validate(len(prompt_ids), cfg.max_position_embeddings)
        if any(t < 0 or t >= cfg.vocab_size for t in prompt_ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {cfg.vocab_size})")
        need = self.block_manager.blocks_needed(reserve_tokens)
        if need > self.block_manager.num_blocks:
            what = "prompt + max_tokens" if reserve_tokens > len(prompt_ids) else "prompt"
            raise CapacityExceeded(
                f"request needs {need} KV blocks ({what}), this instance has "
                f"{self.block_manager.num_blocks} in total"
            )

    def _enqueue(self, job: J) -> None:
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise CapacityExceeded(f"{self.queue_name} full ({self.max_queue} waiting)")
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: J) -> None:
        """Mark a job cancelled; the step loop frees its blocks between steps. Idempotent."""
        with self._cond:
            job.cancelled = True
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return self._stats()

    def check_integrity(self) -> None:
        """Block manager consistent, and every used block owned by exactly the jobs in `_owners()`."""
        with self._cond:
            owners = [job.seq.blocks for job in self._owners() if job.seq is not None]
            self.block_manager.check_integrity(owners=owners)

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Cancel every job and wait (10 s at most) for the step loop to reap them and return."""
        with self._cond:
            self._stop = True
            for job in [*self._waiting, *self._owners()]:
                job.cancelled = True
            self._cond.notify_all()
        self._thread.join(10.0)

    # ---- helpers for the step loop (all called under the lock) ----------------------------------
    def _reserve(self, job: J, num_tokens: int) -> bool:
        """Admit `job`, the head of the queue, if blocks for `num_tokens` tokens are free: it leaves the
        queue with a Sequence owning them. False (and nothing changes) if they are not free."""
        assert self._waiting[0] is job
        if not self.block_manager.can_allocate(num_tokens):
            return False
        self._waiting.popleft()
        seq = Sequence(job.request_id, list(job.prompt_ids), job.params)
        seq.blocks = self.block_manager.allocate(num_tokens)
        job.seq = seq
        return True

    def _reap_waiting(self) -> None:
        """Drop the cancelled jobs that are still queued (they own no blocks)."""
        for job in [j for j in self._waiting if j.cancelled]:
            self._waiting.remove(job)
            job.emit(Cancelled("request cancelled"))

    def _free(self, job: J) -> None:
        """Give the job's blocks back; emptying `seq.blocks` makes a second call a no-op."""
        if job.seq is not None and job.seq.blocks:
            self.block_manager.free(job.seq.blocks)
            job.seq.blocks = []
