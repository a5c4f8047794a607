"""When a lease has been pulled: which (layer, KV head) cells of it were ACKed, by which replicas. Pure; the
KVServer keeps one per lease, under its lock.

A lease holds layers [l0, l1) x KV heads [h0, h1). Each ACKed pull covers a rectangle of it and declares
`copies`, the number of decode ranks that pull each of its cells (> 1 when a decode instance has more TP
ranks than the model has KV heads, so each head lives on `copies` ranks), and its own `replica` index in
[0, copies). A cell is done once the distinct replicas ACKed for it number the largest `copies` any pull
covering it declared; the lease is done once every cell is. So:
- one puller per cell (copies 1, every old PULL): done once every cell was pulled once, as before;
- a retried pull by the same replica (the same cells ACKed again) counts once;
- pulls disagreeing on copies for a cell wait for the larger count (the lease then expires, never released
  early under a rank that still needs it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

Range = tuple[int, int]  # half-open [start, end)


@dataclass
class Coverage:
    """The pulls ACKed so far of a lease holding `layers` x `heads` (global numbering)."""

    layers: Range
    heads: Range
    # (layer, head) -> (copies wanted, replica indices ACKed); a cell absent = not pulled yet
    _cells: dict[tuple[int, int], tuple[int, set[int]]] = field(default_factory=dict)
    _done: int = 0  # cells whose ACKed replicas reached the copies wanted

    @property
    def total(self) -> int:
        """Cells the lease holds."""
        return (self.layers[1] - self.layers[0]) * (self.heads[1] - self.heads[0])

    @property
    def complete(self) -> bool:
        return self._done == self.total

    def add(self, layers: Range, heads: Range, copies: int = 1, replica: int = 0) -> bool:
        """Record an ACKed pull of `layers` x `heads` by replica `replica` of `copies`; -> complete. The
        rectangle must lie inside the lease's (the server checked it before streaming): ValueError if not."""
        if not (self.layers[0] <= layers[0] < layers[1] <= self.layers[1]) or not (
            self.heads[0] <= heads[0] < heads[1] <= self.heads[1]
        ):
            raise ValueError(f"rectangle {layers} x {heads} outside the lease's {self.layers} x {self.heads}")
        if not 0 <= replica < copies:
            raise ValueError(f"replica {replica} of {copies} copies")
        for cell in ((la, h) for la in range(*layers) for h in range(*heads)):
            wanted, seen = self._cells.get(cell, (0, set()))
            was_done = wanted > 0 and len(seen) >= wanted
            seen.add(replica)
            wanted = max(wanted, copies)
            self._cells[cell] = (wanted, seen)
            self._done += (len(seen) >= wanted) - was_done
        return self.complete
