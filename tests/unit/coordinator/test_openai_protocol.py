"""The pure parts of the OpenAI-compatible API (the serving path is in tests/e2e/test_openai_api.py): request
bodies onto the gateway's GenerateRequest, refused fields, response shapes, the chat template, the one
error mapping, and API keys."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError

from coordinator import openai_protocol as oa
from coordinator.auth import ApiKeys, load_api_keys
from coordinator.chat_template import ChatTemplate
from engine.synth import default_model_dir
from pdserve.errors import (
    CapacityExceeded,
    InvalidRequest,
    ModelNotFound,
    PDServeError,
    Unauthenticated,
    Unavailable,
    http_error,
)
from pdserve.v1 import generation_pb2


def _gateway_request(body: oa.CompletionRequest, request_id: str) -> generation_pb2.GenerateRequest:
    """What /v1/completions asks the gateway for `body` (as coordinator/http_api.py builds it)."""
    max_tokens = oa.requested_max_tokens(body)
    assert max_tokens is not None  # completions default to COMPLETION_MAX_TOKENS
    return oa.generate_request(body, request_id, oa.completion_prompt(body), max_tokens)


# ---- requests -----------------------------------------------------------------------------------
def test_completion_body_maps_onto_the_gateway_request() -> None:
    body = oa.CompletionRequest(
        prompt="def f(x):",
        max_tokens=7,
        top_p=0.5,
        seed=3,
        stop="\n\n",
        repetition_penalty=1.2,
        ignore_eos=True,
        max_kv_kl=0.0,
        top_k=5,
    )
    req = _gateway_request(body, "rid")
    assert req.request_id == "rid" and req.prompt == "def f(x):" and not req.prompt_token_ids
    assert req.max_tokens == 7 and req.top_k == 5 and req.ignore_eos
    assert req.temperature == pytest.approx(oa.DEFAULT_TEMPERATURE)  # unset: OpenAI's default, 1
    assert req.top_p == pytest.approx(0.5) and req.seed == 3 and list(req.stop) == ["\n\n"]
    assert req.repetition_penalty == pytest.approx(1.2)
    assert req.HasField("max_kv_kl") and req.max_kv_kl == 0.0


def test_unset_fields_stay_unset_for_the_gateways_defaults() -> None:
    body = oa.CompletionRequest(prompt=[5, 6, 7], temperature=0)
    req = _gateway_request(body, "r")
    assert list(req.prompt_token_ids) == [5, 6, 7] and req.prompt == ""
    assert req.max_tokens == oa.COMPLETION_MAX_TOKENS and req.temperature == 0
    for name in ("top_p", "seed", "repetition_penalty", "max_kv_kl"):
        assert not req.HasField(name), name


def test_a_list_of_one_prompt_is_that_prompt_and_more_are_refused() -> None:
    assert oa.completion_prompt(oa.CompletionRequest(prompt=["abc"])) == "abc"
    assert oa.completion_prompt(oa.CompletionRequest(prompt=[[1, 2]])) == [1, 2]
    with pytest.raises(InvalidRequest) as err:
        oa.completion_prompt(oa.CompletionRequest(prompt=["a", "b"]))
    assert err.value.param == "prompt"


def test_chat_max_tokens_precedence() -> None:
    msgs = [oa.ChatMessage(role="user", content="hi")]
    assert oa.requested_max_tokens(oa.ChatRequest(messages=msgs)) is None  # the context left, decided later
    assert oa.requested_max_tokens(oa.ChatRequest(messages=msgs, max_tokens=9)) == 9
    assert oa.requested_max_tokens(oa.ChatRequest(messages=msgs, max_completion_tokens=4)) == 4
    with pytest.raises(InvalidRequest):
        oa.refuse_unsupported(oa.ChatRequest(messages=msgs, max_tokens=9, max_completion_tokens=4))


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"n": 2}, "n"),
        ({"logprobs": 1}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"best_of": 2}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"presence_penalty": 0.1}, "presence_penalty"),
        ({"frequency_penalty": -0.1}, "frequency_penalty"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({"seed": -1}, "seed"),
    ],
)
def test_fields_the_engine_cannot_honour_are_refused(fields: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        oa.refuse_unsupported(oa.CompletionRequest(prompt="x", **fields))
    assert err.value.param == param


def test_chat_logprobs_and_non_text_parts_are_refused() -> None:
    with pytest.raises(InvalidRequest):
        oa.refuse_unsupported(
            oa.ChatRequest(messages=[oa.ChatMessage(role="user", content="x")], logprobs=True)
        )
    # content parts as a JSON body carries them (validated as the HTTP API validates its bodies)
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert oa.chat_messages(
        oa.ChatRequest.model_validate({"messages": [{"role": "user", "content": parts}]})
    ) == [{"role": "user", "content": "ab"}]
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    with pytest.raises(InvalidRequest) as err:
        oa.chat_messages(oa.ChatRequest.model_validate({"messages": [{"role": "user", "content": image}]}))
    assert "image_url" in str(err.value)


def test_unknown_fields_and_wrong_types_fail_validation() -> None:
    with pytest.raises(ValidationError):
        oa.CompletionRequest(prompt="x", tools=[])  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        oa.CompletionRequest(prompt="x", max_tokens="many")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        oa.ChatRequest(messages=[])


def test_another_model_is_not_found() -> None:
    oa.check_model(oa.CompletionRequest(prompt="x"), "m")  # unset: the served one
    oa.check_model(oa.CompletionRequest(prompt="x", model="m"), "m")
    with pytest.raises(ModelNotFound) as err:
        oa.check_model(oa.CompletionRequest(prompt="x", model="gpt-4o"), "m")
    assert http_error(err.value) == (
        404,
        {
            "error": {
                "message": str(err.value),
                "type": "not_found_error",
                "param": "model",
                "code": "model_not_found",
            }
        },
    )


# ---- responses ----------------------------------------------------------------------------------
def test_response_and_chunk_shapes() -> None:
    r = oa.response("chat", "chatcmpl-1", 10, "m", "hi", "stop", 3, 2)
    assert r["object"] == "chat.completion" and r["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
    }
    assert r["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    first = oa.chunk("chat", "c", 1, "m", "a", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "a"}
    last = oa.chunk("chat", "c", 1, "m", "", "length")
    assert last["choices"][0]["delta"] == {} and "usage" not in last
    c = oa.chunk("completion", "cmpl-1", 1, "m", "x", None, [4, 5])
    assert c["object"] == "text_completion" and c["choices"][0]["token_ids"] == [4, 5]
    u = oa.usage_chunk("completion", "cmpl-1", 1, "m", 4, 6)
    assert u["choices"] == [] and u["usage"]["total_tokens"] == 10


# ---- chat template ------------------------------------------------------------------------------
def test_the_shipped_models_chat_template() -> None:
    from training.tokenizer import CHAT_TEMPLATE

    t = ChatTemplate.from_model_dir(str(default_model_dir()))
    assert t.available and t.source == CHAT_TEMPLATE  # what training writes is what ships
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    assert t.render(msgs) == "<|system|>\nS\n<|user|>\nU\n<|assistant|>\nA\n<|assistant|>\n"
    assert t.render(msgs[:2], add_generation_prompt=False) == "<|system|>\nS\n<|user|>\nU\n"
    with pytest.raises(InvalidRequest) as err:
        t.render([{"role": "tool", "content": "x"}])
    assert "role" in str(err.value) and err.value.param == "messages"


def test_template_sources_and_a_model_without_one(tmp_path: Path) -> None:
    assert not ChatTemplate.from_model_dir(str(tmp_path)).available
    with pytest.raises(InvalidRequest, match="no chat template"):
        ChatTemplate.from_model_dir(str(tmp_path)).render([{"role": "user", "content": "x"}])
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<s>"},
                "chat_template": [
                    {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"}
                ],
            }
        )
    )
    assert ChatTemplate.from_model_dir(str(tmp_path)).render([{"role": "user", "content": "x"}]) == "<s>x"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")  # the file wins
    assert ChatTemplate.from_model_dir(str(tmp_path)).render([{"role": "user", "content": "x"}]) == "J1"


def test_the_template_runs_sandboxed() -> None:
    t = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequest, match="chat template failed"):
        t.render([])


# ---- the one error mapping ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "exc, status, kind",
    [
        (InvalidRequest("bad"), 400, "invalid_request_error"),
        (Unauthenticated("no key"), 401, "authentication_error"),
        (ModelNotFound("no model"), 404, "not_found_error"),
        (CapacityExceeded("full"), 429, "rate_limit_error"),
        (Unavailable("none"), 503, "service_unavailable_error"),
        (PDServeError("x"), 500, "server_error"),
        (RuntimeError("bug"), 500, "server_error"),
    ],
)
def test_http_error_maps_through_the_grpc_status(exc: BaseException, status: int, kind: str) -> None:
    got_status, body = http_error(exc)
    assert got_status == status and body["error"]["type"] == kind
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_upstream_grpc_errors_keep_their_status() -> None:
    class Upstream(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.DEADLINE_EXCEEDED

        def details(self) -> str:
            return "too slow"

    status, body = http_error(Upstream())
    assert (
        status == 504
        and body["error"]["code"] == "deadline_exceeded"
        and "too slow" in body["error"]["message"]
    )


# ---- API keys -----------------------------------------------------------------------------------
def test_keys_from_flags_file_and_environment(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("# team keys\nk-file-1\n\n  k-file-2  \nk-flag\n")
    keys = load_api_keys(["k-flag"], str(f), {"PDSERVE_API_KEY": "k-env"})
    assert keys == ("k-flag", "k-file-1", "k-file-2", "k-env")
    assert load_api_keys([], None, {}) == ()
    with pytest.raises(ValueError) as err:
        load_api_keys(["secret with space"], None, {})
    assert "secret" not in str(err.value)  # the message names the source, never the key


def test_key_check() -> None:
    keys = ApiKeys(["k1", "k2"])
    keys.check("Bearer k1")
    keys.check("bearer k2")
    for bad in (None, "", "Bearer", "Bearer k3", "Basic k1", "k1", "Bearer k1x"):
        with pytest.raises(Unauthenticated) as err:
            keys.check(bad)
        assert "k1" not in str(err.value) and "k2" not in str(err.value)
    ApiKeys([]).check(None)  # no key configured: open
    assert not ApiKeys([]).enabled
