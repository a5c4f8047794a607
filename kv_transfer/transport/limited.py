"""A bandwidth-capped Transport: wraps another one and paces what each channel sends to `bytes_per_s`.

    LimitedTransport(TCPTransport(), bytes_per_s=125e6)   # a 1 Gbit/s link, per direction

For benchmarks and tests that need a slow link where shaping the kernel's (network namespaces + `tc`) is not
possible. Each channel has its own token bucket (a link is full duplex: each direction has the full rate):
sending n bytes takes n tokens; tokens refill at `bytes_per_s` up to `burst_bytes`; a send that finds the
bucket short sleeps until it is not, so the message leaves when a link of that rate would have finished
serialising it. Messages are not split (the inner transport's framing is kept), so a message arrives whole,
at most one message early compared with a real link of that rate. Addresses are the inner transport's, so a
peer may use the plain inner transport (e.g. the KV server paces its frames; the puller connects over tcp).
"""

from __future__ import annotations

import threading
import time

from kv_transfer.errors import TransferTimeout
from kv_transfer.frame import Buffer, as_bytes_view
from kv_transfer.transport.base import Channel, Listener, Transport

DEFAULT_BURST_BYTES = 256 << 10


class TokenBucket:
    """Thread-safe token bucket over time.monotonic(): `delay(n)` reserves n bytes and says how long the
    caller must wait before sending them (0 when the bucket holds enough)."""

    def __init__(self, bytes_per_s: float, burst_bytes: float = DEFAULT_BURST_BYTES) -> None:
        if not bytes_per_s > 0:
            raise ValueError(f"bytes_per_s must be > 0, got {bytes_per_s}")
        if burst_bytes < 0:
            raise ValueError(f"burst_bytes must be >= 0, got {burst_bytes}")
        self.rate, self.burst = float(bytes_per_s), float(burst_bytes)
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def delay(self, n: int) -> float:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n  # may go negative: the debt is paid by waiting
            return max(0.0, -self._tokens / self.rate)


class LimitedChannel(Channel):
    """`send` waits for the bucket, then sends through the inner channel; everything else passes through."""

    def __init__(self, inner: Channel, bucket: TokenBucket) -> None:
        self.inner, self.bucket = inner, bucket
        self._closing = threading.Event()

    def send(self, data: Buffer, timeout: float | None = None) -> None:
        n = len(as_bytes_view(data))
        wait = self.bucket.delay(n)
        if timeout is not None and wait > timeout:
            time.sleep(timeout)
            self.close()  # as with a real link: a send that could not finish in time leaves the channel unusable
            raise TransferTimeout(f"rate-limited send of {n} bytes needs {wait:.3f} s > timeout {timeout} s")
        if wait > 0:
            self._closing.wait(wait)  # close() from another thread cuts the wait short
        self.inner.send(data, None if timeout is None else max(timeout - wait, 1e-3))

    def recv(self, timeout: float | None = None) -> memoryview:
        return self.inner.recv(timeout)

    def poll(self) -> bool:
        return self.inner.poll()

    def readiness_fd(self) -> int | None:
        return self.inner.readiness_fd()

    def buffered(self) -> bool:
        return self.inner.buffered()

    def recv_ready(self) -> memoryview | None:
        return self.inner.recv_ready()

    def close(self) -> None:
        self._closing.set()
        self.inner.close()

    @property
    def closed(self) -> bool:
        return self.inner.closed


class LimitedListener(Listener):
    def __init__(self, inner: Listener, owner: LimitedTransport) -> None:
        self.inner, self.owner = inner, owner
        self.address = inner.address

    def accept(self, timeout: float | None = None) -> Channel:
        return self.owner.wrap(self.inner.accept(timeout))

    def close(self) -> None:
        self.inner.close()


class LimitedTransport(Transport):
    """`inner` with every channel's sends capped at `bytes_per_s` (one bucket per channel and direction)."""

    def __init__(
        self, inner: Transport, bytes_per_s: float, burst_bytes: float = DEFAULT_BURST_BYTES
    ) -> None:
        TokenBucket(bytes_per_s, burst_bytes)  # validate now, not at the first connection
        self.inner, self.bytes_per_s, self.burst_bytes = inner, float(bytes_per_s), float(burst_bytes)
        self.scheme = inner.scheme

    def wrap(self, ch: Channel) -> LimitedChannel:
        return LimitedChannel(ch, TokenBucket(self.bytes_per_s, self.burst_bytes))

    def listen(self, host: str, port: int = 0) -> Listener:
        return LimitedListener(self.inner.listen(host, port), self)

    def connect(self, address: str, timeout: float) -> Channel:
        return self.wrap(self.inner.connect(address, timeout))


__all__ = ["DEFAULT_BURST_BYTES", "LimitedChannel", "LimitedListener", "LimitedTransport", "TokenBucket"]
