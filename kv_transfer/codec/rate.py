"""Rate control for transform coding (format v5): spend the quality floor, not a fixed level.

A level's calibrated steps are a bit budget at one prompt length; the share of a layer that goes to the
prompt's last tokens (coded `RECENT` times finer) and to side information grows as prompts get shorter, so a
fixed level that is ~6x smaller than fp16 at 1024 tokens is ~5x at 256 with KL far inside the floor. The
calibration (`calibration.rate`, `pdserve calibrate`) measures, on the model's held-out text, how size and
quality move with the prompt length for a grid of settings -- a scale on the plan's steps and the recent
tokens' refinement -- and writes them to `cachegen_rate.json` beside the model. Per frame the encoder then
takes the smallest setting the floor admits at that length (`choose_rate`, a pure function); the decoder
needs nothing (every frame carries its steps).

Admissible = measured mean per-token KL <= the floor (the request's `max_kv_kl`, or the context's: the
cluster's `--max-kl`) and top-1 agreement >= `MIN_TOP1`, and KL <= the guard the calibration recorded (the
KL of the setting that keeps greedy continuations as close as int8's does: KL alone, at the 0.01 floor,
would allow settings whose greedy agreement is far below int8's).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kv_transfer.errors import CodecError

RATE_FILE = "cachegen_rate.json"
_FORMAT = "pdserve-cachegen-rate/1"
MIN_TOP1 = 0.99  # teacher-forced top-1 agreement a chosen setting must have kept in calibration
DEFAULT_MAX_KL = 0.01  # the cluster's default floor (coordinator.config.max_kl), nats per token


@dataclass(frozen=True)
class RatePoint:
    """One calibrated setting at one prompt length: steps = plan * scale, the last tokens' steps / recent;
    bits per K/V element on the wire (fp16 input) and the quality measured with it."""

    mode: str  # "plain" (cachegen) or "l0" (cachegen_l0: layer 0 as the token ids)
    tokens: int
    scale: float
    recent: float
    bits: float
    kl: float
    top1: float


@dataclass(frozen=True)
class RateChoice:
    scale: float  # multiplies the plan's steps
    recent: float  # the last RECENT tokens' steps are divided by this


@dataclass(frozen=True)
class RateTable:
    points: tuple[RatePoint, ...]
    kl_guard: dict[str, float]  # per mode: the largest KL the calibration admits (see the module docstring)

    def for_mode(self, mode: str) -> tuple[RatePoint, ...]:
        return tuple(p for p in self.points if p.mode == mode)

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / RATE_FILE
        body = {"format": _FORMAT, "kl_guard": self.kl_guard, "points": [asdict(p) for p in self.points]}
        path.write_text(json.dumps(body, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> RateTable:
        try:
            body = json.loads(Path(path).read_text())
            if body.get("format") != _FORMAT:
                raise CodecError(f"{path}: not a cachegen rate file")
            points = tuple(RatePoint(**p) for p in body["points"])
            guard = {str(k): float(v) for k, v in body["kl_guard"].items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CodecError(f"cannot read cachegen rate file {path}: {e}") from None
        for p in points:
            if not (p.tokens >= 1 and p.scale > 0 and p.recent >= 1 and p.bits > 0 and p.kl >= 0):
                raise CodecError(f"{path}: bad rate point {p}")
        return cls(points, guard)


def load_model_rate(model_dir: str | Path) -> RateTable | None:
    path = Path(model_dir) / RATE_FILE
    return RateTable.load(path) if path.exists() else None


def choose_rate(
    tokens: int,
    max_kl: float,
    points: Sequence[RatePoint],
    kl_guard: float = math.inf,
    min_top1: float = MIN_TOP1,
) -> RateChoice | None:
    """The setting for a `tokens`-token prompt: at the calibrated length nearest to it (in log tokens; ties
    to the shorter, whose side costs weigh more), the admissible point (kl <= min(max_kl, kl_guard), top1 >=
    min_top1) with the fewest bits; if none is admissible, the point with the least KL there (the floor
    cannot be promised by calibration, so spend the most bits). None -- the plan as is -- without points, and
    below the shortest calibrated length: measured on the shipped model, 128-token prompts coded with the
    256-token setting lost greedy agreement (280 prompts: 93.6% against the plan's 95.7%) that neither KL nor
    top-1 showed, so rate control does not extrapolate to shorter prompts."""
    if not points:
        return None
    lengths = sorted({p.tokens for p in points})
    if tokens < lengths[0]:
        return None
    at = min(lengths, key=lambda n: (abs(math.log(n) - math.log(max(tokens, 1))), n))
    here = [p for p in points if p.tokens == at]
    limit = min(max_kl, kl_guard)
    ok = [p for p in here if p.kl <= limit and p.top1 >= min_top1]
    best = min(ok, key=lambda p: (p.bits, p.kl)) if ok else min(here, key=lambda p: (p.kl, -p.bits))
    return RateChoice(best.scale, best.recent)
