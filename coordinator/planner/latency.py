"""Latency models per layout (TP, PP), in seconds, and their least-squares fit.

Prefill of a batch of prompts of lengths l_i (DistServe, Appendix A):
    t = a + b * sum(l_i) + c * sum(l_i ** 2)
Decode step of a batch of B sequences whose contexts sum to C tokens:
    t = a + b * C + c * B
with a second set of coefficients from `threshold` sequences on (DistServe's small/large batch split;
`fit_decode_split` fits the two pieces from our own points: on a CPU core the step's cost per sequence falls
as the batch grows, so one line fitted on small batches over-predicts large ones, and the reverse).

Pipeline parallelism from a TP profile (DistServe's simulator rule, for layouts not measured): each of the
`pp` stages takes t / pp, plus `pp_hop_s` per stage for the activation hand-off on prefill; a PP instance
keeps `pp` batches in flight (prefill) or `pp` micro-batches (decode), see simulator.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

NO_THRESHOLD = 1 << 30


@dataclass(frozen=True)
class Coeffs:
    a: float  # seconds
    b: float  # seconds per token (sum of lengths / sum of contexts)
    c: float  # seconds per token^2 (prefill) or per sequence (decode)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1

    @property
    def devices(self) -> int:
        return self.tp * self.pp


@dataclass(frozen=True)
class LayoutLatency:
    """The latency model of one layout; `fit_error` = relative RMS error of the fit on its points."""

    layout: Layout
    prefill: Coeffs
    decode_small: Coeffs
    decode_large: Coeffs
    threshold: int = NO_THRESHOLD  # decode batches of >= threshold sequences use decode_large
    pp_hop_s: float = 0.001  # per pipeline stage, prefill only (DistServe's simulator: 1 ms)
    fit_error: dict[str, float] = field(default_factory=dict)
    # Seconds the serving path adds to every TTFT outside the instance (gateway, gRPC, the first token's
    # return): latency, not capacity; 0 for an engine-only profile (coordinator/planner/calibrate.py).
    path_s: float = 0.0

    def prefill_s(self, sum_len: float, sum_sq: float) -> float:
        """Seconds from start to finish of one prefill batch (all pp stages)."""
        p = self.prefill
        return max(0.0, p.a + p.b * sum_len + p.c * sum_sq)

    def decode_s(self, batch: int, sum_ctx: float) -> float:
        """Seconds of one decode step (one token for each of `batch` sequences) through all stages."""
        d = self.decode_small if batch < self.threshold else self.decode_large
        return max(1e-6, d.a + d.b * sum_ctx + d.c * batch)

    def with_pp(self, pp: int) -> LayoutLatency:
        """This TP layout split into `pp` stages: per-batch latency unchanged (stages in sequence, each t / pp)
        plus pp hops on prefill; throughput comes from the pp batches in flight (the simulator's job)."""
        if pp == self.layout.pp:
            return self
        if self.layout.pp != 1:
            raise ValueError("extrapolate PP from a PP=1 profile only")
        p = self.prefill
        return replace(
            self,
            layout=Layout(self.layout.tp, pp),
            prefill=Coeffs(p.a + pp * pp * self.pp_hop_s, p.b, p.c),  # pp stages of (t/pp + hop) each
            fit_error={**self.fit_error, "extrapolated_pp": float(pp)},
        )

    def scaled(self, k: float) -> LayoutLatency:
        """Every time `k` times longer (a core shared with other work: k = 1 / the share this instance gets)."""

        def mul(c: Coeffs) -> Coeffs:
            return Coeffs(c.a * k, c.b * k, c.c * k)

        return replace(
            self,
            prefill=mul(self.prefill),
            decode_small=mul(self.decode_small),
            decode_large=mul(self.decode_large),
            pp_hop_s=self.pp_hop_s * k,
            path_s=self.path_s * k,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "tp": self.layout.tp,
            "pp": self.layout.pp,
            "prefill": [self.prefill.a, self.prefill.b, self.prefill.c],
            "decode_small": [self.decode_small.a, self.decode_small.b, self.decode_small.c],
            "decode_large": [self.decode_large.a, self.decode_large.b, self.decode_large.c],
            "threshold": self.threshold,
            "pp_hop_s": self.pp_hop_s,
            "fit_error": dict(self.fit_error),
            "path_s": self.path_s,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> LayoutLatency:
        return LayoutLatency(
            Layout(int(d["tp"]), int(d["pp"])),
            Coeffs(*map(float, d["prefill"])),
            Coeffs(*map(float, d["decode_small"])),
            Coeffs(*map(float, d["decode_large"])),
            int(d.get("threshold", NO_THRESHOLD)),
            float(d.get("pp_hop_s", 0.001)),
            {k: float(v) for k, v in d.get("fit_error", {}).items()},
            float(d.get("path_s", 0.0)),
        )


@dataclass(frozen=True)
class Profile:
    """Latency models of one model on one device kind, per measured layout."""

    device: str
    model: str
    layouts: tuple[LayoutLatency, ...]
    source: str = ""

    def tps(self) -> tuple[int, ...]:
        return tuple(sorted({lat.layout.tp for lat in self.layouts if lat.layout.pp == 1}))

    def latency(self, layout: Layout) -> LayoutLatency:
        """The measured layout, else PP extrapolated from its TP's PP=1 entry. TP is never extrapolated:
        a TP the profile lacks is not a candidate (KeyError)."""
        for lat in self.layouts:
            if lat.layout == layout:
                return lat
        for lat in self.layouts:
            if lat.layout == Layout(layout.tp, 1):
                return lat.with_pp(layout.pp)
        raise KeyError(f"profile has no TP={layout.tp} layout (has TP {list(self.tps())})")


# ---- least squares on three coefficients (normal equations, Cramer's rule: no numpy) ------------------
def _det3(m: Sequence[Sequence[float]]) -> float:
    return (
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    )


def lstsq3(rows: Sequence[tuple[float, float, float]], y: Sequence[float]) -> tuple[float, float, float]:
    """argmin ||X w - y||^2 for X of three columns. Columns are scaled to unit norm first (conditioning);
    a singular system (e.g. every point the same batch size) solves the two-column problem with w[2] = 0."""
    if len(rows) != len(y) or not rows:
        raise ValueError("need as many targets as rows, at least one")
    scale = [math.sqrt(sum(r[j] ** 2 for r in rows)) or 1.0 for j in range(3)]
    xs = [[r[j] / scale[j] for j in range(3)] for r in rows]
    ata = [[sum(x[i] * x[j] for x in xs) for j in range(3)] for i in range(3)]
    aty = [sum(x[i] * t for x, t in zip(xs, y, strict=True)) for i in range(3)]
    det = _det3(ata)
    if abs(det) < 1e-12:
        det2 = ata[0][0] * ata[1][1] - ata[0][1] * ata[1][0]
        if abs(det2) < 1e-12:
            return (sum(y) / len(y), 0.0, 0.0)  # constant
        w0 = (aty[0] * ata[1][1] - ata[0][1] * aty[1]) / det2
        w1 = (ata[0][0] * aty[1] - aty[0] * ata[1][0]) / det2
        return (w0 / scale[0], w1 / scale[1], 0.0)
    w = []
    for k in range(3):
        m = [[aty[i] if j == k else ata[i][j] for j in range(3)] for i in range(3)]
        w.append(_det3(m) / det)
    return (w[0] / scale[0], w[1] / scale[1], w[2] / scale[2])


def rel_rms(pred: Sequence[float], y: Sequence[float]) -> float:
    """Root mean square of (pred - y) / y."""
    return math.sqrt(sum(((p - t) / t) ** 2 for p, t in zip(pred, y, strict=True)) / len(y))


def fit_prefill(points: Sequence[tuple[Sequence[int], float]]) -> tuple[Coeffs, float]:
    """Points: (prompt lengths of the batch, seconds). -> coefficients, relative RMS error."""
    rows = [(1.0, float(sum(ls)), float(sum(x * x for x in ls))) for ls, _ in points]
    y = [t for _, t in points]
    a, b, c = lstsq3(rows, y)
    return Coeffs(a, b, c), rel_rms([a + b * r[1] + c * r[2] for r in rows], y)


def fit_decode(points: Sequence[tuple[int, int, float]]) -> tuple[Coeffs, float]:
    """Points: (batch size, sum of contexts in tokens, seconds per step). -> coefficients, rel. RMS error."""
    rows = [(1.0, float(ctx), float(bs)) for bs, ctx, _ in points]
    y = [t for *_, t in points]
    a, b, c = lstsq3(rows, y)
    return Coeffs(a, b, c), rel_rms([a + b * r[1] + c * r[2] for r in rows], y)


def fit_decode_split(
    points: Sequence[tuple[int, int, float]], threshold: int
) -> tuple[Coeffs, Coeffs, float]:
    """Decode points fitted in two pieces: batches of at most `threshold` sequences (decode_small) and of at
    least `threshold` (decode_large; LayoutLatency uses it from `threshold` on, so both pieces share the
    points at `threshold`). -> (small, large, relative RMS error of the piecewise model on every point).
    Each piece needs three points of which not all share a batch size; with fewer large-batch points the
    large piece is the small one (one line)."""
    small_pts = [p for p in points if p[0] <= threshold]
    large_pts = [p for p in points if p[0] >= threshold]
    small, _ = fit_decode(small_pts)
    large = small
    if len(large_pts) >= 3 and len({p[0] for p in large_pts}) >= 2:
        large, _ = fit_decode(large_pts)
    pred = [(small if bs < threshold else large) for bs, _, _ in points]
    err = rel_rms(
        [c.a + c.b * ctx + c.c * bs for c, (bs, ctx, _) in zip(pred, points, strict=True)],
        [t for *_, t in points],
    )
    return small, large, err
