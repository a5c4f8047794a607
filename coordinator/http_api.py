"""The gateway's OpenAI-compatible HTTP front end: a FastAPI app over the same `Gateway.generate` as gRPC
(one validation, one router, the same request trace), served by uvicorn inside the coordinator's event loop.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both streamed as server-sent events with
`stream: true`), `GET /v1/models[/{id}]`, and `GET /health` (200 SERVING / 503 NOT_SERVING, never
behind the API key). Errors are OpenAI's error object with the HTTP status `pdserve.errors.http_error`
maps their gRPC status to. A client that disconnects cancels its request (the gateway then frees its
KV), streamed or not. Shapes and the request mapping: `coordinator.openai_protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from coordinator import openai_protocol as oa
from coordinator.auth import ApiKeys
from coordinator.chat_template import ChatTemplate
from coordinator.gateway import Gateway
from pdserve.errors import (
    HTTP_STATUS,
    InvalidRequest,
    ModelNotFound,
    PDServeError,
    Unauthenticated,
    http_error,
)
from pdserve.v1 import generation_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")
CLIENT_GONE = 499  # the status logged for a request whose client disconnected (nginx's convention)
TRACE_HEADERS = ("traceparent", "tracestate")  # what reaches the request trace of all the headers


def served_model_id(model_dir: str) -> str:
    """The one model id this gateway serves: its model directory's name (e.g. pdserve-tiny-py)."""
    return os.path.basename(os.path.normpath(model_dir))


def _error_response(exc: BaseException, headers: dict[str, str] | None = None) -> JSONResponse:
    status, body = http_error(exc)
    return JSONResponse(body, status_code=status, headers=headers)


class RequireApiKey:
    """ASGI middleware: every /v1/ request without a valid `authorization: Bearer KEY` gets 401 before
    its body is read or anything runs. /health stays open (probes)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys.enabled and scope["path"].startswith("/v1/"):
            raw = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            try:
                self.keys.check(raw.decode("latin-1") if raw is not None else None)
            except Unauthenticated as exc:
                await _error_response(exc, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has gone (or the response is complete: uvicorn then says disconnect too)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """(True, result of `work`), or (False, None) when the client disconnected first: `work` is then
    cancelled (and has cleaned up) before this returns."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return False, None
    return True, task.result()


class EventStream(StreamingResponse):
    """Server-sent events whose generator is cancelled as soon as the client disconnects (it listens for
    http.disconnect while streaming, whatever ASGI spec version the server speaks) and always closed."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            with contextlib.suppress(OSError):  # the client went away mid-write
                await self.stream_response(send)

        streaming = asyncio.ensure_future(stream())
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({streaming, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (streaming, gone):
                t.cancel()
            await asyncio.gather(streaming, gone, return_exceptions=True)
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _trace_metadata(request: Request) -> list[tuple[str, str]]:
    return [(k, v) for k in TRACE_HEADERS if (v := request.headers.get(k)) is not None]


def create_app(gateway: Gateway, keys: ApiKeys, serving: Callable[[], bool]) -> FastAPI:
    """The HTTP API of `gateway`; `serving()` is the gateway's health (enough instances registered)."""
    model_id = served_model_id(gateway.cfg.model_dir)
    chat = ChatTemplate.from_model_dir(gateway.cfg.model_dir)
    created = int(time.time())
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "pdserve"}
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequireApiKey, keys=keys)

    @app.exception_handler(PDServeError)
    async def pdserve_error(request: Request, exc: PDServeError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(grpc.RpcError)
    async def upstream_error(request: Request, exc: grpc.RpcError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request body"}
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        return _error_response(InvalidRequest(f"{loc or 'body'}: {err.get('msg')}", param=loc or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = next((t for s, t in HTTP_STATUS.values() if s == exc.status_code), None)
        kind = kind or ("invalid_request_error" if exc.status_code < 500 else "server_error")
        body = {"message": str(exc.detail), "type": kind, "param": None, "code": None}
        return JSONResponse({"error": body}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(exc)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = serving()
        return JSONResponse({"status": "SERVING" if ok else "NOT_SERVING"}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        if model != model_id:
            raise ModelNotFound(f"The model `{model}` does not exist", param="model")
        return card

    @app.post("/v1/completions")
    async def completions(body: oa.CompletionRequest, request: Request) -> Response:
        oa.check_model(body, model_id)
        oa.refuse_unsupported(body)
        prompt = oa.completion_prompt(body)
        max_tokens = oa.requested_max_tokens(body)
        assert max_tokens is not None  # completions default to COMPLETION_MAX_TOKENS
        return await serve("completion", body, prompt, max_tokens, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: oa.ChatRequest, request: Request) -> Response:
        oa.check_model(body, model_id)
        oa.refuse_unsupported(body)
        prompt_ids = gateway.tokenizer.encode(chat.render(oa.chat_messages(body)))
        max_tokens = oa.requested_max_tokens(body)
        if max_tokens is None:  # OpenAI's chat default: as many as the context leaves
            max_tokens = max(1, gateway.model.max_position_embeddings - len(prompt_ids))
        return await serve("chat", body, prompt_ids, max_tokens, request)

    async def serve(
        kind: oa.Kind,
        body: oa.CompletionRequest | oa.ChatRequest,
        prompt: str | list[int],
        max_tokens: int,
        request: Request,
    ) -> Response:
        request_id = body.request_id or uuid.uuid4().hex
        rid = oa.id_prefix(kind) + request_id
        now = int(time.time())
        stream = gateway.generate(
            oa.generate_request(body, request_id, prompt, max_tokens), _trace_metadata(request)
        )
        if not body.stream:
            done, result = await _unless_disconnected(request, _collect(stream))
            if not done or result is None:
                return Response(status_code=CLIENT_GONE)
            text, token_ids, final = result
            return JSONResponse(
                oa.response(
                    kind,
                    rid,
                    now,
                    model_id,
                    text,
                    final.finish_reason,
                    final.usage.prompt_tokens,
                    final.usage.completion_tokens,
                    token_ids if body.return_token_ids else None,
                )
            )
        # the first message (first token) before the response starts: an error up to there is a status
        done, first = await _unless_disconnected(request, _next(stream))
        if not done or first is None:
            return Response(status_code=CLIENT_GONE)
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        def lines(msg: generation_pb2.GenerateResponse) -> list[str]:
            """The SSE lines of one gateway message: a chunk; after the last also the usage and [DONE]."""
            ids = list(msg.token_ids) if body.return_token_ids else None
            c = oa.chunk(
                kind, rid, now, model_id, msg.text, msg.finish_reason or None, ids, first=msg is first
            )
            if include_usage:
                c["usage"] = None
            out = [_sse(c)]
            if msg.finish_reason:
                if include_usage:
                    u = msg.usage
                    out.append(
                        _sse(oa.usage_chunk(kind, rid, now, model_id, u.prompt_tokens, u.completion_tokens))
                    )
                out.append("data: [DONE]\n\n")
            return out

        async def events() -> AsyncIterator[str]:
            try:
                for line in lines(first):
                    yield line
                async for msg in stream:
                    for line in lines(msg):
                        yield line
            except Exception as exc:  # noqa: BLE001 - the status line is sent: the error goes as an event
                yield _sse(http_error(exc)[1])
            finally:
                await stream.aclose()

        return EventStream(events())

    return app


async def _next(stream: AsyncIterator[generation_pb2.GenerateResponse]) -> generation_pb2.GenerateResponse:
    msg = await anext(stream, None)
    if msg is None:
        raise PDServeError("the gateway ended the request without a message")
    return msg


async def _collect(
    stream: AsyncIterator[generation_pb2.GenerateResponse],
) -> tuple[str, list[int], generation_pb2.GenerateResponse]:
    """The whole completion: (text, token ids, the final message with finish reason and usage)."""
    text: list[str] = []
    token_ids: list[int] = []
    async for msg in stream:
        text.append(msg.text)
        token_ids.extend(msg.token_ids)
        if msg.finish_reason:
            return "".join(text), token_ids, msg
    raise PDServeError("the gateway ended the request without a final message")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the coordinator owns SIGINT / SIGTERM and stops this server itself


class HttpServer:
    """uvicorn serving `app` as a task of the running event loop (so it shares the Gateway object)."""

    def __init__(self, app: FastAPI, host: str, port: int, tls: tuple[str, str] | None = None) -> None:
        """`tls`: (certificate, key) PEM paths to serve HTTPS (pdserve.tls.https_files), None for HTTP."""
        config = uvicorn.Config(
            app,
            ssl_certfile=tls[0] if tls else None,
            ssl_keyfile=tls[1] if tls else None,
            log_config=None,  # keep the coordinator's logging
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=2,
        )
        self._server = _Server(config)
        self._host, self._port = host, port
        self._task: asyncio.Task | None = None

    def start(self) -> int:
        """Bind (listening at once: connections queue until uvicorn accepts) and serve; returns the port."""
        try:
            family = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)[0][0]
            sock = socket.create_server((self._host, self._port), family=family)
        except OSError as exc:
            raise RuntimeError(
                f"cannot bind the HTTP API on {self._host}:{self._port} ({exc.strerror or exc}); "
                "--http-port 0 picks a free port"
            ) from exc
        port = sock.getsockname()[1]
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        self._task.add_done_callback(self._ended)
        return port

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the HTTP server stopped: %r", task.exception())

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (at most timeout_graceful_shutdown), return."""
        if self._task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
