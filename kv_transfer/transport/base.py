"""The Transport contract: move whole messages (byte buffers) between two processes, in order.

A Channel is used by one thread at a time for send/recv (the KV server gives each connection its own
thread); `close()` may be called from any thread and wakes a blocked send/recv, which then raises
PeerClosed. The memoryview returned by `recv()` aliases a buffer the channel reuses: it is valid until
the next operation (`recv`, `send`, `poll`, `close`) on that channel -- copy what must outlive it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from kv_transfer.frame import Buffer

DEFAULT_MAX_MESSAGE_BYTES = 2 << 30  # a header claiming more is refused (FrameTooLarge) before allocating


class Channel(ABC):
    """One bidirectional, ordered, message-oriented connection."""

    @abstractmethod
    def send(self, data: Buffer, timeout: float | None = None) -> None:
        """Send one whole message. Raises PeerClosed, TransferTimeout (the channel is then closed)."""

    @abstractmethod
    def recv(self, timeout: float | None = None) -> memoryview:
        """Receive the next whole message (blocks up to `timeout` s; None = forever).

        Raises PeerClosed, TransferTimeout (if a message was half received the channel is closed),
        FrameTooLarge (length claim over the transport's cap), FrameForeign (not this transport's stream).
        """

    @abstractmethod
    def poll(self) -> bool:
        """True if recv() would not block (a message, or EOF, is waiting)."""

    @abstractmethod
    def close(self) -> None:
        """Idempotent; releases every resource (sockets, shared memory, UCX endpoints)."""

    @property
    @abstractmethod
    def closed(self) -> bool: ...

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Listener(ABC):
    address: str  # what a peer passes to Transport.connect(), e.g. "tcp://10.0.0.3:40123"

    @abstractmethod
    def accept(self, timeout: float | None = None) -> Channel:
        """Next incoming channel. Raises TransferTimeout when none arrives in time, PeerClosed once closed."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Transport(ABC):
    scheme: str  # "tcp" | "shm" | "ucx"

    @abstractmethod
    def listen(self, host: str, port: int = 0) -> Listener: ...

    @abstractmethod
    def connect(self, address: str, timeout: float) -> Channel: ...
