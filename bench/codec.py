"""`python -m bench.codec`: KV codecs on the shipped model -- size, speed per core, quality, break-even link.

    python -m bench.codec [--quick] [--json PATH] [--model DIR]

What is measured (one process, `torch.set_num_threads(1)`, the model in fp32 on the CPU as pdserve runs it here):

* KV: real held-out text (`heldout.txt` beside the model, tokenized as in training; the first 4096 tokens are
  skipped because the calibration (`pdserve calibrate`) profiles the model on them). `windows` windows
  of `prompt + continuation + 1` consecutive tokens; `ModelRunner.prefill` of the prompt fills the paged KV
  cache, and each layer's K and V are read back from it ([T, Hkv, D]).
* Codecs: made from the model's `CodecContext` (its depth, calibration files and layer-0 function, built
  as the services build theirs): `raw`, `int8`, `fp8` and CacheGen at its three levels,
  `CacheGenCodec(ctx, level)`: keys `cachegen_low`, `cachegen` (= the default level, what the registry's
  "cachegen" is) and `cachegen_high`; `cachegen_l0` is the default level with layer 0 sent as the token ids
  (what a decode instance that holds the model asks for: every round trip gets the prompt's ids);
  `cachegen_v1` is the default level in format v1 (the context without the transform).
* Rate control: the CacheGen codecs at the default level spend the context's quality floor per prompt length
  (`kv_transfer.codec.rate`, the model's `cachegen_rate.json`); `settings.cachegen_rate` lists the setting
  each took at each length measured here.
* Size: codec params + payload (frame header and CRC not counted) of every window's prompt KV given as fp16
  -> `bits_per_element` (per K or V element), `ratio_vs_fp16` = 16 / bits, `ratio_vs_int8` = int8's bits / bits.
* Speed: one `speed_tokens`-long held-out prompt's KV, every layer, `encode_parts` and `decode` timed with the
  thread's CPU clock (`time.thread_time`: one core's work, robust to other tenants on this shared machine),
  input fp16 and output fp16 -> MB/s (1e6 bytes/s) of fp16-equivalent K+V; median of `repeats` rounds, the
  codecs interleaved within each round, after `speed_warmup_rounds` (1) rounds that are run and not counted
  (first calls: tables, allocator, caches).
* Quality (teacher forced): with the prompt's KV replaced by each codec's round trip (fp32 in, fp32 out:
  the serving dtype here), the model reads the `continuation` held-out tokens that follow the prompt (their
  own K/V computed exactly) and predicts each next token. Against the exact fp32 KV: per-token
  KL(reference || codec) in nats (mean over tokens), top-1 agreement, and the relative change of perplexity
  on the true next tokens. `noise_floor` is the same for the KV merely rounded through fp16 (fp16 vs fp32);
  `int8` is the 8-bit baseline.
* Greedy match (free running, as the end-to-end test measures it through a cluster): `greedy_prompts` held-out
  prompts of 128 tokens; the first 32 greedy tokens read through each codec's prompt KV (the first token is
  prefill's, exact, as in serving; later tokens' K/V computed exactly, as decode does) against those read
  through the exact KV -> `greedy32_match`, the share of prompts that match throughout, with its 95% Wilson
  interval (`greedy32_ci95`: a near-tie lottery, so 100 prompts leave +-5 points). The prompts do not overlap
  (at most (held-out tokens - 4096) / 128 of them). For scale, the same is measured for the exact KV merely
  rounded through fp16 and bf16 (`settings.greedy.rounding`: what any perturbation of that size costs), and
  each reference run's smallest top-1 - top-2 logit margin over its greedy steps is summarised
  (`settings.greedy.reference_min_margin`): prompts whose continuation passes a near-tie flip under tiny
  KV errors.
* Break-even (`kv_transfer.choice.break_even_bps`): each codec's measured profile (ratio and speeds in the
  serving dtype, fp32 here, as the gateway's codec choice counts bytes) against raw's measured profile, for
  one `prompt`-token hand-off pipelined over the model's layers -> link Gbit/s below which the codec hands
  off faster than raw. `pdserve calibrate` writes raw/int8/fp8/cachegen (default level) profiles measured
  this way beside the model (`codec_profiles.json`), which the gateway's `--codec auto` then uses.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.report import emit
from engine.kv_probe import KVProbe, kl_per_token
from kv_transfer.choice import CodecProfile, break_even_bps
from kv_transfer.codec import Codec, CodecContext
from kv_transfer.codec.cachegen import CacheGenCodec, CacheGenL0Codec

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "pdserve-tiny-py"
SKIP_TOKENS = 4096  # the static CacheGen tables are profiled on the first 4096 held-out tokens
PROFILE_NAMES = ("raw", "int8", "fp8", "cachegen")  # the codecs whose profiles `pdserve calibrate` saves


@dataclass(frozen=True)
class Settings:
    prompt: int  # prompt tokens per window (the KV that is coded)
    continuation: int  # teacher-forced tokens read after it
    windows: int
    speed_tokens: int
    repeats: int
    greedy_prompts: int  # held-out prompts of GREEDY_PROMPT_TOKENS for the greedy-match rate
    greedy_tokens: int = 32

    @staticmethod
    def make(quick: bool) -> Settings:
        if quick:
            return Settings(
                prompt=256, continuation=64, windows=4, speed_tokens=1024, repeats=3, greedy_prompts=6
            )
        return Settings(
            prompt=1024, continuation=256, windows=16, speed_tokens=2000, repeats=7, greedy_prompts=280
        )


GREEDY_PROMPT_TOKENS = 128  # as in the end-to-end test (tests/e2e/test_kv_handoff.py)
WARMUP_ROUNDS = 1  # speed rounds run before the counted ones, not counted


def codecs(ctx: CodecContext) -> dict[str, Codec]:
    """The measured codecs, made from the model's context `ctx` (as the services make theirs)."""
    return {
        "raw": ctx.codec("raw"),
        "int8": ctx.codec("int8"),
        "fp8": ctx.codec("fp8"),
        "cachegen_low": CacheGenCodec(ctx, "low"),
        "cachegen": CacheGenCodec(ctx, "default"),
        "cachegen_high": CacheGenCodec(ctx, "high"),
        # the default level with layer 0 sent as the token ids and recomputed by the decoder (what a decode
        # instance that holds the model asks for), the other layers on the "default+l0" plan
        "cachegen_l0": CacheGenL0Codec(ctx, "default"),
        # CacheGen's own quantizers (per-channel keys, per-token values, format v1): the context without the
        # model's transform (what an uncalibrated model gets, here with the calibrated bit plan and tables)
        "cachegen_v1": CacheGenCodec(CodecContext(ctx.num_layers, ctx.tables, None, ctx.layer0), "default"),
    }


# ---- model plumbing ---------------------------------------------------------------------------------------


def heldout_ids(model_dir: str) -> list[int]:
    from training.eval import load_heldout_ids

    return load_heldout_ids(model_dir)


# ---- quality ------------------------------------------------------------------------------------------


class Quality:
    """Sums over teacher-forced tokens of KL(ref || x), top-1 agreement and NLL of the true next token."""

    def __init__(self) -> None:
        self.kl = self.agree = self.nll = 0.0
        self.n = 0

    def add(self, ref_logp: Tensor, logits: Tensor, targets: Tensor) -> None:
        logp = torch.log_softmax(logits, -1)
        self.kl += float(kl_per_token(ref_logp, logits).sum())
        self.agree += float((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
        self.nll += float(-logp.gather(-1, targets[:, None]).sum())
        self.n += targets.numel()

    def summary(self, ref: Quality) -> dict[str, float]:
        ppl, ref_ppl = math.exp(self.nll / self.n), math.exp(ref.nll / ref.n)
        return {
            "kl_mean": self.kl / self.n,
            "top1_agreement": self.agree / self.n,
            "ppl_delta_rel": ppl / ref_ppl - 1.0,
        }


RoundTrip = Callable[[Tensor, Tensor, int, Tensor], tuple[Tensor, Tensor]]  # k, v, layer, prompt ids


def codec_round_trip(codec: Codec) -> RoundTrip:
    def rt(k: Tensor, v: Tensor, layer: int, ids: Tensor) -> tuple[Tensor, Tensor]:
        params, parts = codec.encode_parts(k, v, layer, ids)
        payload = memoryview(bytearray(b"".join(bytes(p) for p in parts)))  # writable, as a receive buffer
        ko, vo = codec.decode(memoryview(bytes(params)), payload, tuple(k.shape), k.dtype, layer)
        return ko.clone(), vo.clone()

    return rt


def wire_bytes(codec: Codec, k: Tensor, v: Tensor, layer: int, ids: Tensor) -> int:
    params, parts = codec.encode_parts(k, v, layer, ids)
    return len(memoryview(params).cast("B")) + sum(len(memoryview(p).cast("B")) for p in parts)


def measure_quality(
    model: KVProbe, ids: list[int], s: Settings, cdx: dict[str, Codec]
) -> tuple[dict[str, Quality], Quality, dict[str, int], dict[str, int], int, int]:
    """-> (quality per codec, noise-floor quality, wire bytes per codec of fp16 input, ... of serving-dtype
    input, K+V elements coded, windows used)."""
    span = s.prompt + s.continuation + 1
    usable = (len(ids) - SKIP_TOKENS) // span
    if usable < 1:
        raise SystemExit(f"held-out text has {len(ids)} tokens: too few for one {span}-token window")
    n_windows = min(s.windows, usable)
    stride = (len(ids) - SKIP_TOKENS) // n_windows  # spread the windows over the held-out text
    ref_q, floor_q = Quality(), Quality()
    quality = {name: Quality() for name in cdx}
    size16 = dict.fromkeys(cdx, 0)
    size_serving = dict.fromkeys(cdx, 0)
    elements = 0
    for w in range(n_windows):
        start = SKIP_TOKENS + w * stride
        window = ids[start : start + span]
        prompt, feed = window[: s.prompt], window[s.prompt : s.prompt + s.continuation]
        targets = torch.tensor(window[s.prompt + 1 :], dtype=torch.long)
        ref_kv = model.prefill(prompt)
        pids = torch.tensor(prompt, dtype=torch.long)
        ref_logits = model.continuation_logits(s.prompt, feed)
        ref_logp = torch.log_softmax(ref_logits, -1)
        ref_q.add(ref_logp, ref_logits, targets)
        elements += sum(2 * k.numel() for k, _ in ref_kv)
        variants: dict[str, RoundTrip] = {name: codec_round_trip(c) for name, c in cdx.items()}
        variants["__fp16"] = _rounding(torch.float16)
        for name, rt in variants.items():
            model.set_prompt_kv([rt(k, v, layer, pids) for layer, (k, v) in enumerate(ref_kv)])
            logits = model.continuation_logits(s.prompt, feed)
            (floor_q if name == "__fp16" else quality[name]).add(ref_logp, logits, targets)
        for name, c in cdx.items():
            for layer, (k, v) in enumerate(ref_kv):
                size16[name] += wire_bytes(c, k.half(), v.half(), layer, pids)
                size_serving[name] += wire_bytes(c, k, v, layer, pids)
        print(f"  window {w + 1}/{n_windows} done", flush=True, file=sys.stderr)
    quality["__ref"] = ref_q
    return quality, floor_q, size16, size_serving, elements, n_windows


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate k / n (well behaved at rates near 0 or 1)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _rounding(dtype: torch.dtype) -> RoundTrip:
    return lambda k, v, _layer, _ids: (k.to(dtype).to(k.dtype), v.to(dtype).to(v.dtype))


def measure_greedy(
    model: KVProbe, ids: list[int], s: Settings, cdx: dict[str, Codec]
) -> tuple[dict[str, dict], dict[str, Any]]:
    """Per codec: the share of held-out prompts whose first `greedy_tokens` greedy tokens, read through the
    codec's prompt KV, equal those read through the exact KV (the first token is prefill's, exact, as in
    serving), its 95% interval, and the first differing positions. Prompts are consecutive, non-overlapping
    spans of the held-out text after SKIP_TOKENS. -> (per codec, context: prompts used, the rates of plain
    fp16 / bf16 rounding, the reference runs' smallest top-2 margins)."""
    t = GREEDY_PROMPT_TOKENS
    n = min(s.greedy_prompts, (len(ids) - SKIP_TOKENS) // t)
    stride = (len(ids) - SKIP_TOKENS - t) // max(n, 1)
    round_trips = {name: codec_round_trip(c) for name, c in cdx.items()}
    round_trips.update({"__fp16": _rounding(torch.float16), "__bf16": _rounding(torch.bfloat16)})
    first_diff: dict[str, list[int]] = {name: [] for name in round_trips}  # one per prompt that diverged
    nbytes, elements = dict.fromkeys(cdx, 0), 0
    min_margins: list[float] = []
    for i in range(n):
        prompt = ids[SKIP_TOKENS + i * stride : SKIP_TOKENS + i * stride + t]
        ref_kv = model.prefill(prompt)
        pids = torch.tensor(prompt, dtype=torch.long)
        first = model.first_token(prompt)
        model.set_prompt_kv(ref_kv)
        margins: list[float] = []
        ref = model.greedy(t, first, s.greedy_tokens, margins)
        min_margins.append(min(margins, default=math.inf))
        elements += sum(2 * k.numel() for k, _ in ref_kv)
        for name, c in cdx.items():
            nbytes[name] += sum(
                wire_bytes(c, k.half(), v.half(), layer, pids) for layer, (k, v) in enumerate(ref_kv)
            )
        for name, rt in round_trips.items():
            model.set_prompt_kv([rt(k, v, layer, pids) for layer, (k, v) in enumerate(ref_kv)])
            got = model.greedy(t, first, s.greedy_tokens)
            diff = next((j for j, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b), None)
            if diff is not None:
                first_diff[name].append(diff)
    rate = {name: (n - len(d)) / max(n, 1) for name, d in first_diff.items()}
    per_codec = {
        name: {
            "match_rate": rate[name],
            "ci95": wilson_interval(n - len(first_diff[name]), n),
            "first_diff": sorted(first_diff[name]),
            "bits_per_element": 8.0 * nbytes[name] / max(elements, 1),
        }
        for name in cdx
    }
    mm = sorted(min_margins)
    context = {
        "prompts": n,
        "rounding": {"fp16": rate["__fp16"], "bf16": rate["__bf16"]},
        "reference_min_margin": {
            "what": "per prompt, the smallest top-1 - top-2 logit margin over its greedy steps (exact KV)",
            **{f"p{q}": mm[min(len(mm) - 1, q * len(mm) // 100)] for q in (5, 10, 25, 50) if mm},
            "share_below_0.01": sum(m < 0.01 for m in mm) / max(len(mm), 1),
        },
    }
    return per_codec, context


# ---- speed --------------------------------------------------------------------------------------------


def measure_speed(
    kv: list[tuple[Tensor, Tensor]], ids: Tensor, cdx: dict[str, Codec], repeats: int, dtype: torch.dtype
) -> dict[str, tuple[float, float]]:
    """-> name: (encode, decode) bytes/s of `dtype`-sized K+V per core (thread CPU time), medians. `ids`:
    the prompt's token ids (cachegen_l0 recomputes layer 0 from them: its check and its decode count)."""
    kv = [(k.to(dtype).contiguous(), v.to(dtype).contiguous()) for k, v in kv]
    nbytes = sum(2 * k.numel() * k.element_size() for k, _ in kv)
    enc: dict[str, list[float]] = {n: [] for n in cdx}
    dec: dict[str, list[float]] = {n: [] for n in cdx}
    for _ in range(WARMUP_ROUNDS + repeats):  # the first rounds warm up (tables, allocator) and are dropped
        for name, c in cdx.items():
            te = td = 0.0
            for layer, (k, v) in enumerate(kv):
                t0 = time.thread_time()
                params, parts = c.encode_parts(k, v, layer, ids)
                te += time.thread_time() - t0
                payload = memoryview(bytearray(b"".join(bytes(p) for p in parts)))
                params_mv = memoryview(bytes(params))
                t0 = time.thread_time()
                c.decode(params_mv, payload, tuple(k.shape), dtype, layer)
                td += time.thread_time() - t0
            enc[name].append(te)
            dec[name].append(td)
    return {
        n: (
            nbytes / max(statistics.median(enc[n][WARMUP_ROUNDS:]), 1e-9),
            nbytes / max(statistics.median(dec[n][WARMUP_ROUNDS:]), 1e-9),
        )
        for n in cdx
    }


# ---- run ------------------------------------------------------------------------------------------------


def run(model_dir: str, s: Settings) -> dict[str, Any]:
    return measure(model_dir, s)[0]


def measure(model_dir: str, s: Settings) -> tuple[dict[str, Any], dict[str, CodecProfile]]:
    """-> (the benchmark's JSON object, each codec's profile in the serving dtype: what the gateway's codec
    choice reads, `pdserve calibrate` saves the serving codecs' ones)."""
    if not (Path(model_dir) / "model.safetensors").exists() and not list(
        Path(model_dir).glob("*.safetensors")
    ):
        raise SystemExit(f"{model_dir}: no weights (model.safetensors) yet")
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    ids = heldout_ids(model_dir)
    model = KVProbe(
        model_dir, max(s.prompt + s.continuation + 1, s.speed_tokens, GREEDY_PROMPT_TOKENS + s.greedy_tokens)
    )
    serving_dtype = model.runner.dtype
    # as the services do: the model's depth, calibration files and layer-0 function
    ctx = CodecContext.from_model_dir(model_dir, model.runner.model, model.runner.fingerprint)
    cdx = codecs(ctx)
    quality, floor_q, size16, size_serving, elements, n_windows = measure_quality(model, ids, s, cdx)
    ref_q = quality.pop("__ref")
    greedy, greedy_context = measure_greedy(model, ids, s, cdx)

    speed_prompt = ids[SKIP_TOKENS : SKIP_TOKENS + s.speed_tokens]
    speed_kv = model.prefill(speed_prompt)
    speed_ids = torch.tensor(speed_prompt, dtype=torch.long)
    speed16 = measure_speed(speed_kv, speed_ids, cdx, s.repeats, torch.float16)
    speed_serving = measure_speed(speed_kv, speed_ids, cdx, s.repeats, serving_dtype)

    bits = {n: 8.0 * size16[n] / elements for n in cdx}
    out_codecs: dict[str, dict[str, Any]] = {}
    for n in cdx:
        q = quality[n].summary(ref_q)
        out_codecs[n] = {
            "ratio_vs_fp16": 16.0 / bits[n],
            "ratio_vs_int8": bits["int8"] / bits[n],
            "bits_per_element": bits[n],
            "encode_mb_s": speed16[n][0] / 1e6,
            "decode_mb_s": speed16[n][1] / 1e6,
            **q,
            f"greedy{s.greedy_tokens}_match": greedy[n]["match_rate"],
            f"greedy{s.greedy_tokens}_ci95": list(greedy[n]["ci95"]),
            # the greedy prompts are short (128 tokens): what their hand-off costs, side information included
            "greedy_prompt_bits_per_element": greedy[n]["bits_per_element"],
        }

    serving_bytes = elements * serving_dtype.itemsize
    profiles = {
        n: CodecProfile(
            name=n,
            ratio=size_serving[n] / serving_bytes,
            encode_bps=speed_serving[n][0],
            decode_bps=speed_serving[n][1],
            kl_mean=0.0 if cdx[n].lossless else out_codecs[n]["kl_mean"],
        )
        for n in cdx
    }
    cfg = model.cfg
    handoff_bytes = s.prompt * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * serving_dtype.itemsize
    break_even = {
        n: break_even_bps(profiles[n], profiles["raw"], handoff_bytes, cfg.num_layers) * 8 / 1e9
        for n in cdx
        if n != "raw"
    }
    ref_ppl = math.exp(ref_q.nll / ref_q.n)
    result = {
        "model": str(model_dir),
        "codecs": out_codecs,
        "noise_floor": {"what": "KV rounded through fp16 (fp16 vs fp32)", **floor_q.summary(ref_q)},
        "break_even_gbit_s": break_even,
        "settings": {
            "quick": s.windows < Settings.make(False).windows,
            "windows": n_windows,
            "prompt_tokens": s.prompt,
            "continuation_tokens": s.continuation,
            "scored_tokens": ref_q.n,
            "greedy": {
                **greedy_context,
                "prompt_tokens": GREEDY_PROMPT_TOKENS,
                "tokens": s.greedy_tokens,
                "first_diff_positions": {n: g["first_diff"] for n, g in greedy.items()},
            },
            "reference_ppl": ref_ppl,
            "speed_tokens": len(speed_prompt),
            "repeats": s.repeats,
            "speed_warmup_rounds": WARMUP_ROUNDS,
            "clock": "thread CPU time (one core)",
            "serving_dtype": str(serving_dtype).replace("torch.", ""),
            "kv_shape_per_layer": [cfg.num_kv_heads, cfg.head_dim],
            "num_layers": cfg.num_layers,
            "cachegen_static_tables": ctx.tables is not None,
            # rate control's setting (step scale, recent refinement) per cachegen codec and length coded here
            # (None: the level's plan as is); the floor is the context's (rate.DEFAULT_MAX_KL unless set)
            "cachegen_rate": {
                n: {
                    str(t): (asdict(ch) if (ch := c.rate_choice(t)) is not None else None)
                    for t in (s.prompt, GREEDY_PROMPT_TOKENS, len(speed_prompt))
                }
                for n, c in cdx.items()
                if isinstance(c, CacheGenCodec)
            },
            "break_even_handoff_bytes": handoff_bytes,
            # the codec each profile `pdserve calibrate` saves is measured as: the one a decode instance pulls
            # when told that name (cachegen: cachegen_l0 where the model's layer 0 can be recomputed)
            "profile_sources": {n: ctx.pull_codec(n) for n in PROFILE_NAMES},
            "profiles_serving_dtype": {
                n: {"ratio": p.ratio, "encode_mb_s": p.encode_bps / 1e6, "decode_mb_s": p.decode_bps / 1e6}
                for n, p in profiles.items()
            },
            "elapsed_s": time.perf_counter() - t_start,
        },
    }
    return result, profiles


def summary(r: dict[str, Any]) -> str:
    lines = [
        f"model {r['model']}  ({r['settings']['windows']} windows x {r['settings']['prompt_tokens']} prompt "
        f"+ {r['settings']['continuation_tokens']} scored tokens; ref ppl {r['settings']['reference_ppl']:.3f})",
        f"{'codec':14s} {'bits':>6s} {'x fp16':>7s} {'x int8':>7s} {'enc MB/s':>9s} {'dec MB/s':>9s} "
        f"{'KL':>9s} {'top1':>7s} {'dPPL':>8s} {'greedy':>7s} {'b-e Gb/s':>8s}",
    ]
    gkey = f"greedy{r['settings']['greedy']['tokens']}_match"
    for n, c in r["codecs"].items():
        be = r["break_even_gbit_s"].get(n)
        lines.append(
            f"{n:14s} {c['bits_per_element']:6.2f} {c['ratio_vs_fp16']:7.2f} {c['ratio_vs_int8']:7.2f} "
            f"{c['encode_mb_s']:9.1f} {c['decode_mb_s']:9.1f} {c['kl_mean']:9.2e} {c['top1_agreement']:7.4f} "
            f"{c['ppl_delta_rel']:+8.4f} {c[gkey]:7.2f} {'' if be is None else f'{be:8.3f}'}"
        )
    f = r["noise_floor"]
    lines.append(
        f"{'fp16 floor':14s} {'':6s} {'':7s} {'':7s} {'':9s} {'':9s} {f['kl_mean']:9.2e} "
        f"{f['top1_agreement']:7.4f} {f['ppl_delta_rel']:+8.4f}"
    )
    g = r["settings"]["greedy"]
    lo, hi = r["codecs"]["cachegen"][gkey.replace("match", "ci95")] if "cachegen" in r["codecs"] else (0, 0)
    lines.append(
        f"greedy: {g['prompts']} prompts; cachegen 95% interval [{lo:.2f}, {hi:.2f}]; the exact KV rounded "
        f"through fp16 {g['rounding']['fp16']:.2f}, bf16 {g['rounding']['bf16']:.2f}; "
        f"{g['reference_min_margin']['share_below_0.01']:.0%} of prompts pass a top-2 margin < 0.01 logits"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.codec", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer and shorter windows (under a minute)")
    ap.add_argument("--json", default=None, help="write the JSON object here instead of stdout")
    ap.add_argument(
        "--model", default=str(DEFAULT_MODEL), help="model directory (default: the shipped model)"
    )
    a = ap.parse_args(argv)
    result = run(a.model, Settings.make(a.quick))
    emit(result, a.json, summary=summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
