from __future__ import annotations

from engine.params import SamplingParams
from engine.sequence import Sequence
from engine.stop import check_stop, find_stop

EOS = (0, 7)


def _seq(outputs: list[int], **params) -> Sequence:
    return Sequence("r", [5, 6], SamplingParams(**params), output_ids=outputs)


def test_eos_stops_unless_ignored():
    assert check_stop(_seq([3, 7], max_tokens=10), "ab", EOS) == "stop"
    assert check_stop(_seq([3, 0], max_tokens=10), "ab", EOS) == "stop"
    assert check_stop(_seq([3, 7], max_tokens=10, ignore_eos=True), "ab", EOS) is None
    assert check_stop(_seq([7, 3], max_tokens=10), "ab", EOS) is None, "only the latest token counts"


def test_max_tokens_gives_length_and_eos_on_last_token_gives_stop():
    assert check_stop(_seq([3, 4], max_tokens=2), "ab", EOS) == "length"
    assert check_stop(_seq([3], max_tokens=2), "a", EOS) is None
    assert check_stop(_seq([3, 7], max_tokens=2), "a", EOS) == "stop"
    assert check_stop(_seq([3, 7], max_tokens=2, ignore_eos=True), "a", EOS) == "length"


def test_stop_strings_anywhere_in_generated_text():
    assert check_stop(_seq([3, 4], max_tokens=10, stop=("\n\n", "END")), "x = 1\n\ny", EOS) == "stop"
    assert check_stop(_seq([3, 4], max_tokens=10, stop=("END",)), "the EN", EOS) is None
    assert check_stop(_seq([3, 4], max_tokens=10, stop=("END",)), "the END", EOS) == "stop"
    assert check_stop(_seq([], max_tokens=10, stop=("a",)), "", EOS) is None


def test_find_stop_returns_earliest_start():
    assert find_stop("abc STOP def END", ("END", "STOP")) == 4
    assert find_stop("abc", ("x",)) is None
    assert find_stop("abc", ()) is None
