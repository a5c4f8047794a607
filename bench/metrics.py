"""Per-request serving metrics (TTFT, TBT, TPOT, latency, Metron fluidity-index) and their SLO summaries.

Every time is in seconds on one clock shared by the load generator and the token receiver, usually
``time.perf_counter() - run_start``; ``scheduled_s`` is the request's *scheduled* arrival (open loop), not the
moment it was actually sent, so client-side queueing shows up in TTFT as it would for a real user.

Definitions (n = tokens received, t_1..t_n their arrival times, a = scheduled arrival):

* TTFT = t_1 - a;  TBT = every gap t_{i+1} - t_i;  TPOT = (t_n - t_1) / (n - 1), 0 when n = 1.
* end-to-end latency = t_n - a;  normalized latency = end-to-end / n (hides queueing: do not lead with it).
* scheduling delay = sent_s - a, when the runner recorded when it actually sent the request.
* fluidity-index: see :func:`fluidity`.
* A request *meets the SLO* when it succeeded (no error or timeout, and all forced output tokens arrived)
  and TTFT <= slo.ttft_s and TPOT <= slo.tpot_s (and, if set, fluidity >= slo.min_fluidity).
  Failed and timed-out requests are SLO misses; they are excluded from latency percentiles (counted in
  ``n_failed``) because they have no complete latency to report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES: tuple[int, ...] = (50, 90, 99)

# Float tolerance (1 ns, and 1e-9 of a deadline period when counting skipped deadlines), so that noise such as
# 0.3 / 0.1 = 2.9999999999999996 or 0.1 + 0.2 > 0.3 neither drops nor invents a deadline.
_EPS = 1e-9


@dataclass
class RequestRecord:
    """What a load runner observed for one request (mutable while the request is in flight)."""

    index: int
    scheduled_s: float
    prompt_len: int
    output_len: int
    sent_s: float | None = None
    token_times: list[float] = field(default_factory=list)
    ok: bool = True
    error: str | None = None

    def on_tokens(self, t: float, n: int = 1) -> None:
        """Record ``n`` tokens that arrived together at time ``t`` (a streamed chunk)."""
        self.token_times.extend([t] * n)

    def fail(self, error: str) -> None:
        """Mark the request failed or timed out (an SLO miss)."""
        self.ok = False
        self.error = error


@dataclass(frozen=True)
class Fluidity:
    """Deadline accounting of one request: ``index = 1 - missed / total`` (1.0 when there are no deadlines)."""

    missed: int
    total: int

    @property
    def index(self) -> float:
        return 1.0 - self.missed / self.total if self.total else 1.0


def fluidity(
    scheduled_s: float,
    token_times: Sequence[float],
    ttft_deadline_s: float,
    tbt_deadline_s: float,
    expected_tokens: int | None = None,
) -> Fluidity:
    """Metron's fluidity-index of one request (the rule of Etalon's ``get_request_level_deadline_miss_rate``).

    Rule implemented:

    1. The first token's deadline is ``d = scheduled_s + ttft_deadline_s`` (D_p: predicted prefill time + slack).
    2. A token arriving at ``t <= d`` is on time: one deadline met.  Its next deadline is ``d + D`` with
       ``D = tbt_deadline_s``, i.e. deadlines follow the schedule and the unused time ``d - t`` carries forward
       as slack for later tokens.
    3. A token arriving at ``t > d`` is late: it misses every deadline ``d, d + D, d + 2D, ...`` that is ``<= t``,
       that is ``1 + floor((t - d) / D)`` deadlines, all counted both as missed and in the total (the late token
       itself earns no met deadline).  Slack is lost: the next deadline is reset to ``t + D``, relative to the
       late token's actual arrival.
    4. ``fluidity = 1 - missed / total``.  If ``expected_tokens`` is given (a failed or truncated request), each
       token that never arrived adds one missed deadline.

    Worked example (arrival 0, D_p = 1.0, D = 0.5; tokens at 0.5, 1.25, 2.75, 3.25, 3.5):

    =====  ========  ==========  ============================================  ==============
    token  arrives   deadline    verdict                                       next deadline
    =====  ========  ==========  ============================================  ==============
    1      0.50      1.00        on time, banks 0.5 s of slack                 1.50
    2      1.25      1.50        on time: the 0.75 s gap is covered by slack   2.00
    3      2.75      2.00        late, skips 2.00 and 2.50: 2 misses           3.25 (reset)
    4      3.25      3.25        on time (without the reset it would be late)  3.75
    5      3.50      3.75        on time                                       4.25
    =====  ========  ==========  ============================================  ==============

    total = 1 + 1 + 2 + 1 + 1 = 6 deadlines, missed = 2, fluidity = 1 - 2/6 = 0.667.
    """
    if ttft_deadline_s < 0 or tbt_deadline_s <= 0:
        raise ValueError(
            f"need ttft_deadline_s >= 0 and tbt_deadline_s > 0, got {ttft_deadline_s}, {tbt_deadline_s}"
        )
    missed = total = 0
    deadline = scheduled_s + ttft_deadline_s
    for t in token_times:
        if t <= deadline + _EPS:
            total += 1
            deadline += tbt_deadline_s
        else:
            skipped = 1 + math.floor((t - deadline) / tbt_deadline_s + _EPS)
            missed += skipped
            total += skipped
            deadline = t + tbt_deadline_s
    if expected_tokens is not None and expected_tokens > len(token_times):
        lost = expected_tokens - len(token_times)
        missed += lost
        total += lost
    return Fluidity(missed, total)


@dataclass(frozen=True)
class RequestMetrics:
    """Metrics of one request; latency fields are None when no token arrived."""

    index: int
    ok: bool
    error: str | None
    prompt_len: int
    n_tokens: int
    ttft_s: float | None
    tbt_s: tuple[float, ...]
    tpot_s: float | None
    e2e_s: float | None
    normalized_latency_s: float | None
    scheduling_delay_s: float | None
    fluidity: Fluidity | None


TtftDeadline = float | Callable[[int], float]
"""A TTFT deadline in seconds, or a function of the prompt length (predicted prefill time + slack)."""


def request_metrics(
    record: RequestRecord,
    *,
    ttft_deadline_s: TtftDeadline | None = None,
    tbt_deadline_s: float | None = None,
    require_full_output: bool = True,
) -> RequestMetrics:
    """Compute one request's metrics; fluidity only when both deadlines are given.

    With ``require_full_output`` a request that received fewer than ``output_len`` tokens counts as failed
    (output lengths are forced in benchmarks, so a short stream means a truncated or broken request).
    """
    times = list(record.token_times)
    if any(b < a for a, b in zip(times, times[1:], strict=False)):
        raise ValueError(f"request {record.index}: token times are not non-decreasing")
    n = len(times)
    ok, error = record.ok, record.error
    if ok and n == 0:
        ok, error = False, "no tokens received"
    elif ok and require_full_output and n < record.output_len:
        ok, error = False, f"short output: {n} of {record.output_len} tokens"

    a = record.scheduled_s
    ttft = times[0] - a if n else None
    tbt = tuple(float(y - x) for x, y in zip(times, times[1:], strict=False))
    tpot = ((times[-1] - times[0]) / (n - 1) if n > 1 else 0.0) if n else None
    e2e = times[-1] - a if n else None
    sched = record.sent_s - a if record.sent_s is not None else None

    flu: Fluidity | None = None
    if ttft_deadline_s is not None and tbt_deadline_s is not None:
        d_p = ttft_deadline_s(record.prompt_len) if callable(ttft_deadline_s) else ttft_deadline_s
        expected = max(record.output_len, 1) if not ok else None
        flu = fluidity(a, times, d_p, tbt_deadline_s, expected_tokens=expected)

    return RequestMetrics(
        index=record.index,
        ok=ok,
        error=error,
        prompt_len=record.prompt_len,
        n_tokens=n,
        ttft_s=ttft,
        tbt_s=tbt,
        tpot_s=tpot,
        e2e_s=e2e,
        normalized_latency_s=e2e / n if e2e is not None else None,
        scheduling_delay_s=sched,
        fluidity=flu,
    )


@dataclass(frozen=True)
class SLO:
    """Per-request service-level objective: TTFT and TPOT bounds, optionally a minimum fluidity-index."""

    ttft_s: float
    tpot_s: float
    min_fluidity: float | None = None

    def meets(self, m: RequestMetrics) -> bool:
        """True when the request succeeded and met every bound (a missing fluidity fails a fluidity bound)."""
        if not m.ok or m.ttft_s is None or m.tpot_s is None:
            return False
        if m.ttft_s > self.ttft_s or m.tpot_s > self.tpot_s:
            return False
        if self.min_fluidity is not None:
            return m.fluidity is not None and m.fluidity.index >= self.min_fluidity
        return True


def compute_metrics(
    records: Iterable[RequestRecord],
    slo: SLO | None = None,
    *,
    ttft_deadline_s: TtftDeadline | None = None,
    tbt_deadline_s: float | None = None,
    require_full_output: bool = True,
) -> list[RequestMetrics]:
    """Metrics for every record.  Fluidity deadlines default to the SLO's TTFT and TPOT bounds."""
    if slo is not None:
        ttft_deadline_s = slo.ttft_s if ttft_deadline_s is None else ttft_deadline_s
        tbt_deadline_s = slo.tpot_s if tbt_deadline_s is None else tbt_deadline_s
    return [
        request_metrics(
            r,
            ttft_deadline_s=ttft_deadline_s,
            tbt_deadline_s=tbt_deadline_s,
            require_full_output=require_full_output,
        )
        for r in records
    ]


def attainment(metrics: Sequence[RequestMetrics], slo: SLO) -> float:
    """Share of requests meeting the SLO (failures count as misses); 0.0 for no requests."""
    return sum(slo.meets(m) for m in metrics) / len(metrics) if metrics else 0.0


def stats(values: Iterable[float], percentiles: Sequence[int] = PERCENTILES) -> dict[str, float | int | None]:
    """``n``, ``mean``, ``min``, ``max`` and ``p<q>`` (numpy linear interpolation); None fields when empty."""
    arr = np.asarray(list(values), dtype=np.float64)
    out: dict[str, float | int | None] = {"n": int(arr.size)}
    if arr.size == 0:
        out.update({"mean": None, "min": None, "max": None, **{f"p{q}": None for q in percentiles}})
        return out
    out.update({"mean": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max())})
    for q, v in zip(percentiles, np.percentile(arr, list(percentiles), method="linear"), strict=True):
        out[f"p{q}"] = float(v)
    return out


def summarize(metrics: Sequence[RequestMetrics], slo: SLO) -> dict[str, Any]:
    """One JSON-ready summary: counts, attainment (joint and per bound), latency stats of successful requests.

    ``tbt_s`` pools every gap of every successful request; ``scheduling_delay_s`` covers every request that
    recorded a send time; ``fluidity`` covers every request with deadlines (failed ones included).
    """
    good = [m for m in metrics if m.ok]
    flu = [m.fluidity for m in metrics if m.fluidity is not None]
    return {
        "n_requests": len(metrics),
        "n_ok": len(good),
        "n_failed": len(metrics) - len(good),
        "errors": _error_counts(metrics),
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "min_fluidity": slo.min_fluidity},
        "attainment": attainment(metrics, slo),
        "attainment_ttft": _share(
            metrics, lambda m: m.ok and m.ttft_s is not None and m.ttft_s <= slo.ttft_s
        ),
        "attainment_tpot": _share(
            metrics, lambda m: m.ok and m.tpot_s is not None and m.tpot_s <= slo.tpot_s
        ),
        "ttft_s": stats(m.ttft_s for m in good if m.ttft_s is not None),
        "tpot_s": stats(m.tpot_s for m in good if m.tpot_s is not None),
        "tbt_s": stats(g for m in good for g in m.tbt_s),
        "e2e_s": stats(m.e2e_s for m in good if m.e2e_s is not None),
        "normalized_latency_s": stats(
            m.normalized_latency_s for m in good if m.normalized_latency_s is not None
        ),
        "scheduling_delay_s": stats(
            m.scheduling_delay_s for m in metrics if m.scheduling_delay_s is not None
        ),
        "fluidity": stats(f.index for f in flu),
        "fluidity_deadlines": {"missed": sum(f.missed for f in flu), "total": sum(f.total for f in flu)},
    }


def summarize_records(
    records: Sequence[RequestRecord],
    slo: SLO,
    *,
    ttft_deadline_s: TtftDeadline | None = None,
    tbt_deadline_s: float | None = None,
    require_full_output: bool = True,
    start_s: float = 0.0,
) -> dict[str, Any]:
    """:func:`compute_metrics` + :func:`summarize` + :func:`run_window` in one call (what a load run reports)."""
    metrics = compute_metrics(
        records,
        slo,
        ttft_deadline_s=ttft_deadline_s,
        tbt_deadline_s=tbt_deadline_s,
        require_full_output=require_full_output,
    )
    return {**summarize(metrics, slo), **run_window(records, start_s)}


def run_window(records: Sequence[RequestRecord], start_s: float = 0.0) -> dict[str, float | None]:
    """Duration from ``start_s`` to the last token, and request / output-token throughputs over it."""
    last = max((r.token_times[-1] for r in records if r.token_times), default=None)
    if last is None or last <= start_s:
        return {"duration_s": None, "request_throughput": None, "output_token_throughput": None}
    dur = last - start_s
    done = sum(1 for r in records if r.ok and r.token_times)
    tokens = sum(len(r.token_times) for r in records)
    return {"duration_s": dur, "request_throughput": done / dur, "output_token_throughput": tokens / dur}


def _share(metrics: Sequence[RequestMetrics], pred: Callable[[RequestMetrics], bool]) -> float:
    return sum(bool(pred(m)) for m in metrics) / len(metrics) if metrics else 0.0


def _error_counts(metrics: Sequence[RequestMetrics]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in metrics:
        if not m.ok:
            key = (m.error or "unknown").split(":")[0]
            counts[key] = counts.get(key, 0) + 1
    return counts
