"""`ParallelRunner`: a `ModelRunner` whose model is split over TP x PP rank processes.

It is rank 0: it runs in the instance's process, holds its own shard (stage 0, TP rank 0), spawns ranks
1..world-1 (`python -m engine.parallel.worker`, each bound to its own device: a CUDA device, or a disjoint
CPU core set), broadcasts every forward pass to them and samples from the logits the last stage sends back.
`prefill` / `decode` behave exactly as `ModelRunner`'s (same tokens, up to the float rounding of the
all-reduces). `kv_cache` and `model` are rank 0's shards.

A rank that dies (or a collective that fails) breaks the runner for good: every later call raises
Unavailable, and `on_rank_lost` (set by the instance) fires once, from the monitor thread or the step.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from engine.checkpoint import model_fingerprint
from engine.config import ModelConfig
from engine.device import Device
from engine.kv_cache import KVCache
from engine.parallel.layout import Layout
from engine.parallel.rank import RankModel, RankSpec, Step, StepChannel
from engine.runner import DEFAULT_KV_CACHE_BYTES, ModelRunner
from engine.sequence import Sequence
from engine.tokenizer import Tokenizer
from pdserve.errors import Unavailable

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0


def rank_devices(device: Device, layout: Layout) -> tuple[Device, ...]:
    """The device of each global rank: CUDA index base + rank, or CPU cores split into disjoint, as even as
    possible sets (with no cores given: the cores this process may use). Fewer cores than ranks:
    oversubscribed (rank r gets core r mod cores), with a warning."""
    world = layout.world_size
    if device.kind == "cuda":
        assert device.cuda_index is not None
        return tuple(Device.cuda(device.cuda_index + r, device.cpus) for r in range(world))
    cores = list(device.cpus) or sorted(os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else [])
    if not cores:
        return tuple(Device.cpu() for _ in range(world))
    if len(cores) < world:
        log.warning(
            "%d ranks on %d CPU cores: oversubscribed (ranks share cores; expect slower steps)",
            world,
            len(cores),
        )
        return tuple(Device.cpu((cores[r % len(cores)],)) for r in range(world))
    base, extra = divmod(len(cores), world)
    out, at = [], 0
    for r in range(world):
        n = base + (1 if r < extra else 0)
        out.append(Device.cpu(tuple(cores[at : at + n])))
        at += n
    return tuple(out)


class ParallelRunner(ModelRunner):
    """Rank 0 of a TP x PP instance (module doc). Not thread-safe: drive it from one step loop; `close` it."""

    def __init__(
        self,
        model_dir: str,
        layout: Layout,
        device: Device | None = None,
        num_kv_blocks: int | None = None,
        block_size: int = 16,
        *,
        dtype: torch.dtype | None = None,
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        kv: dict[str, Any] | None = None,
    ) -> None:
        """`kv`: the instance's KV hand-off settings for the other ranks (kv_transfer.ranks.RankKVConfig
        .to_dict()); None: the ranks hand no KV over (a colocated instance, a benchmark)."""
        self.model_dir, self.device, self.block_size, self.layout = (
            model_dir,
            device or Device(),
            block_size,
            layout,
        )
        self.config = cfg = ModelConfig.from_hf_dir(model_dir)
        layout.check(cfg.num_layers, cfg.num_heads, cfg.num_kv_heads)
        if cfg.intermediate_size % layout.tp:
            raise ValueError(f"tp={layout.tp} does not divide intermediate_size {cfg.intermediate_size}")
        self.devices = rank_devices(self.device, layout)
        if self.device.kind == "cuda":
            need = self.devices[-1].cuda_index
            if not torch.cuda.is_available() or torch.cuda.device_count() <= (need or 0):
                raise RuntimeError(f"{layout.world_size} ranks need CUDA devices up to cuda:{need}")
        self.dtype = dtype or (torch.float32 if self.device.kind == "cpu" else torch.bfloat16)
        self.tokenizer = Tokenizer(model_dir)
        self.max_model_len = cfg.max_position_embeddings
        self.fingerprint = model_fingerprint(model_dir)
        if num_kv_blocks is None:  # the budget is per rank; the stage with the most layers sizes it
            layers = max(b - a for a, b in (layout.layer_range(cfg.num_layers, s) for s in range(layout.pp)))
            h0, h1 = layout.kv_head_range(cfg.num_kv_heads, 0)
            per_block = KVCache.bytes_per_block(layers, block_size, h1 - h0, cfg.head_dim, self.dtype)
            num_kv_blocks = max(1, kv_cache_bytes // per_block)
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(
            "127.0.0.1", 0, layout.world_size, is_master=True, timeout=timeout, wait_for_workers=False
        )
        specs = [
            RankSpec(
                model_dir,
                layout,
                r,
                self.devices[r],
                num_kv_blocks,
                block_size,
                self.dtype,
                store.port,
                timeout_s,
                kv,
            )
            for r in range(layout.world_size)
        ]
        self._lock = threading.Lock()
        self._lost: str | None = None  # why the runner is broken (None: healthy)
        self.on_rank_lost: Callable[[str], None] | None = None
        self._closing = False
        self.workers: list[subprocess.Popen[bytes]] = []
        try:
            for spec in specs[1:]:
                self.workers.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "engine.parallel.worker", spec.to_json()],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                    )
                )
            self.rank0 = RankModel(specs[0])
            # the KV server address of each rank (rank 0's: the instance's own server, set by the service)
            self.kv_addresses = ["", *_wait_loaded(self.workers, timeout_s)]
            self.rank0.join_as_master(store)
        except BaseException:
            self._kill_workers()
            raise
        self._store = store
        self.torch_device = self.rank0.torch_device
        self.model, self.kv_cache = self.rank0.model, self.rank0.kv_cache
        self._channel = StepChannel(self.rank0.control)
        # messages from the ranks' KV hand-off (kv_transfer.ranks): (rank, message), on a reader thread
        self.on_message: Callable[[int, dict[str, Any]], None] | None = None
        self._send_lock = threading.Lock()
        for rank, proc in enumerate(self.workers, start=1):
            threading.Thread(target=self._watch, args=(proc,), name="rank-monitor", daemon=True).start()
            threading.Thread(target=self._read, args=(rank, proc), name="rank-control", daemon=True).start()

    # ---- ModelRunner's one model call ---------------------------------------------------------
    def _forward(
        self,
        seqs: list[Sequence],
        ids: list[int],
        num_new: list[int],
        on_layer: Callable[[int], object] | None,
    ) -> torch.Tensor:
        if self._lost is not None:
            raise Unavailable(f"tensor/pipeline-parallel instance is broken: {self._lost}")
        step = Step([s.num_cached for s in seqs], list(num_new), [list(s.blocks) for s in seqs], list(ids))
        try:
            self._channel.send(step)
            logits = self.rank0.forward(step, on_layer)
        except Exception as exc:  # a rank died mid-step (gloo: connection closed, or the timeout)
            self._mark_lost(f"a collective failed: {exc}")
            raise Unavailable(f"tensor/pipeline-parallel step failed: {exc}") from exc
        assert logits is not None
        return logits

    # ---- the control pipes (JSON lines; kv_transfer.ranks lists the messages) --------------------------
    def send(self, rank: int, msg: dict[str, Any]) -> None:
        """One message to rank `rank` (> 0). Raises Unavailable if the rank is gone."""
        proc = self.workers[rank - 1]
        assert proc.stdin is not None
        try:
            with self._send_lock:
                proc.stdin.write(json.dumps(msg).encode() + b"\n")
                proc.stdin.flush()
        except OSError as exc:
            raise Unavailable(f"rank {rank} is gone: {exc}") from exc

    def _read(self, rank: int, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                log.warning("rank %d wrote a line that is not a message: %r", rank, line[:200])
                continue
            if self.on_message is not None:
                self.on_message(rank, msg)
        proc.stdout.close()  # EOF: the rank exited

    # ---- failure and shutdown -----------------------------------------------------------------
    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait for a rank process to end; if it was not asked to, the runner is lost."""
        status = proc.wait()
        if not self._closing:
            self._mark_lost(f"rank process pid {proc.pid} exited with status {status}")

    def _mark_lost(self, why: str) -> None:
        with self._lock:
            if self._lost is not None:
                return
            self._lost = why
        log.error("parallel runner lost: %s", why)
        if self.on_rank_lost is not None:
            self.on_rank_lost(why)

    @property
    def lost(self) -> str | None:
        return self._lost

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop every rank (after the step loop is done). Idempotent; kills ranks that do not exit in time."""
        if self._closing:
            return
        self._closing = True
        for proc in self.workers:
            if proc.stdin is not None:
                try:
                    proc.stdin.close()  # ends the rank's control loop
                except OSError:
                    pass
        if self._lost is None:
            try:
                self._channel.send(None)
            except Exception as exc:  # noqa: BLE001 - a rank is gone already; kill the rest below
                log.warning("could not send shutdown to the ranks: %s", exc)
        deadline = time.monotonic() + timeout_s
        for proc in self.workers:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("rank process pid %d did not stop in %.0f s: killing it", proc.pid, timeout_s)
        self._kill_workers()
        if self._lost is None:
            dist.destroy_process_group()

    def _kill_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _wait_loaded(workers: list[subprocess.Popen[bytes]], timeout_s: float) -> list[str]:
    """Wait until every worker wrote its ready line (its shard is loaded); raise its error, or that it died.
    -> each worker's KV server address ("" without one)."""
    pending = {proc.stdout.fileno(): i for i, proc in enumerate(workers) if proc.stdout is not None}
    addresses = [""] * len(workers)
    deadline = time.monotonic() + timeout_s
    while pending:
        ready, _, _ = select.select(list(pending), [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise RuntimeError(f"rank processes did not load their shards within {timeout_s:.0f} s")
        for fd in ready:
            i = pending.pop(fd)
            msg = _ready_message(i + 1, workers[i])
            if not msg.get("ok"):
                status = workers[i].wait()
                raise RuntimeError(f"a rank failed to start (status {status}): {msg.get('error')}")
            addresses[i] = msg.get("kv_address", "")
    return addresses


def _ready_message(rank: int, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """The rank's ready line ({"ok": ...}); lines something else in it printed to stdout are logged and skipped."""
    assert proc.stdout is not None
    while raw := proc.stdout.readline():
        line = raw.decode(errors="replace").strip()
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        if isinstance(msg, dict) and "ok" in msg:
            return msg
        log.warning("rank %d: %s", rank, line[:200])
    return {"ok": False, "error": "exited before it was ready"}
