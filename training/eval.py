"""Held-out perplexity, independent of which implementation produces the logits.

``heldout_perplexity`` scores a token stream with **non-overlapping windows**: the stream ``ids`` (length N)
is cut at positions 0, ctx, 2*ctx, ...; the window starting at ``s`` feeds ``ids[s : s+ctx]`` and is scored
on the next-token targets ``ids[s+1 : s+ctx+1]``. Every token but the first is therefore predicted exactly
once (N-1 targets), each window starts from an empty context (no KV carried over), and the result is
deterministic. Perplexity = exp(mean negative log-likelihood over the targets), accumulated in float64.

The model is a callable ``logits_fn(input_ids) -> logits``: ``input_ids`` is a ``torch.long`` tensor of
shape ``[B, T]`` (``B <= batch_size``; all rows of one call have the same ``T``; the last window may be
shorter than ``ctx``), positions start at 0 in every row, and it returns ``[B, T, vocab]`` logits (any float
dtype, any device). ``hf_logits_fn`` adapts a transformers causal LM; an engine that runs one sequence at a
time can be plugged in with ``batch_size=1``.

``unigram_perplexity`` is the baseline: a unigram model fitted on the training split's token counts with
add-one (Laplace) smoothing over the whole vocabulary, scored on exactly the same targets.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]

HELDOUT_FILE = "heldout.txt"
UNIGRAM_FILE = "unigram_counts.json"
EVAL_CTX = 512


@dataclass(frozen=True)
class PplResult:
    nll: float  # mean negative log-likelihood per target token (nats)
    ppl: float
    n_tokens: int  # number of scored targets


def _windows(n: int, ctx: int) -> list[tuple[int, int]]:
    """(start, length) of each input window over a stream of n tokens (n-1 targets)."""
    return [(s, min(ctx, n - 1 - s)) for s in range(0, n - 1, ctx)]


@torch.inference_mode()
def heldout_perplexity(
    logits_fn: LogitsFn,
    ids: Sequence[int] | torch.Tensor,
    ctx: int = EVAL_CTX,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> PplResult:
    """Perplexity of ``logits_fn`` on the token stream ``ids`` (see the module docstring).

    ``max_tokens`` limits the evaluation to the first ``max_tokens`` targets (``ids[: max_tokens + 1]``).
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens")
    wins = _windows(ids.numel(), ctx)
    total = 0.0
    count = 0
    i = 0
    while i < len(wins):
        length = wins[i][1]
        group = [wins[i]]
        i += 1
        while i < len(wins) and len(group) < batch_size and wins[i][1] == length:
            group.append(wins[i])
            i += 1
        inp = torch.stack([ids[s : s + length] for s, _ in group])
        tgt = torch.stack([ids[s + 1 : s + length + 1] for s, _ in group])
        logits = logits_fn(inp)
        if tuple(logits.shape[:2]) != tuple(inp.shape):
            raise ValueError(f"logits_fn returned shape {tuple(logits.shape)} for input {tuple(inp.shape)}")
        logp = torch.log_softmax(logits.detach().to("cpu", torch.float64), dim=-1)
        total += -logp.gather(-1, tgt.unsqueeze(-1)).sum().item()
        count += tgt.numel()
    nll = total / count
    return PplResult(nll=nll, ppl=math.exp(nll), n_tokens=count)


def hf_logits_fn(model) -> LogitsFn:
    """Adapter for a transformers causal LM (``model(input_ids).logits``), in eval mode, no KV cache."""
    model.eval()

    def fn(input_ids: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        return model(input_ids=input_ids.to(device), use_cache=False).logits

    return fn


def unigram_counts(ids: Sequence[int] | torch.Tensor, vocab_size: int) -> list[int]:
    return torch.bincount(torch.as_tensor(ids, dtype=torch.long).flatten(), minlength=vocab_size).tolist()


def unigram_perplexity(
    counts: Sequence[int], ids: Sequence[int] | torch.Tensor, max_tokens: int | None = None
) -> PplResult:
    """Add-one-smoothed unigram perplexity on the same targets as ``heldout_perplexity`` (``ids[1:]``)."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    c = torch.as_tensor(counts, dtype=torch.float64)
    logp = torch.log((c + 1.0) / (c.sum() + c.numel()))
    tgt = ids[1:]
    nll = -logp[tgt].sum().item() / tgt.numel()
    return PplResult(nll=nll, ppl=math.exp(nll), n_tokens=tgt.numel())


def load_heldout_ids(model_dir: str | Path) -> list[int]:
    """The committed held-out split of a shipped model, tokenized with its tokenizer.json."""
    from training.tokenizer import encode, load_tokenizer

    model_dir = Path(model_dir)
    text = (model_dir / HELDOUT_FILE).read_bytes().decode("utf-8")
    return encode(load_tokenizer(model_dir), text)


def load_unigram_counts(model_dir: str | Path) -> list[int]:
    return json.loads((Path(model_dir) / UNIGRAM_FILE).read_text())["counts"]
