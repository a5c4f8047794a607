"""The step skeleton every engine shares (prefill, decode, colocated and the local reference engine):
the request record (`Job`, with its `Phase`), the one FIFO admission routine, and the step loop

    schedule (under the lock) -> run each forward pass (outside it) -> postprocess its tokens (under it)

which sleeps on a condition while there is nothing to run. Each engine defines only its policy:
`_schedule` (admit, then pick the passes of the next step), and, where it differs from the default,
`_forward` (one model call), `_postprocess` (its tokens) and `_token_event` (what a token emits).

Invariants every engine keeps:
  * all engine state (queue, phase lists, `phase`, `cancelled`) is read and written under `self._cond`;
    the model runs outside it. Every change the loop may wait for notifies the condition (submit, cancel,
    stop, a KV pull returning, a lease released), so the loop waits without a timeout;
  * a job owns KV blocks from admission (`_admit`) until it retires (`_retire`, exactly once);
  * `_owners()` (`_admitted` + `_running`) lists exactly the jobs that own blocks, so
    `check_integrity()` holds between steps;
  * cancellation only marks a job: the step loop retires it between steps, never while a forward pass
    or a KV pull (PULLING) or a lease (LEASED) still uses its blocks.
"""

from __future__ import annotations

import collections
import enum
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Generic, TypeVar

from engine.block_manager import BlockManager
from engine.params import SamplingParams
from engine.runner import ModelRunner
from engine.sequence import Sequence
from engine.stream import StopChecker
from pdserve.errors import Cancelled, CapacityExceeded, InvalidRequest, PDServeError, Unavailable

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    """Where a job is. The list that holds it is named; only the step loop moves jobs, under the lock
    (except: a pull thread moves PULLING -> PULLED, a lease release moves LEASED -> DONE, and the decode
    engine's `submit` admits a job that has nothing queued ahead of it, starting its KV pull)."""

    WAITING = enum.auto()  # queued (`_waiting`), owns no KV blocks
    PREFILL = enum.auto()  # admitted (`_admitted`): owns its blocks, its prompt is computed here
    PULLING = enum.auto()  # decode, admitted: a pull thread writes its prompt KV from a prefill instance
    PULLED = enum.auto()  # decode, admitted: the pull returned (`pulled`: first token or error)
    LEASED = enum.auto()  # prefill, admitted: its blocks belong to a KV lease until it is released
    RUNNING = enum.auto()  # decoding (`_running`, in the order jobs started): one token per step
    DONE = enum.auto()  # finished, failed or cancelled: blocks given back, last event emitted


@dataclass(eq=False)  # identity semantics: jobs live in queues and lists and are compared by object
class Job:
    """One request inside an engine. Subclasses add their fields (and must keep `eq=False`)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Any], None]  # takes the engine's events; called from engine threads, must not block
    _: KW_ONLY
    arrived: float = field(default_factory=time.monotonic)
    admitted: float = 0.0  # when its KV blocks were reserved (monotonic s)
    phase: Phase = Phase.WAITING
    cancelled: bool = False  # set by `cancel` / `stop`; the step loop retires the job
    stop: StopChecker | None = None  # engines that sample tokens set it in `submit`
    seq: Sequence = field(init=False)  # token state; `seq.blocks` are the job's KV blocks

    def __post_init__(self) -> None:
        self.seq = Sequence(self.request_id, list(self.prompt_ids), self.params)


J = TypeVar("J", bound=Job)


@dataclass
class Batch(Generic[J]):
    """One forward pass. `num_new[i]`: tokens of job i to compute (a prefill pass; a decoding job's is 1);
    None: a decode pass (one token per job)."""

    jobs: list[J]
    num_new: list[int] | None = None
    started: float = 0.0  # the model call's start and end (monotonic s), set by `_forward`
    ended: float = 0.0

    @property
    def what(self) -> str:
        return "decode step" if self.num_new is None else "prefill"


def prompt_pass(jobs: list[J]) -> Batch[J]:
    """A prefill pass over the whole uncached prompts of `jobs`."""
    return Batch(jobs, [job.seq.num_prompt_tokens - job.seq.num_cached for job in jobs])


@dataclass
class PassCpu:
    """The step thread's CPU seconds on its forward passes since the engine started, cumulative. Each pass
    is charged the thread's CPU from the end of the pass before it to its own end: the scheduling before
    it, the model call, its tokens' bookkeeping (so the charges add up to all the step thread's CPU,
    start-up aside), and, apart, the model call's own (`forward_s`, part of `cpu_s`). Decode steps by batch
    size (`decode[batch] = [steps, context tokens, cpu_s, forward_s]`, the context of a step being its
    sequences' tokens so far, prompt included); prompt passes in total (`prefill = [passes, new tokens, sum
    of squared new tokens per sequence, cpu_s, forward_s]`; a colocated engine's mixed pass, prompt chunks
    with decode tokens, counts here). What a latency model of the step thread is fitted to
    (coordinator/planner/calibrate.py)."""

    decode: dict[int, list[float]] = field(default_factory=dict)
    prefill: list[float] = field(default_factory=lambda: [0, 0, 0, 0.0, 0.0])

    def copy(self) -> PassCpu:
        return PassCpu({b: list(v) for b, v in self.decode.items()}, list(self.prefill))

    def plus(self, other: PassCpu) -> PassCpu:
        """Both engines' counts together (a role's instances)."""
        decode = {b: list(v) for b, v in self.decode.items()}
        for b, v in other.decode.items():
            decode[b] = [x + y for x, y in zip(decode.get(b, [0, 0, 0.0, 0.0]), v, strict=True)]
        return PassCpu(decode, [x + y for x, y in zip(self.prefill, other.prefill, strict=True)])

    def minus(self, before: PassCpu) -> PassCpu:
        """What was counted since `before` (an earlier snapshot of the same engine)."""
        zero = [0, 0, 0.0, 0.0]
        decode = {
            b: [x - y for x, y in zip(v, before.decode.get(b, zero), strict=True)]
            for b, v in self.decode.items()
        }
        return PassCpu(
            {b: v for b, v in decode.items() if v[0] > 0},
            [x - y for x, y in zip(self.prefill, before.prefill, strict=True)],
        )


class StepEngine(Generic[J]):
    """An engine whose one step-loop thread owns the model."""

    queue_name = "admission queue"  # names the queue in the CapacityExceeded message when it is full

    def __init__(self, runner: ModelRunner, max_queue: int, thread_name: str) -> None:
        self.runner = runner
        self.block_manager = BlockManager(runner.kv_cache.num_blocks, runner.block_size)
        self.max_queue = max_queue
        self._waiting: collections.deque[J] = collections.deque()  # WAITING, FIFO
        self._admitted: list[J] = []  # own blocks, not decoding yet (PREFILL / PULLING / PULLED / LEASED)
        self._running: list[J] = []  # RUNNING
        self._cond = threading.Condition()
        self._stop = False
        self._pass_cpu = PassCpu()  # under the lock
        self._cpu_mark = 0.0  # the step thread's CPU clock when its last pass ended (s)
        self._thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)

    # ---- the policy each engine defines (called under the lock) --------------------------------
    def _schedule(self) -> list[Batch[J]]:
        """Admit what fits, then return the next step's forward passes ([]: nothing to run yet)."""
        raise NotImplementedError

    def _stats(self) -> dict[str, int]:
        """Load gauges: `queue_len` and `running` or `leases`."""
        raise NotImplementedError

    def _reserve_tokens(self, job: J) -> int:
        """Tokens of KV blocks admission reserves for `job`."""
        return len(job.prompt_ids) + job.params.max_tokens

    def _token_event(self, job: J, token: int, first: bool) -> Any:
        """The event `_append` emits for one sampled token (None: none)."""
        return None

    # ---- called from gRPC handlers -------------------------------------------------------
    def submit(self, job: J) -> None:
        """Validate and queue a job (InvalidRequest / CapacityExceeded / Unavailable: nothing is queued).
        This default is for engines that sample tokens: it gives the job its StopChecker."""
        self.validate_request(job)
        job.stop = StopChecker(self.runner.tokenizer, job.params)
        self._enqueue(job)

    def validate_request(self, job: J) -> None:
        """Raise InvalidRequest for a bad request, CapacityExceeded if its reserved tokens can never fit
        this instance's blocks."""
        cfg = self.runner.config
        job.params.validate(len(job.prompt_ids), cfg.max_position_embeddings)
        if any(t < 0 or t >= cfg.vocab_size for t in job.prompt_ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {cfg.vocab_size})")
        reserve = self._reserve_tokens(job)
        need = self.block_manager.blocks_needed(reserve)
        if need > self.block_manager.num_blocks:
            what = "prompt + max_tokens" if reserve > len(job.prompt_ids) else "prompt"
            raise CapacityExceeded(
                f"request needs {need} KV blocks ({what}), this instance has "
                f"{self.block_manager.num_blocks} in total"
            )

    def _enqueue(self, job: J) -> None:
        with self._cond:
            if self._stop:
                raise Unavailable("instance shutting down")
            if len(self._waiting) >= self.max_queue:
                raise CapacityExceeded(f"{self.queue_name} full ({self.max_queue} waiting)")
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: J) -> None:
        """Mark a job cancelled; the step loop retires it (freeing its blocks) between steps. Idempotent."""
        with self._cond:
            job.cancelled = True
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return self._stats()

    def pass_cpu(self) -> PassCpu:
        """A snapshot of the step thread's CPU per pass kind (PassCpu)."""
        with self._cond:
            return self._pass_cpu.copy()

    def check_integrity(self) -> None:
        """Block manager consistent, and every used block owned by exactly the jobs in `_owners()`."""
        with self._cond:
            self.block_manager.check_integrity(owners=[job.seq.blocks for job in self._owners()])

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Queued jobs fail at once; admitted ones are cancelled, and the step loop (waited for, 10 s at
        most) retires them and returns."""
        with self._cond:
            self._stop = True
            pending = list(self._waiting)
            self._waiting.clear()
            for job in self._owners():
                job.cancelled = True
            self._cond.notify_all()
        for job in pending:
            job.phase = Phase.DONE
            job.emit(Cancelled("instance shutting down"))
        self._thread.join(10.0)

    # ---- the step loop --------------------------------------------------------------------
    def _loop(self) -> None:
        self._cpu_mark = time.thread_time()
        while (step := self._next_step()) is not None:
            self._run_step(step)

    def _next_step(self) -> list[Batch[J]] | None:
        """Sleep until there is a step to run; None once stopped and no pull thread holds a job."""
        with self._cond:
            while True:
                self._reap_cancelled()
                if self._stop and not any(job.phase is Phase.PULLING for job in self._admitted):
                    return None
                step = self._schedule()
                if step:
                    return step
                self._cond.wait()  # no timeout: every change that can make work notifies (module doc)

    def _run_step(self, step: list[Batch[J]]) -> None:
        """Run each pass, then hand its tokens to `_postprocess`; a failed pass fails its jobs only."""
        for batch in step:
            # the pass's shape, before its tokens are appended: decode context = each sequence's tokens so far
            shape = (
                sum(len(job.seq.prompt_ids) + len(job.seq.output_ids) for job in batch.jobs)
                if batch.num_new is None
                else sum(n * n for n in batch.num_new)
            )
            t0 = time.thread_time()
            try:
                tokens = self._forward(batch)
            except Exception as exc:  # noqa: BLE001 - a failed pass fails its requests, not the instance
                log.exception("%s failed", batch.what)
                self._fail(batch, exc)
                self._cpu_mark = time.thread_time()  # a failed pass is charged to nothing
                continue
            forward_s = time.thread_time() - t0
            self._postprocess(batch, tokens)
            self._charge_cpu(batch, shape, forward_s)

    def _charge_cpu(self, batch: Batch[J], shape: int, forward_s: float) -> None:
        """Charge the step thread's CPU since the last pass ended to `batch` (PassCpu); `shape`: a decode
        step's context tokens, a prompt pass's sum of squared new tokens; `forward_s`: its model call's."""
        now = time.thread_time()
        cpu, self._cpu_mark = now - self._cpu_mark, now
        with self._cond:
            if batch.num_new is None:
                row = self._pass_cpu.decode.setdefault(len(batch.jobs), [0, 0, 0.0, 0.0])
                row[0] += 1
                row[1] += shape
                row[2] += cpu
                row[3] += forward_s
            else:
                p = self._pass_cpu.prefill
                p[0] += 1
                p[1] += sum(batch.num_new)
                p[2] += shape
                p[3] += cpu
                p[4] += forward_s

    def _forward(self, batch: Batch[J], on_layer: Callable[[int], None] | None = None) -> list[int | None]:
        """One model call (outside the lock): sampled tokens, None for a prompt chunk that is not the last."""
        seqs = [job.seq for job in batch.jobs]
        batch.started = time.monotonic()
        if batch.num_new is None:
            tokens: list[int | None] = list(self.runner.decode(seqs))
        else:
            tokens = self.runner.prefill(seqs, on_layer=on_layer, num_new=batch.num_new)
        batch.ended = time.monotonic()
        return tokens

    def _postprocess(self, batch: Batch[J], tokens: list[int | None]) -> None:
        """Append each sampled token (a cancelled job gets none: the next schedule retires it)."""
        with self._cond:
            for job, token in zip(batch.jobs, tokens, strict=True):
                if token is not None and not job.cancelled:
                    self._append(job, token)

    def _fail(self, batch: Batch[J], exc: Exception) -> None:
        err = exc if isinstance(exc, PDServeError) else PDServeError(f"{batch.what} failed: {exc}")
        with self._cond:
            for job in batch.jobs:
                if job.phase is not Phase.DONE:
                    self._retire(job, err)

    # ---- the helpers every policy uses (all called under the lock) ------------------------------
    def _admit(self, max_jobs: int = sys.maxsize, max_tokens: int | None = None) -> list[J]:
        """The one admission rule, FIFO without overtaking: the head of the queue is admitted (PREFILL,
        owning blocks for `_reserve_tokens` tokens) while fewer than `max_jobs` were admitted by this call,
        its prompt keeps their prompt tokens within `max_tokens` (the first always goes) and its blocks
        are free (back-pressure: otherwise it waits for blocks to be given back)."""
        admitted: list[J] = []
        tokens = 0
        while self._waiting and len(admitted) < max_jobs:
            job = self._waiting[0]
            n = len(job.prompt_ids)
            if admitted and max_tokens is not None and tokens + n > max_tokens:
                break
            reserve = self._reserve_tokens(job)
            if not self.block_manager.can_allocate(reserve):
                break
            self._waiting.popleft()
            job.seq.blocks = self.block_manager.allocate(reserve)
            job.phase, job.admitted = Phase.PREFILL, time.monotonic()
            self._admitted.append(job)
            admitted.append(job)
            tokens += n
        return admitted

    def _append(self, job: J, token: int) -> None:
        """Add one sampled token: the job starts running after its first, and retires when it finishes
        (EOS / stop string / length); the engine's `_token_event` is emitted."""
        seq, stop = job.seq, job.stop
        assert stop is not None, "submit sets the StopChecker of a job that samples tokens"
        first = job.phase is not Phase.RUNNING
        seq.output_ids.append(token)
        seq.finish_reason = stop.push(token)
        event = self._token_event(job, token, first)
        if seq.finish_reason is not None:
            self._retire(job, event)
            return
        if first:
            self._admitted.remove(job)
            job.phase = Phase.RUNNING
            self._running.append(job)
        if event is not None:
            job.emit(event)

    def _retire(self, job: J, event: Any = None) -> None:
        """The job leaves the engine: out of its list, its blocks given back, DONE; `event` is emitted."""
        if job.phase is Phase.WAITING:
            self._waiting.remove(job)
        else:
            (self._running if job.phase is Phase.RUNNING else self._admitted).remove(job)
        if job.seq.blocks:
            self.block_manager.free(job.seq.blocks)
            job.seq.blocks = []
        job.phase = Phase.DONE
        if event is not None:
            job.emit(event)

    def _reap_cancelled(self) -> None:
        """Retire the cancelled jobs whose blocks no other thread uses (not PULLING, not LEASED)."""
        for job in [j for j in self._waiting if j.cancelled]:
            self._retire(job, Cancelled("request cancelled"))
        for job in [j for j in (*self._admitted, *self._running) if j.cancelled]:
            if job.phase is not Phase.PULLING and job.phase is not Phase.LEASED:
                self._retire(job, Cancelled("request cancelled"))

    def _owners(self) -> list[J]:
        """Every job that owns KV blocks now."""
        return [*self._admitted, *self._running]
