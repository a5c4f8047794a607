"""`pdserve topology --serve-probe` / `--probe ADDRESS...`: measure the bandwidth between hosts with the KV
transport (kv_transfer.transport: the channels a KV hand-off rides on), and write the topology JSON.

One host runs a probe server; another connects to it and asks, over one channel:
    {"op": "hello"}                      -> the server's node (name, devices, memory, intra bandwidth)
    {"op": "send", "bytes": N, "count": C} -> C messages of N bytes, server to client (the direction KV
                                           moves: a prefill host's KV server sends, the decode host pulls)
    {"op": "quit"}                       -> the server closes the channel
The client times rounds of doubling size until one lasts `min_round_s` (so the link's rate dominates its
latency and the shaper's burst), repeats that size `rounds` times in all and reports the fastest: anything
else on either host (a busy core, a late wakeup) only slows a round, so the fastest is the one nearest the
link's rate. Units: GB/s = 1e9 bytes per second.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.planner.topology import Node, Topology
from kv_transfer.errors import PeerClosed, TransferTimeout
from kv_transfer.transport import transport_for
from kv_transfer.transport.base import Channel, Listener

MiB = 1 << 20
MESSAGE_BYTES = 1 * MiB  # per message: the order of one layer's KV of a short prompt


@dataclass(frozen=True)
class ProbeResult:
    address: str
    node: Node  # the server's node, as it described itself
    gbytes_per_s: float  # server -> client, the fastest of the sized rounds
    bytes: int  # of one sized round
    seconds: float  # of the fastest sized round
    round_gbytes_per_s: tuple[float, ...] = ()  # every sized round, in order


def _node_dict(n: Node) -> dict[str, Any]:
    return {
        "name": n.name,
        "devices": n.devices,
        "device_memory_gib": n.device_memory_gib,
        "intra_gbytes_per_s": n.intra_gbytes_per_s,
    }


def _node_from(d: dict[str, Any]) -> Node:
    try:
        return Node(
            str(d["name"]), int(d["devices"]), float(d["device_memory_gib"]), float(d["intra_gbytes_per_s"])
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the probe server sent no node description: {d!r}") from exc


def _send_json(ch: Channel, obj: dict[str, Any]) -> None:
    ch.send(json.dumps(obj).encode(), timeout=30)


def _recv_json(ch: Channel, timeout: float = 30) -> dict[str, Any]:
    return json.loads(bytes(ch.recv(timeout=timeout)))


def listen(address: str) -> Listener:
    """A probe listener at `address` (`tcp://HOST:PORT`, port 0: any free one)."""
    scheme, _, hostport = address.partition("://")
    host, _, port = hostport.rpartition(":")
    return transport_for(scheme).listen(host, int(port or 0))


def serve(lst: Listener, node: Node, once: bool = False, stop: Callable[[], bool] = lambda: False) -> None:
    """Answer probes on `lst` one client at a time, until `stop()` (checked each second) or, with `once`,
    after the first client quits."""
    payload = bytes(MESSAGE_BYTES)
    while not stop():
        try:
            ch = lst.accept(timeout=1.0)
        except TransferTimeout:
            continue  # check stop() again
        except PeerClosed:
            return  # the listener was closed
        with ch:
            try:
                _answer(ch, payload, node)
            except (PeerClosed, TransferTimeout, ValueError, KeyError, TypeError):
                pass  # the client went away or sent garbage: wait for the next one
        if once:
            return


def _answer(ch: Channel, payload: bytes, node: Node) -> None:
    """One client's requests, until it quits."""
    while True:
        msg = _recv_json(ch, timeout=300)
        if msg.get("op") == "hello":
            _send_json(ch, _node_dict(node))
        elif msg.get("op") == "send":
            size, count = int(msg["bytes"]), int(msg["count"])
            if not 0 < size <= MESSAGE_BYTES or not 0 < count <= 1 << 16:
                _send_json(ch, {"error": f"bytes must be in (0, {MESSAGE_BYTES}], count in (0, 65536]"})
                continue
            view = memoryview(payload)[:size]
            for _ in range(count):
                ch.send(view, timeout=300)
        else:
            return


def probe(address: str, min_round_s: float = 0.5, max_bytes: int = 1 << 30, rounds: int = 3) -> ProbeResult:
    """Measure server -> client bandwidth to the probe server at `address`: the fastest of `rounds` rounds
    of the size that lasts at least `min_round_s`."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    ch = transport_for(address).connect(address, timeout=30)
    with ch:
        _send_json(ch, {"op": "hello"})
        node = _node_from(_recv_json(ch))
        count = 1
        while True:
            dt = _round(ch, count)
            if dt >= min_round_s or 2 * count * MESSAGE_BYTES > max_bytes:
                break
            # aim the next round at 2 x min_round_s (at least double)
            count = max(
                2 * count, min(max_bytes // MESSAGE_BYTES, int(count * 2 * min_round_s / max(dt, 1e-6)))
            )
        seconds = [dt] + [_round(ch, count) for _ in range(rounds - 1)]
        _send_json(ch, {"op": "quit"})
    total = count * MESSAGE_BYTES
    return ProbeResult(
        address,
        node,
        total / min(seconds) / 1e9,
        total,
        min(seconds),
        tuple(total / s / 1e9 for s in seconds),
    )


def _round(ch: Channel, count: int) -> float:
    """Ask for `count` messages and receive them. -> seconds from the request to the last byte."""
    t0 = time.perf_counter()
    _send_json(ch, {"op": "send", "bytes": MESSAGE_BYTES, "count": count})
    for _ in range(count):
        got = ch.recv(timeout=300)
        if len(got) != MESSAGE_BYTES:
            raise RuntimeError(f"probe server sent {len(got)} bytes, expected {MESSAGE_BYTES}")
    return time.perf_counter() - t0


def topology_from_probes(local: Node, results: Sequence[ProbeResult], device_kind: str) -> Topology:
    """This host plus each probed one; the measured figure is the link between this host and that one,
    and the inter-node default is the slowest measured (pairs not probed: no better figure is known)."""
    names = [local.name] + [r.node.name for r in results]
    if len(set(names)) != len(names):
        raise ValueError(f"node names must differ (hostnames): {names}")
    links = tuple((local.name, r.node.name, round(r.gbytes_per_s, 4)) for r in results)
    inter = min(r.gbytes_per_s for r in results)
    return Topology((local, *(r.node for r in results)), round(inter, 4), links, device_kind=device_kind)
