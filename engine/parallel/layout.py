"""Which rank of a TP x PP instance owns which layers and KV heads, and the reshard rule between two layouts.

Pure functions, no torch.distributed: the engine, the KV hand-off and the planner all read ownership from here.

Rank numbering: global rank = pp_rank * tp + tp_rank (a pipeline stage's TP ranks are adjacent). Rank 0 is the
instance's face (registry, gateway, stats); the others are workers it drives.

Layers: stage s owns the contiguous range [start_s, end_s); ranges are as even as possible, earlier stages take the
remainder (10 layers on pp=4 -> 3, 3, 2, 2).

KV heads (Megatron/vLLM rule): with num_kv_heads >= tp, tp must divide num_kv_heads and TP rank r owns the
contiguous range [r*h, (r+1)*h), h = num_kv_heads // tp. With num_kv_heads < tp, num_kv_heads must divide tp and
each KV head is replicated on tp // num_kv_heads adjacent ranks: rank r owns head r // (tp // num_kv_heads).
Query heads always split evenly (num_heads % tp == 0), so a rank's query heads map onto its own KV heads.

Reshard rule: a destination rank needs (its layers) x (its KV heads). Each needed (layer, head) is taken from the
single *canonical* source rank that holds it: the source rank whose stage owns the layer and whose TP rank is the
lowest holding the head (replicas are never pulled twice). `pieces()` groups the result into rectangles, one per
source rank, so a destination pulls each piece once, from its owner, in parallel, and nothing is gathered on one
rank and forwarded.
"""

from __future__ import annotations

from dataclasses import dataclass

Range = tuple[int, int]  # half-open [start, end)


class LayoutError(ValueError):
    """A layout that cannot shard this model (heads do not split, more stages than layers, ...)."""


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise LayoutError(f"tp and pp must be >= 1, got tp={self.tp} pp={self.pp}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def rank(self, tp_rank: int, pp_rank: int) -> int:
        if not (0 <= tp_rank < self.tp and 0 <= pp_rank < self.pp):
            raise LayoutError(f"(tp_rank={tp_rank}, pp_rank={pp_rank}) outside tp={self.tp} pp={self.pp}")
        return pp_rank * self.tp + tp_rank

    def coords(self, rank: int) -> tuple[int, int]:
        """Global rank -> (tp_rank, pp_rank)."""
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} outside world size {self.world_size}")
        return rank % self.tp, rank // self.tp

    def check(self, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
        """Raise LayoutError unless this layout can shard a model of this shape."""
        if self.pp > num_layers:
            raise LayoutError(f"pp={self.pp} exceeds the model's {num_layers} layers")
        if num_heads % self.tp:
            raise LayoutError(f"tp={self.tp} does not divide the model's {num_heads} attention heads")
        if num_kv_heads >= self.tp:
            if num_kv_heads % self.tp:
                raise LayoutError(f"tp={self.tp} does not divide the model's {num_kv_heads} KV heads")
        elif self.tp % num_kv_heads:
            raise LayoutError(f"the model's {num_kv_heads} KV heads do not divide tp={self.tp} (replication)")

    def layer_range(self, num_layers: int, pp_rank: int) -> Range:
        """Layers [start, end) of pipeline stage pp_rank."""
        if not 0 <= pp_rank < self.pp:
            raise LayoutError(f"pp_rank {pp_rank} outside pp={self.pp}")
        if self.pp > num_layers:
            raise LayoutError(f"pp={self.pp} exceeds the model's {num_layers} layers")
        base, extra = divmod(num_layers, self.pp)
        start = pp_rank * base + min(pp_rank, extra)
        return start, start + base + (1 if pp_rank < extra else 0)

    def kv_head_range(self, num_kv_heads: int, tp_rank: int) -> Range:
        """KV heads [start, end) held by TP rank tp_rank (a replicated head when num_kv_heads < tp)."""
        if not 0 <= tp_rank < self.tp:
            raise LayoutError(f"tp_rank {tp_rank} outside tp={self.tp}")
        if num_kv_heads >= self.tp:
            if num_kv_heads % self.tp:
                raise LayoutError(f"tp={self.tp} does not divide the model's {num_kv_heads} KV heads")
            h = num_kv_heads // self.tp
            return tp_rank * h, (tp_rank + 1) * h
        if self.tp % num_kv_heads:
            raise LayoutError(f"the model's {num_kv_heads} KV heads do not divide tp={self.tp} (replication)")
        head = tp_rank // (self.tp // num_kv_heads)
        return head, head + 1

    def head_range(self, num_heads: int, tp_rank: int) -> Range:
        """Query heads [start, end) of TP rank tp_rank."""
        if num_heads % self.tp:
            raise LayoutError(f"tp={self.tp} does not divide the model's {num_heads} attention heads")
        h = num_heads // self.tp
        return tp_rank * h, (tp_rank + 1) * h

    def owned(self, rank: int, num_layers: int, num_kv_heads: int) -> tuple[Range, Range]:
        """(layer range, KV-head range) whose KV global rank `rank` holds."""
        tp_rank, pp_rank = self.coords(rank)
        return self.layer_range(num_layers, pp_rank), self.kv_head_range(num_kv_heads, tp_rank)

    def canonical_tp_rank(self, num_kv_heads: int, head: int) -> int:
        """The lowest TP rank holding KV head `head` (the one a reshard pulls it from)."""
        if not 0 <= head < num_kv_heads:
            raise LayoutError(f"KV head {head} outside the model's {num_kv_heads}")
        if num_kv_heads >= self.tp:
            return head // (num_kv_heads // self.tp)
        return head * (self.tp // num_kv_heads)


@dataclass(frozen=True)
class Piece:
    """One rectangle of KV a destination rank pulls: layers x KV heads, from one source rank."""

    src_rank: int
    layers: Range
    heads: Range


def _overlap(a: Range, b: Range) -> Range | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


def pieces(src: Layout, layers: Range, heads: Range, num_layers: int, num_kv_heads: int) -> list[Piece]:
    """What a destination rank owning `layers` x `heads` pulls from a source instance laid out as `src`.

    Every (layer, head) in the request is covered exactly once, by its canonical source rank; pieces are sorted
    by (layer start, head start). Raises LayoutError for a request outside the model.
    """
    if not (0 <= layers[0] < layers[1] <= num_layers):
        raise LayoutError(f"layer range {layers} outside the model's {num_layers} layers")
    if not (0 <= heads[0] < heads[1] <= num_kv_heads):
        raise LayoutError(f"KV-head range {heads} outside the model's {num_kv_heads} KV heads")
    out: list[Piece] = []
    for pp_rank in range(src.pp):
        lr = _overlap(layers, src.layer_range(num_layers, pp_rank))
        if lr is None:
            continue
        for tp_rank in range(src.tp):
            owned = src.kv_head_range(num_kv_heads, tp_rank)
            # Only the canonical holder of a replicated head serves it.
            if src.canonical_tp_rank(num_kv_heads, owned[0]) != tp_rank:
                continue
            hr = _overlap(heads, owned)
            if hr is None:
                continue
            out.append(Piece(src.rank(tp_rank, pp_rank), lr, hr))
    out.sort(key=lambda p: (p.layers[0], p.heads[0]))
    return out
