"""TCP transport: length-prefixed messages over one socket, received into a reused buffer.

Stream format: per message a 12-byte header (magic b"PDT1", length u64 LE) then the bytes. TCP_NODELAY
is on; a message's header and body go out in one sendmsg (no copy). The socket is non-blocking: a send or
receive is tried first and waits (poll) only when the socket cannot take or give anything yet, so a message
that fits costs one system call (a socket timeout would add an ioctl and a poll to each).
Address: tcp://host:port.
"""

from __future__ import annotations

import socket
import struct

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


class TCPChannel(ChannelGuard, Channel):
    def __init__(self, sock: socket.socket, max_message_bytes: int) -> None:
        super().__init__(sock)
        tune_tcp(sock)
        sock.setblocking(False)  # see the module doc; waits are polls with the caller's deadline
        self._max = max_message_bytes
        self._hdr = bytearray(_HDR.size)
        self._buf = bytearray(0)  # receive buffer, reused; replaced (never resized) when too small
        # the message being received: body length (-1 while its header is incomplete), bytes of it read
        self._rx_len, self._rx_got = -1, 0

    def send(self, data: Buffer, timeout: float | None = None) -> None:
        mv = as_bytes_view(data)
        deadline = deadline_of(timeout)
        with self._op():
            try:
                send_parts(self._sock, [_HDR.pack(MAGIC, len(mv)), mv], deadline)
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
                if self._rx_got == 0 and self._rx_len < 0:
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
        """Advance the message being received (its 12-byte header, then its body) by what the socket holds,
        waiting for more until `deadline` when `block`; the message once whole, else None (not `block`)."""
        while True:
            if self._rx_len < 0:
                view = memoryview(self._hdr)[self._rx_got :]
            else:
                view = memoryview(self._buf)[self._rx_got : self._rx_len]
            if len(view):
                k = recv_into_nb(self._sock, view, deadline, block)
                if k is None:
                    return None
                self._rx_got += k
                if k < len(view):
                    continue
            if self._rx_len < 0:  # the header is complete
                magic, n = _HDR.unpack(self._hdr)
                if magic != MAGIC:
                    raise FrameForeign(f"not a pdserve TCP stream (magic {bytes(magic)!r})")
                if n > self._max:
                    raise FrameTooLarge(f"message claims {n} bytes > cap {self._max}")
                if len(self._buf) < n:
                    self._buf = bytearray(max(n, len(self._buf) * 5 // 4))
                self._rx_len, self._rx_got = n, 0
                continue
            n, self._rx_len, self._rx_got = self._rx_len, -1, 0
            return memoryview(self._buf)[:n]

    def poll(self) -> bool:
        return not self._closed and readable(self._sock, 0.0)

    def readiness_fd(self) -> int | None:
        return self._sock.fileno()  # the stream itself: readable = a message (or part, or EOF) waits


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
