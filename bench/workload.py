"""Seeded open-loop workloads: when each benchmark request arrives, and how long its prompt and output are.

A :class:`Workload` is a frozen description (arrival process, rate, length distributions, seed);
:func:`make_requests` turns it into the exact list of :class:`BenchRequest` every compared system receives.

Reproducibility rules (so that systems and rates are compared on the *same* requests):

* Each random component (inter-arrival gaps, prompt lengths, output lengths, prompt offsets) draws from its
  own stream derived from ``seed``, so changing one distribution never reshuffles the others.
* Inter-arrival gaps are drawn at unit mean and divided by ``rate``: the schedule at rate ``2r`` is the schedule
  at rate ``r`` compressed by 2, with identical lengths and prompts (common random numbers for goodput bisection).
* ``poisson`` is implemented as ``gamma`` with CV = 1, so the two give byte-identical schedules.
* The first request is scheduled at offset 0; request ``i+1`` follows request ``i`` by one gap.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

ArrivalKind = Literal["poisson", "gamma", "trace"]

# Independent random streams derived from the workload seed.
_STREAM_ARRIVALS = 0
_STREAM_PROMPT_LEN = 1
_STREAM_OUTPUT_LEN = 2
_STREAM_OFFSETS = 3


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


# ---------------------------------------------------------------------------------------------------------------
# Length distributions
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fixed:
    """Every request gets exactly ``n`` tokens."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"Fixed length must be >= 1, got {self.n}")

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return np.full(size, self.n, dtype=np.int64)


@dataclass(frozen=True)
class Uniform:
    """Integer lengths uniform on the closed range ``[lo, hi]``."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.hi:
            raise ValueError(f"Uniform needs 1 <= lo <= hi, got [{self.lo}, {self.hi}]")

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return rng.integers(self.lo, self.hi, size=size, endpoint=True, dtype=np.int64)


@dataclass(frozen=True)
class LogNormal:
    """``round(exp(N(ln median, sigma)))`` clipped to ``[min_len, max_len]`` (the median is kept unless clipped)."""

    median: float
    sigma: float
    min_len: int = 1
    max_len: int = 1 << 20

    def __post_init__(self) -> None:
        if self.median <= 0 or self.sigma < 0:
            raise ValueError(f"LogNormal needs median > 0 and sigma >= 0, got {self.median}, {self.sigma}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"LogNormal needs 1 <= min_len <= max_len, got [{self.min_len}, {self.max_len}]")

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        x = rng.lognormal(mean=math.log(self.median), sigma=self.sigma, size=size)
        return np.clip(np.rint(x), self.min_len, self.max_len).astype(np.int64)


LengthDist = Fixed | Uniform | LogNormal


def parse_length_dist(spec: str) -> LengthDist:
    """Parse a CLI spec: ``fixed:N``, ``uniform:LO,HI`` or ``lognormal:MEDIAN,SIGMA[,MIN,MAX]``."""
    kind, _, args = spec.partition(":")
    parts = [p for p in args.split(",") if p.strip()]
    try:
        if kind == "fixed" and len(parts) == 1:
            return Fixed(int(parts[0]))
        if kind == "uniform" and len(parts) == 2:
            return Uniform(int(parts[0]), int(parts[1]))
        if kind == "lognormal" and len(parts) in (2, 4):
            extra = (int(parts[2]), int(parts[3])) if len(parts) == 4 else ()
            return LogNormal(float(parts[0]), float(parts[1]), *extra)
    except ValueError as e:
        raise ValueError(f"bad length distribution {spec!r}: {e}") from e
    raise ValueError(
        f"bad length distribution {spec!r}; use fixed:N, uniform:LO,HI or lognormal:MED,SIGMA[,MIN,MAX]"
    )


# ---------------------------------------------------------------------------------------------------------------
# CSV traces
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    """Rows of a CSV trace with columns ``prompt_len,output_len[,arrival_s]`` (arrival in seconds from start)."""

    prompt_lens: tuple[int, ...]
    output_lens: tuple[int, ...]
    arrival_s: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return len(self.prompt_lens)


def load_trace(path: str | Path) -> Trace:
    """Read a CSV trace (header required); lengths must be >= 1 and arrivals non-decreasing."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or ())
        if not {"prompt_len", "output_len"} <= cols:
            raise ValueError(
                f"{path}: trace needs columns prompt_len,output_len[,arrival_s]; got {sorted(cols)}"
            )
        has_arrival = "arrival_s" in cols
        prompts: list[int] = []
        outputs: list[int] = []
        arrivals: list[float] = []
        for line, row in enumerate(reader, start=2):
            p, o = int(row["prompt_len"]), int(row["output_len"])
            if p < 1 or o < 1:
                raise ValueError(f"{path}:{line}: lengths must be >= 1, got prompt_len={p} output_len={o}")
            prompts.append(p)
            outputs.append(o)
            if has_arrival:
                arrivals.append(float(row["arrival_s"]))
    if not prompts:
        raise ValueError(f"{path}: trace has no rows")
    if has_arrival and any(b < a for a, b in zip(arrivals, arrivals[1:], strict=False)):
        raise ValueError(f"{path}: arrival_s must be non-decreasing")
    return Trace(tuple(prompts), tuple(outputs), tuple(arrivals) if has_arrival else None)


# ---------------------------------------------------------------------------------------------------------------
# Workload and requests
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A seeded open-loop workload.

    ``arrival``: ``poisson`` (rate ``rate``), ``gamma`` (rate ``rate``, coefficient of variation ``cv``;
    CV = 1 is Poisson, CV > 1 burstier) or ``trace`` (the trace's ``arrival_s`` column verbatim; ``rate`` unused).
    With ``trace`` set, prompt and output lengths come from the trace rows in order (wrapping around) and
    ``prompt``/``output`` are ignored.
    """

    name: str
    n_requests: int
    rate: float
    arrival: ArrivalKind = "poisson"
    cv: float = 1.0
    prompt: LengthDist = field(default_factory=lambda: Fixed(128))
    output: LengthDist = field(default_factory=lambda: Fixed(64))
    seed: int = 0
    trace: Trace | None = None

    def __post_init__(self) -> None:
        if self.n_requests < 1:
            raise ValueError(f"n_requests must be >= 1, got {self.n_requests}")
        if self.arrival not in ("poisson", "gamma", "trace"):
            raise ValueError(f"unknown arrival kind {self.arrival!r}")
        if self.arrival != "trace" and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a positive finite number, got {self.rate}")
        if not self.cv > 0:
            raise ValueError(f"cv must be > 0, got {self.cv}")
        if self.arrival == "trace":
            if self.trace is None or self.trace.arrival_s is None:
                raise ValueError("arrival='trace' needs a trace with an arrival_s column")
            if self.n_requests > len(self.trace):
                raise ValueError(
                    f"arrival='trace' replays at most {len(self.trace)} requests, asked {self.n_requests}"
                )

    def with_rate(self, rate: float) -> Workload:
        """The same workload (same seed, lengths, prompts) at another request rate."""
        return replace(self, rate=rate)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (a trace is summarised by its size)."""
        d = asdict(self)
        d["prompt"] = {"kind": type(self.prompt).__name__.lower(), **asdict(self.prompt)}
        d["output"] = {"kind": type(self.output).__name__.lower(), **asdict(self.output)}
        d["trace"] = None if self.trace is None else {"rows": len(self.trace)}
        return d


@dataclass(frozen=True)
class BenchRequest:
    """One request of a run: send at ``start + scheduled_s``, with these prompt ids, forcing ``output_len`` tokens."""

    index: int
    scheduled_s: float
    prompt_ids: tuple[int, ...]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


def arrival_offsets(workload: Workload) -> np.ndarray:
    """Scheduled send offsets in seconds from the run start (first at 0 unless a trace says otherwise)."""
    n = workload.n_requests
    if workload.arrival == "trace":
        assert workload.trace is not None and workload.trace.arrival_s is not None
        return np.asarray(workload.trace.arrival_s[:n], dtype=np.float64)
    cv = 1.0 if workload.arrival == "poisson" else workload.cv
    shape = 1.0 / (cv * cv)
    # Unit-mean gaps (mean = shape * scale = 1, CV = 1/sqrt(shape)), then scaled to the requested rate.
    gaps = _rng(workload.seed, _STREAM_ARRIVALS).gamma(shape, 1.0 / shape, size=n) / workload.rate
    return np.concatenate(([0.0], np.cumsum(gaps[:-1])))


def request_lengths(workload: Workload) -> tuple[np.ndarray, np.ndarray]:
    """(prompt lengths, output lengths) for every request, each >= 1."""
    n = workload.n_requests
    if workload.trace is not None:
        rows = np.arange(n) % len(workload.trace)
        return (
            np.asarray(workload.trace.prompt_lens, dtype=np.int64)[rows],
            np.asarray(workload.trace.output_lens, dtype=np.int64)[rows],
        )
    return (
        workload.prompt.sample(_rng(workload.seed, _STREAM_PROMPT_LEN), n),
        workload.output.sample(_rng(workload.seed, _STREAM_OUTPUT_LEN), n),
    )


def _coprime_stride(n: int) -> int:
    """A stride near n/phi that is coprime to n, so ``i * stride % n`` visits every offset once."""
    if n <= 2:
        return 1
    s = max(1, round(n * 0.6180339887498949))
    while math.gcd(s, n) != 1:
        s += 1
    return s


def prompt_offsets(workload: Workload, source_len: int) -> np.ndarray:
    """Start offset of each request's prompt in the source: a seeded start, then a golden-ratio stride.

    Offsets are pairwise distinct for the first ``source_len`` requests (no accidental shared prefixes).
    """
    if source_len < 1:
        raise ValueError("prompt_source is empty")
    start = int(_rng(workload.seed, _STREAM_OFFSETS).integers(0, source_len))
    stride = _coprime_stride(source_len)
    return (start + np.arange(workload.n_requests, dtype=np.int64) * stride) % source_len


def make_requests(workload: Workload, prompt_source: list[int] | np.ndarray) -> list[BenchRequest]:
    """The full, deterministic request list of ``workload``; prompts are cut from ``prompt_source`` (wrapping)."""
    source = np.asarray(prompt_source, dtype=np.int64)
    if source.ndim != 1:
        raise ValueError("prompt_source must be a flat list of token ids")
    offsets = prompt_offsets(workload, len(source))
    times = arrival_offsets(workload)
    prompt_lens, output_lens = request_lengths(workload)
    out: list[BenchRequest] = []
    for i in range(workload.n_requests):
        ids = np.take(source, np.arange(offsets[i], offsets[i] + prompt_lens[i]), mode="wrap")
        out.append(BenchRequest(i, float(times[i]), tuple(int(t) for t in ids), int(output_lens[i])))
    return out


def make_seeded_requests(
    workload: Workload, prompt_source: list[int] | np.ndarray, seeds: list[int]
) -> tuple[list[BenchRequest], list[int]]:
    """The schedules of ``workload`` under each of ``seeds``, one after another in one run, and the seed of
    each request. Seed ``i``'s first request arrives one mean gap (1 / rate) after seed ``i-1``'s last, so the
    whole run is one open-loop stream at ``rate``; indexes are renumbered 0, 1, ... in that order.

    A goodput probe of several short seeded schedules scores each seed's requests apart (the spread over
    seeds) and pools them (the headline): a burst drawn by one seed then moves a third of the pooled
    attainment at three seeds, not all of it."""
    if not seeds:
        raise ValueError("need at least one seed")
    if workload.arrival == "trace":
        raise ValueError("a trace has one schedule: seeds do not apply")
    out: list[BenchRequest] = []
    seed_of: list[int] = []
    start = 0.0
    for seed in seeds:
        reqs = make_requests(replace(workload, seed=seed), prompt_source)
        for r in reqs:
            out.append(replace(r, index=len(out), scheduled_s=start + r.scheduled_s))
            seed_of.append(seed)
        start = out[-1].scheduled_s + 1.0 / workload.rate
    return out, seed_of
