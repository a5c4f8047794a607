"""Text <-> token ids for a model directory (`tokenizer.json`), and streaming detokenisation."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import tokenizers

from engine.config import parse_token_ids

REPLACEMENT_CHAR = "\ufffd"  # what a byte-level decoder emits for an incomplete UTF-8 sequence


class Tokenizer:
    """`tokenizers.Tokenizer` from `model_dir/tokenizer.json` plus the model's EOS / BOS ids."""

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir
        self._tok = tokenizers.Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        gen, cfg = _read_json(model_dir, "generation_config.json"), _read_json(model_dir, "config.json")
        eos = parse_token_ids(gen.get("eos_token_id")) + parse_token_ids(cfg.get("eos_token_id"))
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))  # union, generation_config first
        bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
        self.bos_token_id: int | None = int(bos) if bos is not None else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas whose concatenation equals `tokenizer.decode(ids)`.

    A delta is only released once the decoded window no longer ends in an incomplete UTF-8 character, so
    a multi-byte character split across byte-level tokens is never cut in half. `prefix_ids` (e.g. the
    prompt's last tokens) give context so tokenizers that strip a leading space decode the first token
    right; they are never emitted.
    """

    def __init__(
        self, tokenizer: Tokenizer, prefix_ids: Iterable[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer, self._skip = tokenizer, skip_special_tokens
        self._ids: list[int] = list(prefix_ids)
        self._prefix_offset = 0  # window start: text before it has been emitted and is stable
        self._read_offset = len(self._ids)  # ids before this have been emitted
        self.text = ""  # everything emitted so far

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text ("" while a character is still incomplete)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a stream: whatever is still held back (possibly a lone U+FFFD)."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        delta = self._decode(self._prefix_offset)[len(prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self.text += delta
        return delta


def _read_json(model_dir: str, name: str) -> dict:
    path = os.path.join(model_dir, name)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)
