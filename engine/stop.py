"""When a sequence is finished: EOS ("stop", unless ignore_eos), a stop string ("stop"), max_tokens ("length")."""

from __future__ import annotations

from engine.sequence import Sequence


def check_stop(seq: Sequence, text_so_far: str, eos_token_ids: tuple[int, ...] | list[int]) -> str | None:
    """The finish reason after `seq`'s latest output token, or None to keep going.

    `text_so_far` is the decoded text of `seq.output_ids`. EOS is checked first, then stop strings, then
    length, so a request whose last allowed token is EOS finishes with "stop".
    """
    if not seq.output_ids:
        return None
    if not seq.params.ignore_eos and seq.output_ids[-1] in eos_token_ids:
        return "stop"
    if find_stop(text_so_far, seq.params.stop) is not None:
        return "stop"
    if len(seq.output_ids) >= seq.params.max_tokens:
        return "length"
    return None


def find_stop(text: str, stop: tuple[str, ...] | list[str]) -> int | None:
    """Index in `text` where the earliest stop string starts (the text to return ends there), or None."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None
