"""A model's chat template (Hugging Face convention) rendered in Jinja2's sandbox: chat messages -> prompt text.

The template is `chat_template.jinja` in the model directory, else the `chat_template` field of its
`tokenizer_config.json` (a string, or a list of named templates of which "default" is used). It is
rendered with `messages`, `add_generation_prompt=True`, `bos_token` / `eos_token` and `raise_exception`,
as transformers' `apply_chat_template` does; the text is then tokenized like any prompt (the tokenizer
adds its BOS), so a template should not write `bos_token` itself where the tokenizer adds one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pdserve.errors import InvalidRequest


def _raise(message: str) -> None:
    raise InvalidRequest(f"chat template: {message}", param="messages")


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _read_template(model_dir: str) -> tuple[str | None, dict]:
    config: dict = {}
    path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.exists(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read(), config
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return (template if isinstance(template, str) and template else None), config


class ChatTemplate:
    """`render(messages)` -> the prompt text; `available` is False for a model without a template."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self._specials = {"bos_token": bos_token, "eos_token": eos_token}
        self._template: jinja2.Template | None = None
        if source is not None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(source)  # a syntax error fails the coordinator's start

    @classmethod
    def from_model_dir(cls, model_dir: str) -> ChatTemplate:
        source, config = _read_template(model_dir)
        return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    @property
    def available(self) -> bool:
        return self._template is not None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """`messages`: [{"role": ..., "content": text}, ...]. InvalidRequest (400) if the model has no
        template or the template refuses the conversation (`raise_exception`) or fails on it."""
        if self._template is None:
            raise InvalidRequest(
                "this model has no chat template (tokenizer_config.json 'chat_template'): use /v1/completions",
                param="messages",
            )
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self._specials
            )
        except InvalidRequest:
            raise
        except Exception as exc:  # noqa: BLE001 - a template failing on these messages is the request's fault
            raise InvalidRequest(f"chat template failed on these messages: {exc}", param="messages") from exc
