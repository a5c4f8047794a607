"""The OpenAI-compatible API's shapes: request bodies (pydantic), their mapping onto the gateway's
`GenerateRequest`, and the response / stream-chunk objects. Pure: no I/O, no server.

Supported: `/v1/completions` and `/v1/chat/completions` with max_tokens (max_completion_tokens), temperature
(unset: 1, as OpenAI's API), top_p, seed, stop, n = 1, stream + stream_options.include_usage, and pdserve's
own fields as extra body fields: top_k, repetition_penalty, ignore_eos, max_kv_kl, request_id and
return_token_ids (each choice / chunk then carries its `token_ids`, as vLLM's field of that name).
Refused with 400 rather than ignored: n > 1, best_of > 1, echo, suffix, logprobs / top_logprobs (the
engine does not return them), presence / frequency penalties, logit_bias, and any unknown field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pdserve.errors import InvalidRequest, ModelNotFound
from pdserve.v1 import generation_pb2

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context left
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default (pdserve's gRPC API defaults to 0, greedy)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # None: the served model
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted; no effect
    # pdserve's own fields
    top_k: int = 0
    repetition_penalty: float | None = None  # unset: the model's generation_config.json default
    ignore_eos: bool = False
    max_kv_kl: float | None = None
    request_id: str | None = None
    return_token_ids: bool = False


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


Kind = Literal["completion", "chat"]


# ---- requests -----------------------------------------------------------------------------------
def check_model(body: _Common, served: str) -> None:
    if body.model is not None and body.model != served:
        raise ModelNotFound(
            f"The model `{body.model}` does not exist: this server serves `{served}` (GET /v1/models)",
            param="model",
        )


def refuse_unsupported(body: CompletionRequest | ChatRequest) -> None:
    """400 for every field the engine cannot honour, so that nothing asked for is silently ignored."""

    def no(param: str, why: str) -> None:
        raise InvalidRequest(f"{param}: {why}", param=param)

    if body.n != 1:
        no("n", f"only n=1 is supported, got {body.n}")
    if body.stream_options is not None and not body.stream:
        no("stream_options", "only allowed when stream is true")
    if body.presence_penalty or body.frequency_penalty:
        no(
            "presence_penalty" if body.presence_penalty else "frequency_penalty",
            "not supported (use repetition_penalty)",
        )
    if body.logit_bias:
        no("logit_bias", "not supported")
    if body.seed is not None and not 0 <= body.seed < 2**64:
        no("seed", f"must be in [0, 2**64), got {body.seed}")
    if isinstance(body, CompletionRequest):
        if body.logprobs is not None:
            no("logprobs", "not supported: the engine does not return log probabilities")
        if body.echo:
            no("echo", "not supported")
        if body.best_of not in (None, 1):
            no("best_of", f"only best_of=1 is supported, got {body.best_of}")
        if body.suffix:
            no("suffix", "not supported")
    else:
        if body.logprobs or body.top_logprobs is not None:
            no("logprobs", "not supported: the engine does not return log probabilities")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            no("max_tokens", "give max_tokens or max_completion_tokens, not both")


def completion_prompt(body: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request: text or token ids (a list of one prompt is accepted)."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise InvalidRequest(f"one prompt per request, got {len(prompt)}", param="prompt")
        prompt = prompt[0]
    return prompt  # type: ignore[return-value]


def chat_messages(body: ChatRequest) -> list[dict[str, str]]:
    """The messages as the chat template reads them: role and text content."""
    out = []
    for i, m in enumerate(body.messages):
        if m.content is None or isinstance(m.content, str):
            text = m.content or ""
        else:
            kinds = {p.type for p in m.content} - {"text"}
            if kinds:
                raise InvalidRequest(
                    f"messages[{i}].content: only text parts are supported, got {sorted(kinds)}",
                    param=f"messages.{i}.content",
                )
            text = "".join(p.text or "" for p in m.content)
        out.append({"role": m.role, "content": text})
    return out


def generate_request(
    body: CompletionRequest | ChatRequest, request_id: str, prompt: str | list[int], max_tokens: int
) -> generation_pb2.GenerateRequest:
    """The gateway's request for `body` (the gateway validates the values: one validation for both APIs)."""
    req = generation_pb2.GenerateRequest(
        request_id=request_id,
        max_tokens=max_tokens,
        temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_k=body.top_k,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        ignore_eos=body.ignore_eos,
    )
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.extend(prompt)
    if body.top_p is not None:
        req.top_p = body.top_p
    if body.seed is not None:
        req.seed = body.seed
    if body.repetition_penalty is not None:
        req.repetition_penalty = body.repetition_penalty
    if body.max_kv_kl is not None:
        req.max_kv_kl = body.max_kv_kl
    return req


def requested_max_tokens(body: CompletionRequest | ChatRequest) -> int | None:
    if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
        return body.max_completion_tokens
    if body.max_tokens is not None:
        return body.max_tokens
    return COMPLETION_MAX_TOKENS if isinstance(body, CompletionRequest) else None


# ---- responses ----------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _choice(
    kind: Kind, text: str, finish_reason: str | None, token_ids: list[int] | None, stream: bool, first: bool
) -> dict[str, Any]:
    if kind == "completion":
        c: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    elif stream:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        message = {"role": "assistant", "content": text}
        c = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        c["token_ids"] = token_ids
    return c


def response(
    kind: Kind,
    rid: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    token_ids: list[int] | None = None,
) -> dict[str, Any]:
    """The whole (non-streamed) completion object."""
    return {
        **_header(kind, rid, created, model, stream=False),
        "choices": [_choice(kind, text, finish_reason, token_ids, stream=False, first=True)],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def _header(kind: Kind, rid: str, created: int, model: str, *, stream: bool) -> dict[str, Any]:
    """The fields every completion object and chunk starts with."""
    obj = (
        "text_completion"
        if kind == "completion"
        else "chat.completion.chunk"
        if stream
        else "chat.completion"
    )
    return {"id": rid, "object": obj, "created": created, "model": model}


def chunk(
    kind: Kind,
    rid: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None = None,
    token_ids: list[int] | None = None,
    *,
    first: bool = False,
) -> dict[str, Any]:
    """One streamed chunk (with include_usage the caller adds "usage": null; the last is `usage_chunk`)."""
    return {
        **_header(kind, rid, created, model, stream=True),
        "choices": [_choice(kind, text, finish_reason, token_ids, stream=True, first=first)],
    }


def usage_chunk(
    kind: Kind, rid: str, created: int, model: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """The final chunk of a stream with include_usage: no choices, the usage."""
    return {
        **_header(kind, rid, created, model, stream=True),
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def id_prefix(kind: Kind) -> str:
    return "cmpl-" if kind == "completion" else "chatcmpl-"
