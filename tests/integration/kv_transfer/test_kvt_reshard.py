"""KV reshard between layouts: a real model's prompt KV, split into the shards of a TP x PP prefill instance (one
real KVServer per rank, tcp/shm on loopback, one process), pulled by every rank of a decode layout with
`KVPuller.pull_pieces`: every cell arrives exactly once from its owner, leases are released only once every cell
they hold was pulled (by every decode rank holding it, when the decode instance replicates KV heads), and a
missing piece or a layout disagreement is a typed error that loses nothing."""

from __future__ import annotations

import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from engine.parallel.layout import Layout
from kv_transfer.client import KVPuller, Trailer
from kv_transfer.errors import LayoutMismatch, PeerClosed, ProtocolError, TransferTimeout, UnknownTransfer
from kv_transfer.frame import decode_frame, encode_frame
from kv_transfer.reshard import decode_replica, handle_layout, is_canonical, plan
from kv_transfer.server import KVServer
from kv_transfer.transport import transport_for
from kv_transfer.wire import ErrorCode, ErrorMsg, Pull, Replica, decode_control, encode_control
from pdserve.v1 import common_pb2
from tests.integration.kv_transfer.test_kvt_pull import Releases

FP = 0x5EED5EED5EED5EED
FIRST_TOKEN = 17

KV = list[tuple[Tensor, Tensor]]  # per layer: k, v [T, Hkv, D]


@pytest.fixture(scope="module")
def real_kv(tiny_model_dir) -> tuple[KV, int]:
    """The tiny model's prompt KV (2 layers, 2 KV heads), and its token count."""
    from engine.kv_probe import KVProbe

    probe = KVProbe(str(tiny_model_dir), 48)
    ids = [(11 * i + 3) % 2000 for i in range(40)]
    return probe.prefill(ids), len(ids)


class Prefill:
    """A prefill instance's KV side: one KVServer per global rank; each canonical rank holds its shard of the
    prompt's KV under one transfer id and rank 0's token (replica ranks open no lease)."""

    def __init__(
        self, layout: Layout, scheme: str, kv: KV, num_tokens: int, tid: str, lease_ttl_s: float = 30.0
    ) -> None:
        self.layout, self.kv, self.tid = layout, kv, tid
        self.num_layers, self.num_kv_heads = len(kv), kv[0][0].shape[1]
        self.releases = Releases()
        self.servers = [
            KVServer(transport_for(scheme), "127.0.0.1", fingerprint=FP, lease_ttl_s=lease_ttl_s)
            for _ in range(layout.world_size)
        ]
        self.reads: list[tuple[int, int]] = []  # (rank, layer) of every read_layer call
        self._lock = threading.Lock()
        self.token: bytes | None = None
        self.leased: list[int] = []
        for rank, srv in enumerate(self.servers):
            srv.start()
            if not is_canonical(layout, rank, self.num_kv_heads):
                continue
            layers, heads = layout.owned(rank, self.num_layers, self.num_kv_heads)
            self.token = srv.open_lease(
                tid,
                self.num_layers,
                num_tokens,
                self._reader(rank, heads),
                self.releases,
                layers=layers,
                heads=heads,
                token=self.token,
            )
            self.leased.append(rank)
        for rank in self.leased:  # layers become ready, then the driver broadcasts the first token
            self.servers[rank].mark_ready(tid, self.num_layers)
            self.servers[rank].finish(tid, FIRST_TOKEN)

    def _reader(self, rank: int, heads: tuple[int, int]):
        def read_layer(layer: int) -> tuple[Tensor, Tensor]:
            with self._lock:
                self.reads.append((rank, layer))
            k, v = self.kv[layer]
            return k[:, heads[0] : heads[1]].contiguous(), v[:, heads[0] : heads[1]].contiguous()

        return read_layer

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.servers]

    def handle(self) -> common_pb2.KVHandle:
        return common_pb2.KVHandle(
            transfer_id=self.tid,
            address=self.servers[0].address,
            codec="raw",
            num_layers=self.num_layers,
            num_tokens=self.kv[0][0].shape[0],
            model_fingerprint=FP,
            token=self.token,
            tp=self.layout.tp,
            pp=self.layout.pp,
            num_kv_heads=self.num_kv_heads,
            rank_addresses=self.addresses,
        )

    def open_leases(self) -> int:
        return sum(s.num_leases() for s in self.servers)

    def wait_pulled(self, n: int) -> None:
        """Wait until n leases were released as pulled (a server releases once it read the puller's ACK)."""
        rel = self.releases
        with rel.cond:
            assert rel.cond.wait_for(lambda: rel.calls[(self.tid, "pulled")] >= n, 10.0), dict(rel.calls)

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


class Shard:
    """write_piece recorder of one decode rank: its layers x heads, filled cell by cell (each exactly once)."""

    def __init__(self, kv: KV, layers: tuple[int, int], heads: tuple[int, int]) -> None:
        t, _, d = kv[0][0].shape
        self.layers, self.heads = layers, heads
        shape = (layers[1] - layers[0], t, heads[1] - heads[0], d)
        self.k = torch.full(shape, float("nan"), dtype=kv[0][0].dtype)
        self.v = torch.full(shape, float("nan"), dtype=kv[0][0].dtype)
        self.writes: list[tuple[int, int, int]] = []  # (layer, head_start, heads)
        self._lock = threading.Lock()

    def __call__(self, layer: int, head_start: int, k: Tensor, v: Tensor) -> None:
        a = head_start - self.heads[0]
        with self._lock:
            self.writes.append((layer, head_start, k.shape[1]))
        self.k[layer - self.layers[0], :, a : a + k.shape[1]] = k
        self.v[layer - self.layers[0], :, a : a + k.shape[1]] = v

    def expected(self, kv: KV) -> tuple[Tensor, Tensor]:
        h0, h1 = self.heads
        ks = torch.stack([kv[la][0][:, h0:h1] for la in range(*self.layers)])
        vs = torch.stack([kv[la][1][:, h0:h1] for la in range(*self.layers)])
        return ks, vs


class ThreadsPuller(KVPuller):
    """A puller whose pull_pieces always uses the "threads" reader (a pull thread per piece, as over ucx)."""

    def pull_pieces(self, *args: Any, **kwargs: Any) -> Trailer:
        return super().pull_pieces(*args, threads=True, **kwargs)


@pytest.fixture(params=["one_thread", "threads"])
def puller(request: pytest.FixtureRequest) -> Iterator[KVPuller]:
    """Every test runs with both pull_pieces readers (tcp and shm offer one_thread; see KVPuller.pull_pieces)."""
    p = KVPuller(fingerprint=FP, timeout_s=10.0) if request.param == "one_thread" else ThreadsPuller(FP, 10.0)
    yield p
    p.close()


def pull_all_ranks(pre: Prefill, dst: Layout, puller: KVPuller) -> list[Shard]:
    """Every decode rank pulls its shard, all at the same time (as a decode instance's ranks do); ranks holding
    the same replicated KV heads each pull them, declaring their replica."""
    hl = handle_layout(pre.handle())
    shards: dict[int, Shard] = {}
    errors: list[BaseException] = []
    threads = []
    for rank in range(dst.world_size):
        layers, heads = dst.owned(rank, hl.num_layers, hl.num_kv_heads)
        shard = shards[rank] = Shard(pre.kv, layers, heads)
        replica = decode_replica(dst, rank, hl.num_kv_heads)

        def run(shard: Shard = shard, replica: Replica = replica) -> None:
            try:
                tr = puller.pull_pieces(
                    hl.layout,
                    hl.rank_addresses,
                    pre.tid,
                    "raw",
                    shard.layers,
                    shard.heads,
                    shard,
                    token=pre.token or b"",
                    num_layers=hl.num_layers,
                    num_kv_heads=hl.num_kv_heads,
                    replica=replica,
                )
                assert tr.first_token_id == FIRST_TOKEN and tr.num_layers == shard.layers[1] - shard.layers[0]
                pieces = len(plan(hl.layout, hl.rank_addresses, shard.layers, shard.heads, 2, 2))
                one = pieces > 1 and not isinstance(puller, ThreadsPuller)
                assert tr.reader == ("one_thread" if one else "threads")
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        threads.append(threading.Thread(target=run))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    return list(shards.values())


LAYOUTS = {
    "tp1": Layout(1, 1),
    "tp2": Layout(2, 1),
    "pp2": Layout(1, 2),
    "tp2pp2": Layout(2, 2),
    "tp4": Layout(4, 1),
    "tp4pp2": Layout(4, 2),
}
PAIRS = [
    ("tp1", "tp1"),
    ("tp2", "tp1"),
    ("tp1", "tp2"),
    ("pp2", "tp2"),
    ("tp2", "pp2"),
    ("tp2pp2", "tp1"),
    ("tp4", "tp2pp2"),  # the source replicates each KV head on two ranks: only the canonical one is pulled
    ("tp2", "tp4pp2"),  # the destination replicates each KV head on two ranks: both pull it (copies = 2)
]


@pytest.mark.parametrize("src,dst", PAIRS)
def test_every_cell_arrives_once_from_its_owner_and_every_lease_is_released(
    real_kv: tuple[KV, int], puller: KVPuller, src: str, dst: str
) -> None:
    kv, num_tokens = real_kv
    pre = Prefill(LAYOUTS[src], "tcp", kv, num_tokens, f"rs-{src}-{dst}")
    try:
        shards = pull_all_ranks(pre, LAYOUTS[dst], puller)
        for shard in shards:
            k, v = shard.expected(kv)
            assert torch.equal(shard.k, k) and torch.equal(shard.v, v)  # raw: bit-exact, no cell missing
            cells = [(la, h) for la, h0, n in shard.writes for h in range(h0, h0 + n)]
            assert len(cells) == len(set(cells))  # no cell written twice
        pre.wait_pulled(len(pre.leased))
        assert pre.open_leases() == 0 and pre.releases.calls[(pre.tid, "pulled")] == len(pre.leased)
        # each (source rank, layer) was read once per piece that needs it: from its owner, never a replica
        want: Counter[tuple[int, int]] = Counter()
        for shard in shards:
            for p in plan(pre.layout, pre.addresses, shard.layers, shard.heads, 2, 2):
                want.update((p.src_rank, la) for la in range(*p.layers))
        assert Counter(pre.reads) == want and {r for r, _ in want} <= set(pre.leased)
    finally:
        pre.stop()


def test_shm_reshard_tp2pp2_to_pp2(real_kv: tuple[KV, int], puller: KVPuller) -> None:
    kv, num_tokens = real_kv
    pre = Prefill(Layout(2, 2), "shm", kv, num_tokens, "rs-shm")
    try:
        for shard in pull_all_ranks(pre, Layout(1, 2), puller):
            k, v = shard.expected(kv)
            assert torch.equal(shard.k, k) and torch.equal(shard.v, v)
        pre.wait_pulled(4)
        assert pre.open_leases() == 0
    finally:
        pre.stop()


def test_a_lease_is_released_only_when_every_cell_it_holds_was_pulled(
    real_kv: tuple[KV, int], puller: KVPuller
) -> None:
    """TP1 prefill, TP2 decode: rank 0 of the decode pulls head 0; the lease (both heads) stays until rank 1
    pulled head 1. A pull of the same rectangle again is allowed meanwhile (a retry) and releases nothing."""
    kv, num_tokens = real_kv
    pre = Prefill(Layout(1, 1), "tcp", kv, num_tokens, "rs-cover")
    try:
        hl = handle_layout(pre.handle())
        for _ in range(2):
            shard = Shard(kv, (0, 2), (0, 1))
            puller.pull_pieces(
                hl.layout, hl.rank_addresses, pre.tid, "raw", (0, 2), (0, 1), shard,
                token=pre.token or b"", num_layers=2, num_kv_heads=2,
            )  # fmt: skip
            assert torch.equal(shard.k, shard.expected(kv)[0])
            assert pre.open_leases() == 1 and pre.releases.total(pre.tid) == 0
        shard = Shard(kv, (0, 2), (1, 2))
        puller.pull_pieces(
            hl.layout, hl.rank_addresses, pre.tid, "raw", (0, 2), (1, 2), shard,
            token=pre.token or b"", num_layers=2, num_kv_heads=2,
        )  # fmt: skip
        pre.releases.wait(pre.tid, "pulled")
        assert pre.open_leases() == 0 and pre.releases.total(pre.tid) == 1
    finally:
        pre.stop()


def pull_copy(pre: Prefill, puller: KVPuller, heads: tuple[int, int], replica: Replica) -> Shard:
    """One decode rank of a TP1 prefill's KV: layers (0, 2) x `heads`, declaring `replica`; checks the bytes."""
    hl = handle_layout(pre.handle())
    shard = Shard(pre.kv, (0, 2), heads)
    puller.pull_pieces(
        hl.layout, hl.rank_addresses, pre.tid, "raw", (0, 2), heads, shard,
        token=pre.token or b"", num_layers=2, num_kv_heads=2, replica=replica,
    )  # fmt: skip
    k, v = shard.expected(pre.kv)
    assert torch.equal(shard.k, k) and torch.equal(shard.v, v)
    return shard


def test_a_replicated_head_keeps_the_lease_until_every_copy_was_pulled(
    real_kv: tuple[KV, int], puller: KVPuller
) -> None:
    """TP1 prefill (2 KV heads), decode TP4: each head lives on two decode ranks (copies = 2), which each pull
    it. The lease stays after the first copy of every cell (a retry of the same replica adds nothing) and is
    released as pulled once the second copies are in; after that the token gets UnknownTransfer."""
    kv, num_tokens = real_kv
    pre = Prefill(Layout(1, 1), "tcp", kv, num_tokens, "rs-copies")
    try:
        for heads in ((0, 1), (1, 2)):  # replica 0 of each head (decode ranks 0 and 2)
            pull_copy(pre, puller, heads, Replica(0, 2))
        pull_copy(pre, puller, (0, 1), Replica(0, 2))  # rank 0 retries: still one copy of two
        assert pre.open_leases() == 1 and pre.releases.total(pre.tid) == 0
        pull_copy(pre, puller, (0, 1), Replica(1, 2))  # head 0 complete, head 1 still one copy
        assert pre.open_leases() == 1 and pre.releases.total(pre.tid) == 0
        pull_copy(pre, puller, (1, 2), Replica(1, 2))
        pre.wait_pulled(1)
        assert pre.open_leases() == 0 and pre.releases.total(pre.tid) == 1
        with pytest.raises(UnknownTransfer):
            pull_copy(pre, puller, (1, 2), Replica(1, 2))
    finally:
        pre.stop()


def test_a_lease_waiting_for_a_copy_still_expires(real_kv: tuple[KV, int], puller: KVPuller) -> None:
    """Only one copy of a replicated head arrives (the other decode rank died): the lease is not released as
    pulled, and the reaper still releases it ("expired") once its TTL passes with no progress."""
    kv, num_tokens = real_kv
    pre = Prefill(Layout(1, 1), "tcp", kv, num_tokens, "rs-expire", lease_ttl_s=2.0)
    try:
        pull_copy(pre, puller, (0, 2), Replica(0, 2))
        pre.releases.wait(pre.tid, "expired")
        assert pre.releases.calls == {(pre.tid, "expired"): 1} and pre.open_leases() == 0
    finally:
        pre.stop()


def test_a_pull_declaring_nonsense_copies_is_refused_and_leaves_the_lease(
    real_kv: tuple[KV, int], puller: KVPuller
) -> None:
    """A PULL with copies 0 (what a broken peer could send: the puller's own encoder refuses it) gets ERROR
    BAD_REQUEST and no KV; the lease is untouched and the right pulls still complete it."""
    kv, num_tokens = real_kv
    pre = Prefill(Layout(1, 1), "tcp", kv, num_tokens, "rs-bad-copies")
    try:
        good = encode_control(Pull(FP, pre.tid, "raw", pre.token or b""))
        body = bytearray(good[:-4])
        body[-10:-8] = bytes([0, 0])  # copies 0, replica 0 (before the max_kl f64)
        ch = transport_for("tcp").connect(pre.addresses[0], timeout=5)
        try:
            ch.send(bytes(body) + zlib.crc32(bytes(body)).to_bytes(4, "little"))
            msg = decode_control(ch.recv(timeout=5))
        finally:
            ch.close()
        assert isinstance(msg, ErrorMsg) and msg.code == ErrorCode.BAD_REQUEST and "copies" in msg.message
        assert pre.reads == [] and pre.open_leases() == 1 and pre.releases.total(pre.tid) == 0
        with pytest.raises(ProtocolError):  # the typed error an API caller gets, before any connection
            pull_copy(pre, puller, (0, 2), Replica(0, 0))
        pull_copy(pre, puller, (0, 2), Replica())
        pre.wait_pulled(1)
    finally:
        pre.stop()


def test_a_missing_piece_fails_the_pull_and_every_lease_is_kept_for_a_retry(
    real_kv: tuple[KV, int], puller: KVPuller
) -> None:
    """TP2 prefill whose rank 1 has no lease yet (UnknownTransfer), then whose rank 1 server is gone
    (PeerClosed): the TP1 decode's pull fails typed, rank 0's piece is not ACKed, so its lease stays; once rank 1
    holds its shard the retried pull gets everything and releases both."""
    kv, num_tokens = real_kv
    pre = Prefill(Layout(2, 1), "tcp", kv, num_tokens, "rs-missing")
    try:
        hl = handle_layout(pre.handle())
        assert pre.servers[1].cancel(pre.tid)  # rank 1 lost its shard
        pre.releases.wait(pre.tid, "cancelled")

        def pull(addresses: tuple[str, ...]) -> Shard:
            shard = Shard(kv, (0, 2), (0, 2))
            puller.pull_pieces(
                hl.layout, addresses, pre.tid, "raw", (0, 2), (0, 2), shard,
                token=pre.token or b"", num_layers=2, num_kv_heads=2,
            )  # fmt: skip
            return shard

        with pytest.raises(UnknownTransfer):
            pull(hl.rank_addresses)
        assert pre.servers[0].num_leases() == 1 and pre.releases.calls[(pre.tid, "pulled")] == 0
        gone = KVServer(transport_for("tcp"), "127.0.0.1", fingerprint=FP)
        gone.start()
        dead_address = gone.address
        gone.stop()
        with pytest.raises(PeerClosed, match="cannot connect"):
            pull((hl.rank_addresses[0], dead_address))
        assert pre.servers[0].num_leases() == 1 and pre.releases.calls[(pre.tid, "pulled")] == 0
        # rank 1 holds its shard again: the retry completes
        k1 = [(k[:, 1:2].contiguous(), v[:, 1:2].contiguous()) for k, v in kv]
        pre.servers[1].open_lease(
            pre.tid, 2, num_tokens, lambda la: k1[la], pre.releases, heads=(1, 2), token=pre.token
        )
        pre.servers[1].finish(pre.tid, FIRST_TOKEN)
        shard = pull(hl.rank_addresses)
        assert torch.equal(shard.k, shard.expected(kv)[0]) and torch.equal(shard.v, shard.expected(kv)[1])
        pre.wait_pulled(2)
        assert pre.open_leases() == 0 and pre.releases.calls[(pre.tid, "pulled")] == 2
    finally:
        pre.stop()


def test_layout_mismatch_is_typed_and_leaves_the_lease(real_kv: tuple[KV, int], puller: KVPuller) -> None:
    """A handle that claims TP1 for what is really rank 0 of a TP2 instance: the pull asks rank 0 for both
    heads, the server holds one -> LayoutMismatch before any KV byte; the lease is untouched. Asking for
    layers the model does not have is refused before any connection."""
    kv, num_tokens = real_kv
    pre = Prefill(Layout(2, 1), "tcp", kv, num_tokens, "rs-mismatch")
    try:
        shard = Shard(kv, (0, 2), (0, 2))
        with pytest.raises(LayoutMismatch, match="holds KV heads"):
            puller.pull_pieces(
                Layout(1, 1), pre.addresses[:1], pre.tid, "raw", (0, 2), (0, 2), shard,
                token=pre.token or b"", num_layers=2, num_kv_heads=2,
            )  # fmt: skip
        assert shard.writes == [] and pre.reads == []
        with pytest.raises(LayoutMismatch, match="holds layers"):
            puller.pull(
                pre.addresses[1], pre.tid, "raw", lambda *a: None, token=pre.token or b"", layers=(0, 3)
            )
        with pytest.raises(LayoutMismatch):
            plan(Layout(2, 1), pre.addresses, (0, 3), (0, 2), 2, 2)
        with pytest.raises(LayoutMismatch, match="rank addresses"):
            plan(Layout(2, 1), pre.addresses[:1], (0, 2), (0, 2), 2, 2)
        assert pre.open_leases() == 2 and pre.releases.total(pre.tid) == 0
        for shard in pull_all_ranks(pre, Layout(1, 1), puller):  # the right layout still gets everything
            assert torch.equal(shard.k, shard.expected(kv)[0])
        pre.wait_pulled(2)
        assert pre.open_leases() == 0
    finally:
        pre.stop()


def test_a_frame_outside_the_rectangle_asked_is_a_layout_mismatch() -> None:
    from kv_transfer.client import _check_rect

    frame = decode_frame(
        encode_frame(
            codec_id=0,
            fingerprint=FP,
            transfer_id="t",
            layer=3,
            shape=(2, 1, 4),
            dtype=torch.float32,
            params=b"",
            payload=bytes(64),
            head_start=1,
        )  # fmt: skip
    )
    assert frame.heads == (1, 2) and _check_rect(frame, (3, 4), (1, 2)) == (1, 2)
    with pytest.raises(LayoutMismatch, match="KV heads"):
        _check_rect(frame, (0, 4), (0, 1))
    with pytest.raises(LayoutMismatch, match="layer 3"):
        _check_rect(frame, (0, 3), None)


def test_a_handle_without_a_layout_is_one_rank_and_still_pulls(
    real_kv: tuple[KV, int], puller: KVPuller
) -> None:
    """A v1 handle (no tp/pp/num_kv_heads/rank_addresses) means Layout(1, 1) at `address`; a server lease
    opened without layers/heads serves both the old whole-lease pull() and pull_pieces()."""
    kv, num_tokens = real_kv
    srv = KVServer(transport_for("tcp"), "127.0.0.1", fingerprint=FP)
    srv.start()
    try:
        rel = Releases()
        token = srv.open_lease("old", 2, num_tokens, lambda la: kv[la], rel)
        srv.finish("old", FIRST_TOKEN)
        handle = common_pb2.KVHandle(
            transfer_id="old",
            address=srv.address,
            codec="raw",
            num_layers=2,
            num_tokens=num_tokens,
            token=token,
        )
        hl = handle_layout(handle)
        assert hl.layout == Layout(1, 1) and hl.rank_addresses == (srv.address,) and hl.num_kv_heads == 0
        shard = Shard(kv, (0, 2), (0, 2))
        tr = puller.pull_pieces(
            hl.layout, hl.rank_addresses, "old", "raw", (0, 2), None, shard,
            token=token, num_layers=2, num_kv_heads=hl.num_kv_heads,
        )  # fmt: skip
        assert tr.first_token_id == FIRST_TOKEN and torch.equal(shard.k, shard.expected(kv)[0])
        rel.wait("old", "pulled")
        with pytest.raises(LayoutMismatch, match="unknown"):
            plan(Layout(2, 1), ["a", "b"], (0, 2), None, 2, 0)
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "blocks", [list(range(10)), [9, 2, 7, 0, 5, 3, 8, 1, 6, 4]], ids=["one-run", "scattered"]
)
def test_pieces_written_into_their_heads_of_a_paged_cache(
    real_kv: tuple[KV, int], puller: KVPuller, blocks: list[int]
) -> None:
    """TP2 x PP2 prefill -> TP1 decode, each piece written straight into its KV heads of a KVCache (as the
    decode service does), at consecutive blocks (slice copies) and scattered ones (an indexed copy): the cache
    then reads back exactly the prefill's KV."""
    from engine.kv_cache import KVCache

    kv, num_tokens = real_kv
    pre = Prefill(Layout(2, 2), "tcp", kv, num_tokens, f"rs-heads-{blocks[0]}")
    try:
        cache = KVCache(2, 10, 4, 2, kv[0][0].shape[2])  # 40 slots >= the prompt's tokens

        def write_piece(layer: int, head_start: int, k: Tensor, v: Tensor) -> None:
            cache.write(layer, blocks, 0, k, v, heads=(head_start, head_start + k.shape[1]))

        puller.pull_pieces(
            pre.layout, pre.addresses, pre.tid, "raw", (0, 2), (0, 2), write_piece,
            token=pre.token or b"", num_layers=2, num_kv_heads=2,
        )  # fmt: skip
        for layer in range(2):
            k, v = cache.read(layer, blocks, num_tokens)
            assert torch.equal(k, kv[layer][0]) and torch.equal(v, kv[layer][1])
        pre.wait_pulled(4)
    finally:
        pre.stop()


@pytest.mark.parametrize("threads", [False, True], ids=["one_thread", "threads"])
def test_a_stalled_piece_times_out_typed_after_the_others_arrived_and_keeps_every_lease(
    real_kv: tuple[KV, int], threads: bool
) -> None:
    """TP2 prefill whose rank 1 has not made any layer ready: rank 0's piece arrives in full meanwhile (a piece
    still waiting holds up no other), then the pull fails with TransferTimeout, nothing ACKed, both leases
    kept; once rank 1 catches up the retried pull releases both."""
    kv, num_tokens = real_kv
    pre = Prefill(Layout(2, 1), "tcp", kv, num_tokens, f"rs-stall-{threads}")
    try:
        assert pre.servers[1].cancel(pre.tid)
        k1 = [(k[:, 1:2].contiguous(), v[:, 1:2].contiguous()) for k, v in kv]
        pre.servers[1].open_lease(
            pre.tid, 2, num_tokens, lambda la: k1[la], pre.releases, heads=(1, 2), token=pre.token
        )
        hl = handle_layout(pre.handle())
        with KVPuller(fingerprint=FP, timeout_s=0.5) as puller:

            def pull() -> Shard:
                shard = Shard(kv, (0, 2), (0, 2))
                tr = puller.pull_pieces(
                    hl.layout, hl.rank_addresses, pre.tid, "raw", (0, 2), (0, 2), shard,
                    token=pre.token or b"", num_layers=2, num_kv_heads=2, threads=threads,
                )  # fmt: skip
                assert tr.reader == ("threads" if threads else "one_thread")
                return shard

            stalled = Shard(kv, (0, 2), (0, 2))
            with pytest.raises(TransferTimeout):
                puller.pull_pieces(
                    hl.layout, hl.rank_addresses, pre.tid, "raw", (0, 2), (0, 2), stalled,
                    token=pre.token or b"", num_layers=2, num_kv_heads=2, threads=threads,
                )  # fmt: skip
            assert sorted(stalled.writes) == [
                (0, 0, 1),
                (1, 0, 1),
            ]  # rank 0's whole piece, nothing of rank 1's
            assert pre.open_leases() == 2 and pre.releases.calls[(pre.tid, "pulled")] == 0
            pre.servers[1].mark_ready(pre.tid, 2)
            pre.servers[1].finish(pre.tid, FIRST_TOKEN)
            shard = pull()
        assert torch.equal(shard.k, shard.expected(kv)[0]) and torch.equal(shard.v, shard.expected(kv)[1])
        pre.wait_pulled(2)
        assert pre.open_leases() == 0
    finally:
        pre.stop()
