from __future__ import annotations

import threading

import pytest

from engine.block_manager import BlockManager
from pdserve.errors import CapacityExceeded


def test_allocate_and_free_roundtrip():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.blocks_needed(0) == 0 and bm.blocks_needed(1) == 1 and bm.blocks_needed(4) == 1
    assert bm.blocks_needed(5) == 2
    a = bm.allocate(9)  # 3 blocks
    b = bm.allocate(4)  # 1 block
    assert len(a) == 3 and len(b) == 1 and not set(a) & set(b)
    assert bm.num_free == 4 and all(bm.ref_count(x) == 1 for x in a + b)
    bm.check_integrity(owners=[a, b])
    bm.free(a)
    assert bm.num_free == 7 and all(bm.ref_count(x) == 0 for x in a)
    bm.free(b)
    assert bm.num_free == 8
    bm.check_integrity(owners=[])


def test_can_allocate_and_capacity_exceeded_takes_nothing():
    bm = BlockManager(num_blocks=4, block_size=16)
    assert bm.can_allocate(64) and not bm.can_allocate(65)
    held = bm.allocate(40)  # 3 blocks
    assert not bm.can_allocate(17)
    with pytest.raises(CapacityExceeded, match="need 2 KV blocks"):
        bm.allocate(17)
    assert bm.num_free == 1, "a failed allocate must not take blocks"
    bm.free(held)
    assert bm.can_allocate(64)


def test_shared_blocks_are_freed_on_last_reference():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = bm.allocate(8)
    bm.share(a)
    assert [bm.ref_count(x) for x in a] == [2, 2]
    bm.check_integrity(owners=[a, a])
    bm.free(a)
    assert bm.num_free == 2
    bm.free(a)
    assert bm.num_free == 4


def test_double_free_raises_and_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = bm.allocate(8)
    bm.free(a)
    with pytest.raises(ValueError, match="not allocated"):
        bm.free(a)
    b = bm.allocate(4)
    with pytest.raises(ValueError, match="double free"):
        bm.free(b + b)  # the same block twice in one call
    assert bm.ref_count(b[0]) == 1
    bm.check_integrity(owners=[b])


def test_check_integrity_catches_a_leak():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = bm.allocate(8)
    bm.allocate(4)  # never recorded as owned by anyone: leaked
    with pytest.raises(AssertionError, match="leak"):
        bm.check_integrity(owners=[a])


def test_check_integrity_catches_a_premature_free_of_shared_blocks():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = bm.allocate(4)
    bm.share(a)
    bm.free(a)  # one owner freed twice (once here, once below) while another still holds it
    with pytest.raises(AssertionError, match="double free"):
        bm.check_integrity(owners=[a, a])


def test_check_integrity_catches_corrupted_state():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = bm.allocate(4)
    bm._free.append(a[0])  # simulate a bug: an allocated block back on the free list
    with pytest.raises(AssertionError, match=f"block {a[0]}"):
        bm.check_integrity()


def test_concurrent_allocate_free_keeps_counts_consistent():
    bm = BlockManager(num_blocks=64, block_size=1)

    def churn() -> None:
        for _ in range(300):
            blocks = bm.allocate(3)
            bm.free(blocks)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bm.num_free == 64
    bm.check_integrity(owners=[])
