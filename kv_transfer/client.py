"""KVPuller (decode side): pull one transfer's KV layer by layer, verify every frame, hand layers over.

`pull()` blocks and returns the Trailer; `start_pull()` runs the same in a thread and returns a
PullHandle whose `poll()` reports WAITING -> TRANSFERRING -> DONE | FAILED (SGLang-style status).

Checks on every frame: CRC and format (decode_frame), model fingerprint, transfer id, codec, layer
order (0, 1, 2, ... with no gaps; from the first layer asked when a rectangle is asked), and that T, Hkv,
D, dtype and the head range never change; a frame outside the rectangle asked (layers, KV heads) is
LayoutMismatch. The trailer must agree with what arrived (num_layers, num_tokens). Any failure raises a
typed error, closes the connection (no ACK: the server keeps the lease, so the pull can be retried) and
leaves nothing half-acknowledged.

Connections are pooled per address: after an ACK the channel is kept for the next pull to that server.

`pull_pieces()` pulls one destination rank's rectangle from a TP x PP prefill instance: one piece per source
rank (engine.parallel.layout.pieces), all streaming at once (kv_transfer/reshard.py), read by one thread that
waits on every piece's connection (tcp, shm) or by a thread per piece (ucx; see pull_pieces).
Pipeline (kv_transfer/pipeline.py): for a codec that computes (every one but raw), frames are checked and
decoded on the puller's decode pool while the pull thread receives the next ones, at most `pipeline_depth`
frames waiting (each a copy of the received bytes: the channel's receive buffer is reused). write_layer runs on
the pull thread, in layer order. raw is decoded in place instead: its k, v are views of the receive buffer
(zero-copy), so it is written before the next receive.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine.parallel.layout import Layout
from kv_transfer import reshard
from kv_transfer.codec import Codec, CodecContext
from kv_transfer.codec.raw import RawCodec
from kv_transfer.errors import (
    FingerprintMismatch,
    FrameCorrupted,
    FrameForeign,
    KVTransferError,
    LayoutMismatch,
    LeaseExpired,
    PeerClosed,
    ProtocolError,
    PullUnauthorized,
    RemoteError,
    TransferCancelled,
    TransferTimeout,
    UnknownCodec,
    UnknownTransfer,
)
from kv_transfer.frame import DEFAULT_MAX_ELEMENTS, Buffer, Frame, decode_frame, is_frame
from kv_transfer.pipeline import OrderedWindow, auto_workers, codec_pool, pipelined_by_default
from kv_transfer.reshard import WritePiece
from kv_transfer.transport import transport_for
from kv_transfer.transport.base import Channel, Transport, wait_readable
from kv_transfer.wire import (
    Ack,
    ErrorCode,
    ErrorMsg,
    Pull,
    Replica,
    TrailerMsg,
    decode_control,
    encode_control,
    is_control,
)

log = logging.getLogger(__name__)

WriteLayer = Callable[[int, Tensor, Tensor], None]  # (layer, k [T, Hkv, D], v [T, Hkv, D])
# (layer, shape [T, Hkv, D]) -> where the layer's k, v will live (contiguous CPU tensors, e.g. views of a KV
# cache), for a codec that can decode straight into them (`Codec.decode_into`), or None
LayerDest = Callable[[int, tuple[int, ...]], tuple[Tensor, Tensor] | None]
Range = tuple[int, int]  # half-open [start, end)


@dataclass(frozen=True)
class PullStats:
    """Sizes in bytes, durations in seconds. Server-side figures come from the trailer."""

    bytes_on_wire: int = 0  # frames received (headers, params, payload, CRC)
    raw_bytes: int = 0  # K and V uncompressed, as the server read them
    payload_bytes: int = 0  # codec params + payloads
    server_read_s: float = 0.0
    encode_s: float = 0.0  # server: codec encode + frame assembly
    server_wait_s: float = 0.0  # server: waiting for prefill to make layers ready
    server_send_s: float = 0.0
    transfer_s: float = 0.0  # puller: PULL sent -> trailer received (wall clock)
    decode_s: float = 0.0  # puller: frame checks + codec decode
    write_s: float = 0.0  # puller: write_layer callbacks
    connect_s: float = 0.0

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.payload_bytes if self.payload_bytes else 0.0


# the PullStats fields a resharded pull sums over its pieces (all but its own wall clock)
_SUMMED_STATS = tuple(f.name for f in dataclasses.fields(PullStats) if f.name != "transfer_s")


@dataclass(frozen=True)
class Trailer:
    first_token_id: int
    num_tokens: int
    num_layers: int = 0
    stats: PullStats = field(default_factory=PullStats)
    reader: str = ""  # pull_pieces: "one_thread" or "threads" (READERS); "" for pull()


READERS = ("one_thread", "threads")  # how pull_pieces reads its pieces (see its doc)


class PullState(enum.Enum):
    WAITING = "waiting"  # connecting / PULL sent, no frame yet (prefill may still be running)
    TRANSFERRING = "transferring"  # at least one layer received
    DONE = "done"
    FAILED = "failed"


class PullHandle:
    """Status of one pull. Thread-safe; `poll()` never blocks."""

    def __init__(self, transfer_id: str, replica: Replica = Replica(), max_kl: float | None = None) -> None:
        self.transfer_id = transfer_id
        self.replica = replica  # declared in the PULL: which of the ranks pulling these cells this one is
        self.max_kl = (
            max_kl  # declared in the PULL: the request's quality floor for the encoder (None: unset)
        )
        self._state = PullState.WAITING
        self._layers = 0
        self._trailer: Trailer | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._abort = threading.Event()
        self._channel: Channel | None = None
        self._lock = threading.Lock()

    def poll(self) -> PullState:
        return self._state

    @property
    def state(self) -> PullState:
        return self._state

    @property
    def layers_received(self) -> int:
        return self._layers

    @property
    def error(self) -> BaseException | None:
        return self._error

    def wait(self, timeout: float | None = None) -> bool:
        """True once DONE or FAILED."""
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> Trailer:
        """The trailer; re-raises the pull's error if it FAILED; TimeoutError if still running."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"pull {self.transfer_id!r} still {self._state.value}")
        if self._error is not None:
            raise self._error
        assert self._trailer is not None
        return self._trailer

    def abort(self) -> None:
        """Stop the pull (closes its connection; the server keeps the lease until expiry or a retry)."""
        self._abort.set()
        with self._lock:
            ch = self._channel
        if ch is not None:
            ch.close()

    # called by the puller
    def _set_channel(self, ch: Channel | None) -> None:
        with self._lock:
            self._channel = ch
        if ch is not None and self._abort.is_set():
            ch.close()

    def _layer_done(self, n: int) -> None:
        self._layers = n
        self._state = PullState.TRANSFERRING

    def _finish(self, trailer: Trailer | None, error: BaseException | None) -> None:
        self._trailer, self._error = trailer, error
        self._state = PullState.FAILED if error is not None else PullState.DONE
        self._done.set()


_ERRORS: dict[ErrorCode, type[KVTransferError]] = {
    ErrorCode.UNKNOWN_TRANSFER: UnknownTransfer,
    ErrorCode.FINGERPRINT_MISMATCH: FingerprintMismatch,
    ErrorCode.UNKNOWN_CODEC: UnknownCodec,
    ErrorCode.CANCELLED: TransferCancelled,
    ErrorCode.EXPIRED: LeaseExpired,
    ErrorCode.BAD_REQUEST: ProtocolError,
    ErrorCode.INTERNAL: RemoteError,
    ErrorCode.SUPERSEDED: TransferCancelled,
    ErrorCode.SHUTTING_DOWN: PeerClosed,
    ErrorCode.UNAUTHORIZED: PullUnauthorized,
    ErrorCode.LAYOUT_MISMATCH: LayoutMismatch,
}


class KVPuller:
    """Pulls KV from KVServers. Thread-safe: concurrent pulls use separate pooled connections.

    timeout_s bounds the wait for each next message (not the whole pull: a streaming pull may wait
    for a long prefill as long as layers keep coming). out_dtype=None keeps the sender's dtype.
    decode_workers: threads that decode layers, shared by all pulls (0 = the cores this process may use,
    at most 4; started on the first pull that needs them); pipeline_depth: per pull, frames received and
    not yet decoded (0 = decode_workers + 1). pipelined=False decodes every codec on the pull thread, one
    frame at a time; None (the default) pipelines only with more than one decode worker
    (`pipeline.pipelined_by_default`).
    """

    def __init__(
        self,
        fingerprint: int,
        timeout_s: float = 30.0,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        out_dtype: torch.dtype | None = None,
        connect_timeout_s: float = 10.0,
        max_idle_per_address: int = 4,
        codecs: CodecContext | None = None,
        decode_workers: int = 0,
        pipeline_depth: int = 0,
        pipelined: bool | None = None,
    ) -> None:
        """`codecs`: the served model's codec context (default: none, so no calibration or layer 0)."""
        if decode_workers < 0 or pipeline_depth < 0:
            raise ValueError("decode_workers and pipeline_depth must be >= 0")
        self.decode_workers = decode_workers or auto_workers()
        self.pipeline_depth = pipeline_depth or self.decode_workers + 1
        self.pipelined = pipelined if pipelined is not None else pipelined_by_default(self.decode_workers)
        self._decode_pool: ThreadPoolExecutor | None = None  # made by the first pull that decodes on it
        self.fingerprint = fingerprint & 0xFFFFFFFFFFFFFFFF
        self.codecs = codecs if codecs is not None else CodecContext()
        self.timeout_s, self.max_elements, self.out_dtype = timeout_s, max_elements, out_dtype
        self.connect_timeout_s = connect_timeout_s
        self.max_idle_per_address = max_idle_per_address
        self._idle: dict[str, list[Channel]] = {}
        self._transports: dict[str, Transport] = {}
        self._lock = threading.Lock()
        self._closed = False

    # --- public ------------------------------------------------------------------------------------
    def pull(
        self,
        handle_address: str,
        transfer_id: str,
        codec: str,
        write_layer: WriteLayer,
        *,
        token: bytes,
        layers: Range | None = None,
        heads: Range | None = None,
        replica: Replica = Replica(),
        max_kl: float | None = None,
        dest: LayerDest | None = None,
    ) -> Trailer:
        """Pull every layer in order, calling write_layer(layer, k, v) as each arrives; returns the Trailer.

        `token` is the lease's secret from the KV handle (what `KVServer.open_lease` returned).
        `layers`, `heads`: the rectangle to pull (global layers and KV heads); write_layer then gets layers
        l0..l1-1 with k, v [T, h1-h0, D]. heads None = every head the lease holds; layers None = every layer
        of a lease holding the model's layers from 0 (a one-rank instance's; a PP stage's lease needs them).
        k, v may alias a receive buffer that the next layer overwrites: write_layer must copy them
        (KVCache.write does). `replica`: which of the decode ranks pulling this same rectangle this one is
        (wire.Replica; a decode instance replicating KV heads); the lease waits for all of them. Raises typed
        errors (UnknownTransfer, PullUnauthorized, LeaseExpired, FrameCorrupted, ...). `max_kl`: the request's
        quality floor (max_kv_kl, nats per token), sent in the PULL: a rate-controlled codec (cachegen) encodes
        to it instead of the prefill side's default; None = not given. `dest`: where each layer will be
        written, if known (LayerDest); a codec that decodes into it (`Codec.decode_into`) saves write_layer's
        copy, and write_layer is then not called for that layer.
        """
        handle = PullHandle(transfer_id, replica, max_kl)
        self._run(handle, handle_address, codec, write_layer, token, layers, heads, dest=dest)
        return handle.result(0)

    def start_pull(
        self,
        handle_address: str,
        transfer_id: str,
        codec: str,
        write_layer: WriteLayer,
        *,
        token: bytes,
        layers: Range | None = None,
        heads: Range | None = None,
        replica: Replica = Replica(),
        max_kl: float | None = None,
        dest: LayerDest | None = None,
    ) -> PullHandle:
        """Run pull() in a background thread; watch it with handle.poll() / wait() / result()."""
        handle = PullHandle(transfer_id, replica, max_kl)
        threading.Thread(
            target=self._run,
            args=(handle, handle_address, codec, write_layer, token, layers, heads),
            kwargs={"dest": dest},
            name="kvpull",
            daemon=True,
        ).start()
        return handle

    def pull_pieces(
        self,
        src: Layout,
        rank_addresses: Sequence[str],
        transfer_id: str,
        codec: str,
        layers: Range,
        heads: Range | None,
        write_piece: WritePiece,
        *,
        token: bytes,
        num_layers: int,
        num_kv_heads: int,
        replica: Replica = Replica(),
        max_kl: float | None = None,
        threads: bool = False,
    ) -> Trailer:
        """Pull the rectangle `layers` x `heads` (global numbering; heads None = all) of a transfer held by a
        prefill instance laid out as `src`, whose global rank r serves KV at rank_addresses[r].

        One piece per source rank (reshard.plan: each cell from its canonical owner), all streaming at once.
        Returns one Trailer: the first token every source rank's trailer agrees on, num_layers = l1 - l0,
        stats summed over the pieces (transfer_s is the wall clock of the whole), `reader` the way it read.
        No piece is ACKed before every piece's trailer has arrived: if any piece fails, none is ACKed (every
        source lease is kept, so the whole pull can be retried), the others are stopped (no write runs after
        this returns or raises), and the error of the piece that failed first (the cause) is raised. Raises
        LayoutMismatch for a rectangle the source layout cannot serve, before any connection. `replica`: this
        decode rank's place among the ranks holding the same KV heads (reshard.decode_replica), declared in
        every piece's PULL, as is `max_kl` (see pull()).

        write_piece(layer, head_start, k, v) is called as each piece's layers arrive (disjoint rectangles);
        k, v may alias a receive buffer: copy them. Readers (Trailer.reader says which ran): "one_thread"
        where every piece's channel has a readiness descriptor (tcp, shm) and the codec decodes on the pull
        thread (raw, or a puller not pipelined): this thread waits on all the pieces' channels at once and
        reads what each holds without waiting for the rest of a frame (Channel.recv_ready), so a piece still
        arriving holds up no other; "threads" otherwise (ucx, a pipelined decode, or `threads=True`): a pull
        thread per piece (this thread runs piece 0), so write_piece runs on several threads at once. A pull of
        one piece is "threads" with no thread started."""
        planned = reshard.plan(src, rank_addresses, layers, heads, num_layers, num_kv_heads)
        t0 = time.perf_counter()
        handles = [PullHandle(transfer_id, replica, max_kl) for _ in planned]
        trailers: list[Trailer] | None = None
        codec_obj = self.codecs.codec(codec)  # fail fast, before touching the network
        if len(planned) > 1 and not threads and (isinstance(codec_obj, RawCodec) or not self.pipelined):
            trailers = self._pull_pieces_one_thread(planned, handles, codec, write_piece, token)
        reader = "one_thread" if trailers is not None else "threads"
        if trailers is None:
            trailers = self._pull_pieces_threads(planned, handles, codec, write_piece, token)
        first = reshard.agreed([t.first_token_id for t in trailers], "the first token")
        num_tokens = reshard.agreed([t.num_tokens for t in trailers], "the number of tokens")
        stats = [t.stats for t in trailers]
        total = PullStats(
            **{name: sum(getattr(st, name) for st in stats) for name in _SUMMED_STATS},
            transfer_s=time.perf_counter() - t0,
        )
        return Trailer(first, num_tokens, layers[1] - layers[0], total, reader)

    def _pull_pieces_threads(
        self,
        planned: list[reshard.PlannedPull],
        handles: list[PullHandle],
        codec: str,
        write_piece: WritePiece,
        token: bytes,
    ) -> list[Trailer]:
        """pull_pieces' "threads" reader: a pull thread per piece, ACKs behind a barrier."""
        barrier = reshard.AckBarrier(len(planned))

        def run(i: int, p: reshard.PlannedPull) -> None:
            h0 = p.heads[0] if p.heads is not None else 0

            def write_layer(layer: int, k: Tensor, v: Tensor) -> None:
                write_piece(layer, h0, k, v)

            self._run(handles[i], p.address, codec, write_layer, token, p.layers, p.heads, barrier.arrive)
            # the first failure aborts every other piece at once
            if handles[i].error is not None and barrier.fail(i):
                for other in handles:
                    other.abort()

        # piece 0 runs on this thread (a one-piece pull starts no thread), the others on their own
        threads = [
            threading.Thread(target=run, args=(i, p), name=f"kvpull-piece{p.src_rank}", daemon=True)
            for i, p in enumerate(planned[1:], start=1)
        ]
        for th in threads:
            th.start()
        try:
            run(0, planned[0])
        finally:
            for th in threads:
                th.join()
        if barrier.first_failed is not None:  # the cause, not the pieces it stopped
            error = handles[barrier.first_failed].error
            assert error is not None
            raise error
        return [h.result(0) for h in handles]

    def _pull_pieces_one_thread(
        self,
        planned: list[reshard.PlannedPull],
        handles: list[PullHandle],
        codec_name: str,
        write_piece: WritePiece,
        token: bytes,
    ) -> list[Trailer] | None:
        """pull_pieces' "one_thread" reader (see there). None, with nothing sent, when a piece's channel has no
        readiness descriptor (the caller then uses the "threads" reader). Raises the first failure, with no
        piece ACKed and every channel closed."""
        codec = self.codecs.codec(codec_name)
        pieces: list[_Piece] = []
        try:
            for p, h in zip(planned, handles, strict=True):
                t0 = time.perf_counter()
                ch, pooled = self._checkout(p.address)
                pieces.append(
                    _Piece(p, h, ch, pooled, time.perf_counter() - t0, p.layers[0], got=_Received(p.heads))
                )
            if any(pc.ch.readiness_fd() is None for pc in pieces):
                for pc in pieces:
                    self._checkin(pc.plan.address, pc.ch)
                return None
            for pc in pieces:
                self._start_piece(pc, codec_name, token)
            while waiting := [pc for pc in pieces if pc.trailer is None]:
                ready = wait_readable([pc.ch for pc in waiting], self.timeout_s)
                if not ready:
                    raise TransferTimeout(f"no data from the prefill ranks within {self.timeout_s} s")
                for i in ready:
                    self._piece_step(waiting[i], codec, codec_name, write_piece, token)
            # every piece's stream ended with a trailer that checked out: only now is any piece ACKed
            for pc in pieces:
                pc.ch.send(encode_control(Ack(pc.handle.transfer_id)), timeout=self.timeout_s)
        except BaseException:
            for pc in pieces:
                pc.ch.close()
            raise
        for pc in pieces:
            self._checkin(pc.plan.address, pc.ch)
        return [pc.trailer for pc in pieces if pc.trailer is not None]

    def _start_piece(self, pc: _Piece, codec_name: str, token: bytes) -> None:
        """Send the piece's PULL; a pooled connection found dead is replaced by a fresh one, once."""
        pc.t_start = time.perf_counter()
        try:
            self._send_pull(pc.ch, pc.handle, codec_name, token, pc.plan.layers, pc.plan.heads)
        except PeerClosed:
            if not self._reconnect(pc):
                raise
            self._send_pull(pc.ch, pc.handle, codec_name, token, pc.plan.layers, pc.plan.heads)

    def _reconnect(self, pc: _Piece) -> bool:
        """Replace a piece's pooled connection that died before it delivered anything (as _run retries once);
        False when that does not apply."""
        if not pc.pooled or pc.next_layer != pc.plan.layers[0]:
            return False
        pc.ch.close()
        t0 = time.perf_counter()
        with self._lock:
            transport = self._transports[pc.plan.address]  # set by the _checkout that made the first one
        pc.ch, pc.pooled = transport.connect(pc.plan.address, self.connect_timeout_s), False
        pc.connect_s += time.perf_counter() - t0
        return True

    def _piece_step(
        self, pc: _Piece, codec: Codec, codec_name: str, write_piece: WritePiece, token: bytes
    ) -> None:
        """Read what the piece's channel holds, without waiting for more (a frame still arriving does not hold
        up the other pieces); each whole frame is checked, decoded and written; its stream's end is checked.
        Messages the channel already holds whole (buffered(): tcp reads small ones ahead) are taken in the
        same call, without a wait_readable round between them."""
        tid = pc.handle.transfer_id
        while True:
            try:
                msg = pc.ch.recv_ready()
            except PeerClosed:
                if not self._reconnect(pc):
                    raise
                self._start_piece(pc, codec_name, token)
                return
            if msg is None:
                return
            if not is_frame(msg):
                break
            # k, v may view the channel's buffer (raw): written before its next read
            d = self._decode(msg, tid, codec, pc.next_layer)
            h0 = pc.plan.heads[0] if pc.plan.heads is not None else 0
            self._check_layer(d, pc.got, pc.plan.layers)
            t0 = time.perf_counter()
            write_piece(d.frame.layer, h0, d.k, d.v)
            _count_layer(d, pc.got, pc.handle, time.perf_counter() - t0)
            pc.next_layer += 1
            if not pc.ch.buffered():
                return
        ctl = self._end_of_stream(msg, tid, pc.got, pc.plan.layers[0], pc.next_layer, pc.plan.layers)
        stats = _pull_stats(ctl, pc.got, time.perf_counter() - pc.t_start, pc.connect_s)
        pc.trailer = Trailer(ctl.first_token_id, ctl.num_tokens, ctl.num_layers, stats)

    def close(self) -> None:
        """Close pooled connections and stop the decode pool (after the pulls in progress end)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
            pool, self._decode_pool = self._decode_pool, None
        for chans in idle.values():
            for ch in chans:
                ch.close()
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> KVPuller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- connection pool ---------------------------------------------------------------------------
    def _checkout(self, address: str) -> tuple[Channel, bool]:
        with self._lock:
            chans = self._idle.get(address, [])
            while chans:
                ch = chans.pop()
                if not ch.closed and not ch.poll():  # poll(): EOF or stray bytes waiting -> unusable
                    return ch, True
                ch.close()
            transport = self._transports.get(address)
            if transport is None:
                transport = self._transports[address] = transport_for(address)
        return transport.connect(address, self.connect_timeout_s), False

    def _checkin(self, address: str, ch: Channel) -> None:
        with self._lock:
            chans = self._idle.setdefault(address, [])
            if not self._closed and len(chans) < self.max_idle_per_address:
                chans.append(ch)
                return
        ch.close()

    # --- one pull ----------------------------------------------------------------------------------
    def _run(
        self,
        handle: PullHandle,
        address: str,
        codec_name: str,
        write_layer: WriteLayer,
        token: bytes,
        layers: Range | None = None,
        heads: Range | None = None,
        before_ack: Callable[[], bool] | None = None,
        dest: LayerDest | None = None,
    ) -> None:
        try:
            self.codecs.codec(codec_name)  # fail fast, before touching the network
            for attempt in range(2):
                t0 = time.perf_counter()
                ch, pooled = self._checkout(address)
                connect_s = time.perf_counter() - t0
                handle._set_channel(ch)
                try:
                    trailer = self._pull_on(
                        ch, handle, codec_name, write_layer, connect_s, token, layers, heads, before_ack, dest
                    )
                except PeerClosed:
                    ch.close()
                    # a pooled connection may have died while idle: retry once on a fresh one, but only
                    # if nothing was handed to write_layer yet
                    if pooled and attempt == 0 and handle.layers_received == 0 and not handle._abort.is_set():
                        continue
                    raise
                except BaseException:
                    ch.close()
                    raise
                finally:
                    handle._set_channel(None)
                self._checkin(address, ch)
                handle._finish(trailer, None)
                return
        except BaseException as e:  # recorded on the handle; pull() re-raises it via result()
            if handle._abort.is_set() and isinstance(e, PeerClosed):
                e = TransferCancelled(f"pull of {handle.transfer_id!r} aborted")
            handle._finish(None, e)

    def _pull_on(
        self,
        ch: Channel,
        handle: PullHandle,
        codec_name: str,
        write_layer: WriteLayer,
        connect_s: float,
        token: bytes,
        layers: Range | None = None,
        heads: Range | None = None,
        before_ack: Callable[[], bool] | None = None,
        dest: LayerDest | None = None,
    ) -> Trailer:
        """One pull on `ch`. before_ack(), if given, runs once the trailer checked out; False means do not
        ACK (TransferCancelled: the server keeps the lease)."""
        tid = handle.transfer_id
        codec = self.codecs.codec(codec_name)
        t_start = time.perf_counter()
        self._send_pull(ch, handle, codec_name, token, layers, heads)
        first_layer = expect_layer = layers[0] if layers is not None else 0  # the next frame's layer
        got = _Received(heads=heads)  # got.layers of the frames received are written
        window = self._decode_window(codec)
        try:
            while True:
                msg = ch.recv(timeout=self.timeout_s)
                if is_frame(msg):
                    # raw (no window): k, v view the receive buffer, so they are written before the next recv
                    if window is None:
                        d = self._decode(msg, tid, codec, expect_layer, dest)
                        self._write(d, got, write_layer, handle, layers)
                    else:
                        if window.full():
                            self._write(window.take(), got, write_layer, handle, layers)
                        try:
                            window.submit(self._decode, bytes(msg), tid, codec, expect_layer, dest)
                        except RuntimeError as e:  # close() shut the decode pool down during this pull
                            raise TransferCancelled(f"puller closed while pulling {tid!r}") from e
                        while window.head_done():
                            self._write(window.take(), got, write_layer, handle, layers)
                    expect_layer += 1
                    continue
                while window is not None and len(window):  # every frame before a control message is written
                    self._write(window.take(), got, write_layer, handle, layers)
                break
        finally:
            if window is not None:
                window.close()
        ctl = self._end_of_stream(msg, tid, got, first_layer, expect_layer, layers)
        transfer_s = time.perf_counter() - t_start
        if before_ack is not None and not before_ack():
            raise TransferCancelled(f"pull of {tid!r} not acknowledged: another piece failed")
        ch.send(encode_control(Ack(tid)), timeout=self.timeout_s)
        return Trailer(
            ctl.first_token_id, ctl.num_tokens, ctl.num_layers, _pull_stats(ctl, got, transfer_s, connect_s)
        )

    def _send_pull(
        self,
        ch: Channel,
        handle: PullHandle,
        codec_name: str,
        token: bytes,
        layers: Range | None,
        heads: Range | None,
    ) -> None:
        pull = Pull(
            self.fingerprint,
            handle.transfer_id,
            codec_name,
            token,
            layers or (0, 0),
            heads or (0, 0),
            copies=handle.replica.copies,
            replica=handle.replica.index,
            max_kl=handle.max_kl,
        )
        ch.send(encode_control(pull), timeout=self.timeout_s)

    @staticmethod
    def _end_of_stream(
        msg: Buffer, tid: str, got: _Received, first_layer: int, expect_layer: int, layers: Range | None
    ) -> TrailerMsg:
        """The message after a pull's frames: its trailer, checked against the frames received (layers
        [first_layer, expect_layer), every one written); an ERROR is raised as its typed error."""
        if not is_control(msg):
            raise FrameForeign(f"unexpected message starting {bytes(msg[:4])!r}")
        ctl = decode_control(msg)
        if isinstance(ctl, ErrorMsg):
            raise _ERRORS.get(ctl.code, RemoteError)(f"server: {ctl.message}")
        if not isinstance(ctl, TrailerMsg):
            raise ProtocolError(f"unexpected {type(ctl).__name__} during a pull")
        received = expect_layer - first_layer
        if ctl.transfer_id != tid or ctl.num_layers != received or received == 0:
            raise ProtocolError(
                f"trailer says {ctl.num_layers} layers of {ctl.transfer_id!r}, got {received} of {tid!r}"
            )
        if layers is not None and expect_layer != layers[1]:
            raise LayoutMismatch(f"layers {layers} asked, the server sent [{first_layer}, {expect_layer})")
        if got.shape is not None and ctl.num_tokens != got.shape[0]:
            raise ProtocolError(f"trailer says {ctl.num_tokens} tokens, frames carried {got.shape[0]}")
        return ctl

    def _decode_window(self, codec: Codec) -> OrderedWindow[_Decoded] | None:
        """The pull's window on the decode pool; None (decode on the pull thread) for raw, which decodes in
        place (module doc), or when the puller is not pipelined."""
        if isinstance(codec, RawCodec) or not self.pipelined:
            return None
        with self._lock:
            if self._closed:  # a pull after close(): no new pool (nothing would stop it)
                return None
            if self._decode_pool is None:
                self._decode_pool = codec_pool(self.decode_workers, "kvpull-decode")
            return OrderedWindow(self._decode_pool, self.pipeline_depth)

    def _decode(
        self, msg: Buffer, tid: str, codec: Codec, layer: int, dest: LayerDest | None = None
    ) -> _Decoded:
        """Check one frame (CRC, fingerprint, transfer, codec, that it is `layer`) and decode it: into `dest`'s
        tensors where it gives some and the codec can (`in_place`), else into new ones. Runs on the pull
        thread (raw) or the decode pool; any failure is a typed error (KVTransferError)."""
        t0 = time.perf_counter()
        f = decode_frame(msg, expect_fingerprint=self.fingerprint, max_elements=self.max_elements)
        if f.transfer_id != tid:
            raise ProtocolError(f"frame for transfer {f.transfer_id!r} while pulling {tid!r}")
        if f.codec_id != codec.codec_id:
            raise ProtocolError(f"frame codec id {f.codec_id}, requested {codec.name} ({codec.codec_id})")
        if f.layer != layer:
            raise ProtocolError(f"frame for layer {f.layer}, expected layer {layer}")
        try:
            # in place only in the frame's dtype, so the values are those decode() gives, not another rounding
            out = dest(f.layer, f.shape) if dest is not None and self.out_dtype is None else None
            if (
                out is not None
                and out[0].dtype == out[1].dtype == f.dtype
                and codec.decode_into(f.params, f.payload, f.shape, f.layer, *out)
            ):
                return _Decoded(f, *out, time.perf_counter() - t0, in_place=True)
            k, v = codec.decode(f.params, f.payload, f.shape, self.out_dtype or f.dtype, f.layer)
        except KVTransferError:
            raise
        except Exception as e:  # a codec bug must fail this pull with a typed error
            log.exception("decoding layer %d of %s failed", layer, tid)
            raise FrameCorrupted(f"decode layer {layer}: {type(e).__name__}: {e}") from e
        return _Decoded(f, k, v, time.perf_counter() - t0)

    def _write(
        self, d: _Decoded, got: _Received, write_layer: WriteLayer, handle: PullHandle, layers: Range | None
    ) -> None:
        """Hand one decoded layer to write_layer (layers arrive here in order), once _check_layer passed."""
        self._check_layer(d, got, layers)
        t0 = time.perf_counter()
        if not d.in_place:
            write_layer(d.frame.layer, d.k, d.v)
        _count_layer(d, got, handle, time.perf_counter() - t0)

    @staticmethod
    def _check_layer(d: _Decoded, got: _Received, layers: Range | None) -> None:
        """A layer about to be written: in the rectangle asked (_check_rect), and T, Hkv, D and dtype as the
        earlier layers'."""
        f = d.frame
        got.heads = _check_rect(f, layers, got.heads)
        if got.shape is None:
            got.shape, got.dtype = f.shape, f.dtype
        elif f.shape != got.shape or f.dtype != got.dtype:
            raise ProtocolError(
                f"layer {f.layer} is {f.shape} {f.dtype}, earlier layers {got.shape} {got.dtype}"
            )


def _count_layer(d: _Decoded, got: _Received, handle: PullHandle, write_s: float) -> None:
    """Account for one layer written (write_s: its share of the write call)."""
    got.write_s += write_s
    got.decode_s += d.decode_s
    got.wire_bytes += d.frame.nbytes
    got.layers += 1
    handle._layer_done(got.layers)


def _pull_stats(ctl: TrailerMsg, got: _Received, transfer_s: float, connect_s: float) -> PullStats:
    return PullStats(
        bytes_on_wire=got.wire_bytes,
        raw_bytes=ctl.raw_bytes,
        payload_bytes=ctl.payload_bytes,
        server_read_s=ctl.read_s,
        encode_s=ctl.encode_s,
        server_wait_s=ctl.wait_s,
        server_send_s=ctl.send_s,
        transfer_s=transfer_s,
        decode_s=got.decode_s,
        write_s=got.write_s,
        connect_s=connect_s,
    )


@dataclass(frozen=True)
class _Decoded:
    frame: Frame  # its payload views the received bytes
    k: Tensor
    v: Tensor
    decode_s: float  # frame checks + codec decode
    in_place: bool = False  # decoded into the pull's LayerDest: already where write_layer would copy it


@dataclass
class _Received:
    """One pull's progress on its pull thread."""

    heads: Range | None = (
        None  # the KV heads every frame must hold (None until the first when all were asked)
    )
    layers: int = 0  # written, in order
    shape: tuple[int, int, int] | None = None
    dtype: torch.dtype | None = None
    wire_bytes: int = 0
    decode_s: float = 0.0
    write_s: float = 0.0


@dataclass(eq=False)
class _Piece:
    """One piece of a one-thread resharded pull (KVPuller._pull_pieces_one_thread)."""

    plan: reshard.PlannedPull
    handle: PullHandle
    ch: Channel
    pooled: bool  # ch came from the pool (a dead one is replaced once, before anything arrived)
    connect_s: float
    next_layer: int  # the layer of the next frame
    t_start: float = 0.0  # PULL sent (perf_counter)
    got: _Received = field(default_factory=_Received)
    trailer: Trailer | None = None  # its stream ended with a trailer that checked out


def _check_rect(f: Frame, layers: Range | None, heads: Range | None) -> Range:
    """A frame must hold a layer of the rectangle asked and exactly its KV heads (the first frame's heads when
    all were asked): LayoutMismatch otherwise. Returns the heads every later frame must hold."""
    if layers is not None and not layers[0] <= f.layer < layers[1]:
        raise LayoutMismatch(f"frame for layer {f.layer}, asked layers {layers}")
    if heads is not None and f.heads != heads:
        raise LayoutMismatch(f"frame of layer {f.layer} holds KV heads {f.heads}, expected {heads}")
    return f.heads
