"""API keys of the gateway: where they come from, the one check, and the gRPC server interceptor.

A client sends `authorization: Bearer KEY` (gRPC metadata, or the HTTP header of the OpenAI-compatible
API). With no key configured the gateway is open (a warning is logged at start). A key is compared in
constant time (hmac.compare_digest) and never logged, traced or put in an error message.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Sequence

import grpc

from pdserve.errors import Unauthenticated

ENV_VAR = "PDSERVE_API_KEY"  # one key, read by the coordinator and by `pdserve generate`
SCHEME = "bearer"


def load_api_keys(
    keys: Sequence[str] = (), key_file: str | None = None, environ: dict[str, str] | None = None
) -> tuple[str, ...]:
    """Keys from `--api-key` values, a key file (one key per line; blank lines and `#` comments skipped)
    and the PDSERVE_API_KEY variable, in that order, without duplicates. Raises ValueError on a key with
    whitespace (it could not travel in a header) — the message names the source, never the key."""
    found: list[tuple[str, str]] = [("--api-key", k) for k in keys]
    if key_file:
        with open(key_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if line and not line.startswith("#"):
                    found.append((f"{key_file}:{n}", line))
    env = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if env:
        found.append((ENV_VAR, env))
    for source, key in found:
        if not key or any(c.isspace() for c in key):
            raise ValueError(f"API key from {source} is empty or contains whitespace")
    return tuple(dict.fromkeys(k for _, k in found))


class ApiKeys:
    """The configured keys; `check(authorization)` raises Unauthenticated unless it carries one of them."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = tuple(k.encode() for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        if not self._keys:
            return
        if not authorization:
            raise Unauthenticated("missing API key: send the header 'authorization: Bearer <key>'")
        scheme, _, token = authorization.strip().partition(" ")
        given = token.strip().encode()
        # every key is compared (no early exit), each in constant time
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(given, key)
        if scheme.lower() != SCHEME or not ok:
            raise Unauthenticated("invalid API key")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to the services named in `protected` (full names, e.g. pdserve.v1.Generation) without
    a valid key, with UNAUTHENTICATED, before their handler runs. Other services (health, reflection)
    stay open."""

    def __init__(self, keys: ApiKeys, protected: Sequence[str]) -> None:
        self.keys = keys
        self._prefixes = tuple(f"/{name}/" for name in protected)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or not self.keys.enabled or not details.method.startswith(self._prefixes):
            return handler
        metadata = details.invocation_metadata or ()
        authorization = next((v for k, v in metadata if k == "authorization"), None)
        try:
            self.keys.check(authorization if isinstance(authorization, str) else None)
        except Unauthenticated as exc:
            return _refusal(handler, str(exc))
        return handler


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that only aborts with UNAUTHENTICATED."""

    async def deny(request_or_iterator: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request_or_iterator: object, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # unreachable: makes this an async generator, as a streaming handler is

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)
