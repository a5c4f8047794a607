"""UCX transport over ucxx's core API: a TCP control socket per channel plus a UCX endpoint for bulk bytes.

Why this shape (measured on the 2-vCPU CPU hosts, see docs REFERENCES "This machine kind"):
- ucxx's async API with endpoint error handling moved 0.35-0.97 GB/s; the core API with error handling
  off moves 64 MiB messages at 7-10 GB/s. Without error handling UCX cannot report a dead peer, so a
  plain TCP socket next to the endpoint carries the connection setup (UCX worker addresses), a header
  per message, and small messages inline; its EOF is how either side learns that the peer died.
- Default UCX_TLS on a CPU host is "tcp,posix", not "tcp,sm": "sm" includes CMA, and with error
  handling off UCX *aborts the process* (SIGABRT in cma_ep.c) when the peer dies in the middle of a CMA
  transfer -- a dead prefill would take the decode instance down. posix shared memory survives peer
  death and was faster here (10.5 vs 7.6 GB/s). An explicit `tls` argument or the UCX_TLS environment
  variable overrides the default. UCX_POSIX_FIFO_SIZE defaults to 1024 (from 64): on a busy host the
  sender then runs further ahead of a receiver not yet scheduled (2-4x on 64 MiB).
- On a CUDA host the default is "tcp,cuda_copy,cuda_ipc". Measured on an H200 host (UCX 1.21, ucxx 0.52,
  cu13 wheels, torch 2.11; infra/device/ucx_cuda_probe.py, docs/benchmarks.md): a CUDA tensor sent with
  posix shared memory among the transports, or with tcp + cuda_copy alone, was handled as host memory --
  SIGSEGV in the rendezvous fragment pack (uct_mm_ep_am_bcopy) or EIO from UCX's TCP send -- with the
  memory-type cache on or off, protocols v1 and v2, get/put rendezvous, eager; only tcp,cuda_copy,cuda_ipc
  moved it (between processes). A channel whose TLS has shared memory or lacks cuda_ipc therefore refuses
  CUDA tensors (ProtocolError: send host bytes) instead of crashing the process. Host messages then go
  over TCP: the served KV frames are host bytes, and pdserve's TCP transport moved a 1 MiB layer at 1.24x
  a raw socket there (UCX with posix: 0.84x).
  CUDA transfers run with the device's primary context current in the channel's thread (made so before
  the worker is created, when CUDA is in use, and before each CUDA transfer), after the sender syncs the
  device's current stream (UCX reads the memory on its own streams), and with UCX_MEMTYPE_CACHE=n (the
  cache learns pointers by intercepting cudaMalloc): the set-up the working configuration was verified
  with; the probe's variants without the context step or with the cache crashed like the rest.
- One UCX worker per channel, progressed by the thread that uses the channel (blocking mode: progress,
  arm, then select() on the worker's epoll fd and the control socket). No progress thread, no busy
  polling, and a channel's failure never touches another's requests (cancel_inflight_requests is
  per worker).

Control stream: both sides first send HELLO (magic b"PDUX", version u16, flags u16, addr_len u32, UCX
worker address). Then per message a 24-byte header (magic b"PDUM", kind u8, 3 pad, length u64, tag u64):
kind INLINE carries the bytes on the socket (<= 64 KiB); HOST/CUDA send them as one UCX tag message
whose tag is the per-direction sequence number. Address: ucx://host:port (the control socket's).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from typing import Any

import numpy as np
import torch

from kv_transfer.errors import (
    FrameError,
    FrameForeign,
    FrameTooLarge,
    PeerClosed,
    ProtocolError,
    TransferTimeout,
    TransportUnavailable,
)
from kv_transfer.frame import Buffer, as_bytes_view
from kv_transfer.transport._sockutil import (
    ChannelGuard,
    accept_conn,
    close_listening,
    connect_tcp,
    deadline_of,
    format_host_port,
    listen_tcp,
    peer_gone,
    readable,
    recv_exact_into,
    remaining,
    sendall,
    tune_tcp,
)
from kv_transfer.transport.base import DEFAULT_MAX_MESSAGE_BYTES, Channel, Listener, Transport

log = logging.getLogger(__name__)

HELLO_MAGIC = b"PDUX"
MSG_MAGIC = b"PDUM"
VERSION = 1
_HELLO = struct.Struct("<4sHHI")
_HDR = struct.Struct("<4sB3xQQ")
INLINE, HOST, CUDA = 1, 2, 3
INLINE_MAX = 64 << 10
MAX_WORKER_ADDRESS_BYTES = 1 << 20
HANDSHAKE_TIMEOUT_S = 10.0
FLAG_CUDA = 1
CUDA_TLS = "tcp,cuda_copy,cuda_ipc"  # the one setting that moved CUDA tensors on the H200 host (docstring)
_SHM_TLS = {"posix", "sysv", "sm", "mm", "shm", "all"}  # with CUDA buffers these crashed UCX (docstring)
POSIX_FIFO_SIZE = 1024
CLOSE_PROGRESS_S = 0.05  # progress spent on a closing endpoint before it is dropped

_api: Any = None  # ucxx._lib.libucxx, once imported
_Array: Any = None
_import_error: str | None = None
_contexts: dict[str, Any] = {}
_lock = threading.Lock()


def _ucx() -> Any:
    """Import ucxx on first use; TransportUnavailable (with the reason) if it cannot be imported."""
    global _api, _Array, _import_error
    with _lock:
        if _api is None and _import_error is None:
            os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
            try:
                import ucxx._lib.libucxx as api
                from ucxx._lib.arr import Array
            except (ImportError, OSError, RuntimeError) as e:
                _import_error = f"{type(e).__name__}: {e}"
            else:
                _api, _Array = api, Array
        if _api is None:
            raise TransportUnavailable(f"UCX transport unavailable: import ucxx failed ({_import_error})")
        return _api


def ucx_available() -> bool:
    return ucx_unavailable_reason() is None


def ucx_unavailable_reason() -> str | None:
    """Why the UCX transport cannot be used (ucxx does not import), or None when it can."""
    try:
        _ucx()
    except TransportUnavailable as exc:
        return str(exc)
    return None


def default_tls() -> str:
    if os.environ.get("UCX_TLS"):
        return os.environ["UCX_TLS"]
    return CUDA_TLS if torch.cuda.is_available() else "tcp,posix"


def _context(tls: str) -> Any:
    api = _ucx()
    with _lock:
        ctx = _contexts.get(tls)
        if ctx is None:  # one UCX context per process and TLS setting; workers are per channel
            # A deeper posix FIFO (default 64 x 8 KiB) lets the sender run ahead of a receiver that the
            # OS has not scheduled yet: 64 MiB messages went 0.3-0.4 -> 0.9-1.7 GB/s on a busy 2-core
            # host, for ~6.5 MiB more shared memory per worker (per channel). Env var: read at creation.
            os.environ.setdefault("UCX_POSIX_FIFO_SIZE", str(POSIX_FIFO_SIZE))
            if torch.cuda.is_available():
                os.environ.setdefault("UCX_MEMTYPE_CACHE", "n")
            ctx = api.UCXContext(
                config_dict={"TLS": tls}, feature_flags=(api.Feature.TAG, api.Feature.WAKEUP)
            )
            _contexts[tls] = ctx
        return ctx


def cuda_tls_ok(tls: str) -> bool:
    """Whether a UCX_TLS setting is one that moves CUDA buffers safely: cuda_ipc, and no shared memory."""
    names = {t.strip().lstrip("^") for t in tls.split(",") if t.strip()}
    return "cuda_ipc" in names and not names & _SHM_TLS and not tls.startswith("^")


def _cuda_capable(tls: str) -> bool:
    """Whether this process's UCX can move CUDA memory: CUDA is present, UCX loaded its CUDA support, and
    the TLS setting is a safe one (cuda_tls_ok). Otherwise UCX may take a device pointer for host memory
    and memcpy it (a SIGSEGV)."""
    return torch.cuda.is_available() and cuda_tls_ok(tls) and bool(_context(tls).cuda_support)


class UCXChannel(ChannelGuard, Channel):
    def __init__(
        self, sock: socket.socket, tls: str, max_message_bytes: int, connect_timeout: float | None = None
    ) -> None:
        super().__init__(sock)
        tune_tcp(sock)
        self._tls, self._max = tls, max_message_bytes
        self._worker: Any = None
        self._ep: Any = None
        self._peer_cuda = False
        self._send_seq = 0  # tag of the next UCX message we send
        self._recv_seq = 0  # tag of the next UCX message we expect
        self._hdr = bytearray(_HDR.size)
        self._buf = bytearray(0)  # host receive buffer, reused; replaced (never resized) when too small
        self._dev_buf: torch.Tensor | None = None  # CUDA receive buffer, reused
        self._cuda_dev: int | None = None  # the CUDA device of this channel's transfers, once known
        if connect_timeout is not None:
            self._handshake_now(connect_timeout)

    # --- setup / teardown --------------------------------------------------------------------------
    def _handshake(self, deadline: float | None) -> None:
        if self._ep is not None:
            return
        api = _ucx()
        if self._worker is None:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                self._cuda_ctx()  # UCX's CUDA transports bind to the context current at creation
            self._worker = api.UCXWorker(_context(self._tls))
            self._worker.init_blocking_progress_mode()
        addr = self._worker.address.tobytes()
        flags = FLAG_CUDA if _cuda_capable(self._tls) else 0
        sendall(self._sock, _HELLO.pack(HELLO_MAGIC, VERSION, flags, len(addr)) + addr, deadline)
        head = bytearray(_HELLO.size)
        recv_exact_into(self._sock, memoryview(head), deadline)
        magic, version, peer_flags, n = _HELLO.unpack(head)
        if magic != HELLO_MAGIC or version != VERSION:
            raise FrameForeign(f"not a pdserve UCX peer (magic {bytes(magic)!r}, version {version})")
        if not 0 < n <= MAX_WORKER_ADDRESS_BYTES:
            raise FrameTooLarge(f"UCX worker address of {n} bytes")
        peer = bytearray(n)
        recv_exact_into(self._sock, memoryview(peer), deadline)
        self._peer_cuda = bool(peer_flags & FLAG_CUDA)
        try:
            address = api.UCXAddress.create_from_buffer(np.frombuffer(peer, dtype=np.uint8))
            self._ep = self._worker.create_endpoint_from_worker_address(address, False)
        except api.UCXError as e:
            raise FrameForeign(f"unusable UCX worker address from peer: {e}") from None

    def _cuda_ctx(self, device: torch.device | None = None) -> int:
        """Make the CUDA device's primary context current in this thread (a new thread has none); -> index.

        The device is the tensor's for a send, else the one this channel used before, else the thread's
        current device (the process's bound device, engine.device.bind)."""
        if device is not None and device.index is not None:
            self._cuda_dev = device.index
        elif self._cuda_dev is None:
            self._cuda_dev = torch.cuda.current_device()
        torch.cuda.set_device(self._cuda_dev)
        return self._cuda_dev

    def _release_resources(self) -> None:
        worker, ep = self._worker, self._ep
        self._ep = self._worker = self._dev_buf = None
        if worker is None:
            return
        try:
            worker.cancel_inflight_requests()
            if ep is not None:
                # Non-blocking close request, then a bounded amount of progress. Dropping an endpoint
                # that was never closed can hang the next UCX call; close_blocking() would wait for a
                # peer that may be dead or busy.
                ep.close()
                deadline = time.monotonic() + CLOSE_PROGRESS_S
                while time.monotonic() < deadline and worker.progress_once():
                    pass
        except _api.UCXError as e:
            log.warning("UCX close: %s", e)
        del ep, worker  # ucxx frees the endpoint, then the worker

    def _wait(self, req: Any, deadline: float | None) -> None:
        """Progress this channel's worker until `req` completes; PeerClosed on control-socket EOF."""
        worker, sock = self._worker, self._sock
        epfd = worker.epoll_file_descriptor
        while True:
            worker.progress()
            if req.completed:
                try:
                    req.check_error()
                except _api.UCXError as e:  # connection reset, cancelled, ...: the transfer is lost
                    raise PeerClosed(f"UCX transfer failed: {type(e).__name__}: {e}") from None
                return
            left = remaining(deadline)
            if self._closed:
                raise PeerClosed("channel closed during a transfer")
            if not worker.arm():
                continue  # events arrived meanwhile: progress again before sleeping
            wait_s = 1.0 if left is None else min(left, 1.0)
            r, _, _ = select.select([epfd, sock], [], [], wait_s)
            if sock in r:
                if peer_gone(sock) or self._closed:
                    raise PeerClosed("peer closed the control connection during a transfer")
                select.select([epfd], [], [], min(wait_s, 0.005))  # peer's next header waits: do not spin

    @staticmethod
    def _submit(post: Any) -> Any:
        """Post a UCX request; UCX errors (e.g. an endpoint already reset) become PeerClosed."""
        try:
            return post()
        except _api.UCXError as e:
            raise PeerClosed(f"UCX request failed: {type(e).__name__}: {e}") from None

    def _abort_inflight(self) -> None:
        if self._worker is not None:
            try:
                self._worker.cancel_inflight_requests()
            except _api.UCXError as e:
                log.warning("UCX cancel: %s", e)

    # --- Channel -----------------------------------------------------------------------------------
    def send(self, data: Buffer | torch.Tensor, timeout: float | None = None) -> None:
        """Send bytes; on a CUDA host `data` may also be a contiguous CUDA tensor (moved by cuda_ipc/copy)."""
        deadline = deadline_of(timeout)
        cuda_device: torch.device | None = None  # the device of a CUDA tensor `data`
        if isinstance(data, torch.Tensor):
            if not data.is_cuda:
                raise TypeError("UCX send: a CPU tensor is not a buffer; send its bytes or a CUDA tensor")
            if not data.is_contiguous():
                raise ValueError("CUDA tensors must be contiguous to send")
            payload: Any = data.reshape(-1).view(torch.uint8)  # bytes: CUDA array interface lacks bf16
            n = payload.numel()
            cuda_device = data.device
        else:
            payload = as_bytes_view(data)
            n = len(payload)
        cuda = cuda_device is not None
        with self._op():
            try:
                self._handshake(deadline_of(HANDSHAKE_TIMEOUT_S) if deadline is None else deadline)
                if not cuda and n <= INLINE_MAX:
                    sendall(self._sock, _HDR.pack(MSG_MAGIC, INLINE, n, 0) + payload, deadline)
                    return
                if cuda and not _cuda_capable(self._tls):
                    raise ProtocolError(
                        f"UCX cannot move CUDA memory safely with UCX_TLS={self._tls!r} (needs CUDA support "
                        f"loaded and {CUDA_TLS!r}: cuda_ipc, no shared memory): send host bytes instead"
                    )
                if cuda and not self._peer_cuda:
                    raise ProtocolError("peer has no CUDA UCX: send host bytes instead")
                if cuda:
                    dev = self._cuda_ctx(cuda_device)
                    torch.cuda.current_stream(dev).synchronize()  # the producer's writes land first
                tag = self._send_seq
                self._send_seq += 1
                sendall(self._sock, _HDR.pack(MSG_MAGIC, CUDA if cuda else HOST, n, tag), deadline)
                self._wait(
                    self._submit(lambda: self._ep.tag_send(_Array(payload), _api.UCXXTag(tag))), deadline
                )
            except (FrameError, PeerClosed, TransferTimeout):
                self._abort_inflight()
                self.close()
                raise

    def recv(self, timeout: float | None = None) -> memoryview:
        """Next message. A message sent from a CUDA tensor arrives as a CUDA uint8 tensor (reused buffer)."""
        deadline = deadline_of(timeout)
        with self._op():
            try:
                self._handshake(deadline_of(HANDSHAKE_TIMEOUT_S) if deadline is None else deadline)
                if timeout is not None and not readable(self._sock, max(0.0, remaining(deadline) or 0.0)):
                    raise TransferTimeout(f"no message within {timeout} s")
            except TransferTimeout:
                if self._ep is None:
                    self.close()
                raise  # nothing consumed: the channel stays usable
            except (FrameError, PeerClosed):
                self.close()
                raise
            try:
                hdr = memoryview(self._hdr)
                recv_exact_into(self._sock, hdr, deadline)
                magic, kind, n, tag = _HDR.unpack(hdr)
                if magic != MSG_MAGIC or kind not in (INLINE, HOST, CUDA):
                    raise FrameForeign(f"bad UCX control header (magic {bytes(magic)!r}, kind {kind})")
                if n > self._max:
                    raise FrameTooLarge(f"message claims {n} bytes > cap {self._max}")
                if kind == INLINE:
                    if n > INLINE_MAX:
                        raise FrameForeign(f"inline message of {n} bytes")
                    out = self._host_view(n)
                    recv_exact_into(self._sock, out, deadline)
                    return out
                if tag != self._recv_seq:
                    raise ProtocolError(f"UCX message tag {tag}, expected {self._recv_seq}")
                self._recv_seq += 1
                if kind == CUDA:
                    # Channel.recv is typed for host bytes; a CUDA message comes as a CUDA uint8 tensor
                    # (documented above), which only a peer that sent a CUDA tensor receives
                    return self._recv_cuda(n, tag, deadline)  # type: ignore[return-value]
                out = self._host_view(n)
                if n:
                    self._wait(
                        self._submit(lambda: self._ep.tag_recv(_Array(out), _api.UCXXTag(tag))), deadline
                    )
                return out
            except (FrameError, PeerClosed, TransferTimeout):
                self._abort_inflight()
                self.close()
                raise

    def _host_view(self, n: int) -> memoryview:
        if len(self._buf) < n:
            self._buf = bytearray(max(n, len(self._buf) * 5 // 4))
        return memoryview(self._buf)[:n]

    def _recv_cuda(self, n: int, tag: int, deadline: float | None) -> torch.Tensor:
        if not torch.cuda.is_available():
            raise ProtocolError("peer sent a CUDA message but this host has no CUDA")
        dev = self._cuda_ctx()
        if self._dev_buf is None or self._dev_buf.numel() < n:
            self._dev_buf = torch.empty(max(n, 1), dtype=torch.uint8, device=torch.device("cuda", dev))
        out = self._dev_buf[:n]
        if n:
            self._wait(self._submit(lambda: self._ep.tag_recv(_Array(out), _api.UCXXTag(tag))), deadline)
        return out

    def poll(self) -> bool:
        return not self._closed and readable(self._sock, 0.0)


class UCXListener(Listener):
    def __init__(self, host: str, port: int, tls: str, max_message_bytes: int) -> None:
        self._sock = listen_tcp(host, port)
        self._tls, self._max = tls, max_message_bytes
        self.address = format_host_port("ucx", host, self._sock.getsockname()[1])

    def accept(self, timeout: float | None = None) -> Channel:
        conn = accept_conn(self._sock, timeout)
        return UCXChannel(conn, self._tls, self._max)  # handshake on first use, in the caller's thread

    def close(self) -> None:
        close_listening(self._sock)


class UCXTransport(Transport):
    scheme = "ucx"

    def __init__(self, tls: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        _ucx()  # fail now, clearly, if ucxx is not importable
        self.tls = tls or default_tls()
        self.max_message_bytes = max_message_bytes

    def listen(self, host: str, port: int = 0) -> Listener:
        return UCXListener(host, port, self.tls, self.max_message_bytes)

    def connect(self, address: str, timeout: float) -> Channel:
        sock = connect_tcp(address, "ucx", timeout)
        return UCXChannel(sock, self.tls, self.max_message_bytes, connect_timeout=timeout)
