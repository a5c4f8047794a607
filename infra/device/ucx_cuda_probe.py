"""Which UCX set-ups move a CUDA tensor through kv_transfer's UCX channel on this GPU host.

    python infra/device/ucx_cuda_probe.py [--json PATH]

Each variant runs in its own subprocess (a UCX crash is a SIGSEGV that would take the prober down), all
side by side, 40 s limit each: a sender puts a 4 MiB CUDA tensor (a known byte pattern) and then b"after"
on one channel; the receiver checks both. Variants cross:
  * same process (two threads, two workers of one UCX context) or two processes (the real hand-off);
  * UCX_TLS: "default" = tcp,posix,cuda_copy,cuda_ipc (the channel's default before this probe), "no_ipc" =
    tcp,posix,cuda_copy, and in round 2 tcp,cuda_copy and tcp,cuda_copy,cuda_ipc (the default since);
  * the channel's CUDA set-up (ucx.py) as shipped, or without making the device's context current in
    the transfer thread ("noctx"), or with UCX's memory-type cache back on ("memcache");
  * waiting: "blocking" (the channel's own: progress, arm, select on the worker's epoll fd) or "poll"
    (progress in a loop, never arming; ucx#3180 reports CUDA transfers crashing with blocking waits).
Prints one JSON object (variant -> ok | mismatch | crashed (signal) | timeout, with the output's tail and
whatever UCX printed). The children bypass the channel's refusal of unsafe TLS settings for CUDA tensors
(ucx.cuda_tls_ok), so that UCX itself is what is probed.

Seen on an H200 host (2026-12-04): every round-1 variant and all of round 2 but one crashed (SIGSEGV in
the sender's rendezvous pack) or failed (EIO from UCX's TCP send); xproc with tcp,cuda_copy,cuda_ipc
moved the tensor intact.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

NBYTES = 4 << 20
NO_IPC = "tcp,posix,cuda_copy"
OLD_DEFAULT = "tcp,posix,cuda_copy,cuda_ipc"


def _pattern():
    import torch

    return (torch.arange(NBYTES, device="cuda", dtype=torch.int64) % 251).to(torch.uint8)


def _apply_wait(mode: str) -> None:
    """mode "poll": replace the channel's blocking wait by a progress loop (never arm, never sleep);
    "noctx": the channel's CUDA context set-up does nothing but pick the device index."""
    from kv_transfer.errors import PeerClosed
    from kv_transfer.transport import ucx

    ucx.cuda_tls_ok = lambda tls: True  # probe UCX itself, not the channel's guard
    if mode == "noctx":

        def no_ctx(self, device=None):  # noqa: ANN001, ANN202 - mirrors UCXChannel._cuda_ctx
            return 0

        ucx.UCXChannel._cuda_ctx = no_ctx  # type: ignore[method-assign]  # the probe swaps it on purpose
    if mode != "poll":
        return

    def poll_wait(self, req, deadline):  # noqa: ANN001, ANN202 - mirrors UCXChannel._wait
        while not req.completed:
            self._worker.progress()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("poll wait timed out")
        try:
            req.check_error()
        except ucx._api.UCXError as e:
            raise PeerClosed(f"UCX transfer failed: {e}") from None

    ucx.UCXChannel._wait = poll_wait  # type: ignore[method-assign]  # the probe swaps it on purpose


def _receiver(address_q, result_q, mode: str) -> None:
    import torch

    from kv_transfer.transport import transport_for

    _apply_wait(mode)
    torch.cuda.init()
    want = _pattern()
    with transport_for("ucx").listen("127.0.0.1", 0) as lst:
        address_q.put(lst.address)
        ch = lst.accept(timeout=20)
        got = ch.recv(timeout=20)
        ok = isinstance(got, torch.Tensor) and got.is_cuda and torch.equal(got, want)
        after = bytes(ch.recv(timeout=20))
        result_q.put("ok" if ok and after == b"after" else f"mismatch (cuda={getattr(got, 'is_cuda', None)})")
        ch.close()


def _sender(address: str, mode: str) -> None:
    from kv_transfer.transport import transport_for

    _apply_wait(mode)
    ch = transport_for("ucx").connect(address, timeout=20)
    ch.send(_pattern(), timeout=20)
    ch.send(b"after", timeout=20)
    time.sleep(0.5)  # let the receiver finish before the endpoint goes
    ch.close()


def variant(where: str, mode: str) -> None:
    """Run one variant in this (child) process; exit status 0 = ok."""
    import threading

    import torch

    torch.cuda.init()
    if where == "inproc":
        import queue

        aq: queue.Queue = queue.Queue()
        rq: queue.Queue = queue.Queue()
        th = threading.Thread(target=_receiver, args=(aq, rq, mode), daemon=True)
        th.start()
        _sender(aq.get(timeout=30), mode)
        th.join(30)
        res = rq.get(timeout=5)
    else:
        ctx = mp.get_context("spawn")
        maq, mrq = ctx.Queue(), ctx.Queue()
        p = ctx.Process(target=_receiver, args=(maq, mrq, mode))
        p.start()
        _sender(maq.get(timeout=60), mode)
        res = mrq.get(timeout=30)
        p.join(10)
    print(res)
    sys.exit(0 if res == "ok" else 1)


VARIANTS = [
    # (where, tls, mode, extra env)
    ("xproc", "default", "blocking", {}),
    ("xproc", "no_ipc", "blocking", {}),
    ("xproc", "default", "noctx", {}),
    ("xproc", "default", "memcache", {"UCX_MEMTYPE_CACHE": "y"}),
    ("xproc", "default", "poll", {}),
    ("inproc", "default", "blocking", {}),
    ("inproc", "no_ipc", "blocking", {}),
    ("inproc", "default", "noctx", {}),
    ("inproc", "default", "memcache", {"UCX_MEMTYPE_CACHE": "y"}),
]
# Round 2 (--round 2), after round 1 crashed everywhere in the sender's rendezvous fragment pack
# (ucp_proto_rndv_handle_rtr -> uct_mm_ep_am_bcopy -> SIGSEGV): other protocols and transports.
VARIANTS_2 = [
    ("xproc", "default", "proto_v1", {"UCX_PROTO_ENABLE": "n"}),
    ("xproc", "default", "rndv_get", {"UCX_RNDV_SCHEME": "get_zcopy"}),
    ("xproc", "default", "rndv_put", {"UCX_RNDV_SCHEME": "put_zcopy"}),
    ("xproc", "default", "eager", {"UCX_RNDV_THRESH": "inf"}),
    ("xproc", "tcp_cuda", "blocking", {"UCX_TLS": "tcp,cuda_copy"}),
    ("xproc", "tcp_cuda", "proto_v1", {"UCX_TLS": "tcp,cuda_copy", "UCX_PROTO_ENABLE": "n"}),
    ("xproc", "tcp_cuda_ipc", "blocking", {"UCX_TLS": "tcp,cuda_copy,cuda_ipc"}),
    ("inproc", "default", "proto_v1", {"UCX_PROTO_ENABLE": "n"}),
]


def _ucx_info() -> dict[str, object]:
    """What UCX sees on this host: CUDA support and the transports of a context with the default TLS."""
    import torch

    from kv_transfer.transport import ucx

    torch.cuda.init()
    torch.empty(1, device="cuda")
    api = ucx._ucx()
    ctx = ucx._context(ucx.default_tls())
    info = str(ctx.info)
    return {
        "cuda_support": bool(ctx.cuda_support),
        "tls": ucx.default_tls(),
        "info_lines": [ln for ln in info.splitlines() if "cuda" in ln.lower() or "component" in ln][:30],
        "ucx_version": getattr(api, "get_ucx_version", lambda: None)(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # where:tls:mode, in the child
    ap.add_argument("--info", action="store_true", help=argparse.SUPPRESS)  # _ucx_info(), in a child
    ap.add_argument("--round", type=int, default=1, choices=(1, 2), help="which set of variants")
    a = ap.parse_args()
    if a.info:
        print(json.dumps(_ucx_info(), default=str))
        return 0
    if a.variant:
        where, _tls, mode = a.variant.split(":")
        variant(where, mode)
        return 0
    procs = {}
    t0 = time.monotonic()
    for where, tls, mode, extra in VARIANTS if a.round == 1 else VARIANTS_2:
        env = dict(os.environ, UCX_HANDLE_ERRORS="bt")
        env["UCX_TLS"] = NO_IPC if tls == "no_ipc" else OLD_DEFAULT
        env.update(extra)
        name = f"{where}:{tls}:{mode}"
        cmd = [sys.executable, __file__, "--variant", name]
        procs[name] = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    info = subprocess.run([sys.executable, __file__, "--info"], capture_output=True, text=True, timeout=60)
    out: dict[str, dict[str, object]] = {}
    for name, p in procs.items():
        try:
            text, _ = p.communicate(timeout=max(1.0, 40 - (time.monotonic() - t0)))
            rc = p.returncode
            status = "ok" if rc == 0 else (f"crashed (signal {-rc})" if rc < 0 else "failed")
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
            status = "timeout"
        lines = text.strip().splitlines()
        ucx_lines = [ln for ln in lines if "UCX" in ln or "ucs" in ln or "uct" in ln or "ucp" in ln][:25]
        out[name] = {"status": status, "tail": lines[-8:], "ucx": ucx_lines}
        print(f"{name:28s} {status}", flush=True)
    result = {
        "probe": "ucx_cuda",
        "nbytes": NBYTES,
        "ucx_info": info.stdout.strip().splitlines()[-1:] or info.stderr.strip().splitlines()[-5:],
        "variants": out,
    }
    text = json.dumps(result, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
