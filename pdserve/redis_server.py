"""Start and stop a private `redis-server` on a free loopback port (local mode and tests)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable

import redis

from pdserve.tls import TLSFiles, redis_kwargs


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throwaway redis-server: no persistence, bound to loopback, killed on stop().

    With `tls` naming a CA (mutual TLS) it listens with TLS only and requires every client to present a
    certificate signed by that CA (`--tls-auth-clients yes`): its URL is then rediss://."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        tls: TLSFiles | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError(
                "redis-server not found on PATH; run `make setup` or install the redis-server package"
            )
        self.host = host
        self.port = port or free_port(host)
        self.tls = tls if tls is not None and tls.mutual else None
        self._dir = tempfile.TemporaryDirectory(prefix="pdserve-redis-")
        if self.tls is None:
            args = [exe, "--bind", host, "--port", str(self.port)]
        else:  # TLS only: no plaintext port
            args = [exe, "--bind", host, "--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", self.tls.cert, "--tls-key-file", self.tls.key]
            args += ["--tls-ca-cert-file", self.tls.ca, "--tls-auth-clients", "yes"]
        args += ["--save", "", "--appendonly", "no"]
        args += ["--dir", self._dir.name, "--protected-mode", "no", "--loglevel", "warning"]
        self._args = args
        self._preexec_fn = preexec_fn  # e.g. the launcher's parent-death signal
        self._proc = self._spawn()
        self._wait_ready()

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen(
            self._args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=self._preexec_fn
        )

    def alive(self) -> bool:
        return self._proc.poll() is None

    def restart(self) -> None:
        """Start it again, on the same port, empty (kill -9 first if it still runs): a Redis that lost
        everything, as after a crash. Instances re-register at their next heartbeat."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._proc = self._spawn()
        self._wait_ready()

    def kill(self) -> None:
        """SIGKILL it (a crash, for chaos tests) and wait until it is gone, so that `alive()` is False at once
        after this returns (a signal only sent leaves a window in which the process still runs)."""
        self._proc.kill()
        self._proc.wait()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/0"

    def _wait_ready(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(
            self.url, socket_timeout=0.5, **redis_kwargs(self.url, self.tls or TLSFiles())
        )
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise RuntimeError(f"redis-server exited at start: {err.strip()}")
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
