"""The decode token stream (coordinator.token_stream <-> decode_service.token_stream) over real gRPC on
loopback, against a real decode engine on a tiny random model (local prefill: no KV to pull)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from coordinator.token_stream import StreamBroken, Subscription, TokenStream, TokenStreams
from decode_service.engine import DecodeEngine
from decode_service.server import DecodeServicer
from engine.params import SamplingParams
from engine.runner import ModelRunner
from kv_transfer.client import KVPuller
from kv_transfer.codec import CodecContext
from pdserve import instance
from pdserve.rpc import params_to_proto
from pdserve.v1 import decode_pb2, decode_pb2_grpc

WAIT_S = 60.0  # bounds a broken test; every wait is for a condition


@asynccontextmanager
async def decode_server(model_dir: Path) -> AsyncIterator[tuple[str, DecodeServicer]]:
    runner = ModelRunner(str(model_dir), num_kv_blocks=64, block_size=16)
    engine = DecodeEngine(runner, KVPuller(fingerprint=runner.fingerprint), 8, 64, 512)
    engine.start()
    cfg = instance.InstanceConfig(role="decode", model_dir=str(model_dir), redis_url="redis://x")
    servicer = DecodeServicer(cfg, engine, runner, CodecContext())
    server = grpc.aio.server()
    decode_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(None)
        engine.stop()


def _request(prompt: list[int], max_tokens: int) -> decode_pb2.DecodeRequest:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return decode_pb2.DecodeRequest(
        request_id="r", prompt_token_ids=prompt, sampling=params_to_proto(params), local_prefill=True
    )


async def _wait_for(pred, what: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while not pred():
            await asyncio.sleep(0.01)  # polls the condition; the timeout only bounds a broken test
    assert pred(), what


def _idle_and_whole(servicer: DecodeServicer) -> bool:
    s = servicer.engine.stats()
    bm = servicer.engine.block_manager
    return s["running"] == 0 and s["queue_len"] == 0 and bm.num_free == bm.num_blocks


PROMPTS = [[5 + i, 17, 300 + 7 * i, 42, 9] for i in range(4)]


def test_concurrent_calls_share_one_stream_and_get_the_tokens_of_their_own_calls(
    tiny_model_dir: Path,
) -> None:
    async def main() -> None:
        async with decode_server(tiny_model_dir) as (address, servicer):
            channel = grpc.aio.insecure_channel(address)
            stub = decode_pb2_grpc.DecodeStub(channel)

            async def own(prompt: list[int]) -> tuple[list[int], str]:  # without the stream
                tokens, reason = [], ""
                async for ev in stub.Decode(_request(prompt, 12)):
                    tokens += ev.token_ids
                    reason = ev.finish_reason
                return tokens, reason

            expected = [await own(p) for p in PROMPTS]
            streams = TokenStreams(lambda _: channel)
            stream = await streams.get(address)
            assert stream is not None and await streams.get(address) is stream  # one per instance

            async def shared(prompt: list[int]) -> tuple[list[int], str]:
                events: list[decode_pb2.DecodeEvent] = []
                req = _request(prompt, 12)
                sub = Subscription(events.append)
                tag = stream.subscribe(sub)
                req.token_stream, req.token_stream_tag = stream.stream_id, tag
                call = stub.Decode(req)
                await sub.follow(call)
                stream.unsubscribe(tag)
                assert all(ev.tag == tag for ev in events)
                tokens = [t for ev in events for t in ev.token_ids]
                reason = events[-1].finish_reason
                assert await call.code() == grpc.StatusCode.OK  # the call itself carried no message
                return tokens, reason

            got = await asyncio.gather(*(shared(p) for p in PROMPTS))
            assert got == expected
            assert all(len(t) == 12 and r == "length" for t, r in got)
            # 4 requests x 12 tokens, decoded in shared steps: far fewer messages than events
            assert stream.events == 4 * 12 and stream.messages < stream.events
            await _wait_for(lambda: _idle_and_whole(servicer), "engine idle, every KV block free")
            streams.close()
            await channel.close()

    asyncio.run(main())


def test_a_broken_stream_fails_its_calls_and_frees_their_blocks(tiny_model_dir: Path) -> None:
    async def main() -> None:
        async with decode_server(tiny_model_dir) as (address, servicer):
            channel = grpc.aio.insecure_channel(address)
            stub = decode_pb2_grpc.DecodeStub(channel)
            streams = TokenStreams(lambda _: channel)
            stream = await streams.get(address)
            assert stream is not None
            cancelled: list[str] = []
            cancel = servicer.engine.cancel

            def spy(job) -> None:  # the real cancel, recorded
                cancelled.append(job.request_id)
                cancel(job)

            servicer.engine.cancel = spy  # type: ignore[method-assign]
            first = asyncio.Event()
            sub = Subscription(lambda ev: first.set())
            req = _request(PROMPTS[0], 900)
            req.token_stream, req.token_stream_tag = stream.stream_id, stream.subscribe(sub)
            call = stub.Decode(req)  # not followed: nothing on this side cancels it
            await first.wait()
            stream.close()  # the stream goes away under a running call
            # the instance fails the call whose sink closed, and cancels its job
            assert await call.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(StreamBroken, match="closed"):  # and the gateway side knows it broke
                await sub.follow(call)
            await _wait_for(lambda: _idle_and_whole(servicer), "engine idle, every KV block free")
            assert cancelled == ["r"]  # the job was cancelled, not left to decode its 900 tokens
            servicer.engine.check_integrity()
            # the next request opens a fresh stream
            fresh = await streams.get(address)
            assert fresh is not None and fresh is not stream and fresh.stream_id != stream.stream_id
            assert stream.broken is not None and "closed" in stream.broken
            streams.close()
            await channel.close()

    asyncio.run(main())


def test_a_call_naming_no_open_stream_is_unavailable_and_an_instance_without_streams_gets_none(
    tiny_model_dir: Path,
) -> None:
    async def main() -> None:
        async with decode_server(tiny_model_dir) as (address, servicer):
            channel = grpc.aio.insecure_channel(address)
            req = _request(PROMPTS[0], 4)
            req.token_stream, req.token_stream_tag = "not-open", 1
            call = decode_pb2_grpc.DecodeStub(channel).Decode(req)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "not-open" in (
                err.value.details() or ""
            )
            assert _idle_and_whole(servicer)
            await channel.close()
        bare = grpc.aio.server()  # serves no Decode service: Tokens is UNIMPLEMENTED
        port = bare.add_insecure_port("127.0.0.1:0")
        await bare.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        streams = TokenStreams(lambda _: channel)
        assert await streams.get(f"127.0.0.1:{port}") is None
        assert f"127.0.0.1:{port}" in streams._unsupported  # asked once, not per request
        await channel.close()
        await bare.stop(None)

    asyncio.run(main())


def test_draining_ends_each_stream_once_no_call_uses_it(tiny_model_dir: Path) -> None:
    async def main() -> None:
        async with decode_server(tiny_model_dir) as (address, servicer):
            channel = grpc.aio.insecure_channel(address)
            stub = decode_pb2_grpc.DecodeStub(channel)
            streams = TokenStreams(lambda _: channel)
            stream = await streams.get(address)
            assert isinstance(stream, TokenStream)
            tokens: list[int] = []
            first = asyncio.Event()

            def deliver(ev: decode_pb2.DecodeEvent) -> None:
                tokens.extend(ev.token_ids)
                first.set()

            sub = Subscription(deliver)
            tag = stream.subscribe(sub)
            req = _request(PROMPTS[1], 30)
            req.token_stream, req.token_stream_tag = stream.stream_id, tag
            call = stub.Decode(req)
            follow = asyncio.ensure_future(sub.follow(call))
            await first.wait()
            servicer.token_sinks.drain()  # SIGTERM: the call in flight still gets all its tokens
            await follow
            assert len(tokens) == 30 and await call.code() == grpc.StatusCode.OK
            stream.unsubscribe(tag)
            await _wait_for(lambda: stream.broken is not None, "the stream ends once its last call is done")
            assert "the instance ended it" in (stream.broken or "")
            streams.close()
            await channel.close()

    asyncio.run(main())
