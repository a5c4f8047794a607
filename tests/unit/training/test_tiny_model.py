"""The shipped model (models/pdserve-tiny-py): loads with transformers, reproduces its model card's held-out
perplexity, beats the unigram baseline by 3x, and continues Python like Python."""

from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path

import pytest
import torch

from training.card import read_card_perplexity
from training.eval import (
    heldout_perplexity,
    hf_logits_fn,
    load_heldout_ids,
    load_unigram_counts,
    unigram_perplexity,
)
from training.tokenizer import encode, load_tokenizer

MODEL_DIR = Path(
    os.environ.get(
        "PDSERVE_TINY_MODEL_DIR", Path(__file__).resolve().parents[3] / "models" / "pdserve-tiny-py"
    )
)
REQUIRED = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "generation_config.json",
    "README.md",
    "loss_curve.png",
    "heldout.txt",
    "unigram_counts.json",
]


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32)
    m.eval()
    return m


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(MODEL_DIR)


@pytest.fixture(scope="module")
def heldout_ids():
    return load_heldout_ids(MODEL_DIR)


def test_shipped_files_and_size():
    for name in REQUIRED:
        assert (MODEL_DIR / name).is_file(), name
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert total <= 25_000_000, f"{total} bytes"
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # grouped-query attention
    assert 4096 <= cfg["vocab_size"] <= 8192
    assert cfg["max_position_embeddings"] >= 1024
    gen = json.loads((MODEL_DIR / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"] == 0
    tok = load_tokenizer(MODEL_DIR)
    assert tok.id_to_token(0) == "<|endoftext|>"
    # prompts get <|endoftext|> as BOS (the corpus form, training.tokenizer.encode, does not)
    prompt = "def fibonacci(n):"
    assert tok.encode(prompt).ids == [0, *encode(tok, prompt)]


def test_auto_tokenizer_matches_tokenizer_json(tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    text = "class Foo:\n    def bar(self, x):\n        return x  # é ✓\n"
    assert hf(text).input_ids == tok.encode(text).ids
    assert hf.eos_token_id == hf.bos_token_id == 0
    assert hf.decode(hf(text).input_ids, skip_special_tokens=True) == text


def test_tokenizer_round_trips_heldout(tok, heldout_ids):
    text = (MODEL_DIR / "heldout.txt").read_bytes().decode("utf-8")
    assert tok.decode(heldout_ids, skip_special_tokens=False) == text
    assert heldout_ids[0] == 0 and heldout_ids.count(0) > 1  # documents joined with <|endoftext|>


def test_loads_with_transformers_and_logits_are_consistent(model, heldout_ids):
    ids = torch.tensor([heldout_ids[:200]])
    with torch.inference_mode():
        full = model(input_ids=ids, use_cache=False).logits
        assert full.shape == (1, 200, model.config.vocab_size)
        assert torch.isfinite(full).all()
        # prefill 150 tokens then decode 50 one at a time through the KV cache: same logits
        out = model(input_ids=ids[:, :150], use_cache=True)
        # the KV cache's name: `cache` in recent transformers (5.2x), `past_key_values` before
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        steps, past = [out.logits], out[name]
        for t in range(150, 200):
            o = model(input_ids=ids[:, t : t + 1], use_cache=True, **{name: past})
            steps.append(o.logits)
            past = o[name]
    incremental = torch.cat(steps, dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-4, rtol=1e-4)
    # the model actually predicts held-out text: top-1 accuracy far above chance (1 / vocab_size) in each of
    # 8 windows of 200 tokens spread evenly over the whole split (0.20 to 0.37 each when written)
    n, width = 8, 200
    stride = (len(heldout_ids) - width) // (n - 1)
    accs = []
    with torch.inference_mode():
        for start in range(0, n * stride, stride):
            window = torch.tensor([heldout_ids[start : start + width]])
            logits = model(input_ids=window, use_cache=False).logits
            accs.append((logits[0, :-1].argmax(-1) == window[0, 1:]).float().mean().item())
    assert min(accs) > 0.1, accs


def test_heldout_perplexity_matches_card_and_beats_unigram(model, heldout_ids):
    recorded = read_card_perplexity(MODEL_DIR)
    got = heldout_perplexity(hf_logits_fn(model), heldout_ids)
    assert got.n_tokens == len(heldout_ids) - 1
    assert abs(got.ppl - recorded) <= 0.01 * recorded, (got.ppl, recorded)
    uni = unigram_perplexity(load_unigram_counts(MODEL_DIR), heldout_ids)
    assert uni.n_tokens == got.n_tokens
    assert got.ppl <= uni.ppl / 3, (got.ppl, uni.ppl)


def test_fibonacci_continuation_reads_as_python(model, tok):
    prompt = "def fibonacci(n):"
    ids = torch.tensor([tok.encode(prompt).ids])  # as a prompt: <|endoftext|> (BOS) first
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=0, pad_token_id=0)
    cont = tok.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
    # the body starts on the next line, indented
    assert cont.startswith("\n"), repr(cont)
    first = cont.lstrip("\n").splitlines()[0]
    assert first.startswith("    ") and first.strip(), repr(cont)
    words = set(cont.replace("(", " ").replace(":", " ").split())
    assert words & {"return", "if", "for", "while", "def", "=", "raise", "yield", "else"}, repr(cont)


# --- training.eval on toy inputs ------------------------------------------------------------------------


def _uniform(vocab: int):
    return lambda x: torch.zeros(*x.shape, vocab)


def test_uniform_logits_give_vocab_perplexity():
    ids = list(range(50)) * 30
    r = heldout_perplexity(_uniform(64), ids, ctx=16, batch_size=3)
    assert r.n_tokens == len(ids) - 1
    assert math.isclose(r.ppl, 64.0, rel_tol=1e-9)


def test_windows_are_non_overlapping_and_batching_invariant():
    seen: list[tuple[int, ...]] = []

    def fn(x):
        seen.extend(tuple(row.tolist()) for row in x)
        # deterministic, position-free logits so the score depends only on the targets
        return torch.nn.functional.one_hot(x % 7, 7).float() * 2.0

    ids = torch.arange(103) % 11 % 7
    a = heldout_perplexity(fn, ids, ctx=10, batch_size=4)
    starts = len(seen)
    assert starts == 11  # windows at 0, 10, ..., 100; the last one holds 2 inputs
    assert [len(w) for w in seen] == [10] * 10 + [2]
    b = heldout_perplexity(fn, ids, ctx=10, batch_size=1)
    assert math.isclose(a.nll, b.nll, rel_tol=1e-12) and a.n_tokens == b.n_tokens == 102
    c = heldout_perplexity(fn, ids, ctx=10, max_tokens=20)
    assert c.n_tokens == 20


def test_unigram_add_one():
    counts = [3, 1, 0, 0]
    r = unigram_perplexity(counts, [0, 0, 1, 2])
    # p = (c+1)/(4+4): targets 0,1,2 -> 4/8, 2/8, 1/8
    assert math.isclose(r.nll, -(math.log(0.5) + math.log(0.25) + math.log(0.125)) / 3)
