"""Per-model CacheGen bit plans (format v1): how many quantization bins each layer's K and V get, chosen from
measured sensitivity instead of a generic shallow/deep rule, and the static tables profiled for them; saved
beside the model as `cachegen_tables.safetensors` (+ `cachegen_plan.json`, the record). Step 1 of
`pdserve calibrate MODEL_DIR` (`calibration.calibrate`).

Method (calibration on the first `CALIB_TOKENS` held-out tokens; `bench.codec` scores after them):
1. For each chunk size in `CHUNK_CANDIDATES`, each (layer, K/V) and each bins in `CANDIDATE_BINS`, quantize
   that one part of the calibration prompts' KV (everything else exact) and measure
   * its cost: bits per element under a static per-channel table (the cross-entropy of the symbols under
     their pooled per-channel histogram) plus the side information per chunk (key centre and half-range
     fp16 per channel, one value-scale byte per token);
   * its damage: the mean per-token KL(reference || quantized) of the teacher-forced continuation.
2. For each level's budget (`BUDGETS`, mean bits per element over K and V of all layers), choose one bins
   per (layer, K/V) minimising the summed KL within the budget (Lagrangian relaxation: minimise
   KL + lambda x bits per part, bisecting lambda; KLs of separate parts are treated as additive).
3. Keep the largest chunk size whose default-level plan is within 5% of the lowest predicted KL, then profile the static tables
   for every plan's bins at that chunk size (`profile_tables`).
The predicted and measured (all parts quantized together) KL of each plan are returned for the record.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kv_transfer.codec import rans
from kv_transfer.codec.cachegen_core import (
    DEFAULT_CHUNK_TOKENS,
    LEVELS,
    Level,
    chunk_bounds,
    levels_of,
    quantize_keys,
    quantize_values,
    value_scales,
)
from kv_transfer.codec.cachegen_tables import TABLES_FILE, CacheGenTables, Plan
from kv_transfer.errors import CodecError

PLAN_FILE = "cachegen_plan.json"  # what was measured and chosen (a record; the codec reads the tables)

CALIB_TOKENS = 4096  # held-out tokens used here; bench.codec evaluates on the text after them
CANDIDATE_BINS = (4, 6, 8, 10, 12, 16, 24, 32)
CHUNK_CANDIDATES = (128, 256, 1024)
# mean bits per element (K and V, all layers, side information included) per level: ~4x, ~6.4x, ~10.7x
# smaller than fp16
BUDGETS = {"high": 4.0, "default": 2.5, "low": 1.5}
KINDS = ("k", "v")


@dataclass(frozen=True)
class PartCost:
    bits: float  # per element, side information included
    kl: float  # mean per-token KL (nats) with only this part quantized


def _quantize(x: Tensor, kind: str, bins: int, chunk: int) -> tuple[Tensor, list[Tensor], float]:
    """x [T, C] fp32 -> (reconstruction [T, C], symbols per chunk, side-information bits)."""
    m = levels_of(bins)
    out, syms, side = torch.empty_like(x), [], 0.0
    for a, b in chunk_bounds(x.shape[0], chunk):
        if kind == "k":
            centre, half, q = quantize_keys(x[a:b], m, torch.float16)
            step = half.float() / m
            out[a:b] = (q - m) * step + centre.float()
            side += 32 * x.shape[1]
        else:
            base, e, q = quantize_values(x[a:b], m)
            s = value_scales(base, e)
            out[a:b] = (q - m) * (s / m)[:, None]
            side += 32 + 8 * (b - a)
        syms.append(q)
    return out, syms, side


def _table_bits(syms: list[Tensor], n: int) -> float:
    """Bits of the symbols under their own pooled per-channel histogram (what a static table costs)."""
    s = torch.cat(syms).to(torch.int64)  # [T, C]
    c = s.shape[1]
    counts = torch.zeros(c, n, dtype=torch.float64)
    counts.scatter_add_(1, s.T.contiguous(), torch.ones(c, s.shape[0], dtype=torch.float64))
    p = counts / counts.sum(1, keepdim=True)
    return float(-(counts * torch.where(counts > 0, p.log2(), torch.zeros_like(p))).sum())


def calibration_ids(model_dir: str) -> list[int]:
    """The first CALIB_TOKENS tokens of the model's held-out text, or seeded random ids without one."""
    if (Path(model_dir) / "heldout.txt").exists():
        from training.eval import load_heldout_ids

        return load_heldout_ids(model_dir)[:CALIB_TOKENS]
    from engine.config import ModelConfig

    vocab = ModelConfig.from_hf_dir(model_dir).vocab_size
    return torch.randint(0, vocab, (CALIB_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()


class Calibration:
    """Calibration prompts prefilled once: their KV and reference log-probabilities."""

    def __init__(self, model_dir: str, prompt: int = 1024, continuation: int = 128, windows: int = 3):
        from engine.kv_probe import KVProbe

        ids = calibration_ids(model_dir)
        span = prompt + continuation + 1
        windows = max(1, min(windows, len(ids) // span))
        prompt = min(prompt, len(ids) - continuation - 1)
        if prompt < 16:
            raise ValueError(f"{model_dir}: too little held-out text to calibrate a bit plan")
        self.probe = KVProbe(model_dir, prompt + continuation + 1)
        self.prompt, self.windows = prompt, []
        stride = max(span, (len(ids) - span) // max(1, windows - 1)) if windows > 1 else span
        for w in range(windows):
            window = ids[w * stride : w * stride + span]
            if len(window) < span:
                break
            feed = window[prompt : prompt + continuation]
            kv = [(k.float().clone(), v.float().clone()) for k, v in self.probe.prefill(window[:prompt])]
            ref = torch.log_softmax(self.probe.continuation_logits(prompt, feed), -1)
            self.windows.append((kv, feed, ref))
        self.num_layers = self.probe.num_layers

    def kl(self, replace: dict[tuple[int, str], list[Tensor]]) -> float:
        """Mean per-token KL with the given (layer, kind) parts replaced (per window, [T, C] each)."""
        from engine.kv_probe import kl_per_token

        total, n = 0.0, 0
        for w, (kv, feed, ref) in enumerate(self.windows):
            parts = []
            for layer, (k, v) in enumerate(kv):
                kk = replace[(layer, "k")][w].view_as(k) if (layer, "k") in replace else k
                vv = replace[(layer, "v")][w].view_as(v) if (layer, "v") in replace else v
                parts.append((kk, vv))
            self.probe.set_prompt_kv(parts)
            kl = kl_per_token(ref, self.probe.continuation_logits(self.prompt, feed))
            total, n = total + float(kl.sum()), n + kl.numel()
        return total / n

    def part(self, layer: int, kind: str) -> list[Tensor]:
        i = KINDS.index(kind)
        return [kv[layer][i].reshape(kv[layer][i].shape[0], -1) for kv, _, _ in self.windows]


def measure_costs(
    cal: Calibration, chunk: int, candidates: tuple[int, ...] = CANDIDATE_BINS
) -> dict[tuple[int, str, int], PartCost]:
    costs = {}
    for layer in range(cal.num_layers):
        for kind in KINDS:
            xs = cal.part(layer, kind)
            elements = sum(x.numel() for x in xs)
            for bins in candidates:
                recon, syms, side = [], [], 0.0
                for x in xs:
                    r, s, sd = _quantize(x, kind, bins, chunk)
                    recon.append(r)
                    syms += s
                    side += sd
                bits = (_table_bits(syms, 2 * levels_of(bins) + 1) + side) / elements
                costs[(layer, kind, bins)] = PartCost(bits, cal.kl({(layer, kind): recon}))
    return costs


def choose(costs: dict[tuple[int, str, int], PartCost], num_layers: int, budget: float) -> Plan:
    """Bins per (layer, K/V) minimising the summed KL with mean bits <= budget (every part has the same
    number of elements). Lagrangian: each part picks argmin KL + lam * bits; bisect lam on the budget."""
    parts = [(layer, kind) for layer in range(num_layers) for kind in KINDS]
    candidates = sorted({b for (_, _, b) in costs})

    def pick(lam: float) -> tuple[dict[tuple[int, str], int], float]:
        sel = {
            p: min(candidates, key=lambda b: (costs[(*p, b)].kl + lam * costs[(*p, b)].bits, -b))
            for p in parts
        }
        return sel, sum(costs[(*p, b)].bits for p, b in sel.items()) / len(parts)

    lo, hi = 0.0, 1.0
    while pick(hi)[1] > budget and hi < 1e6:
        hi *= 4
    for _ in range(60):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
        if pick(mid)[1] > budget:
            lo = mid
        else:
            hi = mid
    sel, _ = pick(hi)
    return tuple((sel[(layer, "k")], sel[(layer, "v")]) for layer in range(num_layers))


def predicted(costs: dict[tuple[int, str, int], PartCost], plan: Plan) -> dict[str, float]:
    keys = [(layer, kind, b) for layer, bins in enumerate(plan) for kind, b in zip(KINDS, bins, strict=True)]
    return {
        "bits_per_element": sum(costs[k].bits for k in keys) / len(keys),
        "kl_sum_of_parts": sum(costs[k].kl for k in keys),
    }


def measured_kl(cal: Calibration, plan: Plan, chunk: int) -> float:
    replace = {}
    for layer, (kb, vb) in enumerate(plan):
        for kind, bins in (("k", kb), ("v", vb)):
            replace[(layer, kind)] = [_quantize(x, kind, bins, chunk)[0] for x in cal.part(layer, kind)]
    return cal.kl(replace)


def plan_model(
    model_dir: str,
    *,
    chunks: tuple[int, ...] = CHUNK_CANDIDATES,
    candidates: tuple[int, ...] = CANDIDATE_BINS,
    prompt: int = 1024,
    continuation: int = 128,
    windows: int = 3,
) -> tuple[CacheGenTables, dict]:
    """-> (tables carrying the plans, a report of what was measured and chosen)."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cal = Calibration(model_dir, prompt, continuation, windows)
    per_chunk = {}
    for chunk in chunks:
        costs = measure_costs(cal, chunk, candidates)
        plans = {level: choose(costs, cal.num_layers, budget) for level, budget in BUDGETS.items()}
        per_chunk[chunk] = (costs, plans)
    # the largest chunk whose default-level plan is within 5% of the lowest predicted KL: smaller chunks cost
    # per-chunk work (encode speed) for gains this small
    kl = {c: predicted(per_chunk[c][0], per_chunk[c][1]["default"])["kl_sum_of_parts"] for c in chunks}
    best = max(c for c in chunks if kl[c] <= 1.05 * min(kl.values()))
    costs, plans = per_chunk[best]
    report = {
        "chunk_tokens": best,
        "budgets_bits_per_element": BUDGETS,
        "calibration": {"held_out_tokens": CALIB_TOKENS, "windows": len(cal.windows), "prompt": cal.prompt},
        "by_chunk_default_predicted": {
            str(c): predicted(per_chunk[c][0], per_chunk[c][1]["default"]) for c in chunks
        },
        "plans": {
            level: {
                "bins": [list(b) for b in plan],
                **predicted(costs, plan),
                "kl_measured_together": measured_kl(cal, plan, best),
            }
            for level, plan in plans.items()
        },
    }
    samples = [
        (layer, kv[layer][0], kv[layer][1]) for kv, _, _ in cal.windows for layer in range(cal.num_layers)
    ]
    tables = profile_tables(samples, cal.num_layers, chunk_tokens=best, plans=plans, record_chunk_tokens=True)
    report["elapsed_s"] = time.perf_counter() - t0
    return tables, report


def profile_tables(
    samples: Iterable[tuple[int, Tensor, Tensor]],
    num_layers: int,
    levels: Iterable[Level] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    prior: float = 0.5,
    plans: dict[str, Plan] | None = None,
    record_chunk_tokens: bool = False,
) -> CacheGenTables:
    """Histogram the symbols the codec would produce for each (layer, K/V, channel) at every bins setting
    that one of `levels` (default: all) or of `plans` uses for that layer. samples: (layer, k [T,Hkv,D],
    v [T,Hkv,D]). `prior` is added to every count, so symbols never seen in profiling stay cheap enough.
    The tables carry `plans`, and `chunk_tokens` when `record_chunk_tokens` (encoders then default to it)."""
    levels = list(levels or LEVELS.values())
    plans = plans or {}
    counts: dict[tuple[int, str, int], np.ndarray] = {}
    for layer, k, v in samples:
        t, h, d = k.shape
        kf, vf = k.reshape(t, h * d).float(), v.reshape(t, h * d).float()
        kbins = {lv.bins(layer, num_layers)[0] for lv in levels} | {p[layer][0] for p in plans.values()}
        vbins = {lv.bins(layer, num_layers)[1] for lv in levels} | {p[layer][1] for p in plans.values()}
        for kind, x, bins_set in (("k", kf, kbins), ("v", vf, vbins)):
            for bins in sorted(bins_set):
                m = levels_of(bins)
                for a, b in chunk_bounds(t, chunk_tokens):
                    if kind == "k":
                        q = quantize_keys(x[a:b], m, torch.float32)[2]
                    else:
                        q = quantize_values(x[a:b], m)[2]
                    c = rans.histogram(q.to(torch.uint8).numpy(), 2 * m + 1)
                    acc = counts.setdefault((layer, kind, bins), np.zeros_like(c, dtype=np.float64))
                    if acc.shape != c.shape:
                        raise CodecError(
                            f"profile: layer {layer} has {c.shape[0]} channels, earlier {acc.shape[0]}"
                        )
                    acc += c
    return CacheGenTables(
        {key: c + prior for key, c in counts.items()},
        num_layers,
        plans,
        chunk_tokens if record_chunk_tokens else None,
    )


def calibrate_plan(model_dir: str | Path, **kw) -> Path:
    """Plan and profile the model (`plan_model`, keyword arguments passed on); write the tables and the record
    beside it. -> the tables' path."""
    tables, report = plan_model(str(model_dir), **kw)
    out = Path(model_dir) / TABLES_FILE
    tables.save(out)
    (Path(model_dir) / PLAN_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return out
