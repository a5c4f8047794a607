"""Keepalive between pdserve processes (real gRPC on loopback): a server made by `pdserve.rpc.new_server`
accepts the pings of a channel made with `pdserve.rpc.channel_options`, so a long-lived stream that sat idle and
then shares its channel with new calls stays up. With gRPC's default server policy the same sequence ends
in GOAWAY "too_many_pings", which breaks every call on the channel (how a gateway's token stream broke at the
start of each benchmark load run). Both run at a keepalive of KEEPALIVE_MS instead of pdserve's 20 s, so
that the idle phases last seconds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from pdserve.rpc import CHANNEL_OPTIONS, channel_options, new_server
from pdserve.rpc import KEEPALIVE_MS as PDSERVE_KEEPALIVE_MS

KEEPALIVE_MS = 500
ROUNDS = 2  # idle phases, each followed by new calls on the channel
# The idle phase: long enough for the default policy to strike the channel out (measured: 3.5 s or more at
# every keepalive from 200 to 1000 ms; at 2.5 s it survived).
IDLE_S = 4.0


async def _idle_then_calls(make_server: Callable[[], grpc.aio.Server]) -> str | None:
    """Open a server stream (health Watch), then ROUNDS times: leave it idle for IDLE_S, make three unary
    calls on the same channel. Returns how the channel broke (status and details), None if it never did."""
    server = make_server()  # inside the event loop that serves it
    servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options(KEEPALIVE_MS))
    # types-grpcio-health-checking's HealthStub lacks the Check/Watch callables its __init__ sets
    stub: Any = health_pb2_grpc.HealthStub(channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
    broke: str | None = None
    try:
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        next_update = asyncio.ensure_future(watch.read())  # the server sends nothing until the status changes
        for _ in range(ROUNDS):
            done, _ = await asyncio.wait({next_update}, timeout=IDLE_S)  # the idle phase itself, not a wait
            if done:
                break
            try:
                for _ in range(3):
                    await stub.Check(health_pb2.HealthCheckRequest(service=""))
            except grpc.aio.AioRpcError as exc:
                broke = f"{exc.code().name} {exc.details()}"
                break
        if broke is None and next_update.done():
            err = next_update.exception()
            assert isinstance(err, grpc.aio.AioRpcError), f"the stream ended without an error: {err!r}"
            broke = f"{err.code().name} {err.details()}"
        if broke is None:  # the stream still works: it delivers the next status change
            await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            assert (await next_update).status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        watch.cancel()
        await channel.close()
        await server.stop(None)
    return broke


def test_pdserve_servers_accept_their_clients_keepalive_pings() -> None:
    assert ("grpc.keepalive_time_ms", PDSERVE_KEEPALIVE_MS) in CHANNEL_OPTIONS
    # the control: gRPC's default server policy breaks the channel, so the scenario is the one that failed
    control = asyncio.run(_idle_then_calls(grpc.aio.server))
    assert control is not None and "ping" in control.lower(), control
    assert asyncio.run(_idle_then_calls(lambda: new_server(keepalive_ms=KEEPALIVE_MS))) is None
