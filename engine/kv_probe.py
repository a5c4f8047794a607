"""Prefill a prompt, swap its KV for another version (e.g. a codec's reconstruction), and read the logits of
a teacher-forced continuation: how the KV codec benchmark (`bench.codec`) and the CacheGen bit planner
(`calibration.plan`) measure what a lossy KV cache does to the model's predictions.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVProbe:
    """A ModelRunner with one sequence's worth of blocks (CPU), for prefill + teacher-forced continuation."""

    def __init__(self, model_dir: str, max_tokens: int) -> None:
        from engine.runner import ModelRunner

        self.runner = ModelRunner(model_dir, num_kv_blocks=-(-max_tokens // 16) + 1, block_size=16)
        self.cfg = self.runner.config
        self.blocks = list(range(self.runner.kv_cache.num_blocks))

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers

    def prefill(self, prompt: list[int]) -> list[tuple[Tensor, Tensor]]:
        """Prefill `prompt` into the cache; -> its K/V per layer (copies, [T, Hkv, D], serving dtype)."""
        from engine.params import SamplingParams
        from engine.sequence import Sequence

        seq = Sequence("probe", list(prompt), SamplingParams(max_tokens=1), blocks=self.blocks)
        self.runner.prefill([seq])
        cache = self.runner.kv_cache
        return [cache.read(layer, self.blocks, len(prompt)) for layer in range(self.num_layers)]

    def set_prompt_kv(self, kv: list[tuple[Tensor, Tensor]]) -> None:
        """Overwrite the prompt's KV (every layer, [T, Hkv, D] each) in the cache."""
        for layer, (k, v) in enumerate(kv):
            self.runner.kv_cache.write(layer, self.blocks, 0, k, v)

    def continuation_logits(self, prompt_len: int, feed: list[int]) -> Tensor:
        """Logits [len(feed), V] (fp64, CPU) of every fed token, reading the cache's prompt KV (teacher
        forcing: token i of `feed` sits at position prompt_len + i)."""
        from engine.model import BatchMeta

        r = self.runner
        meta = BatchMeta.build(
            [self.blocks], [prompt_len], [len(feed)], r.block_size, r.torch_device, self.cfg.sliding_window
        )
        ids = torch.tensor(feed, dtype=torch.long, device=r.torch_device)
        with torch.inference_mode():
            h = r.model.run_layers(r.model.embed(ids), meta, r.kv_cache)
            logits = r.model.compute_logits(h, torch.arange(len(feed), device=r.torch_device))
        return logits.double().cpu()

    def first_token(self, prompt: list[int]) -> int:
        """The greedy token after `prompt`, read through the cache's KV of its first len - 1 tokens (after
        `prefill(prompt)`: the exact KV, i.e. the token prefill samples). Rewrites the last token's KV."""
        return int(self.continuation_logits(len(prompt) - 1, [prompt[-1]])[-1].argmax())

    def greedy(self, prompt_len: int, first: int, n: int, margins: list[float] | None = None) -> list[int]:
        """`n` greedy tokens after the cache's prompt KV, starting with `first` (the token prefill sampled, as in
        serving); each later token is fed one at a time and its KV is computed exactly, as decode does.
        `margins`, if given, receives each chosen token's top-1 minus top-2 logit (n - 1 values): how far a
        perturbation of the KV must move the logits to flip that step."""
        out = [first]
        while len(out) < n:
            logits = self.continuation_logits(prompt_len + len(out) - 1, [out[-1]])[-1]
            if margins is not None:
                top2 = logits.topk(2).values
                margins.append(float(top2[0] - top2[1]))
            out.append(int(logits.argmax()))
        return out


def kl_per_token(ref_logp: Tensor, logits: Tensor) -> Tensor:
    """KL(ref || softmax(logits)) per row, nats, clamped at 0: ref_logp, logits [N, V] -> [N]."""
    logp = torch.log_softmax(logits, -1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0)
