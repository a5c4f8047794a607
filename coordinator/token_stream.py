"""The gateway side of the decode token stream (`Decode.Tokens`, server side: `decode_service.token_stream`).

The gateway keeps one `Tokens` stream open to each decode instance it sends requests to; each `Decode` call
names it (`token_stream`, with a tag unique in that stream) and its events come back on it, every decode step's
events of all those calls in one message, instead of one message per token on the call itself. The call stays
for start, cancellation, errors and failover: the gateway reads its status (OK once its last event is on the
stream, or the error) as before.

Invariants: a subscription gets its events in order, then, if the stream ends first (the instance died or the
connection broke), `StreamBroken`: no call waits on a stream that is gone. A decode
instance that does not serve `Tokens` (UNIMPLEMENTED), or a stream that does not open in `open_timeout_s`, gets
the per-request streams of before (`get` returns None).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

import grpc

from pdserve.v1 import decode_pb2, decode_pb2_grpc

log = logging.getLogger(__name__)


class StreamBroken(Exception):
    """The token stream ended before the subscriber's call had its last event."""


class Subscription:
    """One Decode call's events on a token stream. The stream's reader calls `deliver(event)` for each, in
    order, on the loop (no task hop: the gateway's `deliver` puts the tokens straight on the request's queue);
    `follow(call)` returns once the event with a finish reason was delivered, or raises."""

    def __init__(self, deliver: Callable[[decode_pb2.DecodeEvent], None]) -> None:
        self._deliver = deliver
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def event(self, ev: decode_pb2.DecodeEvent) -> None:
        if self._done.done():  # over (finished, failed, or its follower went away): nothing more goes out
            return
        self._deliver(ev)
        if ev.finish_reason:
            self._done.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if not self._done.done():
            self._done.set_exception(exc)

    async def follow(self, call: grpc.aio.UnaryStreamCall, finish_timeout_s: float = 10.0) -> None:
        """Wait for the call's last event. The call's error (`grpc.aio.AioRpcError`) is raised as soon as its
        status comes; `StreamBroken` if the stream ends first, if the call ended OK and its last event has not
        come `finish_timeout_s` later (a guard: the instance queues it on the stream before it ends the call),
        or if the call ended any other way (cancelled) before it."""

        async def watch() -> None:
            try:
                async for ev in call:  # none from an instance that took the stream; all from one that did not
                    self.event(ev)
            except grpc.aio.AioRpcError as exc:
                self.fail(exc)
                return
            try:
                await asyncio.wait_for(asyncio.shield(self._done), finish_timeout_s)
            except TimeoutError:
                self.fail(
                    StreamBroken(
                        f"the call ended but its last tokens did not come on the token stream in "
                        f"{finish_timeout_s:g}s"
                    )
                )

        watcher = asyncio.get_running_loop().create_task(watch())
        _watchers.add(watcher)
        watcher.add_done_callback(_watchers.discard)
        watcher.add_done_callback(lambda _: self.fail(StreamBroken("the call ended before its last event")))
        try:
            await self._done
        finally:
            if not self._done.done():  # cancelled: whatever comes later is dropped, never raised unseen
                self._done.cancel()
            if self._done.cancelled() or self._done.exception() is not None:
                watcher.cancel()  # failed or cancelled: stop reading the call (its owner cancels it)


_watchers: set[asyncio.Task] = set()  # strong references to the running call watchers


class TokenStream:
    """One open `Tokens` stream to the decode instance at `address`; its reader task hands each event to
    the subscription of the call whose tag it carries."""

    def __init__(self, address: str, stream_id: str, call: grpc.aio.UnaryStreamCall) -> None:
        self.address = address
        self.stream_id = stream_id
        self.broken: str | None = None  # why it ended; None while open
        self._call = call
        self._subs: dict[int, Subscription] = {}
        self._next_tag = 1
        self._task: asyncio.Task | None = None
        self.messages = 0  # TokenBatch messages read (the "open" one not counted)
        self.events = 0  # events in them

    def subscribe(self, sub: Subscription) -> int:
        """The tag of one Decode call (`DecodeRequest.token_stream_tag`): its events go to `sub`, then a
        StreamBroken if the stream ends first."""
        tag, self._next_tag = self._next_tag, self._next_tag + 1
        if self.broken is not None:
            sub.fail(StreamBroken(self.broken))
        else:
            self._subs[tag] = sub
        return tag

    def unsubscribe(self, tag: int) -> None:
        self._subs.pop(tag, None)

    def start(self, on_end: Callable[[TokenStream], None]) -> None:
        self._task = asyncio.get_running_loop().create_task(self._read(on_end))

    async def _read(self, on_end: Callable[[TokenStream], None]) -> None:
        why = "the instance ended it"
        try:
            while True:
                batch = await self._call.read()
                if not isinstance(batch, decode_pb2.TokenBatch):  # grpc.aio.EOF
                    break
                self.messages += 1
                self.events += len(batch.events)
                for ev in batch.events:
                    sub = self._subs.get(ev.tag)
                    if sub is not None:  # None: its call is over (finished, cancelled or failed over)
                        sub.event(ev)
        except grpc.aio.AioRpcError as exc:
            why = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            why = "the gateway closed it"
            raise
        finally:
            self.broken = f"token stream to {self.address} broke ({why})"
            log.info("%s after %d messages carrying %d events", self.broken, self.messages, self.events)
            for sub in self._subs.values():
                sub.fail(StreamBroken(self.broken))
            self._subs.clear()
            on_end(self)

    def close(self) -> None:
        self._call.cancel()
        if self._task is not None:
            self._task.cancel()


class TokenStreams:
    """The gateway's token streams, one per decode instance address, opened on first use."""

    def __init__(self, channel: Callable[[str], grpc.aio.Channel], open_timeout_s: float = 2.0) -> None:
        self._channel = channel  # the router's channel to an address (the Decode calls' channel)
        self.open_timeout_s = open_timeout_s
        self._streams: dict[str, TokenStream] = {}
        self._opening: dict[str, asyncio.Future] = {}
        self._unsupported: set[str] = set()  # addresses whose instance answered UNIMPLEMENTED

    async def get(self, address: str) -> TokenStream | None:
        """The open stream to `address` (opening it if needed), None where there is none: use the call's own."""
        stream = self._streams.get(address)
        if stream is not None and stream.broken is None:
            return stream
        if address in self._unsupported:
            return None
        opening = self._opening.get(address)
        if opening is None:
            opening = self._opening[address] = asyncio.ensure_future(self._open(address))
            opening.add_done_callback(lambda _: self._opening.pop(address, None))
        return await asyncio.shield(opening)

    async def _open(self, address: str) -> TokenStream | None:
        stream_id = uuid.uuid4().hex
        call = decode_pb2_grpc.DecodeStub(self._channel(address)).Tokens(
            decode_pb2.TokenStreamRequest(stream_id=stream_id)
        )
        try:
            first = await asyncio.wait_for(call.read(), self.open_timeout_s)  # the empty "open" batch
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.info("decode instance at %s has no token stream: per-request streams", address)
                self._unsupported.add(address)
            return None
        except TimeoutError:
            call.cancel()
            log.warning("token stream to %s did not open in %gs", address, self.open_timeout_s)
            return None
        if first is grpc.aio.EOF:
            return None
        stream = TokenStream(address, stream_id, call)
        log.info("token stream %s to %s open", stream_id, address)
        self._streams[address] = stream
        stream.start(self._ended)
        return stream

    def _ended(self, stream: TokenStream) -> None:
        if self._streams.get(stream.address) is stream:
            del self._streams[stream.address]

    def close(self) -> None:
        """Cancel every stream (the gateway is stopping)."""
        for stream in list(self._streams.values()):
            stream.close()
