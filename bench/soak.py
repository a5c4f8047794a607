"""Soak: a 1P1D cluster under a steady open-loop load for a long time; does it keep answering, and does any
process's memory grow?

First the goodput is measured (unless `--rate` is given): a closed-loop burst of `--concurrency` clients,
each sending the next request when its last one ended, for a few seconds; goodput = requests completed per
second (every one in full: a failed request stops the run). That is the cluster's saturated throughput on
this workload, with no latency SLO. Then a Poisson load at `--fraction` (default 0.8) of it runs for
`--minutes`, while every process the cluster started (coordinator, instances, Redis) has its resident set
size (RSS, /proc/PID/status VmRSS) sampled every `--sample-s`.

Reported (one JSON object on stdout, or `--json PATH`; a summary on stderr): requests, errors (by kind) and the error rate; per window of `--window-s` (by
arrival time) the requests, errors and TTFT / TPOT / end-to-end percentiles; per process the RSS samples
(seconds since the load started, KiB) and its growth after the warm-up (`--warmup-s`, default the first
window): median of the last three samples over median of the first three after the warm-up, in percent; the
host (cores, load average before and after: on a shared host the latencies are noisy, the error count and
the RSS are not).

    python -m bench.soak --quick              # about 40 s on 2 cores: 20 s of load
    python -m bench.soak --minutes 10         # docs/results/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import statistics
import tempfile
import threading
import time
from collections import Counter
from typing import Any

import grpc
import numpy as np

from bench.metrics import RequestRecord, compute_metrics, stats
from bench.report import emit
from bench.serving import grpc_sender, run_load
from bench.workload import BenchRequest, Fixed, Workload, make_requests
from engine.config import ModelConfig
from pdserve.launcher import ClusterConfig, LocalCluster
from pdserve.v1 import generation_pb2_grpc

log = logging.getLogger(__name__)


def rss_kib(pid: int) -> int | None:
    """Resident set size of a process in KiB; None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), None)
    except OSError:
        return None


class RssSampler:
    """A thread sampling the RSS of `processes` (name -> pid) every `period_s`; `samples[name]` is a list of
    (seconds since start, KiB). A process gone (exited) is recorded in `exited`."""

    def __init__(self, processes: dict[str, int], period_s: float) -> None:
        self.processes = processes
        self.period_s = period_s
        self.samples: dict[str, list[tuple[float, int]]] = {name: [] for name in processes}
        self.exited: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler")
        self._start = time.monotonic()

    def __enter__(self) -> RssSampler:
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # the last point, at the end of the load

    def _sample(self) -> None:
        t = round(time.monotonic() - self._start, 2)
        for name, pid in self.processes.items():
            kib = rss_kib(pid)
            if kib is None:
                self.exited.add(name)
            else:
                self.samples[name].append((t, kib))

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.period_s):
                return


def growth_pct(samples: list[tuple[float, int]], warmup_s: float) -> float | None:
    """RSS growth after the warm-up, in percent: median of the last three samples over the median of the
    first three at or after `warmup_s` (medians: one sample caught mid-allocation does not decide it)."""
    after = [kib for t, kib in samples if t >= warmup_s]
    if len(after) < 2:
        return None
    first, last = statistics.median(after[:3]), statistics.median(after[-3:])
    return round(100.0 * (last - first) / first, 2)


def measure_goodput(
    address: str, requests: list[BenchRequest], concurrency: int, seconds: float
) -> tuple[float, int]:
    """(requests completed per second, requests completed) of `concurrency` closed-loop clients sending
    `requests` in turn for `seconds`; any failed request raises (a cluster failing at saturation has no
    goodput to speak of)."""

    async def run() -> tuple[float, int]:
        async with grpc.aio.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
            await asyncio.wait_for(channel.channel_ready(), timeout=30.0)
            send = grpc_sender(generation_pb2_grpc.GenerationStub(channel))
            start = time.perf_counter()
            done = 0
            turn = iter(range(10**9))

            async def client() -> None:
                nonlocal done
                while time.perf_counter() - start < seconds:
                    req = requests[next(turn) % len(requests)]
                    rec = RequestRecord(req.index, 0.0, req.prompt_len, req.output_len)
                    await send(req, rec, lambda: time.perf_counter() - start)
                    if not rec.ok or len(rec.token_times) < req.output_len:
                        raise RuntimeError(f"goodput burst: a request failed ({rec.error or 'short output'})")
                    done += 1

            await asyncio.gather(*(client() for _ in range(concurrency)))
            return done / (time.perf_counter() - start), done

    return asyncio.run(run())


def windows(records: list[RequestRecord], window_s: float, duration_s: float) -> list[dict[str, Any]]:
    """Per window of arrival time: requests, errors and latency percentiles (seconds)."""
    out = []
    for k in range(max(1, math.ceil(duration_s / window_s))):
        lo, hi = k * window_s, (k + 1) * window_s
        recs = [r for r in records if lo <= r.scheduled_s < hi]
        metrics = compute_metrics(recs)
        ok = [m for m in metrics if m.ok]
        out.append(
            {
                "start_s": lo,
                "end_s": min(hi, duration_s),
                "requests": len(recs),
                "errors": len(recs) - len(ok),
                "ttft_s": _pct(m.ttft_s for m in ok),
                "tpot_s": _pct(m.tpot_s for m in ok),
                "e2e_s": _pct(m.e2e_s for m in ok),
            }
        )
    return out


def _pct(values: Any) -> dict[str, float | None]:
    s = stats(v for v in values if v is not None)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items() if k.startswith("p")}


def main(argv: list[str] | None = None) -> None:
    from bench.report import stop_on_sigterm

    stop_on_sigterm()  # stop the clusters it starts on SIGTERM too
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the load runs")
    ap.add_argument("--quick", action="store_true", help="20 s of load in 5 s windows (a test)")
    ap.add_argument(
        "--rate", type=float, default=None, help="requests/s (default: --fraction x measured goodput)"
    )
    ap.add_argument("--fraction", type=float, default=0.8, help="share of the measured goodput to load at")
    ap.add_argument("--concurrency", type=int, default=4, help="closed-loop clients of the goodput burst")
    ap.add_argument("--goodput-s", type=float, default=15.0, help="length of the goodput burst (s)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--window-s", type=float, default=60.0, help="latency and error windows (s)")
    ap.add_argument("--warmup-s", type=float, default=None, help="RSS warm-up (default: the first window)")
    ap.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling period (s)")
    ap.add_argument("--timeout", type=float, default=60.0, help="each request's timeout (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="", help="a line about the host recorded in the JSON")
    ap.add_argument("--json", default=None, help="write the JSON here instead of stdout")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.quick:
        a.minutes, a.window_s, a.sample_s, a.goodput_s = 20 / 60, 5.0, 1.0, 5.0
    duration_s = a.minutes * 60
    warmup_s = a.window_s if a.warmup_s is None else a.warmup_s
    if a.model is None:
        from engine.synth import default_model_dir

        a.model = str(default_model_dir())
    vocab = ModelConfig.from_hf_dir(a.model).vocab_size
    source = np.random.default_rng(a.seed).integers(3, vocab, size=1 << 14)
    shape = {"prompt": Fixed(a.prompt_len), "output": Fixed(a.output_len), "seed": a.seed}
    load_before = os.getloadavg()
    cfg = ClusterConfig(
        model_dir=a.model,
        port=0,
        use_cuda=False,
        num_kv_blocks=1024,
        log_dir=tempfile.mkdtemp(prefix="pdserve-soak-"),
    )
    with LocalCluster(cfg) as cluster:
        goodput = None
        rate = a.rate
        if rate is None:
            burst = make_requests(Workload("soak-goodput", 256, 1.0, **shape), source)
            goodput, _ = measure_goodput(cluster.gateway_address, burst, a.concurrency, a.goodput_s)
            rate = a.fraction * goodput
        n = max(1, round(rate * duration_s))
        # Poisson arrivals at `rate` for `duration_s`: n drawn, those past the end dropped
        requests = make_requests(Workload("soak", n + 1 + 3 * math.isqrt(n), rate, **shape), source)
        requests = [r for r in requests if r.scheduled_s < duration_s]
        processes = {f"{c.role}-{i}": c.proc.pid for i, c in enumerate(cluster.children)}
        if cluster.redis is not None:
            processes["redis"] = cluster.redis.pid
        with RssSampler(processes, a.sample_s) as sampler:
            records = asyncio.run(
                run_load(cluster.gateway_address, requests, request_timeout_s=a.timeout, drain_s=a.timeout)
            )
        exited = sorted(
            sampler.exited
            | {f"{c.role}-{i}" for i, c in enumerate(cluster.children) if c.proc.poll() is not None}
        )
    metrics = compute_metrics(records)
    errors = Counter((m.error or "").split(":")[0] for m in metrics if not m.ok)
    report = {
        "bench": "soak",
        "model": os.path.basename(a.model.rstrip("/")),
        "cluster": "1P1D, CPU",
        "workload": {"prompt_tokens": a.prompt_len, "output_tokens": a.output_len, "arrival": "poisson"},
        "goodput_rps": None if goodput is None else round(goodput, 3),
        "goodput_method": None
        if goodput is None
        else f"closed loop, {a.concurrency} clients, {a.goodput_s:g} s: completed requests/s",
        "fraction": None if a.rate is not None else a.fraction,
        "rate_rps": round(rate, 3),
        "minutes": round(a.minutes, 3),
        "requests": len(records),
        "errors": sum(errors.values()),
        "error_rate": round(sum(errors.values()) / len(records), 5),
        "errors_by_kind": dict(errors),
        "processes_exited": exited,
        "latency_s": {
            "ttft": _pct(m.ttft_s for m in metrics if m.ok),
            "tpot": _pct(m.tpot_s for m in metrics if m.ok),
            "e2e": _pct(m.e2e_s for m in metrics if m.ok),
        },
        "windows": windows(records, a.window_s, duration_s),
        "warmup_s": warmup_s,
        "rss_growth_pct": {name: growth_pct(s, warmup_s) for name, s in sampler.samples.items()},
        "rss_kib": {name: s for name, s in sampler.samples.items()},
        "host": {
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "note": a.note,
        },
    }
    emit(report, a.json)  # + `machine`: CPU, cores, torch, git commit


if __name__ == "__main__":
    main()
