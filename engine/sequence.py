"""`Sequence`: one request's token state inside an engine (prompt, outputs, KV blocks, progress)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.params import SamplingParams


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    output_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # KV blocks owned (prompt + max_tokens, at admission)
    num_cached: int = 0  # tokens (from the start of all_ids) whose KV is in the cache
    finish_reason: str | None = None  # "stop" | "length" | None while running

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefill_done(self) -> bool:
        return self.num_cached >= len(self.prompt_ids)
