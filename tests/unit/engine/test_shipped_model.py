"""pdserve's engine on the shipped trained model: logits agree with transformers on held-out text,
and the held-out perplexity in the model card is reproduced by the engine."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.block_manager import BlockManager
from engine.model import BatchMeta
from engine.runner import ModelRunner

MODEL = Path(__file__).resolve().parents[3] / "models" / "pdserve-tiny-py"
pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").exists(), reason="shipped model not built")


def engine_logits_fn(runner: ModelRunner):
    """[B, T] token ids -> [B, T, V] logits from pdserve's paged engine (each row its own sequence)."""
    bm = BlockManager(runner.kv_cache.num_blocks, runner.block_size)

    def fn(ids: torch.Tensor) -> torch.Tensor:
        out = []
        for row in ids.tolist():
            blocks = bm.allocate(len(row))
            meta = BatchMeta.build([blocks], [0], [len(row)], runner.block_size, runner.torch_device)
            meta = replace(meta, last_index=torch.arange(len(row)))  # logits at every position
            with torch.inference_mode():
                out.append(runner.model(torch.tensor(row), meta, runner.kv_cache).float())
            bm.free(blocks)
        bm.check_integrity(owners=[])
        return torch.stack(out)

    return fn


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(str(MODEL), num_kv_blocks=64)


def test_engine_logits_match_transformers_on_heldout_text(runner: ModelRunner) -> None:
    transformers = pytest.importorskip("transformers")
    from training.eval import load_heldout_ids

    heldout = load_heldout_ids(MODEL)
    n, width = 4, 384  # 4 windows spread evenly over the whole held-out split
    stride = (len(heldout) - width) // (n - 1)
    ids = torch.tensor([heldout[i * stride : i * stride + width] for i in range(n)])  # [4, 384]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(MODEL), torch_dtype=torch.float32).eval()
    with torch.inference_mode():
        want = hf(input_ids=ids, use_cache=False).logits
    got = engine_logits_fn(runner)(ids)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() == 1.0


def test_engine_reproduces_model_card_perplexity(runner: ModelRunner) -> None:
    from training.card import read_card_perplexity
    from training.eval import heldout_perplexity, load_heldout_ids, load_unigram_counts, unigram_perplexity

    ids = load_heldout_ids(MODEL)
    result = heldout_perplexity(engine_logits_fn(runner), ids, batch_size=1)
    card = read_card_perplexity(MODEL)
    assert abs(result.ppl - card) / card < 0.01, f"engine {result.ppl:.3f} vs card {card:.3f}"
    assert result.ppl <= unigram_perplexity(load_unigram_counts(MODEL), ids).ppl / 3


def test_generation_config_penalty_greedy_equals_transformers(runner: ModelRunner) -> None:
    """The shipped generation_config's repetition penalty, applied by pdserve's sampler over prompt +
    output, gives transformers' greedy `generate` token for token (prefill samples the first token)."""
    from transformers import AutoModelForCausalLM

    from engine.local import LocalEngine
    from engine.params import SamplingParams, generation_defaults

    rp = generation_defaults(str(MODEL))["repetition_penalty"]
    assert rp > 1.0
    engine = LocalEngine(runner)
    hf = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32).eval()
    for prompt in ("def fibonacci(n):", "class Stack:\n"):
        ids = runner.tokenizer.encode(prompt)
        params = SamplingParams(max_tokens=40, ignore_eos=True, repetition_penalty=rp)
        ours = engine.generate([ids], [params])[0]
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, repetition_penalty=rp)
        theirs = out[0, len(ids) :].tolist()  # stops early if it samples EOS
        assert len(theirs) >= 8 and ours[: len(theirs)] == theirs, prompt
