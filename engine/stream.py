"""One request's output stream: text deltas and the finish decision, identical in every process.

The gateway, the decode service and the local engine all feed sampled tokens through a
`StopChecker`, so they agree on when a request ends (EOS, stop string, max_tokens: `engine.stop`)
and on its text. Text is released lazily: while a stop string might still be completing, the last
`max(len(stop)) - 1` characters are held back, and a matched stop string is never returned.
"""

from __future__ import annotations

from engine.params import SamplingParams
from engine.sequence import Sequence
from engine.stop import check_stop, find_stop
from engine.tokenizer import IncrementalDecoder, Tokenizer


class StopChecker:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams) -> None:
        self._seq = Sequence("", [], params)  # holds output ids only; check_stop reads it
        self._decoder = IncrementalDecoder(tokenizer)
        self._eos = tokenizer.eos_token_ids
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        self._released = 0  # characters of text already returned by take_text
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        """All generated text so far, cut before a matched stop string."""
        text = self._decoder.text
        cut = find_stop(text, self._seq.params.stop)
        return text if cut is None else text[:cut]

    def push(self, token_id: int) -> str | None:
        """Add one generated token; return the finish reason once the request is done."""
        if self.finish_reason is not None:
            raise RuntimeError("token pushed after the request finished")
        self._seq.output_ids.append(token_id)
        self._decoder.push(token_id)
        self.finish_reason = check_stop(self._seq, self._decoder.text, self._eos)
        if self.finish_reason is not None and find_stop(self._decoder.text, self._seq.params.stop) is None:
            self._decoder.flush()  # finished without a stop string: release any held-back bytes
        return self.finish_reason

    def take_text(self, final: bool = False) -> str:
        """Text not yet returned that can no longer become part of a stop string."""
        text = self.text
        end = (
            len(text)
            if (final or self.finish_reason is not None)
            else max(self._released, len(text) - self._holdback)
        )
        delta = text[self._released : end]
        self._released = end
        return delta
