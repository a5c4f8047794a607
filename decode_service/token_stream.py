"""The decode side of the gateway's token stream (`Decode.Tokens`): one long-lived stream per gateway.

Without it every token is one gRPC message per request (the `Decode` call's own stream); with it a gateway
opens one `Tokens` stream here and names it in each `Decode` call, and every decode step's events of all those
calls go out as one `TokenBatch` message. The mailbox (`pdserve.instance._Mailbox`) hands a step's events to
the loop in one callback, which adds them all to the sink before its writer runs: one message per step, sent
as soon as the step's events reach the loop (no timer, no added delay).

The `Decode` call stays for everything but the tokens: its start, cancellation (the gateway cancels it: the
job is cancelled), errors (raised on it, as without the stream), and its end (it returns OK once its last
event is queued on the stream). Invariant: a call's events are on the stream in the order the engine emitted
them, and a call using a sink that closes (the gateway cancelled the stream, or the connection broke) fails
with UNAVAILABLE, so the gateway's failover resumes it: no token is lost without an error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from typing import Any

from decode_service.engine import Tokens
from pdserve.errors import InvalidRequest, Unavailable
from pdserve.instance import EngineStream
from pdserve.v1 import decode_pb2


class TokenSink:
    """One open `Tokens` stream: the events of the calls that use it, written in batches (loop thread only)."""

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self._events: list[decode_pb2.DecodeEvent] = []  # queued, not yet written
        self._ready = asyncio.Event()  # set when there is something to write (or the stream should end)
        self._users: set[EngineStream] = set()  # the calls using it: failed if it closes under them
        self.closed = False
        self.draining = False

    def divert(self, tag: int) -> Callable[[Any], bool]:
        """The call's `EngineStream` divert: its Tokens go here tagged `tag`; the last one (with a finish
        reason) also ends the call, and errors stay on the call."""

        def divert(event: Any) -> bool:
            if not isinstance(event, Tokens):
                return False
            if not self.closed:  # closed: the call was failed with UNAVAILABLE at close, ahead of this
                self._events.append(
                    decode_pb2.DecodeEvent(
                        tag=tag,
                        token_ids=event.token_ids,
                        finish_reason=event.finish_reason or "",
                        admission_wait_s=event.admission_wait_s,
                        transfer_s=event.transfer_s,
                    )
                )
                self._ready.set()
            return not event.finish_reason

        return divert

    def use(self, stream: EngineStream) -> None:
        if self.closed:
            raise Unavailable(f"token stream {self.stream_id} closed")
        self._users.add(stream)

    def release(self, stream: EngineStream) -> None:
        self._users.discard(stream)
        if self.draining and not self._users:
            self._ready.set()  # the writer ends once the last events are out

    def drain(self) -> None:
        self.draining = True
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        for stream in self._users:
            stream.fail(Unavailable(f"token stream {self.stream_id} closed"))
        self._users.clear()

    async def batches(self) -> AsyncGenerator[decode_pb2.TokenBatch, None]:
        """An empty batch (the stream is open), then one batch per wake-up with every event queued since,
        until draining with no call using it."""
        yield decode_pb2.TokenBatch()
        while True:
            await self._ready.wait()
            self._ready.clear()
            if self._events:
                events, self._events = self._events, []
                yield decode_pb2.TokenBatch(events=events)
            if self.draining and not self._users and not self._events:
                return


class TokenSinks:
    """The open token streams of one decode instance, by the gateway's stream id."""

    def __init__(self) -> None:
        self._sinks: dict[str, TokenSink] = {}
        self._draining = False

    def get(self, stream_id: str) -> TokenSink:
        sink = self._sinks.get(stream_id)
        if sink is None:
            raise Unavailable(f"no token stream {stream_id} is open on this instance")
        return sink

    async def serve(self, stream_id: str) -> AsyncGenerator[decode_pb2.TokenBatch, None]:
        """The `Tokens` handler's messages; whatever ends it (the gateway cancelling, draining) closes the sink."""
        if not stream_id:
            raise InvalidRequest("stream_id is required")
        if stream_id in self._sinks:
            raise InvalidRequest(f"token stream {stream_id} is already open")
        sink = self._sinks[stream_id] = TokenSink(stream_id)
        if self._draining:
            sink.drain()
        try:
            async for batch in sink.batches():
                yield batch
        finally:
            del self._sinks[stream_id]
            sink.close()

    def drain(self) -> None:
        """The instance is stopping: each stream ends once no call uses it (calls in flight still finish)."""
        self._draining = True
        for sink in self._sinks.values():
            sink.drain()
