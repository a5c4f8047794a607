"""One rank of a TP x PP instance: its shard of the model and of the KV cache, and its part of each forward pass.

Every rank runs the same `Step`s in the same order (rank 0 broadcasts them: `StepChannel`). Within a step the
work is split into `micro_batches` that flow through the stages one after the other, so stage s works on
micro-batch j while stage s+1 works on j-1: with N >= pp sequences, min(pp, N) runs of whole sequences; with
fewer sequences than stages (a long prompt alone), the step's tokens are cut into pp chunks of about equal size,
a sequence's later chunk attending to its earlier ones through the cache (chunked prefill; each stage wrote
those chunks' KV itself, one micro-batch before):

    stage s, micro-batch j:  h = embed(ids_j) (s == 0) | recv from (s-1, same TP rank)
                             h = this stage's layers (one all-reduce over the stage's TP group after each
                                 attention and each MLP)
                             send h to (s+1, same TP rank)  |  last stage, TP rank 0: logits_j -> rank 0

Rank 0 (stage 0, TP rank 0) gathers the logits [N, V] (fp32) and samples; the others return nothing. Each rank
holds the KV of its layers x its KV heads only; the block tables (rank 0's `BlockManager`) are shared, so every
rank's cache has the same number of blocks.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from engine.config import ModelConfig
from engine.device import Device, bind
from engine.kv_cache import KVCache
from engine.loader import load_model
from engine.model import BatchMeta, Shard
from engine.parallel.layout import Layout
from engine.parallel.shm_reduce import ShmAllReduce, make_shm_all_reduce

log = logging.getLogger(__name__)

FORWARD, SHUTDOWN = 1, 0  # Step header ops


@dataclass(frozen=True)
class RankSpec:
    """What a rank process needs to join its instance (`to_json` / `from_json`: its command-line argument)."""

    model_dir: str
    layout: Layout
    rank: int
    device: Device
    num_blocks: int
    block_size: int
    dtype: torch.dtype
    store_port: int  # rank 0's TCPStore on 127.0.0.1 (the rendezvous)
    timeout_s: float  # a collective waiting longer than this fails (a peer is gone)
    # the instance's KV hand-off settings (kv_transfer.ranks.RankKVConfig.to_dict); None: no KV hand-off
    kv: dict[str, Any] | None = None

    def to_json(self) -> str:
        d = self.device
        return json.dumps(
            {
                "model_dir": self.model_dir,
                "tp": self.layout.tp,
                "pp": self.layout.pp,
                "rank": self.rank,
                "device": {"kind": d.kind, "cuda_index": d.cuda_index, "cpus": list(d.cpus)},
                "num_blocks": self.num_blocks,
                "block_size": self.block_size,
                "dtype": str(self.dtype).removeprefix("torch."),
                "store_port": self.store_port,
                "timeout_s": self.timeout_s,
                "kv": self.kv,
            }
        )

    @staticmethod
    def from_json(text: str) -> RankSpec:
        v = json.loads(text)
        d = v["device"]
        dtype = getattr(torch, v["dtype"])
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"bad dtype {v['dtype']!r}")
        return RankSpec(
            v["model_dir"],
            Layout(v["tp"], v["pp"]),
            v["rank"],
            Device(d["kind"], d["cuda_index"], tuple(d["cpus"])),
            v["num_blocks"],
            v["block_size"],
            dtype,
            v["store_port"],
            v["timeout_s"],
            v.get("kv"),
        )


@dataclass(frozen=True)
class Step:
    """One forward pass: sequence i has `num_new[i]` new tokens from position `starts[i]`, KV blocks `blocks[i]`;
    `ids` are all sequences' new tokens, concatenated."""

    starts: list[int]
    num_new: list[int]
    blocks: list[list[int]]
    ids: list[int]

    def encode(self) -> Tensor:
        # int64 [1 + 3N + sum(blocks) + T]: N, starts, num_new, block counts, blocks, ids
        flat = [len(self.starts), *self.starts, *self.num_new, *(len(b) for b in self.blocks)]
        flat += [x for b in self.blocks for x in b] + self.ids
        return torch.tensor(flat, dtype=torch.long)

    @staticmethod
    def decode(t: Tensor) -> Step:
        v = t.tolist()
        n = v[0]
        starts, num_new, counts = v[1 : 1 + n], v[1 + n : 1 + 2 * n], v[1 + 2 * n : 1 + 3 * n]
        blocks, at = [], 1 + 3 * n
        for c in counts:
            blocks.append(v[at : at + c])
            at += c
        return Step(starts, num_new, blocks, v[at:])


@dataclass(frozen=True)
class MicroBatch:
    """Part of a step: sequence seqs[k]'s new tokens [offsets[k], offsets[k] + counts[k]) (relative to its
    first new token); `ends[k]`: the part holds that sequence's last new token (so it yields a logits row)."""

    seqs: list[int]
    offsets: list[int]
    counts: list[int]
    ends: list[bool]

    @property
    def num_logits(self) -> int:
        return sum(self.ends)


def micro_batches(num_new: list[int], pp: int) -> list[MicroBatch]:
    """The micro-batches of a step (module doc), in order. Every new token is in exactly one."""
    n = len(num_new)
    if n >= pp:  # runs of whole sequences, earlier ones take the remainder
        base, extra = divmod(n, pp)
        out, start = [], 0
        for j in range(pp):
            end = start + base + (1 if j < extra else 0)
            seqs = list(range(start, end))
            out.append(MicroBatch(seqs, [0] * len(seqs), [num_new[i] for i in seqs], [True] * len(seqs)))
            start = end
        return out
    total = sum(num_new)
    m = min(pp, total)
    bounds = [total * j // m for j in range(m + 1)]  # flat token ranges [bounds[j], bounds[j+1])
    out = []
    for j in range(m):
        lo, hi = bounds[j], bounds[j + 1]
        seqs, offsets, counts, ends = [], [], [], []
        first = 0  # flat index of sequence i's first new token
        for i, k in enumerate(num_new):
            a, b = max(lo, first), min(hi, first + k)
            if a < b:
                seqs.append(i)
                offsets.append(a - first)
                counts.append(b - a)
                ends.append(b == first + k)
            first += k
        out.append(MicroBatch(seqs, offsets, counts, ends))
    return out


class RankModel:
    """This rank's shard of the model and KV cache (`join` connects it to the other ranks)."""

    def __init__(self, spec: RankSpec) -> None:
        self.spec = spec
        self.layout = spec.layout
        self.tp_rank, self.pp_rank = spec.layout.coords(spec.rank)
        self.torch_device = bind(spec.device)
        self.config = ModelConfig.from_hf_dir(spec.model_dir)
        cfg = self.config
        self.layout.check(cfg.num_layers, cfg.num_heads, cfg.num_kv_heads)
        self.layers = self.layout.layer_range(cfg.num_layers, self.pp_rank)
        self.kv_heads = self.layout.kv_head_range(cfg.num_kv_heads, self.tp_rank)
        self.model = load_model(
            spec.model_dir,
            cfg,
            self.torch_device,
            spec.dtype,
            self.layers[0],
            self.layers[1],
            Shard(self.layout.tp, self.tp_rank),
        )
        self.kv_cache = KVCache(
            self.layers[1] - self.layers[0],
            spec.num_blocks,
            spec.block_size,
            self.kv_heads[1] - self.kv_heads[0],
            cfg.head_dim,
            spec.dtype,
            self.torch_device,
        )
        self.is_first, self.is_last = self.pp_rank == 0, self.pp_rank == self.layout.pp - 1
        self.tp_group: dist.ProcessGroup | None = None
        self.control: dist.ProcessGroup | None = None  # gloo: the Step broadcasts (CPU tensors)
        # wall seconds this rank spent in TP all-reduces (waiting for the slowest rank of the stage included)
        self.reduce_s, self.reduce_calls = 0.0, 0
        self.shm_reduce: ShmAllReduce | None = None  # the TP all-reduce over shared memory (CPU ranks)

    def join(self) -> None:
        """Rendezvous with the other ranks (blocks until all have joined) and make the groups."""
        spec = self.spec
        timeout = timedelta(seconds=spec.timeout_s)
        store = dist.TCPStore(
            "127.0.0.1", spec.store_port, self.layout.world_size, is_master=False, timeout=timeout
        )
        init_group(store, spec.rank, self.layout.world_size, spec.device, timeout)
        self._make_groups(store)

    def join_as_master(self, store: dist.TCPStore) -> None:
        init_group(store, 0, self.layout.world_size, self.spec.device, timedelta(seconds=self.spec.timeout_s))
        self._make_groups(store)

    def _make_groups(self, store: dist.Store) -> None:
        tp, pp = self.layout.tp, self.layout.pp
        # every rank creates every group, in the same order (a torch.distributed rule)
        for stage in range(pp):
            group = dist.new_group(list(range(stage * tp, (stage + 1) * tp)))
            if stage == self.pp_rank:
                self.tp_group = group
        self.control = dist.new_group(backend="gloo") if self.spec.device.kind == "cuda" else None
        if tp > 1:
            group = self.tp_group
            # CPU ranks share the host: all-reduce through shared memory (engine/parallel/shm_reduce.py), not
            # gloo's loopback TCP (1.5-3 ms a call); every rank of the stage takes part in making it.
            self.shm_reduce = (
                make_shm_all_reduce(
                    store.get,
                    store.set,
                    lambda: dist.barrier(group=group),
                    f"pdserve/shm-all-reduce/{self.pp_rank}",
                    self.tp_rank,
                    tp,
                    self.spec.timeout_s,
                )
                if self.spec.device.kind != "cuda"
                else None
            )
            shm = self.shm_reduce

            def all_reduce(t: Tensor) -> Tensor:
                start = time.perf_counter()
                if shm is not None:  # every rank of the stage takes the same path (no mixing with gloo)
                    shm(t)
                else:
                    dist.all_reduce(t, group=group)
                self.reduce_s += time.perf_counter() - start
                self.reduce_calls += 1
                return t

            self.model.set_all_reduce(all_reduce)

    def forward(self, step: Step, on_layer: Callable[[int], object] | None = None) -> Tensor | None:
        """This rank's part of `step` (module doc). -> fp32 logits [N, V] on rank 0, None on the others."""
        cfg = self.config
        pending: list[tuple[dist.Work | None, Tensor]] = []  # sends in flight, with the tensors they read
        logits: list[Tensor] = []
        first = [0]  # flat index of each sequence's first new token in step.ids
        for n in step.num_new:
            first.append(first[-1] + n)
        with torch.inference_mode():
            batches = micro_batches(step.num_new, self.layout.pp)
            for j, mb in enumerate(batches):
                meta = BatchMeta.build(
                    [step.blocks[i] for i in mb.seqs],
                    [step.starts[i] + o for i, o in zip(mb.seqs, mb.offsets, strict=True)],
                    mb.counts,
                    self.spec.block_size,
                    self.torch_device,
                    cfg.sliding_window,
                )
                if self.is_first:
                    ids = [
                        t
                        for i, o, c in zip(mb.seqs, mb.offsets, mb.counts, strict=True)
                        for t in step.ids[first[i] + o : first[i] + o + c]
                    ]
                    h = self.model.embed(
                        torch.tensor(ids, dtype=torch.long).to(self.torch_device)
                    )  # [T_j, hidden]
                else:
                    h = torch.empty(
                        sum(mb.counts), cfg.hidden_size, dtype=self.spec.dtype, device=self.torch_device
                    )
                    dist.recv(h, src=self.layout.rank(self.tp_rank, self.pp_rank - 1))
                # on_layer(i) means "layer i's KV of EVERY sequence of the step is written": fire it with the
                # last micro-batch only (the earlier ones went through all of this rank's layers before it)
                last = j == len(batches) - 1
                h = self.model.run_layers(h, meta, self.kv_cache, on_layer if last else None)
                if not self.is_last:
                    pending.append((dist.isend(h, dst=self.layout.rank(self.tp_rank, self.pp_rank + 1)), h))
                elif self.tp_rank == 0 and mb.num_logits:
                    ending = torch.tensor([k for k, e in enumerate(mb.ends) if e], device=self.torch_device)
                    out = self.model.compute_logits(h, meta.last_index[ending]).float()  # [N_j, V]
                    if self.spec.rank == 0:
                        logits.append(out)
                    else:
                        out = out.contiguous()
                        pending.append((dist.isend(out, dst=0), out))
            if self.spec.rank == 0 and not self.is_last:  # pp > 1: the last stage's TP rank 0 sends them
                src = self.layout.rank(0, self.layout.pp - 1)
                for mb in batches:
                    if mb.num_logits:
                        out = torch.empty(
                            mb.num_logits, cfg.vocab_size, dtype=torch.float32, device=self.torch_device
                        )
                        dist.recv(out, src=src)
                        logits.append(out)
            for work, _ in pending:
                if work is not None:
                    work.wait()
        return torch.cat(logits) if self.spec.rank == 0 else None


def init_group(store: dist.Store, rank: int, world: int, device: Device, timeout: timedelta) -> None:
    backend = "nccl" if device.kind == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


class StepChannel:
    """Rank 0 broadcasts each Step (or SHUTDOWN) to every rank: one fixed-size message [op, payload length,
    payload...] of INLINE int64s, and a second broadcast for the rest of a payload that does not fit (each gloo
    broadcast costs about a millisecond on loopback, so a decode step's small Step takes one). CPU tensors
    over gloo (the control group under nccl)."""

    INLINE = 1024  # int64s in the first message: a decode step of a few dozen sequences fits

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group

    def send(self, step: Step | None) -> None:
        payload = step.encode() if step is not None else torch.empty(0, dtype=torch.long)
        n = payload.numel()
        first = torch.zeros(self.INLINE, dtype=torch.long)
        first[0], first[1] = (FORWARD if step is not None else SHUTDOWN), n
        inline = min(n, self.INLINE - 2)
        first[2 : 2 + inline] = payload[:inline]
        dist.broadcast(first, src=0, group=self.group)
        if n > inline:
            dist.broadcast(payload[inline:].contiguous(), src=0, group=self.group)

    def recv(self) -> Step | None:
        first = torch.empty(self.INLINE, dtype=torch.long)
        dist.broadcast(first, src=0, group=self.group)
        if int(first[0]) == SHUTDOWN:
            return None
        n = int(first[1])
        inline = min(n, self.INLINE - 2)
        if n == inline:
            return Step.decode(first[2 : 2 + n].clone())
        rest = torch.empty(n - inline, dtype=torch.long)
        dist.broadcast(rest, src=0, group=self.group)
        return Step.decode(torch.cat([first[2 : 2 + inline], rest]))
