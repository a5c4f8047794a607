"""LimitedTransport: messages arrive intact; sends are paced to the byte rate; close and timeouts behave."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kv_transfer.errors import PeerClosed, TransferTimeout
from kv_transfer.transport import TCPTransport
from kv_transfer.transport.limited import LimitedTransport, TokenBucket

MB = 1_000_000


def _pair(rate: float, burst: float = 0):
    lt = LimitedTransport(TCPTransport(), bytes_per_s=rate, burst_bytes=burst)
    lst = lt.listen("127.0.0.1", 0)
    assert lst.address.startswith("tcp://")  # a plain tcp peer can connect
    box: dict[str, object] = {}
    th = threading.Thread(target=lambda: box.setdefault("ch", lst.accept(timeout=10)), daemon=True)
    th.start()
    client = TCPTransport().connect(lst.address, timeout=10)  # the unpaced side
    th.join(10)
    return box["ch"], client, lst


def test_token_bucket_burst_then_rate() -> None:
    b = TokenBucket(bytes_per_s=1000, burst_bytes=500)
    assert b.delay(500) == 0.0  # the burst is free
    assert b.delay(1000) == pytest.approx(1.0, abs=0.05)  # then the debt is paid at the rate
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_messages_intact_and_paced() -> None:
    server, client, lst = _pair(rate=10 * MB)
    try:
        data = [
            np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8) for i, n in enumerate((1, MB, MB))
        ]
        t0 = time.perf_counter()
        for d in data:
            server.send(d)
            got = client.recv(timeout=10)
            assert bytes(got) == d.tobytes()
        elapsed = time.perf_counter() - t0
        # 2 MB at 10 MB/s: >= 0.2 s minus the first message's head start; the rate is a cap, not a guess
        assert 0.18 <= elapsed < 2.0, elapsed
        client.send(b"back")  # the other direction passes through the wrapper's recv
        assert bytes(server.recv(timeout=10)) == b"back"
        assert not server.poll()
    finally:
        server.close()
        client.close()
        lst.close()
    assert server.closed


def test_send_that_cannot_finish_in_time_times_out_and_closes() -> None:
    server, client, lst = _pair(rate=1 * MB)
    try:
        with pytest.raises(TransferTimeout):
            server.send(bytes(2 * MB), timeout=0.2)
        assert server.closed
    finally:
        client.close()
        lst.close()


def test_close_from_another_thread_cuts_a_paced_send_short() -> None:
    server, client, lst = _pair(rate=1 * MB)
    try:
        threading.Timer(0.2, server.close).start()
        t0 = time.perf_counter()
        with pytest.raises(PeerClosed):
            server.send(bytes(5 * MB))  # would take 5 s
        assert time.perf_counter() - t0 < 2.0
    finally:
        client.close()
        lst.close()
