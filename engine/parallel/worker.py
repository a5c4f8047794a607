"""A rank process other than 0: `python -m engine.parallel.worker SPEC_JSON` (started by `ParallelRunner`).

It loads its shard (and, in a prefill or decode instance, starts its KV hand-off: kv_transfer.ranks), writes
one JSON line to stdout ({"ok": true, "kv_address": ...}, or {"ok": false, "error": ...} and exits 1), joins
the other ranks, then runs every Step rank 0 broadcasts until SHUTDOWN. stdin / stdout stay open as the
control pipe: JSON lines between rank 0 and this rank's KV hand-off (kv_transfer.ranks). A failed collective (a rank died, the instance is
gone) ends it with status 1; on Linux it is also killed when its parent (rank 0's process) dies, so no rank
outlives its instance.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

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
        kv = None
        if spec.kv is not None:
            from engine.checkpoint import model_fingerprint
            from kv_transfer.ranks import RankKVConfig, make_rank_kv

            kv = make_rank_kv(
                RankKVConfig.from_dict(spec.kv),
                spec.layout,
                spec.rank,
                spec.model_dir,
                model.kv_cache,
                model_fingerprint(spec.model_dir),
            )
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which raises it
        _send({"ok": False, "error": f"rank {spec.rank}: {type(exc).__name__}: {exc}"})
        return 1
    _send({"ok": True, "kv_address": kv.address if kv is not None else ""})
    if kv is not None:
        kv.send = _send
        threading.Thread(target=_control_loop, args=(kv,), name="rank-control", daemon=True).start()
    try:
        model.join()
        channel = StepChannel(model.control)
        while (step := channel.recv()) is not None:
            model.forward(step)
    except Exception as exc:  # noqa: BLE001 - a peer died or the instance is gone: this rank ends too
        log.exception("rank %d stops: %s", spec.rank, exc)
        return 1
    finally:
        if kv is not None:
            kv.close()
    dist.destroy_process_group()
    return 0


_send_lock = threading.Lock()


def _send(msg: dict[str, Any]) -> None:
    """One JSON line to rank 0 (stdout is the control pipe: nothing else may write to it)."""
    line = json.dumps(msg) + "\n"
    with _send_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def _control_loop(kv: Any) -> None:
    """Rank 0's messages (stdin, JSON lines) to this rank's KV hand-off, in order, until the pipe closes."""
    for line in sys.stdin:
        try:
            kv.handle(json.loads(line))
        except Exception:  # noqa: BLE001 - one bad message must not stop the rank's hand-off
            log.exception("control message failed: %s", line.strip()[:200])


if __name__ == "__main__":
    sys.exit(main())
