"""A discrete-event simulation of one plan: prefill instances, KV links, decode instances. Seconds throughout.

What it models (as pdserve runs, see coordinator/router.py):
* Arrivals: given times (Poisson or a trace, made by the caller).
* Prefill routing: the instance with the fewest requests queued or running (ties rotate). Each instance
  batches its FIFO queue up to `max_batch_tokens` prompt tokens (the first prompt always), runs the batch in
  `latency.prefill_s`; a PP instance starts the next batch once the first stage is free (t / pp later).
  The first token comes out of prefill: TTFT = prefill end - arrival + the layout's `path_s` (the serving
  path's latency outside the instance: gateway, gRPC).
* Decode routing at prefill end: among the decode instances the plan links to this prefill instance, the one
  with the most KV tokens free after what it has reserved (each request reserves prompt + output tokens,
  rounded up to blocks, until it finishes), as pdserve's router does under coordinator --plan.
* KV transfer: prompt tokens x the link's seconds per token (the codec's pipelined hand-off time on the
  bandwidth between the two instances' devices: `Link`), FIFO per (prefill, decode) pair.
* Decode: continuous batching; a request joins at a step boundary when its whole reservation fits the
  instance's KV capacity and fewer than `max_running` requests are admitted there (never preempted). A PP
  instance runs `pp` micro-batches (lanes) in flight, each a step of latency.decode_s. TPOT = (finish - first token) / (output - 1), so it includes the transfer and
  the wait for admission.
* Local prefill (the gateway's conditional disaggregation, `LocalPrefill`, coordinator/config.py): a prompt of
  at most `max_tokens` tokens that arrives while every prefill instance has `depth` or more requests in
  flight, and fewer local prefills are pending than there are decode instances, goes to the decode instance
  with the most KV tokens free (reserving as above) and is prefilled there: once admitted, each step of its
  lane is one prefill pass over the admitted local prompts (FIFO up to the instance's `max_batch_tokens`,
  the first always) and then the decode step of the sequences already running, so the running sequences
  stall for the pass (decode_service/engine.py). Its first token comes at the end of the pass (TTFT adds
  the decode instance's `path_s`); it decodes from the next step on. A prompt prefilled on a prefill
  instance counts in flight there until `hold_s` after its pass (the gateway hears of it that late).
* SLO attainment: the share of requests meeting BOTH the TTFT and the TPOT SLO (DistServe's simulator
  counts the two percentiles separately); a request that can never fit a decode instance misses.
Not modelled: prefill-side KV memory, link sharing between pairs on one NIC, preemption, stragglers.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.planner.latency import LayoutLatency


@dataclass(frozen=True)
class Request:
    arrival_s: float
    prompt: int  # tokens
    output: int  # tokens, >= 1 (the first comes from prefill)


@dataclass(frozen=True)
class Stretch:
    """How many times longer than its latency model an instance's work took, per time window: the window
    starting at `starts[i]` (seconds, the arrivals' clock; increasing) runs `factors[i]` (>= 1) times slower,
    until the next window starts; before the first, the first factor holds. A batch or step is stretched by
    the factor of the window it starts in. Measured per window of a run (bench.cpu.window_stretches), so
    contention that comes and goes within a run is not averaged into one factor."""

    starts: tuple[float, ...]
    factors: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.starts or len(self.starts) != len(self.factors):
            raise ValueError("a Stretch needs one factor per window start, at least one")
        if any(b <= a for a, b in zip(self.starts, self.starts[1:], strict=False)):
            raise ValueError("Stretch window starts must increase")

    def at(self, t: float) -> float:
        return self.factors[max(0, bisect.bisect_right(self.starts, t) - 1)]

    def shifted(self, dt: float) -> Stretch:
        """The same windows on a clock `dt` seconds later (window i starts at starts[i] + dt)."""
        return Stretch(tuple(x + dt for x in self.starts), self.factors)


@dataclass(frozen=True)
class PrefillInstance:
    latency: LayoutLatency
    max_batch_tokens: int = 1 << 30
    stretch: Stretch | None = None  # per-window slow-down of its batches (None: the latency model as is)


@dataclass(frozen=True)
class DecodeInstance:
    latency: LayoutLatency
    kv_capacity_tokens: int
    block_tokens: int = 16
    max_batch_tokens: int = 1 << 30  # prompt tokens per local prefill pass (the first always goes)
    max_running: int = 1 << 30  # requests admitted and not finished (the instance's --max-running)
    stretch: Stretch | None = None  # per-window slow-down of its steps and local prefill passes


@dataclass(frozen=True)
class LocalPrefill:
    """The gateway's `--local-prefill busy` policy (coordinator/config.py's defaults)."""

    max_tokens: int = 128  # longest prompt prefilled on a decode instance
    depth: int = 2  # requests in flight on every prefill instance before a prompt goes local
    # Seconds a prompt still counts in flight on its prefill instance after its pass ended: the gateway
    # counts it until the instance's done event reaches it (gRPC both ways, the instance's event loop waiting
    # for its core), which the pass alone does not take. Calibrated (bench planner), 0 by default.
    hold_s: float = 0.0


@dataclass(frozen=True)
class Link:
    s_per_token: float  # hand-off seconds per prompt token (codec and bandwidth folded in)
    codec: str = "raw"


@dataclass(frozen=True)
class SimResult:
    ttft_s: tuple[float, ...]  # per request, in request order (inf: never served)
    tpot_s: tuple[float, ...]
    decode_batch_max: int  # the largest decode batch any lane ran
    local_prefills: int = 0  # requests prefilled on a decode instance (LocalPrefill)
    # seconds each instance spent running (prefill batches; decode steps and local prefill passes): the
    # CPU time a contention-free model predicts, to compare with an instance's measured CPU time
    prefill_busy_s: tuple[float, ...] = ()
    decode_busy_s: tuple[float, ...] = ()
    # per decode instance: decode steps run (a step with running sequences; a pass alone is none) and the
    # seconds of decode_busy_s spent in local prefill passes
    decode_steps: tuple[int, ...] = ()
    decode_pass_busy_s: tuple[float, ...] = ()

    def attainment(self, ttft_slo_s: float, tpot_slo_s: float) -> float:
        ok = sum(
            1 for a, b in zip(self.ttft_s, self.tpot_s, strict=True) if a <= ttft_slo_s and b <= tpot_slo_s
        )
        return ok / len(self.ttft_s)


_ARRIVE, _PREFILL_FREE, _PREFILL_DONE, _KV_READY, _LANE, _FIRST, _HELD = range(7)


class _Lane:
    """One decode micro-batch: running requests, their context sum, finish steps, and the local prefills
    admitted to it (`local`) and in the pass of its current step (`in_pass`, first tokens at `pass_end`)."""

    __slots__ = ("step", "batch", "sum_ctx", "finish", "busy", "local", "in_pass", "pass_end")

    def __init__(self) -> None:
        self.step = 0  # steps completed
        self.batch = 0
        self.sum_ctx = 0  # tokens attended over by the next step, all running requests
        self.finish: list[tuple[int, int]] = []  # heap of (step at which it finishes, request index)
        self.busy = False
        self.local: deque[int] = deque()
        self.in_pass: list[int] = []
        self.pass_end = 0.0


def simulate(
    requests: list[Request],
    prefill: list[PrefillInstance],
    decode: list[DecodeInstance],
    links: Sequence[Sequence[Link | None]],  # [prefill index][decode index]; None: the plan has no such link
    local_prefill: LocalPrefill | None = None,  # None: every prompt goes to a prefill instance
) -> SimResult:
    n = len(requests)
    ttft = [math.inf] * n
    tpot = [math.inf] * n
    first_token = [0.0] * n
    events: list[tuple[float, int, int, int, int]] = []  # (time, seq, kind, a, b)
    seq = 0

    def push(t: float, kind: int, a: int, b: int = 0) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, a, b))

    for i, r in enumerate(requests):
        push(r.arrival_s, _ARRIVE, i)

    hold_s = local_prefill.hold_s if local_prefill is not None else 0.0
    # prefill state
    p_queue: list[deque[int]] = [deque() for _ in prefill]
    p_inflight = [0] * len(prefill)
    p_free = [True] * len(prefill)
    p_batches: dict[int, list[int]] = {}
    p_of = [0] * n
    p_busy = [0.0] * len(prefill)
    turn = 0
    # decode state
    d_reserved = [0] * len(decode)  # tokens reserved by requests routed there, not finished
    d_used = [0] * len(decode)  # tokens of admitted requests
    d_count = [0] * len(decode)  # admitted requests, not finished (max_running)
    d_wait: list[deque[int]] = [deque() for _ in decode]
    d_busy = [0.0] * len(decode)
    d_steps = [0] * len(decode)
    d_pass_busy = [0.0] * len(decode)
    lanes = [[_Lane() for _ in range(d.latency.layout.pp)] for d in decode]
    link_free = [[0.0] * len(decode) for _ in prefill]
    need = [0] * n
    batch_max = 0
    is_local = [False] * n
    local_pending = 0  # local prefills routed whose first token has not come
    local_count = 0

    def reservation(i: int, d: DecodeInstance) -> int:
        r = requests[i]
        return -(-(r.prompt + r.output) // d.block_tokens) * d.block_tokens

    def start_prefill(p: int, now: float) -> None:
        q, inst = p_queue[p], prefill[p]
        batch = [q.popleft()]
        tokens = requests[batch[0]].prompt
        while q and tokens + requests[q[0]].prompt <= inst.max_batch_tokens:
            tokens += requests[q[0]].prompt
            batch.append(q.popleft())
        lens = [requests[i].prompt for i in batch]
        t = inst.latency.prefill_s(sum(lens), sum(x * x for x in lens))
        p_busy[p] += t
        if inst.stretch is not None:
            t *= inst.stretch.at(now)
        p_free[p] = False
        p_batches[batch[0]] = batch
        push(now + t / inst.latency.layout.pp, _PREFILL_FREE, p)
        push(now + t, _PREFILL_DONE, p, batch[0])

    def admit(d: int, lane: _Lane) -> None:
        """Waiting requests of instance d join `lane` while their reservations fit (FIFO, no overtaking)."""
        w, cap = d_wait[d], decode[d].kv_capacity_tokens
        while w and d_used[d] + need[w[0]] <= cap and d_count[d] < decode[d].max_running:
            i = w.popleft()
            d_used[d] += need[i]
            d_count[d] += 1
            if is_local[i]:
                lane.local.append(i)
                continue
            r = requests[i]
            lane.batch += 1
            lane.sum_ctx += r.prompt + 1
            heapq.heappush(lane.finish, (lane.step + r.output - 1, i))

    def run_lane(d: int, li: int, now: float) -> None:
        """Run lane li of instance d from `now` until it has nothing to do or the next global event is due;
        then (if it still has work) schedule its next step end (and a pass's first tokens) as events."""
        nonlocal batch_max
        lane, inst = lanes[d][li], decode[d]
        lat = inst.latency
        horizon = events[0][0] if events else math.inf
        t = now
        while True:
            if lane.batch == 0 and not lane.local:
                admit(d, lane)
                if lane.batch == 0 and not lane.local:
                    lane.busy = False
                    return
            batch_max = max(batch_max, lane.batch)
            lane.in_pass = []
            tokens = 0
            while lane.local and (
                not lane.in_pass or tokens + requests[lane.local[0]].prompt <= inst.max_batch_tokens
            ):
                i = lane.local.popleft()
                lane.in_pass.append(i)
                tokens += requests[i].prompt
            lens = [requests[i].prompt for i in lane.in_pass]
            pass_s = lat.prefill_s(sum(lens), sum(x * x for x in lens)) if lens else 0.0
            step_s = lat.decode_s(lane.batch, lane.sum_ctx) if lane.batch else 0.0
            d_busy[d] += pass_s + step_s
            d_pass_busy[d] += pass_s
            d_steps[d] += 1 if lane.batch else 0
            k = inst.stretch.at(t) if inst.stretch is not None else 1.0
            lane.pass_end = t + k * pass_s
            t_end = lane.pass_end + k * step_s
            if t_end > horizon:
                lane.busy = True
                if lane.in_pass:
                    push(lane.pass_end, _FIRST, d, li)
                push(t_end, _LANE, d, li)
                return
            _first_tokens(d, lane)
            _end_step(d, lane, t_end)
            t = t_end
            admit(d, lane)

    def _first_tokens(d: int, lane: _Lane) -> None:
        """The local prefills of the lane's current pass emit their first token (at `pass_end`)."""
        nonlocal local_pending
        for i in lane.in_pass:
            first_token[i] = lane.pass_end
            ttft[i] = lane.pass_end - requests[i].arrival_s + decode[d].latency.path_s
            local_pending -= 1

    def _finish_step(d: int, lane: _Lane, t_end: float) -> None:
        lane.step += 1
        lane.sum_ctx += lane.batch
        while lane.finish and lane.finish[0][0] <= lane.step:
            _, i = heapq.heappop(lane.finish)
            r = requests[i]
            lane.batch -= 1
            lane.sum_ctx -= r.prompt + r.output  # its context at its last step was prompt + output - 1, +1
            d_used[d] -= need[i]
            d_count[d] -= 1
            d_reserved[d] -= need[i]
            tpot[i] = (t_end - first_token[i]) / (r.output - 1)

    def _end_step(d: int, lane: _Lane, t_end: float) -> None:
        """A step ended: the running sequences' bookkeeping, then the pass's local prefills join the batch
        (a one-token request is done)."""
        _finish_step(d, lane, t_end)
        for i in lane.in_pass:
            r = requests[i]
            if r.output <= 1:
                tpot[i] = 0.0
                d_used[d] -= need[i]
                d_count[d] -= 1
                d_reserved[d] -= need[i]
                continue
            lane.batch += 1
            lane.sum_ctx += r.prompt + 1
            heapq.heappush(lane.finish, (lane.step + r.output - 1, i))
        lane.in_pass = []

    def most_free(cands: list[int]) -> int:
        return max(cands, key=lambda j: (decode[j].kv_capacity_tokens - d_reserved[j], -j))

    def goes_local(r: Request) -> bool:
        lp = local_prefill
        return (
            lp is not None
            and bool(decode)
            and r.prompt <= lp.max_tokens
            and all(x >= lp.depth for x in p_inflight)
            and local_pending < len(decode)
        )

    def wake_decode(d: int, now: float) -> None:
        for li, lane in enumerate(lanes[d]):
            if not d_wait[d]:
                return
            if not lane.busy:
                run_lane(d, li, now)

    while events:
        now, _, kind, a, b = heapq.heappop(events)
        if kind == _ARRIVE:
            if goes_local(requests[a]):
                d = most_free(list(range(len(decode))))
                need[a] = reservation(a, decode[d])
                if need[a] > decode[d].kv_capacity_tokens:
                    continue  # can never run: misses its SLO
                is_local[a] = True
                local_pending += 1
                local_count += 1
                d_reserved[d] += need[a]
                d_wait[d].append(a)
                wake_decode(d, now)
                continue
            k = len(prefill)
            p = min(range(k), key=lambda j: (p_inflight[j], (j - turn) % k))
            turn += 1
            p_of[a] = p
            p_inflight[p] += 1
            p_queue[p].append(a)
            if p_free[p]:
                start_prefill(p, now)
        elif kind == _PREFILL_FREE:
            p_free[a] = True
            if p_queue[a]:
                start_prefill(a, now)
        elif kind == _PREFILL_DONE:
            for i in p_batches.pop(b):
                if hold_s > 0:
                    push(now + hold_s, _HELD, a)
                else:
                    p_inflight[a] -= 1
                first_token[i] = now
                ttft[i] = now - requests[i].arrival_s + prefill[a].latency.path_s
                r = requests[i]
                if r.output <= 1:
                    tpot[i] = 0.0
                    continue
                linked = [j for j in range(len(decode)) if links[a][j] is not None]
                d = most_free(linked)
                need[i] = reservation(i, decode[d])
                if need[i] > decode[d].kv_capacity_tokens:
                    continue  # can never run: misses its SLO (tpot stays inf)
                d_reserved[d] += need[i]
                link = links[a][d]
                assert link is not None
                start = max(now, link_free[a][d])
                link_free[a][d] = start + r.prompt * link.s_per_token
                push(link_free[a][d], _KV_READY, i, d)
        elif kind == _KV_READY:
            d_wait[b].append(a)
            wake_decode(b, now)
        elif kind == _HELD:  # the gateway heard that a prompt of prefill instance a is done
            p_inflight[a] -= 1
        elif kind == _FIRST:  # the local prefill pass of lane b of instance a ended
            _first_tokens(a, lanes[a][b])
        else:  # _LANE: a step of lane b of instance a ended
            lane = lanes[a][b]
            _end_step(a, lane, now)
            admit(a, lane)
            lane.busy = False
            run_lane(a, b, now)
    return SimResult(
        tuple(ttft),
        tuple(tpot),
        batch_max,
        local_count,
        tuple(p_busy),
        tuple(d_busy),
        tuple(d_steps),
        tuple(d_pass_busy),
    )


def poisson_arrivals(n: int, rate: float, gaps: list[float]) -> list[float]:
    """Arrival times from unit-mean gaps scaled to `rate` (first at 0): common random numbers across rates."""
    out, t = [], 0.0
    for g in gaps[:n]:
        out.append(t)
        t += g / rate
    return out
