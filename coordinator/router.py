"""Pick a prefill and a decode instance for each request.

Prefill: fewest requests in flight from this gateway (shortest queue), registry queue length breaking
ties. Decode: most free KV blocks after subtracting what this gateway's in-flight requests reserved,
among the decode instances the plan links to the prefill instance holding the KV (`kv_links`, from
`pdserve plan`'s JSON; none given, or none of them usable: every decode instance).
Colocated (baseline mode): fewest requests in flight. Instances serving another model (fingerprint) are
never chosen; an instance that failed a call is skipped for `suspect_s`. The snapshot is refreshed from
Redis every `refresh_s`.

Channels: one per instance address, kept `channel_linger_s` after the address left the registry before it is
closed (an address that comes back gets a fresh channel; the old one is closed `channel_linger_s` later).
Closing a channel cancels its calls locally (the caller's task sees `asyncio.CancelledError`, not a gRPC
status), and an instance leaves the registry while calls to it are still running: a draining one finishes
them for up to its drain time, a request may have picked a dead one from the snapshot just before the
refresh; those calls must end with the instance's own status (then fail over), never be cancelled under the
request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence

import grpc

from coordinator.registry import InstanceInfo, Registry
from pdserve.errors import Unavailable
from pdserve.rpc import CHANNEL_OPTIONS
from pdserve.tls import TLSFiles, cluster_channel

log = logging.getLogger(__name__)


class Router:
    def __init__(
        self,
        registry: Registry,
        fingerprint: int,
        refresh_s: float = 0.25,
        suspect_s: float = 5.0,
        tls: TLSFiles | None = None,
        kv_links: Sequence[tuple[str, str, str]] = (),
        channel_linger_s: float = 60.0,
    ) -> None:
        self.registry = registry
        # prefill instance id -> {decode instance id: the plan's codec for that link}
        self.kv_links: dict[str, dict[str, str]] = {}
        self.set_kv_links(kv_links)
        self.tls = tls or TLSFiles()  # with a CA, channels to instances are mutual TLS
        self.fingerprint = fingerprint
        self.refresh_s = refresh_s
        self.suspect_s = suspect_s
        self.snapshot: list[InstanceInfo] = []
        self._inflight: dict[str, int] = defaultdict(int)  # instance id -> requests in flight
        self._reserved_blocks: dict[str, int] = defaultdict(int)  # decode id -> blocks reserved
        self._suspect_until: dict[str, float] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        # address -> when it was first seen missing from the registry (its channel closes `channel_linger_s` on)
        self._gone_since: dict[str, float] = {}
        self._retired: list[tuple[float, grpc.aio.Channel]] = []  # (since, channel) replaced by a fresh one
        self.channel_linger_s = channel_linger_s
        self._rr = itertools.count()
        self._task: asyncio.Task | None = None

    def set_kv_links(self, kv_links: Sequence[tuple[str, str, str]]) -> None:
        """Route by these (prefill id, decode id, codec) links from now on (() = every pair)."""
        links: dict[str, dict[str, str]] = {}
        for prefill_id, decode_id, codec in kv_links:
            links.setdefault(prefill_id, {})[decode_id] = codec
        self.kv_links = links

    # ---- registry snapshot ----------------------------------------------------------------
    async def refresh(self) -> None:
        self.snapshot = await asyncio.to_thread(self.registry.instances)
        now = time.monotonic()
        live = {i.grpc_address for i in self.snapshot}
        for address in list(self._channels):
            if address in live:
                if self._gone_since.pop(address, None) is not None:
                    # back after it was gone (a restart on the same address): new calls get a fresh channel,
                    # not one that may be in reconnect backoff from the dead process; the old one lingers
                    self._retired.append((now, self._channels.pop(address)))
            elif now - self._gone_since.setdefault(address, now) >= self.channel_linger_s:
                del self._gone_since[address]
                await self._channels.pop(address).close()
        while self._retired and now - self._retired[0][0] >= self.channel_linger_s:
            await self._retired.pop(0)[1].close()

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep the last snapshot; Redis may come back
                log.warning("registry refresh failed: %s", exc)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        for ch in [*self._channels.values(), *(ch for _, ch in self._retired)]:
            await ch.close()

    def count(self, role: str) -> int:
        return sum(1 for i in self.snapshot if i.role == role and i.model_fingerprint == self.fingerprint)

    def kv_capacity(self, role: str) -> int:
        """KV tokens the registered `role` instances of this model hold in all (blocks x block size)."""
        return sum(
            i.kv_blocks_total * i.block_size
            for i in self.snapshot
            if i.role == role and i.model_fingerprint == self.fingerprint
        )

    # ---- choice ---------------------------------------------------------------------------
    def _candidates(self, role: str) -> list[InstanceInfo]:
        now = time.monotonic()
        out = [
            i
            for i in self.snapshot
            if i.role == role
            and i.model_fingerprint == self.fingerprint
            and self._suspect_until.get(i.instance_id, 0.0) <= now
        ]
        if not out:
            same_role = [i for i in self.snapshot if i.role == role]
            same_model = [i for i in same_role if i.model_fingerprint == self.fingerprint]
            if same_model:
                why = f"reachable ({len(same_model)} registered, all failed a call in the last {self.suspect_s:.0f}s)"
            elif same_role:
                why = f"serving this model ({len(same_role)} registered serve another model)"
            else:
                why = "registered"
            raise Unavailable(f"no {role} instance {why}")
        return out

    def pick_prefill(self) -> InstanceInfo:
        cands = self._candidates("prefill")
        turn = next(self._rr)
        return min(
            cands,
            key=lambda i: (
                self._inflight[i.instance_id],
                i.queue_len,
                (hash(i.instance_id) + turn) % len(cands),
            ),
        )

    def prefill_busy(self, depth: int = 1) -> bool:
        """Every usable prefill instance has at least `depth` requests of this gateway in flight (a new
        prompt would wait for `depth` of them)."""
        try:
            cands = self._candidates("prefill")
        except Unavailable:
            return True
        return all(self._inflight[i.instance_id] >= depth for i in cands)

    def prefill_id(self, kv_address: str) -> str | None:
        """The prefill instance whose KV server is at `kv_address` (None: not in the snapshot)."""
        return next((i.instance_id for i in self.snapshot if i.kv_address == kv_address), None)

    def link_codec(self, kv_address: str, decode_id: str) -> str | None:
        """The plan's codec for the hand-off from the prefill instance at `kv_address` to `decode_id`
        (None: the plan names no such link, or there is no plan)."""
        prefill_id = self.prefill_id(kv_address) if self.kv_links else None
        return self.kv_links.get(prefill_id, {}).get(decode_id) if prefill_id else None

    def pick_decode(self, num_tokens: int, kv_address: str = "") -> InstanceInfo:
        """The decode instance with the most KV blocks not reserved by this gateway's requests, among
        those the plan links to the prefill instance at `kv_address` ("": a local prefill, no KV to move)
        while any of them is usable."""
        cands = self._candidates("decode")
        if kv_address and self.kv_links:
            linked = self.kv_links.get(self.prefill_id(kv_address) or "", {})
            cands = [i for i in cands if i.instance_id in linked] or cands
        fits = [i for i in cands if blocks_for(num_tokens, i.block_size) <= i.kv_blocks_total] or cands
        return max(
            fits,
            key=lambda i: (
                i.kv_blocks_total - self._reserved_blocks[i.instance_id],
                -self._inflight[i.instance_id],
            ),
        )

    def pick_colocated(self, num_tokens: int) -> InstanceInfo:
        """The colocated instance (baseline mode) with the fewest requests in flight from this gateway,
        among those whose KV memory can hold the request at all."""
        cands = self._candidates("colocated")
        fits = [i for i in cands if blocks_for(num_tokens, i.block_size) <= i.kv_blocks_total] or cands
        turn = next(self._rr)
        return min(
            fits,
            key=lambda i: (
                self._inflight[i.instance_id],
                i.queue_len,
                (hash(i.instance_id) + turn) % len(fits),
            ),
        )

    def mark_suspect(self, inst: InstanceInfo) -> None:
        self._suspect_until[inst.instance_id] = time.monotonic() + self.suspect_s
        # Drop the cached channel: a new instance may reuse this address, and a channel in
        # reconnect back-off would fail its calls at once.
        ch = self._channels.pop(inst.grpc_address, None)
        if ch is not None:
            asyncio.get_running_loop().create_task(ch.close())
        log.warning(
            "instance %s (%s) failed a call; skipping it for %.0fs",
            inst.instance_id,
            inst.role,
            self.suspect_s,
        )

    @contextlib.contextmanager
    def track(self, inst: InstanceInfo, num_tokens: int = 0) -> Iterator[None]:
        """Count a request in flight on `inst` (and, for decode, the KV blocks it reserves there)."""
        blocks = blocks_for(num_tokens, inst.block_size) if num_tokens else 0
        self._inflight[inst.instance_id] += 1
        self._reserved_blocks[inst.instance_id] += blocks
        try:
            yield
        finally:
            self._inflight[inst.instance_id] -= 1
            self._reserved_blocks[inst.instance_id] -= blocks

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = cluster_channel(address, self.tls, CHANNEL_OPTIONS)
            self._channels[address] = ch
        return ch


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // max(1, block_size))
