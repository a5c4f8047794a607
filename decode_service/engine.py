"""The decode step loop with continuous batching.

A request waits in FIFO order until `prompt + max_tokens` KV blocks are free (admission by free
blocks = back-pressure: KV is pulled only into memory that is already reserved), then a pull thread
imports its prompt KV from the prefill instance, and from the next step on it decodes with every
other running sequence. Requests join and leave between steps; tokens are emitted every step.

Invariant: every allocated block is freed exactly once, when its sequence finishes, fails, or is
cancelled (whatever phase it is in), so `check_integrity()` holds whenever the engine is idle.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from decode_service import tracing
from engine.block_manager import BlockManager
from engine.runner import ModelRunner
from engine.sampling import SamplingParams
from engine.sequence import Sequence
from engine.stream import StopChecker
from kv_transfer.client import KVPuller
from pdserve.errors import Cancelled, CapacityExceeded, InvalidRequest, PDServeError, Unavailable

log = logging.getLogger(__name__)


@dataclass
class Tokens:
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" on the last event
    admission_wait_s: float = 0.0
    transfer_s: float = 0.0


Event = Tokens | PDServeError


@dataclass(eq=False)  # identity semantics: jobs live in sets and are compared by object
class DecodeJob:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    kv_address: str
    transfer_id: str
    codec: str
    first_token_id: int | None
    emit: Callable[[Event], None]  # called from engine threads; must not block
    arrived: float = field(default_factory=time.monotonic)
    admitted: float = 0.0
    transfer_s: float = 0.0
    cancelled: bool = False
    seq: Sequence | None = None
    stop: StopChecker | None = None
    trace: Any = None  # OpenTelemetry Context: the parent of this job's spans (None: not traced)
    steps_span: Any = None
    steps: int = 0  # decode steps this sequence took part in


class DecodeEngine:
    def __init__(self, runner: ModelRunner, puller: KVPuller, max_running: int, max_queue: int) -> None:
        self.runner = runner
        self.puller = puller
        self.block_manager = BlockManager(runner.kv_cache.num_blocks, runner.block_size)
        self.max_running = max_running
        self.max_queue = max_queue
        self._waiting: collections.deque[DecodeJob] = collections.deque()
        self._pulling: set[DecodeJob] = set()
        self._pulled: list[tuple[DecodeJob, BaseException | int]] = []  # (job, error or first token)
        self._running: list[DecodeJob] = []
        self._cond = threading.Condition()
        self._stop = False
        self.links: dict[str, float] = {}  # prefill KV address -> measured bytes/s (EWMA)
        self._pull_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-pull")
        self._thread = threading.Thread(target=self._loop, name="decode-step", daemon=True)

    # ---- called from gRPC handlers -------------------------------------------------------
    def submit(self, job: DecodeJob) -> None:
        cfg = self.runner.config
        job.params.validate(len(job.prompt_ids), cfg.max_position_embeddings)
        if job.first_token_id is not None and not 0 <= job.first_token_id < cfg.vocab_size:
            raise InvalidRequest(f"first_token_id must be in [0, {cfg.vocab_size})")
        need = self.block_manager.blocks_needed(len(job.prompt_ids) + job.params.max_tokens)
        if need > self.block_manager.num_blocks:
            raise CapacityExceeded(
                f"request needs {need} KV blocks (prompt + max_tokens), this instance has "
                f"{self.block_manager.num_blocks} in total"
            )
        job.stop = StopChecker(self.runner.tokenizer, job.params)
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise CapacityExceeded(f"decode admission queue full ({self.max_queue} waiting)")
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: DecodeJob) -> None:
        with self._cond:
            job.cancelled = True
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"queue_len": len(self._waiting) + len(self._pulling), "running": len(self._running)}

    def check_integrity(self) -> None:
        """Block manager consistent, and every used block owned by exactly the live sequences."""
        with self._cond:
            jobs = [*self._pulling, *self._running, *(job for job, _ in self._pulled)]
            owners = [job.seq.blocks for job in jobs if job.seq is not None]
            self.block_manager.check_integrity(owners=owners)

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            for job in [*self._waiting, *self._pulling, *self._running]:
                job.cancelled = True
            self._cond.notify_all()
        self._thread.join(10.0)
        self._pull_pool.shutdown(wait=True, cancel_futures=True)

    # ---- step loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._reap_cancelled()
                self._admit()
                self._join_pulled()
                while not self._stop and not self._running and not self._pulled:
                    self._cond.wait(0.05)
                    self._reap_cancelled()
                    self._admit()
                self._join_pulled()
                if self._stop and not self._pulling:
                    self._reap_cancelled()
                    return
                batch = list(self._running)
            if batch:
                self._step(batch)

    def _admit(self) -> None:
        """FIFO admission: reserve prompt + max_tokens blocks, then pull the KV on a pull thread."""
        while self._waiting and len(self._running) + len(self._pulling) < self.max_running:
            job = self._waiting[0]
            n = len(job.prompt_ids) + job.params.max_tokens
            if not self.block_manager.can_allocate(n):
                return
            self._waiting.popleft()
            seq = Sequence(job.request_id, list(job.prompt_ids), job.params)
            seq.blocks = self.block_manager.allocate(n)
            job.seq = seq
            job.admitted = time.monotonic()
            self._pulling.add(job)
            self._pull_pool.submit(self._pull, job)

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
        new = [] if first else [token]
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
            log.exception("decode step failed")
            with self._cond:
                for job in batch:
                    self._running.remove(job)
                    self._free(job)
                    job.emit(PDServeError(f"decode step failed: {exc}"))
            return
        with self._cond:
            for job, token in zip(batch, tokens, strict=True):
                if job in self._running:
                    self._append(job, token)

    def _reap_cancelled(self) -> None:
        for job in [j for j in self._waiting if j.cancelled]:
            self._waiting.remove(job)
            job.emit(Cancelled("request cancelled"))
        for job in [j for j in self._running if j.cancelled]:
            self._running.remove(job)
            self._free(job)
            job.emit(Cancelled("request cancelled"))
        # pulling jobs are reaped in _join_pulled once their pull thread returns

    def _free(self, job: DecodeJob) -> None:
        tracing.end_steps(job, None)  # no-op unless it left the batch early (failed, cancelled)
        if job.seq is not None and job.seq.blocks:
            self.block_manager.free(job.seq.blocks)
            job.seq.blocks = []
