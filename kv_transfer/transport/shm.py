"""Same-host transport: per direction, a ring in shared memory; a unix socket carries the signals.

Each side creates the ring it writes to as an anonymous memfd and passes the descriptor to the peer
over the unix socket (SCM_RIGHTS). Nothing is ever named in /dev/shm and the listening socket lives in
the abstract namespace, so no segment or socket file can leak: the kernel frees the memory when both
processes have unmapped it, crash or not. Address: shm://NAME (a local abstract unix socket name).

Records on the socket (24 bytes: kind u8, 7 pad, a u64, b u64):
    INLINE a=len, then `len` bytes on the socket        (messages <= INLINE_MAX)
    START  a=total                                       (a larger message begins)
    DATA   a=ring offset, b=len                          (next `len` bytes of it are in the ring)
    CREDIT a=len                                         (receiver copied `len` ring bytes out: reusable)
Invariant: the sender writes ring bytes only in [head, tail + ring_bytes) where head counts bytes written
and tail bytes credited; the receiver copies a chunk out before crediting it.
"""

from __future__ import annotations

import mmap
import os
import secrets
import socket
import struct
import time
from collections import deque

from kv_transfer.errors import (
    FrameCorrupted,
    FrameError,
    FrameForeign,
    FrameTooLarge,
    PeerClosed,
    TransferTimeout,
    UnknownTransport,
)
from kv_transfer.frame import Buffer, as_bytes_view, copy_bytes
from kv_transfer.transport._sockutil import (
    ChannelGuard,
    accept_conn,
    close_listening,
    deadline_of,
    readable,
    recv_exact_into,
    remaining,
    sendall,
    split_scheme,
)
from kv_transfer.transport.base import DEFAULT_MAX_MESSAGE_BYTES, Channel, Listener, Transport

MAGIC = b"PDSM"
VERSION = 1
_HELLO = struct.Struct("<4sHHQ")  # magic, version, flags (0), ring_bytes of the sender's outgoing ring
_REC = struct.Struct("<B7xQQ")
INLINE, START, DATA, CREDIT = 1, 2, 3, 4
INLINE_MAX = 64 << 10
DEFAULT_RING_BYTES = 16 << 20
MAX_RING_BYTES = 1 << 30
HANDSHAKE_TIMEOUT_S = 10.0


class ShmChannel(ChannelGuard, Channel):
    def __init__(
        self,
        sock: socket.socket,
        ring_bytes: int,
        max_message_bytes: int,
        connect_timeout: float | None = None,
    ) -> None:
        super().__init__(sock)
        if not INLINE_MAX < ring_bytes <= MAX_RING_BYTES:
            raise ValueError(f"ring_bytes must be in ({INLINE_MAX}, {MAX_RING_BYTES}]")
        self._ring_out_bytes = ring_bytes
        self._ring_in_bytes = 0
        self._chunk = max(ring_bytes // 4, INLINE_MAX)  # largest DATA chunk: 4 in flight pipeline the copies
        self._min_chunk = max(ring_bytes // 16, 1)  # do not write slivers: wait for this much free space
        self._max = max_message_bytes
        self._out_mm: mmap.mmap | None = None
        self._in_mm: mmap.mmap | None = None
        self._out: memoryview | None = None
        self._in: memoryview | None = None
        self._head = 0  # ring bytes written (monotonic)
        self._tail = 0  # ring bytes credited back by the peer (monotonic), head - tail <= ring_out_bytes
        self._asm = bytearray(0)  # reassembly buffer of incoming messages, reused
        self._in_total = -1  # length of the incoming message being assembled, -1 if none
        self._in_got = 0
        self._in_recv = False  # True while recv() waits: a completed message is returned, not queued
        self._ready: deque[bytes] = deque()  # messages completed while not in recv() (full duplex)
        self._rec = bytearray(_REC.size)
        self._ready_hs = False
        self._peer_gone = False  # a credit could not be sent: the peer closed (its data may still be read)
        if connect_timeout is not None:
            self._handshake_now(connect_timeout)

    # --- setup -------------------------------------------------------------------------------------
    def _handshake(self, deadline: float | None) -> None:
        if self._ready_hs:
            return
        fd = os.memfd_create("pdkv-shm-ring", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, self._ring_out_bytes)
            self._out_mm = mmap.mmap(fd, self._ring_out_bytes)
            self._sock.settimeout(remaining(deadline))
            try:
                socket.send_fds(self._sock, [_HELLO.pack(MAGIC, VERSION, 0, self._ring_out_bytes)], [fd])
            except TimeoutError:
                raise TransferTimeout("shm handshake send timed out") from None
            except OSError as e:
                raise PeerClosed(f"shm handshake: {e}") from None
        finally:
            os.close(fd)
        self._sock.settimeout(remaining(deadline))
        try:
            msg, fds, _, _ = socket.recv_fds(self._sock, _HELLO.size, 1)
        except TimeoutError:
            raise TransferTimeout("shm handshake: no hello from peer") from None
        except OSError as e:
            raise PeerClosed(f"shm handshake: {e}") from None
        try:
            if not msg:
                raise PeerClosed("peer closed during the shm handshake")
            if len(msg) < _HELLO.size:
                rest = bytearray(_HELLO.size - len(msg))
                recv_exact_into(self._sock, memoryview(rest), deadline)
                msg = msg + rest
            magic, version, flags, ring_in = _HELLO.unpack(msg)
            if magic != MAGIC or version != VERSION or flags != 0:
                raise FrameForeign(f"not a pdserve shm peer (magic {magic!r}, version {version})")
            if len(fds) != 1:
                raise FrameForeign("shm peer sent no shared-memory descriptor")
            if not INLINE_MAX < ring_in <= MAX_RING_BYTES or os.fstat(fds[0]).st_size < ring_in:
                raise FrameForeign(f"shm peer ring of {ring_in} bytes is invalid")
            self._in_mm = mmap.mmap(fds[0], ring_in)
            self._ring_in_bytes = ring_in
        finally:
            for f in fds:
                os.close(f)
        self._out, self._in = memoryview(self._out_mm), memoryview(self._in_mm)
        self._ready_hs = True

    def _release_resources(self) -> None:
        for name in ("_out", "_in"):
            mv = getattr(self, name)
            if mv is not None:
                try:
                    mv.release()
                except BufferError:
                    pass  # a view handed out is still alive; the mmap is freed when it is collected
                setattr(self, name, None)
        for name in ("_out_mm", "_in_mm"):
            mm = getattr(self, name)
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass  # same as above: unmapped by the garbage collector instead
                setattr(self, name, None)

    # --- record handling ---------------------------------------------------------------------------
    def _asm_view(self, n: int) -> memoryview:
        if len(self._asm) < n:
            self._asm = bytearray(max(n, len(self._asm) * 5 // 4))  # replace, never resize (live views)
        return memoryview(self._asm)[:n]

    def _complete(self, view: memoryview) -> memoryview | None:
        if self._in_recv:
            return view
        self._ready.append(bytes(view))
        return None

    def _pump(self, deadline: float | None) -> memoryview | None:
        """Read and act on one record; returns a message completed while recv() waits, else None."""
        recv_exact_into(self._sock, memoryview(self._rec), deadline)
        kind, a, b = _REC.unpack(self._rec)
        if kind == CREDIT:
            if a > self._head - self._tail:
                raise FrameCorrupted(f"shm credit of {a} bytes exceeds {self._head - self._tail} in flight")
            self._tail += a
            return None
        if kind == INLINE:
            if self._in_total >= 0 or a > INLINE_MAX:
                raise FrameCorrupted(f"shm inline message of {a} bytes out of place")
            view = self._asm_view(a)
            recv_exact_into(self._sock, view, deadline)
            return self._complete(view)
        if kind == START:
            if self._in_total >= 0:
                raise FrameCorrupted("shm message started inside another")
            if a > self._max:
                raise FrameTooLarge(f"message claims {a} bytes > cap {self._max}")
            self._asm_view(a)
            self._in_total, self._in_got = a, 0
            return None
        if kind == DATA:
            assert self._in is not None
            if (
                self._in_total < 0
                or b == 0
                or a + b > self._ring_in_bytes
                or self._in_got + b > self._in_total
            ):
                raise FrameCorrupted(f"shm chunk ({a}, {b}) out of bounds")
            copy_bytes(memoryview(self._asm)[self._in_got : self._in_got + b], self._in[a : a + b])
            self._in_got += b
            if not self._peer_gone:
                try:
                    sendall(self._sock, _REC.pack(CREDIT, b, 0), deadline)
                except PeerClosed:
                    # the sender finished and left: what is in the ring is still ours to read
                    self._peer_gone = True
            if self._in_got < self._in_total:
                return None
            total, self._in_total = self._in_total, -1
            return self._complete(memoryview(self._asm)[:total])
        raise FrameForeign(f"unknown shm record kind {kind}")

    # --- Channel -----------------------------------------------------------------------------------
    def send(self, data: Buffer, timeout: float | None = None) -> None:
        mv = as_bytes_view(data)
        n = len(mv)
        deadline = deadline_of(timeout)
        with self._op():
            try:
                self._handshake(deadline_of(HANDSHAKE_TIMEOUT_S) if deadline is None else deadline)
                if n <= INLINE_MAX:
                    sendall(self._sock, _REC.pack(INLINE, n, 0) + mv, deadline)
                    return
                assert self._out is not None
                start = _REC.pack(START, n, 0)  # goes out with the first DATA record: one wakeup less
                ring, sent = self._ring_out_bytes, 0
                while sent < n:
                    free = ring - (self._head - self._tail)
                    pos = self._head % ring
                    want = min(n - sent, ring - pos, self._chunk)
                    if free < min(want, self._min_chunk):
                        self._pump(deadline)  # wait for credits (and absorb any incoming message)
                        continue
                    want = min(want, free)
                    copy_bytes(self._out[pos : pos + want], mv[sent : sent + want])
                    sendall(self._sock, start + _REC.pack(DATA, pos, want), deadline)
                    start = b""
                    self._head += want
                    sent += want
            except (FrameError, PeerClosed, TransferTimeout):
                self.close()
                raise

    def recv(self, timeout: float | None = None) -> memoryview:
        deadline = deadline_of(timeout)
        with self._op():
            try:
                self._handshake(deadline_of(HANDSHAKE_TIMEOUT_S) if deadline is None else deadline)
                if self._ready:
                    return memoryview(self._ready.popleft())
                if deadline is not None and not readable(self._sock, max(0.0, deadline - time.monotonic())):
                    raise TransferTimeout(f"no message within {timeout} s")  # nothing consumed: intact
            except TransferTimeout:
                if not self._ready_hs:
                    self.close()
                raise
            except (FrameError, PeerClosed):
                self.close()
                raise
            self._in_recv = True
            try:
                while True:
                    out = self._pump(deadline)
                    if out is not None:
                        return out
            except (FrameError, PeerClosed, TransferTimeout):
                self.close()
                raise
            finally:
                self._in_recv = False

    def readiness_fd(self) -> int | None:
        return self._sock.fileno()  # every message is announced by a record on the socket (INLINE, START)

    def buffered(self) -> bool:
        return bool(self._ready)  # completed while a send() waited for credits

    def recv_ready(self) -> memoryview | None:
        """Act on the records the socket holds (each read whole: a record's bytes follow at once) without
        waiting for more; the message they complete, else None."""
        with self._op():
            if self._ready:
                return memoryview(self._ready.popleft())
            self._in_recv = True
            try:
                self._handshake(deadline_of(HANDSHAKE_TIMEOUT_S))
                while readable(self._sock, 0.0):
                    out = self._pump(deadline_of(HANDSHAKE_TIMEOUT_S))
                    if out is not None:
                        return out
                return None
            except (FrameError, PeerClosed, TransferTimeout):
                self.close()
                raise
            finally:
                self._in_recv = False

    def poll(self) -> bool:
        if self._closed:
            return False
        with self._op_lock:
            if self._ready:
                return True
            if not self._ready_hs:
                return readable(self._sock, 0.0)
            try:
                while readable(self._sock, 0.0):
                    self._pump(deadline_of(1.0))
                    if self._ready:
                        return True
            except (FrameError, PeerClosed, TransferTimeout):
                self.close()
                return True  # recv() will report it
            return False


def _abstract(name: str) -> str:
    return "\0" + name


class ShmListener(Listener):
    def __init__(self, name: str, ring_bytes: int, max_message_bytes: int) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(_abstract(name))
        self._sock.listen(128)
        self._ring, self._max = ring_bytes, max_message_bytes
        self.address = f"shm://{name}"

    def accept(self, timeout: float | None = None) -> Channel:
        conn = accept_conn(self._sock, timeout)
        return ShmChannel(
            conn, self._ring, self._max
        )  # handshake happens on first use, in the caller's thread

    def close(self) -> None:
        close_listening(self._sock)


class ShmTransport(Transport):
    """Same-host only. `ring_bytes` is the size of each ring this side writes (memory is touched lazily)."""

    scheme = "shm"

    def __init__(
        self, ring_bytes: int = DEFAULT_RING_BYTES, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ):
        self.ring_bytes = ring_bytes
        self.max_message_bytes = max_message_bytes

    def listen(self, host: str = "localhost", port: int = 0) -> Listener:
        # host is ignored (same-host transport); a nonzero port picks a stable name
        name = f"pdkv-shm-{port}" if port else f"pdkv-shm-{os.getpid()}-{secrets.token_hex(6)}"
        return ShmListener(name, self.ring_bytes, self.max_message_bytes)

    def connect(self, address: str, timeout: float) -> Channel:
        scheme, name = split_scheme(address)
        if scheme != "shm" or not name or "\0" in name:
            raise UnknownTransport(f"bad shm address {address!r}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(_abstract(name))
        except TimeoutError:
            sock.close()
            raise TransferTimeout(f"connect to {address} timed out") from None
        except OSError as e:
            sock.close()
            raise PeerClosed(f"cannot connect to {address}: {e}") from None
        return ShmChannel(sock, self.ring_bytes, self.max_message_bytes, connect_timeout=timeout)
