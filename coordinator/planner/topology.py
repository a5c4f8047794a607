"""The cluster: nodes of devices and the bandwidth between any two devices.

JSON: {"nodes": [{"name": "n0", "devices": 8, "device_memory_gib": 80, "intra_gbytes_per_s": 300}, ...],
       "inter_node_gbytes_per_s": 3.1,
       "links": [{"a": "n0", "b": "n1", "gbytes_per_s": 12.5}]}
A link's ends are node names ("n0": every device pair between the two nodes) or devices ("n0/3"); a device
pair's override wins over its nodes' override, which wins over the intra/inter figure. GB = 1e9 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 2**30
GB = 1e9


@dataclass(frozen=True)
class Node:
    name: str
    devices: int
    device_memory_gib: float
    intra_gbytes_per_s: float


@dataclass(frozen=True)
class Device:
    node: str
    index: int

    def __str__(self) -> str:
        return f"{self.node}/{self.index}"


@dataclass(frozen=True)
class Topology:
    nodes: tuple[Node, ...]
    inter_node_gbytes_per_s: float
    overrides: tuple[tuple[str, str, float], ...] = ()  # (end a, end b, GB/s), ends "n0" or "n0/3"
    device_kind: str = ""

    def __post_init__(self) -> None:
        names = [n.name for n in self.nodes]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"topology needs nodes with distinct names, got {names}")
        for n in self.nodes:
            if n.devices < 1 or n.device_memory_gib <= 0 or n.intra_gbytes_per_s <= 0:
                raise ValueError(f"node {n.name}: devices, memory and bandwidth must be > 0")
        if self.inter_node_gbytes_per_s <= 0:
            raise ValueError("inter_node_gbytes_per_s must be > 0")
        for a, b, g in self.overrides:
            for end in (a, b):
                if end.split("/")[0] not in names:
                    raise ValueError(f"link end {end!r} names no node")
            if g <= 0:
                raise ValueError(f"link {a}-{b}: gbytes_per_s must be > 0")

    @property
    def num_devices(self) -> int:
        return sum(n.devices for n in self.nodes)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def devices(self, node: str) -> tuple[Device, ...]:
        return tuple(Device(node, i) for i in range(self.node(node).devices))

    def gbytes_per_s(self, x: Device, y: Device) -> float:
        """Bandwidth between two devices (GB/s)."""
        sx, sy = str(x), str(y)
        for a, b, g in self.overrides:
            if {a, b} == {sx, sy}:
                return g
        if x.node == y.node:
            return self.node(x.node).intra_gbytes_per_s
        for a, b, g in self.overrides:
            if {a, b} == {x.node, y.node}:
                return g
        return self.inter_node_gbytes_per_s

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "nodes": [
                {
                    "name": n.name,
                    "devices": n.devices,
                    "device_memory_gib": n.device_memory_gib,
                    "intra_gbytes_per_s": n.intra_gbytes_per_s,
                }
                for n in self.nodes
            ],
            "inter_node_gbytes_per_s": self.inter_node_gbytes_per_s,
            "links": [{"a": a, "b": b, "gbytes_per_s": g} for a, b, g in self.overrides],
        }
        if self.device_kind:
            d["device_kind"] = self.device_kind
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Topology:
        try:
            nodes = tuple(
                Node(
                    str(n["name"]),
                    int(n["devices"]),
                    float(n["device_memory_gib"]),
                    float(n["intra_gbytes_per_s"]),
                )
                for n in d["nodes"]
            )
            links = tuple((str(x["a"]), str(x["b"]), float(x["gbytes_per_s"])) for x in d.get("links", []))
            inter = float(
                d.get("inter_node_gbytes_per_s", nodes[0].intra_gbytes_per_s if len(nodes) == 1 else 0)
            )
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"bad topology: {exc!r}") from exc
        return Topology(nodes, inter, links, str(d.get("device_kind", "")))


def uniform(
    nodes: int, devices: int, memory_gib: float, intra: float, inter: float, kind: str = ""
) -> Topology:
    """`nodes` identical nodes n0, n1, ..."""
    return Topology(tuple(Node(f"n{i}", devices, memory_gib, intra) for i in range(nodes)), inter, (), kind)
