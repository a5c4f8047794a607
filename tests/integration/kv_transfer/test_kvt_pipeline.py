"""The pipelined hand-off (kv_transfer/pipeline.py) over real tcp, in real threads: the KV it delivers, parallel
encoding, back-pressure, failures mid-pipeline, the release/read invariant, and no threads left behind."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
import torch

from kv_transfer.client import KVPuller
from kv_transfer.codec import CodecContext
from kv_transfer.errors import FrameCorrupted, RemoteError
from kv_transfer.frame import Buffer, is_frame
from kv_transfer.pipeline import OrderedWindow, codec_pool
from kv_transfer.server import KVServer
from kv_transfer.transport import transport_for
from kv_transfer.transport.base import Channel, Transport
from tests.integration.kv_transfer.kvt_tap import WrappedChannel, WrappedTransport
from tests.integration.kv_transfer.test_kvt_pull import Releases, Sink, _CorruptOnce

FP = 0x5EED
T, H, D = 40, 2, 32


def make_kv(n_layers: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(T, H, D, generator=g), torch.randn(T, H, D, generator=g)) for _ in range(n_layers)]


def pipeline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(("kvserver", "kvpull")) and t.is_alive()]


@pytest.fixture
def ctx() -> CodecContext:
    c = CodecContext()
    if "cachegen" not in c.available():
        pytest.skip("the compiled rANS coder is not available here")
    return c


def serve(
    transport: Transport | None = None,
    codecs: CodecContext | None = None,
    *,
    encode_workers: int,
    pipeline_depth: int = 0,
) -> KVServer:
    srv = KVServer(
        transport or transport_for("tcp"),
        "127.0.0.1",
        fingerprint=FP,
        lease_ttl_s=30.0,
        codecs=codecs,
        encode_workers=encode_workers,
        pipeline_depth=pipeline_depth,
    )
    srv.start()
    return srv


def pull_all(
    ctx: CodecContext,
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    codec: str,
    workers: int,
    depth: int = 0,
    pipelined: bool = True,
) -> Sink:
    """One lease of `kv` pulled with `codec` through a server and puller configured alike."""
    n, rel, sink = len(kv), Releases(), Sink()
    srv = KVServer(
        transport_for("tcp"),
        "127.0.0.1",
        fingerprint=FP,
        codecs=ctx,
        encode_workers=workers,
        pipeline_depth=depth,
        pipelined=pipelined,
    )
    srv.start()
    try:
        token = srv.open_lease("p", n, T, lambda layer: kv[layer], rel)
        srv.finish("p", 3)
        with KVPuller(
            fingerprint=FP,
            timeout_s=10.0,
            codecs=ctx,
            decode_workers=workers,
            pipeline_depth=depth,
            pipelined=pipelined,
        ) as p:
            trailer = p.pull(srv.address, "p", codec, sink, token=token)
        rel.wait("p", "pulled")
        assert rel.total("p") == 1
    finally:
        srv.stop()
    assert sink.layers == list(range(n)) and trailer.num_layers == n
    return sink


@pytest.mark.parametrize("codec", ["raw", "cachegen", "int8"])
def test_pipeline_delivers_what_the_sequential_path_does(ctx: CodecContext, codec: str) -> None:
    """raw bit-exact; a lossy codec exactly what the sequential path gives, which is what encoding and decoding
    the layer in this process gives."""
    n = 7
    kv = make_kv(n, seed=1)
    sequential = pull_all(ctx, kv, codec, workers=1, pipelined=False)
    pipes = [pull_all(ctx, kv, codec, workers=1, depth=1), pull_all(ctx, kv, codec, workers=3, depth=2)]
    c = ctx.codec(codec)
    for layer, (k, v) in enumerate(kv):
        params, parts = c.encode_parts(k, v, layer, None)
        payload = b"".join(bytes(memoryview(x).cast("B")) for x in parts)
        want_k, want_v = c.decode(params, payload, (T, H, D), torch.float32, layer)
        for sink in (sequential, *pipes):
            got_k, got_v = sink.kv[layer]
            assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v), (codec, layer)
            if codec == "raw":
                assert torch.equal(got_k, k) and torch.equal(got_v, v)


def test_layers_of_one_pull_are_encoded_in_parallel() -> None:
    """Two encode workers read two layers of the same lease at once (a barrier both must reach; int8: raw
    copies only one layer ahead)."""
    kv = make_kv(4)
    both = threading.Barrier(2, timeout=10)

    def read(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer < 2:
            both.wait()  # BrokenBarrierError (a failed pull) if layers 0 and 1 were read one after the other
        return kv[layer]

    rel = Releases()
    srv = serve(encode_workers=2, pipeline_depth=3)
    try:
        token = srv.open_lease("par", 4, T, read, rel)
        srv.finish("par", 1)
        with KVPuller(fingerprint=FP, timeout_s=10.0) as p:
            p.pull(srv.address, "par", "int8", Sink(), token=token)
        rel.wait("par", "pulled")
    finally:
        srv.stop()


class _GatedTransport(WrappedTransport):
    """tcp whose server-side sends of KV frames each wait for a permit from the test (a link the test clocks)."""

    def __init__(self) -> None:
        super().__init__(transport_for("tcp"))
        self.cond = threading.Condition()
        self.permits = 0
        self.frames_started = 0  # frame sends begun (waiting for a permit or sending)

    def allow(self, n: int = 1) -> None:
        with self.cond:
            self.permits += n
            self.cond.notify_all()

    def wrap(self, ch: Channel) -> Channel:
        return _GatedChannel(ch, self)


class _GatedChannel(WrappedChannel):
    def __init__(self, inner: Channel, gate: _GatedTransport) -> None:
        super().__init__(inner)
        self.gate = gate

    def send(self, data: Buffer, timeout: float | None = None) -> None:
        if is_frame(data):
            with self.gate.cond:
                self.gate.frames_started += 1
                self.gate.cond.notify_all()
                assert self.gate.cond.wait_for(lambda: self.gate.permits > 0 or self.inner.closed, 10)
                self.gate.permits -= 1
        self.inner.send(data, timeout)

    def close(self) -> None:
        self.inner.close()
        with self.gate.cond:
            self.gate.cond.notify_all()


@pytest.mark.parametrize("codec", ["int8", "raw"])
def test_back_pressure_bounds_encoded_layers_waiting(codec: str) -> None:
    """While the link is stalled, exactly `pipeline_depth` layers are encoded ahead of the one being sent
    (raw: one, whatever the depth: its encoding is a copy, and its frames are large)."""
    n = 9
    depth = 1 if codec == "raw" else 3
    kv = make_kv(n)
    reads: list[int] = []
    cond = threading.Condition()
    gate = _GatedTransport()

    def read(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        with cond:
            # never more than depth layers ahead of the frame being sent
            assert layer <= gate.frames_started + depth, (layer, gate.frames_started)
            reads.append(layer)
            cond.notify_all()
        return kv[layer]

    rel = Releases()
    srv = serve(gate, encode_workers=2, pipeline_depth=3)
    try:
        token = srv.open_lease("bp", n, T, read, rel)
        srv.finish("bp", 1)
        with KVPuller(fingerprint=FP, timeout_s=10.0) as p:
            handle = p.start_pull(srv.address, "bp", codec, Sink(), token=token)
            for sent in range(n):
                want = min(n, sent + 1 + depth)  # the layer on the link and depth more
                with cond:
                    assert cond.wait_for(lambda w=want: len(reads) >= w, 10), (reads, want)  # type: ignore[misc]
                with gate.cond:
                    assert gate.cond.wait_for(lambda s=sent: gate.frames_started >= s + 1, 10)  # type: ignore[misc]
                    assert gate.frames_started == sent + 1  # the link is stalled on this frame
                with cond:
                    assert len(reads) == want, (reads, want)  # nothing more was read while it stalls
                gate.allow()
            handle.result(10)
        assert reads == list(range(n))
        rel.wait("bp", "pulled")
    finally:
        gate.allow(n)
        srv.stop()


@pytest.mark.parametrize("codec", ["raw", "int8"])
def test_encode_error_mid_pipeline_fails_the_pull_and_keeps_the_lease(codec: str) -> None:
    """Layer 3 cannot be encoded (an int32 tensor): the pull fails with RemoteError after layers 0-2 arrived, the
    lease stays, and a retried PULL (now readable) completes it."""
    n = 6
    kv = make_kv(n)
    broken = [True]

    def read(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == 3 and broken[0]:
            return kv[3][0].to(torch.int32), kv[3][1].to(torch.int32)
        return kv[layer]

    rel = Releases()
    srv = serve(encode_workers=2, pipeline_depth=3)
    try:
        token = srv.open_lease("e", n, T, read, rel)
        srv.finish("e", 9)
        with KVPuller(fingerprint=FP, timeout_s=10.0) as p:
            sink = Sink()
            with pytest.raises(RemoteError, match="encode layer 3"):
                p.pull(srv.address, "e", codec, sink, token=token)
            assert sink.layers == [0, 1, 2]  # the layers before the failure, in order
            assert srv.num_leases() == 1 and rel.total("e") == 0  # no ACK: the lease is kept
            broken[0] = False
            sink = Sink()
            assert p.pull(srv.address, "e", codec, sink, token=token).first_token_id == 9
            assert sink.layers == list(range(n))
        rel.wait("e", "pulled")
        assert rel.total("e") == 1
    finally:
        srv.stop()


@pytest.mark.parametrize("codec", ["int8", "cachegen"])
def test_corrupt_frame_mid_pipeline_fails_the_pull_on_the_decode_side(ctx: CodecContext, codec: str) -> None:
    """Layer 2's frame is damaged on the wire: the decode pool's check raises FrameCorrupted, the pull fails
    after layers 0-1 were written, the lease stays, and a retry delivers every layer."""
    n = 6
    kv = make_kv(n)
    rel = Releases()
    srv = serve(_CorruptOnce(transport_for("tcp"), nth=3), codecs=ctx, encode_workers=2)
    try:
        token = srv.open_lease("d", n, T, lambda layer: kv[layer], rel)
        srv.finish("d", 4)
        with KVPuller(fingerprint=FP, timeout_s=10.0, codecs=ctx, decode_workers=2, pipeline_depth=3) as p:
            sink = Sink()
            with pytest.raises(FrameCorrupted):
                p.pull(srv.address, "d", codec, sink, token=token)
            assert sink.layers == [0, 1]
            assert srv.num_leases() == 1 and rel.total("d") == 0
            sink = Sink()
            assert p.pull(srv.address, "d", codec, sink, token=token).first_token_id == 4
            assert sink.layers == list(range(n))
        rel.wait("d", "pulled")
    finally:
        srv.stop()


def test_release_waits_for_reads_in_flight_and_no_read_follows() -> None:
    """cancel() while layers are being read: on_release runs only after every started read ended, and no read
    starts after the release began."""
    n = 8
    kv = make_kv(n)
    events: list[str] = []
    lock = threading.Lock()
    in_read, go = threading.Event(), threading.Event()

    def read(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        with lock:
            events.append(f"start {layer}")
        if layer == 1:
            in_read.set()
            assert go.wait(10)
        with lock:
            events.append(f"end {layer}")
        return kv[layer]

    def on_release(tid: str, reason: str) -> None:
        with lock:
            events.append(f"release {reason}")

    srv = serve(encode_workers=2, pipeline_depth=3)
    try:
        token = srv.open_lease("c", n, T, read, on_release)
        srv.finish("c", 1)
        with KVPuller(fingerprint=FP, timeout_s=10.0) as p:
            handle = p.start_pull(srv.address, "c", "raw", Sink(), token=token)
            assert in_read.wait(10)
            canceller = threading.Thread(target=srv.cancel, args=("c",))
            canceller.start()
            deadline = time.monotonic() + 10
            while srv.num_leases() and time.monotonic() < deadline:  # the release has begun
                time.sleep(0.001)
            assert srv.num_leases() == 0
            with lock:
                assert "release cancelled" not in events  # waiting for the read of layer 1
            go.set()
            canceller.join(10)
            assert not canceller.is_alive()
            assert handle.wait(10) and handle.error is not None
    finally:
        go.set()
        srv.stop()
    at = events.index("release cancelled")
    started = [e.split()[1] for e in events[:at] if e.startswith("start")]
    ended = [e.split()[1] for e in events[:at] if e.startswith("end")]
    assert sorted(started) == sorted(ended) and "1" in ended  # every read began before it ended before it
    assert not [e for e in events[at:] if e.startswith("start")]  # no read after the release began


def test_no_pipeline_threads_after_stop(ctx: CodecContext) -> None:
    assert not pipeline_threads()
    kv = make_kv(5)
    rel = Releases()
    srv = serve(codecs=ctx, encode_workers=2)
    with KVPuller(fingerprint=FP, timeout_s=10.0, codecs=ctx, decode_workers=2) as p:
        for i, codec in enumerate(("raw", "cachegen", "int8")):
            token = srv.open_lease(f"t{i}", 5, T, lambda layer: kv[layer], rel)
            srv.finish(f"t{i}", 1)
            p.pull(srv.address, f"t{i}", codec, Sink(), token=token)
        assert any(t.name.startswith("kvserver-encode") for t in pipeline_threads())
        assert any(t.name.startswith("kvpull-decode") for t in pipeline_threads())
    srv.stop()
    assert not pipeline_threads()


def test_ordered_window_order_errors_and_close() -> None:
    pool = codec_pool(3, "kvtest")
    started, release = threading.Semaphore(0), threading.Event()

    def task(i: int) -> int:
        started.release()
        assert release.wait(10)
        if i == 2:
            raise ValueError("task 2")
        return i * 10

    try:
        w: OrderedWindow[int] = OrderedWindow(pool, 3)
        for i in range(3):
            w.submit(task, i)
        assert w.full() and not w.head_done()
        with pytest.raises(RuntimeError, match="full"):
            w.submit(task, 9)
        release.set()
        assert [w.take(), w.take()] == [0, 10]  # in submission order
        with pytest.raises(ValueError, match="task 2"):
            w.take()
        assert len(w) == 0
        release.clear()
        for i in range(3):
            w.submit(task, i)
        for _ in range(3):
            assert started.acquire(timeout=10)
        closer = threading.Thread(target=w.close)
        closer.start()
        release.set()
        closer.join(10)
        assert not closer.is_alive() and len(w) == 0
    finally:
        release.set()
        pool.shutdown(wait=True)


class _CallsTransport(WrappedTransport):
    """tcp, recording how many messages each send call of the server's channels carried."""

    def __init__(self) -> None:
        super().__init__(transport_for("tcp"))
        self.calls: list[int] = []  # messages per send call, in order

    def wrap(self, ch: Channel) -> Channel:
        return _CallsChannel(ch, self.calls)


class _CallsChannel(WrappedChannel):
    def __init__(self, inner: Channel, calls: list[int]) -> None:
        super().__init__(inner)
        self.calls = calls

    def send(self, data: Buffer, timeout: float | None = None) -> None:
        self.calls.append(1)
        self.inner.send(data, timeout)

    def send_many(self, messages: Sequence[Buffer], timeout: float | None = None) -> None:
        self.calls.append(len(messages))
        self.inner.send_many(messages, timeout)


def test_one_layer_at_a_time_small_raw_frames_leave_together_and_nothing_waits_behind_them() -> None:
    """Not pipelined (one encode worker): raw frames of ~20 KiB ready together leave three to a send call (64 KiB
    at most), the last ones with the trailer; a layer prefill has not made ready sends the frames held first (the
    puller gets them before prefill goes on); a failed encode sends them before its ERROR."""
    n, kv, rel = 6, make_kv(6), Releases()
    broken = [False]

    def read(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == 4 and broken[0]:
            return kv[4][0].to(torch.int32), kv[4][1].to(torch.int32)
        return kv[layer]

    tr = _CallsTransport()
    srv = serve(tr, encode_workers=1)
    assert not srv.pipelined
    try:
        with KVPuller(fingerprint=FP, timeout_s=10.0) as p:
            token = srv.open_lease("b", n, T, read, rel)
            srv.finish("b", 5)
            sink = Sink()
            assert p.pull(srv.address, "b", "raw", sink, token=token).first_token_id == 5
            assert sink.layers == list(range(n)) and tr.calls == [3, 4]  # 3 frames; 3 frames + the trailer
            assert all(
                torch.equal(sink.kv[i][0], kv[i][0]) and torch.equal(sink.kv[i][1], kv[i][1])
                for i in range(n)
            )
            rel.wait("b", "pulled")

            arrived = threading.Condition()
            got: list[int] = []

            def write(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
                with arrived:
                    got.append(layer)
                    arrived.notify_all()

            token = srv.open_lease("s", n, T, read, rel)
            srv.mark_ready("s", 2)
            handle = p.start_pull(srv.address, "s", "raw", write, token=token)
            with arrived:  # layers 0 and 1 arrive while prefill is still at layer 2
                assert arrived.wait_for(lambda: len(got) == 2, 10.0), got
            srv.finish("s", 6)
            assert handle.result(10.0).first_token_id == 6 and got == list(range(n))
            rel.wait("s", "pulled")

            broken[0] = True
            token = srv.open_lease("e", n, T, read, rel)
            srv.finish("e", 7)
            sink = Sink()
            with pytest.raises(RemoteError, match="encode layer 4"):
                p.pull(srv.address, "e", "raw", sink, token=token)
            assert (
                sink.layers == [0, 1, 2, 3] and srv.num_leases() == 1
            )  # layer 3 was held: sent before the ERROR
    finally:
        srv.stop()
