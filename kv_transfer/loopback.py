"""Quick loopback check of the data plane on this host; prints one JSON object.

    python -m kv_transfer.loopback [--schemes ucx,tcp,shm] [--mib 64] [--iters 5]

Per transport: one-way message throughput (GB/s = 1e9 bytes/s) from this process to a child process
that acknowledges each message with a few bytes, and a KV pull (raw codec) of a synthetic cache from a
KVServer in the child. Numbers on a shared 2-core host swing with whatever else is running.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from typing import Any

import numpy as np
import torch

from kv_transfer.transport import available_transports, transport_for

FP = 0xB0B
KV_SHAPE = (8, 4096, 8, 128)  # L, T, Hkv, D -> 32 MiB of fp32 K+V per layer, 256 MiB in all


def _child(scheme: str, conn: Any) -> None:
    from kv_transfer.server import KVServer

    lst = transport_for(scheme).listen("127.0.0.1", 0)
    layers, t, h, d = KV_SHAPE
    kv = (torch.randn(t, h, d), torch.randn(t, h, d))
    srv = KVServer(transport_for(scheme), "127.0.0.1", fingerprint=FP)
    srv.start()
    conn.send((lst.address, srv.address))
    ch = lst.accept(timeout=30)
    while True:
        msg = ch.recv(timeout=60)
        if len(msg) == 4 and bytes(msg) == b"quit":
            break
        if len(msg) == 4 and bytes(msg) == b"kv??":
            tid = f"kv{time.monotonic_ns()}"
            token = srv.open_lease(tid, layers, t, lambda _layer: kv, lambda *_: None)
            srv.finish(tid, 0)
            ch.send(token + tid.encode())
            continue
        ch.send(b"ok")
    ch.close()
    lst.close()
    srv.stop()


def measure(scheme: str, mib: int, iters: int) -> dict[str, float]:
    from kv_transfer.client import KVPuller
    from kv_transfer.server import LEASE_TOKEN_BYTES

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(scheme, child), daemon=True)
    proc.start()
    msg_addr, kv_addr = parent.recv()
    ch = transport_for(scheme).connect(msg_addr, timeout=30)
    out: dict[str, float] = {}
    for size in (1 << 20, mib << 20):
        data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
        ch.send(data.data)
        ch.recv(timeout=60)  # warm-up: buffers allocated and touched on both sides
        t0 = time.perf_counter()
        for _ in range(iters):
            ch.send(data.data)
            ch.recv(timeout=60)
        out[f"msg_{size >> 20}MiB_GBps"] = round(size * iters / (time.perf_counter() - t0) / 1e9, 3)
    with KVPuller(fingerprint=FP, timeout_s=60) as puller:
        best = 0.0
        for _ in range(3):
            ch.send(b"kv??")
            reply = bytes(ch.recv(timeout=60))  # lease token (LEASE_TOKEN_BYTES) + transfer id
            token, tid = reply[:LEASE_TOKEN_BYTES], reply[LEASE_TOKEN_BYTES:].decode()
            trailer = puller.pull(kv_addr, tid, "raw", lambda _layer, k, v: None, token=token)
            best = max(best, trailer.stats.raw_bytes / trailer.stats.transfer_s / 1e9)
        out["pull_raw_GBps"] = round(best, 3)
    ch.send(b"quit")
    ch.close()
    proc.join(30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default=",".join(available_transports()))
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    result = {s: measure(s, args.mib, args.iters) for s in args.schemes.split(",") if s}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
