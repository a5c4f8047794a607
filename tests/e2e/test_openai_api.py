"""End to end: the OpenAI-compatible HTTP API of a real cluster (redis-server, coordinator, prefill and decode
processes on loopback) driven by the official `openai` client, against the single-process reference; API
keys on both front ends; a disconnecting client frees its KV; keys never reach the span file or the logs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pydantic
import pytest
from openai.types.chat import ChatCompletionMessageParam

from engine.local import LocalEngine
from engine.params import SamplingParams, generation_defaults
from engine.synth import default_model_dir
from pdserve import trace_cli
from pdserve.client import Client
from pdserve.launcher import LocalCluster
from tests.cluster import assert_no_leaks, start_cluster, stop_cluster

KEY = "sk-pdserve-test-2c9f1e7b4d"  # grepped for in the span file and every log at the end
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, x):", "x"]


def _token_ids(choice: pydantic.BaseModel) -> list[int]:
    """A choice's (or a streamed chunk's choice's) `token_ids`: pdserve's field for `return_token_ids`, which
    the openai types lack; their models keep unknown fields as pydantic extras."""
    extra = choice.model_extra
    assert extra is not None and "token_ids" in extra, f"no token_ids in {choice!r}"
    ids = extra["token_ids"]
    assert isinstance(ids, list) and all(isinstance(t, int) for t in ids), ids
    return ids


@dataclass
class Api:
    cluster: LocalCluster
    span_file: Path
    log_dir: Path
    model_id: str

    @property
    def base_url(self) -> str:
        return f"http://{self.cluster.http_address}/v1"

    def client(self, api_key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=120)

    def root_span(self, request_id: str, timeout_s: float = 15.0) -> trace_cli.SpanRecord:
        """The gateway's root span of `request_id` in the span file (once the coordinator exported it)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.span_file.exists():
                spans = trace_cli.find_trace(trace_cli.load_file(str(self.span_file)), request_id)
                roots = [s for s in spans if s.name == "pdserve.gateway.generate"]
                if roots:
                    return roots[0]
            assert time.monotonic() < deadline, f"no root span of {request_id} in {self.span_file}"
            time.sleep(0.1)


def _start(model_dir: Path | str, tmp: Path, **kw: Any) -> Api:
    span_file = tmp / "spans.jsonl"
    cluster = start_cluster(
        Path(model_dir),
        tmp / "logs",
        env={"PDSERVE_TRACE_FILE": str(span_file), "OTEL_BSP_SCHEDULE_DELAY": "100"},
        http_port=0,
        **kw,
    )
    return Api(cluster, span_file, tmp / "logs", Path(model_dir).name)


@pytest.fixture(scope="module")
def api(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    a = _start(tiny_model_dir, tmp_path_factory.mktemp("openai"), api_keys=(KEY,))
    yield a
    stop_cluster(a.cluster)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> LocalEngine:
    return LocalEngine.from_model_dir(str(tiny_model_dir))


# ---- completions: equal to the single-process reference, streamed and not ---------------------------
def test_greedy_completions_equal_the_reference_with_usage(api: Api, reference: LocalEngine) -> None:
    tok = reference.tokenizer
    client = api.client()
    for i, prompt in enumerate(PROMPTS):
        max_tokens = 5 + 4 * i
        (want,) = reference.generate(
            [tok.encode(prompt)], [SamplingParams(max_tokens=max_tokens, ignore_eos=True)]
        )
        extra = {"ignore_eos": True, "return_token_ids": True}
        out = client.completions.create(
            model=api.model_id, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra
        )
        (choice,) = out.choices
        assert _token_ids(choice) == want, f"{prompt!r}: HTTP {_token_ids(choice)} != reference {want}"
        assert choice.text == tok.decode(want)
        assert choice.finish_reason == "length"
        assert out.object == "text_completion" and out.model == api.model_id
        usage = out.usage
        assert usage is not None
        assert usage.prompt_tokens == len(tok.encode(prompt))
        assert usage.completion_tokens == max_tokens
        assert usage.total_tokens == usage.prompt_tokens + max_tokens

        stream = client.completions.create(
            model=api.model_id,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
        chunks = list(stream)
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == max_tokens
        assert chunks[-1].usage.prompt_tokens == usage.prompt_tokens
        body = chunks[:-1]
        assert all(c.usage is None for c in body)
        assert [t for c in body for t in _token_ids(c.choices[0])] == want
        assert "".join(c.choices[0].text for c in body) == choice.text
        assert body[-1].choices[0].finish_reason == "length"
        assert all(c.choices[0].finish_reason is None for c in body[:-1])
        assert len({c.id for c in chunks}) == 1
    assert_no_leaks(api.cluster)


def test_prompt_as_token_ids_and_stop_strings(api: Api, reference: LocalEngine) -> None:
    tok = reference.tokenizer
    ids = tok.encode("def fibonacci(n):")
    (want,) = reference.generate([ids], [SamplingParams(max_tokens=12, ignore_eos=True)])
    client = api.client()
    out = client.completions.create(
        model=api.model_id, prompt=ids, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].text == tok.decode(want)
    assert out.usage is not None and out.usage.prompt_tokens == len(ids)
    stop = tok.decode(want)[3:6]  # a stop string inside the reference text: the text ends before it
    assert stop
    out = client.completions.create(
        model=api.model_id,
        prompt=ids,
        max_tokens=12,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == tok.decode(want).split(stop)[0]


def test_seeded_sampling_is_reproducible(api: Api) -> None:
    client = api.client()
    a = (
        client.completions.create(
            model=api.model_id, prompt="import", max_tokens=10, temperature=0.9, top_p=0.9, seed=7
        )
        .choices[0]
        .text
    )
    b = client.completions.create(
        model=api.model_id, prompt="import", max_tokens=10, temperature=0.9, top_p=0.9, seed=7, stream=True
    )
    assert "".join(c.choices[0].text for c in b) == a


# ---- errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, param, fragment",
    [
        ({"max_tokens": 0}, None, "max_tokens"),  # the gateway's own validation (same as gRPC)
        ({"max_tokens": 100_000}, None, "maximum length"),
        ({"temperature": -1.0}, None, "temperature"),
        ({"top_p": 1.5}, None, "top_p"),
        ({"n": 2}, "n", "n=1"),
        ({"logprobs": 2}, "logprobs", "not supported"),
        ({"echo": True}, "echo", "not supported"),
        ({"best_of": 3}, "best_of", "best_of"),
        ({"presence_penalty": 0.5}, "presence_penalty", "repetition_penalty"),
        ({"extra_body": {"bogus_field": 1}}, "bogus_field", "extra"),
        ({"extra_body": {"max_kv_kl": -1}}, None, "max_kv_kl"),
        ({"extra_body": {"max_tokens": "many"}}, "max_tokens", "integer"),
        ({"prompt": ["a", "b"]}, "prompt", "one prompt"),
        ({"prompt": [999_999]}, None, "range"),
    ],
)
def test_bad_input_is_400_with_openai_error_object(
    api: Api, kwargs: dict, param: str | None, fragment: str
) -> None:
    kw = {"model": api.model_id, "prompt": "hi", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        api.client().completions.create(**kw)
    assert err.value.status_code == 400
    error = err.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fragment in error["message"].lower()
    assert_no_leaks(api.cluster)


def test_chat_without_a_template_is_400(api: Api) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        api.client().chat.completions.create(model=api.model_id, messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in err.value.response.json()["error"]["message"]


def test_unknown_model_is_404_and_models_lists_the_served_one(api: Api) -> None:
    client = api.client()
    assert [m.id for m in client.models.list()] == [api.model_id]
    assert client.models.retrieve(api.model_id).id == api.model_id
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    error = err.value.response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"


# ---- API keys --------------------------------------------------------------------------------------
def test_http_without_the_key_is_401_and_runs_nothing(api: Api) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        api.client(api_key="wrong-key").completions.create(
            model=api.model_id, prompt="hi", max_tokens=2, extra_body={"request_id": "unauth-wrong"}
        )
    assert err.value.status_code == 401
    assert err.value.response.json()["error"]["type"] == "authentication_error"
    body = {"prompt": "hi", "max_tokens": 2, "request_id": "unauth-missing"}
    r = httpx.post(f"{api.base_url}/completions", json=body, timeout=10)  # no authorization header
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        api.client(api_key="wrong-key").models.list()
    r = httpx.post(f"{api.base_url}/completions", content=b"{not json", timeout=10)  # 401 before the body
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    health = httpx.get(f"http://{api.cluster.http_address}/health", timeout=10)  # probes need no key
    assert health.status_code == 200 and health.json() == {"status": "SERVING"}
    api.client().completions.create(
        model=api.model_id, prompt="hi", max_tokens=2, extra_body={"request_id": "authed"}
    )
    api.root_span("authed")
    spans = trace_cli.load_file(str(api.span_file))
    assert not [s for s in spans if str(s.attributes.get("pdserve.request_id", "")).startswith("unauth")]


def test_grpc_without_the_key_is_unauthenticated(api: Api) -> None:
    for key in (None, "wrong-key"):
        with Client(api.cluster.gateway_address, api_key=key) as client, pytest.raises(grpc.RpcError) as err:
            client.generate("hi", max_tokens=2, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with Client(api.cluster.gateway_address, api_key=KEY) as client:
        assert len(client.generate("hi", max_tokens=3, ignore_eos=True, timeout=60).token_ids) == 3
    assert api.cluster.health() == "SERVING"  # the standard health service stays open


# ---- disconnects and tracing ----------------------------------------------------------------------
def test_client_disconnect_cancels_the_request_and_frees_the_kv(api: Api) -> None:
    headers = {"authorization": f"Bearer {KEY}"}
    body = {
        "prompt": "import os\n" * 8,
        "max_tokens": 1500,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(timeout=60) as http:
        with http.stream(
            "POST", f"{api.base_url}/completions", json={**body, "request_id": "gone-stream"}, headers=headers
        ) as r:
            assert r.status_code == 200
            got = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got.append(json.loads(line[6:]))
                if len(got) >= 3:
                    break
        assert len(got) == 3  # the stream was running; leaving the block closed the connection
        with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
            http.post(
                f"{api.base_url}/completions",
                json={**body, "stream": False, "request_id": "gone-whole"},
                headers=headers,
                timeout=0.3,
            )
    for rid in ("gone-stream", "gone-whole"):
        root = api.root_span(rid)
        assert root.attributes["pdserve.status_code"] == "CANCELLED", f"{rid} was not cancelled"
        assert root.attributes["pdserve.completion_tokens"] < 1500
    assert_no_leaks(api.cluster)


def test_http_requests_join_the_callers_trace(api: Api) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"authorization": f"Bearer {KEY}", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    body = {"prompt": "x", "max_tokens": 2, "request_id": "traced-http"}
    assert (
        httpx.post(f"{api.base_url}/completions", json=body, headers=headers, timeout=60).status_code == 200
    )
    root = api.root_span("traced-http")
    assert root.trace_id == trace_id and root.parent_span_id == "00f067aa0ba902b7"


def test_the_key_never_reaches_spans_or_logs(api: Api) -> None:
    api.root_span("authed")  # the file has the spans of the requests above
    assert KEY not in api.span_file.read_text()
    logs = list(api.log_dir.glob("*.log"))
    assert logs
    for log in logs:
        assert KEY not in log.read_text(), f"the API key is in {log.name}"


# ---- the shipped model: chat and completions equal `pdserve generate --local` -------------------------
def test_shipped_model_chat_and_completion_equal_the_reference(tmp_path: Path) -> None:
    model = default_model_dir()
    ref = LocalEngine.from_model_dir(str(model))
    rp = generation_defaults(str(model)).get("repetition_penalty", 1.0)
    tok = ref.tokenizer
    api = _start(model, tmp_path)  # no key: the gateway is open
    try:
        client = api.client(api_key="unused")
        messages: list[ChatCompletionMessageParam] = [
            {"role": "system", "content": "You write Python."},
            {"role": "user", "content": "def add(a, b):"},
        ]
        rendered = "<|system|>\nYou write Python.\n<|user|>\ndef add(a, b):\n<|assistant|>\n"
        # max_kv_kl 0: the exact KV (the cluster's codec may be lossy)
        extra = {"return_token_ids": True, "max_kv_kl": 0, "ignore_eos": True}
        for prompt, chat in ((rendered, True), ("def fibonacci(n):", False)):
            params = SamplingParams(max_tokens=24, repetition_penalty=rp, ignore_eos=True)
            (want,) = ref.generate([tok.encode(prompt)], [params])
            if chat:
                chat_out = client.chat.completions.create(
                    model=api.model_id, messages=messages, max_tokens=24, temperature=0, extra_body=extra
                )
                text = chat_out.choices[0].message.content
                assert text is not None
                assert (
                    chat_out.object == "chat.completion" and chat_out.choices[0].message.role == "assistant"
                )
                ids, usage = _token_ids(chat_out.choices[0]), chat_out.usage
                stream = client.chat.completions.create(
                    model=api.model_id,
                    messages=messages,
                    max_tokens=24,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body=extra,
                )
                chat_chunks = list(stream)
                assert chat_chunks[0].choices[0].delta.role == "assistant"
                streamed = "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices)
                streamed_ids = [t for c in chat_chunks if c.choices for t in _token_ids(c.choices[0])]
                streamed_usage = chat_chunks[-1].usage
            else:
                out = client.completions.create(
                    model=api.model_id, prompt=prompt, max_tokens=24, temperature=0, extra_body=extra
                )
                text = out.choices[0].text
                ids, usage = _token_ids(out.choices[0]), out.usage
                chunks = list(
                    client.completions.create(
                        model=api.model_id,
                        prompt=prompt,
                        max_tokens=24,
                        temperature=0,
                        stream=True,
                        stream_options={"include_usage": True},
                        extra_body=extra,
                    )
                )
                streamed = "".join(c.choices[0].text for c in chunks if c.choices)
                streamed_ids = [t for c in chunks if c.choices for t in _token_ids(c.choices[0])]
                streamed_usage = chunks[-1].usage
            assert ids == want, f"chat={chat}: {ids} != {want}"
            assert streamed_ids == want
            assert text == streamed == tok.decode(want)
            assert usage is not None and streamed_usage is not None
            assert usage.prompt_tokens == len(tok.encode(prompt)) == streamed_usage.prompt_tokens
            assert usage.completion_tokens == len(want) == streamed_usage.completion_tokens
            local = subprocess.run(  # the user's reference: `pdserve generate --local` on the rendered prompt
                [
                    sys.executable,
                    "-m",
                    "pdserve",
                    "generate",
                    "--local",
                    "--max-tokens",
                    "24",
                    "--ignore-eos",
                    prompt,
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert local.returncode == 0, local.stderr
            assert local.stdout == text + "\n"
        assert_no_leaks(api.cluster)
    finally:
        stop_cluster(api.cluster)
