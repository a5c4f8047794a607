"""A prefill-side stand-in in its own process: KVServers over every usable transport, driven by stdin.

Prints `address SCHEME ADDR` per server, then `ready`. Commands on stdin, one per line:
    open TID SEED        open a lease on every server for deterministic KV (see make_kv)
    stream TID DELAY     mark layers ready one by one, DELAY seconds apart, then finish(TID, 1000 + L)
    ready TID N          mark layers [0, N) ready on every server
Each release prints `released SCHEME TID REASON`, each message a server receives (a PULL, an ACK)
`request SCHEME`. The process exits when stdin closes.
"""

from __future__ import annotations

import sys
import threading
import time

import torch
from kvt_tap import Tap  # this script's folder is on sys.path

from kv_transfer.server import KVServer
from kv_transfer.transport import available_transports, transport_for

FP = 0xC0FFEE
L, T, H, D = 3, 40, 2, 8


def make_kv(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(T, H, D, generator=g), torch.randn(T, H, D, generator=g)) for _ in range(L)]


def main() -> None:
    out_lock = threading.Lock()

    def say(line: str) -> None:
        with out_lock:
            print(line, flush=True)

    servers = {
        s: KVServer(Tap(transport_for(s), lambda s=s: say(f"request {s}")), "127.0.0.1", fingerprint=FP)
        for s in available_transports()
    }
    for scheme, srv in servers.items():
        srv.start()
        say(f"address {scheme} {srv.address}")
    say("ready")

    def stream(tid: str, delay: float) -> None:
        for layer in range(L):
            time.sleep(delay)
            for srv in servers.values():
                srv.mark_ready(tid, layer + 1)
        for srv in servers.values():
            srv.finish(tid, 1000 + L)

    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "open":
            tid, kv = args[0], make_kv(int(args[1]))
            for scheme, srv in servers.items():
                token = srv.open_lease(
                    tid,
                    L,
                    T,
                    # mypy#15459: mypy cannot type a lambda whose default binds a loop variable
                    lambda layer, kv=kv: kv[layer],  # type: ignore[misc]
                    lambda t, r, s=scheme: say(f"released {s} {t} {r}"),  # type: ignore[misc]
                )
                say(f"token {scheme} {tid} {token.hex()}")
            say(f"opened {tid}")
        elif cmd == "stream":
            threading.Thread(target=stream, args=(args[0], float(args[1])), daemon=True).start()
        elif cmd == "ready":
            for srv in servers.values():
                srv.mark_ready(args[0], int(args[1]))
            say(f"marked {args[0]}")
    for srv in servers.values():
        srv.stop()


if __name__ == "__main__":
    main()
