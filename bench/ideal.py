"""Ideal systems on a run's own schedule: what queueing alone allows, priced at the isolated engine.

`bench.compare` scores every load run of the disaggregated system against this bound: ``servers`` prefill
instances taking prompts first come, first served (each to the earliest free instance, one prompt at a time),
each prompt costing exactly the isolated prefill time scaled to its length (the per-token cost of the
isolated measurement), and nothing else: no RPC, no KV hand-off, no interference. What the real system loses
below this bound is implementation overhead; what the bound itself loses is structural (a prompt arriving
while another is being prefilled waits for it).

The ideal split (`IdealSplit`) adds the decode side: the same prefill servers, the KV handed over in no
time, and the decode instances batching continuously at the isolated step time of their batch size (the
planner's simulator, coordinator/planner/simulator.py, on a latency model made of the isolated
measurement); a request counts when it meets both TTFT and TPOT. It bounds a workload whose decode instance
is the bottleneck, where the prefill pool alone is no bound.

Times are seconds; arrivals are the scheduled times of the run (open loop).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from bench.goodput import find_goodput
from bench.metrics import SLO
from coordinator.planner.calibrate import line_fit
from coordinator.planner.latency import Coeffs, Layout, LayoutLatency
from coordinator.planner.simulator import DecodeInstance, Link, PrefillInstance, Request, simulate


class Scheduled(Protocol):
    """A request as the bound sees it: when it was scheduled and its prompt tokens (a sent request's
    RequestRecord, or a BenchRequest not sent)."""

    @property
    def scheduled_s(self) -> float: ...

    @property
    def prompt_len(self) -> int: ...

    @property
    def output_len(self) -> int: ...


def fcfs_completion_delays(
    arrivals: Sequence[float], service: Sequence[float], servers: int = 1
) -> list[float]:
    """Per request, completion - arrival when `servers` identical FCFS servers serve the requests in arrival
    order, each on the earliest free server. Results are in the input order."""
    if servers < 1:
        raise ValueError(f"servers must be >= 1, got {servers}")
    if len(arrivals) != len(service):
        raise ValueError("arrivals and service differ in length")
    free = [0.0] * servers  # a heap of the times each server becomes free
    out = [0.0] * len(arrivals)
    for i in sorted(range(len(arrivals)), key=lambda j: arrivals[j]):
        start = max(arrivals[i], heapq.heappop(free))
        done = start + service[i]
        heapq.heappush(free, done)
        out[i] = done - arrivals[i]
    return out


def ideal_ttft_attainment(
    records: Sequence[Scheduled], ttft_slo_s: float, prefill_s: float, prefill_len: int, servers: int = 1
) -> float:
    """Share of the run's requests whose ideal TTFT (see the module doc) is within `ttft_slo_s`, where a
    prompt of n tokens costs prefill_s * n / prefill_len."""
    if not records:
        return 0.0
    per_token = prefill_s / prefill_len
    delays = fcfs_completion_delays(
        [r.scheduled_s for r in records], [per_token * r.prompt_len for r in records], servers
    )
    return sum(d <= ttft_slo_s for d in delays) / len(delays)


# The ideal decode model's two pieces meet at this batch size (coordinator/planner/latency.py: a CPU core's
# cost per sequence falls as the batch grows, so one line over batches 1-48 misses both ends).
SPLIT_THRESHOLD = 16


def ideal_split_latency(iso: dict, price: str = "median_s") -> LayoutLatency | None:
    """The ideal split's latency model from an isolated measurement (bench.compare.slos.measure_isolated):
    prefill at the isolated per-token cost (of `price`: "median_s" = the medians the SLOs scale with,
    "best_s" = the best runs), each decode step a + c x batch, two lines (batches up to and from
    SPLIT_THRESHOLD) fitted on the isolated steps' `price` per batch size, at the workload's mean context.
    None when the measurement has no batch steps (an earlier run's JSON)."""
    points = iso.get("decode_by_batch")
    if not points or len(points) < 3:
        return None
    prefill_s = iso["slo_prefill_s" if price == "median_s" else "prefill_s"]
    pts = sorted((int(b), float(p[price])) for b, p in points.items())

    def piece(sel: list[tuple[int, float]]) -> Coeffs:
        a, c = line_fit([(float(b), t, 1.0) for b, t in sel])
        return Coeffs(a, 0.0, c)

    small = [p for p in pts if p[0] <= SPLIT_THRESHOLD]
    large = [p for p in pts if p[0] >= SPLIT_THRESHOLD]
    small_c = piece(small if len(small) >= 2 else pts)
    large_c = piece(large) if len(large) >= 2 else small_c
    return LayoutLatency(
        Layout(1, 1),
        prefill=Coeffs(0.0, prefill_s / iso["prompt_len"], 0.0),
        decode_small=small_c,
        decode_large=large_c,
        threshold=SPLIT_THRESHOLD,
    )


@dataclass(frozen=True)
class IdealSplit:
    """`prefill_servers` prefill instances (one prompt a pass, first come first served) and
    `decode_servers` decode instances, each holding `kv_tokens` tokens and at most `max_running` sequences
    (the cluster's), on `latency` (`ideal_split_latency`); no hand-off time, no serving path."""

    latency: LayoutLatency
    kv_tokens: int
    max_running: int
    prefill_servers: int = 1
    decode_servers: int = 1

    def attainment(self, records: Sequence[Scheduled], slo: SLO) -> float:
        """Share of `records` meeting both SLOs in the ideal split on their schedule."""
        if not records:
            return 0.0
        reqs = [Request(r.scheduled_s, r.prompt_len, max(1, r.output_len)) for r in records]
        res = simulate(
            reqs,
            [PrefillInstance(self.latency, max_batch_tokens=1)] * self.prefill_servers,
            [DecodeInstance(self.latency, self.kv_tokens, max_running=self.max_running)]
            * self.decode_servers,
            [[Link(0.0)] * self.decode_servers] * self.prefill_servers,
        )
        return res.attainment(slo.ttft_s, slo.tpot_s)


def ideal_goodput(
    schedule: Callable[[float], Sequence[Scheduled]],
    attainment: Callable[[Sequence[Scheduled]], float],
    start_rate: float,
    target: float = 0.9,
    rel_tol: float = 0.005,
) -> float:
    """An ideal system's goodput (req/s): the fitted crossing of `target` attainment (`attainment` of a
    schedule: `ideal_ttft_attainment`, `IdealSplit.attainment`), searched on the schedules a load run at
    each rate would send (`schedule(rate)`, e.g. `bench.probe.Prober.schedule`) to within `rel_tol`; nothing
    is sent, the bound is computed. Scoring only the rates a system under test ran gives a lower bound
    wherever the ideal passes all of them (the highest of them)."""
    res = find_goodput(
        lambda r: attainment(schedule(r)),
        start_rate=start_rate,
        target=target,
        rel_tol=rel_tol,
        max_probes=64,
        min_rate=start_rate / 1024,
    )
    return res.rate_fitted
