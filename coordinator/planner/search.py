"""The search: the plan with the highest goodput per device (DistServe's Algorithm 1/2, cost-based).

1. Candidate layouts per phase: every TP the profile measured x PP in (1, 2, 4, 8), one instance inside one
   node, its weights (and, for decode, one longest request's KV) fitting the devices' memory.
2. Per-phase goodput of one instance of each layout (simulated alone: prefill with an ideal decode, scored
   on TTFT; decode with an ideal prefill, scored on TPOT), by bisection on the Poisson rate.
3. Units of m prefill + n decode instances (the M:N ratio), estimated at min(m * g_p, n * g_d); the best
   `top_units` by estimated goodput per device go on.
4. Each of those units in each placement the topology allows - the whole unit inside one node (KV over the
   intra-node links) or its phases on two nodes (KV over the inter-node link) - with the fastest admissible
   codec chosen per KV link (kv_transfer.choice: pipelined hand-off time at the link's bandwidth), then
   simulated whole (both SLOs, transfers included) and bisected for its goodput. The best per device wins.
   So where the inter-node bandwidth is high both placements score alike; where it is low only units that
   keep KV in a node meet the SLOs; in between a compressing codec on the link can decide.
5. The unit is replicated: as many as the topology holds (no rate), or enough for `rate`. The whole plan
   is simulated once at that rate for its predicted attainment.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from coordinator.planner.latency import Coeffs, Layout, LayoutLatency, Profile
from coordinator.planner.model import ModelSpec
from coordinator.planner.plan import KVLink, Placement, Plan, Predicted
from coordinator.planner.simulator import (
    DecodeInstance,
    Link,
    LocalPrefill,
    PrefillInstance,
    Request,
    simulate,
)
from coordinator.planner.topology import GB, GIB, Device, Topology
from kv_transfer.choice import DEFAULT_PROFILES, CodecProfile

PP_CHOICES = (1, 2, 4, 8)
_IDEAL = LayoutLatency(Layout(1, 1), Coeffs(0, 0, 0), Coeffs(0, 0, 0), Coeffs(0, 0, 0))


class PlanError(ValueError):
    """No plan meets the inputs (nothing fits, or the SLOs cannot be met at any rate)."""


@dataclass(frozen=True)
class SearchInput:
    model: ModelSpec
    profile: Profile
    topology: Topology
    slo_ttft_s: float
    slo_tpot_s: float
    samples: tuple[tuple[int, int], ...]  # (prompt tokens, output tokens) length samples
    attainment: float = 0.9
    rate: float | None = None  # plan instance counts for this rate (req/s); None: max goodput per device
    codecs: tuple[CodecProfile, ...] = DEFAULT_PROFILES
    max_kl: float = 0.01  # quality floor for lossy codecs (nats/token), as the cluster's --max-kl
    n_requests: int = 200  # simulated requests per rate probe
    seed: int = 0
    memory_fraction: float = 0.9  # of device memory usable for weights + KV
    block_tokens: int = 16
    prefill_max_batch_tokens: int = 1 << 30  # also a decode instance's local prefill pass
    # the gateway's local prefill (--local-prefill busy) in whole-unit simulations; None: off
    local_prefill: LocalPrefill | None = None
    top_units: int = 4
    max_unit_instances: int = 8  # per phase in one unit
    pp_choices: tuple[int, ...] = PP_CHOICES
    rel_tol: float = 0.03  # goodput bisection stops at this relative bracket
    # evaluate this unit only: (prefill layout, decode layout, prefill instances, decode instances)
    fixed_unit: tuple[Layout, Layout, int, int] | None = None
    fixed_units: int | None = None  # replicate the unit this many times (with `rate`: predict that load)


@dataclass(frozen=True)
class _Unit:
    p: LayoutLatency
    d: LayoutLatency
    m: int
    n: int
    estimate: float  # req/s

    @property
    def devices(self) -> int:
        return self.m * self.p.layout.devices + self.n * self.d.layout.devices


@dataclass
class _Ctx:
    """The probe workload: unit-mean Poisson gaps and length draws, extended on demand, shared by every rate
    (common random numbers). A probe at rate r simulates enough requests that the steady state dominates:
    a request meeting its SLOs lives at most TTFT + output x TPOT seconds, so at most r x that many are in the
    system at once (Little); we simulate `warm_factor` times that many, at least `n_requests`."""

    inp: SearchInput
    rng: random.Random
    gaps: list[float] = field(default_factory=list)
    lengths: list[tuple[int, int]] = field(default_factory=list)
    sims: int = 0
    warm_factor: float = 2.0
    max_requests: int = 4_000

    def __post_init__(self) -> None:
        self._grow(self.inp.n_requests)
        self.mean_output = sum(o for _, o in self.lengths) / len(self.lengths)

    def _grow(self, n: int) -> None:
        while len(self.gaps) < n:
            self.gaps.append(self.rng.expovariate(1.0))
            self.lengths.append(self.inp.samples[self.rng.randrange(len(self.inp.samples))])

    def count(self, rate: float) -> int:
        life = self.inp.slo_ttft_s + self.mean_output * self.inp.slo_tpot_s
        return max(self.inp.n_requests, min(self.max_requests, math.ceil(self.warm_factor * rate * life)))

    def requests(self, rate: float, prefill_only: bool = False) -> list[Request]:
        n = self.count(rate)
        self._grow(n)
        out, t = [], 0.0
        for g, (p, o) in zip(self.gaps[:n], self.lengths[:n], strict=True):
            out.append(Request(t, p, 1 if prefill_only else o))
            t += g / rate
        return out


def max_rate(attain: Callable[[float], float], target: float, guess: float, rel_tol: float) -> float:
    """The highest rate with attain(rate) >= target, by bracketing from `guess` (x2 / /2) and geometric
    bisection to `rel_tol`; 0 if even guess / 2^12 fails."""
    lo, hi = 0.0, 0.0
    r = guess
    if attain(r) >= target:
        lo = r
        for _ in range(20):
            r *= 2
            if attain(r) < target:
                hi = r
                break
            lo = r
        else:
            return lo
    else:
        hi = r
        for _ in range(12):
            r /= 2
            if attain(r) >= target:
                lo = r
                break
            hi = r
        else:
            return 0.0
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if attain(mid) >= target else (lo, mid)
    return lo


def kv_capacity_tokens(inp: SearchInput, layout: Layout, memory_gib: float) -> int:
    """KV tokens one instance holds: its devices' usable memory minus its weights, over bytes per token."""
    free = layout.devices * memory_gib * GIB * inp.memory_fraction - inp.model.weight_bytes
    return max(0, int(free // inp.model.kv_bytes_per_token))


def _layouts(inp: SearchInput, decode: bool) -> list[LayoutLatency]:
    node_devices = max(n.devices for n in inp.topology.nodes)
    memory = min(n.device_memory_gib for n in inp.topology.nodes)
    longest = max(p + o for p, o in inp.samples)
    out = []
    for tp in inp.profile.tps():
        for pp in inp.pp_choices:
            layout = Layout(tp, pp)
            if layout.devices > node_devices or inp.model.layers % pp:
                continue
            cap = kv_capacity_tokens(inp, layout, memory)
            if cap < (longest if decode else max(p for p, _ in inp.samples)):
                continue
            out.append(inp.profile.latency(layout))
    if inp.fixed_unit is not None:
        want = inp.fixed_unit[1] if decode else inp.fixed_unit[0]
        out = [lat for lat in out if lat.layout == want] or [inp.profile.latency(want)]
    return out


def _phase_goodput(ctx: _Ctx, lat: LayoutLatency, decode: bool) -> float:
    inp = ctx.inp
    memory = min(n.device_memory_gib for n in inp.topology.nodes)
    mean_p = sum(p for p, _ in ctx.lengths) / len(ctx.lengths)
    mean_o = ctx.mean_output
    free_link = [[Link(0.0)]]
    if decode:
        cap = kv_capacity_tokens(inp, lat.layout, memory)
        pre = [PrefillInstance(_IDEAL)]
        dec = [DecodeInstance(lat, cap, inp.block_tokens)]
        batch = max(1, min(cap // max(1, int(mean_p + mean_o)), 512))
        guess = lat.layout.pp * batch / max(1.0, mean_o) / lat.decode_s(batch, batch * (mean_p + mean_o / 2))

        def attain(rate: float) -> float:
            ctx.sims += 1
            res = simulate(ctx.requests(rate), pre, dec, free_link)
            return sum(1 for t in res.tpot_s if t <= inp.slo_tpot_s) / len(res.tpot_s)
    else:
        pre = [PrefillInstance(lat, inp.prefill_max_batch_tokens)]
        dec = [DecodeInstance(_IDEAL, 1 << 40)]
        guess = lat.layout.pp / max(1e-9, lat.prefill_s(mean_p, mean_p * mean_p))

        def attain(rate: float) -> float:
            ctx.sims += 1
            res = simulate(ctx.requests(rate, prefill_only=True), pre, dec, free_link)
            return sum(1 for t in res.ttft_s if t <= inp.slo_ttft_s) / len(res.ttft_s)

    return max_rate(attain, inp.attainment, guess, 0.05)


def _link(
    inp: SearchInput, src: Sequence[Device], dst: Sequence[Device], mean_prompt: float
) -> tuple[Link, float]:
    """The KV link between two instances: (its simulator Link, GB/s). Rank i sends to rank i; within a node
    the pairs move in parallel (one link each), across nodes they share the node's network bandwidth."""
    pairs = list(zip(src, dst, strict=False))
    bw = min(inp.topology.gbytes_per_s(a, b) for a, b in pairs)
    if all(a.node == b.node for a, b in pairs):
        bw *= len(pairs)
    raw = mean_prompt * inp.model.kv_bytes_per_token
    admissible = [c for c in inp.codecs if c.kl_mean <= inp.max_kl] or list(inp.codecs[:1])
    best = min(admissible, key=lambda c: (c.handoff_s(raw, bw * GB, inp.model.layers), c.kl_mean))
    return Link(best.handoff_s(raw, bw * GB, inp.model.layers) / mean_prompt, best.name), bw


def _place_unit(
    unit: _Unit, free: dict[str, list[int]], intra: bool
) -> tuple[list[tuple[str, list[int]]], list[tuple[str, list[int]]]] | None:
    """Devices for the unit's m prefill and n decode instances (taken from `free`), or None. intra: all in
    one node; else prefill instances on one node, decode on another."""
    dp, dd = unit.p.layout.devices, unit.d.layout.devices
    need_p, need_d = unit.m * dp, unit.n * dd
    nodes = sorted(free, key=lambda k: (len(free[k]), k))  # best fit: the fullest node that holds it
    if intra:
        for name in nodes:
            if len(free[name]) >= need_p + need_d:
                devs = free[name]
                ps = [(name, devs[i * dp : (i + 1) * dp]) for i in range(unit.m)]
                ds = [(name, devs[need_p + i * dd : need_p + (i + 1) * dd]) for i in range(unit.n)]
                free[name] = devs[need_p + need_d :]
                return ps, ds
        return None
    for a in nodes:
        for b in nodes:
            if a != b and len(free[a]) >= need_p and len(free[b]) >= need_d:
                ps = [(a, free[a][i * dp : (i + 1) * dp]) for i in range(unit.m)]
                ds = [(b, free[b][i * dd : (i + 1) * dd]) for i in range(unit.n)]
                free[a], free[b] = free[a][need_p:], free[b][need_d:]
                return ps, ds
    return None


@dataclass(frozen=True)
class _Layout:
    """Instances on devices and the links between them: the input of one simulation."""

    prefill: list[tuple[str, list[int]]]
    decode: list[tuple[str, list[int]]]
    pairs: list[tuple[int, int]]  # (prefill index, decode index) linked


def _sim_inputs(
    inp: SearchInput, unit: _Unit, lay: _Layout, mean_prompt: float
) -> tuple[list[PrefillInstance], list[DecodeInstance], list[list[Link | None]], list[KVLink]]:
    memory = min(n.device_memory_gib for n in inp.topology.nodes)
    pre = [PrefillInstance(unit.p, inp.prefill_max_batch_tokens) for _ in lay.prefill]
    cap = kv_capacity_tokens(inp, unit.d.layout, memory)
    dec = [DecodeInstance(unit.d, cap, inp.block_tokens, inp.prefill_max_batch_tokens) for _ in lay.decode]
    links: list[list[Link | None]] = [[None] * len(dec) for _ in pre]
    kv: list[KVLink] = []
    for i, j in lay.pairs:
        (pn, pdv), (dn, ddv) = lay.prefill[i], lay.decode[j]
        link, bw = _link(inp, [Device(pn, x) for x in pdv], [Device(dn, x) for x in ddv], mean_prompt)
        links[i][j] = link
        kv.append(KVLink(f"prefill-{i}", f"decode-{j}", bw, link.codec))
    return pre, dec, links, kv


def _unit_pairs(units: int, m: int, n: int) -> list[tuple[int, int]]:
    return [(u * m + i, u * n + j) for u in range(units) for i in range(m) for j in range(n)]


def search(inp: SearchInput) -> Plan:
    t0 = time.perf_counter()
    if not inp.samples:
        raise PlanError("the workload has no length samples")
    ctx = _Ctx(inp, random.Random(inp.seed))
    mean_prompt = sum(p for p, _ in ctx.lengths) / len(ctx.lengths)
    total = inp.topology.num_devices
    notes = []

    pre = [(lat, _phase_goodput(ctx, lat, decode=False)) for lat in _layouts(inp, decode=False)]
    dec = [(lat, _phase_goodput(ctx, lat, decode=True)) for lat in _layouts(inp, decode=True)]
    pre = [(lat, g) for lat, g in pre if g > 0]
    dec = [(lat, g) for lat, g in dec if g > 0]
    if not pre or not dec:
        raise PlanError(
            f"no {'prefill' if not pre else 'decode'} layout meets its SLO at any rate (or fits memory)"
        )

    units = []
    for p, gp in pre:
        for d, gd in dec:
            counts = [
                (m, n)
                for m in range(1, inp.max_unit_instances + 1)
                for n in range(1, inp.max_unit_instances + 1)
            ]
            if inp.fixed_unit is not None:
                counts = [(inp.fixed_unit[2], inp.fixed_unit[3])]
            for m, n in counts:
                u = _Unit(p, d, m, n, min(m * gp, n * gd))
                if u.devices <= total:
                    units.append(u)
    if not units:
        raise PlanError(f"no unit of one prefill and one decode instance fits {total} devices")
    units.sort(key=lambda u: (-u.estimate / u.devices, u.devices))
    # the best estimates, at most one per layout pair with the fewest devices
    seen, shortlist = set(), []
    for u in units:
        key = (u.p.layout, u.d.layout, u.m * 1000 // u.n)
        if key not in seen:
            seen.add(key)
            shortlist.append(u)
        if len(shortlist) >= inp.top_units:
            break

    best: tuple[float, _Unit, bool, float] | None = None  # (per-device goodput, unit, intra, goodput)
    for u in shortlist:
        for intra in (True, False):
            free = {n.name: list(range(n.devices)) for n in inp.topology.nodes}
            placed = _place_unit(u, free, intra)
            if placed is None:
                continue
            lay = _Layout(placed[0], placed[1], _unit_pairs(1, u.m, u.n))
            sp, sd, links, _ = _sim_inputs(inp, u, lay, mean_prompt)

            def attain(rate: float, sp=sp, sd=sd, links=links) -> float:
                ctx.sims += 1
                return simulate(ctx.requests(rate), sp, sd, links, inp.local_prefill).attainment(
                    inp.slo_ttft_s, inp.slo_tpot_s
                )

            g = max_rate(attain, inp.attainment, u.estimate, inp.rel_tol)
            score = g / u.devices
            if g > 0 and (best is None or score > best[0] * (1 + 1e-9)):
                best = (score, u, intra, g)
    if best is None:
        raise PlanError("no unit meets both SLOs at any rate once KV transfer is counted")
    _, unit, intra, unit_goodput = best

    # replicate the unit
    free = {n.name: list(range(n.devices)) for n in inp.topology.nodes}
    want = math.inf if inp.rate is None else max(1, math.ceil(inp.rate / unit_goodput - 1e-9))
    if inp.fixed_units is not None:
        want = inp.fixed_units
    placed_p: list[tuple[str, list[int]]] = []
    placed_d: list[tuple[str, list[int]]] = []
    count = 0
    while count < want:
        got = _place_unit(unit, free, intra)
        if got is None:
            got = _place_unit(unit, free, not intra)
            if got is not None:
                notes.append(
                    f"unit {count} placed {'across nodes' if intra else 'inside a node'}, unlike the unit searched"
                )
        if got is None:
            break
        placed_p += got[0]
        placed_d += got[1]
        count += 1
    if count < want and want != math.inf:
        raise PlanError(
            f"rate {inp.rate} req/s needs {want} units of {unit.devices} devices; the topology holds {count}"
        )
    lay = _Layout(placed_p, placed_d, _unit_pairs(count, unit.m, unit.n))
    sp, sd, links, kv = _sim_inputs(inp, unit, lay, mean_prompt)
    goodput = count * unit_goodput
    rate = inp.rate if inp.rate is not None else goodput
    full_ctx = _Ctx(inp, random.Random(inp.seed + 1))  # an independent draw: not the one searched on
    att = simulate(full_ctx.requests(rate), sp, sd, links, inp.local_prefill).attainment(
        inp.slo_ttft_s, inp.slo_tpot_s
    )
    used = count * unit.devices
    notes.append(f"{ctx.sims + 1} simulations of >= {inp.n_requests} requests")
    placement = tuple(
        Placement(f"{phase}-{i}", phase, node, tuple(devs))
        for phase, group in (("prefill", placed_p), ("decode", placed_d))
        for i, (node, devs) in enumerate(group)
    )
    return Plan(
        unit.p.layout,
        unit.d.layout,
        placement,
        tuple(kv),
        Predicted(goodput, goodput / used, att, rate),
        time.perf_counter() - t0,
        (unit.m, unit.n),
        count,
        tuple(notes),
    )
