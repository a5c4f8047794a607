"""The KV reshard between a TP x PP prefill instance and a decode rank: what to pull from whom, and how the
pieces' trailers combine. Pure functions; `KVPuller.pull_pieces` does the pulling.

A destination rank owns `layers` x `heads` (engine.parallel.layout). Each (layer, KV head) it needs is pulled
once, from its canonical source rank (`layout.pieces`): one rectangle per source rank, all pulled in parallel,
nothing gathered on one rank and forwarded. Each source rank's KVServer holds its own shard under the same
transfer id and token; a lease is released when the rectangles pulled from it cover all it holds. A decode
instance with more TP ranks than KV heads holds each head on several ranks; each of them pulls it, declaring
its `decode_replica` (replica i of copies), and the lease waits for every copy of each cell.

Handles from one-rank instances (or from builds before layouts: tp = pp = 0 on the wire) mean Layout(1, 1) with
every address equal to `handle.address`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from engine.parallel.layout import Layout, LayoutError, pieces
from kv_transfer.errors import LayoutMismatch, ProtocolError
from kv_transfer.wire import Replica

Range = tuple[int, int]  # half-open [start, end)
# (global layer, first KV head, k [T, h, D], v [T, h, D]); called from several pull threads at once, each for
# its own disjoint rectangle; k and v may alias a receive buffer: copy them.
WritePiece = Callable[[int, int, Tensor, Tensor], None]


class _HandleFields(Protocol):  # what this module reads of a pdserve.v1.KVHandle
    @property
    def address(self) -> str: ...
    @property
    def tp(self) -> int: ...
    @property
    def pp(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def rank_addresses(self) -> Iterable[str]: ...


@dataclass(frozen=True)
class HandleLayout:
    """The prefill side of a KV handle: its layout and the KV server address of each global rank."""

    layout: Layout
    num_layers: int
    num_kv_heads: int  # 0 = unknown (a handle without a layout): only whole-head pulls
    rank_addresses: tuple[str, ...] = field(default=())


def handle_layout(handle: _HandleFields) -> HandleLayout:
    """Read a KVHandle's layout (0 means 1; no rank addresses means [address]). LayoutMismatch if the handle
    contradicts itself (rank addresses for another world size)."""
    try:
        layout = Layout(max(int(handle.tp), 1), max(int(handle.pp), 1))
    except LayoutError as e:
        raise LayoutMismatch(f"KV handle layout: {e}") from None
    addrs = tuple(handle.rank_addresses) or (handle.address,) * layout.world_size
    if len(addrs) != layout.world_size:
        raise LayoutMismatch(f"KV handle names {len(addrs)} rank addresses for tp={layout.tp} pp={layout.pp}")
    return HandleLayout(layout, int(handle.num_layers), int(handle.num_kv_heads), addrs)


@dataclass(frozen=True)
class PlannedPull:
    """One piece: pull `layers` x `heads` (None = every head the source holds) from `address`."""

    src_rank: int
    address: str
    layers: Range
    heads: Range | None


def plan(
    src: Layout,
    rank_addresses: Sequence[str],
    layers: Range,
    heads: Range | None,
    num_layers: int,
    num_kv_heads: int,
) -> list[PlannedPull]:
    """The pulls that fetch `layers` x `heads` from `src`, sorted by (layer start, head start).

    heads None = every KV head (allowed with num_kv_heads unknown (0) only when src.tp == 1: each stage's rank
    holds all heads). Raises LayoutMismatch for a request the source layout cannot serve."""
    if len(rank_addresses) != src.world_size:
        raise LayoutMismatch(f"{len(rank_addresses)} rank addresses for tp={src.tp} pp={src.pp}")
    try:
        if num_kv_heads < 1:
            if heads is not None or src.tp != 1:
                raise LayoutMismatch(
                    f"the source's KV-head count is unknown: cannot pull heads {heads} from tp={src.tp}"
                )
            out = []
            for stage in range(src.pp):
                lo, hi = src.layer_range(num_layers, stage)
                lo, hi = max(lo, layers[0]), min(hi, layers[1])
                if lo < hi:
                    rank = src.rank(0, stage)
                    out.append(PlannedPull(rank, rank_addresses[rank], (lo, hi), None))
            if not out or layers[0] < 0 or layers[1] > num_layers:
                raise LayoutMismatch(f"layers {layers} outside the model's {num_layers}")
            return out
        want = heads if heads is not None else (0, num_kv_heads)
        return [
            PlannedPull(p.src_rank, rank_addresses[p.src_rank], p.layers, p.heads)
            for p in pieces(src, layers, want, num_layers, num_kv_heads)
        ]
    except LayoutError as e:
        raise LayoutMismatch(str(e)) from None


def agreed(values: Sequence[int], what: str) -> int:
    """The one value every piece's trailer reports (ProtocolError if the source ranks disagree)."""
    if len(set(values)) != 1:
        raise ProtocolError(f"the prefill ranks disagree on {what}: {sorted(set(values))}")
    return values[0]


class AckBarrier:
    """All-or-nothing ACKs for the pieces of one pull: each piece, once its trailer checked out, calls
    `arrive()`, which blocks until every piece arrived (True: ACK) or one failed (False: do not ACK, so every
    source rank keeps its lease for a retry). A failed piece calls `fail(i)`; `first_failed` is the piece that
    failed first: the cause (the others fail because of it: not ACKed, or aborted)."""

    def __init__(self, n: int) -> None:
        self._n, self._arrived, self._failed = n, 0, False
        self.first_failed: int | None = None
        self._cond = threading.Condition()

    def arrive(self) -> bool:
        with self._cond:
            self._arrived += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._failed or self._arrived >= self._n)
            return not self._failed

    def fail(self, piece: int) -> bool:
        """Record that `piece` failed; True if it is the first to (the cause)."""
        with self._cond:
            first = self.first_failed is None
            if first:
                self.first_failed = piece
            self._failed = True
            self._cond.notify_all()
            return first


def is_canonical(layout: Layout, rank: int, num_kv_heads: int) -> bool:
    """Whether global rank `rank` is the canonical holder of its KV heads (the lowest TP rank holding them).

    Prefill: only canonical ranks open a lease (a replica's KV is never pulled, so its lease would only wait
    for expiry). Decode ranks all pull their own heads, replicas included (see decode_replica)."""
    tp_rank, _ = layout.coords(rank)
    head = layout.kv_head_range(num_kv_heads, tp_rank)[0]
    return layout.canonical_tp_rank(num_kv_heads, head) == tp_rank


def decode_replica(layout: Layout, rank: int, num_kv_heads: int) -> Replica:
    """What decode rank `rank` declares in its PULLs: with num_kv_heads < tp each KV head lives on
    copies = tp // num_kv_heads adjacent TP ranks, which all pull it, and this rank is replica
    tp_rank - canonical tp_rank of them; otherwise it is the only puller of its cells (Replica())."""
    tp_rank, _ = layout.coords(rank)
    head = layout.kv_head_range(num_kv_heads, tp_rank)[0]
    copies = layout.tp // num_kv_heads if num_kv_heads < layout.tp else 1
    return Replica(tp_rank - layout.canonical_tp_rank(num_kv_heads, head), copies)
