"""The hand-off's pipeline: codec work on a small thread pool, overlapped with the transport.

The prefill side encodes the next layers on the pool while its connection thread sends the previous one; the
decode side decodes on the pool while its pull thread receives the next frame. So a hand-off takes about its
slowest stage (encode, send or decode) plus one layer's fill, not their sum. The codecs' kernels (ctypes C,
torch) release the GIL, so the pool's threads run in parallel where the process has several cores.

`OrderedWindow` is the one mechanism both sides use: at most `depth` tasks in flight (submitted and not yet
taken), results taken strictly in submission order, a task's exception re-raised by `take()` in that order.
`depth` is the memory bound: at most `depth` encoded (or received, undecoded) layers wait at any time.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_AUTO_WORKERS = 4  # a hand-off's codec work rarely needs more cores; the engine needs the rest


def auto_workers() -> int:
    """Codec threads for this process: the cores it may run on, at most MAX_AUTO_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_AUTO_WORKERS, cores))


def pipelined_by_default(workers: int) -> bool:
    """Whether a hand-off side with `workers` codec threads pipelines when not told: only with more than one.
    On one core the thread hop costs more than the overlap gains (bench.transport, 2026-12-06: the pipelined
    hand-off took 1.13x the sequential one's time with one core per process, at every shaped rate)."""
    return workers > 1


def codec_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A pool of `workers` codec threads (0 = auto_workers()); threads start on first use."""
    if workers < 0:
        raise ValueError(f"codec workers must be >= 0, got {workers}")
    return ThreadPoolExecutor(max_workers=workers or auto_workers(), thread_name_prefix=name)


class OrderedWindow(Generic[T]):
    """Tasks on `pool`, at most `depth` in flight, results in submission order. One owner thread.

    `close()` must run before whatever the tasks use is reused (it cancels the tasks not started and waits for
    the running ones), so use it in a `finally`.
    """

    def __init__(self, pool: Executor, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"pipeline depth must be >= 1, got {depth}")
        self.pool, self.depth = pool, depth
        self._futures: deque[Future[T]] = deque()

    def __len__(self) -> int:
        return len(self._futures)

    def full(self) -> bool:
        return len(self._futures) >= self.depth

    def head_done(self) -> bool:
        """Whether `take()` would return (or raise) without waiting."""
        return bool(self._futures) and self._futures[0].done()

    def submit(self, fn: Callable[..., T], *args: object) -> None:
        if self.full():
            raise RuntimeError(f"pipeline window full ({self.depth} tasks in flight)")
        self._futures.append(self.pool.submit(fn, *args))

    def take(self) -> T:
        """The oldest task's result (waits for it); re-raises its exception."""
        if not self._futures:
            raise RuntimeError("pipeline window is empty")
        return self._futures.popleft().result()

    def close(self) -> None:
        """Drop every task in flight: cancel those not started, wait for the running ones to end."""
        futures, self._futures = list(self._futures), deque()
        for f in futures:
            f.cancel()
        wait_futures(futures)
