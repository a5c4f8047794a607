"""A transport wrapper that counts what a KVServer's accepted channels receive and send: the server-side
counter tests wait on ("the server has the PULL") instead of sleeping."""

from __future__ import annotations

import threading
from collections.abc import Callable

from kv_transfer.frame import Buffer
from kv_transfer.transport.base import Channel, Listener, Transport


class WrappedTransport(Transport):
    """Wraps `inner`: every channel its listeners accept is `self.wrap(channel)`; `connect` is inner's. The
    test transports below wrap the server side of a KV hand-off this way to watch or change what it sends."""

    def __init__(self, inner: Transport) -> None:
        self.inner, self.scheme = inner, inner.scheme

    def wrap(self, ch: Channel) -> Channel:
        return ch

    def listen(self, host: str, port: int = 0) -> Listener:
        return _WrappedListener(self.inner.listen(host, port), self.wrap)

    def connect(self, address: str, timeout: float) -> Channel:
        return self.inner.connect(address, timeout)


class _WrappedListener(Listener):
    def __init__(self, inner: Listener, wrap: Callable[[Channel], Channel]) -> None:
        self.inner, self.wrap, self.address = inner, wrap, inner.address

    def accept(self, timeout: float | None = None) -> Channel:
        return self.wrap(self.inner.accept(timeout))

    def close(self) -> None:
        self.inner.close()


class WrappedChannel(Channel):
    """Delegates send, recv, poll and close to `inner` (send_many is Channel's: one `send` per message, so an
    override of `send` sees every message); subclasses override what they watch or change."""

    def __init__(self, inner: Channel) -> None:
        self.inner = inner

    def send(self, data: Buffer, timeout: float | None = None) -> None:
        self.inner.send(data, timeout)

    def recv(self, timeout: float | None = None) -> memoryview:
        return self.inner.recv(timeout)

    def poll(self) -> bool:
        return self.inner.poll()

    def close(self) -> None:
        self.inner.close()

    @property
    def closed(self) -> bool:
        return self.inner.closed


class Tap(WrappedTransport):
    """Wraps `inner`; `received`/`sent` count messages over every channel its listeners accepted.
    `on_receive` (if given) is called after each received message, in the receiving thread."""

    def __init__(self, inner: Transport, on_receive: Callable[[], None] | None = None) -> None:
        super().__init__(inner)
        self.on_receive = on_receive
        self.received = 0
        self.sent = 0
        self.cond = threading.Condition()

    def wrap(self, ch: Channel) -> Channel:
        return _TapChannel(ch, self)

    def wait_received(self, n: int, timeout: float = 10.0) -> None:
        """Block until the server side has received at least n messages (e.g. n PULLs)."""
        with self.cond:
            assert self.cond.wait_for(lambda: self.received >= n, timeout), (
                f"the server received {self.received} messages within {timeout} s, expected {n}"
            )

    def _count(self, received: int = 0, sent: int = 0) -> None:
        with self.cond:
            self.received += received
            self.sent += sent
            self.cond.notify_all()


class _TapChannel(WrappedChannel):
    def __init__(self, inner: Channel, tap: Tap) -> None:
        super().__init__(inner)
        self.tap = tap

    def send(self, data: Buffer, timeout: float | None = None) -> None:
        self.inner.send(data, timeout)
        self.tap._count(sent=1)

    def recv(self, timeout: float | None = None) -> memoryview:
        msg = self.inner.recv(timeout)
        self.tap._count(received=1)
        if self.tap.on_receive is not None:
            self.tap.on_receive()
        return msg
