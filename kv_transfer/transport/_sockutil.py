"""Socket plumbing shared by the transports: address parsing, deadlines, exact reads, safe close.

Every transport keeps a plain socket per channel (TCP stream, unix socket for shm signalling, TCP
control socket next to UCX) so that peer death is always seen as EOF/reset -> PeerClosed.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time

from kv_transfer.errors import FrameError, PeerClosed, TransferTimeout, UnknownTransport

log = logging.getLogger(__name__)

WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def split_scheme(address: str) -> tuple[str, str]:
    """'tcp://h:1' -> ('tcp', 'h:1'); a bare scheme 'tcp' -> ('tcp', '')."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        return address.lower(), ""
    return scheme.lower(), rest


def parse_host_port(address: str, scheme: str) -> tuple[str, int]:
    """'tcp://host:port' or 'tcp://[v6]:port' -> (host, port)."""
    got, rest = split_scheme(address)
    if got != scheme:
        raise UnknownTransport(f"address {address!r} is not a {scheme}:// address")
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port_s = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_s = rest.rpartition(":")
    try:
        port = int(port_s)
    except ValueError:
        raise UnknownTransport(f"address {address!r} has no port") from None
    if not host or not 0 < port < 65536:
        raise UnknownTransport(f"bad address {address!r}")
    return host, port


def format_host_port(scheme: str, host: str, port: int) -> str:
    if host in WILDCARD_HOSTS:
        host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def advertised(address: str, host: str) -> str:
    """A listener's `scheme://h:port` address with `host` in place of h ("" keeps it); addresses without a
    host (shm://name) are returned as they are."""
    scheme, rest = split_scheme(address)
    if not host or scheme == "shm" or not rest:
        return address
    return format_host_port(scheme, host, parse_host_port(address, scheme)[1])


def deadline_of(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + max(0.0, timeout)


def remaining(deadline: float | None) -> float | None:
    """Seconds left (None = forever); TransferTimeout once the deadline has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TransferTimeout("timed out")
    return left


def tune_tcp(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def recv_exact_into(sock: socket.socket, mv: memoryview, deadline: float | None) -> None:
    """Fill `mv` from `sock`. PeerClosed on EOF/reset; TransferTimeout (possibly after partial data)."""
    got = 0
    while got < len(mv):
        got += recv_some(sock, mv[got:], deadline)


def recv_some(sock: socket.socket, mv: memoryview, deadline: float | None) -> int:
    """Read 1..len(mv) bytes into `mv`, waiting for the first until `deadline`. PeerClosed on EOF/reset,
    TransferTimeout."""
    sock.settimeout(remaining(deadline))
    try:
        k = sock.recv_into(mv, len(mv))
    except TimeoutError:
        raise TransferTimeout(f"timed out waiting for {len(mv)} more bytes") from None
    except OSError as e:
        raise PeerClosed(f"connection lost: {e}") from None
    if k == 0:
        raise PeerClosed(f"peer closed the connection ({len(mv)} bytes short)")
    return k


def sendall(sock: socket.socket, data: bytes | memoryview, deadline: float | None) -> None:
    sock.settimeout(remaining(deadline))
    try:
        sock.sendall(data)
    except TimeoutError:
        raise TransferTimeout("send timed out") from None
    except OSError as e:
        raise PeerClosed(f"connection lost while sending: {e}") from None


# Non-blocking sockets (the tcp channel's): each call tries the system call first and waits (poll) only when
# the socket cannot take or give anything yet. A socket with a timeout set instead pays, per call, an ioctl
# (settimeout switches the descriptor's mode) and a poll before the send or receive itself.


def wait_io(sock: socket.socket, write: bool, deadline: float | None) -> None:
    """Wait until the non-blocking `sock` is readable (`write`: writable), or has an error or hang-up, until
    `deadline` (None = forever). TransferTimeout once the deadline passed."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT if write else select.POLLIN)
    left = remaining(deadline)
    if not poller.poll(None if left is None else max(1, int(left * 1000 + 0.999))):
        remaining(deadline)  # raises once the deadline passed (poll's ms may end just short of it)


def recv_into_nb(sock: socket.socket, mv: memoryview, deadline: float | None, block: bool) -> int | None:
    """Read 1..len(mv) bytes from the non-blocking `sock` into `mv`; when none are there yet, None if not
    `block`, else wait for them until `deadline`. PeerClosed on EOF/reset, TransferTimeout."""
    while True:
        try:
            k = sock.recv_into(mv, len(mv))
        except (BlockingIOError, InterruptedError):
            if not block:
                return None
            wait_io(sock, False, deadline)
            continue
        except OSError as e:
            raise PeerClosed(f"connection lost: {e}") from None
        if k == 0:
            raise PeerClosed(f"peer closed the connection ({len(mv)} bytes short)")
        return k


def send_parts(sock: socket.socket, parts: list[bytes | memoryview], deadline: float | None) -> None:
    """Send `parts` in order as one stream write on the non-blocking `sock`: one sendmsg when the socket takes
    them all (no segment carrying a small head alone, as a send per part makes under TCP_NODELAY), else
    again from where it stopped once the socket is writable. PeerClosed, TransferTimeout (after part of it
    may have gone: the stream is then unusable)."""
    while True:
        try:
            k = sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            k = 0
        except OSError as e:
            raise PeerClosed(f"connection lost while sending: {e}") from None
        while parts and k >= len(parts[0]):
            k -= len(parts[0])
            parts = parts[1:]
        if not parts:
            return
        if k:
            parts = [parts[0][k:], *parts[1:]]
        wait_io(sock, True, deadline)  # the socket's buffer is full: wait for room


def readable(sock: socket.socket, timeout: float = 0.0) -> bool:
    try:
        r, _, _ = select.select([sock], [], [], timeout)
    except (OSError, ValueError):
        return True  # closed socket: the next recv reports it
    return bool(r)


def peer_gone(sock: socket.socket) -> bool:
    """Non-blocking check for EOF/reset without consuming data (False if data or nothing is waiting)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def listen_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket (IPv4 or IPv6 by the host's form) bound to host:port (0: any free port)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def connect_tcp(address: str, scheme: str, timeout: float) -> socket.socket:
    """A blocking TCP connection to `scheme://host:port`. TransferTimeout when it is not made within
    `timeout` seconds; PeerClosed when it is refused (or fails otherwise)."""
    host, port = parse_host_port(address, scheme)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise TransferTimeout(f"connect to {address} timed out") from None
    except OSError as e:
        raise PeerClosed(f"cannot connect to {address}: {e}") from None
    sock.settimeout(None)
    return sock


def accept_conn(sock: socket.socket, timeout: float | None) -> socket.socket:
    """The next connection on a listening socket, in blocking mode. TransferTimeout when none came within
    `timeout` seconds; PeerClosed when the listener was closed (by close_listening, from another thread)."""
    sock.settimeout(timeout)
    try:
        conn, _ = sock.accept()
    except TimeoutError:
        raise TransferTimeout("no connection") from None
    except OSError as e:
        raise PeerClosed(f"listener closed: {e}") from None
    conn.settimeout(None)
    return conn


def close_listening(sock: socket.socket) -> None:
    """Close a listening socket so that a thread blocked in accept() on it wakes up now."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class ChannelGuard:
    """Closed flag + operation lock + thread-safe close, shared by the channel implementations.

    Invariant: resources are released only while holding `_op_lock`, so a close() from another thread
    first shuts the socket down (waking the thread blocked in an operation) and then waits for it.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._op_lock = threading.RLock()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def _op(self) -> _Op:
        """`with self._op():` holds the operation lock; PeerClosed if the channel is closed."""
        return _Op(self)  # made per call: one kept on the channel would be a cycle, and a dropped channel is
        # closed when collected (shm's)

    def _handshake(self, deadline: float | None) -> None:
        """Subclasses with a connection handshake do it here (called under the op lock)."""

    def _handshake_now(self, connect_timeout: float) -> None:
        """Run the handshake within connect_timeout seconds; on failure the channel is closed and the typed
        error raised."""
        with self._op():
            try:
                self._handshake(deadline_of(connect_timeout))
            except (FrameError, PeerClosed, TransferTimeout):
                self.close()
                raise

    def _release_resources(self) -> None:
        """Subclasses free their own resources here (called once, under the op lock)."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if not self._op_lock.acquire(timeout=10.0):
            log.error("channel close: an operation did not finish in 10 s; releasing anyway")
            self._sock.close()
            return
        try:
            self._sock.close()
            self._release_resources()
        finally:
            self._op_lock.release()


class _Op:
    """ChannelGuard._op's context manager (a class: cheaper than a contextlib generator)."""

    __slots__ = ("_guard",)

    def __init__(self, guard: ChannelGuard) -> None:
        self._guard = guard

    def __enter__(self) -> None:
        g = self._guard
        g._op_lock.acquire()
        if g._closed:
            g._op_lock.release()
            raise PeerClosed("channel is closed")

    def __exit__(self, *exc: object) -> None:
        self._guard._op_lock.release()
