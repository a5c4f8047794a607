"""`python -m bench.reshard`: KV hand-off time of a resharded pull (TP2 prefill -> TP1 decode) vs today's TP1 -> TP1.

    python -m bench.reshard [--quick] [--json PATH] [--transport tcp|shm] [--codec raw|cachegen] [--tokens N]

`--tokens 16` measures what a pull costs whatever its size (per pull and per frame: PULL, header checks,
trailer, Python on both sides, thread wake-ups). On 2026-12-06 (shared 2-core host, load 5-6): TP1 -> TP1
0.9-1.5 ms, TP2 -> TP1 1.5-2.6 ms (decode-process CPU 0.7-0.9 vs 1.3-1.7 ms, prefill ranks' 0.9-1.6 vs
1.7-2.9 ms): +0.6-1.1 ms, most of the TP2 - TP1 difference at 1536 tokens.

Also `python -m bench.transport --reshard`, which adds the same object to its JSON as `reshard`.

Method. The shipped model prefills one held-out prompt (`prompt_tokens`) once, in this process; its real KV is
split into each prefill rank's shard (`Layout.owned`). Each prefill rank is its own process with its own
`KVServer` holding only its shard, pinned to its own core (ranks 0.. on cores 0..); the decode side is one
process pinned to the last core, pulling into a `KVCache`. Per trial every rank of the source instance opens a
lease for a new transfer (rank 0's token shared), marks all layers ready and finishes (the pull starts after
prefill: the whole hand-off is on the critical path), then the decode process pulls:
  * tp1_to_tp1: `KVPuller.pull` from the one-rank instance (today's hand-off);
  * tp1_to_tp1_pieces: `KVPuller.pull_pieces` from the same instance (one piece: the reshard machinery's cost);
  * tp2_to_tp1: `KVPuller.pull_pieces` from the two-rank instance (two pieces, one KV head each, streaming at
    once), its default reader: one thread reads both connections as data arrives;
  * tp2_to_tp1_threads: the same with `threads=True`: a pull thread per piece, each writing its own KV head
    (the reader ucx uses; before 2026-12-06 the only one).
Hand-off time = pull call -> every layer written into the decode cache (wall clock); medians over trials, modes
interleaved, each round in the next row of a balanced Latin square (`ORDERS`: within the rounds each mode
follows each other mode equally often; the plain rotation used before 2026-12-07 put each mode behind the
same one three rounds in four); every mode is measured the same way, on connections the warm-up rounds opened
(`Settings.warmup` rounds of every mode, not reported: the first rounds after the processes start run slower
in every mode), each rank serving its own private copy of its shard (before 2026-12-07 the TP1 rank served the
parent's shared-memory tensor itself and the TP2 ranks private copies). `ratio` = tp2_to_tp1 / tp1_to_tp1
(target <= 1.2). Per pull the JSON also counts the context switches of the decode process and of the prefill
ranks (`breakdown_counts`: voluntary ones are mostly waits for the socket, so they count wake-ups). With fewer
cores than busy processes (3) the JSON says `oversubscribed`: the decode process keeps a core of its own (the
last) and the prefill ranks share the others (on 2 cores: both TP2 ranks on core 0), so the comparison still
gives each side the same cores.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from bench.report import emit

MODES = ("tp1_to_tp1", "tp1_to_tp1_pieces", "tp2_to_tp1", "tp2_to_tp1_threads")
# A Williams design: round r runs the modes in row r % 4, and over the 4 rows every ordered pair of modes is
# adjacent exactly once, so no mode always runs behind the same one (whose leftovers it would inherit)
ORDERS = ((0, 1, 3, 2), (1, 2, 0, 3), (2, 3, 1, 0), (3, 0, 2, 1))
TARGET_RATIO = 1.2


@dataclass(frozen=True)
class Settings:
    prompt_tokens: int
    trials: int  # per mode
    warmup: int = 3  # rounds of every mode before the reported ones (connections opened, processes warm)

    @staticmethod
    def make(quick: bool) -> Settings:
        # --quick (and `pdserve bench engine --tp 2 --quick`) shortens the prompt, not the trials: a median of 7
        # pulls per mode was at the mercy of a few slow ones, and 25 cost a second or two (the setup dominates)
        return Settings(prompt_tokens=1024, trials=25) if quick else Settings(prompt_tokens=1536, trials=25)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cpu_s() -> float:
    """CPU time (user + system, s) of this process, all threads: the decode side's cost, whatever else runs."""
    return time.process_time()


def _switches() -> int:
    """Context switches of this process so far, all threads (voluntary: it waited, e.g. for a socket)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_nvcsw + ru.ru_nivcsw


def _pin(core: int) -> None:
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[core % len(cores)]})


def _rank_proc(model_dir: str, scheme: str, tp: int, rank: int, kv: list[Any], core: int, conn: Any) -> None:
    """One prefill rank: a KVServer holding this rank's shard of `kv` under each trial's transfer id."""
    _pin(core)
    import threading

    import torch

    torch.set_num_threads(1)
    from engine.parallel.layout import Layout
    from kv_transfer.codec import CodecContext
    from kv_transfer.server import KVServer
    from kv_transfer.transport import transport_for

    layout = Layout(tp, 1)
    num_layers, num_kv_heads = len(kv), kv[0][0].shape[1]
    layers, heads = layout.owned(rank, num_layers, num_kv_heads)
    # a private copy for every rank (a whole-head slice's .contiguous() would be the parent's shared-memory
    # tensor itself: the TP1 rank would read other memory than the TP2 ranks)
    shard = [(k[:, heads[0] : heads[1]].clone(), v[:, heads[0] : heads[1]].clone()) for k, v in kv]
    fingerprint, token_ids = conn.recv()
    codecs = CodecContext.from_model_dir(
        model_dir
    )  # calibration files; no layer-0 function (not cachegen_l0)
    server = KVServer(
        transport_for(scheme), "127.0.0.1", fingerprint=fingerprint, lease_ttl_s=120, codecs=codecs
    )
    server.start()
    pulled = threading.Semaphore(0)
    conn.send(server.address)
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "quit":
                break
            _, tid, token = msg
            cpu0, serve0, sw0 = _cpu_s(), server.counters().serve_cpu_s, _switches()
            tok = server.open_lease(
                tid,
                num_layers,
                shard[0][0].shape[0],
                lambda layer: shard[layer],
                lambda _tid, reason: pulled.release() if reason == "pulled" else None,
                token_ids=token_ids,
                layers=layers,
                heads=heads,
                token=token,
            )
            server.mark_ready(tid, num_layers)
            server.finish(tid, 1)
            conn.send(tok)
            if not pulled.acquire(timeout=120):  # the decode side ACKed this rank's whole shard
                raise RuntimeError(f"rank {rank}: lease {tid} was not pulled")
            cpu, serve = _cpu_s() - cpu0, server.counters().serve_cpu_s - serve0
            conn.send(("pulled", cpu, serve, _switches() - sw0))
    finally:
        server.stop()


def _decode_proc(
    model_dir: str,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    num_tokens: int,
    fingerprint: int,
    core: int,
    conn: Any,
) -> None:
    """The decode side: pulls each trial's KV into a KVCache and reports the hand-off time."""
    _pin(core)
    import torch

    torch.set_num_threads(1)
    from engine.kv_cache import KVCache
    from engine.parallel.layout import Layout
    from kv_transfer.client import KVPuller
    from kv_transfer.codec import CodecContext

    cache = KVCache(num_layers, -(-num_tokens // 16), 16, num_kv_heads, head_dim)
    blocks = list(
        range(cache.num_blocks)
    )  # as a fresh sequence's: one run (decode_service writes the same way)

    def write_layer(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        cache.write(layer, blocks, 0, k, v)

    def write_piece(layer: int, head_start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        cache.write(layer, blocks, 0, k, v, heads=(head_start, head_start + k.shape[1]))

    codecs = CodecContext.from_model_dir(model_dir)
    with KVPuller(fingerprint=fingerprint, timeout_s=120, codecs=codecs) as puller:
        while True:
            msg = conn.recv()
            if msg[0] == "quit":
                break
            _, mode, tid, codec, token, addresses = msg
            t0, cpu0, sw0 = time.monotonic(), _cpu_s(), _switches()
            if mode == "tp1_to_tp1":
                trailer = puller.pull(addresses[0], tid, codec, write_layer, token=token)
            else:
                trailer = puller.pull_pieces(
                    Layout(len(addresses), 1),
                    addresses,
                    tid,
                    codec,
                    (0, num_layers),
                    (0, num_kv_heads),
                    write_piece,
                    token=token,
                    num_layers=num_layers,
                    num_kv_heads=num_kv_heads,
                    threads=mode.endswith("_threads"),
                )
                want = "threads" if mode.endswith("_threads") else "one_thread"
                if len(addresses) > 1 and trailer.reader != want:
                    raise RuntimeError(f"{mode}: pull_pieces read with {trailer.reader!r}, not {want!r}")
            st = trailer.stats  # summed over the pieces
            wall, cpu, switches = time.monotonic() - t0, _cpu_s() - cpu0, _switches() - sw0
            parts = {
                "server_send_s": st.server_send_s,
                "decode_s": st.decode_s,
                "write_s": st.write_s,
                "decode_process_cpu_s": cpu,
            }
            conn.send((wall, parts, switches))


def measure_reshard(model_dir: str, s: Settings, scheme: str = "tcp", codec: str = "raw") -> dict[str, Any]:
    from bench.transport import DEFAULT_MODEL, _prompts
    from engine.kv_probe import KVProbe

    model_dir = model_dir or str(DEFAULT_MODEL)
    prompt = _prompts(model_dir, s.prompt_tokens, 1)[0]
    probe = KVProbe(model_dir, s.prompt_tokens)
    kv = probe.prefill(prompt)
    fingerprint = probe.runner.fingerprint
    num_layers, (num_tokens, num_kv_heads, head_dim) = len(kv), tuple(kv[0][0].shape)
    del probe
    ncores = len(os.sched_getaffinity(0))
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    conns: dict[int, list[Any]] = {}  # tp -> the rank processes' pipes
    addresses: dict[int, list[str]] = {}
    times: dict[str, list[float]] = {m: [] for m in MODES}
    breakdown: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}
    counts: dict[str, dict[str, list[int]]] = {m: {} for m in MODES}
    try:
        for tp in (1, 2):
            conns[tp] = []
            for rank in range(tp):
                parent, child = ctx.Pipe()
                p = ctx.Process(
                    target=_rank_proc,
                    args=(model_dir, scheme, tp, rank, kv, rank % max(1, ncores - 1), child),
                    daemon=True,
                )
                p.start()
                procs.append(p)
                parent.send((fingerprint, prompt))
                conns[tp].append(parent)
            addresses[tp] = [c.recv() for c in conns[tp]]
        dparent, dchild = ctx.Pipe()
        dec = ctx.Process(
            target=_decode_proc,
            args=(model_dir, num_layers, num_kv_heads, head_dim, num_tokens, fingerprint, ncores - 1, dchild),
            daemon=True,
        )
        dec.start()
        procs.append(dec)
        for rnd in range(s.warmup + s.trials):  # the first s.warmup rounds are not reported
            for mode in (MODES[i] for i in ORDERS[rnd % len(ORDERS)]):
                tp = 2 if mode.startswith("tp2") else 1
                tid = f"reshard-{mode}-{rnd}-{uuid.uuid4().hex[:6]}"
                conns[tp][0].send(("lease", tid, None))
                token = conns[tp][0].recv()
                for c in conns[tp][1:]:
                    c.send(("lease", tid, token))
                    assert c.recv() == token
                dparent.send(("pull", mode, tid, codec, token, addresses[tp]))
                if not dparent.poll(300):
                    raise RuntimeError(f"{mode}: the pull did not finish in 300 s")
                t, parts, switches = dparent.recv()
                n = {"decode_process_switches": switches, "prefill_process_switches": 0}
                # summed over the ranks (on 2 cores they share one)
                parts["prefill_process_cpu_s"] = parts["prefill_serve_cpu_s"] = 0.0
                for c in conns[tp]:
                    reply = c.recv() if c.poll(120) else None
                    if not isinstance(reply, tuple) or reply[0] != "pulled":
                        raise RuntimeError(f"{mode}: a prefill rank's lease was not released as pulled")
                    parts["prefill_process_cpu_s"] += reply[1]
                    parts["prefill_serve_cpu_s"] += reply[2]
                    n["prefill_process_switches"] += reply[3]
                if rnd >= s.warmup:
                    times[mode].append(t)
                    for k, x in parts.items():
                        breakdown[mode].setdefault(k, []).append(x)
                    for k, c in n.items():
                        counts[mode].setdefault(k, []).append(c)
        dparent.send(("quit",))
        for tp in conns:
            for c in conns[tp]:
                c.send(("quit",))
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    med = {m: statistics.median(v) for m, v in times.items()}
    ratio = med["tp2_to_tp1"] / med["tp1_to_tp1"]
    return {
        "src": "tp2",
        "dst": "tp1",
        "handoff_s": med,
        "handoff_s_all": times,
        # medians of the pull's parts, summed over its pieces (pieces overlap, so these may add up to more
        # than the hand-off): the prefill ranks' send calls, the puller's frame checks + decode, its writes;
        # decode_process_cpu_s: the decode process's CPU time (all threads) per pull, robust to foreign load;
        # prefill_process_cpu_s: the prefill ranks' CPU time (all threads, summed over the ranks) from the
        # lease's opening to its release as pulled (this bench's own messages to the rank included);
        # prefill_serve_cpu_s: of that, the KV servers' connection threads' from each PULL to its ACK
        # (KVServerCounters.serve_cpu_s)
        "breakdown_s": {m: {k: statistics.median(v) for k, v in b.items()} for m, b in breakdown.items()},
        # medians of the context switches per pull: of the decode process (its wall-clock window), and of the
        # prefill ranks' processes summed (lease opening to release, this bench's own messages included)
        "breakdown_counts": {m: {k: statistics.median(v) for k, v in c.items()} for m, c in counts.items()},
        "ratio": ratio,
        "threads_ratio": med["tp2_to_tp1_threads"] / med["tp1_to_tp1"],  # the reader ucx falls back to
        "pieces_overhead_ratio": med["tp1_to_tp1_pieces"] / med["tp1_to_tp1"],
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "transport": scheme,
        "codec": codec,
        "prompt_tokens": num_tokens,
        "kv_bytes": 2 * num_layers * num_tokens * num_kv_heads * head_dim * kv[0][0].element_size(),
        "trials": s.trials,
        "warmup_rounds": s.warmup,
        "cores": ncores,
        "busy_processes": 3,  # at most: the TP2 instance's two ranks and the decode process
        "oversubscribed": ncores < 3,  # then the TP2 ranks share a core; the decode process has its own
        "method": "real prompt KV split into per-rank shards (private copies); one KVServer process per prefill "
        "rank, one decode process pulling into a KVCache; pull after prefill; medians after warm-up rounds, modes "
        "interleaved in a balanced Latin square",
    }


def summary(r: dict[str, Any]) -> str:
    h = r["handoff_s"]
    return (
        f"hand-off ({r['transport']}, {r['codec']}, {r['prompt_tokens']} tokens): TP1->TP1 "
        f"{h['tp1_to_tp1'] * 1e3:.2f} ms, TP1->TP1 via pull_pieces {h['tp1_to_tp1_pieces'] * 1e3:.2f} ms, "
        f"TP2->TP1 {h['tp2_to_tp1'] * 1e3:.2f} ms -> {r['ratio']:.2f}x (target <= {r['target_ratio']}; "
        f"a thread per piece: {h['tp2_to_tp1_threads'] * 1e3:.2f} ms, {r['threads_ratio']:.2f}x)"
        + (f"; {r['cores']} cores: the TP2 ranks share one (oversubscribed)" if r["oversubscribed"] else "")
        + "; CPU per pull, decode / prefill process(es) (serving the PULL): "
        + ", ".join(
            f"{m} {b['decode_process_cpu_s'] * 1e3:.2f} / {b['prefill_process_cpu_s'] * 1e3:.2f} "
            f"({b['prefill_serve_cpu_s'] * 1e3:.2f}) ms"
            for m, b in r["breakdown_s"].items()
        )
        + "; context switches per pull, decode / prefill: "
        + ", ".join(
            f"{m} {c['decode_process_switches']:.0f} / {c['prefill_process_switches']:.0f}"
            for m, c in r["breakdown_counts"].items()
        )
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.reshard", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a shorter prompt (1024 tokens; under a minute)")
    ap.add_argument("--json", default=None, help="write the JSON object here instead of stdout")
    ap.add_argument("--model", default="", help="model directory (default: the shipped model)")
    ap.add_argument("--transport", default="tcp", choices=("tcp", "shm"), help="KV transport (default tcp)")
    ap.add_argument("--codec", default="raw", help="KV codec (default raw)")
    ap.add_argument("--tokens", type=int, default=0, help="prompt tokens (default 1536, 1024 with --quick)")
    a = ap.parse_args(argv)
    s = Settings.make(a.quick)
    if a.tokens:
        s = Settings(prompt_tokens=a.tokens, trials=s.trials)
    r = measure_reshard(a.model, s, a.transport, a.codec)
    emit({"reshard": r}, a.json, summary=summary(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
