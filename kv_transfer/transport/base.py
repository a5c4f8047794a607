"""The Transport contract: move whole messages (byte buffers) between two processes, in order.

A Channel is used by one thread at a time for send/recv (the KV server gives each connection its own
thread); `close()` may be called from any thread and wakes a blocked send/recv, which then raises
PeerClosed. The memoryview returned by `recv()` aliases a buffer the channel reuses: it is valid until
the next operation (`recv`, `send`, `poll`, `close`) on that channel -- copy what must outlive it.
"""

from __future__ import annotations

import select
from abc import ABC, abstractmethod
from collections.abc import Sequence

from kv_transfer.frame import Buffer

DEFAULT_MAX_MESSAGE_BYTES = 2 << 30  # a header claiming more is refused (FrameTooLarge) before allocating


class Channel(ABC):
    """One bidirectional, ordered, message-oriented connection."""

    @abstractmethod
    def send(self, data: Buffer, timeout: float | None = None) -> None:
        """Send one whole message. Raises PeerClosed, TransferTimeout (the channel is then closed)."""

    def send_many(self, messages: Sequence[Buffer], timeout: float | None = None) -> None:
        """Send several whole messages, in order, as recv() will return them one by one. Default: send() each
        (timeout per message); tcp hands them to the socket in one call. Errors as send()."""
        for m in messages:
            self.send(m, timeout=timeout)

    @abstractmethod
    def recv(self, timeout: float | None = None) -> memoryview:
        """Receive the next whole message (blocks up to `timeout` s; None = forever).

        Raises PeerClosed, TransferTimeout (if a message was half received the channel is closed),
        FrameTooLarge (length claim over the transport's cap), FrameForeign (not this transport's stream).
        """

    @abstractmethod
    def poll(self) -> bool:
        """True if recv() would not block (a message, or EOF, is waiting)."""

    def readiness_fd(self) -> int | None:
        """A descriptor that select() reports readable once the peer has sent something this channel has not
        read yet (a message or part of one, or EOF), so one thread can wait on several channels
        (`wait_readable`). None: the channel has none (UCX); read it on a thread of its own."""
        return None

    def buffered(self) -> bool:
        """True if a whole message already waits inside the channel (readiness_fd does not report it)."""
        return False

    def recv_ready(self) -> memoryview | None:
        """Read what the peer has sent so far without waiting for more: the next whole message once all of it
        arrived, else None (call again when readiness_fd turns readable; a part read stays in the channel
        and a later recv() completes it). Same view lifetime and errors as recv(). Default: recv() when
        poll() says something waits (which may block for the rest of that message), else None."""
        return self.recv() if self.poll() else None

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


def wait_readable(channels: Sequence[Channel], timeout: float | None) -> list[int]:
    """Indices of `channels` worth a recv() now: those with a buffered message, else those whose readiness_fd
    select() reports readable within `timeout` s (None = forever); [] on timeout. A readable channel may
    still block in recv() for the rest of a message its peer is sending. Every channel must have a
    readiness_fd (ValueError otherwise); a closed one is reported readable (its recv() raises PeerClosed)."""
    buffered = [i for i, ch in enumerate(channels) if ch.closed or ch.buffered()]
    if buffered:
        return buffered
    fds: list[int] = []
    for ch in channels:
        fd = ch.readiness_fd()
        if fd is None:
            raise ValueError("wait_readable: a channel has no readiness descriptor")
        fds.append(fd)
    try:
        ready, _, _ = select.select(fds, [], [], timeout)
    except (OSError, ValueError):  # a descriptor closed meanwhile: let recv() report it
        return list(range(len(channels)))
    return [i for i, fd in enumerate(fds) if fd in ready]


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
