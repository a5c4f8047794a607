"""gRPC plumbing shared by every service: proto <-> engine conversions and the one error mapping."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from engine.params import SamplingParams
from pdserve.errors import grpc_status
from pdserve.v1 import common_pb2

# Internal hops ping their peer every KEEPALIVE_MS while a call is open (a dead peer behind a silent network
# fails the gateway's long-lived token streams within seconds, not at the next TCP timeout).
KEEPALIVE_MS = 20_000


def channel_options(keepalive_ms: int = KEEPALIVE_MS) -> list[tuple[str, Any]]:
    """Options of a channel between pdserve processes: no proxies, generous message size, keepalive pings."""
    return [
        ("grpc.enable_http_proxy", 0),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.keepalive_time_ms", keepalive_ms),
    ]


CHANNEL_OPTIONS = channel_options()


def new_server(
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (), keepalive_ms: int = KEEPALIVE_MS
) -> grpc.aio.Server:
    """A gRPC server of a pdserve process. It accepts its clients' keepalive pings: gRPC's default policy
    (no ping within 5 min of the last unless the server sent data, two strikes) answers a channel whose
    streams sat idle for a minute and then carried new calls with GOAWAY "too_many_pings", which broke every
    call on it (measured: a gateway's token stream broke at the start of a load run after 2 min idle, its
    requests failed over and the decode instance was skipped for 5 s; in a 1P1D cluster 30 % of a run's
    requests missed their SLO at a third of its capacity)."""
    return grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", keepalive_ms // 2),
        ],
    )


# The standard health service (grpc.health.v1) on every process answers for two names: "" = ready (an
# instance: registered; the coordinator: the expected instances are registered), LIVENESS = the process is
# up and serving RPCs (SERVING from the moment its server starts until it shuts down). A liveness probe
# asks LIVENESS, so that a coordinator waiting for instances is not restarted for it.
LIVENESS = "liveness"

T = TypeVar("T")


def params_to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        stop=list(p.stop),
        ignore_eos=p.ignore_eos,
        repetition_penalty=p.repetition_penalty,
        step_offset=p.step_offset,
    )
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def params_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=msg.max_tokens,
        temperature=msg.temperature,
        top_p=msg.top_p if msg.top_p > 0 else 1.0,
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        ignore_eos=msg.ignore_eos,
        repetition_penalty=msg.repetition_penalty if msg.repetition_penalty != 0 else 1.0,
        step_offset=msg.step_offset,
    )


ERROR_CLASS_KEY = "pdserve-error"  # trailing metadata: the typed error's class name (a server's own verdict)


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code, message = grpc_status(exc)
    # The class name tells a caller that the server itself answered (it is alive), e.g. a decode instance
    # whose KV pull failed, from a transport failure (the server died): the gateway's failover needs that.
    await context.abort(code, message, trailing_metadata=((ERROR_CLASS_KEY, type(exc).__name__),))


def server_error_class(exc: grpc.aio.AioRpcError) -> str | None:
    """The typed error class a pdserve server answered with (`abort`), None for a transport failure."""
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_CLASS_KEY:
            return str(value)
    return None


def unary_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Decorate an aio unary handler: typed exceptions become a status code + message."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - every error leaves with a status, none crashes the server
            await abort(context, exc)
            raise  # unreachable: abort raises

    return wrapper


def stream_errors(fn: Callable[..., AsyncIterator[T]]) -> Callable[..., AsyncIterator[T]]:
    """Decorate an aio server-streaming handler the same way."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
        try:
            async for item in fn(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await abort(context, exc)

    return wrapper
