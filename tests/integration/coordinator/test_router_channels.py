"""The router's channels against a real redis-server and a real gRPC server on loopback: an instance that
leaves the registry while a call to it runs (a draining instance, or a dead one a request picked from the
snapshot before the refresh) must not have that call cancelled under the request by the refresh; its
channel is closed `channel_linger_s` after it left. An address that comes back (a restart on the same
address) gets a fresh channel for new calls, not one in reconnect backoff from the dead process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from coordinator.registry import InstanceInfo, Registry
from coordinator.router import Router
from pdserve.redis_server import RedisServer

METHOD = "/test.Slow/Stream"


async def _slow_server(release: asyncio.Event) -> tuple[grpc.aio.Server, int]:
    """A server whose one streaming method sends b"a", waits for `release`, then sends b"b"."""

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"a"
        await release.wait()
        yield b"b"

    handler = grpc.method_handlers_generic_handler(
        "test.Slow",
        {
            "Stream": grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=bytes, response_serializer=bytes
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def test_a_call_outlives_its_instance_leaving_the_registry(redis_server: RedisServer) -> None:
    async def run() -> None:
        release = asyncio.Event()
        server, port = await _slow_server(release)
        address = f"127.0.0.1:{port}"
        registry = Registry(redis_server.url, cluster="router-linger")
        info = InstanceInfo("decode-0", "decode", address, model_fingerprint=1)
        registry.announce(info, ttl_s=30)
        router = Router(registry, fingerprint=1, channel_linger_s=3600)
        try:
            await router.refresh()
            call = router.channel(address).unary_stream(
                METHOD, request_serializer=bytes, response_deserializer=bytes
            )(b"")
            assert await call.read() == b"a"
            registry.withdraw(info)  # it drains: the call in flight goes on
            await router.refresh()
            assert router.count("decode") == 0
            release.set()
            assert await call.read() == b"b", "the refresh cancelled a call to an instance that left"
            assert await call.code() == grpc.StatusCode.OK
            # it comes back on the same address (a restart) before the linger ends: new calls get a fresh
            # channel, the call in flight on the old one is not cancelled
            release.clear()
            first = router.channel(address)
            slow = first.unary_stream(METHOD, request_serializer=bytes, response_deserializer=bytes)(b"")
            assert await slow.read() == b"a"
            registry.announce(info, ttl_s=30)
            await router.refresh()
            assert router.channel(address) is not first
            release.set()
            assert await slow.read() == b"b" and await slow.code() == grpc.StatusCode.OK
            registry.withdraw(info)
            await router.refresh()
            router.channel_linger_s = 0.05  # past the linger, the channel is closed
            gone = time.monotonic()
            while address in router._channels or router._retired:
                assert time.monotonic() - gone < 5, "a gone instance's channel was never closed"
                await asyncio.sleep(0.06)
                await router.refresh()
            registry.announce(info, ttl_s=30)  # it comes back: a fresh channel serves it
            await router.refresh()
            again = router.channel(address).unary_stream(
                METHOD, request_serializer=bytes, response_deserializer=bytes
            )(b"")
            assert [m async for m in again] == [b"a", b"b"]
        finally:
            await router.stop()
            await server.stop(None)

    asyncio.run(run())
