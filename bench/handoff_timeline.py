"""`python -m bench.handoff_timeline`: where one cachegen hand-off's time goes, layer by layer.

    python -m bench.handoff_timeline [--tokens 1536] [--trials 5] [--codec cachegen] [--pipelined auto|on|off]

A prefill process (`ModelRunner` prefills one held-out prompt, `KVServer` serves it) and a decode process
(`KVPuller` writes into its own `KVCache`), each pinned to its own core as bench.transport pins them, over
loopback tcp (unshaped: the compute-bound case, what decides the break-even on fast links). Both sides
record wall-clock events (time.monotonic, shared by the processes) around the codec calls and the channel's
send / recv; per trial the timeline of every layer is printed relative to the PULL, then the medians per
stage and each process's CPU time for the pull (`prefill_cpu`: lease opened to ACK, `decode_cpu`: the pull
call). Events: prefill side `enc0/enc1` (codec.encode_parts), `send0/send1` (a frame's Channel.send); decode
side `recv0/recv1` (Channel.recv that returned a frame: recv0 is when the call was made, so recv0 -> recv1 is
mostly waiting), `dec0/dec1` (codec.decode, or decode_into the cache), `write1` (the layer is in the cache:
write_layer done, or checked after a decode in place), and `ready` (pull returned).
Then each side's fixed cost per layer besides the codec (`layer_costs`), what `kv_transfer.choice`'s model
adds to a codec's per-byte time; `--write-profile` stores them in the model's codec_profiles.json.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
import uuid
from typing import Any

from bench.transport import DEFAULT_MODEL, _pin, _prompts

Events = list[tuple[str, int, float]]  # (event, layer, time.monotonic())


def _instrument(events: Events) -> None:
    """Wrap the cachegen codec's encode/decode and TCP channel send/recv to record events (this process)."""
    from kv_transfer.client import KVPuller
    from kv_transfer.codec import cachegen
    from kv_transfer.frame import is_frame
    from kv_transfer.transport import tcp

    enc, dec = cachegen.CacheGenCodec.encode_parts, cachegen.CacheGenCodec.decode
    dec_into, write = cachegen.CacheGenCodec.decode_into, KVPuller._write
    send, recv = tcp.TCPChannel.send, tcp.TCPChannel.recv

    def encode_parts(self: Any, k: Any, v: Any, layer: int, *a: Any, **kw: Any) -> Any:
        events.append(("enc0", layer, time.monotonic()))
        out = enc(self, k, v, layer, *a, **kw)
        events.append(("enc1", layer, time.monotonic()))
        return out

    def decode(self: Any, params: Any, payload: Any, shape: Any, dtype: Any, layer: int, **kw: Any) -> Any:
        events.append(("dec0", layer, time.monotonic()))
        out = dec(self, params, payload, shape, dtype, layer, **kw)
        events.append(("dec1", layer, time.monotonic()))
        return out

    def decode_into(
        self: Any, params: Any, payload: Any, shape: Any, layer: int, k_out: Any, v_out: Any
    ) -> bool:
        events.append(("dec0", layer, time.monotonic()))
        done = dec_into(self, params, payload, shape, layer, k_out, v_out)
        if done:  # else decode() follows and records the layer
            events.append(("dec1", layer, time.monotonic()))
        else:
            events.pop()
        return done

    def write_layer(self: Any, d: Any, *a: Any) -> None:  # whether it copies or was decoded in place
        write(self, d, *a)
        events.append(("write1", d.frame.layer, time.monotonic()))

    def csend(self: Any, data: Any, timeout: float | None = None) -> None:
        t0 = time.monotonic()
        send(self, data, timeout)
        if is_frame(data):
            events.append(("send0", -1, t0))
            events.append(("send1", -1, time.monotonic()))

    def crecv(self: Any, timeout: float | None = None) -> Any:
        t0 = time.monotonic()
        msg = recv(self, timeout)
        if is_frame(msg):
            events.append(("recv0", -1, t0))
            events.append(("recv1", -1, time.monotonic()))
        return msg

    cachegen.CacheGenCodec.encode_parts = encode_parts  # type: ignore[method-assign]
    cachegen.CacheGenCodec.decode = decode  # type: ignore[method-assign]
    cachegen.CacheGenCodec.decode_into = decode_into  # type: ignore[method-assign]
    KVPuller._write = write_layer  # type: ignore[method-assign,assignment]
    tcp.TCPChannel.send = csend  # type: ignore[method-assign]
    tcp.TCPChannel.recv = crecv  # type: ignore[method-assign]


def _prefill(
    model_dir: str, prompt: list[int], pipelined: bool | None, read: str, prefill_each: bool, conn: Any
) -> None:
    _pin(0)
    import torch

    torch.set_num_threads(1)
    from engine.params import SamplingParams
    from engine.runner import ModelRunner
    from engine.sequence import Sequence
    from kv_transfer.codec import CodecContext
    from kv_transfer.server import KVServer
    from kv_transfer.transport import transport_for
    from prefill_service.engine import read_host_kv

    events: Events = []
    _instrument(events)
    runner = ModelRunner(model_dir, num_kv_blocks=-(-len(prompt) // 16) + 1, block_size=16)
    codecs = CodecContext.from_model_dir(model_dir, runner.model, runner.fingerprint)
    cache, n_layers, n = runner.kv_cache, runner.config.num_layers, len(prompt)
    blocks = list(range(cache.num_blocks))
    token = runner.prefill([Sequence("p", list(prompt), SamplingParams(max_tokens=1), blocks=blocks)])[0]
    srv = KVServer(
        transport_for("tcp"), "127.0.0.1", fingerprint=runner.fingerprint, codecs=codecs, pipelined=pipelined
    )
    srv.start()
    conn.send((srv.address, runner.fingerprint, srv.pipelined))
    try:
        while (msg := conn.recv())[0] == "lease":
            tid = msg[1]
            if (
                prefill_each
            ):  # as bench.transport's trials: the pull right after a prefill (caches as it left them)
                runner.prefill([Sequence(tid, list(prompt), SamplingParams(max_tokens=1), blocks=blocks)])
            events.clear()
            cpu0 = time.process_time()
            tok = srv.open_lease(
                tid,
                n_layers,
                n,
                read_layer=lambda layer: (
                    read_host_kv(cache, blocks, n, layer)
                    if read == "service"
                    else cache.read(layer, blocks, n)
                ),
                on_release=lambda *_a: None,
                token_ids=prompt,
            )
            srv.mark_ready(tid, n_layers)
            srv.finish(tid, int(token or 0))
            conn.send(tok)
            conn.recv()  # the pull is over
            conn.send((list(events), time.process_time() - cpu0))
    finally:
        srv.stop()


def _decode(model_dir: str, codec: str, trials: int, pipelined: bool | None, conn: Any, out: Any) -> None:
    _pin(1)
    import torch

    torch.set_num_threads(1)
    from engine.runner import ModelRunner
    from kv_transfer.client import KVPuller
    from kv_transfer.codec import CodecContext

    events: Events = []
    _instrument(events)
    address, fingerprint, srv_pipelined = conn.recv()
    runner = ModelRunner(model_dir, num_kv_blocks=2048 // 16 + 1, block_size=16)
    codecs = CodecContext.from_model_dir(model_dir, runner.model, runner.fingerprint)
    cache = runner.kv_cache
    blocks = list(range(cache.num_blocks))
    results = []
    with KVPuller(fingerprint=fingerprint, codecs=codecs, pipelined=pipelined) as puller:
        for _ in range(trials):
            tid = f"tl-{uuid.uuid4().hex[:8]}"
            conn.send(("lease", tid))
            tok = conn.recv()
            events.clear()

            def write(layer: int, k: Any, v: Any) -> None:
                cache.write(layer, blocks, 0, k, v)

            def dest(layer: int, shape: Any) -> Any:  # as decode_service: decoded in place where it can be
                return cache.run_views(layer, blocks, 0, shape[0])

            t0, c0 = time.monotonic(), time.process_time()
            trailer = puller.pull(address, tid, codec, write, token=tok, dest=dest)
            t1, c1 = time.monotonic(), time.process_time()
            conn.send(("done",))
            pre, prefill_cpu = conn.recv()
            st = trailer.stats
            results.append(
                {
                    "t0": t0,
                    "ready": t1 - t0,
                    "decode_cpu": c1 - c0,
                    "prefill_cpu": prefill_cpu,
                    "prefill": pre,
                    "decode": list(events),
                    "wire": st.bytes_on_wire,
                    "raw": st.raw_bytes,
                    "pipelined": (srv_pipelined, puller.pipelined),
                }
            )
    conn.send(("quit",))
    out.send(results)


def _table(r: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """One trial's per-layer timeline (ms after the PULL) and its stage sums."""
    t0 = r["t0"]
    ev = r["prefill"] + r["decode"]
    by: dict[str, list[float]] = {}
    for name, _layer, t in ev:
        by.setdefault(name, []).append((t - t0) * 1e3)
    for name in ("send0", "send1", "recv0", "recv1"):  # frames go in layer order: number them
        by.setdefault(name, [])
    cols = ["enc0", "enc1", "send0", "send1", "recv0", "recv1", "dec0", "dec1", "write1"]
    n = max(len(v) for v in by.values())
    lines = ["layer " + " ".join(f"{c:>7}" for c in cols)]
    for i in range(n):
        cells = [f"{by[c][i]:7.2f}" if c in by and i < len(by[c]) else "      -" for c in cols]
        lines.append(f"{i:5d} " + " ".join(cells))
    sums = {
        "encode": sum(b - a for a, b in zip(by.get("enc0", []), by.get("enc1", []), strict=True)),
        "send": sum(b - a for a, b in zip(by["send0"], by["send1"], strict=True)),
        "recv_wait": sum(b - a for a, b in zip(by["recv0"], by["recv1"], strict=True)),
        "decode": sum(b - a for a, b in zip(by.get("dec0", []), by.get("dec1", []), strict=True)),
        "first_enc0": by.get("enc0", [0.0])[0],
        "last_send1": by["send1"][-1] if by["send1"] else 0.0,
        "ready": r["ready"] * 1e3,
        "decode_cpu": r["decode_cpu"] * 1e3,
        "prefill_cpu": r["prefill_cpu"] * 1e3,
    }
    return "\n".join(lines), sums


def layer_costs(r: dict[str, Any]) -> tuple[float, float]:
    """One trial's fixed seconds per layer besides the codec, each side (medians over its layers):
    prefill = between one layer's encode end and the next one's start (frame, send call, next read, Python);
    decode = a frame's receive end to its decode start, plus its decode end to written (checks, write)."""
    by: dict[str, list[float]] = {}
    for name, _layer, t in r["prefill"] + r["decode"]:
        by.setdefault(name, []).append(t)
    enc0, enc1 = by["enc0"], by["enc1"]
    pre = [enc0[i] - enc1[i - 1] for i in range(1, len(enc0))]
    dec = [
        (d0 - r1) + (w1 - d1)
        for r1, d0, d1, w1 in zip(by["recv1"], by["dec0"], by["dec1"], by["write1"], strict=True)
    ]
    return statistics.median(pre), statistics.median(dec)


def write_profile_costs(model_dir: str, encode_layer_s: float, decode_layer_s: float) -> None:
    """Set every profile's per-layer costs in the model's codec_profiles.json (the same for every codec: they
    are the server's and the puller's work around the codec)."""
    import dataclasses

    from kv_transfer.choice import load_profiles, save_profiles

    profiles = [
        dataclasses.replace(p, encode_layer_s=encode_layer_s, decode_layer_s=decode_layer_s)
        for p in load_profiles(model_dir)
    ]
    print(f"wrote {save_profiles(model_dir, profiles)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--tokens", type=int, default=1536)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--codec", default="cachegen")
    ap.add_argument("--pipelined", choices=("auto", "on", "off"), default="auto")
    ap.add_argument(
        "--read",
        choices=("service", "gather"),
        default="service",
        help="read_layer: prefill_service's, or KVCache.read",
    )
    ap.add_argument(
        "--write-profile",
        action="store_true",
        help="store the per-layer costs in the model's codec_profiles.json",
    )
    ap.add_argument("--prefill-each", action="store_true", help="prefill the prompt again before each pull")
    ap.add_argument("--show", type=int, default=1, help="trials whose timeline is printed (the last ones)")
    a = ap.parse_args(argv)
    pipelined = {"auto": None, "on": True, "off": False}[a.pipelined]
    prompt = _prompts(a.model, a.tokens, 1)[0]
    ctx = mp.get_context("spawn")
    p_conn, d_conn = ctx.Pipe()
    res_parent, res_child = ctx.Pipe()
    pre = ctx.Process(
        target=_prefill, args=(a.model, prompt, pipelined, a.read, a.prefill_each, p_conn), daemon=True
    )
    dec = ctx.Process(
        target=_decode, args=(a.model, a.codec, a.trials + 1, pipelined, d_conn, res_child), daemon=True
    )
    pre.start()
    dec.start()
    try:
        deadline = time.monotonic() + 300
        while not res_parent.poll(1):
            if time.monotonic() > deadline or not (pre.is_alive() and dec.is_alive()):
                raise RuntimeError("timeline trials failed or did not finish in 300 s")
        results = res_parent.recv()[1:]  # trial 0: connection set-up and first allocations
    finally:
        for p in (dec, pre):
            p.join(30)
            if p.is_alive():
                p.kill()
    r0 = results[0]
    print(
        f"{a.codec}, {a.tokens} tokens, raw {r0['raw']} B, wire {r0['wire']} B, "
        f"pipelined (server, puller) {r0['pipelined']}"
    )
    sums = []
    for r in results:
        text, s = _table(r)
        sums.append(s)
    for r in results[-a.show :]:
        print(_table(r)[0])
    print("medians over trials (ms):")
    for key in sums[0]:
        print(f"  {key:>11}: {statistics.median(s[key] for s in sums):7.2f}")
    costs = [layer_costs(r) for r in results]
    pre_s, dec_s = (statistics.median(c[i] for c in costs) for i in (0, 1))
    print(
        f"fixed cost per layer besides the codec (median): prefill {pre_s * 1e3:.3f} ms, decode {dec_s * 1e3:.3f} ms"
    )
    if a.write_profile:
        write_profile_costs(a.model, round(pre_s, 6), round(dec_s, 6))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
