"""KVServer (prefill side): the lease table plus the pull server that streams each layer's KV frames.

Threads: one acceptor, one handler per connection, one reaper that expires leases, and a small pool of encode
threads (`encode_workers`) that all connections share. A connection may carry several pulls one after another
(the puller pools connections).

Pipeline (kv_transfer/pipeline.py): a connection's handler sends layer l while the pool reads and encodes
the next ready layers, at most `pipeline_depth` ahead (so at most that many encoded layers wait; each has its
own FrameBuffer on the connection, `pipeline_depth + 1` in all; raw: one layer ahead, 2 buffers; one layer at a
time, small raw frames held to leave together take one each, `BATCH_BYTES` in all). A layer is submitted only
once prefill marked it ready, frames leave in layer order, and a failed read or encode fails the pull with
ERROR INTERNAL (the lease is kept) after the layers before it were sent.

Lease life:
- open_lease() -> deadline = now + ttl. A lease holds a rectangle of the model's KV: layers [l0, l1) x KV
  heads [h0, h1) (default: every layer and every head), what one rank of a TP x PP prefill instance holds
  (engine/parallel/layout.py). Every rank opens its own lease under the same transfer id with the same
  token. The deadline is renewed on every frame sent, and also on mark_ready()/finish()/PULL (progress on
  either side means the KV is still wanted).
- Released exactly once, with on_release(transfer_id, reason), by the first of:
    "pulled"    the pullers' ACKed rectangles together cover everything the lease holds, each cell by as many
                distinct replicas as the PULLs covering it declared (wire.Pull.copies: several ranks of a
                decode instance that replicates KV heads pull the same cells; kv_transfer.coverage);
    "expired"   the reaper found the deadline passed;
    "cancelled" cancel(), or stop() with the lease still open.
  on_release runs on whichever thread released (a connection handler, the reaper, or the caller of
  cancel()/stop()), outside the server's locks; it should be quick (free blocks, enqueue work).
- Each lease has a secret token (16 random bytes) that open_lease() returns; the prefill service puts it
  in the KV handle, the gateway hands it only to the decode instance it chose, and that puller sends it in
  its PULL. A PULL with another token (or none) is refused with ERROR UNAUTHORIZED before any KV byte is
  sent, counted (`counters().unauthorized_pulls`), and leaves the lease exactly as it was: not released,
  its deadline not renewed, a stream in progress not superseded. After a completed pull the lease is gone,
  so replaying the token gets UNKNOWN_TRANSFER.
- A PULL names the rectangle it wants (wire.Pull.layers/heads, global numbering; (0, 0) = all the lease
  holds). One outside the lease is refused with ERROR LAYOUT_MISMATCH before any KV byte, and leaves the
  lease as it was. Several pullers (the ranks of a decode instance) may stream different rectangles of
  one lease at the same time, or the same rectangle as different replicas (Pull.replica).
- If the puller's connection drops mid-transfer (or it rejects a frame) the lease is NOT released: it
  stays until a retried PULL completes it or it expires. A retried PULL restarts from the rectangle's
  first layer and supersedes a still-running stream of the same rectangle and replica for the same transfer
  id.

Invariant: read_layer is never called after a lease's release began, and on_release (which frees the KV
blocks) never runs while a layer is being read and encoded. A read registers itself as one of the lease's
`readers` under `io_lock` (refused once `released` is set); the release sets `released` under `io_lock`, then
waits on it until `readers` is 0, then calls on_release. Layers of one lease are read and encoded in parallel.
Lock order: lease.io_lock before server._lock; on_release and read_layer run without server._lock.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kv_transfer.codec import Codec, CodecContext
from kv_transfer.codec.raw import RawCodec
from kv_transfer.coverage import Coverage
from kv_transfer.errors import (
    FrameError,
    KVTransferError,
    LeaseExists,
    PeerClosed,
    ServerStopped,
    TransferTimeout,
    UnknownCodec,
)
from kv_transfer.frame import MAX_TRANSFER_ID_BYTES, FrameBuffer, frame_payload_bytes
from kv_transfer.pipeline import OrderedWindow, auto_workers, codec_pool, pipelined_by_default
from kv_transfer.transport._sockutil import advertised
from kv_transfer.transport.base import Channel, Listener, Transport
from kv_transfer.wire import (
    MAX_TOKEN_BYTES,
    Ack,
    ErrorCode,
    ErrorMsg,
    Pull,
    TrailerMsg,
    decode_control,
    encode_control,
)
from pdserve.errors import InvalidRequest

log = logging.getLogger(__name__)

ReadLayer = Callable[[int], tuple[Tensor, Tensor]]  # global layer -> (k, v), each [T, h1-h0, D] CPU
OnRelease = Callable[[str, str], None]  # (transfer_id, reason)

IDLE_CONNECTION_TIMEOUT_S = 600.0  # a pooled connection with no PULL for this long is closed
# one layer at a time, raw frames ready together leave in one send call up to this many bytes in all (tcp's
# puller reads up to 64 KiB ahead, so they arrive in one read too)
BATCH_BYTES = 64 << 10
LEASE_TOKEN_BYTES = 16

Range = tuple[int, int]  # half-open [start, end)


@dataclass(eq=False)
class _Lease:
    transfer_id: str
    num_layers: int  # the model's layers (global numbering)
    num_tokens: int
    read_layer: ReadLayer
    on_release: OnRelease
    deadline: float  # time.monotonic() seconds
    io_mutex: threading.Lock = field(
        default_factory=threading.Lock
    )  # io_lock's lock (the read path takes it)
    io_lock: threading.Condition = field(init=False)  # over io_mutex; notified when readers -> 0 in a release
    readers: int = 0  # reads (read_layer + encode) in progress, under io_lock
    ready: int = 0  # global layers [0, ready) may be sent
    first_token_id: int | None = None  # set by finish(): the trailer may follow the last layer
    released: str | None = None  # release reason once released
    session: int = 0  # incremented by every PULL: each stream's id
    # (rectangle (layers, heads; None = all held), replica) -> id of its live stream
    streams: dict[tuple[tuple[Range, Range | None], int], int] = field(default_factory=dict)
    token_ids: Tensor | None = None  # the prompt's ids [T] int64, for codecs that use them (cachegen_l0)
    token: bytes = field(default=b"", repr=False)  # the lease's secret; a PULL must carry it
    layers: Range = (0, 0)  # global layers held; read_layer is called only for these
    heads: Range | None = None  # global KV heads held; None = [0, Hkv of read_layer) (learned at first read)
    pulled: Coverage | None = None  # the cells ACKed so far, by which replicas (made at the first ACK)
    # whether the codec context's layer-0 function reproduces read_layer(0) of this shape from token_ids,
    # checked once as prefill makes layer 0 ready (`_check_layer0`); None: not (yet) checked
    layer0_ok: tuple[bool, tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        self.io_lock = threading.Condition(self.io_mutex)

    def begin_read(self) -> bool:
        """Count a read of read_layer in (a release waits for the reads); False, counting nothing, once released."""
        with self.io_mutex:
            if self.released is not None:
                return False
            self.readers += 1
            return True

    def end_read(self) -> None:
        """The read that begin_read counted is over; the last one wakes a release waiting for it."""
        with self.io_mutex:
            self.readers -= 1
            if self.readers == 0 and self.released is not None:
                self.io_lock.notify_all()


@dataclass
class _PullStats:
    bytes_on_wire: int = 0
    raw_bytes: int = 0
    payload_bytes: int = 0
    read_s: float = 0.0
    encode_s: float = 0.0
    wait_s: float = 0.0
    send_s: float = 0.0

    def add_layer(self, layer: _PullStats) -> None:
        """Add one layer's read/encode figures (measured on a pool thread)."""
        self.raw_bytes += layer.raw_bytes
        self.payload_bytes += layer.payload_bytes
        self.read_s += layer.read_s
        self.encode_s += layer.encode_s


@dataclass(frozen=True)
class KVServerCounters:
    """Totals since start; bytes are what the server passed to `Channel.send`."""

    unauthorized_pulls: int = 0  # PULLs refused for a wrong or missing lease token
    frame_bytes_sent: int = 0  # KV frames (every byte of KV leaves in one)
    control_bytes_sent: int = 0  # TRAILER and ERROR messages
    pulls_served: int = 0  # PULLs handled (answered with a stream or an ERROR)
    # thread CPU time (s) of the connection threads handling those PULLs, from the PULL's arrival to its ACK
    # (or the stream's end): what serving a pull costs this process, whatever else runs beside it
    serve_cpu_s: float = 0.0


@dataclass(frozen=True)
class _Acked:
    """A pull the puller ACKed: `rect` of `lease`, streamed as `session` (KVServer._pulled records it)."""

    lease: _Lease
    rect: tuple[Range, Range | None]
    session: int
    pull: Pull


class _StreamEnded(Exception):
    """Internal: the pull cannot continue; `code`/`message` go to the puller as ERROR."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class KVServer:
    def __init__(
        self,
        transport: Transport,
        host: str,
        fingerprint: int,
        lease_ttl_s: float = 30.0,
        port: int = 0,
        send_timeout_s: float = 60.0,
        codecs: CodecContext | None = None,
        advertise_host: str = "",
        encode_workers: int = 0,
        pipeline_depth: int = 0,
        pipelined: bool | None = None,
        check_layer0_early: bool = True,
    ) -> None:
        """`codecs`: the served model's codec context (default: none, so no calibration or layer 0).
        `host`: the listen host; `advertise_host`: the host `address` names for pullers ("" = the listener's
        own, with a wildcard host replaced by this machine's name). `encode_workers`: threads that encode
        layers, shared by all pulls (0 = the cores this process may use, at most 4); `pipeline_depth`: per
        pull, layers encoded ahead of the one being sent (0 = encode_workers + 1); `pipelined=False`: read,
        encode and send one layer at a time on the connection's thread; None (the default): pipeline only with
        more than one encode worker (on one core the thread hop costs more than the overlap gains).
        `check_layer0_early`: check a lease's layer 0 against the context's layer-0 table as prefill marks it
        ready (`_check_layer0`); False where read_layer copies from a device (the check would put a
        synchronous copy in prefill's loop): a cachegen_l0 pull then checks it."""
        if lease_ttl_s <= 0:
            raise ValueError("lease_ttl_s must be > 0")
        if encode_workers < 0 or pipeline_depth < 0:
            raise ValueError("encode_workers and pipeline_depth must be >= 0")
        self.transport, self.host, self.port = transport, host, port
        self.advertise_host = advertise_host
        self.fingerprint = fingerprint & 0xFFFFFFFFFFFFFFFF
        self.lease_ttl_s = lease_ttl_s
        self.send_timeout_s = send_timeout_s
        self.codecs = codecs if codecs is not None else CodecContext()
        self.encode_workers = encode_workers or auto_workers()
        self.pipeline_depth = pipeline_depth or self.encode_workers + 1
        self.pipelined = pipelined if pipelined is not None else pipelined_by_default(self.encode_workers)
        self.check_layer0_early = check_layer0_early
        self._encode_pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # notified on any lease change and on stop
        # The reaper's own: notified when a lease opens and on stop only. Renewals (every layer marked
        # ready, every frame) only push deadlines later, so they need not wake it.
        self._reaper_cond = threading.Condition(self._lock)
        self._leases: dict[str, _Lease] = {}
        self._listener: Listener | None = None
        self._threads: set[threading.Thread] = set()
        self._channels: set[Channel] = set()
        self._stopping = False
        self._address: str | None = None
        self._unauthorized_pulls = 0  # these three under _lock
        self._frame_bytes_sent = 0
        self._control_bytes_sent = 0
        self._pulls_served, self._serve_cpu_s = 0, 0.0

    # --- lifecycle ---------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        if self._address is None:
            raise RuntimeError("KVServer.address is known after start()")
        return self._address

    def start(self) -> None:
        if self._listener is not None:
            raise RuntimeError("KVServer already started")
        self._listener = self.transport.listen(self.host, self.port)
        self._encode_pool = codec_pool(self.encode_workers, "kvserver-encode")
        self._address = advertised(self._listener.address, self.advertise_host)
        for target, name in ((self._accept_loop, "accept"), (self._reaper_loop, "reaper")):
            self._spawn(target, f"kvserver-{name}")
        log.info("KVServer listening on %s", self._address)

    def stop(self) -> None:
        """Stop serving; open leases are released with reason "cancelled" (so their KV is freed)."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self._cond.notify_all()
            self._reaper_cond.notify_all()
            channels = list(self._channels)
        if self._listener is not None:
            self._listener.close()
        for ch in channels:
            ch.close()  # wakes handler threads blocked in recv/send
        me = threading.current_thread()
        for th in list(self._threads):
            if th is not me:
                th.join(timeout=10.0)
        if self._encode_pool is not None:  # the handlers closed their windows: nothing runs on it now
            self._encode_pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            leases = list(self._leases.values())
        for lease in leases:
            self._release(lease, "cancelled")

    def __enter__(self) -> KVServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        th = threading.Thread(target=self._run_thread, args=(target, *args), name=name, daemon=True)
        with self._lock:
            self._threads.add(th)
        th.start()

    def _run_thread(self, target: Callable[..., None], *args: object) -> None:
        try:
            target(*args)
        except Exception:  # a bug in a handler must not kill the server: log it loudly
            log.exception("KVServer thread %s failed", threading.current_thread().name)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    # --- lease table (called by the prefill service) -----------------------------------------------
    def open_lease(
        self,
        transfer_id: str,
        num_layers: int,
        num_tokens: int,
        read_layer: ReadLayer,
        on_release: OnRelease,
        token_ids: Sequence[int] | None = None,
        *,
        layers: Range | None = None,
        heads: Range | None = None,
        token: bytes | None = None,
    ) -> bytes:
        """Hold `transfer_id`'s KV for pulling; returns the lease's secret token, which a PULL must carry
        (hand it only to the puller that should get this KV). read_layer(l) -> (k, v) [num_tokens, h1-h0, D]
        CPU tensors is called from server threads, only for ready layers in `layers` and never after
        release; on_release is called exactly once. `token_ids`: the prompt's ids, which a codec may send
        instead of a layer it can be recomputed from (cachegen_l0's layer 0).

        The rectangle this server holds (one rank's shard; global numbering): `layers` = (l0, l1) within
        [0, num_layers) (default: all), `heads` = (h0, h1) KV heads (default: every head read_layer returns,
        counted from 0). `token`: reuse a token issued for the same transfer by another rank's server (rank
        0's), so one KV handle's token pulls every rank's shard; default: a fresh random one.
        Raises InvalidRequest (bad arguments), LeaseExists, ServerStopped."""
        if not transfer_id or len(transfer_id.encode("utf-8")) > MAX_TRANSFER_ID_BYTES:
            raise InvalidRequest(f"transfer id must be 1..{MAX_TRANSFER_ID_BYTES} utf-8 bytes")
        if num_layers < 1 or num_tokens < 1:
            raise InvalidRequest("num_layers and num_tokens must be >= 1")
        if token_ids is not None and len(token_ids) != num_tokens:
            raise InvalidRequest(f"{len(token_ids)} token ids for {num_tokens} tokens")
        layers = (0, num_layers) if layers is None else (int(layers[0]), int(layers[1]))
        if not 0 <= layers[0] < layers[1] <= num_layers:
            raise InvalidRequest(f"layers {layers} not a non-empty range within [0, {num_layers})")
        if heads is not None:
            heads = (int(heads[0]), int(heads[1]))
            if not 0 <= heads[0] < heads[1]:
                raise InvalidRequest(f"heads {heads} not a non-empty range of KV heads")
        if token is not None and not 1 <= len(token) <= MAX_TOKEN_BYTES:
            raise InvalidRequest(f"a lease token must be 1..{MAX_TOKEN_BYTES} bytes")
        ids = torch.tensor(list(token_ids), dtype=torch.int64) if token_ids is not None else None
        token = bytes(token) if token is not None else secrets.token_bytes(LEASE_TOKEN_BYTES)
        with self._lock:
            if self._stopping:
                raise ServerStopped("KVServer is stopped")
            if transfer_id in self._leases:
                raise LeaseExists(f"transfer {transfer_id!r} already has a live lease")
            self._leases[transfer_id] = _Lease(
                transfer_id,
                num_layers,
                num_tokens,
                read_layer,
                on_release,
                deadline=time.monotonic() + self.lease_ttl_s,
                token_ids=ids,
                token=token,
                layers=layers,
                heads=heads,
            )
            self._cond.notify_all()
            self._reaper_cond.notify()
        return token

    def mark_ready(self, transfer_id: str, num_layers_ready: int) -> bool:
        """Global layers [0, n) are computed (those the lease holds may be sent). Monotonic. False if the lease
        is gone (released or never opened)."""
        with self._lock:
            lease = self._leases.get(transfer_id)
            if lease is None:
                return False
            n = min(max(num_layers_ready, lease.ready), lease.layers[1])
            if n != lease.ready:
                lease.ready = n
                lease.deadline = time.monotonic() + self.lease_ttl_s
                self._cond.notify_all()
        if n > 0:
            self._check_layer0(lease)
        return True

    def finish(self, transfer_id: str, first_token_id: int) -> bool:
        """All layers are ready and the first token is known: the trailer may be sent. False if gone."""
        with self._lock:
            lease = self._leases.get(transfer_id)
            if lease is None:
                return False
            lease.ready = lease.layers[1]
            lease.first_token_id = int(first_token_id)
            lease.deadline = time.monotonic() + self.lease_ttl_s
            self._cond.notify_all()
        self._check_layer0(lease)
        return True

    def _check_layer0(self, lease: _Lease) -> None:
        """Whether the context's layer-0 table reproduces this lease's layer 0 from its token ids, checked once,
        on the caller's thread (prefill's, as it makes layer 0 ready: the layer is still in the caches), and
        kept on the lease: a cachegen_l0 pull of every head then sends layer 0 as ids without checking it
        again. At the pull the same check ran cold, on the hand-off's critical path (0.35-0.5 ms of a
        1536-token pull's ~7 on a 2-core host). Nothing is checked without a table (the model's own
        function would cost prefill a forward pass of layer 0) or where the lease does not hold layer 0; a
        failed read leaves the check to the pull."""
        l0 = self.codecs.layer0
        if (
            not self.check_layer0_early
            or lease.layer0_ok is not None
            or lease.token_ids is None
            or lease.layers[0] != 0
            or l0 is None
            or l0.mode != "table"
            or not lease.begin_read()  # as _encode_layer: no release while we read
        ):
            return
        try:
            k, v = lease.read_layer(0)
            lease.layer0_ok = (l0.matches(k, v, lease.token_ids), tuple(k.shape))
        except Exception:  # the pull reads and checks it again, and reports what fails there
            log.exception("checking layer 0 of %s failed", lease.transfer_id)
            lease.layer0_ok = (False, ())  # a shape no read has: the pull checks itself
        finally:
            lease.end_read()

    def cancel(self, transfer_id: str) -> bool:
        with self._lock:
            lease = self._leases.get(transfer_id)
        return lease is not None and self._release(lease, "cancelled")

    def num_leases(self) -> int:
        with self._lock:
            return len(self._leases)

    def counters(self) -> KVServerCounters:
        with self._lock:
            return KVServerCounters(
                self._unauthorized_pulls,
                self._frame_bytes_sent,
                self._control_bytes_sent,
                self._pulls_served,
                self._serve_cpu_s,
            )

    def _release(self, lease: _Lease, reason: str) -> bool:
        """Release once; True if this call released it. Waits for the lease's reads in flight to end."""
        with lease.io_lock:
            with self._lock:
                if lease.released is not None:
                    return False
                lease.released = reason
                if self._leases.get(lease.transfer_id) is lease:
                    del self._leases[lease.transfer_id]
                self._cond.notify_all()
            lease.io_lock.wait_for(lambda: lease.readers == 0)  # no new read starts: released is set
        try:
            lease.on_release(lease.transfer_id, reason)
        except Exception:  # the callback is the caller's code: report, keep serving
            log.exception("on_release(%r, %r) raised", lease.transfer_id, reason)
        return True

    # --- threads -----------------------------------------------------------------------------------
    def _reaper_loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                now = time.monotonic()
                expired = [le for le in self._leases.values() if le.deadline <= now]
                if not expired:
                    nxt = min((le.deadline for le in self._leases.values()), default=now + 1.0)
                    self._reaper_cond.wait(timeout=min(max(nxt - now, 0.001), 1.0))
                    continue
            for lease in expired:
                with self._lock:
                    still = lease.deadline <= time.monotonic()  # a frame may have renewed it meanwhile
                if still and self._release(lease, "expired"):
                    log.info("lease %s expired", lease.transfer_id)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            try:
                ch = self._listener.accept(timeout=0.5)
            except TransferTimeout:
                continue
            except KVTransferError as e:
                if self._stopping:
                    return
                log.warning("accept failed: %s", e)
                time.sleep(0.05)
                continue
            with self._lock:
                if self._stopping:
                    ch.close()
                    return
                self._channels.add(ch)
            self._spawn(self._serve_connection, "kvserver-conn", ch)

    def _serve_connection(self, ch: Channel) -> None:
        # reused for every pull on this connection: layer l of a pull is encoded into bufs[l % len(bufs)]
        bufs = [FrameBuffer() for _ in range(self.pipeline_depth + 1)]
        try:
            while not self._stopping:
                try:
                    msg = decode_control(ch.recv(timeout=IDLE_CONNECTION_TIMEOUT_S))
                except (PeerClosed, TransferTimeout):
                    return
                except FrameError as e:
                    log.warning("dropping connection: bad request (%s)", e)
                    self._send_error(ch, ErrorCode.BAD_REQUEST, "", str(e))
                    return
                if not isinstance(msg, Pull):
                    self._send_error(
                        ch, ErrorCode.BAD_REQUEST, "", f"expected PULL, got {type(msg).__name__}"
                    )
                    return
                if not self._serve_pull(ch, msg, bufs):
                    return
        except KVTransferError as e:  # peer died or misbehaved mid-pull: only this connection ends
            log.info("connection ended: %s: %s", type(e).__name__, e)
        finally:
            ch.close()
            with self._lock:
                self._channels.discard(ch)

    def _send(
        self, ch: Channel, data: memoryview | bytes, timeout: float, frame: bool, renew: _Lease | None = None
    ) -> None:
        """One message, counted once sent (frames in batches: `_send_frames`; the last ones with the trailer:
        `_send_last`). `renew`: the lease whose deadline the send renews (under the same lock as the count)."""
        ch.send(data, timeout=timeout)
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        self._count_sent(renew, frame_bytes=n if frame else 0, control_bytes=0 if frame else n)

    def _count_sent(self, renew: _Lease | None, frame_bytes: int = 0, control_bytes: int = 0) -> None:
        """Count bytes sent and renew the lease they were sent for (its deadline), under one lock."""
        with self._lock:
            if renew is not None:
                renew.deadline = time.monotonic() + self.lease_ttl_s
            self._frame_bytes_sent += frame_bytes
            self._control_bytes_sent += control_bytes

    def _send_error(self, ch: Channel, code: ErrorCode, tid: str, message: str) -> None:
        try:
            self._send(ch, encode_control(ErrorMsg(code, tid, message)), 5.0, frame=False)
        except (PeerClosed, TransferTimeout):
            pass  # the peer is gone; nothing more to tell it

    def _serve_pull(self, ch: Channel, pull: Pull, bufs: list[FrameBuffer]) -> bool:
        """Serve one PULL. Returns whether the connection can carry another pull. Its thread CPU up to the ACK
        is counted (counters().serve_cpu_s) before the lease may be released, so on_release sees it."""
        t0 = time.thread_time()
        try:
            out = self._stream_pull(ch, pull, bufs)
        finally:
            cpu = time.thread_time() - t0
            with self._lock:
                self._pulls_served += 1
                self._serve_cpu_s += cpu
        if isinstance(out, _Acked):
            self._pulled(out.lease, out.rect, out.session, out.pull)
            return True
        return out

    def _stream_pull(self, ch: Channel, pull: Pull, bufs: list[FrameBuffer]) -> bool | _Acked:
        """Stream one pull up to its ACK (_Acked: the caller records it), or False/True: it ended without one
        and the connection can(not) carry another pull."""
        tid = pull.transfer_id
        if pull.fingerprint != self.fingerprint:
            self._send_error(
                ch,
                ErrorCode.FINGERPRINT_MISMATCH,
                tid,
                f"server model fingerprint is {self.fingerprint:#018x}",
            )
            return True
        try:
            codec = self.codecs.codec(pull.codec)
            if pull.max_kl is not None:  # the request's floor: what a rate-controlled encoder spends
                codec = codec.at_floor(pull.max_kl)
        except UnknownCodec as e:
            self._send_error(ch, ErrorCode.UNKNOWN_CODEC, tid, str(e))
            return True
        authorized = False
        mismatch: str | None = None
        with self._lock:
            lease = self._leases.get(tid)
            if lease is not None and hmac.compare_digest(lease.token, pull.token):
                authorized = True  # only now may the pull look at the lease's layout
                rect, mismatch = _pull_rect(lease, pull)
                if mismatch is None:  # only now may it touch the lease (supersede, renew, stream)
                    lease.session += 1
                    session = lease.session
                    lease.streams[(rect, pull.replica)] = session
                    lease.deadline = time.monotonic() + self.lease_ttl_s
            elif lease is not None:
                self._unauthorized_pulls += 1
        if lease is None:
            self._send_error(ch, ErrorCode.UNKNOWN_TRANSFER, tid, f"no lease for transfer {tid!r}")
            return True
        if not authorized:
            log.warning("PULL for %s refused: %s lease token", tid, "wrong" if pull.token else "no")
            self._send_error(ch, ErrorCode.UNAUTHORIZED, tid, f"wrong or missing lease token for {tid!r}")
            return True
        if mismatch is not None:
            log.warning("PULL for %s refused: %s", tid, mismatch)
            self._send_error(ch, ErrorCode.LAYOUT_MISMATCH, tid, mismatch)
            return True
        layers, heads = rect
        stats = _PullStats()
        try:
            if not self._stream_layers(ch, lease, session, codec, bufs, stats, layers, heads):
                first_token_id = self._wait_for(lease, session, None, stats)
                trailer = encode_control(_trailer(lease, layers, stats, first_token_id))
                self._send(ch, trailer, self.send_timeout_s, frame=False, renew=lease)
        except _StreamEnded as e:
            self._send_error(ch, e.code, tid, e.message)
            return e.code != ErrorCode.SHUTTING_DOWN
        reply = decode_control(ch.recv(timeout=self.lease_ttl_s))
        if not isinstance(reply, Ack) or reply.transfer_id != tid:
            log.warning("pull %s: expected ACK, got %r; lease kept", tid, reply)
            return False
        return _Acked(lease, rect, session, pull)

    def _pulled(self, lease: _Lease, rect: tuple[Range, Range | None], session: int, pull: Pull) -> None:
        """A puller ACKed `rect` as replica `pull.replica` of `pull.copies`: release the lease once every cell
        it holds was ACKed by as many replicas as declared (kv_transfer.coverage)."""
        layers, heads = rect
        with self._lock:
            key = (rect, pull.replica)
            if lease.streams.get(key) == session:
                del lease.streams[key]
            held = lease.heads
            assert held is not None  # learned at the stream's first read_layer
            if lease.pulled is None:
                lease.pulled = Coverage(lease.layers, held)
            done = lease.pulled.add(layers, heads or held, pull.copies, pull.replica)
            if not done:
                lease.deadline = time.monotonic() + self.lease_ttl_s
        if done:
            self._release(lease, "pulled")

    def _stream_layers(
        self,
        ch: Channel,
        lease: _Lease,
        session: int,
        codec: Codec,
        bufs: list[FrameBuffer],
        stats: _PullStats,
        layers: Range,
        heads: Range | None,
    ) -> bool:
        """Send layers [layers) (global numbering), each frame with KV heads `heads` (None: all the lease holds),
        in order, while the encode pool works ahead (module doc, Pipeline). Returns whether the trailer went
        too: one layer at a time (not pipelined), when prefill has finished by the last layer, it leaves in
        the same send call as the last frame (the puller then gets both in one read). One layer at a time,
        consecutive frames that are ready together and small (`BATCH_BYTES` in all) also leave in one send
        call (a short prompt's pull: its frames and trailer in one system call and one read on each side);
        a layer not ready yet, or a failed encode, first sends the frames held.

        Layer l is encoded into ring[l % len(ring)]: at most len(ring) - 1 layers are in the window, and the
        one taken from it is sent before the window can reach its buffer again. raw's "encoding" is a copy:
        one layer copied ahead of the send is all the overlap it needs, so it uses 2 buffers, not all of
        them (a raw layer is 16x a cachegen one). Raises _StreamEnded."""
        if not self.pipelined:
            # raw frames that are ready together and small (BATCH_BYTES in all) leave in one send call: holding
            # one costs the next one's copy; a computing codec's frame leaves as soon as it is encoded
            batch = BATCH_BYTES if isinstance(codec, RawCodec) else 0
            held: list[memoryview] = []  # encoded, not sent yet: held[i] is in bufs[i]
            held_bytes = 0
            for layer in range(*layers):
                if held and lease.ready <= layer:  # prefill is behind (read without the lock: it only grows)
                    self._send_frames(ch, lease, held, stats)
                    held, held_bytes = [], 0
                self._wait_for(lease, session, layer + 1, stats)
                n = len(held)
                if n == len(bufs):
                    bufs.append(FrameBuffer())
                try:
                    frame = self._encode_task(lease, codec, layer, bufs[n], heads, stats)[0]
                except _StreamEnded:
                    if held:  # the layers before the failed one reach the puller, then its ERROR
                        self._send_frames(ch, lease, held, stats)
                    raise
                first_token_id = self._finished(lease, session) if layer == layers[1] - 1 else None
                if first_token_id is not None:
                    self._send_last(ch, lease, [*held, frame], stats, layers, first_token_id)
                    return True
                if held_bytes + len(frame) <= batch:
                    held.append(frame)
                    held_bytes += len(frame)
                    continue
                if held:
                    self._send_frames(ch, lease, held, stats)
                    held, held_bytes = [], 0
                if len(frame) <= batch:  # held alone from now on: its buffer becomes bufs[0]
                    bufs[0], bufs[n] = bufs[n], bufs[0]
                    held, held_bytes = [frame], len(frame)
                else:
                    self._send_frames(ch, lease, [frame], stats)
            if held:
                self._send_frames(ch, lease, held, stats)
            return False
        assert self._encode_pool is not None  # start() made it
        ring = bufs[:2] if isinstance(codec, RawCodec) else bufs
        window: OrderedWindow[tuple[memoryview, _PullStats]] = OrderedWindow(self._encode_pool, len(ring) - 1)
        nxt = layers[0]  # the next layer to submit
        try:
            for layer in range(*layers):
                # waits for prefill (and checks the lease and session) when nothing is ahead; else returns at once
                self._wait_for(lease, session, layer + 1, stats)
                nxt = self._submit_ready(window, lease, session, codec, ring, nxt, layers[1], heads)
                if nxt <= layer:  # not submitted: released, superseded or stopping since _wait_for returned
                    self._wait_for(
                        lease, session, layer + 1, stats
                    )  # raises the _StreamEnded that says which
                    raise _StreamEnded(ErrorCode.INTERNAL, f"layer {layer} could not be submitted")
                frame, layer_stats = window.take()
                nxt = self._submit_ready(window, lease, session, codec, ring, nxt, layers[1], heads)
                stats.add_layer(layer_stats)
                self._send_frames(ch, lease, [frame], stats)
        finally:
            window.close()  # nothing may still write into bufs when the next pull reuses them
        return False

    def _finished(self, lease: _Lease, session: int) -> int | None:
        """The first token once finish() was called and the stream is still live (what _wait_for(None) returns
        at once), else None."""
        with self._lock:
            if self._stopping or lease.released is not None or session not in lease.streams.values():
                return None
            return lease.first_token_id

    def _send_last(
        self,
        ch: Channel,
        lease: _Lease,
        frames: list[memoryview],
        stats: _PullStats,
        layers: Range,
        first_token_id: int,
    ) -> None:
        """The last frames and the trailer in one send call. The trailer counts the frames' bytes; this send's
        time is not in its send_s (it is not over when the trailer is made)."""
        nbytes = sum(len(f) for f in frames)
        stats.bytes_on_wire += nbytes
        trailer = encode_control(_trailer(lease, layers, stats, first_token_id))
        t0 = time.perf_counter()
        ch.send_many([*frames, trailer], timeout=self.send_timeout_s)
        stats.send_s += time.perf_counter() - t0
        self._count_sent(lease, frame_bytes=nbytes, control_bytes=len(trailer))

    def _send_frames(self, ch: Channel, lease: _Lease, frames: list[memoryview], stats: _PullStats) -> None:
        """Frames in order, in one send call; counted, and the lease renewed (`_count_sent`)."""
        nbytes = sum(len(f) for f in frames)
        t0 = time.perf_counter()
        if len(frames) == 1:
            ch.send(frames[0], timeout=self.send_timeout_s)
        else:
            ch.send_many(frames, timeout=self.send_timeout_s)
        stats.send_s += time.perf_counter() - t0
        stats.bytes_on_wire += nbytes
        self._count_sent(lease, frame_bytes=nbytes)

    def _submit_ready(
        self,
        window: OrderedWindow[tuple[memoryview, _PullStats]],
        lease: _Lease,
        session: int,
        codec: Codec,
        bufs: list[FrameBuffer],
        nxt: int,
        end: int,
        heads: Range | None,
    ) -> int:
        """Submit layers nxt, nxt+1, ... < end that prefill has made ready, while the window has room; returns
        the next layer to submit. Submits nothing once the lease is released or the pull superseded."""
        while nxt < end and not window.full():
            with self._lock:
                go = not self._stopping and lease.released is None and session in lease.streams.values()
                if not (go and lease.ready > nxt):
                    return nxt
            window.submit(self._encode_task, lease, codec, nxt, bufs[nxt % len(bufs)], heads)
            nxt += 1
        return nxt

    def _encode_task(
        self,
        lease: _Lease,
        codec: Codec,
        layer: int,
        buf: FrameBuffer,
        heads: Range | None,
        stats: _PullStats | None = None,
    ) -> tuple[memoryview, _PullStats]:
        """One layer's frame and its figures (on the encode pool: into a _PullStats of its own; inline when not
        pipelined: into the pull's `stats`). Any failure is a _StreamEnded."""
        stats = _PullStats() if stats is None else stats
        try:
            return self._encode_layer(lease, codec, layer, buf, stats, heads), stats
        except _StreamEnded:
            raise
        except Exception as e:  # a codec bug must fail this pull with a typed error, not the connection
            log.exception("encoding layer %d of %s failed", layer, lease.transfer_id)
            raise _StreamEnded(ErrorCode.INTERNAL, f"encode layer {layer}: {type(e).__name__}: {e}") from e

    def _wait_for(self, lease: _Lease, session: int, layers: int | None, stats: _PullStats) -> int:
        """Block until `layers` layers are ready (or, with None, until finish()); returns first_token_id."""
        with self._lock:  # the common case: the layers are ready and the stream still live (no clock read)
            if (
                not self._stopping
                and lease.released is None
                and layers is not None
                and lease.ready >= layers
                and session in lease.streams.values()
            ):
                return lease.first_token_id if lease.first_token_id is not None else -1
        t0 = time.perf_counter()
        with self._lock:
            while True:
                if self._stopping:
                    raise _StreamEnded(ErrorCode.SHUTTING_DOWN, "server is stopping")
                if lease.released is not None:
                    code = {"expired": ErrorCode.EXPIRED, "cancelled": ErrorCode.CANCELLED}.get(
                        lease.released, ErrorCode.UNKNOWN_TRANSFER
                    )
                    raise _StreamEnded(code, f"lease {lease.transfer_id!r} was released ({lease.released})")
                if session not in lease.streams.values():
                    raise _StreamEnded(ErrorCode.SUPERSEDED, "a newer PULL for this transfer took over")
                if layers is not None and lease.ready >= layers:
                    break
                if layers is None and lease.first_token_id is not None:
                    break
                # the reaper expires the lease if nothing renews it; wake at least once a second
                self._cond.wait(timeout=1.0)
        stats.wait_s += time.perf_counter() - t0
        return lease.first_token_id if lease.first_token_id is not None else -1

    def _encode_layer(
        self,
        lease: _Lease,
        codec: Codec,
        layer: int,
        buf: FrameBuffer,
        stats: _PullStats,
        heads: Range | None = None,
    ) -> memoryview:
        """Read `layer` and encode the KV heads `heads` of it (None: all the lease holds) as one frame."""
        if not lease.begin_read():  # no release while we read (see module doc)
            raise _StreamEnded(ErrorCode.UNKNOWN_TRANSFER, f"lease released ({lease.released})")
        try:
            t0 = time.perf_counter()
            try:
                k, v = lease.read_layer(layer)
            except Exception as e:  # the engine's callback failed: tell the puller, keep serving
                log.exception("read_layer(%d) for %s failed", layer, lease.transfer_id)
                raise _StreamEnded(
                    ErrorCode.INTERNAL, f"read_layer({layer}) failed: {type(e).__name__}"
                ) from e
            t1 = time.perf_counter()
            shape = k.shape
            if len(shape) != 3 or shape != v.shape or shape[0] != lease.num_tokens:
                raise _StreamEnded(
                    ErrorCode.INTERNAL,
                    f"read_layer({layer}) gave {tuple(shape)}/{tuple(v.shape)}, want [{lease.num_tokens}, Hkv, D]",
                )
            checked = lease.layer0_ok if layer == 0 else None
            full_shape = tuple(k.shape)
            k, v, head_start = self._select_heads(lease, layer, k, v, heads)
            ids, ids_checked = lease.token_ids, False
            if checked is not None and checked[1] == full_shape == tuple(k.shape):  # every head the check saw
                ids_checked = checked[0]
                if not ids_checked:  # the table does not reproduce it: layer 0 is coded as usual
                    ids = None
            try:
                params, parts = codec.encode_parts(k, v, layer, ids, ids_checked=ids_checked)
            except KVTransferError as e:
                raise _StreamEnded(ErrorCode.INTERNAL, f"encode layer {layer}: {e}") from e
            frame = buf.encode(
                codec_id=codec.codec_id,
                fingerprint=self.fingerprint,
                transfer_id=lease.transfer_id,
                layer=layer,
                shape=tuple(k.shape),
                dtype=k.dtype,
                params=params,
                payload=parts,
                head_start=head_start,
            )
            t2 = time.perf_counter()
        finally:
            lease.end_read()
        stats.read_s += t1 - t0
        stats.encode_s += t2 - t1
        stats.raw_bytes += k.numel() * k.element_size() * 2
        stats.payload_bytes += frame_payload_bytes(
            frame
        )  # codec params + payload, as the frame's header says
        return frame

    def _select_heads(
        self, lease: _Lease, layer: int, k: Tensor, v: Tensor, heads: Range | None
    ) -> tuple[Tensor, Tensor, int]:
        """k, v [T, heads held, D] of `layer` -> (k, v [T, h1-h0, D], h0) for the requested heads (None: all
        held). Called under lease.io_lock. A lease opened without `heads` learns them here: [0, Hkv)."""
        held = lease.heads  # set once, never changed after: no lock once it is known
        if held is None:
            with self._lock:
                if lease.heads is None:
                    lease.heads = (0, k.shape[1])
                held = lease.heads
        if k.shape[1] != held[1] - held[0]:
            raise _StreamEnded(
                ErrorCode.INTERNAL, f"read_layer({layer}) gave {k.shape[1]} KV heads, the lease holds {held}"
            )
        if heads is None or heads == held:
            return k, v, held[0]
        if not held[0] <= heads[0] < heads[1] <= held[1]:
            raise _StreamEnded(ErrorCode.LAYOUT_MISMATCH, f"KV heads {heads} asked, the lease holds {held}")
        a, b = heads[0] - held[0], heads[1] - held[0]
        return k[:, a:b].contiguous(), v[:, a:b].contiguous(), heads[0]


def _trailer(lease: _Lease, layers: Range, stats: _PullStats, first_token_id: int) -> TrailerMsg:
    """The TRAILER closing a pull of `layers` of `lease`, with the pull's figures so far."""
    return TrailerMsg(
        transfer_id=lease.transfer_id,
        first_token_id=first_token_id,
        num_tokens=lease.num_tokens,
        num_layers=layers[1] - layers[0],
        bytes_on_wire=stats.bytes_on_wire,
        raw_bytes=stats.raw_bytes,
        payload_bytes=stats.payload_bytes,
        read_s=stats.read_s,
        encode_s=stats.encode_s,
        wait_s=stats.wait_s,
        send_s=stats.send_s,
    )


def _pull_rect(lease: _Lease, pull: Pull) -> tuple[tuple[Range, Range | None], str | None]:
    """The rectangle (layers, heads) a PULL asks of `lease` (heads None = every head the lease holds), and why
    it cannot be served (None if it can). Called under the server's lock. The rectangle keys the lease's live
    streams, so it is normalized: the same KV asked twice gives the same key."""
    layers = lease.layers if pull.layers == (0, 0) else pull.layers
    heads = None if pull.heads in ((0, 0), lease.heads) else pull.heads
    rect = (layers, heads)
    if not lease.layers[0] <= layers[0] < layers[1] <= lease.layers[1]:
        return rect, f"layers {pull.layers} asked, the lease holds layers {lease.layers}"
    if heads is not None and not heads[0] < heads[1]:
        return rect, f"empty KV-head range {heads} asked"
    if (
        heads is not None
        and lease.heads is not None
        and not lease.heads[0] <= heads[0] <= heads[1] <= lease.heads[1]
    ):
        return rect, f"KV heads {heads} asked, the lease holds KV heads {lease.heads}"
    return rect, None
