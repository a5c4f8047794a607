"""The compiled rANS coder: exact round trips near the entropy, deterministic integer tables, typed errors
on damaged words and bad symbols."""

from __future__ import annotations

import numpy as np
import pytest

from kv_transfer.codec import rans
from kv_transfer.codec.cachegen_core import table_codes
from kv_transfer.errors import CodecError, FrameCorrupted

pytestmark = pytest.mark.skipif(not rans.available(), reason="no C compiler for the rANS coder")


def skewed_symbols(t: int, c: int, n: int, seed: int = 0) -> np.ndarray:
    """uint8 [t, c], channel j drawing from its own skewed distribution over [0, n)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(n, 0.4), size=c)
    return np.stack([rng.choice(n, size=t, p=p[j]) for j in range(c)], 1).astype(np.uint8)


def entropy_bits(sym: np.ndarray, n: int) -> float:
    counts = rans.histogram(sym, n)
    p = counts / counts.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(-(counts * np.where(counts > 0, np.log2(p), 0)).sum())


@pytest.mark.parametrize(("t", "c", "n"), [(1, 1, 1), (1, 3, 7), (7, 5, 3), (1024, 64, 7), (300, 16, 63)])
def test_roundtrip_exact_and_near_entropy(t: int, c: int, n: int) -> None:
    sym = skewed_symbols(t, c, n, seed=t + c + n)
    tab = rans.tables_from_codes(table_codes(rans.histogram(sym, n)))
    words = rans.encode(sym, tab)
    assert np.array_equal(rans.decode(words, t, tab), sym)
    if t * c >= 4096:  # 4 state words and the code lengths' half-bit steps: within 3% + 0.05 bit/symbol
        assert words.size * 32 <= 1.03 * entropy_bits(sym, n) + 0.05 * t * c + 128


def test_histogram_counts_per_channel() -> None:
    sym = np.array([[0, 2], [0, 1], [1, 2]], dtype=np.uint8)
    assert rans.histogram(sym, 3).tolist() == [[2, 1, 0], [0, 1, 2]]
    with pytest.raises(CodecError):
        rans.histogram(sym, 2)


def test_tables_are_integer_and_every_symbol_stays_codable() -> None:
    codes = np.array([[0, 15, 15, 3], [15, 15, 15, 15]], dtype=np.uint8)  # absent symbols; an empty row
    tab = rans.tables_from_codes(codes)
    assert tab.freq.dtype == np.uint32 and (tab.freq >= 1).all()
    assert (tab.freq.sum(1) == rans.PROB_SCALE).all()
    assert tab.freq[1].max() - tab.freq[1].min() <= 1  # empty row: uniform
    sym = np.array([[1, 3], [2, 0]], dtype=np.uint8)  # symbols the table calls absent still code
    assert np.array_equal(rans.decode(rans.encode(sym, tab), 2, tab), sym)
    probs = np.array([[0.5, 0.25, 0.25, 0.0]])
    assert np.array_equal(rans.tables_from_probs(probs).freq, rans.tables_from_probs(probs * 3).freq)


def test_damaged_or_truncated_words_are_frame_corrupted() -> None:
    sym = skewed_symbols(512, 8, 7)
    tab = rans.tables_from_codes(table_codes(rans.histogram(sym, 7)))
    words = rans.encode(sym, tab)
    rng = np.random.default_rng(0)
    for pos in rng.integers(0, words.size, 40).tolist():
        bad = words.copy()
        bad[pos] ^= np.uint32(1 << int(rng.integers(0, 32)))
        with pytest.raises(FrameCorrupted):
            rans.decode(bad, 512, tab)
    for cut in (0, 3, words.size // 2, words.size - 1):
        with pytest.raises(FrameCorrupted):
            rans.decode(words[:cut], 512, tab)
    with pytest.raises(FrameCorrupted):
        rans.decode(np.append(words, np.uint32(7)), 512, tab)
    with pytest.raises(FrameCorrupted):  # another symbol count
        rans.decode(words, 511, tab)


def test_bad_symbols_and_shapes_are_codec_errors() -> None:
    tab = rans.tables_from_codes(np.zeros((2, 3), dtype=np.uint8))
    with pytest.raises(CodecError):
        rans.encode(np.array([[0, 3]], dtype=np.uint8), tab)  # symbol >= n
    with pytest.raises(CodecError):
        rans.encode(np.zeros((4, 3), dtype=np.uint8), tab)  # 3 channels, tables for 2
    with pytest.raises(CodecError):
        rans.Tables(np.ones((1, 3), dtype=np.uint32))  # rows must sum to PROB_SCALE
