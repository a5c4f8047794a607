"""Which hardware an engine runs on (`Device`) and pinning to it: the whole process (`pin_process`), the
engine thread (`bind`). torch is imported where a device is bound, not at import: the coordinator pins
itself with `parse_cpus` / `pin_process` and never loads torch."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Device:
    kind: Literal["cpu", "cuda"] = "cpu"
    cuda_index: int | None = None
    cpus: tuple[int, ...] = field(default_factory=tuple)  # CPU cores to pin to; () = leave as is

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "cuda"):
            raise ValueError(f"device kind must be 'cpu' or 'cuda', got {self.kind!r}")
        if self.kind == "cuda" and self.cuda_index is None:
            object.__setattr__(self, "cuda_index", 0)

    @staticmethod
    def cpu(cpus: str | tuple[int, ...] = ()) -> Device:
        return Device("cpu", None, parse_cpus(cpus) if isinstance(cpus, str) else tuple(cpus))

    @staticmethod
    def cuda(index: int = 0, cpus: str | tuple[int, ...] = ()) -> Device:
        return Device("cuda", index, parse_cpus(cpus) if isinstance(cpus, str) else tuple(cpus))

    @property
    def torch_device(self) -> torch.device:
        import torch

        if self.kind == "cpu":
            return torch.device("cpu")
        assert self.cuda_index is not None  # __post_init__ sets it for cuda
        return torch.device("cuda", self.cuda_index)

    def __str__(self) -> str:
        where = "cpu" if self.kind == "cpu" else f"cuda:{self.cuda_index}"
        return f"{where}" + (f" (cpus {','.join(map(str, self.cpus))})" if self.cpus else "")


def parse_cpus(spec: str) -> tuple[int, ...]:
    """ "0-1,3" -> (0, 1, 3). Empty string -> (). Sorted, deduplicated."""
    cpus: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"bad cpu list {spec!r}: expected e.g. '0-3,6'") from None
        if first < 0 or last < first:
            raise ValueError(f"bad cpu range {part!r} in {spec!r}")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def bind(device: Device) -> torch.device:
    """Pin the calling thread to `device.cpus` (those available) and size torch's pool; select the GPU.

    Never fails for CPU pinning: unavailable cpus are skipped with a warning. Raises RuntimeError if a
    CUDA device is asked for and CUDA is not available.
    """
    import torch

    if device.cpus:
        _pin_cpus(device.cpus)
    if device.kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device} requested but torch.cuda is not available")
        torch.cuda.set_device(device.cuda_index)
    return device.torch_device


def _pin_cpus(cpus: tuple[int, ...]) -> None:
    usable = list(cpus)
    if hasattr(os, "sched_getaffinity"):
        available = os.sched_getaffinity(0)
        usable = [c for c in cpus if c in available]
        skipped = sorted(set(cpus) - set(usable))
        if skipped:
            log.warning("cpus %s are not available to this process; skipping them", skipped)
        if usable:
            try:
                os.sched_setaffinity(0, usable)
            except OSError as e:
                log.warning("could not pin to cpus %s: %s", usable, e)
    if usable:
        import torch

        torch.set_num_threads(len(usable))


def pin_process(cpus: tuple[int, ...]) -> None:
    """Pin every thread this process has (and so every thread it will create) to `cpus`.

    sched_setaffinity(0) pins only the calling thread; threads started before it -- gRPC's event engine,
    the telemetry exporter, Redis heartbeats -- would keep the whole machine and run on other instances'
    cores. An instance calls this first thing; `bind` then pins the engine thread and sizes torch's pool.
    Linux only (/proc/self/task); elsewhere just the calling thread. Unavailable cpus are skipped."""
    if not cpus or not hasattr(os, "sched_getaffinity"):
        return
    usable = sorted(set(cpus) & os.sched_getaffinity(0))
    if not usable:
        log.warning("none of cpus %s is available to this process; not pinning", list(cpus))
        return
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, usable)
        except OSError as e:  # a thread that just exited, or no permission
            log.debug("could not pin thread %d to cpus %s: %s", tid, usable, e)
