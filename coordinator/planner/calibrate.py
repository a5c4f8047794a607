"""Calibrate an engine-only latency model to the serving path, from two runs through a 1P1D cluster.

`pdserve profile` times the engine's forward passes alone. A request through the cluster also pays the
gateway, two gRPC streams, the KV hand-off and the step loop's bookkeeping, on cores shared with the
gateway, Redis and the load generator. Some of that is latency (it delays a request but does not occupy an
instance), some is capacity (it occupies the instance's core, so it queues the requests behind it). One
isolated run cannot tell the two apart; a burst can: latency adds the same to every request, capacity adds
up along the queue. So four terms, all in seconds:

* `path_s`: TTFT latency outside the prefill instance (LayoutLatency.path_s).
* `prefill_per_request_s`: prefill-instance time per request beyond its forward pass (receiving it, keeping
  and serving its KV); charged per prompt token at the workload's mean prompt (`apply`).
* `step_s`, `step_per_seq_s`: decode-instance time per step, and per running sequence per step, beyond the
  forward pass (streaming each token, joining pulled sequences).

The isolated run fixes each pair's sum (at batch 1 both are paid once): path_s + prefill_per_request_s =
isolated TTFT - engine prefill, step_s + step_per_seq_s = isolated TPOT - engine step. The burst fixes the
split: bisect the capacity share until the simulator, run on the burst's own arrivals and lengths,
reproduces its mean TTFT (prefill) and then its mean TPOT (decode). No term is fitted to the runs it is
later judged on.

Other work on the same cores (this host is shared) makes a run's instances wait for a core: a run's
`prefill_stretch` / `decode_stretch` is (time on a CPU + time runnable but waiting for one) / time on a
CPU of that instance's threads over the run (Linux schedstat, measured by the caller), so the instance's
work took that many times longer than on a core of its own. `pdserve profile` times with the process's CPU
clock, which the waiting does not stretch; so the model is calibrated contention-free, each calibration
run simulated with its own stretches, and a prediction for a run uses that run's (`stretched`).

The decode model itself is refitted before these terms on the decode steps the cluster's decode instance
counted, by batch size (`step_model`: its step thread's CPU per step, bookkeeping included, as its Stats
RPC returns it), so the profile gives only its cost per context token and, unless the counted steps jump
elsewhere, the pieces' split.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from coordinator.planner.latency import Coeffs, LayoutLatency
from coordinator.planner.simulator import (
    DecodeInstance,
    Link,
    LocalPrefill,
    PrefillInstance,
    Request,
    Stretch,
    simulate,
)


@dataclass(frozen=True)
class Observed:
    """One run through the serving path: what was sent, and the means measured at the client."""

    requests: tuple[Request, ...]  # arrival_s from the first request's, prompt and output tokens
    ttft_s: float  # mean over the run's requests
    tpot_s: float  # mean over requests with more than one output token
    # (run + run-queue wait) / run time of the prefill instance's step thread, >= 1: over the run, or per
    # time window (Stretch, on the requests' clock)
    prefill_stretch: float | Stretch = 1.0
    decode_stretch: float | Stretch = 1.0


def stretched(lat: LayoutLatency, prefill: float, decode: float) -> LayoutLatency:
    """`lat` with its prefill times (and path latency) `prefill` times longer and its decode times `decode`
    times longer: the model of a run whose instances waited that much for a core."""
    p = lat.scaled(prefill)
    return replace(lat.scaled(decode), prefill=p.prefill, pp_hop_s=p.pp_hop_s, path_s=p.path_s)


def mean_factor(k: float | Stretch) -> float:
    """A stretch as one factor: itself, or its windows' mean."""
    return statistics.fmean(k.factors) if isinstance(k, Stretch) else k


def cpu_scale(
    lat: LayoutLatency,
    isolated: Sequence[Request],
    prefill_cpu_s: float,
    decode_cpu_s: float,
    kv_capacity_tokens: int,
    max_batch_tokens: int,
) -> tuple[float, float]:
    """(prefill, decode): CPU seconds the instances' step threads measured over an isolated run (schedstat:
    time on a CPU, waits excluded) / the busy seconds `lat` gives the same requests contention-free. Isolated
    requests meet an empty cluster, so the model's work is known without its queueing: one prefill pass and
    output - 1 steps of batch 1 each. The profile is another process's CPU clock, taken at another moment on
    a shared host (a busy sibling core slows every instruction, and the clock counts that) and without the
    step loop's own work; this ratio puts the engine model on the cluster's step threads as they ran."""
    pre, dec = one_by_one(lat, 1.0, 1.0, kv_capacity_tokens, max_batch_tokens)
    res = simulate(list(isolated), pre, dec, [[Link(0.0)]])
    if res.prefill_busy_s[0] <= 0 or res.decode_busy_s[0] <= 0 or prefill_cpu_s <= 0 or decode_cpu_s <= 0:
        raise ValueError("cpu_scale needs an isolated run with work on both instances")
    return prefill_cpu_s / res.prefill_busy_s[0], decode_cpu_s / res.decode_busy_s[0]


@dataclass(frozen=True)
class DecodeCpu:
    """The decode step thread's CPU per step in the cluster as a function of the engine model's step:
    cpu = scale * model step + per_step_s (seconds). The profile times the engine alone in another process;
    the step loop adds work per step that does not grow with the batch (scheduling, the token events'
    bookkeeping), and the profile's CPU clock may be inflated or not by what ran beside it. One factor
    measured at batch 1 (`cpu_scale`) charges that per-step work to every sequence of a large batch too,
    and carries the batch-1 measurement's noise to every batch size (runs here: the isolated run's ratio
    1.11 where the burst's was 0.97, and 1.01 where it was 1.12); two runs pin the map at batch 1 and at
    the burst's batches, leaving only the shape beyond those to the profile."""

    scale: float
    per_step_s: float

    def apply(self, lat: LayoutLatency) -> LayoutLatency:
        """`lat` with its decode steps mapped (prefill, including local prefill passes, as it is)."""

        def m(c: Coeffs) -> Coeffs:
            return Coeffs(c.a * self.scale + self.per_step_s, c.b * self.scale, c.c * self.scale)

        return replace(lat, decode_small=m(lat.decode_small), decode_large=m(lat.decode_large))

    def to_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "per_step_ms": self.per_step_s * 1e3}


def fit_decode_cpu(runs: Sequence[tuple[float, int, float]]) -> DecodeCpu:
    """Runs: (the model's seconds of decode steps, its number of steps, the CPU seconds the step thread
    measured on them). Least squares (weighted by steps) of CPU per step = scale * model seconds per step +
    per_step_s, with per_step_s >= 0 (where the unconstrained fit has it negative, or scale <= 0:
    per_step_s = 0 and the scale through the origin). Two runs of different mean batch (an isolated run at
    batch 1, a burst) fix both exactly."""
    pts = [
        (busy / steps, cpu / steps, steps) for busy, steps, cpu in runs if steps > 0 and busy > 0 and cpu > 0
    ]
    if not pts:
        raise ValueError("fit_decode_cpu needs a run with decode steps and CPU time")
    per_step, scale = line_fit(pts)  # each point weighs its steps
    return DecodeCpu(scale, per_step) if scale > 0 else DecodeCpu(_through_origin(pts), 0.0)


def _through_origin(pts: Sequence[tuple[float, float, float]]) -> float:
    """The slope of y over x through the origin, least squares weighted by w, from (x, y, w) points."""
    return sum(w * x * y for x, y, w in pts) / max(1e-30, sum(w * x * x for x, _, w in pts))


def line_fit(pts: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    """(intercept, slope) >= 0 of y over x, least squares weighted by w, from (x, y, w) points; where the
    unconstrained fit has a negative term, that term is 0 and the other is refitted."""
    n = sum(w for _, _, w in pts)
    mx = sum(x * w for x, _, w in pts) / n
    my = sum(y * w for _, y, w in pts) / n
    sxx = sum(w * (x - mx) ** 2 for x, _, w in pts)
    if sxx > 1e-18 * n * max(1.0, mx * mx):
        slope = sum(w * (x - mx) * (y - my) for x, y, w in pts) / sxx
        if slope >= 0 and my - slope * mx >= 0:
            return my - slope * mx, slope
        if slope < 0:
            return max(0.0, my), 0.0
    return 0.0, max(0.0, _through_origin(pts))


def step_model(lat: LayoutLatency, rows: Iterable[tuple[int, int, int, float, float]]) -> LayoutLatency:
    """`lat` with its decode model refitted on the decode steps an instance counted (engine.step_loop.PassCpu,
    its Stats RPC): rows of (batch size, steps, their context tokens, CPU seconds, of which in the model
    call) over calibration runs. Each batch size is a point (its mean CPU per step), weighted by its steps;
    each piece of the model (batches below the split, and from it) keeps the profile's cost per
    context token and has its per-step and per-sequence terms fitted to the points in its range (least
    squares, both >= 0), so they hold the step loop's own work (scheduling, every token's bookkeeping) with
    the model call's. A piece with points at fewer than two batch sizes is the profile's, scaled by those
    points' CPU over its time. Why not the profile's shape: each of its points is timed once, at its own
    moment, on a shared host, and they sit 5-10 % off their neighbours, while a calibration burst that
    ramps its batch up to the sizes a run past the knee forms measures every size in one process within a
    second. Counted by the instance, nothing here is inferred from a simulation of the run, and the local
    prefill passes are counted apart.
    The split between the pieces is refitted too: of the splits right after every counted batch size with
    two counted sizes on each side, the one whose two pieces fit the points best (least squares, weighted by
    steps), where it has under half the squared error of `lat.threshold`'s. An engine's step can jump where
    a kernel changes: on CPU, past the 48 rows of the small-matmul kernel (engine.kernels) a step of 49
    sequences took 28 ms against 20 at 48 (2026-12-07), which a split at 16 spread over every large batch."""
    pts = [(b, n, ctx / n, cpu / n) for b, n, ctx, cpu, _ in rows if n > 0]
    if not pts:
        raise ValueError("step_model needs decode steps")

    def piece(c: Coeffs, ps: list[tuple[int, int, float, float]]) -> Coeffs:
        if len({b for b, *_ in ps}) >= 2:
            a, per_seq = line_fit([(b, y - c.b * ctx, n) for b, n, ctx, y in ps])
            return Coeffs(a, c.b, per_seq)
        if not ps:
            return c
        model = [c.a + c.b * ctx + c.c * b for b, _, ctx, _ in ps]
        k = sum(n * y for (_, n, _, y) in ps) / sum(n * m for (_, n, _, _), m in zip(ps, model, strict=True))
        return Coeffs(c.a * k, c.b * k, c.c * k)

    def split_at(threshold: int) -> tuple[float, LayoutLatency]:
        small = piece(lat.decode_small, [p for p in pts if p[0] < threshold])
        large = piece(lat.decode_large, [p for p in pts if p[0] >= threshold])
        fitted = replace(lat, decode_small=small, decode_large=large, threshold=threshold)
        return sum(n * (fitted.decode_s(b, ctx) - y) ** 2 for b, n, ctx, y in pts), fitted

    # Candidates: right after a counted size, with two counted sizes on each side (where in the gap the jump
    # is, the counts cannot tell; a kernel's limit is its last size). The profile's split stays unless one
    # at least halves the squared error, so noise moves no split.
    sizes = sorted({b for b, *_ in pts})
    kept = split_at(lat.threshold)
    best = min(
        (split_at(sizes[i - 1] + 1) for i in range(2, len(sizes) - 1)), key=lambda f: f[0], default=kept
    )
    return best[1] if best[0] < 0.5 * kept[0] else kept[1]


def decode_cpu(
    lat: LayoutLatency,
    runs: Sequence[tuple[Sequence[Request], float | Stretch, float | Stretch, float]],
    kv_capacity_tokens: int,
    max_batch_tokens: int,
    max_running: int = 1 << 30,
    local_prefill: LocalPrefill | None = None,
    iters: int = 3,
) -> DecodeCpu:
    """The DecodeCpu of a 1P1D cluster from runs through it: (requests, prefill and decode stretch, the
    decode step thread's CPU seconds over the run). Each run is simulated (its stretches, the cluster's
    local prefill policy) for its contention-free seconds of decode steps and its number of steps; the
    seconds of local prefill passes are taken out of the measured CPU as the model gives them. The batches
    a run forms depend on the step times, so the fit is repeated on the mapped model (`iters` times)."""
    cpu = DecodeCpu(1.0, 0.0)
    for _ in range(iters):
        pts = []
        for reqs, kp, kd, cpu_s in runs:
            pre, dec = one_by_one(cpu.apply(lat), kp, kd, kv_capacity_tokens, max_batch_tokens, max_running)
            res = simulate(list(reqs), pre, dec, [[Link(0.0)]], local_prefill)
            steps = res.decode_steps[0]
            model_s = (res.decode_busy_s[0] - res.decode_pass_busy_s[0] - cpu.per_step_s * steps) / cpu.scale
            pts.append((model_s, steps, cpu_s - res.decode_pass_busy_s[0]))
        cpu = fit_decode_cpu(pts)
    return cpu


CPU_MATCH_BOUNDS = (
    0.5,
    2.0,
)  # cpu_matched's factors stay in here (an unreachable CPU figure ends at a bound)


def cpu_matched(
    lat: LayoutLatency,
    requests: Sequence[Request],
    k_prefill: float | Stretch,
    k_decode: float | Stretch,
    prefill_cpu_s: float,
    decode_cpu_s: float,
    kv_capacity_tokens: int,
    max_batch_tokens: int,
    max_running: int = 1 << 30,
    local_prefill: LocalPrefill | None = None,
) -> tuple[LayoutLatency, float, float]:
    """(`lat` with its prefill and its decode times scaled, the two factors): the factors that make the
    simulator's contention-free busy seconds of a 1P1D run of `requests` (its times stretched by `k_prefill`
    / `k_decode`, as that run measured) equal the CPU seconds its instances' step threads measured on a CPU
    (schedstat: waits excluded). Other load on a shared host slows the instructions of a thread that has a
    core (shared caches and memory bandwidth, a busy sibling hyper-thread), and its CPU clock counts that;
    the stretch counts only the time it had no core. The busy seconds depend on the batches the simulated
    run forms (slower steps, bigger batches, fewer steps), so each factor is bisected in CPU_MATCH_BOUNDS
    (busy seconds grow with it), the decode's with the prefill's found, twice; the path latency outside the
    instances is left as it is."""
    if prefill_cpu_s <= 0 or decode_cpu_s <= 0:
        raise ValueError("cpu_matched needs a run with work on both instances")

    def busy(fp: float, fd: float) -> tuple[float, float]:
        pre, dec = one_by_one(
            stretched(lat, fp, fd), k_prefill, k_decode, kv_capacity_tokens, max_batch_tokens, max_running
        )
        res = simulate(list(requests), pre, dec, [[Link(0.0)]], local_prefill)
        return res.prefill_busy_s[0], res.decode_busy_s[0]

    def solve(f: Callable[[float], float], target: float) -> float:
        lo, hi = CPU_MATCH_BOUNDS
        if f(lo) >= target:
            return lo
        if f(hi) <= target:
            return hi
        for _ in range(20):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
        return (lo + hi) / 2

    factors = [1.0, 1.0]  # prefill, decode

    def prefill_busy(x: float) -> float:
        return busy(x, factors[1])[0]

    def decode_busy(x: float) -> float:
        return busy(factors[0], x)[1]

    for _ in range(2):
        factors[0] = solve(prefill_busy, prefill_cpu_s)
        factors[1] = solve(decode_busy, decode_cpu_s)
    fp, fd = factors
    return replace(stretched(lat, fp, fd), path_s=lat.path_s), fp, fd


def local_pass_scale(lat: LayoutLatency, passes: int, tokens: int, sum_sq: int, cpu_s: float) -> float:
    """The decode instance's prompt passes (local prefill) over what `lat`'s prefill model gives them, from
    what the instance counted (engine.step_loop.PassCpu: passes, prompt tokens, their sum of squares, the
    step thread's CPU seconds on them); 1.0 without passes. A decode instance's pass is charged the step
    thread's work since its previous step, and in the planner's steady calibration runs of 2026-12-07 it
    took 0.88-1.32x (mostly 1.08-1.27x) what the prefill model gives the same prompts."""
    p = lat.prefill
    model = passes * p.a + tokens * p.b + sum_sq * p.c
    return cpu_s / model if passes > 0 and model > 0 and cpu_s > 0 else 1.0


HOLD_MAX_S = 0.1  # local_hold's bound (a 1P1D gateway on loopback hears of a done pass well within it)


def local_hold(
    lat: LayoutLatency,
    requests: Sequence[Request],
    k_prefill: float | Stretch,
    k_decode: float | Stretch,
    kv_capacity_tokens: int,
    max_batch_tokens: int,
    max_running: int,
    local_prefill: LocalPrefill,
    local_prefills: int,
    local_pass: float = 1.0,
) -> float:
    """The `LocalPrefill.hold_s` at which the simulator sends as many of a 1P1D run's `requests` to local
    prefill as the run did (`local_prefills`, counted by its decode instance): the smallest hold in
    [0, HOLD_MAX_S] reaching that count (bisection; the count grows with the hold, as the prefill instance
    looks busy for longer). The gateway decides on the prompts it has not heard to be done, and hears late
    on a shared host (gRPC both ways, the instance's event loop waiting for its core): in the planner's
    fidelity runs the cluster prefilled 35-50 % more prompts locally than the simulator without a hold.
    `local_pass`: the decode instance's `local_pass_scale`."""
    pre, dec = one_by_one(
        lat, k_prefill, k_decode, kv_capacity_tokens, max_batch_tokens, max_running, local_pass
    )

    def count(hold_s: float) -> int:
        policy = replace(local_prefill, hold_s=hold_s)
        return simulate(list(requests), pre, dec, [[Link(0.0)]], policy).local_prefills

    lo, hi = 0.0, HOLD_MAX_S
    if count(lo) >= local_prefills:
        return lo
    if count(hi) < local_prefills:
        return hi
    for _ in range(16):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(mid) < local_prefills else (lo, mid)
    return hi


def one_by_one(
    lat: LayoutLatency,
    k_prefill: float | Stretch,
    k_decode: float | Stretch,
    kv_capacity_tokens: int,
    max_batch_tokens: int,
    max_running: int = 1 << 30,
    local_pass: float = 1.0,
) -> tuple[list[PrefillInstance], list[DecodeInstance]]:
    """A 1P1D cluster of `lat` instances whose runs waited `k_prefill` / `k_decode` times their CPU time for a
    core: one factor for the whole run, or one per time window (`Stretch`: each batch or step stretched by
    its window's; the path latency by the windows' mean). The decode instance's local prefill passes
    (simulator.LocalPrefill) run on the decode instance's core, so they stretch by `k_decode`, as its steps
    do, and take `local_pass` times the prefill model's time (measured: `local_pass_scale`); it admits at
    most `max_running` requests."""
    # one factor over the run is a Stretch of one window: the instances' busy seconds stay contention-free
    sp = k_prefill if isinstance(k_prefill, Stretch) else Stretch((0.0,), (k_prefill,))
    sd = k_decode if isinstance(k_decode, Stretch) else Stretch((0.0,), (k_decode,))
    p = lat.prefill
    on_decode = replace(lat, prefill=Coeffs(p.a * local_pass, p.b * local_pass, p.c * local_pass))
    dec = DecodeInstance(
        on_decode, kv_capacity_tokens, max_batch_tokens=max_batch_tokens, max_running=max_running, stretch=sd
    )
    # the path latency outside the instances stretches by the prefill's mean
    pre = replace(lat, path_s=lat.path_s * mean_factor(k_prefill))
    return [PrefillInstance(pre, max_batch_tokens, stretch=sp)], [dec]


@dataclass(frozen=True)
class ServingTerms:
    path_s: float
    prefill_per_request_s: float
    step_s: float
    step_per_seq_s: float
    residual: dict[str, float]  # simulated - measured on the burst, seconds (ttft, tpot): what is left

    def to_dict(self) -> dict[str, object]:
        return {
            "path_ms": self.path_s * 1e3,
            "prefill_per_request_ms": self.prefill_per_request_s * 1e3,
            "decode_per_step_ms": self.step_s * 1e3,
            "decode_per_seq_per_step_ms": self.step_per_seq_s * 1e3,
            "burst_residual_ms": {k: v * 1e3 for k, v in self.residual.items()},
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ServingTerms:
        """`to_dict`'s inverse (a recorded calibration, bench.planner_replay)."""
        return ServingTerms(
            d["path_ms"] / 1e3,
            d["prefill_per_request_ms"] / 1e3,
            d["decode_per_step_ms"] / 1e3,
            d["decode_per_seq_per_step_ms"] / 1e3,
            {k: v / 1e3 for k, v in d.get("burst_residual_ms", {}).items()},
        )


def apply(lat: LayoutLatency, terms: ServingTerms, mean_prompt: float) -> LayoutLatency:
    """`lat` with the serving path's terms: path latency on TTFT, the per-request prefill cost per prompt
    token (at `mean_prompt` tokens a request), the per-step and per-sequence decode costs."""
    p, ds, dl = lat.prefill, lat.decode_small, lat.decode_large
    per_token = terms.prefill_per_request_s / max(1.0, mean_prompt)
    return replace(
        lat,
        prefill=Coeffs(p.a, p.b + per_token, p.c),
        decode_small=Coeffs(ds.a + terms.step_s, ds.b, ds.c + terms.step_per_seq_s),
        decode_large=Coeffs(dl.a + terms.step_s, dl.b, dl.c + terms.step_per_seq_s),
        path_s=lat.path_s + terms.path_s,
    )


def _engine_excess(lat: LayoutLatency, iso: Observed) -> tuple[float, float]:
    """What the isolated run measured beyond the engine's forward passes, contention taken out: (TTFT,
    TPOT) seconds, >= 0."""
    reqs = iso.requests
    prefill = statistics.fmean(lat.prefill_s(r.prompt, r.prompt * r.prompt) for r in reqs)
    step = statistics.fmean(lat.decode_s(1, r.prompt + r.output / 2) for r in reqs)
    return (
        max(0.0, iso.ttft_s / mean_factor(iso.prefill_stretch) - prefill),
        max(0.0, iso.tpot_s / mean_factor(iso.decode_stretch) - step),
    )


def _bisect(f: Callable[[float], float], target: float, hi: float, iters: int = 30) -> float:
    """The x in [0, hi] with f(x) = target for f non-decreasing (an end of the range if none)."""
    lo = 0.0
    if f(lo) >= target:
        return lo
    if f(hi) <= target:
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


def calibrate(
    lat: LayoutLatency,
    isolated: Observed,
    burst: Observed,
    kv_capacity_tokens: int,
    max_batch_tokens: int,
    link_s_per_token: float = 0.0,
    local_prefill: LocalPrefill | None = None,
    max_running: int = 1 << 30,
    decode_terms: bool = True,
) -> ServingTerms:
    """The serving terms (module docstring) of a 1P1D cluster whose engines `lat` describes, its gateway
    prefilling short prompts on the decode instance as `local_prefill` says (None: never).
    `decode_terms=False`: no decode capacity terms, for a decode model fitted on the step thread's own CPU
    (`step_model`), which holds every per-step and per-sequence cost that thread pays; what a burst's TPOT
    shows beyond it is the wait for a core, which the stretch models. Bisected on top of such a model they
    counted it twice: in the planner's fidelity runs the simulated decode instance then ran 23 % fewer,
    larger steps than the instance counted at 1.0x its goodput (3,250 against 4,206), where without them it
    ran 4,058 and its busy seconds matched the counted CPU within 0.5 %."""
    ex_ttft, ex_tpot = _engine_excess(lat, isolated)
    reqs = list(burst.requests)
    mean_prompt = statistics.fmean(r.prompt for r in reqs)
    link = [[Link(link_s_per_token)]]

    def run(terms: ServingTerms) -> tuple[float, float]:
        pre, dec = one_by_one(
            apply(lat, terms, mean_prompt),
            burst.prefill_stretch,
            burst.decode_stretch,
            kv_capacity_tokens,
            max_batch_tokens,
            max_running,
        )
        res = simulate(reqs, pre, dec, link, local_prefill)
        tpots = [t for t, r in zip(res.tpot_s, reqs, strict=True) if r.output > 1]
        return statistics.fmean(res.ttft_s), statistics.fmean(tpots) if tpots else 0.0

    def prefill_terms(q: float) -> ServingTerms:
        return ServingTerms(max(0.0, ex_ttft - q), q, ex_tpot if decode_terms else 0.0, 0.0, {})

    # capacity beyond the isolated excess is allowed (the burst may show contention the idle path does not)
    q = _bisect(lambda x: run(prefill_terms(x))[0], burst.ttft_s, hi=4 * ex_ttft + 0.05)
    base = prefill_terms(q)

    def with_decode(u: float) -> ServingTerms:
        return replace(base, step_s=max(0.0, ex_tpot - u), step_per_seq_s=u)

    if decode_terms:
        u = _bisect(lambda x: run(with_decode(x))[1], burst.tpot_s, hi=4 * ex_tpot + 0.01)
        terms = with_decode(u)
    else:
        terms = base
    ttft, tpot = run(terms)
    return replace(terms, residual={"ttft": ttft - burst.ttft_s, "tpot": tpot - burst.tpot_s})


def observed(
    requests: Sequence[Request],
    ttfts: Sequence[float],
    tpots: Sequence[float],
    prefill_stretch: float | Stretch = 1.0,
    decode_stretch: float | Stretch = 1.0,
) -> Observed:
    """An Observed from per-request measurements (requests that failed left out by the caller)."""
    if not requests or not ttfts:
        raise ValueError("a calibration run needs at least one served request")
    t0 = min(r.arrival_s for r in requests)
    reqs = tuple(Request(r.arrival_s - t0, r.prompt, r.output) for r in requests)
    return Observed(
        reqs,
        statistics.fmean(ttfts),
        statistics.fmean(tpots) if tpots else 0.0,
        prefill_stretch.shifted(-t0) if isinstance(prefill_stretch, Stretch) else max(1.0, prefill_stretch),
        decode_stretch.shifted(-t0) if isinstance(decode_stretch, Stretch) else max(1.0, decode_stretch),
    )
