"""A request's sampling parameters and their validation, and the model's generation defaults.

Pure Python (no torch): the coordinator validates requests with these without loading torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pdserve.errors import InvalidRequest


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 -> greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 -> no top-k filter
    seed: int | None = None  # None -> a fresh random seed per token
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # > 0; 1 = off. Logits of tokens already in the sequence (prompt and output) are divided by it where
    # positive and multiplied where negative (the CTRL / Hugging Face / vLLM repetition penalty).
    repetition_penalty: float = 1.0
    # The output index of this request's first token: 0, except for a request the gateway resumes on another
    # instance after `step_offset` tokens were already sent (failover). Its i-th token is sampled as step
    # step_offset + i, so a seeded resumed request draws exactly what the undisturbed one would have.
    step_offset: int = 0

    def validate(self, prompt_len: int, max_model_len: int) -> None:
        """Raise InvalidRequest with a message naming the first bad field."""
        if prompt_len <= 0:
            raise InvalidRequest("prompt is empty")
        if self.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be >= 1, got {self.max_tokens}")
        if prompt_len + self.max_tokens > max_model_len:
            raise InvalidRequest(
                f"prompt ({prompt_len} tokens) + max_tokens ({self.max_tokens}) exceeds the model's "
                f"maximum length {max_model_len}"
            )
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty")
        if self.step_offset < 0:
            raise InvalidRequest(f"step_offset must be >= 0, got {self.step_offset}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise InvalidRequest(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def generation_defaults(model_dir: str) -> dict[str, float]:
    """Sampling defaults a model ships in `generation_config.json` (Hugging Face field names) that pdserve
    applies to requests leaving them unset, as transformers and vLLM do. Only `repetition_penalty` is read;
    pdserve's temperature default stays 0 (greedy) whatever the file says."""
    path = Path(model_dir) / "generation_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    rp = cfg.get("repetition_penalty")
    return {"repetition_penalty": float(rp)} if isinstance(rp, int | float) and rp > 0 else {}
