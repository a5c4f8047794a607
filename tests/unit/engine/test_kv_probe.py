"""KVProbe (engine.kv_probe): what bench.codec and the CacheGen planner read is what serving computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.kv_probe import KVProbe, kl_per_token
from engine.local import LocalEngine
from engine.params import SamplingParams


def test_greedy_through_the_exact_kv_equals_the_engine(tiny_model_dir: Path) -> None:
    prompt = [(7 * i + 3) % 2000 for i in range(40)]
    want = LocalEngine.from_model_dir(str(tiny_model_dir)).generate(
        [prompt], [SamplingParams(max_tokens=12, ignore_eos=True)]
    )[0]
    probe = KVProbe(str(tiny_model_dir), 64)
    kv = probe.prefill(prompt)
    first = probe.first_token(prompt)
    assert first == want[0]
    probe.set_prompt_kv(kv)
    margins: list[float] = []
    assert probe.greedy(len(prompt), first, 12, margins) == want
    # each margin is that step's top-1 - top-2 logit: recomputed here by teacher forcing the 11 fed tokens
    top2 = probe.continuation_logits(len(prompt), want[:11]).topk(2, -1).values
    assert margins == pytest.approx((top2[:, 0] - top2[:, 1]).tolist(), abs=1e-3)


def test_perturbed_kv_changes_the_logits_and_exact_kv_restores_them(tiny_model_dir: Path) -> None:
    prompt = list(range(100, 130))
    probe = KVProbe(str(tiny_model_dir), 64)
    kv = probe.prefill(prompt)
    feed = [5, 6, 7, 8]
    ref = torch.log_softmax(probe.continuation_logits(len(prompt), feed), -1)
    probe.set_prompt_kv([(k + 0.5 * torch.randn_like(k), v) for k, v in kv])
    assert float(kl_per_token(ref, probe.continuation_logits(len(prompt), feed)).mean()) > 1e-4
    probe.set_prompt_kv(kv)
    assert float(kl_per_token(ref, probe.continuation_logits(len(prompt), feed)).max()) < 1e-9
