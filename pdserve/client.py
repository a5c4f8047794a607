"""A small Python client for the public `Generation` API.

from pdserve.client import Client
with Client("127.0.0.1:50051") as c:
    for chunk in c.generate("def fibonacci(n):", max_tokens=32):
        print(chunk.text, end="")

A gateway serving TLS: `Client(address, tls_ca="ca.pem")` (the CA that signed its certificate; without
one, a `tls_cert` alone verifies against the system's roots). `tls_cert`/`tls_key`: a client certificate,
for a server that asks for one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from pdserve.tls import TLSFiles, client_channel
from pdserve.v1 import generation_pb2, generation_pb2_grpc


@dataclass
class Completion:
    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    ttft_s: float = 0.0


class ResponseStream(Protocol):
    """What `Client.stream` returns (a gRPC call): the responses as they arrive; `cancel()` ends the call."""

    def __iter__(self) -> Iterator[generation_pb2.GenerateResponse]: ...

    def __next__(self) -> generation_pb2.GenerateResponse: ...

    def cancel(self) -> bool: ...


class Client:
    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        api_key: str | None = None,
        *,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        """`api_key`: sent as `authorization: Bearer KEY` metadata (a gateway started with API keys needs one).
        TLS when any of `tls_ca`, `tls_cert` is given (PEM paths; a bad one raises TLSConfigError)."""
        self.address = address
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        tls = TLSFiles(cert=tls_cert or "", key=tls_key or "", ca=tls_ca or "")
        # Reconnect attempts back off to at most 2 s (gRPC's default cap is 120 s): a client that saw its
        # gateway go away (a restart) is served again within 2 s of the gateway coming back.
        options = [("grpc.enable_http_proxy", 0), ("grpc.max_reconnect_backoff_ms", 2000)]
        self._channel = client_channel(address, tls, options)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    def stream(
        self,
        prompt: str | list[int],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int = 0,
        seed: int | None = None,
        stop: list[str] | None = None,
        ignore_eos: bool = False,
        repetition_penalty: float | None = None,
        max_kv_kl: float | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> ResponseStream:
        """Stream a completion. Sampling fields left None take the server's defaults (for
        `repetition_penalty`: the model's generation_config.json, else 1 = off). `max_kv_kl`: the quality
        floor of the prompt's KV hand-off, mean per-token KL in nats a lossy codec may add (0 = lossless;
        None = the cluster's setting)."""
        req = generation_pb2.GenerateRequest(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            stop=stop or [],
            ignore_eos=ignore_eos,
        )
        if isinstance(prompt, str):
            req.prompt = prompt
        else:
            req.prompt_token_ids.extend(prompt)
        if top_p is not None:
            req.top_p = top_p
        if seed is not None:
            req.seed = seed
        if repetition_penalty is not None:
            req.repetition_penalty = repetition_penalty
        if max_kv_kl is not None:
            req.max_kv_kl = max_kv_kl
        if request_id is not None:
            req.request_id = request_id
        return self._stub.Generate(req, timeout=timeout, metadata=self._metadata)

    def generate(self, prompt: str | list[int], **kwargs: Any) -> Completion:
        out = Completion()
        for msg in self.stream(prompt, **kwargs):
            out.request_id = msg.request_id
            out.token_ids.extend(msg.token_ids)
            out.text += msg.text
            if msg.finish_reason:
                out.finish_reason = msg.finish_reason
                out.prompt_tokens = msg.usage.prompt_tokens
                out.ttft_s = msg.usage.ttft_s
        return out

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
