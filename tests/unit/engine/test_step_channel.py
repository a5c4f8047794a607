"""Rank 0's Step broadcast between two real gloo ranks: a small Step in one message, a large one (past the
inline part) in two, SHUTDOWN as None, in order."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import torch.distributed as dist

from engine.parallel.rank import Step, StepChannel

STEPS = [
    Step([0], [3], [[1]], [5, 6, 7]),
    Step([0, 4], [1500, 1], [list(range(100)), [7]], list(range(1501))),  # past StepChannel.INLINE
    Step([9], [1], [[2, 3]], [42]),
]


def _rank(rank: int, store_path: str, out: mp.Queue) -> None:
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        ch = StepChannel(None)
        if rank == 0:
            for s in STEPS:
                ch.send(s)
            ch.send(None)
        else:
            got = []
            while (step := ch.recv()) is not None:
                got.append(step)
            out.put(got)
    finally:
        dist.destroy_process_group()


def test_steps_arrive_whole_and_in_order(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "store"), out)) for r in range(2)]
    for p in procs:
        p.start()
    got = out.get(timeout=60)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert got == STEPS
