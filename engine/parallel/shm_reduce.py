"""All-reduce over shared memory for the TP ranks of one CPU instance (they always share a host).

gloo's all-reduce goes through loopback TCP: about 1.5-3 ms per call on a 2-core host whatever the size, and a
TP layer makes two calls, which cost more than the whole layer on small models (docs/benchmarks.md, "Engine
layouts"). Here each rank copies its tensor into its own slot of a shared segment, raises its flag, waits for
every rank's flag, and sums the slots itself, in rank order (so every rank computes the same bits).

Segment (one file under /dev/shm, unlinked as soon as every rank has mapped it, so nothing is left behind
even if a rank is killed):

    header  world x 64 bytes: flag (int64 sequence number) + pid (int64), one cache line per rank
    slots   2 sets x world x SLOT_BYTES: set s % 2 holds call s's inputs

Invariants: a rank writes set s % 2 only in call s; it got there by passing call s-1's wait, which every rank
enters only after it finished reading call s-2's data (the set reused now). Flags are published with a full
fence after the copy and read with acquire loads (C, `_SYNC_SOURCE`), so a rank that sees a flag sees the data.
A tensor larger than a slot goes in slot-sized chunks, one sequence number each.

A rank that waits longer than `timeout_s`, or finds that a peer whose flag is missing has exited (its
/proc/PID/stat state is Z or X, or it is gone), raises RankLost: the runner marks the instance broken.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import secrets
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from engine.cbuild import build_library

log = logging.getLogger(__name__)

SLOT_BYTES = 2 << 20  # per rank and set; a [T, hidden] fp32 tensor larger than this goes in chunks
_LINE = 64  # bytes per rank in the header (one cache line): flag, pid
_STRIDE = _LINE // 8  # int64s per header line

_SYNC_SOURCE = r"""
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

void shm_publish(int64_t *flag, int64_t seq) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the slot's data (non-temporal stores too) before the flag */
    __atomic_store_n(flag, seq, __ATOMIC_SEQ_CST);
}

static int gone(int64_t pid) { /* the process has exited (zombie or dead) or does not exist */
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%lld/stat", (long long)pid);
    FILE *f = fopen(path, "r");
    if (!f) return 1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    return p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X');
}

/* Wait until every rank's flag is >= seq. 0: all there; -1: timeout; -2 - r: rank r's process exited. */
int shm_wait(const int64_t *header, int64_t world, int64_t stride, int64_t seq, double timeout_s) {
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    double checked = 0.0;
    for (uint64_t spins = 0;; spins++) {
        int64_t missing = -1;
        for (int64_t r = 0; r < world; r++)
            if (__atomic_load_n(header + r * stride, __ATOMIC_ACQUIRE) < seq) { missing = r; break; }
        if (missing < 0) return 0;
        if (spins < 4096) continue; /* a peer on its own core answers within microseconds */
        sched_yield();              /* oversubscribed cores: let the peer run */
        if ((spins & 63) == 0) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            double t = (double)(now.tv_sec - t0.tv_sec) + 1e-9 * (double)(now.tv_nsec - t0.tv_nsec);
            if (t > timeout_s) return -1;
            if (t - checked > 0.05) {
                checked = t;
                for (int64_t r = 0; r < world; r++)
                    if (__atomic_load_n(header + r * stride, __ATOMIC_ACQUIRE) < seq && gone(header[r * stride + 1]))
                        return (int)(-2 - r);
            }
        }
    }
}
"""


class RankLost(RuntimeError):
    """A peer rank exited, or did not reach an all-reduce within the timeout."""


_sync: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _sync
    if _sync is None:
        lib = ctypes.CDLL(str(build_library("pdserve_shm_sync", _SYNC_SOURCE)))
        lib.shm_publish.restype = None
        lib.shm_publish.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.shm_wait.restype = ctypes.c_int
        lib.shm_wait.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_double,
        ]
        _sync = lib
    return _sync


def segment_bytes(world: int) -> int:
    return world * _LINE + 2 * world * SLOT_BYTES


class ShmAllReduce:
    """Sum-all-reduce of CPU tensors among `world` ranks of one host, in place (returns the tensor)."""

    def __init__(self, path: str, rank: int, world: int, timeout_s: float, *, create: bool) -> None:
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        size = segment_bytes(world)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._header = np.frombuffer(self._mm, dtype=np.int64, count=world * _STRIDE)
        self._header_ptr = self._header.ctypes.data
        self._flag_ptr = self._header_ptr + rank * _LINE
        self._header[rank * _STRIDE + 1] = os.getpid()
        slots = torch.frombuffer(
            self._mm, dtype=torch.uint8, offset=world * _LINE, count=2 * world * SLOT_BYTES
        )
        self._slots = slots.view(2, world, SLOT_BYTES)  # [set, rank, bytes]
        self._seq = 0
        self._lib = _lib()

    def __call__(self, t: Tensor) -> Tensor:
        dense = t.contiguous()  # t itself when it is (a matmul's output is)
        flat = dense.view(-1).view(torch.uint8)
        for start in range(0, flat.numel(), SLOT_BYTES):
            self._reduce_chunk(flat[start : start + SLOT_BYTES], t.dtype)
        if dense is not t:
            t.copy_(dense)
        return t

    def _reduce_chunk(self, chunk: Tensor, dtype: torch.dtype) -> None:
        self._seq += 1
        n = chunk.numel()
        slots = self._slots[self._seq % 2, :, :n]  # [world, n] bytes
        slots[self.rank].copy_(chunk)
        self._lib.shm_publish(self._flag_ptr, self._seq)
        rc = self._lib.shm_wait(self._header_ptr, self.world, _STRIDE, self._seq, self.timeout_s)
        if rc == -1:
            raise RankLost(f"a TP rank did not reach all-reduce {self._seq} within {self.timeout_s:.0f} s")
        if rc < -1:
            raise RankLost(f"TP rank {-2 - rc} of this stage exited (all-reduce {self._seq})")
        values = slots.view(dtype)  # [world, n / itemsize]
        out = chunk.view(dtype)
        torch.add(values[0], values[1], out=out)
        for r in range(2, self.world):
            out.add_(values[r])

    def close(self) -> None:
        self._header = np.empty(0, dtype=np.int64)  # drop the views before unmapping
        self._slots = torch.empty(0, dtype=torch.uint8)
        try:
            self._mm.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with the process
            pass


def make_shm_all_reduce(
    store_get: Callable[[str], bytes],
    store_set: Callable[[str, str], None],
    barrier: Callable[[], None],
    key: str,
    rank: int,
    world: int,
    timeout_s: float,
) -> ShmAllReduce | None:
    """Collective over one TP group (every rank calls it): rank 0 of the group creates the segment and
    publishes its path under `key`, the others map it, then (after `barrier`) rank 0 unlinks the file. None on
    every rank when shared memory is unavailable (no writable /dev/shm): the caller keeps gloo."""
    if rank == 0:
        path = f"/dev/shm/pdserve-tp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            reducer: ShmAllReduce | None = ShmAllReduce(path, 0, world, timeout_s, create=True)
        except (OSError, ValueError) as e:
            log.warning("shared-memory all-reduce unavailable (%s): TP all-reduces go through gloo", e)
            reducer, path = None, ""
        store_set(key, path)
    else:
        path = store_get(key).decode()
        reducer = ShmAllReduce(path, rank, world, timeout_s, create=False) if path else None
    barrier()  # every rank has mapped it (or none will use it)
    if rank == 0 and path:
        os.unlink(path)
    return reducer
