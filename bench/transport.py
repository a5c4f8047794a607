"""`python -m bench.transport`: KV transports against a raw socket, and the TTFT the KV hand-off adds.

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
  * limited_1gbit: a 1 Gbit/s link -- a network namespace whose loopback is shaped by `tc` tbf (both
    processes enter it), or, where that cannot be set up, `kv_transfer.transport.limited.LimitedTransport`
    (a token bucket on the prefill side's sends over tcp); `link` says which. Codecs raw, cachegen and
    cachegen_l0 (layer 0 as the token ids, what a decode instance holding the model pulls when told
    cachegen; both processes hold the model, as the services do), pull after prefill (the whole hand-off
    on the critical path): `cachegen_speedup_vs_raw` = hand-off time (pull start -> decode-ready) with raw
    / with cachegen, `cachegen_l0_speedup_vs_raw` likewise. Streaming figures are reported too.
All clocks here are wall clocks (time.monotonic, shared by the processes).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
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
from collections.abc import Iterator
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
            return Settings(rounds=2, msgs_64mib=2, layer_msgs=16, prompt_tokens=1024, trials=2)
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


def _prefill_proc(
    model_dir: str, scheme: str, limit_bps: float | None, netns: str | None, max_tokens: int, conn: Any
) -> None:
    """The prefill side: ModelRunner + KVServer; runs one trial per ("run", mode, tid, prompt)."""
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
    from kv_transfer.transport.limited import LimitedTransport

    runner = ModelRunner(model_dir, num_kv_blocks=-(-max_tokens // 16) + 1, block_size=16)
    codecs = CodecContext.from_model_dir(
        model_dir, runner.model, runner.fingerprint
    )  # as prefill_service does
    cache, num_layers = runner.kv_cache, runner.config.num_layers
    blocks = list(range(runner.kv_cache.num_blocks))
    transport = transport_for(scheme)
    if limit_bps:
        transport = LimitedTransport(transport, limit_bps)
    server = KVServer(transport, "127.0.0.1", fingerprint=runner.fingerprint, lease_ttl_s=120, codecs=codecs)
    server.start()
    conn.send((server.address, runner.fingerprint))
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "quit":
                break
            _, mode, tid, prompt = msg
            n = len(prompt)
            released = threading.Event()
            seq = Sequence(tid, list(prompt), SamplingParams(max_tokens=1), blocks=blocks)
            lease_token = server.open_lease(
                tid,
                num_layers,
                n,
                # mypy#15459: mypy cannot type a lambda whose default binds a loop variable
                read_layer=lambda layer, n=n: cache.read(layer, blocks, n),  # type: ignore[misc]
                on_release=lambda *_a, ev=released: ev.set(),
                token_ids=prompt,
            )
            if mode == "streaming":
                conn.send(("pull", tid, lease_token))  # the decode side learns of it when it is scheduled
            t0 = time.monotonic()
            # mypy#15459: mypy cannot type a lambda whose default binds a loop variable
            token = runner.prefill(
                [seq],
                on_layer=lambda layer, tid=tid: server.mark_ready(tid, layer + 1),  # type: ignore[misc]
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
        server.stop()


def _decode_proc(
    model_dir: str, netns: str | None, plan: list[tuple[str, str, list[int]]], peer: Any, out: Any
) -> None:
    """The decode side: pulls each trial's KV into its own KV cache (a ModelRunner's: it holds the model, as a
    decode instance does, so cachegen_l0 can recompute layer 0); reports the timings to `out`."""
    _enter_netns(netns)
    _pin(1)
    import torch

    torch.set_num_threads(1)
    from engine.runner import ModelRunner
    from kv_transfer.client import KVPuller
    from kv_transfer.codec import CodecContext

    try:
        max_tokens = max(len(p) for _, _, p in plan)
        runner = ModelRunner(model_dir, num_kv_blocks=-(-max_tokens // 16) + 1, block_size=16)
        codecs = CodecContext.from_model_dir(
            model_dir, runner.model, runner.fingerprint
        )  # as decode_service does
        cache = runner.kv_cache
        blocks = list(range(cache.num_blocks))
        address, fingerprint = peer.recv()
        results = []
        with KVPuller(fingerprint=fingerprint, timeout_s=120, codecs=codecs) as puller:
            for i, (mode, codec, prompt) in enumerate(plan):
                tid = f"bench-{i}-{uuid.uuid4().hex[:8]}"
                peer.send(("run", mode, tid, prompt))
                tag, got, lease_token = peer.recv()
                assert tag == "pull" and got == tid, (tag, got)
                t_pull, cpu0 = time.monotonic(), time.process_time()
                trailer = puller.pull(
                    address,
                    tid,
                    codec,
                    lambda layer, k, v: cache.write(layer, blocks, 0, k, v),
                    token=lease_token,
                )
                t_ready, cpu1 = time.monotonic(), time.process_time()
                tag, t0, t1 = peer.recv()
                st = trailer.stats
                results.append(
                    {
                        "mode": mode,
                        "codec": codec,
                        "prefill_s": t1 - t0,
                        "added_s": t_ready - t1,
                        "handoff_s": t_ready - t_pull,
                        "wire_bytes": st.bytes_on_wire,
                        "raw_bytes": st.raw_bytes,
                        "encode_s": st.encode_s,
                        "decode_s": st.decode_s,
                        "decode_side_cpu_s": cpu1 - cpu0,
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
) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    p_conn, d_conn = ctx.Pipe()
    res_parent, res_child = ctx.Pipe()
    max_tokens = max(len(p) for _, _, p in plan)
    pre = ctx.Process(
        target=_prefill_proc, args=(model_dir, scheme, limit_bps, netns, max_tokens, p_conn), daemon=True
    )
    dec = ctx.Process(target=_decode_proc, args=(model_dir, netns, plan, d_conn, res_child), daemon=True)
    pre.start()
    dec.start()
    try:
        if not res_parent.poll(600):
            raise RuntimeError("hand-off trials did not finish in 600 s")
        status, payload = res_parent.recv()
        if status != "ok":
            raise RuntimeError(f"hand-off trials failed: {payload}")
        return payload
    finally:
        for p in (dec, pre):
            p.join(30)
            if p.is_alive():
                p.kill()


@contextlib.contextmanager
def shaped_netns(rate: str = "1gbit") -> Iterator[str]:
    """A fresh network namespace whose loopback is up and shaped by tc tbf to `rate`."""
    name = f"pdbench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    try:
        for cmd in (
            ["ip", "link", "set", "lo", "up"],
            [
                "tc",
                "qdisc",
                "add",
                "dev",
                "lo",
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "256kb",
                "latency",
                "50ms",
            ],
        ):
            subprocess.run(["ip", "netns", "exec", name, *cmd], check=True, capture_output=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def netns_works() -> tuple[bool, str]:
    try:
        with shaped_netns() as name:
            ctx = mp.get_context("spawn")
            p = ctx.Process(target=_enter_netns, args=(name,))
            p.start()
            p.join(30)
            if p.exitcode != 0:
                return False, f"setns into {name} failed (exit {p.exitcode})"
        return True, "ok"
    except (OSError, subprocess.SubprocessError) as e:
        msg = getattr(e, "stderr", b"") or b""
        return False, f"{type(e).__name__}: {e} {msg.decode(errors='replace').strip()}"


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
            _log(f"  netns + tc not usable ({why}); using the in-process rate limiter")
    # cachegen_l0: what a decode instance that holds the model pulls when told cachegen (layer 0 as ids)
    codecs = ("raw", "cachegen", "cachegen_l0")
    plan = [(m, c, p) for p in prompts for c in codecs for m in ("after", "streaming")]
    warm = 2 * len(codecs)  # the first prompt's trials (connection set-up, first allocations) are dropped
    _log(f"  hand-off, 1 Gbit/s link ({how}): {len(plan)} trials")
    if how == "netns":
        with shaped_netns("1gbit") as ns:
            rows = run_handoff(model_dir, "tcp", plan, netns=ns)[warm:]
        link_desc = "network namespace, loopback shaped by tc tbf rate 1gbit burst 256kb; tcp transport"
    else:
        rows = run_handoff(model_dir, "tcp", plan, limit_bps=LINK_BPS)[warm:]
        link_desc = "LimitedTransport token bucket (125e6 bytes/s) on the prefill side's tcp sends"
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
    lines.append(
        f"1 Gbit/s ({lim['link']}): hand-off raw {lim['handoff_s_raw'] * 1e3:.1f} ms, cachegen "
        f"{lim['handoff_s_cachegen'] * 1e3:.1f} ms -> {lim['cachegen_speedup_vs_raw']:.2f}x, cachegen_l0 "
        f"{lim['handoff_s_cachegen_l0'] * 1e3:.1f} ms -> {lim['cachegen_l0_speedup_vs_raw']:.2f}x"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and trials (under a minute)")
    ap.add_argument("--json", default=None, help="write the JSON object here instead of stdout")
    ap.add_argument(
        "--model", default=str(DEFAULT_MODEL), help="model directory (default: the shipped model)"
    )
    ap.add_argument(
        "--link",
        choices=("auto", "netns", "limiter"),
        default="auto",
        help="how to make the 1 Gbit/s link: netns + tc (needs root and iproute2), the in-process limiter, "
        "or auto (netns if it works)",
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
