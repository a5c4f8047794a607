"""Calibrate cachegen's rate control (`kv_transfer.codec.rate`): how size and quality move with the prompt length.

For each prompt length in `lengths` and each setting (step scale, recent refinement: `SETTINGS`), windows of the model's
calibration text (the held-out file's first 4096 tokens, as the other calibration steps; bench.codec scores
after them) are prefilled, their KV coded in format v5 with that setting and decoded, and the model reads the
next `continuation` tokens through it: bits per element on the wire (fp16 input), mean per-token KL against
the exact KV, teacher-forced top-1 agreement. Two modes: "plain" (every layer coded: `cachegen`) and "l0"
(layer 0 sent as the token ids, the others on the "<level>+l0" plan: `cachegen_l0`). The guard per mode is the
KL of the plan as calibrated (scale 1, RECENT's refinement) at the longest length: the level was chosen for
that point's greedy agreement, and no shorter prompt is given more KL per token than it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from kv_transfer.codec import cachegen_klt as klt
from kv_transfer.codec.cachegen_core import DEFAULT_CHUNK_TOKENS, chunk_bounds
from kv_transfer.codec.rate import RatePoint, RateTable

LENGTHS = (256, 1024)  # shorter prompts keep the plan (rate.choose_rate does not extrapolate below these)
# (scale, recent): the plan's steps times scale, the last RECENT tokens' divided by recent = RECENT's factor x
# scale, so those tokens keep the plan's steps. Coarser recent tokens were tried: at 128-token prompts they
# cost greedy agreement (bench.codec, 280 prompts: cachegen_l0 94% and plain cachegen 82%, int8 96%), which KL
# and top-1 over the calibration windows did not show.
SETTINGS = tuple((s, klt.RECENT[1] * s) for s in (1.0, 1.4, 2.0, 2.8))
CALIB_TOKENS = 4096  # the held-out text's calibration span (bench.codec.SKIP_TOKENS)


def _windows(ids: list[int], span: int, n: int) -> list[list[int]]:
    usable = min(len(ids), CALIB_TOKENS)
    count = max(1, min(n, usable // span))
    stride = usable // count
    return [ids[i * stride : i * stride + span] for i in range(count) if i * stride + span <= len(ids)]


def measure_points(
    model_dir: str | Path,
    ids: list[int],
    level: str = "default",
    lengths: tuple[int, ...] = LENGTHS,
    settings: tuple[tuple[float, float], ...] = SETTINGS,
    windows: int = 6,
    continuation: int = 64,
    log: Callable[[str], None] = print,
) -> list[RatePoint]:
    from engine.kv_probe import KVProbe, kl_per_token

    tr = klt.load_model_transform(model_dir)
    if tr is None:
        raise SystemExit(f"{model_dir}: no {klt.TRANSFORM_FILE}: calibrate the transform first")
    probe = KVProbe(str(model_dir), max(lengths) + continuation + 1)
    points: list[RatePoint] = []
    for t in lengths:
        wins = _windows(ids, t + continuation + 1, windows if t <= 256 else max(1, windows // 2))
        refs = []
        for w in wins:
            kv = probe.prefill(w[:t])
            refs.append((kv, torch.log_softmax(probe.continuation_logits(t, w[t : t + continuation]), -1)))
        for mode in ("plain", "l0"):
            plan = tr.steps.get(level + klt.L0_SUFFIX if mode == "l0" else level)
            if plan is None:
                continue
            for scale, recent in settings:
                nbytes = elements = agree = n = 0
                kls = []
                for w, (kv, ref) in zip(wins, refs, strict=True):
                    coded = []
                    for layer, (k, v) in enumerate(kv):
                        elements += 2 * k.numel()
                        if layer == 0 and mode == "l0":  # the token ids, recomputed exactly
                            coded.append((k, v))
                            nbytes += 4 * t
                            continue
                        steps = (float(plan[layer][0]) * scale, float(plan[layer][1]) * scale)
                        params, words = klt.encode(
                            tr, level, k.half(), v.half(), layer, chunk_bounds(t, DEFAULT_CHUNK_TOKENS),
                            steps=steps, recent=(klt.RECENT[0], recent),
                        )  # fmt: skip
                        nbytes += len(params) + sum(x.nbytes for x in words)
                        p = klt.parse(params, tuple(k.shape), layer, tr)
                        coded.append(
                            klt.decode(p, np.concatenate(words), tuple(k.shape), k.dtype, layer, k.device)
                        )
                    probe.set_prompt_kv(coded)
                    logits = probe.continuation_logits(t, w[t : t + continuation])
                    kls.append(kl_per_token(ref, logits))
                    agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
                    n += logits.shape[0]
                point = RatePoint(
                    mode,
                    t,
                    scale,
                    recent,
                    8.0 * nbytes / elements,
                    float(torch.cat(kls).mean()),
                    agree / n,
                )
                points.append(point)
                log(
                    f"rate: {mode} T={t} scale={scale} recent={recent}: {16 / point.bits:.2f}x fp16, "
                    f"KL {point.kl:.2e}, top-1 {point.top1:.4f}"
                )
    return points


def guard(points: list[RatePoint]) -> dict[str, float]:
    """Per mode: the KL of the plan as calibrated (scale 1, RECENT's refinement) at the longest length."""
    out = {}
    for mode in sorted({p.mode for p in points}):
        ref = [p for p in points if p.mode == mode and p.scale == 1.0 and p.recent == klt.RECENT[1]]
        if ref:
            out[mode] = max(ref, key=lambda p: p.tokens).kl
    return out


def calibrate_rate(
    model_dir: str | Path, quick: bool = False, log: Callable[[str], None] = print
) -> Path | None:
    """Measure the rate points on `model_dir`'s held-out text and write `cachegen_rate.json` beside it; None
    (nothing written) without held-out text."""
    model_dir = Path(model_dir)
    if not (model_dir / "heldout.txt").exists():
        log(f"calibrate: no heldout.txt in {model_dir}: no rate control (the levels' plans are used as is)")
        return None
    from training.eval import load_heldout_ids

    ids = load_heldout_ids(str(model_dir))
    kw = {"lengths": (128,), "settings": SETTINGS[::2], "windows": 2} if quick else {}  # smoke test only
    points = measure_points(model_dir, ids, log=log, **kw)  # type: ignore[arg-type]
    table = RateTable(tuple(points), guard(points))
    if not all(math.isfinite(v) for v in table.kl_guard.values()):
        raise SystemExit("rate calibration: non-finite KL")
    return table.save(model_dir)
