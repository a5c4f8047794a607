"""Replanning on the live workload: a window of finished requests, and the running plan judged against it.

The coordinator records every finished request (arrival, prompt and output tokens, the TTFT and TPOT its
client saw) into a `Window` of the last `span_s` seconds. `assess` re-runs the search on that window's rate
and lengths: once for the running plan as it is (its layouts, unit and unit count: `fixed_unit`,
`fixed_units`), giving its predicted SLO attainment at the live rate, and once with the running layouts
and unit but the unit count free, giving the smallest plan predicted to meet the SLOs at that rate (what
`pdserve up --autoplan` applies: instance counts; layout changes are reported, not applied). Pure: times
are passed in (seconds, any monotonic clock), nothing here does I/O.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from coordinator.planner.latency import Layout, LayoutLatency, Profile
from coordinator.planner.model import ModelSpec
from coordinator.planner.search import PlanError, SearchInput, search
from coordinator.planner.topology import Topology


@dataclass(frozen=True)
class Finished:
    arrival_s: float
    prompt: int  # tokens
    output: int  # tokens sent
    ttft_s: float
    tpot_s: float | None  # None: one output token


class Window:
    """The finished requests that arrived in the last `span_s` seconds."""

    def __init__(self, span_s: float = 60.0) -> None:
        self.span_s = span_s
        self._items: deque[Finished] = deque()

    def add(self, f: Finished) -> None:
        self._items.append(f)

    def prune(self, now: float) -> None:
        while self._items and self._items[0].arrival_s < now - self.span_s:
            self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)

    def rate(self, now: float) -> float:
        """Requests per second over the window (its span, or since its first request if that is later)."""
        if not self._items:
            return 0.0
        span = min(self.span_s, max(1e-9, now - self._items[0].arrival_s))
        return len(self._items) / span

    def samples_with_times(self) -> tuple[Finished, ...]:
        return tuple(self._items)

    def samples(self) -> tuple[tuple[int, int], ...]:
        return tuple((f.prompt, max(1, f.output)) for f in self._items)

    def attainment(self, slo_ttft_s: float, slo_tpot_s: float) -> float:
        """The share of the window's requests that met both SLOs, as their clients saw them."""
        if not self._items:
            return math.nan
        ok = sum(
            1 for f in self._items if f.ttft_s <= slo_ttft_s and (f.tpot_s is None or f.tpot_s <= slo_tpot_s)
        )
        return ok / len(self._items)

    def means(self) -> dict[str, float]:
        n = len(self._items)
        tpots = [f.tpot_s for f in self._items if f.tpot_s is not None]
        return {
            "prompt_tokens": sum(f.prompt for f in self._items) / n if n else math.nan,
            "output_tokens": sum(f.output for f in self._items) / n if n else math.nan,
            "ttft_s": sum(f.ttft_s for f in self._items) / n if n else math.nan,
            "tpot_s": sum(tpots) / len(tpots) if tpots else math.nan,
        }


@dataclass(frozen=True)
class Running:
    """The plan that runs: its layouts and its unit (m prefill : n decode instances) times `units`."""

    prefill: Layout
    decode: Layout
    m: int
    n: int
    units: int

    @staticmethod
    def from_plan(plan: dict[str, Any]) -> Running:
        try:
            unit = plan["unit"]
            return Running(
                Layout(int(plan["prefill"]["tp"]), int(plan["prefill"]["pp"])),
                Layout(int(plan["decode"]["tp"]), int(plan["decode"]["pp"])),
                int(unit["prefill"]),
                int(unit["decode"]),
                int(unit["count"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a plan (prefill, decode, unit): {exc!r}") from exc

    def with_units(self, units: int) -> Running:
        return replace(self, units=units)

    @property
    def counts(self) -> dict[str, int]:
        return {"prefill": self.m * self.units, "decode": self.n * self.units}


def inputs_from_plan(plan: dict[str, Any]) -> SearchInput:
    """The search input a plan was made with (`pdserve plan` records it under "inputs"), with the plan's
    own length samples unknown: the caller replaces `samples` with the live window's."""
    try:
        i = plan["inputs"]
        prof = i["profile"]
        profile = Profile(
            str(prof["device"]),
            str(prof["model"]),
            tuple(LayoutLatency.from_dict(d) for d in prof["layouts"]),
            str(prof.get("source", "")),
        )
        return SearchInput(
            ModelSpec.from_dict(i["model"]),
            profile,
            Topology.from_dict(i["topology"]),
            float(i["slo_ttft_ms"]) / 1e3,
            float(i["slo_tpot_ms"]) / 1e3,
            ((1, 1),),
            attainment=float(i.get("attainment", 0.9)),
            prefill_max_batch_tokens=int(i.get("prefill_max_batch_tokens", 1 << 30)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the plan has no replan inputs (made by an older pdserve plan?): {exc!r}") from exc


@dataclass(frozen=True)
class Assessment:
    at_s: float
    requests: int  # in the window
    rate_rps: float
    measured_attainment: float
    predicted_attainment: float  # the running plan at the window's rate and lengths
    meets: bool  # predicted_attainment >= the plan's attainment target
    running: dict[str, int]  # instance counts now
    recommended: dict[str, Any] | None  # the plan to run instead (pdserve plan JSON), None: keep it
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "at_s": self.at_s,
            "requests": self.requests,
            "rate_rps": self.rate_rps,
            "measured_attainment": self.measured_attainment,
            "predicted_attainment": self.predicted_attainment,
            "meets_slo": self.meets,
            "running": self.running,
            "recommended": self.recommended,
            "reason": self.reason,
        }


def assess(
    inp: SearchInput,
    running: Running,
    window: Window,
    now: float,
    headroom: float = 1.0,
    n_requests: int = 200,
) -> Assessment:
    """Judge `running` on the window (see the module docstring). `headroom` > 1 plans the recommendation
    for that many times the live rate. The recommendation differs from the running counts when the running
    plan is predicted to miss the SLOs (more units) or would meet them with fewer units (fewer)."""
    window.prune(now)
    rate = window.rate(now)
    samples = window.samples()
    measured = window.attainment(inp.slo_ttft_s, inp.slo_tpot_s)
    base = replace(inp, samples=samples, rate=rate, n_requests=n_requests)
    unit = (running.prefill, running.decode, running.m, running.n)
    try:
        now_plan = search(replace(base, fixed_unit=unit, fixed_units=running.units))
        predicted = now_plan.predicted.attainment
    except PlanError as exc:
        predicted, why = 0.0, str(exc)
    else:
        why = ""
    meets = predicted >= inp.attainment
    try:
        want = search(replace(base, rate=rate * headroom, fixed_unit=unit, fixed_units=None))
    except PlanError as exc:
        return Assessment(
            now, len(samples), rate, measured, predicted, meets, running.counts, None,
            f"no plan of the running layouts meets the SLOs at {rate:.3g} req/s: {exc}",
        )  # fmt: skip
    want_units = max(1, want.units)
    if want_units == running.units:
        reason = "the running plan is predicted to meet the SLOs" if meets else (why or "no better count")
        return Assessment(now, len(samples), rate, measured, predicted, meets, running.counts, None, reason)
    more = want_units > running.units
    reason = (
        f"predicted attainment {predicted:.3f} < target {inp.attainment} at {rate:.3g} req/s: "
        f"{want_units} units instead of {running.units}"
        if more
        else f"{want_units} units meet the SLOs at {rate:.3g} req/s; {running.units} run"
    )
    return Assessment(
        now, len(samples), rate, measured, predicted, meets, running.counts, want.to_dict(), reason
    )
