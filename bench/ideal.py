"""An ideal prefill pool on a run's own schedule: the TTFT attainment that queueing alone allows.

`bench.compare` scores every load run of the disaggregated system against this bound: ``servers`` prefill
instances taking prompts first come, first served (each to the earliest free instance, one prompt at a time),
each prompt costing exactly the isolated prefill time scaled to its length (the per-token cost of the
isolated measurement), and nothing else: no RPC, no KV hand-off, no interference. What the real system loses
below this bound is implementation overhead; what the bound itself loses is structural (a prompt arriving
while another is being prefilled waits for it).

Times are seconds; arrivals are the scheduled times of the run (open loop).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Protocol

from bench.goodput import find_goodput


class Scheduled(Protocol):
    """A request as the bound sees it: when it was scheduled and its prompt tokens (a sent request's
    RequestRecord, or a BenchRequest not sent)."""

    @property
    def scheduled_s(self) -> float: ...

    @property
    def prompt_len(self) -> int: ...


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


def ideal_goodput(
    schedule: Callable[[float], Sequence[Scheduled]],
    ttft_slo_s: float,
    prefill_s: float,
    prefill_len: int,
    servers: int,
    start_rate: float,
    target: float = 0.9,
    rel_tol: float = 0.005,
) -> float:
    """The ideal pool's goodput (req/s): the fitted crossing of `target` TTFT attainment, searched on the
    schedules a load run at each rate would send (`schedule(rate)`, e.g. `bench.probe.Prober.schedule`) to
    within `rel_tol`; nothing is sent, the bound is computed. Scoring only the rates a system under test ran
    gives a lower bound wherever the ideal passes all of them (the highest of them)."""
    res = find_goodput(
        lambda r: ideal_ttft_attainment(schedule(r), ttft_slo_s, prefill_s, prefill_len, servers),
        start_rate=start_rate,
        target=target,
        rel_tol=rel_tol,
        max_probes=64,
        min_rate=start_rate / 1024,
    )
    return res.rate_fitted
