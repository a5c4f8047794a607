"""CPU per streamed token outside the engines, token stream on vs off (`python -m bench.stream_cpu`).

Two 1P1D clusters of the compare's bench model (`bench.compare.modes.QUICK`: the full run's model), one with
the coordinator's `--token-stream on` (each decode step's tokens of all requests in one message on one stream
per decode instance), one with `off` (one gRPC message per token per request), both up the whole time (the one
not measured idles). The same seeded `balanced`-length Poisson load (prompt and output 96-160 tokens, `--rate`
req/s) is sent to each in turn, `--pairs` times, alternating which goes first.

Per run, per process, from per-thread schedstat (CPU time on a core, so other load on the host stretches a run
but does not change what is counted): the gateway's main thread (its event loop) and its other threads (gRPC's
I/O), the decode process's threads other than its busiest (the step thread: what is left is its event loop
relaying tokens, gRPC's I/O, the KV pull threads), and the load generator (this process). Each process's idle
CPU (measured over `--idle-s` before each run) is subtracted; the rest is divided by the tokens streamed.
Reported: every run, and per setting the median over runs of each figure (microseconds per token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import tempfile
import time
from typing import Any

from bench.cpu import schedstat_ns

log = logging.getLogger("bench.stream_cpu")

Reading = dict[str, dict[int, tuple[int, int]]]


def _read(pids: dict[str, int]) -> Reading:
    return {name: schedstat_ns(pid) for name, pid in pids.items()}


def _cpu_s(
    a: dict[int, tuple[int, int]], b: dict[int, tuple[int, int]], tids: set[int] | None = None
) -> float:
    """Seconds on a CPU between readings `a` and `b`, of threads `tids` (None: all)."""
    return (
        sum(run - a.get(tid, (0, 0))[0] for tid, (run, _) in b.items() if tids is None or tid in tids) / 1e9
    )


def split(pids: dict[str, int], a: Reading, b: Reading) -> dict[str, float]:
    """CPU seconds between two readings: gateway main / other threads, decode non-step threads, load gen."""
    ga, gb = a["gateway"], b["gateway"]
    gw_main = _cpu_s(ga, gb, {pids["gateway"]})  # the main thread's tid is the pid
    gw_all = _cpu_s(ga, gb)
    da, db = a["decode"], b["decode"]
    per_thread = {tid: run - da.get(tid, (0, 0))[0] for tid, (run, _) in db.items()}
    step = max(per_thread, key=per_thread.__getitem__) if per_thread else None
    dec_all = _cpu_s(da, db)
    dec_other = dec_all - (per_thread[step] / 1e9 if step is not None else 0.0)
    return {
        "gateway_main": gw_main,
        "gateway_io": gw_all - gw_main,
        "gateway": gw_all,
        "decode_non_step": dec_other,
        "decode_step": dec_all - dec_other,
        "loadgen": _cpu_s(a["loadgen"], b["loadgen"]),
    }


def measure(
    cluster: Any, pids: dict[str, int], requests: list, idle_s: float, timeout_s: float
) -> dict[str, Any]:
    """One run: idle window, then the load; CPU per token (idle subtracted) per figure."""
    from bench.serving import run_load

    a = _read(pids)
    t0 = time.monotonic()
    time.sleep(idle_s)  # the idle window whose CPU rate is subtracted (not a synchronization)
    b = _read(pids)
    idle_wall = time.monotonic() - t0
    idle = {k: v / idle_wall for k, v in split(pids, a, b).items()}
    t1 = time.monotonic()
    records = asyncio.run(
        run_load(cluster.gateway_address, requests, request_timeout_s=timeout_s, drain_s=timeout_s)
    )
    c = _read(pids)
    wall = time.monotonic() - t1
    busy = split(pids, b, c)
    tokens = sum(len(r.token_times) for r in records if r.ok)
    failed = sum(1 for r in records if not r.ok)
    per_token_us = {k: max(0.0, busy[k] - idle[k] * wall) / max(1, tokens) * 1e6 for k in busy}
    return {"tokens": tokens, "failed": failed, "wall_s": wall, "us_per_token": per_token_us}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=5, help="alternated (on, off) run pairs")
    p.add_argument("--requests", type=int, default=40, help="requests per run")
    p.add_argument("--rate", type=float, default=3.0, help="requests per second (Poisson)")
    p.add_argument(
        "--idle-s", type=float, default=3.0, help="idle window before each run (its CPU is subtracted)"
    )
    p.add_argument(
        "--small", action="store_true", help="the small bench model (SMALL_MODEL) instead of QUICK's"
    )
    p.add_argument("--out", default=None, help="write the JSON result here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from bench.compare.modes import QUICK, SMALL_MODEL
    from bench.compare.slos import bench_model, prompt_source
    from bench.compare.systems import KV_BLOCKS, warm_up
    from bench.report import stop_on_sigterm
    from bench.workload import Uniform, Workload, make_requests
    from pdserve.launcher import ClusterConfig, LocalCluster

    stop_on_sigterm()
    model_dir, tok = bench_model(SMALL_MODEL if a.small else QUICK.model)
    source, _ = prompt_source(model_dir, tok)
    wl = Workload(
        "balanced", n_requests=a.requests, rate=a.rate, prompt=Uniform(96, 160), output=Uniform(96, 160)
    )
    requests = make_requests(wl, source)
    clusters: dict[str, LocalCluster] = {}
    tmp = tempfile.mkdtemp(prefix="stream_cpu-")
    try:
        for setting in ("on", "off"):
            cfg = ClusterConfig(
                model_dir=model_dir,
                port=0,
                prefill=1,
                decode=1,
                local_prefill="off",
                cpus=tuple(range(os.cpu_count() or 2))[:2],
                use_cuda=False,
                heartbeat_ttl_s=1.5,
                num_kv_blocks=KV_BLOCKS,
                token_stream=setting == "on",
                log_dir=os.path.join(tmp, setting),
            )
            clusters[setting] = LocalCluster(cfg).start(timeout_s=180)
            warm_up(clusters[setting].gateway_address, source)
        pids = {
            s: {
                "gateway": next(ch.proc.pid for ch in c.children if ch.role == "coordinator"),
                "decode": next(ch.proc.pid for ch in c.children if ch.role == "decode"),
                "loadgen": os.getpid(),
            }
            for s, c in clusters.items()
        }
        runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
        for i in range(a.pairs):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            for s in order:
                r = measure(clusters[s], pids[s], requests, a.idle_s, timeout_s=120)
                runs[s].append(r)
                log.info("pair %d %s: %s", i, s, json.dumps(r))
    finally:
        for c in clusters.values():
            c.stop()
    keys = list(runs["on"][0]["us_per_token"])
    medians = {
        s: {k: statistics.median(r["us_per_token"][k] for r in rs) for k in keys} for s, rs in runs.items()
    }
    # each pair's on/off ratio (the two runs of a pair are back to back: what disturbs one likely disturbs both)
    ratios = {
        k: [
            r1["us_per_token"][k] / r0["us_per_token"][k]
            for r1, r0 in zip(runs["on"], runs["off"], strict=True)
            if r0["us_per_token"][k]
        ]
        for k in keys
    }
    result = {
        "runs": runs,
        "median_us_per_token": medians,
        "pair_ratios": ratios,
        "rate": a.rate,
        "requests": a.requests,
    }
    print(
        f"{'us per token':18} {'on (median)':>12} {'off (median)':>12} {'on/off per pair: median [min-max]':>36}"
    )
    for k in keys:
        rs = ratios[k] or [float("nan")]
        print(
            f"{k:18} {medians['on'][k]:12.1f} {medians['off'][k]:12.1f} "
            f"{statistics.median(rs):20.2f} [{min(rs):.2f}-{max(rs):.2f}]"
        )
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
