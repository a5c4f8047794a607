"""Transports (tcp, shm, ucx): whole messages arrive intact and in order; failures are typed."""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from kv_transfer.errors import FrameForeign, FrameTooLarge, PeerClosed, TransferTimeout, UnknownTransport
from kv_transfer.transport import available_transports, transport_for
from kv_transfer.transport._sockutil import deadline_of, parse_host_port, send_parts
from kv_transfer.transport.base import Channel, Listener, Transport, wait_readable
from kv_transfer.transport.shm import ShmTransport
from kv_transfer.transport.ucx import ucx_available

MiB = 1 << 20


def _schemes() -> list[object]:
    ucx = pytest.param(
        "ucx", marks=pytest.mark.skipif(not ucx_available(), reason="ucxx does not import here (see ucx.py)")
    )
    return ["tcp", "shm", ucx]


def _transport(scheme: str) -> Transport:
    # a small shm ring so that multi-chunk and wrap-around paths run with modest messages
    return ShmTransport(ring_bytes=4 * MiB) if scheme == "shm" else transport_for(scheme)


def run_bg(fn: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    """Run fn in a thread; its result or exception lands in the returned dict."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # handed to the test thread, which asserts on it
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    return th, box


def wait_inside(th: threading.Thread, function: str, timeout: float = 10.0) -> None:
    """Block until thread th is executing a function named `function` (its Python stack has that frame)."""
    deadline = time.monotonic() + timeout
    while True:
        frame = sys._current_frames().get(th.ident or -1)
        while frame is not None and frame.f_code.co_name != function:
            frame = frame.f_back
        if frame is not None:
            return
        assert th.is_alive() and time.monotonic() < deadline, f"thread never entered {function}()"
        time.sleep(0.005)


def join(th: threading.Thread, box: dict[str, object], timeout: float = 30.0) -> object:
    th.join(timeout)
    assert not th.is_alive(), "background side hung"
    if "error" in box:
        err = box["error"]
        assert isinstance(err, BaseException)
        raise err
    return box.get("result")


@pytest.fixture(params=_schemes())
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Channel, Channel, Listener]]:
    """(client, server, listener), connected and past any handshake."""
    transport = _transport(request.param)
    lst = transport.listen("127.0.0.1", 0)

    def serve() -> Channel:
        ch = lst.accept(timeout=10)
        assert bytes(ch.recv(timeout=10)) == b"hello"
        return ch

    th, box = run_bg(serve)
    cli = transport.connect(lst.address, timeout=10)
    cli.send(b"hello")
    srv = join(th, box)
    assert isinstance(srv, Channel)
    yield cli, srv, lst
    cli.close()
    srv.close()
    lst.close()


def payload(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@pytest.mark.parametrize("size", [1 * MiB, 64 * MiB], ids=["1MiB", "64MiB"])
def test_round_trip_intact(pair: tuple[Channel, Channel, Listener], size: int) -> None:
    cli, srv, _ = pair
    data = payload(size, size)

    def echo() -> None:
        msg = srv.recv(timeout=30)
        srv.send(msg, timeout=30)  # the view stays valid until srv's next operation

    th, box = run_bg(echo)
    cli.send(data.data, timeout=30)
    back = cli.recv(timeout=30)
    join(th, box)
    assert len(back) == size and np.array_equal(np.frombuffer(back, dtype=np.uint8), data)


def test_many_messages_in_order_both_ways(pair: tuple[Channel, Channel, Listener]) -> None:
    cli, srv, _ = pair
    sizes = [0, 1, 100, (64 << 10) - 1, 64 << 10, (64 << 10) + 1, 3 * MiB, 9 * MiB, 7, 5 * MiB, 0, 12]

    def serve() -> None:
        for i, n in enumerate(sizes):
            got = srv.recv(timeout=30)
            assert len(got) == n and np.array_equal(np.frombuffer(got, dtype=np.uint8), payload(n, i)), i
            srv.send(struct.pack("<I", i) + bytes(got[:16]))

    th, box = run_bg(serve)
    for i, n in enumerate(sizes):
        cli.send(payload(n, i).tobytes())
    for i, n in enumerate(sizes):
        reply = bytes(cli.recv(timeout=30))
        assert struct.unpack("<I", reply[:4])[0] == i and reply[4:] == payload(n, i).tobytes()[:16]
    join(th, box)


def test_peer_close_is_peer_closed(pair: tuple[Channel, Channel, Listener]) -> None:
    cli, srv, _ = pair
    srv.close()
    with pytest.raises(PeerClosed):
        cli.recv(timeout=10)
    assert cli.closed
    with pytest.raises(PeerClosed):
        cli.send(b"x")


def test_peer_close_during_large_send(pair: tuple[Channel, Channel, Listener]) -> None:
    cli, srv, _ = pair
    th, box = run_bg(lambda: cli.send(payload(64 * MiB, 1).data, timeout=30))
    wait_inside(th, "send")
    srv.close()  # never reads the message
    th.join(30)
    assert not th.is_alive()
    # 64 MiB is far beyond what socket buffers (a few MiB on loopback) or the 4 MiB shm ring hold: the send
    # cannot complete without the peer reading, and must end in PeerClosed
    assert isinstance(box.get("error"), PeerClosed), box
    with pytest.raises(PeerClosed):
        cli.recv(timeout=10)


def test_recv_timeout_leaves_channel_usable(pair: tuple[Channel, Channel, Listener]) -> None:
    cli, srv, _ = pair
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout):
        cli.recv(timeout=0.2)
    assert 0.15 < time.monotonic() - t0 < 5
    assert not cli.poll()
    srv.send(b"late")
    deadline = time.monotonic() + 5
    while not cli.poll() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cli.poll()
    assert bytes(cli.recv(timeout=5)) == b"late"


def test_close_from_another_thread_wakes_recv(pair: tuple[Channel, Channel, Listener]) -> None:
    cli, _, _ = pair
    th, box = run_bg(lambda: cli.recv(timeout=None))
    wait_inside(th, "recv")
    cli.close()
    th.join(10)
    assert not th.is_alive() and isinstance(box.get("error"), PeerClosed)


@pytest.mark.parametrize("scheme", _schemes())
def test_garbage_and_early_disconnect_are_typed(scheme: str) -> None:
    transport = _transport(scheme)
    with transport.listen("127.0.0.1", 0) as lst:
        for garbage in (b"GET / HTTP/1.0\r\n\r\n" + bytes(64), b""):
            if scheme == "shm":
                raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                raw.connect("\0" + lst.address.removeprefix("shm://"))
            else:
                raw = socket.create_connection(parse_host_port(lst.address, scheme))
            raw.sendall(garbage)
            raw.close()
            ch = lst.accept(timeout=10)
            with pytest.raises((FrameForeign, PeerClosed)):
                ch.recv(timeout=10)
            ch.close()


def test_tcp_oversized_length_claim_is_refused_without_allocation() -> None:
    transport = transport_for("tcp")
    with transport.listen("127.0.0.1", 0) as lst:
        raw = socket.create_connection(parse_host_port(lst.address, "tcp"))
        raw.sendall(b"PDT1" + struct.pack("<Q", 1 << 60))
        ch = lst.accept(timeout=10)
        tracemalloc.start()
        try:
            with pytest.raises(FrameTooLarge):
                ch.recv(timeout=10)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < MiB
        raw.close()


def test_shm_leaves_no_descriptors_or_files_behind() -> None:
    def n_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    transport = ShmTransport(ring_bytes=2 * MiB)
    before_files = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    before = n_fds()
    for _ in range(3):
        with transport.listen() as lst:
            # mypy#15459: mypy cannot type a lambda whose default binds a loop variable
            th, box = run_bg(lambda lst=lst: bytes(lst.accept(timeout=10).recv(timeout=10)))  # type: ignore[misc]
            with transport.connect(lst.address, timeout=10) as cli:
                cli.send(payload(3 * MiB, 0).data)
            join(th, box)
    deadline = time.monotonic() + 5  # the accepted channels close when collected
    while n_fds() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert n_fds() <= before
    if os.path.isdir("/dev/shm"):
        assert set(os.listdir("/dev/shm")) <= before_files


def test_transport_for_and_addresses() -> None:
    assert transport_for("tcp://127.0.0.1:5").scheme == "tcp"
    assert transport_for("shm").scheme == "shm"
    assert available_transports()[0] == ("ucx" if ucx_available() else "tcp")
    assert "tcp" in available_transports() and "shm" in available_transports()
    with pytest.raises(UnknownTransport):
        transport_for("rdma://x:1")
    assert parse_host_port("tcp://[::1]:80", "tcp") == ("::1", 80)
    assert parse_host_port("ucx://10.0.0.1:7", "ucx") == ("10.0.0.1", 7)
    for bad in ("tcp://host", "tcp://:5", "tcp://h:0", "ucx://h:5"):
        with pytest.raises(UnknownTransport):
            parse_host_port(bad, "tcp")
    with pytest.raises((PeerClosed, TransferTimeout)):
        transport_for("tcp").connect("tcp://127.0.0.1:1", timeout=2)
    with pytest.raises(PeerClosed):
        transport_for("shm").connect("shm://pdkv-no-such-listener", timeout=2)


def test_ucx_reports_unavailable_clearly_when_ucxx_does_not_import(monkeypatch: pytest.MonkeyPatch) -> None:
    import kv_transfer.transport.ucx as ucx_mod
    from kv_transfer.errors import TransportUnavailable
    from kv_transfer.transport import default_scheme

    monkeypatch.setattr(ucx_mod, "_api", None)
    monkeypatch.setattr(ucx_mod, "_import_error", "ImportError: simulated")
    assert not ucx_mod.ucx_available()
    assert available_transports() == ["tcp", "shm"] and default_scheme(cuda=True) == "tcp"
    with pytest.raises(TransportUnavailable, match="import ucxx failed.*simulated"):
        transport_for("ucx://127.0.0.1:5")


def test_auto_picks_tcp_for_a_cpu_instance_and_ucx_for_a_cuda_one_where_it_imports() -> None:
    from kv_transfer.transport import default_scheme

    assert default_scheme(cuda=False) == "tcp"  # whether or not ucxx imports
    assert default_scheme(cuda=True) == ("ucx" if ucx_available() else "tcp")


def test_cuda_tls_ok_only_for_settings_that_moved_cuda_tensors() -> None:
    from kv_transfer.transport.ucx import CUDA_TLS, cuda_tls_ok

    assert cuda_tls_ok(CUDA_TLS) and cuda_tls_ok("rc,tcp,cuda_copy,cuda_ipc")
    for tls in ("tcp,posix,cuda_copy,cuda_ipc", "tcp,cuda_copy", "sm,cuda_copy,cuda_ipc", "all", "^posix"):
        assert not cuda_tls_ok(tls), tls


@pytest.mark.skipif(
    not (ucx_available() and torch.cuda.is_available()), reason="needs ucxx and a CUDA device"
)
def test_ucx_moves_cuda_tensors() -> None:
    """A CUDA tensor sent by another process (the hand-off's shape) arrives as CUDA bytes equal to it,
    and a host message after it on the same channel still arrives (default TLS: tcp,cuda_copy,cuda_ipc)."""
    import subprocess
    import sys
    from pathlib import Path

    nbytes = 4 << 20
    want = (torch.arange(nbytes, device="cuda", dtype=torch.int64) % 251).to(torch.uint8)
    peer = Path(__file__).with_name("ucx_cuda_peer.py")
    with transport_for("ucx").listen("127.0.0.1", 0) as lst:
        proc = subprocess.Popen([sys.executable, str(peer), lst.address, str(nbytes)])
        try:
            ch = lst.accept(timeout=60)
            got = ch.recv(timeout=60)
            assert isinstance(got, torch.Tensor) and got.is_cuda
            assert torch.equal(got, want)
            assert bytes(ch.recv(timeout=30)) == b"after"
            ch.send(b"done", timeout=30)
            assert proc.wait(timeout=30) == 0
            ch.close()
        finally:
            proc.kill()


@pytest.mark.parametrize("scheme", ["tcp", "shm"])
def test_one_thread_reads_several_channels_as_their_messages_arrive(scheme: str) -> None:
    """wait_readable says which of several channels has something; recv_ready returns a message once all of it
    arrived and None before (a message still arriving holds nothing up); large messages (shm: through the
    ring) arrive intact, in order per channel."""
    transport = _transport(scheme)
    with transport.listen("127.0.0.1", 0) as lst:
        servers: list[Channel] = []
        clients = []

        def serve() -> Channel:
            ch = lst.accept(timeout=10)
            assert bytes(ch.recv(timeout=10)) == b"hello"  # shm: the handshake happens on first use
            return ch

        for _ in range(2):
            th, box = run_bg(serve)
            cli = transport.connect(lst.address, timeout=10)
            cli.send(b"hello")
            srv = join(th, box)
            assert isinstance(srv, Channel)
            servers.append(srv)
            clients.append(cli)
        try:
            assert all(ch.readiness_fd() is not None for ch in clients)
            assert wait_readable(clients, 0.0) == []  # nothing sent yet
            assert all(ch.recv_ready() is None for ch in clients)
            msgs = {0: [payload(3 * MiB, 1), payload(10, 2)], 1: [payload(5 * MiB, 3)]}

            def send_all() -> None:
                for i in (1, 0):
                    for m in msgs[i]:
                        servers[i].send(m.data, timeout=30)

            th, box = run_bg(send_all)
            got: dict[int, list[bytes]] = {0: [], 1: []}
            deadline = time.monotonic() + 30
            while sum(len(v) for v in got.values()) < 3:
                assert time.monotonic() < deadline
                for i in wait_readable(clients, 10.0):
                    msg = clients[i].recv_ready()
                    if msg is not None:
                        got[i].append(bytes(msg))
            join(th, box)
            for i, sent in msgs.items():
                assert [np.frombuffer(g, dtype=np.uint8).tobytes() for g in got[i]] == [
                    m.tobytes() for m in sent
                ]
            # a blocking recv still works after recv_ready, and a closed channel is reported ready (its read raises)
            servers[0].send(b"after", timeout=10)
            assert bytes(clients[0].recv(timeout=10)) == b"after"
            servers[1].close()
            assert wait_readable(clients[1:], 10.0) == [0]
            with pytest.raises(PeerClosed):
                while clients[1].recv_ready() is None:
                    assert wait_readable(clients[1:], 10.0) == [0]
        finally:
            for ch in clients + servers:
                ch.close()


def test_tcp_recv_ready_keeps_a_part_and_recv_completes_it() -> None:
    """A message whose header and half its body arrived: recv_ready returns None (and keeps the part), the rest
    then completes it, through recv_ready or recv."""
    transport = transport_for("tcp")
    with transport.listen("127.0.0.1", 0) as lst:
        raw = socket.create_connection(parse_host_port(lst.address, "tcp"))
        ch = lst.accept(timeout=10)
        try:
            body = payload(100_000, 7).tobytes()
            for finish_with_recv in (False, True):
                raw.sendall(b"PDT1" + struct.pack("<Q", len(body)) + body[:40_000])
                assert wait_readable([ch], 10.0) == [0]
                part = ch.recv_ready()
                while part is None and wait_readable([ch], 0.2):  # what arrived so far is read, kept
                    part = ch.recv_ready()
                assert part is None
                raw.sendall(body[40_000:])
                msg: memoryview | None
                if finish_with_recv:
                    msg = ch.recv(timeout=10)
                else:
                    while (msg := ch.recv_ready()) is None:
                        assert wait_readable([ch], 10.0) == [0]
                assert msg is not None and bytes(msg) == body
        finally:
            ch.close()
            raw.close()


def test_send_parts_delivers_head_and_body_whole_through_partial_sends() -> None:
    """A body far larger than the socket's send buffer, on a non-blocking socket (so a sendmsg sends part of
    it and the rest waits for room): every byte arrives once, head first, in order."""
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
    a.setblocking(False)
    body = np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    got = bytearray()

    def read() -> None:
        while len(got) < 5 + len(body):
            chunk = b.recv(1 << 16)
            assert chunk
            got.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        send_parts(a, [b"head!", memoryview(body)], deadline_of(30.0))
        reader.join(30)
        assert not reader.is_alive()
        assert bytes(got) == b"head!" + body
    finally:
        a.close()
        b.close()
