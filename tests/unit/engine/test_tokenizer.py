from __future__ import annotations

import pytest

from engine.tokenizer import IncrementalDecoder, Tokenizer

TEXTS = [
    "def f(x):\n    return x + 1\n",
    "héllo wörld — naïve café",
    "日本語のテキストと絵文字 🎉🐍👩‍💻 mixed with ascii",
    "Ωμέγα ∑∫ √2 ≈ 1.414",
]


@pytest.fixture(scope="module")
def tok(engine_model_dir: str) -> Tokenizer:
    return Tokenizer(engine_model_dir)


def test_roundtrip_and_eos(tok: Tokenizer):
    assert tok.eos_token_ids == (0,) and tok.bos_token_id == 0
    assert tok.vocab_size == 512
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([*tok.encode("ab"), 0]) == "ab", "EOS is skipped when decoding"


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoder_concatenation_equals_full_decode(tok: Tokenizer, text: str):
    ids = tok.encode(text)
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(i) for i in ids]
    assert "".join(deltas) + dec.flush() == tok.decode(ids) == text
    assert dec.text == text
    assert all("\ufffd" not in d for d in deltas), "a delta split a multi-byte character"


def test_incremental_decoder_holds_back_partial_characters(tok: Tokenizer):
    # byte-level: a 4-byte emoji that the 512-token vocab cannot hold in one token spans several tokens
    ids = tok.encode("🐍")
    assert len(ids) > 1
    dec = IncrementalDecoder(tok)
    assert [dec.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.push(ids[-1]) == "🐍"


def test_incremental_decoder_prefix_is_context_only(tok: Tokenizer):
    prompt, out = tok.encode("x = 1"), tok.encode(" + 2")
    dec = IncrementalDecoder(tok, prefix_ids=prompt)
    assert "".join(dec.push(i) for i in out) == " + 2"


def test_flush_emits_a_dangling_partial_character(tok: Tokenizer):
    ids = tok.encode("🐍")
    dec = IncrementalDecoder(tok)
    for i in ids[:-1]:
        dec.push(i)
    assert dec.flush() == "\ufffd"
