"""A rank process other than 0: `python -m engine.parallel.worker SPEC_JSON` (started by `ParallelRunner`).

It loads its shard, writes one line to stdout ("ok", or "error: ..." and exits 1), joins the other ranks,
then runs every Step rank 0 broadcasts until SHUTDOWN. A failed collective (a rank died, the instance is
gone) ends it with status 1; on Linux it is also killed when its parent (rank 0's process) dies, so no rank
outlives its instance.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger("engine.parallel.worker")


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    parent = os.getppid()
    args = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch.distributed as dist

    from engine.parallel.rank import RankModel, RankSpec, StepChannel

    spec = RankSpec.from_json(args[0])
    logging.basicConfig(level=logging.WARNING, format=f"rank {spec.rank}: %(levelname)s %(name)s %(message)s")
    if os.getppid() != parent:  # the parent died before the death signal was armed
        return 1
    if spec.device.cpus and hasattr(os, "sched_setaffinity"):
        # the spawning thread's pinning (rank 0's core) is inherited: widen to this rank's own cores first
        try:
            os.sched_setaffinity(0, spec.device.cpus)
        except OSError as exc:
            log.warning("cannot use cpus %s: %s", list(spec.device.cpus), exc)
    try:
        model = RankModel(spec)
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which raises it
        print(f"error: rank {spec.rank}: {type(exc).__name__}: {exc}", flush=True)
        return 1
    print("ok", flush=True)
    try:
        model.join()
        channel = StepChannel(model.control)
        while (step := channel.recv()) is not None:
            model.forward(step)
    except Exception as exc:  # noqa: BLE001 - a peer died or the instance is gone: this rank ends too
        log.exception("rank %d stops: %s", spec.rank, exc)
        return 1
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
