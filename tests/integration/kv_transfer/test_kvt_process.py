"""KVServer in a separate process: streaming pulls over every transport, and the server's death."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kv_transfer.client import KVPuller, PullState
from kv_transfer.errors import PeerClosed, TransferTimeout

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from kvt_server_proc import FP, L, make_kv  # noqa: E402

ROOT = HERE.parents[2]


class ServerProcess:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "kvt_server_proc.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.addresses: dict[str, str] = {}
        while (line := self.expect(("address", "ready"))) != "ready":
            _, scheme, addr = line.split()
            self.addresses[scheme] = addr

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def expect(self, prefixes: tuple[str, ...], timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if line.startswith(prefixes):
                return line

    def open(self, tid: str, seed: int) -> dict[str, bytes]:
        """Open a lease for `tid` on every transport's server; returns each server's lease token."""
        self.send(f"open {tid} {seed}")
        tokens = {}
        while (line := self.expect(("token", f"opened {tid}"))).startswith("token"):
            _, scheme, got, token = line.split()
            assert got == tid
            tokens[scheme] = bytes.fromhex(token)
        return tokens

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()


@pytest.fixture(scope="module")
def server_proc() -> Iterator[ServerProcess]:
    sp = ServerProcess()
    yield sp
    if sp.proc.poll() is None:
        sp.proc.kill()
    sp.proc.wait(10)


def test_streaming_pulls_from_another_process(server_proc: ServerProcess) -> None:
    assert {"tcp", "shm"} <= set(server_proc.addresses)
    tokens = server_proc.open("p0", 7)
    expected = make_kv(7)
    with KVPuller(fingerprint=FP, timeout_s=20.0) as puller:
        got: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {s: {} for s in server_proc.addresses}
        # mypy#15459: mypy cannot type a lambda whose default binds a loop variable
        handles = {
            s: puller.start_pull(
                addr,
                "p0",
                "raw",
                lambda i, k, v, s=s: got[s].__setitem__(i, (k.clone(), v.clone())),  # type: ignore[misc]
                token=tokens[s],
            )
            for s, addr in server_proc.addresses.items()
        }
        requests = {server_proc.expect(("request",)) for _ in handles}  # every server has its PULL ...
        assert requests == {f"request {s}" for s in handles}
        assert all(h.poll() == PullState.WAITING for h in handles.values())  # ... before prefill began
        server_proc.send("stream p0 0.05")
        for scheme, h in handles.items():
            trailer = h.result(30)
            assert trailer.first_token_id == 1000 + L and trailer.num_layers == L, scheme
            for i in range(L):
                assert torch.equal(got[scheme][i][0], expected[i][0]) and torch.equal(
                    got[scheme][i][1], expected[i][1]
                )
    released = {server_proc.expect(("released",)) for _ in server_proc.addresses}
    assert released == {f"released {s} p0 pulled" for s in server_proc.addresses}


def test_server_process_death_is_peer_closed(server_proc: ServerProcess) -> None:
    tokens = server_proc.open("p1", 8)
    server_proc.send("ready p1 1")
    server_proc.expect(("marked p1",))
    with KVPuller(fingerprint=FP, timeout_s=20.0) as puller:
        handles = {
            s: puller.start_pull(addr, "p1", "raw", lambda *a: None, token=tokens[s])
            for s, addr in server_proc.addresses.items()
        }
        deadline = time.monotonic() + 20
        while any(h.layers_received < 1 for h in handles.values()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(h.poll() == PullState.TRANSFERRING for h in handles.values())
        server_proc.proc.kill()  # the prefill process dies mid-transfer
        for scheme, h in handles.items():
            with pytest.raises((PeerClosed, TransferTimeout)) as info:
                h.result(30)
            assert info.type is PeerClosed, scheme
