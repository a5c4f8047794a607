"""When a lease counts as pulled (kv_transfer.coverage), what each decode rank declares (reshard.decode_replica),
and the PULL's copies/replica on the wire (version 4; nonsense values are a typed error on both ends)."""

from __future__ import annotations

import struct
import zlib

import pytest

from engine.parallel.layout import Layout
from kv_transfer.coverage import Coverage
from kv_transfer.errors import FrameError, InvalidCopies
from kv_transfer.reshard import decode_replica
from kv_transfer.wire import MAX_COPIES, VERSION, Pull, Replica, decode_control, encode_control
from pdserve.errors import InvalidRequest

FP = 0x1234


def test_one_puller_per_cell_completes_once_every_cell_was_pulled_and_retries_count_once() -> None:
    cov = Coverage((2, 4), (0, 2))  # a PP stage's lease: layers 2, 3 x heads 0, 1
    assert cov.total == 4 and not cov.complete
    assert not cov.add((2, 4), (0, 1))
    assert not cov.add((2, 4), (0, 1))  # a retry of the same rectangle adds nothing
    assert not cov.add((2, 3), (1, 2))
    assert cov.add((3, 4), (1, 2)) and cov.complete


def test_replicated_cells_wait_for_every_copy() -> None:
    cov = Coverage((0, 2), (0, 2))
    assert not cov.add((0, 2), (0, 1), copies=2, replica=0)
    assert not cov.add((0, 2), (0, 1), copies=2, replica=0)  # the same replica again: still one of two
    assert not cov.add((0, 2), (1, 2), copies=2, replica=1)
    assert not cov.add((0, 2), (0, 1), copies=2, replica=1)  # head 0 done, head 1 has one copy of two
    assert cov.add((0, 2), (1, 2), copies=2, replica=0)


def test_disagreeing_copies_wait_for_the_larger_count() -> None:
    cov = Coverage((0, 1), (0, 1))
    assert cov.add((0, 1), (0, 1), copies=1, replica=0)  # done as far as this pull knows
    assert not cov.add((0, 1), (0, 1), copies=3, replica=1)  # a later pull says 3: the cell is open again
    assert not cov.add((0, 1), (0, 1), copies=3, replica=1)
    assert cov.add((0, 1), (0, 1), copies=3, replica=2)


def test_a_rectangle_outside_the_lease_or_a_bad_replica_is_refused() -> None:
    cov = Coverage((0, 2), (2, 4))
    with pytest.raises(ValueError, match="outside"):
        cov.add((0, 2), (1, 3))
    with pytest.raises(ValueError, match="outside"):
        cov.add((1, 3), (2, 4))
    with pytest.raises(ValueError, match="replica"):
        cov.add((0, 2), (2, 4), copies=2, replica=2)
    assert not cov.complete


@pytest.mark.parametrize(
    "layout,num_kv_heads,want",
    [
        (Layout(1, 1), 2, [(0, 1)]),
        (Layout(2, 1), 2, [(0, 1), (0, 1)]),  # one head per rank: no replication
        (Layout(2, 1), 1, [(0, 2), (1, 2)]),  # the one head on both ranks
        (Layout(4, 1), 2, [(0, 2), (1, 2), (0, 2), (1, 2)]),  # heads 0, 0, 1, 1
        (Layout(2, 2), 1, [(0, 2), (1, 2), (0, 2), (1, 2)]),  # per stage: rank = pp_rank * tp + tp_rank
    ],
)
def test_decode_replica_numbers_the_ranks_holding_each_head(
    layout: Layout, num_kv_heads: int, want: list[tuple[int, int]]
) -> None:
    got = [decode_replica(layout, r, num_kv_heads) for r in range(layout.world_size)]
    assert [(r.index, r.copies) for r in got] == want


def test_pull_carries_copies_and_replica_and_defaults_to_one() -> None:
    msg = decode_control(encode_control(Pull(FP, "t", "raw", b"k", (0, 2), (1, 2), copies=4, replica=3)))
    assert isinstance(msg, Pull) and (msg.copies, msg.replica) == (4, 3)
    assert "copies=4, replica=3" in repr(msg)
    one = decode_control(encode_control(Pull(FP, "t", "raw", b"k")))
    assert isinstance(one, Pull) and (one.copies, one.replica) == (1, 0)
    assert VERSION == 5


def _pull_bytes(copies: int, replica: int) -> bytes:
    """A well-formed v5 PULL envelope with any copies/replica bytes (what a broken peer could send)."""
    good = encode_control(Pull(FP, "t", "raw", b"k"))
    body = bytearray(good[:-4])
    body[-10:-8] = struct.pack("<BB", copies, replica)  # before max_kl f64
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


@pytest.mark.parametrize("copies,replica", [(0, 0), (MAX_COPIES + 1, 0), (2, 2)])
def test_nonsense_copies_are_a_typed_error_on_both_ends(copies: int, replica: int) -> None:
    with pytest.raises(InvalidCopies):
        encode_control(Pull(FP, "t", "raw", b"k", copies=copies, replica=replica))
    with pytest.raises(InvalidCopies) as info:
        decode_control(_pull_bytes(copies, replica))
    # the server answers a FrameError with BAD_REQUEST; an API caller sees an InvalidRequest
    assert isinstance(info.value, FrameError) and isinstance(info.value, InvalidRequest)
    with pytest.raises(InvalidCopies):
        Replica(replica, copies)
    assert decode_control(_pull_bytes(2, 1)) == Pull(FP, "t", "raw", b"k", copies=2, replica=1)
