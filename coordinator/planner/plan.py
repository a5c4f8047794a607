"""The plan: what to run where, and what the simulator predicts for it. `to_dict` is `pdserve plan`'s JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coordinator.planner.latency import Layout


@dataclass(frozen=True)
class Placement:
    instance: str  # "prefill-0", "decode-3"
    phase: str  # "prefill" | "decode"
    node: str
    devices: tuple[int, ...]  # device indexes on `node`, tp * pp of them (rank order: pp-major)


@dataclass(frozen=True)
class KVLink:
    prefill: str
    decode: str
    gbytes_per_s: float  # the bandwidth the KV of one hand-off sees (GB/s = 1e9 bytes/s)
    codec: str


@dataclass(frozen=True)
class Predicted:
    goodput_rps: float  # the highest request rate at which `attainment_target` of requests meet both SLOs
    per_device_goodput_rps: float  # goodput_rps / devices the plan uses
    attainment: float  # simulated share meeting both SLOs at `rate_rps`
    rate_rps: float


@dataclass(frozen=True)
class Plan:
    prefill: Layout
    decode: Layout
    placement: tuple[Placement, ...]
    kv_links: tuple[KVLink, ...]
    predicted: Predicted
    search_s: float
    unit: tuple[int, int] = (1, 1)  # prefill:decode instances of one replicated unit (the M:N ratio)
    units: int = 1
    notes: tuple[str, ...] = ()

    def instances(self, phase: str) -> int:
        return sum(1 for p in self.placement if p.phase == phase)

    @property
    def devices_used(self) -> int:
        return sum(len(p.devices) for p in self.placement)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefill": {"tp": self.prefill.tp, "pp": self.prefill.pp, "instances": self.instances("prefill")},
            "decode": {"tp": self.decode.tp, "pp": self.decode.pp, "instances": self.instances("decode")},
            "placement": [
                {"instance": p.instance, "phase": p.phase, "node": p.node, "devices": list(p.devices)}
                for p in self.placement
            ],
            "kv_links": [
                {"prefill": k.prefill, "decode": k.decode, "gbytes_per_s": k.gbytes_per_s, "codec": k.codec}
                for k in self.kv_links
            ],
            "predicted": {
                "goodput_rps": self.predicted.goodput_rps,
                "per_device_goodput_rps": self.predicted.per_device_goodput_rps,
                "attainment": self.predicted.attainment,
                "rate_rps": self.predicted.rate_rps,
            },
            "search_s": self.search_s,
            "unit": {"prefill": self.unit[0], "decode": self.unit[1], "count": self.units},
            "devices_used": self.devices_used,
            "notes": list(self.notes),
        }


def kv_links_of(plan: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    """(prefill instance, decode instance, codec) of each link in a plan's JSON (`Plan.to_dict`)."""
    try:
        return tuple((str(k["prefill"]), str(k["decode"]), str(k["codec"])) for k in plan["kv_links"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a plan (kv_links: prefill, decode, codec): {exc!r}") from exc
