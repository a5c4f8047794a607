"""TCP transport: length-prefixed messages over one socket, received into a reused buffer.

Stream format: per message a 12-byte header (magic b"PDT1", length u64 LE) then the bytes. TCP_NODELAY
is on; a message's header and body go out in one sendmsg (no copy). The socket is non-blocking: a send or
receive is tried first and waits (poll) only when the socket cannot take or give anything yet, so a message
that fits costs one system call (a socket timeout would add an ioctl and a poll to each).

Receiving reads ahead: a read takes what the current message still needs, or up to `READ_AHEAD` bytes when
that is less, so a header and a small body (or several small messages: a puller's frames and trailer, a
server's next PULL) arrive in one system call; whole messages waiting in the buffer are `buffered()`. A
message read into an empty buffer has its body at offset 64 of it, as aligned as the buffer itself (a large
frame is read to its exact end, so the next one starts in an empty buffer).
Address: tcp://host:port.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

from kv_transfer.errors import FrameForeign, FrameTooLarge, PeerClosed, TransferTimeout
from kv_transfer.frame import Buffer, as_bytes_view
from kv_transfer.transport._sockutil import (
    ChannelGuard,
    accept_conn,
    close_listening,
    connect_tcp,
    deadline_of,
    format_host_port,
    listen_tcp,
    readable,
    recv_into_nb,
    send_parts,
    tune_tcp,
)
from kv_transfer.transport.base import DEFAULT_MAX_MESSAGE_BYTES, Channel, Listener, Transport

MAGIC = b"PDT1"
_HDR = struct.Struct("<4sQ")
READ_AHEAD = 64 << 10  # bytes a read may take beyond what the message being received still needs
_EMPTY_AT = 64 - _HDR.size  # where an empty buffer's next header goes: its body then starts at byte 64


class TCPChannel(ChannelGuard, Channel):
    def __init__(self, sock: socket.socket, max_message_bytes: int) -> None:
        super().__init__(sock)
        tune_tcp(sock)
        sock.setblocking(False)  # see the module doc; waits are polls with the caller's deadline
        self._max = max_message_bytes
        # receive buffer, reused; replaced (never resized: a caller may hold a view of it) when too small.
        # Bytes received and not yet returned: _buf[_lo:_hi] (messages, the last possibly partial).
        self._buf = bytearray(_EMPTY_AT + READ_AHEAD)
        self._lo = self._hi = _EMPTY_AT

    def send(self, data: Buffer, timeout: float | None = None) -> None:
        mv = as_bytes_view(data)
        deadline = deadline_of(timeout)
        with self._op():
            try:
                send_parts(self._sock, [_HDR.pack(MAGIC, len(mv)), mv], deadline)
            except (PeerClosed, TransferTimeout):
                self.close()  # a partial message leaves the stream unusable
                raise

    def send_many(self, messages: Sequence[Buffer], timeout: float | None = None) -> None:
        """All the messages in one sendmsg when the socket takes them (a frame and the trailer behind it)."""
        parts: list[bytes | memoryview] = []
        for m in messages:
            mv = as_bytes_view(m)
            parts += (_HDR.pack(MAGIC, len(mv)), mv)
        deadline = deadline_of(timeout)
        with self._op():
            try:
                send_parts(self._sock, parts, deadline)
            except (PeerClosed, TransferTimeout):
                self.close()  # a partial message leaves the stream unusable
                raise

    def recv(self, timeout: float | None = None) -> memoryview:
        deadline = deadline_of(timeout)
        with self._op():
            try:
                out = self._read(deadline, block=True)
                assert out is not None
                return out
            except TransferTimeout:
                if self._hi == self._lo:
                    # nothing of a message arrived: the stream is intact, the channel stays usable
                    raise TransferTimeout(f"no message within {timeout} s") from None
                self.close()
                raise
            except (PeerClosed, FrameForeign, FrameTooLarge):
                self.close()
                raise

    def recv_ready(self) -> memoryview | None:
        with self._op():
            try:
                return self._read(None, block=False)
            except (PeerClosed, TransferTimeout, FrameForeign, FrameTooLarge):
                self.close()
                raise

    def _read(self, deadline: float | None, block: bool) -> memoryview | None:
        """The next message once all of it is in the buffer, reading the socket (waiting for more until
        `deadline` when `block`) while it is not; None when nothing more is there yet (not `block`). The view
        is valid until the next call: only then is the buffer's space reused."""
        hs = _HDR.size
        while True:
            buf, lo, hi = self._buf, self._lo, self._hi
            need = hs
            if hi - lo >= hs:
                magic, n = _HDR.unpack_from(buf, lo)
                if magic != MAGIC:
                    raise FrameForeign(f"not a pdserve TCP stream (magic {bytes(magic)!r})")
                if n > self._max:
                    raise FrameTooLarge(f"message claims {n} bytes > cap {self._max}")
                need = hs + n
                if lo + need <= hi:  # whole: return it; its space is reused from the next call on
                    self._lo = lo + need
                    if self._lo == hi:
                        self._lo = self._hi = _EMPTY_AT
                    return memoryview(buf)[lo + hs : lo + need]
            if lo + need > len(
                buf
            ):  # no room behind the bytes held: move them to the front, or to a new buffer
                held = hi - lo
                if _EMPTY_AT + need > len(buf):
                    self._buf = bytearray(max(_EMPTY_AT + need, len(buf) * 5 // 4))
                self._buf[_EMPTY_AT : _EMPTY_AT + held] = buf[lo:hi]
                self._lo, self._hi = _EMPTY_AT, _EMPTY_AT + held
                continue
            want = min(len(buf) - hi, max(lo + need - hi, READ_AHEAD))
            k = recv_into_nb(self._sock, memoryview(buf)[hi : hi + want], deadline, block)
            if k is None:
                return None
            self._hi = hi + k

    def buffered(self) -> bool:
        lo, hi = self._lo, self._hi
        return hi - lo >= _HDR.size and lo + _HDR.size + _HDR.unpack_from(self._buf, lo)[1] <= hi

    def poll(self) -> bool:
        return not self._closed and (self._hi > self._lo or readable(self._sock, 0.0))

    def readiness_fd(self) -> int | None:
        # the stream itself: readable = a message (or part, or EOF) waits beyond what buffered() holds
        return self._sock.fileno()


class TCPListener(Listener):
    def __init__(self, host: str, port: int, max_message_bytes: int) -> None:
        self._sock = listen_tcp(host, port)
        self._max = max_message_bytes
        self.address = format_host_port("tcp", host, self._sock.getsockname()[1])

    def accept(self, timeout: float | None = None) -> Channel:
        conn = accept_conn(self._sock, timeout)
        return TCPChannel(conn, self._max)

    def close(self) -> None:
        close_listening(self._sock)


class TCPTransport(Transport):
    scheme = "tcp"

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes

    def listen(self, host: str, port: int = 0) -> Listener:
        return TCPListener(host, port, self.max_message_bytes)

    def connect(self, address: str, timeout: float) -> Channel:
        sock = connect_tcp(address, "tcp", timeout)
        return TCPChannel(sock, self.max_message_bytes)
