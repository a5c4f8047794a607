"""Goodput search: the highest request rate whose SLO attainment stays at or above a target, by bisection.

:func:`find_goodput` only needs ``attainment_at(rate) -> float`` (run a load at that rate, return the share of
requests meeting the SLO), so it is tested on synthetic curves and driven by real load runs alike.
:func:`derive_slos` and :func:`goodput_sweep` implement DistServe-style SLOs: ``k`` times the latency of a request
served alone, swept over ``k``.

Search: probe ``start_rate``; while it passes, multiply by ``growth`` (bracketing up), while it fails, divide
(bracketing down); then bisect the bracket ``[highest pass, lowest fail]`` until ``hi - lo <= rel_tol * lo``.
``rate`` is the highest *measured* passing rate, so on a monotone curve it never overstates goodput.
Attainment is assumed non-increasing in rate; noisy probes are taken at face value (use >= 1000 requests per
probe for 90% claims).

Fitted goodput (:func:`fitted_goodput`, ``GoodputResult.rate_fitted``): the rate where the straight line between
the highest passing rate (every lower measured rate passing too) and the next measured rate above it crosses
the target. It lies inside the final bracket, so its error is bounded by the bracket's width, and it is not
tied to the search's grid: two systems whose brackets share their ends but whose attainments differ no longer
tie at a ratio of exactly 1 or 2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.metrics import SLO


@dataclass(frozen=True)
class Probe:
    """One load run of the search: its rate, the attainment measured, and whether it met the target."""

    rate: float
    attainment: float
    passed: bool


@dataclass(frozen=True)
class GoodputResult:
    """Outcome of a goodput search.

    ``rate`` is the highest passing rate probed (0.0 if none passed down to ``min_rate``); ``hi`` the lowest
    failing rate (None if ``max_rate`` or the probe budget was hit first).  ``converged`` says the bracket was
    narrowed to ``rel_tol`` (or a rate bound was reached), as opposed to running out of probes.
    ``rate_fitted`` is the target crossing interpolated inside ``[rate, hi]`` (:func:`fitted_goodput`).
    """

    rate: float
    hi: float | None
    target: float
    rel_tol: float
    converged: bool
    probes: tuple[Probe, ...]

    def per_device(self, devices: int) -> float:
        return goodput_per_device(self.rate, devices)

    @property
    def rate_fitted(self) -> float:
        return fitted_goodput([(p.rate, p.attainment) for p in self.probes], self.target)

    @property
    def rel_width(self) -> float | None:
        """(hi - rate) / rate: the bracket's relative width (None while unbounded or nothing passed)."""
        return bracket_rel_width(self.rate, self.hi)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "hi": self.hi,
            "rate_fitted": self.rate_fitted,
            "rel_width": self.rel_width,
            "target": self.target,
            "rel_tol": self.rel_tol,
            "converged": self.converged,
            "probes": [{"rate": p.rate, "attainment": p.attainment, "passed": p.passed} for p in self.probes],
        }


def goodput_per_device(rate: float, devices: int) -> float:
    """Goodput normalised by the devices the system used (here a device is one CPU core)."""
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    return rate / devices


def bracket_rel_width(lo: float, hi: float | None) -> float | None:
    """(hi - lo) / lo, None when the bracket is open (no failing rate, or no passing one)."""
    return (hi - lo) / lo if hi is not None and lo > 0 else None


def passing_bracket(points: Sequence[tuple[float, float]], target: float) -> tuple[float, float | None]:
    """(lo, hi) of measured ``(rate, attainment)`` points: lo the highest rate passing ``target`` with every
    lower rate passing too (0.0: the lowest rate fails), hi the next measured rate above it (None: none)."""
    lo, hi = 0.0, None
    for rate, att in sorted(points):
        if att < target:
            hi = rate
            break
        lo = rate
    return lo, hi


def contradiction(points: Sequence[tuple[float, float]], target: float) -> tuple[float, float] | None:
    """The runs of measured ``(rate, attainment)`` points that contradict each other: (the lowest failing rate
    with a passing rate above it, the highest passing rate above that one); None when the outcomes are
    monotone (every pass below every fail). Attainment does not rise with load, so one of the two is an
    outlier (a disturbed run, or a knife-edge draw), and scoring by the first fail would let it decide."""
    ordered = sorted(points)
    for i, (rate, att) in enumerate(ordered):
        if att < target:
            above = [r for r, a in ordered[i + 1 :] if a >= target]
            return (rate, max(above)) if above else None
    return None


def fitted_goodput(points: Sequence[tuple[float, float]], target: float = 0.9) -> float:
    """The rate where attainment crosses ``target``, by linear interpolation between the two measured points
    around the crossing (``passing_bracket``): lo + (a_lo - target) / (a_lo - a_hi) x (hi - lo), so
    lo <= result < hi. lo when nothing above it was measured; 0.0 when the lowest rate fails (no
    extrapolation below the measurements)."""
    by_rate = dict(points)
    lo, hi = passing_bracket(points, target)
    if lo == 0.0 or hi is None:
        return lo
    a_lo, a_hi = by_rate[lo], by_rate[hi]  # a_lo >= target > a_hi
    return lo + (a_lo - target) / (a_lo - a_hi) * (hi - lo)


def find_goodput(
    attainment_at: Callable[[float], float],
    *,
    start_rate: float = 1.0,
    growth: float = 2.0,
    target: float = 0.9,
    rel_tol: float = 0.05,
    max_probes: int = 16,
    min_rate: float = 1e-3,
    max_rate: float = 1e6,
    on_probe: Callable[[Probe], None] | None = None,
) -> GoodputResult:
    """Bracket (steps of ``growth``) then bisect the rate for the highest one with
    ``attainment_at(rate) >= target``."""
    if not 0 < min_rate <= start_rate <= max_rate:
        raise ValueError(
            f"need 0 < min_rate <= start_rate <= max_rate, got {min_rate}, {start_rate}, {max_rate}"
        )
    if not 0 < rel_tol < 1 or max_probes < 1 or not growth > 1:
        raise ValueError(
            f"need 0 < rel_tol < 1, max_probes >= 1 and growth > 1, got {rel_tol}, {max_probes}, {growth}"
        )
    probes: list[Probe] = []

    def probe(rate: float) -> bool:
        att = float(attainment_at(rate))
        p = Probe(rate, att, att >= target)
        probes.append(p)
        if on_probe is not None:
            on_probe(p)
        return p.passed

    def budget() -> bool:
        return len(probes) < max_probes

    lo: float | None = None  # highest passing rate
    hi: float | None = None  # lowest failing rate
    bound_hit = False
    if probe(start_rate):
        lo = start_rate
        while hi is None and budget():
            if lo >= max_rate:
                bound_hit = True
                break
            r = min(lo * growth, max_rate)
            if probe(r):
                lo = r
            else:
                hi = r
    else:
        hi = start_rate
        while lo is None and budget():
            if hi <= min_rate:
                bound_hit = True
                break
            r = max(hi / growth, min_rate)
            if probe(r):
                lo = r
            else:
                hi = r

    while lo is not None and hi is not None and hi - lo > rel_tol * lo and budget():
        mid = 0.5 * (lo + hi)
        if probe(mid):
            lo = mid
        else:
            hi = mid

    converged = bound_hit or (lo is not None and hi is not None and hi - lo <= rel_tol * lo)
    return GoodputResult(
        rate=lo if lo is not None else 0.0,
        hi=hi,
        target=target,
        rel_tol=rel_tol,
        converged=converged,
        probes=tuple(probes),
    )


def derive_slos(
    isolated_prefill_s: float, isolated_decode_step_s: float, scale_k: float
) -> tuple[float, float]:
    """(TTFT SLO, TPOT SLO) = ``scale_k`` times the prefill time and decode step time of a request run alone."""
    if isolated_prefill_s <= 0 or isolated_decode_step_s <= 0 or scale_k <= 0:
        raise ValueError("isolated latencies and scale_k must be > 0")
    return scale_k * isolated_prefill_s, scale_k * isolated_decode_step_s


def slo_sweep(
    isolated_prefill_s: float,
    isolated_decode_step_s: float,
    ks: Sequence[float],
    min_fluidity: float | None = None,
) -> list[tuple[float, SLO]]:
    """``(k, SLO)`` for each scale ``k`` (tighter SLOs for smaller ``k``)."""
    out: list[tuple[float, SLO]] = []
    for k in ks:
        ttft, tpot = derive_slos(isolated_prefill_s, isolated_decode_step_s, k)
        out.append((k, SLO(ttft, tpot, min_fluidity)))
    return out


def goodput_sweep(
    attainment_at: Callable[[float, SLO], float],
    isolated_prefill_s: float,
    isolated_decode_step_s: float,
    ks: Sequence[float],
    *,
    min_fluidity: float | None = None,
    **search: Any,
) -> list[tuple[float, SLO, GoodputResult]]:
    """Goodput at each SLO scale ``k``; ``search`` is passed to :func:`find_goodput`.

    A load run at one rate can be scored against every SLO, so ``attainment_at`` should cache its runs by rate
    (e.g. keep the ``RequestRecord`` lists in a dict) rather than re-running the load per ``k``.
    """
    results: list[tuple[float, SLO, GoodputResult]] = []
    for k, slo in slo_sweep(isolated_prefill_s, isolated_decode_step_s, ks, min_fluidity):
        # mypy#15459: mypy cannot type a lambda whose default binds a loop variable
        res = find_goodput(lambda rate, slo=slo: attainment_at(rate, slo), **search)  # type: ignore[misc]
        results.append((k, slo, res))
    return results
