"""Sampling parameters, their validation, and the stateless per-(seed, step) token sampler."""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass

import torch
from torch import Tensor

from pdserve.errors import InvalidRequest


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 -> greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 -> no top-k filter
    seed: int | None = None  # None -> a fresh random seed per token
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # > 0; 1 = off. Logits of tokens already in the sequence (prompt and output) are divided by it where
    # positive and multiplied where negative (the CTRL / Hugging Face / vLLM repetition penalty).
    repetition_penalty: float = 1.0

    def validate(self, prompt_len: int, max_model_len: int) -> None:
        """Raise InvalidRequest with a message naming the first bad field."""
        if prompt_len <= 0:
            raise InvalidRequest("prompt is empty")
        if self.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be >= 1, got {self.max_tokens}")
        if prompt_len + self.max_tokens > max_model_len:
            raise InvalidRequest(
                f"prompt ({prompt_len} tokens) + max_tokens ({self.max_tokens}) exceeds the model's "
                f"maximum length {max_model_len}"
            )
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise InvalidRequest(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def step_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed that depends only on (seed, step)."""
    digest = hashlib.sha256(f"pdserve:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample(
    logits: Tensor,
    params: list[SamplingParams],
    steps: list[int],
    histories: list[list[int]] | None = None,
) -> list[int]:
    """logits: [N, V] -> one token per row. Row i's token depends only on (logits[i], params[i], steps[i],
    histories[i]); histories[i] is the sequence so far (prompt + output), read by the repetition penalty."""
    if not (logits.shape[0] == len(params) == len(steps)):
        raise ValueError(f"{logits.shape[0]} logit rows, {len(params)} params, {len(steps)} steps")
    if histories is not None and any(p.repetition_penalty != 1.0 for p in params):
        logits = apply_repetition_penalty(logits, params, histories)
    greedy = logits.argmax(dim=-1).tolist()  # [N]
    tokens = []
    for i, (p, step) in enumerate(zip(params, steps, strict=True)):
        tokens.append(greedy[i] if p.greedy else _sample_row(logits[i], p, step))
    return tokens


def _sample_row(logits: Tensor, p: SamplingParams, step: int) -> int:
    # logits: [V]; sampled on CPU in fp32 so every device draws identically from identical logits
    scaled = logits.detach().to("cpu", torch.float32) / p.temperature  # [V]
    probs = torch.softmax(filter_top_k_top_p(scaled, p.top_k, p.top_p), dim=-1)  # [V]
    seed = p.seed if p.seed is not None else secrets.randbits(63)
    gen = torch.Generator().manual_seed(step_seed(seed, step))
    u = torch.rand((), generator=gen, dtype=torch.float64)
    cdf = probs.double().cumsum(0)  # [V], inverse-CDF draw: first index whose cdf exceeds u * total
    idx = int(torch.searchsorted(cdf, (u * cdf[-1]).reshape(1), right=True)[0])
    return min(idx, probs.shape[0] - 1)  # cdf[idx] > u * total >= cdf[idx - 1], so probs[idx] > 0


def apply_repetition_penalty(
    logits: Tensor, params: list[SamplingParams], histories: list[list[int]]
) -> Tensor:
    """logits [N, V] -> a copy with row i's logits of the tokens in histories[i] penalised (see SamplingParams)."""
    logits = logits.clone()
    for i, p in enumerate(params):
        if p.repetition_penalty == 1.0 or not histories[i]:
            continue
        seen = torch.tensor(sorted(set(histories[i])), dtype=torch.long, device=logits.device)
        row = logits[i, seen]
        logits[i, seen] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
    return logits


def generation_defaults(model_dir: str) -> dict[str, float]:
    """Sampling defaults a model ships in `generation_config.json` (Hugging Face field names) that pdserve
    applies to requests leaving them unset, as transformers and vLLM do. Only `repetition_penalty` is read;
    pdserve's temperature default stays 0 (greedy) whatever the file says."""
    import json
    from pathlib import Path

    path = Path(model_dir) / "generation_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    rp = cfg.get("repetition_penalty")
    return {"repetition_penalty": float(rp)} if isinstance(rp, int | float) and rp > 0 else {}


def filter_top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """logits: [V] -> [V] with filtered-out entries set to -inf. The top token always survives."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # [V]
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(0) - probs  # probability of strictly better tokens
        drop_sorted = mass_before >= top_p  # keeps the smallest prefix reaching top_p (at least one)
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits
