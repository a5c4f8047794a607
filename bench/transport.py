"""`python -m bench.transport`: KV transports vs a raw socket, hand-off TTFT, hand-off over shaped links.

    python -m bench.transport [--quick] [--json PATH] [--link auto|netns|limiter] [--reshard]

Part 1, message throughput. Per transport (every one `available_transports()` lists: ucx, tcp, shm) a server
process listens (`transport_for(scheme)`) and, on request, sends N messages of one size from a reused
buffer; this process connects, receives them (the channel's reused receive buffer) and times request ->
last byte. The baseline is a plain loopback TCP socket in its own process: `sendall` of the same buffer,
`recv_into` a preallocated one, no framing. Sizes: 64 MiB, and one layer of the shipped model's KV at its
full context in fp32 (`layer_bytes`). Every transport and the socket are measured in each round, rounds
interleaved, medians reported; `ratio_vs_socket` = transport GB/s / socket GB/s at 64 MiB (same run).

Part 2, hand-off (method: `ModelRunner` + `KVServer` in a prefill process, `KVPuller` writing into a
`KVCache` in a decode process, pinned to different cores, as the launcher pins instances -- cheaper and
better controlled than a whole cluster, where gateway and gRPC hops would add their own noise). Per
trial, one held-out prompt (`prompt_tokens`) is prefilled with `on_layer` -> `mark_ready`, then `finish`.
  * streaming: the decode side starts the pull when the prefill schedules (before compute), so layers
    move while later layers compute;
  * after: the pull starts once prefill has finished.
TTFT added = decode-ready (every layer written into the decode cache) - end of prefill compute; reported
relative to the prefill compute time (`ttft_added_frac_*`, medians over trials, modes interleaved).
  * unshaped: loopback, the default transport, codec raw;
  * shaped: links of 1, 2.5, 5 and 10 Gbit/s -- the prefill and decode processes each in its own network
    namespace, joined by a veth pair whose ends are shaped by `tc` tbf (re-shaped between rates, same
    processes), or, where that cannot be set up, `kv_transfer.transport.limited.LimitedTransport` (a token
    bucket on the prefill side's sends over tcp); `link` and `shaping` say which. Per rate, raw and
    cachegen pulled after prefill (the whole hand-off on the critical path); "cachegen" is what a decode
    instance pulls when the cluster runs `--codec cachegen` (it holds the model, so `cachegen_l0`: layer 0
    as the token ids; `cachegen_codec` names it), plain cachegen (layer 0 coded too) is measured beside it:
    `handoff.shaped` = [{gbit_s, raw_s, cachegen_s, speedup = raw_s / cachegen_s, cachegen_plain_s,
    speedup_plain, ...}], medians; `handoff.break_even_gbit_s` (`_plain`) = where speedup crosses 1 (`break_even_gbit`: log-log interpolation between the two rates around the crossing;
    `break_even_method` says how it was found, or which side of the range it lies on). Per rate cachegen is
    served and pulled as the services do (`KVServer`/`KVPuller` defaults: pipelined only with more than one
    codec thread, `pipeline.pipelined_by_default`; `pipelined_by_default` in the JSON) and also the other way
    (a second server and puller in the same processes): `cachegen_sequential_s` (read, encode, send, receive,
    decode one layer at a time), `cachegen_pipelined_s`, `pipeline_speedup` = sequential / pipelined.
  * limited_1gbit: the 1 Gbit/s rate of that sweep in more detail: codecs raw, cachegen and cachegen_l0
    (layer 0 as the token ids, what a decode instance holding the model pulls when told cachegen; both
    processes hold the model, as the services do), after prefill and streaming: `cachegen_speedup_vs_raw`
    = hand-off time (pull start -> decode-ready) with raw / with cachegen, `cachegen_l0_speedup_vs_raw`
    likewise.
All clocks here are wall clocks (time.monotonic, shared by the processes).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import multiprocessing as mp
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import emit

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "pdserve-tiny-py"
MiB = 1 << 20
LINK_BPS = 1e9 / 8  # 1 Gbit/s in bytes/s
_REQ = struct.Struct("<QQ")  # message size, count; size 0 = quit
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Settings:
    rounds: int
    msgs_64mib: int
    layer_msgs: int
    prompt_tokens: int
    trials: int  # per mode (unshaped) and per codec (limited)

    @staticmethod
    def make(quick: bool) -> Settings:
        if quick:
            return Settings(rounds=2, msgs_64mib=2, layer_msgs=16, prompt_tokens=1536, trials=4)
        return Settings(rounds=5, msgs_64mib=4, layer_msgs=64, prompt_tokens=1536, trials=9)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _pin(core_index: int) -> None:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2:
        os.sched_setaffinity(0, {cores[core_index % len(cores)]})


# ---- part 1: message throughput --------------------------------------------------------------------------


def _socket_server(conn: Any) -> None:
    lst = socket.create_server(("127.0.0.1", 0))
    conn.send(lst.getsockname()[1])
    s, _ = lst.accept()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(64 * MiB)
    req = bytearray(_REQ.size)
    while True:
        view = memoryview(req)
        while view:
            n = s.recv_into(view)
            if not n:
                return
            view = view[n:]
        size, count = _REQ.unpack(req)
        if size == 0:
            break
        mv = memoryview(buf)[:size]
        for _ in range(count):
            s.sendall(mv)
    s.close()
    lst.close()


def _transport_server(scheme: str, conn: Any) -> None:
    import numpy as np

    from kv_transfer.transport import transport_for

    lst = transport_for(scheme).listen("127.0.0.1", 0)
    conn.send(lst.address)
    ch = lst.accept(timeout=60)
    buf = np.ones(64 * MiB, dtype=np.uint8)
    while True:
        size, count = _REQ.unpack(bytes(ch.recv(timeout=600)))
        if size == 0:
            break
        for _ in range(count):
            ch.send(buf[:size].data, timeout=60)
    ch.close()
    lst.close()


class _SocketClient:
    def __init__(self, port: int) -> None:
        self.s = socket.create_connection(("127.0.0.1", port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(64 * MiB)

    def measure(self, size: int, count: int) -> float:
        t0 = time.perf_counter()
        self.s.sendall(_REQ.pack(size, count))
        for _ in range(count):
            view = memoryview(self.buf)[:size]
            while view:
                n = self.s.recv_into(view)
                if not n:
                    raise ConnectionError("socket server closed")
                view = view[n:]
        return size * count / (time.perf_counter() - t0)

    def close(self) -> None:
        self.s.sendall(_REQ.pack(0, 0))
        self.s.close()


class _ChannelClient:
    def __init__(self, scheme: str, address: str) -> None:
        from kv_transfer.transport import transport_for

        self.ch = transport_for(scheme).connect(address, timeout=60)

    def measure(self, size: int, count: int) -> float:
        t0 = time.perf_counter()
        self.ch.send(_REQ.pack(size, count))
        for _ in range(count):
            got = self.ch.recv(timeout=120)
            if len(got) != size:
                raise RuntimeError(f"got {len(got)} bytes, expected {size}")
        return size * count / (time.perf_counter() - t0)

    def close(self) -> None:
        self.ch.send(_REQ.pack(0, 0))
        self.ch.close()


def layer_bytes(model_dir: str) -> int:
    """One layer's K+V at the model's full context in fp32 (the serving dtype on this CPU)."""
    try:
        from engine.config import ModelConfig

        c = ModelConfig.from_hf_dir(model_dir)
        return 2 * c.max_position_embeddings * c.num_kv_heads * c.head_dim * 4
    except Exception:  # no model: 1 MiB (the shipped model's figure)
        return MiB


def measure_transports(schemes: list[str], s: Settings, lbytes: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    procs, clients = [], {}
    try:
        for name in ["socket", *schemes]:
            parent, child = ctx.Pipe()
            target, args = (
                (_socket_server, (child,)) if name == "socket" else (_transport_server, (name, child))
            )
            p = ctx.Process(target=target, args=args, daemon=True)
            p.start()
            procs.append(p)
            if not parent.poll(60):
                raise RuntimeError(f"{name} server did not start")
            addr = parent.recv()
            clients[name] = _SocketClient(addr) if name == "socket" else _ChannelClient(name, addr)
        sizes = {"64mib": (64 * MiB, s.msgs_64mib), "layer": (lbytes, s.layer_msgs)}
        samples: dict[tuple[str, str], list[float]] = {}
        for r in range(s.rounds + 1):  # round 0 warms up (buffers allocated and touched) and is dropped
            for name, cl in clients.items():
                for key, (size, count) in sizes.items():
                    bps = cl.measure(size, count)
                    if r:
                        samples.setdefault((name, key), []).append(bps)
            _log(f"  transport round {r}/{s.rounds} done")
    finally:
        for cl in clients.values():
            with contextlib.suppress(Exception):
                cl.close()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    med = {k: statistics.median(v) / 1e9 for k, v in samples.items()}
    base64, base_layer = med[("socket", "64mib")], med[("socket", "layer")]
    out: dict[str, Any] = {
        name: {
            "gb_s_64mib": med[(name, "64mib")],
            "ratio_vs_socket": med[(name, "64mib")] / base64,
            "gb_s_layer": med[(name, "layer")],
            "ratio_vs_socket_layer": med[(name, "layer")] / base_layer,
        }
        for name in schemes
    }
    baseline = {"gb_s_64mib": base64, "gb_s_layer": base_layer}
    spread = {f"{n}/{k}": [round(x / 1e9, 3) for x in v] for (n, k), v in samples.items()}
    return {"transports": out, "socket_baseline": baseline, "samples_gb_s": spread}


# ---- part 2: hand-off --------------------------------------------------------------------------------------


def _enter_netns(name: str | None) -> None:
    if not name:
        return
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


class _RatedTransport:
    """The prefill side's LimitedTransport whose rate `set_rate` changes, for its open channels too."""

    def __init__(self, inner: Any, bytes_per_s: float) -> None:
        from kv_transfer.transport.limited import LimitedTransport

        self.limited = LimitedTransport(inner, bytes_per_s)
        self.channels: list[Any] = []
        wrap = self.limited.wrap

        def wrap_and_keep(ch: Any) -> Any:
            out = wrap(ch)
            self.channels.append(out)
            return out

        self.limited.wrap = wrap_and_keep  # type: ignore[method-assign]

    def set_rate(self, bytes_per_s: float) -> None:
        self.limited.bytes_per_s = bytes_per_s
        for ch in self.channels:
            ch.bucket.rate = bytes_per_s


def _prefill_proc(
    model_dir: str,
    scheme: str,
    limit_bps: float | None,
    netns: str | None,
    max_tokens: int,
    conn: Any,
    host: str = "127.0.0.1",
) -> None:
    """The prefill side: ModelRunner + KVServer; runs one trial per ("run", mode, tid, prompt); ("shape",
    gbit) sets its rate limiter (if it has one) to that rate."""
    _enter_netns(netns)
    _pin(0)
    import torch

    torch.set_num_threads(1)
    from engine.params import SamplingParams
    from engine.runner import ModelRunner
    from engine.sequence import Sequence
    from kv_transfer.codec import CodecContext
    from kv_transfer.server import KVServer
    from kv_transfer.transport import transport_for
    from prefill_service.engine import read_host_kv  # the lease's read_layer, as prefill_service's

    runner = ModelRunner(model_dir, num_kv_blocks=-(-max_tokens // 16) + 1, block_size=16)
    codecs = CodecContext.from_model_dir(
        model_dir, runner.model, runner.fingerprint
    )  # as prefill_service does
    cache, num_layers = runner.kv_cache, runner.config.num_layers
    blocks = list(range(runner.kv_cache.num_blocks))
    transport = transport_for(scheme)
    rated = _RatedTransport(transport, limit_bps) if limit_bps else None
    if rated is not None:
        transport = rated.limited
    # "_alt" trials go to the server that does not do what the services do (pipelined or not: ALT)
    servers = {
        pipelined: KVServer(
            transport,
            host,
            fingerprint=runner.fingerprint,
            lease_ttl_s=120,
            codecs=codecs,
            pipelined=pipelined,
        )
        for pipelined in (True, False)
    }
    for srv in servers.values():
        srv.start()
    conn.send(({p: srv.address for p, srv in servers.items()}, runner.fingerprint))
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "quit":
                break
            if msg[0] == "shape":
                if rated is not None:
                    rated.set_rate(msg[1] * 1e9 / 8)
                conn.send(("shaped",))
                continue
            _, mode, tid, prompt = msg
            server = servers[_pipelined(mode)]
            mode = mode.removesuffix(ALT)
            n = len(prompt)
            released = threading.Event()
            seq = Sequence(tid, list(prompt), SamplingParams(max_tokens=1), blocks=blocks)
            lease_token = server.open_lease(
                tid,
                num_layers,
                n,
                # mypy#15459: mypy cannot type a lambda whose default binds a loop variable
                read_layer=lambda layer, n=n: read_host_kv(cache, blocks, n, layer),  # type: ignore[misc]
                on_release=lambda *_a, ev=released: ev.set(),
                token_ids=prompt,
            )
            if mode == "streaming":
                conn.send(("pull", tid, lease_token))  # the decode side learns of it when it is scheduled
            t0 = time.monotonic()
            # mypy#15459: mypy cannot type a lambda whose default binds a loop variable
            token = runner.prefill(
                [seq],
                on_layer=lambda layer, tid=tid, srv=server: srv.mark_ready(tid, layer + 1),  # type: ignore[misc]
            )[0]
            t1 = time.monotonic()
            assert token is not None  # the whole prompt was prefilled
            server.finish(tid, int(token))
            if mode == "after":
                conn.send(("pull", tid, lease_token))
            if not released.wait(120):  # the blocks are reused by the next trial: wait for the pull's ACK
                raise RuntimeError(f"lease {tid} was not pulled")
            conn.send(("times", t0, t1))
    finally:
        for srv in servers.values():
            srv.stop()


def _decode_proc(
    model_dir: str, netns: str | None, plan: list[tuple[str, str, list[int]]], peer: Any, out: Any
) -> None:
    """The decode side: pulls each trial's KV into its own KV cache (a ModelRunner's: it holds the model, as a
    decode instance does, so cachegen_l0 can recompute layer 0); reports the timings to `out`. A plan entry
    ("shape", "<gbit>", []) re-shapes the link (the prefill side's limiter, then the parent's tc) first."""
    _enter_netns(netns)
    _pin(1)
    import torch

    torch.set_num_threads(1)
    from engine.runner import ModelRunner
    from kv_transfer.client import KVPuller
    from kv_transfer.codec import CodecContext

    try:
        max_tokens = max(len(p) for m, _, p in plan if m != "shape")
        runner = ModelRunner(model_dir, num_kv_blocks=-(-max_tokens // 16) + 1, block_size=16)
        codecs = CodecContext.from_model_dir(
            model_dir, runner.model, runner.fingerprint
        )  # as decode_service does
        cache = runner.kv_cache
        blocks = list(range(cache.num_blocks))
        addresses, fingerprint = peer.recv()
        results = []
        gbit: float | None = None  # the link's rate while shaped
        pullers = {
            p: KVPuller(fingerprint=fingerprint, timeout_s=120, codecs=codecs, pipelined=p)
            for p in (True, False)
        }
        with pullers[True], pullers[False]:
            for i, (mode, codec, prompt) in enumerate(plan):
                if mode == "shape":
                    gbit = float(codec)
                    peer.send(("shape", gbit))
                    assert peer.recv() == ("shaped",)
                    out.send(("shape", gbit))
                    assert out.recv() == "shaped"
                    continue
                tid = f"bench-{i}-{uuid.uuid4().hex[:8]}"
                peer.send(("run", mode, tid, prompt))
                tag, got, lease_token = peer.recv()
                assert tag == "pull" and got == tid, (tag, got)
                t_pull, cpu0 = time.monotonic(), time.process_time()
                pipelined = _pipelined(mode)
                trailer = pullers[pipelined].pull(
                    addresses[pipelined],
                    tid,
                    codec,
                    lambda layer, k, v: cache.write(layer, blocks, 0, k, v),
                    token=lease_token,
                    # decoded into the cache where the codec can, as decode_service pulls
                    dest=lambda layer, shape: cache.run_views(layer, blocks, 0, shape[0]),
                )
                t_ready, cpu1 = time.monotonic(), time.process_time()
                tag, t0, t1 = peer.recv()
                st = trailer.stats
                results.append(
                    {
                        "mode": mode,
                        "codec": codec,
                        "gbit": gbit,
                        "prefill_s": t1 - t0,
                        "added_s": t_ready - t1,
                        "handoff_s": t_ready - t_pull,
                        "wire_bytes": st.bytes_on_wire,
                        "raw_bytes": st.raw_bytes,
                        "encode_s": st.encode_s,
                        "decode_s": st.decode_s,
                        "decode_side_cpu_s": cpu1 - cpu0,
                        "pipelined": pipelined,  # as this (one-core) process resolves it: see _pipelined
                        "cachegen_pulls": codecs.pull_codec("cachegen"),
                    }
                )
        peer.send(("quit",))
        out.send(("ok", results))
    except BaseException as e:  # reported to the parent, which raises it
        with contextlib.suppress(Exception):
            peer.send(("quit",))
        out.send(("error", f"{type(e).__name__}: {e}"))
        raise


def run_handoff(
    model_dir: str,
    scheme: str,
    plan: list[tuple[str, str, list[int]]],
    limit_bps: float | None = None,
    netns: str | None = None,
    decode_netns: str | None = None,
    host: str = "127.0.0.1",
    reshape: Callable[[float], None] | None = None,
) -> list[dict[str, Any]]:
    """Run `plan` between a prefill and a decode process; one row per trial. `netns`: the namespace both
    enter, unless `decode_netns` names the decode side's own; `host`: where the prefill side listens;
    `reshape(gbit)` runs here for each ("shape", gbit) entry."""
    ctx = mp.get_context("spawn")
    p_conn, d_conn = ctx.Pipe()
    res_parent, res_child = ctx.Pipe()
    max_tokens = max(len(p) for m, _, p in plan if m != "shape")
    pre = ctx.Process(
        target=_prefill_proc,
        args=(model_dir, scheme, limit_bps, netns, max_tokens, p_conn, host),
        daemon=True,
    )
    dec = ctx.Process(
        target=_decode_proc, args=(model_dir, decode_netns or netns, plan, d_conn, res_child), daemon=True
    )
    pre.start()
    dec.start()
    try:
        while True:
            if not res_parent.poll(600):
                raise RuntimeError("hand-off trials did not finish in 600 s")
            status, payload = res_parent.recv()
            if status != "shape":
                break
            if reshape is not None:
                reshape(payload)
            res_parent.send("shaped")
        if status != "ok":
            raise RuntimeError(f"hand-off trials failed: {payload}")
        return payload
    finally:
        for p in (dec, pre):
            p.join(30)
            if p.is_alive():
                p.kill()


RATES_GBIT = (1.0, 2.5, 5.0, 10.0)  # the shaped links of the sweep
ALT = "_alt"  # a trial mode's suffix: served and pulled the other way than the services' default
# What a decode instance (it holds the model) pulls when the cluster runs `--codec cachegen`
# (`CodecContext.pull_codec`): the sweep's `cachegen_s`; plain cachegen is `cachegen_plain_s`.
SERVED_CACHEGEN = "cachegen_l0"


def _pipelined(mode: str) -> bool:
    """Whether a trial `mode` is served and pulled pipelined: as the services are (their codec threads:
    one per core of this process, `pipelined_by_default`), or the other way for an ALT mode."""
    from kv_transfer.pipeline import auto_workers, pipelined_by_default

    default = pipelined_by_default(auto_workers())
    return default != mode.endswith(ALT)


# tbf burst: 200 us of the rate, at least 256 KiB (2 ms at 1 Gbit/s). Smaller bursts left the link well under
# its rate on a loaded 2-core host (tbf dequeues on a timer, and the timer's softirq waits for a CPU).
BURST_S = 200e-6
MIN_BURST_BYTES = 256 << 10
VETH_NET = "10.211.0"  # prefill side .1, decode side .2, /24


def tbf_args(gbit: float) -> list[str]:
    """tc tbf shaping to `gbit` Gbit/s: burst = BURST_S of the rate (>= MIN_BURST_BYTES), 50 ms queue."""
    burst = max(MIN_BURST_BYTES, int(gbit * 1e9 / 8 * BURST_S))
    return ["tbf", "rate", f"{gbit * 1000:g}mbit", "burst", str(burst), "latency", "50ms"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class VethLink:
    """Two network namespaces joined by a veth pair; each end's egress is shaped by tc tbf (`shape`)."""

    prefill_ns: str
    decode_ns: str
    prefill_host: str = f"{VETH_NET}.1"
    dev: str = "pdb0"  # the veth end's name in each namespace

    def shape(self, gbit: float) -> None:
        for ns in (self.prefill_ns, self.decode_ns):
            _ip("netns", "exec", ns, "tc", "qdisc", "replace", "dev", self.dev, "root", *tbf_args(gbit))


@contextlib.contextmanager
def veth_link(gbit: float = RATES_GBIT[0]) -> Iterator[VethLink]:
    """A fresh pair of namespaces (prefill, decode) joined by a veth pair shaped to `gbit` both ways."""
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    link = VethLink(f"pdbench-p-{tag}", f"pdbench-d-{tag}")
    made: list[str] = []
    try:
        for ns in (link.prefill_ns, link.decode_ns):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("-n", link.prefill_ns, "link", "add", link.dev, "type", "veth", "peer", "name", link.dev, "netns",
            link.decode_ns)  # fmt: skip
        for ns, host in ((link.prefill_ns, 1), (link.decode_ns, 2)):
            # a hand-off follows an idle connection (the prompt's prefill): keep the congestion window, as a
            # tuned serving host does, so the link runs at its rate from the first byte
            _ip("netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.tcp_slow_start_after_idle=0")
            _ip("-n", ns, "addr", "add", f"{VETH_NET}.{host}/24", "dev", link.dev)
            _ip("-n", ns, "link", "set", link.dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        link.shape(gbit)
        yield link
    finally:
        for ns in made:  # deleting a namespace deletes its veth end (and so the pair)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def netns_works() -> tuple[bool, str]:
    """Whether veth_link() can be made and entered here (root, iproute2, tc, setns)."""
    try:
        with veth_link() as link:
            ctx = mp.get_context("spawn")
            p = ctx.Process(target=_enter_netns, args=(link.decode_ns,))
            p.start()
            p.join(30)
            if p.exitcode != 0:
                return False, f"setns into {link.decode_ns} failed (exit {p.exitcode})"
        return True, "ok"
    except (OSError, subprocess.SubprocessError) as e:
        msg = getattr(e, "stderr", b"") or b""
        return False, f"{type(e).__name__}: {e} {msg.decode(errors='replace').strip()}"


def break_even_gbit(points: list[tuple[float, float]]) -> tuple[float | None, str]:
    """Where speedup (raw time / cachegen time) crosses 1, from (gbit, speedup) points sorted by gbit.

    Between the first pair of neighbouring rates with speedup >= 1 then < 1, interpolated linearly in
    log(rate) against log(speedup) (hand-off times are close to power laws of the rate there). None when
    speedup stays on one side of 1 over the measured range (the method string says which side)."""
    for (b0, s0), (b1, s1) in zip(points, points[1:], strict=False):
        if s0 >= 1 > s1:
            if s0 == 1:
                return b0, f"measured: speedup 1.00 at {b0:g} Gbit/s"
            f = math.log(s0) / (math.log(s0) - math.log(s1))
            at = math.exp(math.log(b0) + f * (math.log(b1) - math.log(b0)))
            return at, (
                f"interpolated in log(rate) vs log(speedup) between {b0:g} Gbit/s ({s0:.2f}x) and "
                f"{b1:g} Gbit/s ({s1:.2f}x)"
            )
    if points and all(sp >= 1 for _, sp in points):
        return None, f"cachegen faster at every measured rate: break-even above {points[-1][0]:g} Gbit/s"
    return None, f"cachegen slower at every measured rate: break-even below {points[0][0]:g} Gbit/s"


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _prompts(model_dir: str, n_tokens: int, count: int) -> list[list[int]]:
    from training.eval import load_heldout_ids

    ids = load_heldout_ids(model_dir)
    stride = max(1, (len(ids) - n_tokens) // max(1, count))
    return [ids[i * stride : i * stride + n_tokens] for i in range(count)]


def _med(rows: list[dict[str, Any]], key: str, **match: str) -> float:
    vals = [r[key] for r in rows if all(r[k] == v for k, v in match.items())]
    return statistics.median(vals)


def measure_handoff(model_dir: str, s: Settings, link: str) -> dict[str, Any]:
    from kv_transfer.transport import default_scheme

    prompts = _prompts(model_dir, s.prompt_tokens, s.trials + 1)
    scheme = default_scheme()
    # unshaped: modes interleaved; trial 0 of each (connection set-up, first allocations) is dropped
    plan = [(m, "raw", p) for p in prompts for m in ("streaming", "after")]
    _log(f"  hand-off, unshaped loopback ({scheme}): {len(plan)} trials")
    rows = run_handoff(model_dir, scheme, plan)[2:]
    unshaped = {
        "ttft_added_frac_streaming": _med(rows, "added_s", mode="streaming") / _med(rows, "prefill_s"),
        "ttft_added_frac_after": _med(rows, "added_s", mode="after") / _med(rows, "prefill_s"),
        "transport": scheme,
        "codec": "raw",
        "prefill_s": _med(rows, "prefill_s"),
        "ttft_added_s_streaming": _med(rows, "added_s", mode="streaming"),
        "ttft_added_s_after": _med(rows, "added_s", mode="after"),
        "kv_bytes": rows[0]["raw_bytes"],
    }

    how = link
    if link in ("auto", "netns"):
        ok, why = netns_works()
        if not ok and link == "netns":
            raise SystemExit(f"--link netns: {why}")
        how = "netns" if ok else "limiter"
        if not ok:
            _log(f"  netns + veth + tc not usable ({why}); using the in-process rate limiter")
    # One prefill/decode pair for the whole sweep; the link is re-shaped between rates. At 1 Gbit/s every
    # codec and mode (cachegen_l0: what a decode instance that holds the model pulls when told cachegen);
    # at the other rates raw and cachegen pulled after prefill. The first prompt's trials at the first rate
    # (connection set-up, first allocations) are dropped; later rates reuse the warm processes and skip it.
    # Every rate also pulls plain cachegen (layer 0 coded: what a decoder without the model would get).
    full = (("raw", "cachegen", "cachegen_l0"), ("after", "streaming"))
    sweep = (("raw", "cachegen", "cachegen_l0"), ("after",))
    # At every rate the served cachegen is also served and pulled the other way ("after_alt": pipelined or not).
    sweep_plan: list[tuple[str, str, list[int]]] = []
    for i, gbit in enumerate(RATES_GBIT):
        codecs, modes = full if gbit == 1.0 else sweep
        sweep_plan.append(("shape", f"{gbit}", []))
        for p in prompts if i == 0 else prompts[1:]:
            sweep_plan += [(m, c, p) for c in codecs for m in modes] + [("after" + ALT, SERVED_CACHEGEN, p)]
    n_trials = len(sweep_plan) - len(RATES_GBIT)
    _log(f"  hand-off over shaped links {list(RATES_GBIT)} Gbit/s ({how}): {n_trials} trials")
    load0 = _loadavg()
    if how == "netns":
        with veth_link(RATES_GBIT[0]) as vl:
            all_rows = run_handoff(
                model_dir,
                "tcp",
                sweep_plan,
                netns=vl.prefill_ns,
                decode_netns=vl.decode_ns,
                host=vl.prefill_host,
                reshape=vl.shape,
            )
        shaping = (
            "two network namespaces joined by a veth pair, each end's egress shaped by tc tbf (burst "
            f"{BURST_S * 1e6:.0f} us of the rate, >= {MIN_BURST_BYTES >> 10} KiB; latency 50ms), "
            "tcp_slow_start_after_idle=0 in both; tcp transport"
        )
    else:
        all_rows = run_handoff(model_dir, "tcp", sweep_plan, limit_bps=RATES_GBIT[0] * 1e9 / 8)
        shaping = "LimitedTransport token bucket on the prefill side's tcp sends (re-rated between rates)"
    by_rate: dict[float, list[dict[str, Any]]] = {}
    for i, gbit in enumerate(RATES_GBIT):
        codecs, modes = full if gbit == 1.0 else sweep
        by_rate[gbit] = [r for r in all_rows if r["gbit"] == gbit][0 if i else len(codecs) * len(modes) + 1 :]
    served = {r["cachegen_pulls"] for r in all_rows}
    if served != {SERVED_CACHEGEN}:  # the decode process holds the model, as a decode instance does
        raise RuntimeError(f"the decode side pulls {served} when told cachegen, not {SERVED_CACHEGEN}")
    shaped = []
    for gbit, rr in by_rate.items():
        t_raw = _med(rr, "handoff_s", mode="after", codec="raw")
        t_cg = _med(rr, "handoff_s", mode="after", codec=SERVED_CACHEGEN)
        t_plain = _med(rr, "handoff_s", mode="after", codec="cachegen")
        t_alt = _med(rr, "handoff_s", mode="after" + ALT, codec=SERVED_CACHEGEN)
        default = next(
            r["pipelined"] for r in rr if r["mode"] == "after"
        )  # as the pinned processes resolved it
        t_pipe, t_seq = (t_cg, t_alt) if default else (t_alt, t_cg)
        shaped.append(
            {
                "gbit_s": gbit,
                "raw_s": t_raw,
                "cachegen_s": t_cg,
                "speedup": t_raw / t_cg,
                "cachegen_codec": SERVED_CACHEGEN,
                "cachegen_plain_s": t_plain,
                "speedup_plain": t_raw / t_plain,
                "cachegen_sequential_s": t_seq,
                "cachegen_pipelined_s": t_pipe,
                "pipeline_speedup": t_seq / t_pipe,
                "pipelined_by_default": default,
                "raw_effective_gbit_s": _med(rr, "wire_bytes", codec="raw") * 8 / t_raw / 1e9,
                "encode_s_cachegen": _med(rr, "encode_s", mode="after", codec=SERVED_CACHEGEN),
                "decode_s_cachegen": _med(rr, "decode_s", mode="after", codec=SERVED_CACHEGEN),
            }
        )
    be, be_how = break_even_gbit([(p["gbit_s"], p["speedup"]) for p in shaped])
    be_plain, be_plain_how = break_even_gbit([(p["gbit_s"], p["speedup_plain"]) for p in shaped])
    rows = by_rate[1.0]
    link_desc = shaping + " at 1 Gbit/s"
    h_raw = _med(rows, "handoff_s", mode="after", codec="raw")
    h_cg = _med(rows, "handoff_s", mode="after", codec="cachegen")
    h_l0 = _med(rows, "handoff_s", mode="after", codec="cachegen_l0")
    pre = _med(rows, "prefill_s")
    limited = {
        "cachegen_speedup_vs_raw": h_raw / h_cg,
        "cachegen_l0_speedup_vs_raw": h_raw / h_l0,
        "link": how,
        "link_detail": link_desc,
        "handoff_s_raw": h_raw,
        "handoff_s_cachegen": h_cg,
        "prefill_s": pre,
        "ttft_added_frac_after_raw": _med(rows, "added_s", mode="after", codec="raw") / pre,
        "ttft_added_frac_after_cachegen": _med(rows, "added_s", mode="after", codec="cachegen") / pre,
        "ttft_added_frac_streaming_raw": _med(rows, "added_s", mode="streaming", codec="raw") / pre,
        "ttft_added_frac_streaming_cachegen": _med(rows, "added_s", mode="streaming", codec="cachegen") / pre,
        "wire_bytes_raw": _med(rows, "wire_bytes", codec="raw"),
        "wire_bytes_cachegen": _med(rows, "wire_bytes", codec="cachegen"),
        "encode_s_cachegen": _med(rows, "encode_s", mode="after", codec="cachegen"),
        "decode_s_cachegen": _med(rows, "decode_s", mode="after", codec="cachegen"),
        "decode_side_cpu_s_cachegen": _med(rows, "decode_side_cpu_s", mode="after", codec="cachegen"),
        "handoff_s_cachegen_l0": h_l0,
        "wire_bytes_cachegen_l0": _med(rows, "wire_bytes", codec="cachegen_l0"),
        "encode_s_cachegen_l0": _med(rows, "encode_s", mode="after", codec="cachegen_l0"),
        "decode_s_cachegen_l0": _med(rows, "decode_s", mode="after", codec="cachegen_l0"),
    }
    return {
        "unshaped": unshaped,
        "limited_1gbit": limited,
        "shaped": shaped,
        "break_even_gbit_s": be,
        "break_even_method": be_how,
        "cachegen_codec": SERVED_CACHEGEN,
        "break_even_gbit_s_plain": be_plain,
        "break_even_method_plain": be_plain_how,
        "shaping": shaping,
        "link": how,
        "host_load_avg": {"before_sweep": load0, "after_sweep": _loadavg()},
        "method": "ModelRunner + KVServer (prefill process) and KVPuller -> KVCache (decode process), "
        "one core each; no gateway or gRPC",
        "prompt_tokens": s.prompt_tokens,
        "trials": s.trials,
    }


def run(model_dir: str, s: Settings, link: str) -> dict[str, Any]:
    from kv_transfer.transport import available_transports

    if not (Path(model_dir) / "model.safetensors").exists():
        raise SystemExit(f"{model_dir}: no weights (model.safetensors) yet")
    t0 = time.perf_counter()
    schemes = available_transports()
    lbytes = layer_bytes(model_dir)
    _log(f"transports {schemes}, layer message {lbytes} bytes")
    tr = measure_transports(schemes, s, lbytes)
    t1 = time.perf_counter()
    handoff = measure_handoff(model_dir, s, link)
    return {
        "transports": tr["transports"],
        "handoff": handoff,
        "socket_baseline": {**tr["socket_baseline"], "layer_bytes": lbytes},
        "settings": {
            "quick": s.rounds < Settings.make(False).rounds,
            "rounds": s.rounds,
            "messages_64mib": s.msgs_64mib,
            "messages_layer": s.layer_msgs,
            "samples_gb_s": tr["samples_gb_s"],
            "transports_s": t1 - t0,
            "handoff_s": time.perf_counter() - t1,
        },
    }


def summary(r: dict[str, Any]) -> str:
    b = r["socket_baseline"]
    lines = [
        f"raw socket: {b['gb_s_64mib']:.2f} GB/s (64 MiB), {b['gb_s_layer']:.2f} GB/s ({b['layer_bytes']} B)"
    ]
    for n, t in r["transports"].items():
        lines.append(
            f"{n:6s} {t['gb_s_64mib']:6.2f} GB/s 64 MiB ({t['ratio_vs_socket']:.2f}x socket), "
            f"{t['gb_s_layer']:6.2f} GB/s per layer ({t['ratio_vs_socket_layer']:.2f}x)"
        )
    u, lim = r["handoff"]["unshaped"], r["handoff"]["limited_1gbit"]
    lines.append(
        f"hand-off unshaped ({u['transport']}, prefill {u['prefill_s'] * 1e3:.1f} ms): TTFT +"
        f"{u['ttft_added_frac_streaming']:.1%} streaming, +{u['ttft_added_frac_after']:.1%} after prefill"
    )
    h = r["handoff"]
    for p in h["shaped"]:
        lines.append(
            f"{p['gbit_s']:4g} Gbit/s ({h['link']}): raw {p['raw_s'] * 1e3:6.1f} ms, cachegen "
            f"{p['cachegen_s'] * 1e3:6.1f} ms -> {p['speedup']:.2f}x (raw moved {p['raw_effective_gbit_s']:.2f} "
            f"Gbit/s; {p['cachegen_codec']} sequential {p['cachegen_sequential_s'] * 1e3:.1f} ms, pipelined "
            f"{p['cachegen_pipelined_s'] * 1e3:.1f} ms; plain cachegen {p['cachegen_plain_s'] * 1e3:.1f} ms "
            f"-> {p['speedup_plain']:.2f}x)"
        )
    be, bp = h["break_even_gbit_s"], h["break_even_gbit_s_plain"]
    lines.append(
        f"break-even ({h['cachegen_codec']}, what --codec cachegen serves): "
        f"{'-' if be is None else f'{be:.2f} Gbit/s'} ({h['break_even_method']})"
    )
    lines.append(
        f"break-even (plain cachegen): {'-' if bp is None else f'{bp:.2f} Gbit/s'} ({h['break_even_method_plain']})"
    )
    lines.append(
        f"1 Gbit/s ({lim['link']}): hand-off raw {lim['handoff_s_raw'] * 1e3:.1f} ms, cachegen "
        f"{lim['handoff_s_cachegen'] * 1e3:.1f} ms -> {lim['cachegen_speedup_vs_raw']:.2f}x, cachegen_l0 "
        f"{lim['handoff_s_cachegen_l0'] * 1e3:.1f} ms -> {lim['cachegen_l0_speedup_vs_raw']:.2f}x"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and trials (under two minutes)")
    ap.add_argument("--json", default=None, help="write the JSON object here instead of stdout")
    ap.add_argument(
        "--model", default=str(DEFAULT_MODEL), help="model directory (default: the shipped model)"
    )
    ap.add_argument(
        "--link",
        choices=("auto", "netns", "limiter"),
        default="auto",
        help="how to shape the links: netns (two network namespaces joined by veth, tc tbf on each end; needs "
        "root and iproute2), the in-process limiter, or auto (netns if it works)",
    )
    ap.add_argument(
        "--reshard",
        action="store_true",
        help="also time a TP2 -> TP1 resharded hand-off vs TP1 -> TP1 (bench.reshard; JSON key `reshard`)",
    )
    a = ap.parse_args(argv)
    result = run(a.model, Settings.make(a.quick), a.link)
    text = summary(result)
    if a.reshard:
        from bench import reshard

        result["reshard"] = reshard.measure_reshard(a.model, reshard.Settings.make(a.quick))
        text += "\n" + reshard.summary(result["reshard"])
    emit(result, a.json, summary=text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
