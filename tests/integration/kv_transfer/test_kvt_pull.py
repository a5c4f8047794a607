"""KVServer + KVPuller over each transport, in real threads: streaming, leases, failures, survival."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import torch

from kv_transfer.client import KVPuller, PullState
from kv_transfer.errors import (
    FingerprintMismatch,
    FrameCorrupted,
    LeaseExists,
    LeaseExpired,
    PeerClosed,
    PullUnauthorized,
    TransferCancelled,
    UnknownCodec,
    UnknownTransfer,
)
from kv_transfer.frame import Buffer, is_frame
from kv_transfer.server import KVServer
from kv_transfer.transport import transport_for
from kv_transfer.transport._sockutil import parse_host_port
from kv_transfer.transport.base import Channel, Transport
from kv_transfer.transport.ucx import ucx_available
from kv_transfer.wire import ErrorCode, ErrorMsg, Pull, decode_control, encode_control
from pdserve.errors import InvalidRequest
from tests.integration.kv_transfer.kvt_tap import Tap, WrappedChannel, WrappedTransport

FP = 0x5EED
L, T, H, D = 4, 33, 2, 16


def schemes() -> list[object]:
    ucx = pytest.param(
        "ucx", marks=pytest.mark.skipif(not ucx_available(), reason="ucxx does not import here (see ucx.py)")
    )
    return ["tcp", "shm", ucx]


def make_kv(seed: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(T, H, D, generator=g).to(dtype), torch.randn(T, H, D, generator=g).to(dtype))
        for _ in range(L)
    ]


class Releases:
    """on_release recorder: counts calls per (transfer, reason); keeps each lease's token."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, str]] = Counter()
        self.cond = threading.Condition()
        self.tokens: dict[str, bytes] = {}  # transfer id -> the lease token open_lease returned

    def __call__(self, tid: str, reason: str) -> None:
        with self.cond:
            self.calls[(tid, reason)] += 1
            self.cond.notify_all()

    def wait(self, tid: str, reason: str, timeout: float = 10.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.calls[(tid, reason)] >= 1, timeout), dict(self.calls)

    def total(self, tid: str) -> int:
        return sum(n for (t, _), n in self.calls.items() if t == tid)


class Sink:
    """write_layer recorder: copies what arrives and remembers the order."""

    def __init__(self) -> None:
        self.layers: list[int] = []
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.layers.append(layer)
        self.kv[layer] = (k.clone(), v.clone())


@pytest.fixture(params=schemes())
def scheme(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def server(scheme: str) -> Iterator[KVServer]:
    """A KVServer whose transport is a Tap: `tap(server).wait_received(n)` waits for its n-th request."""
    srv = KVServer(Tap(transport_for(scheme)), "127.0.0.1", fingerprint=FP, lease_ttl_s=10.0)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def puller() -> Iterator[KVPuller]:
    p = KVPuller(fingerprint=FP, timeout_s=10.0)
    yield p
    p.close()


def tap(srv: KVServer) -> Tap:
    assert isinstance(srv.transport, Tap)
    return srv.transport


def open_lease(
    srv: KVServer, tid: str, rel: Releases, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    kv = make_kv(seed)
    rel.tokens[tid] = srv.open_lease(tid, L, T, lambda layer: kv[layer], rel)
    return kv


def test_streaming_pull_before_prefill_finishes(server: KVServer, puller: KVPuller) -> None:
    rel = Releases()
    kv = open_lease(server, "r1", rel)
    sink = Sink()
    handle = puller.start_pull(server.address, "r1", "raw", sink, token=rel.tokens["r1"])
    tap(server).wait_received(1)  # the server has the PULL, and no layer is ready: it sends nothing
    assert tap(server).sent == 0 and handle.poll() == PullState.WAITING and sink.layers == []
    for layer in range(L):  # the "prefill": layers become ready one by one
        assert server.mark_ready("r1", layer + 1)
        deadline = time.monotonic() + 10
        while handle.layers_received < layer + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert sink.layers == list(range(layer + 1))  # streamed as soon as ready, in order
        assert handle.poll() == PullState.TRANSFERRING
    with tap(server).cond:  # every layer's frame is out; the trailer waits for finish()
        assert tap(server).cond.wait_for(lambda: tap(server).sent >= L, 10)
    assert tap(server).sent == L and not handle.wait(0)
    server.finish("r1", first_token_id=777)
    trailer = handle.result(10)
    assert handle.poll() == PullState.DONE
    assert (trailer.first_token_id, trailer.num_tokens, trailer.num_layers) == (777, T, L)
    for layer in range(L):
        assert torch.equal(sink.kv[layer][0], kv[layer][0]) and torch.equal(sink.kv[layer][1], kv[layer][1])
    s = trailer.stats
    assert s.raw_bytes == 2 * L * T * H * D * 4 and s.payload_bytes >= s.raw_bytes
    assert s.bytes_on_wire > s.payload_bytes and s.transfer_s > 0 and s.server_wait_s > 0
    rel.wait("r1", "pulled")
    assert rel.total("r1") == 1 and server.num_leases() == 0
    assert not server.cancel("r1")  # already released: no second on_release
    assert rel.total("r1") == 1


@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_lossy_codec_pull(server: KVServer, puller: KVPuller, codec: str) -> None:
    rel = Releases()
    kv = open_lease(server, "lossy", rel)
    server.finish("lossy", 1)
    sink = Sink()
    trailer = puller.pull(server.address, "lossy", codec, sink, token=rel.tokens["lossy"])
    assert trailer.stats.compression_ratio > 3.0
    for layer in range(L):
        err = (sink.kv[layer][0] - kv[layer][0]).abs().max().item()
        assert 0 < err < 0.5
    rel.wait("lossy", "pulled")


def test_out_dtype_conversion(server: KVServer) -> None:
    rel = Releases()
    kv = open_lease(server, "bf", rel)
    server.finish("bf", 2)
    sink = Sink()
    with KVPuller(fingerprint=FP, timeout_s=10.0, out_dtype=torch.bfloat16) as p:
        p.pull(server.address, "bf", "raw", sink, token=rel.tokens["bf"])
    assert sink.kv[1][0].dtype == torch.bfloat16 and torch.equal(sink.kv[1][0], kv[1][0].to(torch.bfloat16))
    rel.wait("bf", "pulled")


def test_several_pulls_reuse_one_connection(server: KVServer, puller: KVPuller) -> None:
    rel = Releases()
    for i in range(3):
        open_lease(server, f"m{i}", rel, seed=i)
        server.finish(f"m{i}", i)
    for i in range(3):
        assert (
            puller.pull(server.address, f"m{i}", "raw", Sink(), token=rel.tokens[f"m{i}"]).first_token_id == i
        )
        assert puller._idle[server.address]  # the channel went back to the pool
    for i in range(3):
        rel.wait(f"m{i}", "pulled")


def test_concurrent_pulls(server: KVServer) -> None:
    rel = Releases()
    kvs = {f"c{i}": open_lease(server, f"c{i}", rel, seed=i) for i in range(4)}
    for tid in kvs:
        server.finish(tid, 5)
    with KVPuller(fingerprint=FP, timeout_s=10.0) as p:
        handles = {
            tid: (p.start_pull(server.address, tid, "raw", sink := Sink(), token=rel.tokens[tid]), sink)
            for tid in kvs
        }
        for tid, (h, sink) in handles.items():
            h.result(20)
            assert all(torch.equal(sink.kv[i][0], kvs[tid][i][0]) for i in range(L))
    for tid in kvs:
        rel.wait(tid, "pulled")
        assert rel.total(tid) == 1


def test_unknown_transfer_and_bad_requests(server: KVServer, puller: KVPuller) -> None:
    with pytest.raises(UnknownTransfer):
        puller.pull(server.address, "never-opened", "raw", Sink(), token=b"")
    rel = Releases()
    open_lease(server, "fp", rel)
    server.finish("fp", 1)
    with KVPuller(fingerprint=FP + 1, timeout_s=5.0) as other_model, pytest.raises(FingerprintMismatch):
        other_model.pull(server.address, "fp", "raw", Sink(), token=rel.tokens["fp"])
    with pytest.raises(UnknownCodec):
        puller.pull(server.address, "fp", "zstd", Sink(), token=rel.tokens["fp"])
    with pytest.raises(LeaseExists):
        server.open_lease("fp", L, T, lambda layer: make_kv(0)[layer], rel)
    assert not server.mark_ready("never-opened", 1) and not server.finish("never-opened", 1)
    puller.pull(
        server.address, "fp", "raw", Sink(), token=rel.tokens["fp"]
    )  # the lease survived all of the above
    rel.wait("fp", "pulled")


def test_cancel_releases_once_and_fails_a_waiting_pull(server: KVServer, puller: KVPuller) -> None:
    rel = Releases()
    open_lease(server, "x", rel)
    server.mark_ready("x", 1)
    handle = puller.start_pull(server.address, "x", "raw", Sink(), token=rel.tokens["x"])
    deadline = time.monotonic() + 10
    while handle.layers_received < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert server.cancel("x")
    with pytest.raises(TransferCancelled):
        handle.result(10)
    assert handle.poll() == PullState.FAILED
    assert not server.cancel("x")
    assert rel.calls == Counter({("x", "cancelled"): 1})


def test_expiry_releases_once(scheme: str, puller: KVPuller) -> None:
    with KVServer(transport_for(scheme), "127.0.0.1", fingerprint=FP, lease_ttl_s=0.3) as srv:
        rel = Releases()
        open_lease(srv, "idle", rel)  # nobody ever pulls it
        open_lease(srv, "stuck", rel)  # a puller waits, but prefill never makes a layer ready
        handle = puller.start_pull(srv.address, "stuck", "raw", Sink(), token=rel.tokens["stuck"])
        rel.wait("idle", "expired")
        with pytest.raises(LeaseExpired):
            handle.result(10)
        rel.wait("stuck", "expired")
        assert rel.calls == Counter({("idle", "expired"): 1, ("stuck", "expired"): 1})
        assert srv.num_leases() == 0
        with pytest.raises(UnknownTransfer):
            puller.pull(srv.address, "idle", "raw", Sink(), token=rel.tokens["idle"])


def test_renewal_keeps_a_slow_prefill_alive(scheme: str, puller: KVPuller) -> None:
    with KVServer(transport_for(scheme), "127.0.0.1", fingerprint=FP, lease_ttl_s=0.4) as srv:
        rel = Releases()
        open_lease(srv, "slow", rel)
        handle = puller.start_pull(srv.address, "slow", "raw", Sink(), token=rel.tokens["slow"])
        for layer in range(L):  # total 0.8 s > ttl, but every step renews the lease
            time.sleep(0.2)
            srv.mark_ready("slow", layer + 1)
        srv.finish("slow", 3)
        assert handle.result(10).first_token_id == 3
        rel.wait("slow", "pulled")
        assert rel.total("slow") == 1


class _CorruptOnce(WrappedTransport):
    """Wraps a transport; flips one bit in the n-th message the first accepted channel sends."""

    def __init__(self, inner: Transport, nth: int) -> None:
        super().__init__(inner)
        self.nth = nth
        self.done = False

    def wrap(self, ch: Channel) -> Channel:
        return _Ch(ch, self)


class _Ch(WrappedChannel):
    def __init__(self, inner: Channel, owner: _CorruptOnce) -> None:
        super().__init__(inner)
        self.owner, self.sent = owner, 0

    def send(self, data: Buffer, timeout: float | None = None) -> None:
        self.sent += 1
        if self.sent == self.owner.nth and not self.owner.done:
            self.owner.done = True
            bad = bytearray(data)
            bad[len(bad) // 2] ^= 0x10
            data = bad
        self.inner.send(data, timeout)


def test_corrupted_frame_is_caught_and_server_survives(scheme: str, puller: KVPuller) -> None:
    with KVServer(_CorruptOnce(transport_for(scheme), nth=2), "127.0.0.1", fingerprint=FP) as srv:
        rel = Releases()
        kv = open_lease(srv, "c", rel)
        srv.finish("c", 9)
        sink = Sink()
        with pytest.raises(FrameCorrupted):
            puller.pull(srv.address, "c", "raw", sink, token=rel.tokens["c"])
        assert sink.layers == [0]  # layer 1's frame was the damaged one
        assert rel.total("c") == 0 and srv.num_leases() == 1  # not acknowledged: the lease stays
        sink = Sink()
        assert (
            puller.pull(srv.address, "c", "raw", sink, token=rel.tokens["c"]).first_token_id == 9
        )  # so a retry succeeds
        assert torch.equal(sink.kv[L - 1][1], kv[L - 1][1])
        rel.wait("c", "pulled")
        open_lease(srv, "next", rel, seed=1)
        srv.finish("next", 10)
        assert puller.pull(srv.address, "next", "raw", Sink(), token=rel.tokens["next"]).first_token_id == 10
        rel.wait("next", "pulled")
        assert rel.total("c") == 1 and rel.total("next") == 1


def test_puller_dying_mid_transfer_keeps_the_lease(server: KVServer, puller: KVPuller) -> None:
    rel = Releases()
    open_lease(server, "d", rel)
    server.finish("d", 4)

    def dies_at_layer_2(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if layer == 2:
            raise RuntimeError("decode worker crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        puller.pull(server.address, "d", "raw", dies_at_layer_2, token=rel.tokens["d"])
    assert rel.total("d") == 0 and server.num_leases() == 1
    assert (
        puller.pull(server.address, "d", "raw", Sink(), token=rel.tokens["d"]).first_token_id == 4
    )  # a retried pull completes it
    rel.wait("d", "pulled")
    assert rel.total("d") == 1


def test_server_survives_garbage_clients(scheme: str, server: KVServer, puller: KVPuller) -> None:
    for garbage in (
        b"",
        b"\x00" * 7,
        b"PDT1" + b"\xff" * 8 + b"junk",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 50,
    ):
        if scheme == "shm":
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.connect("\0" + server.address.removeprefix("shm://"))
        else:
            raw = socket.create_connection(parse_host_port(server.address, scheme))
        raw.sendall(garbage)
        raw.close()
    # a well-formed connection carrying a message that is not a PULL: ERROR(BAD_REQUEST), then closed
    ch = transport_for(scheme).connect(server.address, timeout=5)
    ch.send(b"\x00" * 100)
    reply = decode_control(ch.recv(timeout=5))
    assert isinstance(reply, ErrorMsg) and reply.code == ErrorCode.BAD_REQUEST
    with pytest.raises(PeerClosed):
        ch.recv(timeout=5)
    ch.close()
    rel = Releases()
    open_lease(server, "ok", rel)
    server.finish("ok", 1)
    assert puller.pull(server.address, "ok", "raw", Sink(), token=rel.tokens["ok"]).num_layers == L
    rel.wait("ok", "pulled")


def test_stop_releases_open_leases_as_cancelled(scheme: str) -> None:
    srv = KVServer(Tap(transport_for(scheme)), "127.0.0.1", fingerprint=FP)
    srv.start()
    rel = Releases()
    open_lease(srv, "s1", rel)
    with KVPuller(fingerprint=FP, timeout_s=10.0) as p:
        handle = p.start_pull(srv.address, "s1", "raw", Sink(), token=rel.tokens["s1"])
        tap(srv).wait_received(1)  # the pull is waiting on the server when it stops
        srv.stop()
        with pytest.raises(PeerClosed):
            handle.result(10)
    assert rel.calls == Counter({("s1", "cancelled"): 1})


def test_abort_a_pull(server: KVServer, puller: KVPuller) -> None:
    rel = Releases()
    open_lease(server, "ab", rel)
    handle = puller.start_pull(server.address, "ab", "raw", Sink(), token=rel.tokens["ab"])
    tap(server).wait_received(1)  # aborted while the server streams it (waiting for layer 0)
    handle.abort()
    with pytest.raises(TransferCancelled):
        handle.result(10)
    assert server.num_leases() == 1 and rel.total("ab") == 0  # the server keeps it for a retry


def test_cachegen_l0_pull_sends_layer0_as_the_leases_token_ids(scheme: str, tiny_model_dir) -> None:
    """A real model's prompt KV behind a lease that knows the prompt's ids: pulled with cachegen_l0 between a
    server and a puller that hold the model's codec context, layer 0 crosses as 4 bytes per token and
    arrives exactly as prefill computed it; the rest is cachegen's."""
    from engine.kv_probe import KVProbe
    from kv_transfer.codec import CodecContext

    probe = KVProbe(str(tiny_model_dir), 64)
    ctx = CodecContext.from_model_dir(tiny_model_dir, probe.runner.model, probe.runner.fingerprint)
    assert ctx.layer0 is not None and ctx.pull_codec("cachegen") == "cachegen_l0"
    ids = [(13 * i + 7) % 2000 for i in range(48)]
    kv = probe.prefill(ids)
    server = KVServer(transport_for(scheme), "127.0.0.1", fingerprint=FP, lease_ttl_s=10.0, codecs=ctx)
    server.start()
    try:
        with pytest.raises(InvalidRequest, match="token ids"):
            server.open_lease(
                "l0-bad", len(kv), len(ids), lambda layer: kv[layer], Releases(), token_ids=ids[:-1]
            )
        with KVPuller(fingerprint=FP, timeout_s=10.0, codecs=ctx) as puller:
            rel = Releases()
            token = server.open_lease("l0", len(kv), len(ids), lambda layer: kv[layer], rel, token_ids=ids)
            server.finish("l0", 5)
            sink = Sink()
            trailer = puller.pull(server.address, "l0", "cachegen_l0", sink, token=token)
        assert torch.equal(sink.kv[0][0], kv[0][0]) and torch.equal(sink.kv[0][1], kv[0][1])
        for layer in range(1, len(kv)):
            err = (sink.kv[layer][0] - kv[layer][0]).abs().max().item()
            assert 0 < err < 0.5
        layer_bytes = 2 * len(ids) * kv[0][0][0].numel() * 4  # one layer's K+V in fp32
        assert trailer.stats.payload_bytes < (len(kv) - 1) * layer_bytes / 3  # layer 0 ~free, rest compressed
        rel.wait("l0", "pulled")
    finally:
        server.stop()


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_pull_decodes_into_the_cache_in_place_with_the_values_a_copy_writes(pipelined: bool) -> None:
    """cachegen_l0 pulled into a KV cache twice, through write_layer's copy and with `dest` (the cache's own
    views, as decode_service pulls), on the shipped model (its calibrated transform: every layer a format
    the compiled decoder writes in place): the same cache bytes; in place, write_layer runs only for the
    layers `dest` gives no views for."""
    from pathlib import Path

    from engine.kv_cache import KVCache
    from engine.kv_probe import KVProbe
    from kv_transfer.codec import CodecContext

    shipped = Path(__file__).resolve().parents[3] / "models" / "pdserve-tiny-py"
    probe = KVProbe(str(shipped), 64)
    ctx = CodecContext.from_model_dir(shipped, probe.runner.model, probe.runner.fingerprint)
    ids = [(13 * i + 7) % 2000 for i in range(48)]
    kv = probe.prefill(ids)
    _, heads, dim = kv[0][0].shape
    server = KVServer(transport_for("tcp"), "127.0.0.1", fingerprint=FP, lease_ttl_s=10.0, codecs=ctx)
    server.start()
    caches, copied = [], []
    try:
        with KVPuller(fingerprint=FP, timeout_s=10.0, codecs=ctx, pipelined=pipelined) as puller:
            for in_place in (False, True):
                cache = KVCache(len(kv), 4, 16, heads, dim)
                blocks = [0, 1, 2]
                writes: list[int] = []

                def write(layer: int, k: torch.Tensor, v: torch.Tensor, c=cache, w=writes, b=blocks) -> None:
                    w.append(layer)
                    c.write(layer, b, 0, k, v)

                def dest(layer: int, shape: tuple[int, ...], c=cache, b=blocks):  # no views for layer 2
                    return None if layer == 2 else c.run_views(layer, b, 0, shape[0])

                tid = f"inplace-{in_place}"
                rel = Releases()
                token = server.open_lease(tid, len(kv), len(ids), lambda layer: kv[layer], rel, token_ids=ids)
                server.finish(tid, 5)
                puller.pull(
                    server.address, tid, "cachegen_l0", write, token=token, dest=dest if in_place else None
                )
                rel.wait(tid, "pulled")
                caches.append(cache)
                copied.append(writes)
    finally:
        server.stop()
    assert copied == [list(range(len(kv))), [2]]
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    assert torch.equal(caches[1].k[0, :3].flatten(0, 1)[: len(ids)], kv[0][0])  # layer 0 exact, in place


@pytest.mark.parametrize("early", [True, False])
def test_layer0_is_checked_once_as_prefill_makes_it_ready(early: bool, tiny_model_dir, monkeypatch) -> None:
    """With check_layer0_early (the default) the server checks a lease's layer 0 against the table when it is
    marked ready, and the cachegen_l0 pull sends it as ids without checking again; a layer 0 the table does
    not reproduce is coded as usual (and arrives as cachegen's lossy values); without the early check the
    pull checks, as before."""
    from engine.kv_probe import KVProbe
    from kv_transfer.codec import CodecContext, layer0

    probe = KVProbe(str(tiny_model_dir), 64)
    ctx = CodecContext.from_model_dir(tiny_model_dir, probe.runner.model, probe.runner.fingerprint)
    assert ctx.layer0 is not None and ctx.layer0.mode == "table"
    ids = [(13 * i + 7) % 2000 for i in range(48)]
    kv = probe.prefill(ids)
    wrong = [(kv[0][0] + 1.0, kv[0][1]), *kv[1:]]  # a layer 0 no model computes from these ids
    checks: list[bool] = []
    matches = layer0.Layer0.matches

    def counted(self, k, v, token_ids):  # noqa: ANN001, ANN202 (the method's own signature)
        checks.append(ok := matches(self, k, v, token_ids))
        return ok

    monkeypatch.setattr(layer0.Layer0, "matches", counted)
    server = KVServer(
        transport_for("tcp"),
        "127.0.0.1",
        fingerprint=FP,
        lease_ttl_s=10.0,
        codecs=ctx,
        check_layer0_early=early,
    )
    server.start()
    try:
        with KVPuller(fingerprint=FP, timeout_s=10.0, codecs=ctx) as puller:
            for name, layers_kv, exact in (("right", kv, True), ("wrong", wrong, False)):
                rel = Releases()
                token = server.open_lease(name, len(kv), len(ids), layers_kv.__getitem__, rel, token_ids=ids)
                server.mark_ready(name, 1)
                assert checks == ([exact] if early else [])  # checked as layer 0 became ready, or not yet
                server.finish(name, 5)
                sink = Sink()
                puller.pull(server.address, name, "cachegen_l0", sink, token=token)
                assert checks == [exact]  # once in all: at mark_ready, or at the pull
                checks.clear()
                assert torch.equal(sink.kv[0][0], layers_kv[0][0]) == exact  # ids: exact; coded: lossy
                assert 0 < (sink.kv[0][1] - kv[0][1]).abs().max().item() < 0.5 or exact
                rel.wait(name, "pulled")
    finally:
        server.stop()


def test_only_the_lease_token_pulls_and_a_wrong_one_gets_no_kv_byte(
    scheme: str, server: KVServer, puller: KVPuller
) -> None:
    """A PULL with a wrong, missing or truncated token gets ERROR(UNAUTHORIZED) and not one frame byte, is
    counted, and leaves the lease to the right puller, even one already streaming; a replay after the
    pull finds no lease."""
    rel = Releases()
    kv = open_lease(server, "auth", rel)
    right = rel.tokens["auth"]
    assert len(right) == 16
    server.mark_ready("auth", 1)  # layer 0 may be sent right away
    sink = Sink()
    handle = puller.start_pull(server.address, "auth", "raw", sink, token=right)
    deadline = time.monotonic() + 10
    while handle.layers_received < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert handle.poll() == PullState.TRANSFERRING
    frames_before = server.counters().frame_bytes_sent
    assert frames_before > 0
    # on the wire: every reply to a bad PULL is one ERROR control message, never a KV frame
    ch = transport_for(scheme).connect(server.address, timeout=5)
    wrong_tokens = [bytes(b ^ 0xFF for b in right), b"", right[:-1], right + b"\x00"]
    received = 0
    for token in wrong_tokens:
        ch.send(encode_control(Pull(FP, "auth", "raw", token)))
        reply = ch.recv(timeout=5)
        received += len(reply)
        assert not is_frame(reply)
        msg = decode_control(reply)
        assert isinstance(msg, ErrorMsg) and msg.code == ErrorCode.UNAUTHORIZED and msg.transfer_id == "auth"
    ch.close()
    with pytest.raises(PullUnauthorized):  # the typed error a puller gets
        puller.pull(server.address, "auth", "raw", Sink(), token=bytes(16))
    counters = server.counters()
    assert counters.unauthorized_pulls == len(wrong_tokens) + 1
    assert counters.frame_bytes_sent == frames_before  # not one KV byte went to a wrong token
    assert server.num_leases() == 1 and rel.total("auth") == 0
    # the right puller's stream was not superseded: it gets the rest and the whole cache is byte-exact
    server.mark_ready("auth", L)
    server.finish("auth", 77)
    trailer = handle.result(10)
    assert trailer.first_token_id == 77 and sink.layers == list(range(L))
    for layer in range(L):
        assert torch.equal(sink.kv[layer][0], kv[layer][0]) and torch.equal(sink.kv[layer][1], kv[layer][1])
    assert server.counters().frame_bytes_sent == trailer.stats.bytes_on_wire  # every frame went to it
    rel.wait("auth", "pulled")
    # every PULL was served and counted, the right one before its lease was released
    served = server.counters()
    assert served.pulls_served == len(wrong_tokens) + 2 and served.serve_cpu_s > 0
    with pytest.raises(UnknownTransfer):  # replaying the token: the lease is gone
        puller.pull(server.address, "auth", "raw", Sink(), token=right)
    assert server.counters().unauthorized_pulls == len(wrong_tokens) + 1


def test_a_tighter_max_kl_in_the_pull_gets_a_higher_fidelity_stream() -> None:
    """The request's floor crosses in the PULL and the prefill side's cachegen encoder spends it: with the
    shipped model's calibration (transform + rate table), the same 256-token KV pulled at a tight floor costs
    more bytes and arrives closer than pulled with none (the server's default floor)."""
    from pathlib import Path

    from kv_transfer.codec import CodecContext
    from kv_transfer.codec.cachegen import CacheGenCodec

    shipped = Path(__file__).resolve().parents[3] / "models" / "pdserve-tiny-py"
    ctx = CodecContext.from_model_dir(shipped)
    if ctx.transform is None or ctx.rate is None or "cachegen" not in ctx.available():
        pytest.skip("needs the shipped model's calibration and the compiled coder")
    tight = min(p.kl for p in ctx.rate.for_mode("plain") if p.tokens == 256)
    codec = ctx.codec("cachegen")
    assert isinstance(codec, CacheGenCodec)
    loose_choice, tight_choice = codec.rate_choice(256), codec.rate_choice(256, tight)
    assert loose_choice is not None and tight_choice is not None and tight_choice.scale < loose_choice.scale
    g = torch.Generator().manual_seed(3)
    kv = [(torch.randn(256, 2, 32, generator=g), torch.randn(256, 2, 32, generator=g)) for _ in range(5)]
    server = KVServer(transport_for("tcp"), "127.0.0.1", fingerprint=FP, lease_ttl_s=10.0, codecs=ctx)
    server.start()
    try:
        got = {}
        with KVPuller(fingerprint=FP, timeout_s=10.0, codecs=ctx) as puller:
            for name, floor in (("loose", None), ("tight", tight)):
                rel = Releases()
                token = server.open_lease(name, len(kv), 256, lambda layer: kv[layer], rel)
                server.finish(name, 1)
                sink = Sink()
                trailer = puller.pull(server.address, name, "cachegen", sink, token=token, max_kl=floor)
                rel.wait(name, "pulled")
                err = max(
                    (sink.kv[i][j] - kv[i][j]).abs().max().item() for i in range(len(kv)) for j in (0, 1)
                )
                got[name] = (trailer.stats.payload_bytes, err)
    finally:
        server.stop()
    assert got["tight"][0] > got["loose"][0]  # more bits spent ...
    assert got["tight"][1] < got["loose"][1]  # ... for a closer copy
