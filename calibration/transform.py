"""Profile a model's CacheGen transform (format v2, `kv_transfer.codec.cachegen_klt`) and calibrate each
level's per-layer steps; saved beside the model as `cachegen_transform.safetensors`. Step 2 of
`pdserve calibrate MODEL_DIR` (`calibration.calibrate`).

Calibration text: the first `CALIB_TOKENS` held-out tokens (the same span the static tables are profiled on;
`bench.codec` scores only after it), cut into windows of `WINDOW` tokens: the first WINDOW - CONTINUATION
are the prompt whose KV is coded, the rest a teacher-forced continuation that reads it. A model without
held-out text is profiled on seeded random token ids.

1. Metrics, per layer and KV head g (from the prompts' attention inputs x and the weights):
   keys   M_k = sum over g's query heads h of E[q_h q_h^T] (pre-RoPE queries x W_q,h^T), reduced to its
          diagonal averaged over each RoPE pair (i, i + D/2): relative rotation between query and key
          positions mixes the pair, and cross-pair terms average out;
   values M_v = sum over g's query heads h of W_o,h^T W_o,h.
   Each is scaled to mean diagonal 1. Transform F = A^T U with A = M^(1/2) (eigenvalues floored at 1e-3 of
   the largest) and U the eigenbasis of the covariance of x A^T (pre-RoPE keys, values), largest first.
2. Sensitivity: each part i (layer, K/V) alone is coded at a reference step (5% of its RMS in the transform
   domain) and the continuation's mean KL(reference || coded) is measured: a_i = KL_i / step_i^2.
3. Per level budget (bits per element, side information included, `BUDGETS`): steps_i = sqrt(lambda / a_i)
   (every part the same KL per step^2, which minimises total KL for a given total rate at high rate), with
   lambda bisected until the calibration prompts code to the budget.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kv_transfer.codec import layer0
from kv_transfer.codec.cachegen_core import chunk_bounds
from kv_transfer.codec.cachegen_klt import (
    L0_SUFFIX,
    TRANSFORM_FILE,
    KLTransform,
    decode,
    encode,
    parse,
)

CALIB_TOKENS = 4096
WINDOW = 1024
CONTINUATION = 256
# bits per K/V element on the calibration prompts: the ratios of the paper-style levels (4x, 6.4x, 10.7x)
BUDGETS = {"high": 4.0, "default": 2.65, "low": 1.5}
REF_STEP_FRAC = 0.05
CHUNK_TOKENS = 1024


def _sqrtm(m: Tensor, floor: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Symmetric PSD m (float64) -> (m^(1/2), m^(-1/2)) with eigenvalues floored at floor * max."""
    e, u = torch.linalg.eigh(m)
    e = e.clamp_min(floor * float(e.max()))
    return (u * e.sqrt()) @ u.T, (u * e.rsqrt()) @ u.T


def _unrope(k: Tensor, inv_freq: Tensor) -> Tensor:
    from kv_transfer.codec.cachegen_klt import _rotate, rope_tables

    cos, sin = rope_tables(inv_freq, 0, k.shape[0], k.device)
    return _rotate(k.float(), cos, -sin)


def build_transform(
    attn_inputs: list[list[Tensor]],
    prompt_kv: list[list[tuple[Tensor, Tensor]]],
    model,
    cfg,
    inv_freq: Tensor,
) -> tuple[np.ndarray, np.ndarray]:
    """attn_inputs[layer]: the prompts' attention inputs [T, hidden]; prompt_kv[window][layer] = (k, v)
    -> (fwd, inv) float32 [L, 2, C, C]."""
    from engine.model import Attention

    attns = [m for m in model.modules() if isinstance(m, Attention)]
    h, g, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rep, c = h // g, g * d
    fwd = np.zeros((cfg.num_layers, 2, c, c), np.float32)
    inv = np.zeros_like(fwd)
    for layer, a in enumerate(attns):
        x = torch.cat(attn_inputs[layer]).double()
        q = x @ a.q_proj.weight.double().T
        if a.q_proj.bias is not None:
            q = q + a.q_proj.bias.double()
        q = q.view(-1, h, d)
        wo = a.o_proj.weight.double()  # [hidden, H D]
        mk, mv = torch.zeros(c, c, dtype=torch.float64), torch.zeros(c, c, dtype=torch.float64)
        for kv_head in range(g):
            blk = slice(kv_head * d, (kv_head + 1) * d)
            for head in range(kv_head * rep, (kv_head + 1) * rep):
                qh = q[:, head]
                mk[blk, blk] += qh.T @ qh / len(qh)
                w = wo[:, head * d : (head + 1) * d]
                mv[blk, blk] += w.T @ w
        pair = mk.diag().view(g, 2, d // 2).mean(1, keepdim=True).expand(g, 2, d // 2).reshape(-1)
        mk = torch.diag(pair)
        for kind, m in ((0, mk), (1, mv)):
            m = m / m.diag().mean()
            a_half, a_inv = _sqrtm(m)
            xs = [
                (_unrope(kv[layer][0], inv_freq) if kind == 0 else kv[layer][1].float()).reshape(-1, c)
                for kv in prompt_kv
            ]
            z = torch.cat(xs).double() @ a_half  # a_half is symmetric: x A^T = x A
            z = z - z.mean(0)
            _, u = torch.linalg.eigh(z.T @ z / len(z))
            u = u.flip(1)
            fwd[layer, kind] = (a_half @ u).float().numpy()
            inv[layer, kind] = (u.T @ a_inv).float().numpy()
    return fwd, inv


def _bits(
    transform: KLTransform, kvs: list[list[tuple[Tensor, Tensor]]], steps: np.ndarray, l0: bool = False
) -> float:
    """Mean bits per K/V element of the prompts' KV coded with steps [L, 2]; with `l0`, layer 0 travels as
    the token ids (cachegen_l0: 4 bytes per token plus its frame's params)."""
    total = elements = 0
    for kv in kvs:
        for layer, (k, v) in enumerate(kv):
            elements += 2 * k.numel()
            if l0 and layer == 0:
                total += layer0.PARAMS_BYTES + 4 * k.shape[0]
                continue
            chunks = chunk_bounds(k.shape[0], CHUNK_TOKENS)
            params, words = encode(transform, "default", k, v, layer, chunks, _step_pair(steps, layer))
            total += len(params) + sum(w.nbytes for w in words)
    return 8.0 * total / elements


def _step_pair(steps: np.ndarray, layer: int) -> tuple[float, float]:
    """(K step, V step) of `layer` from steps [L, 2]."""
    return float(steps[layer, 0]), float(steps[layer, 1])


def _round_trip(
    transform: KLTransform, k: Tensor, v: Tensor, layer: int, steps: tuple[float, float]
) -> tuple:
    params, words = encode(transform, "default", k, v, layer, chunk_bounds(k.shape[0], CHUNK_TOKENS), steps)
    p = parse(params, tuple(k.shape), layer, transform)
    ko, vo = decode(p, np.concatenate(words), tuple(k.shape), k.dtype, layer, torch.device("cpu"))
    return ko, vo


def profile(
    model_dir: str | Path,
    calib_tokens: int = CALIB_TOKENS,
    budgets: dict[str, float] | None = None,
    window: int = WINDOW,
    log=print,
) -> KLTransform:
    from engine.kv_probe import KVProbe, kl_per_token
    from engine.model import Attention, rope_inv_freq

    budgets = dict(budgets or BUDGETS)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    probe = KVProbe(str(model_dir), window)
    cfg = probe.cfg
    window = min(window, probe.runner.max_model_len - 1)
    cont = min(CONTINUATION, window // 4)
    try:
        from training.eval import load_heldout_ids

        ids = load_heldout_ids(model_dir)[:calib_tokens]
    except (OSError, ImportError):
        ids = []
    if len(ids) < window:
        ids = torch.randint(
            0, cfg.vocab_size, (calib_tokens,), generator=torch.Generator().manual_seed(0)
        ).tolist()
    windows = [ids[a : a + window] for a in range(0, len(ids) - window + 1, window)]
    attns = [m for m in probe.runner.model.modules() if isinstance(m, Attention)]
    inputs: list[list[Tensor]] = [[] for _ in attns]
    hooks = [
        a.register_forward_pre_hook(lambda _m, args, i=i: inputs[i].append(args[0].detach().float().clone()))
        for i, a in enumerate(attns)
    ]
    prompt_kv = []
    try:
        for w in windows:
            prompt_kv.append([(k.float(), v.float()) for k, v in probe.prefill(w[: window - cont])])
    finally:
        for hk in hooks:
            hk.remove()
    inv_freq = rope_inv_freq(cfg)
    fwd, inv = build_transform(inputs, prompt_kv, probe.runner.model, cfg, inv_freq)
    ones = np.ones((cfg.num_layers, 2), np.float32)
    base = KLTransform(fwd, inv, inv_freq.numpy(), cfg.num_kv_heads, {"default": ones})

    # 2. sensitivity of each part alone
    refs = []
    for w, kv in zip(windows, prompt_kv, strict=True):
        probe.set_prompt_kv(kv)
        refs.append(torch.log_softmax(probe.continuation_logits(window - cont, w[window - cont :]), -1))

    def mean_kl(kvs_of_window) -> float:
        kl = n = 0.0
        for w, ref, kv in zip(windows, refs, kvs_of_window, strict=True):
            probe.set_prompt_kv(kv)
            logits = probe.continuation_logits(window - cont, w[window - cont :])
            kl += float(kl_per_token(ref, logits).sum())
            n += len(logits)
        return kl / n

    sens = np.zeros((cfg.num_layers, 2))
    ref_steps = np.zeros((cfg.num_layers, 2))
    for layer in range(cfg.num_layers):
        yk, yv = zip(*(base.forward(kv[layer][0], kv[layer][1], layer) for kv in prompt_kv), strict=True)
        for kind, ys in ((0, yk), (1, yv)):
            y = torch.cat(ys)
            ref_steps[layer, kind] = REF_STEP_FRAC * float((y - y.mean(0)).pow(2).mean().sqrt())
    for layer in range(cfg.num_layers):
        for kind in (0, 1):
            tiny = 1e-6 * max(float(ref_steps.max()), 1e-12)
            coded = []
            for kv in prompt_kv:
                k, v = kv[layer]
                steps = (ref_steps[layer, 0], tiny) if kind == 0 else (tiny, ref_steps[layer, 1])
                ko, vo = _round_trip(base, k, v, layer, steps)
                ko, vo = (ko, v) if kind == 0 else (k, vo)
                coded.append([*kv[:layer], (ko, vo), *kv[layer + 1 :]])
            sens[layer, kind] = max(mean_kl(coded), 1e-12) / ref_steps[layer, kind] ** 2
    log(f"sensitivity a_i (KL per step^2) [layer, K/V]:\n{np.array2string(sens, precision=3)}")

    # 3. per level: bisect lambda to the budget
    plans: dict[str, np.ndarray] = {}
    record: dict[str, dict] = {}
    # each level twice: every layer coded, and layer 0 recomputed from the ids (the "<level>+l0" plan)
    for level, budget in budgets.items():
        for l0 in (False, True):
            lo, hi = -60.0, 20.0  # log2 lambda
            for _ in range(40):
                mid = (lo + hi) / 2
                steps = np.sqrt(2.0**mid / sens)
                if _bits(base, prompt_kv, steps, l0) > budget:
                    lo = mid
                else:
                    hi = mid
            steps = np.sqrt(2.0**hi / sens).astype(np.float32)
            name = level + L0_SUFFIX if l0 else level
            plans[name] = steps
            kl = mean_kl(
                [
                    [
                        (k, v)
                        if l0 and layer == 0
                        else _round_trip(base, k, v, layer, _step_pair(steps, layer))
                        for layer, (k, v) in enumerate(kv)
                    ]
                    for kv in prompt_kv
                ]
            )
            record[name] = {"budget_bits": budget, "bits": _bits(base, prompt_kv, steps, l0), "calib_kl": kl}
            log(f"{name}: {record[name]}")
    meta = {
        "calibration": json.dumps(
            {
                "tokens": len(windows) * window,
                "window": window,
                "continuation": cont,
                "levels": record,
                "sensitivity": sens.tolist(),
                "elapsed_s": round(time.perf_counter() - t0, 1),
            }
        )
    }
    return KLTransform(fwd, inv, inv_freq.numpy(), cfg.num_kv_heads, plans, meta)


def calibrate_transform(model_dir: str | Path, **kw) -> Path:
    """Profile the model (`profile`, keyword arguments passed on) and write its transform beside it. -> path."""
    tr = profile(model_dir, **kw)
    out = Path(model_dir) / TRANSFORM_FILE
    tr.save(out)
    return out
