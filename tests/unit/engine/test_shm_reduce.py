"""The shared-memory all-reduce of CPU TP ranks: exact sums (in rank order, the same bits on every rank),
chunking past a slot, and a peer that exits or never arrives is a RankLost, not a hang."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from engine.parallel import shm_reduce
from engine.parallel.shm_reduce import RankLost, ShmAllReduce, make_shm_all_reduce


def _pair(tmp_path: Path, world: int = 2, timeout_s: float = 30.0) -> list[ShmAllReduce]:
    path = str(tmp_path / "seg")
    first = ShmAllReduce(path, 0, world, timeout_s, create=True)
    return [first, *(ShmAllReduce(path, r, world, timeout_s, create=False) for r in range(1, world))]


def _run(reducers: list[ShmAllReduce], tensors: list[torch.Tensor]) -> None:
    errors: list[BaseException] = []

    def one(r: int) -> None:
        try:
            reducers[r](tensors[r])
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(r,)) for r in range(len(reducers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "an all-reduce hung"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("world", [2, 3])
def test_sums_are_exact_and_identical_on_every_rank(tmp_path: Path, world: int) -> None:
    reducers = _pair(tmp_path, world)
    gen = torch.Generator().manual_seed(0)
    for shape in [(1, 8), (7, 33), (512, 256)]:  # several calls: the two slot sets alternate
        inputs = [torch.randn(shape, generator=gen) for _ in range(world)]
        want = inputs[0] + inputs[1]
        for x in inputs[2:]:
            want = want + x
        tensors = [x.clone() for x in inputs]
        _run(reducers, tensors)
        for t in tensors:
            assert torch.equal(t, want)


def test_a_tensor_larger_than_a_slot_goes_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm_reduce, "SLOT_BYTES", 4096)
    reducers = _pair(tmp_path)
    a, b = torch.arange(3000, dtype=torch.float32), torch.full((3000,), 0.5)  # 12 kB: 3 chunks
    tensors = [a.clone(), b.clone()]
    _run(reducers, tensors)
    assert torch.equal(tensors[0], a + b) and torch.equal(tensors[1], a + b)
    assert reducers[0]._seq == 3


def test_a_peer_that_exited_is_rank_lost_at_once(tmp_path: Path) -> None:
    reducers = _pair(tmp_path, timeout_s=60.0)
    dead = subprocess.Popen(["true"])
    dead.wait()
    reducers[1]._header[1 * shm_reduce._STRIDE + 1] = dead.pid  # rank 1 "is" a process that has exited
    with pytest.raises(RankLost, match="rank 1 .*exited"):
        reducers[0](torch.ones(4))


def test_a_peer_that_never_arrives_times_out(tmp_path: Path) -> None:
    reducers = _pair(tmp_path, timeout_s=0.3)
    with pytest.raises(RankLost, match="within"):
        reducers[0](torch.ones(4))


class _Store:
    """A one-key rendezvous store, as torch.distributed's: get blocks until the key is set."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.cond = threading.Condition()

    def set(self, key: str, value: str) -> None:
        with self.cond:
            self.values[key] = value
            self.cond.notify_all()

    def get(self, key: str) -> bytes:
        with self.cond:
            assert self.cond.wait_for(lambda: key in self.values, timeout=30)
            return self.values[key].encode()


def test_the_group_maker_leaves_no_file_behind() -> None:
    store = _Store()
    barrier = threading.Barrier(2)
    made: list[ShmAllReduce | None] = [None, None]

    def rank(r: int) -> None:
        made[r] = make_shm_all_reduce(
            store.get, store.set, lambda: None if barrier.wait() else None, "k", r, 2, 30.0
        )

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    path = store.values["k"]
    assert path.startswith("/dev/shm/") and not os.path.exists(path)  # unlinked once both mapped it
    reducers = [m for m in made if m is not None]
    assert len(reducers) == 2
    tensors = [torch.ones(5), torch.full((5,), 2.0)]
    _run(reducers, tensors)
    assert torch.equal(tensors[1], torch.full((5,), 3.0))


def test_a_non_contiguous_tensor_is_reduced_in_place(tmp_path: Path) -> None:
    reducers = _pair(tmp_path)
    bases = [torch.arange(12.0).view(3, 4), torch.ones(3, 4)]
    tensors = [b.t() for b in bases]  # transposed views: not contiguous
    _run(reducers, tensors)
    want = (torch.arange(12.0).view(3, 4) + 1).t()
    assert all(torch.equal(t, want) for t in tensors) and torch.equal(bases[1], want.t())
