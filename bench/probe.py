"""Load runs of one system on one workload, scored against any SLO: the pieces of the goodput comparison.

* :class:`Prober` runs the workload at a rate over the public API (``bench.serving``) and caches the records by
  rate, so one run is scored against every SLO scale ``k``.
* :class:`Turns` lets several systems, all started at once, take turns at running load in a fixed rotation:
  the machines here are shared, and a slow drift in the background load then hits every system alike
  instead of whichever happened to run last.
* :func:`goodput_from_runs`, :func:`fitted_from_runs`, :func:`refine_goodput`, :func:`tightest_k`: goodput and
  SLO scale from the runs.

A run at a rate plays several seeded schedules back to back (``seeds``, ``bench.workload.make_seeded_requests``):
scored together they give the pooled attainment the search follows, scored seed by seed the spread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from bench.cpu import CpuMeter, CpuUsage, NamedPidsFn, PidsFn
from bench.goodput import contradiction, fitted_goodput
from bench.metrics import SLO, RequestRecord, attainment, compute_metrics
from bench.serving import run_load
from bench.workload import BenchRequest, Workload, make_seeded_requests

log = logging.getLogger("bench.probe")

TARGET = 0.9  # SLO attainment that defines goodput


class Stopped(Exception):
    """Raised in a participant waiting for its turn once the comparison is stopped."""


@dataclass
class Run:
    rate: float
    records: list[RequestRecord]
    cpu: CpuUsage | None = None  # who used the CPU during the run (None: not measured)
    # the CPU use of earlier runs at this rate, each run again because foreign load disturbed it
    discarded: list[CpuUsage] = field(default_factory=list)
    seed_of: list[int] = field(default_factory=list)  # the workload seed of each record ([]: one seed)
    # earlier runs at this rate that contradicted a run at another rate and were run again (`recheck`)
    replaced: list[Run] = field(default_factory=list)

    def records_of(self, seed: int | None = None) -> list[RequestRecord]:
        """The records of one seed's schedule (every record with `seed` None)."""
        if seed is None or not self.seed_of:
            return self.records
        return [r for r, s in zip(self.records, self.seed_of, strict=True) if s == seed]


class Turns:
    """One load run at a time; the participants take turns in rotation until they leave, the order
    reversed every round (A B C, C B A, A B C, ...) so that no one always runs first after the others."""

    def __init__(self, names: list[str]) -> None:
        self._order = list(names)
        self._next = 0
        self._cond = threading.Condition()
        self.stopped = threading.Event()  # set by stop(): runs end early, no turn is granted any more

    @contextlib.contextmanager
    def turn(self, name: str) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self.stopped.is_set() or self._order[self._next] == name)
            if self.stopped.is_set():
                raise Stopped("the comparison was stopped")
        try:
            yield
        finally:
            with self._cond:
                self._next += 1
                if self._next == len(self._order):
                    self._order.reverse()
                    self._next = 0
                self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self.stopped.set()
            self._cond.notify_all()

    def leave(self, name: str) -> None:
        with self._cond:
            i = self._order.index(name)
            self._order.pop(i)
            if self._order:
                if i < self._next:
                    self._next -= 1
                self._next %= len(self._order)
            self._cond.notify_all()


def _rate_key(rate: float) -> float:
    """A rate as runs are cached by it: 4 significant digits, so float noise in a bisection maps to one run."""
    return float(f"{rate:.4g}")


class Prober:
    """Load runs of one (system, workload), cached by rate (so every k reuses them).

    A run sends, for each of ``seeds`` (default: the workload's seed), ``workload.n_requests`` requests, fewer
    at low rates so that each seed's schedule spans at most ``max_span_s`` (but never fewer than
    ``min_requests``), and more at high rates where that many would span less than ``min_span_s``: the first
    requests of the same seeded schedules, one seed after another.
    Runs of different probers sharing ``turns`` never overlap.

    With ``pids`` (the system's processes) each run's CPU use is measured (:mod:`bench.cpu`), the other
    systems' processes (``peer_pids``) counted apart, each of ``named_pids`` on its own; a run during which foreign load (anything but the system
    and this process) peaked above ``max_foreign_cores`` in some second is run again, ``reruns`` times at most.
    """

    def __init__(
        self,
        name: str,
        address: str,
        workload: Workload,
        source: list[int],
        *,
        timeout_s: float,
        max_span_s: float,
        min_requests: int,
        min_span_s: float = 0.0,
        turns: Turns | None = None,
        log_slo: SLO | None = None,
        pids: PidsFn | None = None,
        peer_pids: PidsFn | None = None,
        named_pids: NamedPidsFn | None = None,
        max_foreign_cores: float = math.inf,
        reruns: int = 1,
        seeds: tuple[int, ...] | None = None,
    ) -> None:
        self.name = name
        self.address = address
        self.workload = workload
        self.source = source
        self.timeout_s = timeout_s
        self.max_span_s = max_span_s
        self.min_requests = min_requests
        self.min_span_s = min_span_s
        self.turns = turns
        self.log_slo = log_slo
        self.pids, self.peer_pids, self.named_pids = pids, peer_pids, named_pids
        self.max_foreign_cores, self.reruns = max_foreign_cores, reruns
        self.seeds = seeds or (workload.seed,)
        self.runs: dict[float, Run] = {}

    def schedule(self, rate: float) -> tuple[list[BenchRequest], list[int]]:
        """The requests a run at `rate` sends (and each one's seed), without sending them."""
        rate = _rate_key(rate)
        n = min(self.workload.n_requests, max(self.min_requests, round(rate * self.max_span_s)))
        n = max(n, math.ceil(rate * self.min_span_s))
        return make_seeded_requests(
            replace(self.workload, rate=rate, n_requests=n), self.source, list(self.seeds)
        )

    def run(self, rate: float) -> Run:
        rate = _rate_key(rate)
        if rate not in self.runs:
            reqs, seed_of = self.schedule(rate)
            discarded: list[CpuUsage] = []
            while True:
                run = self._load(rate, reqs)
                if not self._disturbed(run.cpu) or len(discarded) >= self.reruns:
                    break
                assert run.cpu is not None
                log.warning(
                    "%s %s @ %.3g req/s: foreign CPU peaked at %.2f cores (limit %.2f): running it again",
                    self.name,
                    self.workload.name,
                    rate,
                    run.cpu.foreign_peak_cores,
                    self.max_foreign_cores,
                )
                discarded.append(run.cpu)
            run.discarded = discarded
            run.seed_of = seed_of
            self.runs[rate] = run
        return self.runs[rate]

    def rerun(self, rate: float) -> Run:
        """Run `rate` again (the same schedules); the new run replaces the cached one, kept in its `replaced`."""
        old = self.runs.pop(_rate_key(rate))
        new = self.run(rate)
        new.replaced = [*old.replaced, old]
        return new

    def _disturbed(self, cpu: CpuUsage | None) -> bool:
        return cpu is not None and cpu.foreign_peak_cores > self.max_foreign_cores

    def _load(self, rate: float, reqs: list[BenchRequest]) -> Run:
        """One load run at `rate`, in this prober's turn, its CPU use measured when the pids are known."""
        with self.turns.turn(self.name) if self.turns else contextlib.nullcontext():
            meter = CpuMeter(self.pids, self.peer_pids, named=self.named_pids) if self.pids else None
            t = time.monotonic()
            with meter or contextlib.nullcontext():
                records = asyncio.run(
                    run_load(
                        self.address,
                        reqs,
                        request_timeout_s=self.timeout_s,
                        drain_s=self.timeout_s,
                        stop=self.turns.stopped if self.turns else None,
                    )
                )
            elapsed = time.monotonic() - t
            time.sleep(0.3)  # let cancelled stragglers be reaped before the next run
        if self.turns and self.turns.stopped.is_set():
            raise Stopped("the comparison was stopped")
        run = Run(rate, records, meter.usage if meter else None)
        att = f", attainment {attainment(compute_metrics(records), self.log_slo):.2f}" if self.log_slo else ""
        cpu = (
            f", foreign CPU {run.cpu.foreign_cores:.2f} (peak {run.cpu.foreign_peak_cores:.2f})"
            if run.cpu
            else ""
        )
        log.info(
            "%s %s @ %.3g req/s: %d/%d ok%s%s (%.1fs)",
            self.name,
            self.workload.name,
            rate,
            sum(r.ok for r in records),
            len(records),
            att,
            cpu,
            elapsed,
        )
        return run

    def attainment(self, rate: float, slo: SLO) -> float:
        """Attainment over every seed's requests at `rate` (run now unless cached)."""
        return attainment(compute_metrics(self.run(rate).records), slo)


def min_k_per_request(records: list[RequestRecord], ttft_base_s: float, tpot_base_s: float) -> list[float]:
    """The smallest SLO scale each request meets, the SLO at scale k being k x (ttft_base_s, tpot_base_s)
    (inf for a failed request)."""
    out = []
    for m in compute_metrics(records):
        if not m.ok or m.ttft_s is None or m.tpot_s is None:
            out.append(math.inf)
        else:
            out.append(max(m.ttft_s / ttft_base_s, m.tpot_s / tpot_base_s))
    return out


def tightest_k(records: list[RequestRecord], ttft_base_s: float, tpot_base_s: float) -> float | None:
    """The smallest k at which >= TARGET of the requests meet the SLO k x (ttft_base_s, tpot_base_s)
    (None if no k does)."""
    ks = sorted(min_k_per_request(records, ttft_base_s, tpot_base_s))
    k = ks[math.ceil(TARGET * len(ks)) - 1]
    return k if math.isfinite(k) else None


def highest_passing_rate(attainment_by_rate: list[tuple[float, float]]) -> float:
    """Highest rate whose attainment reaches TARGET with every lower rate's reaching it too (0.0: none)."""
    best = 0.0
    for rate, att in sorted(attainment_by_rate):
        if att < TARGET:
            break
        best = rate
    return best


def attainment_by_rate(runs: list[Run], slo: SLO, seed: int | None = None) -> list[tuple[float, float]]:
    """(rate, attainment) of every run, over every seed's requests or over `seed`'s only."""
    return [(r.rate, attainment(compute_metrics(r.records_of(seed)), slo)) for r in runs]


def goodput_from_runs(runs: list[Run], slo: SLO) -> float:
    """Highest probed rate passing the SLO target with every lower probed rate passing too."""
    return highest_passing_rate(attainment_by_rate(runs, slo))


def fitted_from_runs(runs: list[Run], slo: SLO, seed: int | None = None) -> float:
    """Goodput interpolated between the runs around the target crossing (`bench.goodput.fitted_goodput`),
    over every seed's requests or over `seed`'s only."""
    return fitted_goodput(attainment_by_rate(runs, slo, seed), TARGET)


def recheck(prober: Prober, slo: SLO, pairs: int = 1) -> list[float]:
    """Run again, once each, the two runs of a contradiction at `slo` (`bench.goodput.contradiction`: a rate
    that fails below one that passes), up to `pairs` times; the reruns replace them. Both are run again, the
    pass as well as the fail, so outliers are not removed in one direction only. Returns the rates run again
    (a contradiction that survives its rerun stands: the first fail then bounds the goodput)."""
    again: list[float] = []
    for _ in range(pairs):
        pair = contradiction(attainment_by_rate(list(prober.runs.values()), slo), TARGET)
        if pair is None or any(rate in again for rate in pair):
            break
        for rate in pair:
            log.warning(
                "%s: the runs at %.4g (fails) and %.4g req/s (passes) contradict each other: running %.4g again",
                prober.name,
                *pair,
                rate,
            )
            prober.rerun(rate)
            again.append(rate)
    return again


def refine_goodput(prober: Prober, slo: SLO, budget: int, rel_tol: float) -> None:
    """Continue the bracket-then-bisect search for `slo` over the cached runs, with at most `budget` new
    runs: double past the highest run if every run passes, else bisect above the goodput. Never below the
    lowest run (runs at low rates are the longest; a goodput of 0 then means "below the lowest run")."""
    for _ in range(budget):
        runs = sorted(prober.runs.values(), key=lambda r: r.rate)
        good = goodput_from_runs(runs, slo)
        above = [r.rate for r in runs if r.rate > good]
        if good == 0.0:
            return
        if not above:
            nxt = good * 2
        elif above[0] - good > rel_tol * good:
            nxt = (good + above[0]) / 2
        else:
            return
        prober.run(nxt)
