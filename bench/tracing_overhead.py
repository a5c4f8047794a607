"""Tracing overhead: goodput with OpenTelemetry on vs off, in the same run.

Identical local clusters run side by side on the same cores, one per mode:

- `off`: telemetry off (the default: no exporter);
- `on`: every span and metric exported over OTLP/gRPC to a receiver in this process (a deployment);
- `file`: every span recorded and appended to a JSON-lines file; no metrics, no gRPC exporter. A
  control: the OTLP exporter's own gRPC channel changes the process's gRPC latency by itself (see
  docs/observability.md), so `file` isolates what recording and exporting spans cost.

The same seeded open-loop workload runs against each in alternating rounds (off on file, file on off,
...) so drift cancels. The SLO is `--slo-scale` times the TTFT and TPOT of requests served alone by the
untraced cluster. Reported per mode: SLO attainment, goodput (requests meeting the SLO per second of the
run), throughput, TTFT / TPOT percentiles; and each mode's ratios to `off` (target: goodput ratio
>= 0.95). Without `--quick` the goodput rate is also searched (`bench.goodput.find_goodput`) per mode.

    python -m bench.tracing_overhead --quick      # ~2 minutes on 2 cores; prints one JSON object
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from bench.goodput import derive_slos, find_goodput
from bench.metrics import SLO, summarize_records
from bench.report import emit
from bench.serving import run_load
from bench.workload import BenchRequest, Uniform, Workload, make_requests
from pdserve.launcher import ClusterConfig, LocalCluster
from pdserve.trace_cli import OTLPReceiver

MODES = ("off", "on", "file")
_COMPARED = ("goodput_rps", "request_throughput", "output_token_throughput", "ttft_p50_s", "tpot_p50_s")


@contextlib.contextmanager
def _environ(updates: dict[str, str]) -> Iterator[None]:
    """os.environ with every OTEL_* / PDSERVE_* telemetry variable removed, then `updates` set (the
    launcher passes this process's environment to the cluster's processes)."""
    saved = dict(os.environ)
    for k in list(os.environ):
        if k.startswith("OTEL_") or k in (
            "PDSERVE_TRACE_FILE",
            "PDSERVE_OTEL_CONSOLE",
            "PDSERVE_PROMETHEUS_PORT",
        ):
            del os.environ[k]
    os.environ.update(updates)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _start(model: str, env: dict[str, str], log_dir: str | None) -> LocalCluster:
    cfg = ClusterConfig(model_dir=model, port=0, use_cuda=False, log_dir=log_dir)
    with _environ(env):
        return LocalCluster(cfg).start(timeout_s=180)


def _load(address: str, requests: list[BenchRequest], timeout_s: float) -> list:
    return asyncio.run(run_load(address, requests, request_timeout_s=timeout_s, drain_s=timeout_s))


def _workload(args: argparse.Namespace, rate: float) -> Workload:
    return Workload(
        name="tracing-overhead",
        n_requests=args.requests,
        rate=rate,
        prompt=Uniform(args.prompt_min, args.prompt_max),
        output=Uniform(args.output_min, args.output_max),
        seed=args.seed,
    )


def _isolated(address: str, source: np.ndarray, args: argparse.Namespace) -> tuple[float, float]:
    """Median TTFT and TPOT of requests sent one at a time (the SLO's base)."""
    w = _workload(args, 1.0)
    reqs = make_requests(w, source)[: args.calibration]
    ttft, tpot = [], []
    for r in reqs:
        (rec,) = _load(address, [BenchRequest(0, 0.0, r.prompt_ids, r.output_len)], args.timeout)
        if rec.ok and len(rec.token_times) > 1:
            ttft.append(rec.token_times[0] - rec.scheduled_s)
            tpot.append((rec.token_times[-1] - rec.token_times[0]) / (len(rec.token_times) - 1))
    if not ttft:
        raise RuntimeError("calibration failed: no request completed")
    return statistics.median(ttft), statistics.median(tpot)


def _run(cluster: LocalCluster, requests: list[BenchRequest], slo: SLO, timeout_s: float) -> dict[str, Any]:
    records = _load(cluster.gateway_address, requests, timeout_s)
    s = summarize_records(records, slo)
    met = round(s["attainment"] * s["n_requests"])
    s["goodput_rps"] = met / s["duration_s"] if s["duration_s"] else 0.0
    return s


def _pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over rounds of the figures compared on/off."""

    def mean(path: tuple[str, ...]) -> float | None:
        vals = []
        for r in runs:
            v: Any = r
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            if v is not None:
                vals.append(float(v))
        return sum(vals) / len(vals) if vals else None

    return {
        "goodput_rps": mean(("goodput_rps",)),
        "attainment": mean(("attainment",)),
        "request_throughput": mean(("request_throughput",)),
        "output_token_throughput": mean(("output_token_throughput",)),
        "ttft_p50_s": mean(("ttft_s", "p50")),
        "ttft_p90_s": mean(("ttft_s", "p90")),
        "tpot_p50_s": mean(("tpot_s", "p50")),
        "tpot_p90_s": mean(("tpot_s", "p90")),
        "n_failed": sum(r["n_failed"] for r in runs),
    }


def _ratio(on: float | None, off: float | None) -> float | None:
    return on / off if on is not None and off else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.tracing_overhead", description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="2 rounds per mode of 60 requests, no search (~2 min)"
    )
    p.add_argument("--model", default=None, help="HF model dir (default: the shipped model)")
    p.add_argument("--rate", type=float, default=12.0, help="offered requests/s")
    p.add_argument("--requests", type=int, default=None, help="requests per run (default 200, quick 60)")
    p.add_argument("--rounds", type=int, default=None, help="runs per mode, alternating (default 4, quick 2)")
    p.add_argument("--modes", default=",".join(MODES), help="modes to run; the first must be off")
    p.add_argument("--prompt-min", type=int, default=16)
    p.add_argument("--prompt-max", type=int, default=128)
    p.add_argument("--output-min", type=int, default=8)
    p.add_argument("--output-max", type=int, default=32)
    p.add_argument("--slo-scale", type=float, default=5.0, help="SLO = this x the isolated TTFT and TPOT")
    p.add_argument("--calibration", type=int, default=8, help="isolated requests for the SLO base")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s")
    p.add_argument("--log-dir", default=None, help="cluster processes' logs (default: inherit stderr)")
    p.add_argument("--json", default=None, help="write the JSON here instead of stdout")
    return p


def _rounds(
    clusters: dict[str, LocalCluster], requests: list[BenchRequest], slo: SLO, args: argparse.Namespace
) -> dict[str, list[dict[str, Any]]]:
    modes = list(clusters)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for i in range(args.rounds):
        for mode in modes if i % 2 == 0 else modes[::-1]:  # off on file | file on off: drift cancels
            r = _run(clusters[mode], requests, slo, args.timeout)
            runs[mode].append(r)
            print(
                f"  round {i} {mode}: goodput {r['goodput_rps']:.2f}/s attainment {r['attainment']:.3f} "
                f"ttft p50 {r['ttft_s']['p50']}",
                file=sys.stderr,
            )
    return runs


def _search(
    clusters: dict[str, LocalCluster], source: np.ndarray, slo: SLO, args: argparse.Namespace
) -> dict[str, Any]:
    def attainment(mode: str, rate: float) -> float:
        return _run(clusters[mode], make_requests(_workload(args, rate), source), slo, args.timeout)[
            "attainment"
        ]

    return {
        mode: find_goodput(
            # mypy#15459: mypy cannot type a lambda whose default binds a loop variable
            lambda rate, mode=mode: attainment(mode, rate),  # type: ignore[misc]
            start_rate=args.rate,
            target=0.9,
            rel_tol=0.1,
            max_probes=8,
        ).to_dict()
        for mode in clusters
    }


def main(argv: list[str] | None = None) -> int:
    from bench.report import stop_on_sigterm

    stop_on_sigterm()  # stop the clusters it starts on SIGTERM too
    p = _parser()
    args = p.parse_args(argv)
    args.requests = args.requests or (60 if args.quick else 200)
    args.rounds = args.rounds or (2 if args.quick else 4)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or modes[0] != "off" or not set(modes) <= set(MODES):
        p.error(f"--modes must start with off and name only {', '.join(MODES)}")

    from engine.config import ModelConfig
    from engine.synth import default_model_dir

    model = args.model or default_model_dir()
    vocab = ModelConfig.from_hf_dir(model).vocab_size
    source = np.random.default_rng(args.seed).integers(3, vocab, size=1 << 14)
    t_start = time.monotonic()
    receiver = OTLPReceiver(keep_spans=False)
    fd, span_file = tempfile.mkstemp(prefix="pdserve-spans-", suffix=".jsonl")
    os.close(fd)
    envs = {
        "off": {},
        "on": {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_METRIC_EXPORT_INTERVAL": "5000",
        },
        "file": {"PDSERVE_TRACE_FILE": span_file},
    }
    clusters: dict[str, LocalCluster] = {}
    try:
        for mode in modes:
            clusters[mode] = _start(model, envs[mode], args.log_dir)
        warm = make_requests(
            dataclasses.replace(_workload(args, 4.0), n_requests=8, seed=args.seed + 1), source
        )
        for c in clusters.values():
            _load(c.gateway_address, warm, args.timeout)
        ttft0, tpot0 = _isolated(clusters["off"].gateway_address, source, args)
        slo = SLO(*derive_slos(ttft0, tpot0, args.slo_scale))
        print(
            f"tracing_overhead: SLO ttft {slo.ttft_s * 1e3:.1f} ms tpot {slo.tpot_s * 1e3:.1f} ms; "
            f"{args.rounds} rounds x {args.requests} requests at {args.rate}/s per mode",
            file=sys.stderr,
        )
        runs = _rounds(clusters, make_requests(_workload(args, args.rate), source), slo, args)
        time.sleep(6.0)  # the traced clusters' batch span processors flush (OTEL_BSP_SCHEDULE_DELAY 5 s)
        spans = receiver.span_count  # warm-up included: the on-cluster saw len(warm) more requests
        pooled = {m: _pooled(runs[m]) for m in modes}
        ratios = {
            f"ratio_{m}_off": {k: _ratio(pooled[m][k], pooled["off"][k]) for k in _COMPARED}
            for m in modes[1:]
        }
        result: dict[str, Any] = {
            "benchmark": "tracing_overhead",
            "quick": args.quick,
            "model": model,
            "workload": _workload(args, args.rate).to_dict(),
            "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "scale": args.slo_scale},
            "isolated": {"ttft_s": ttft0, "tpot_s": tpot0},
            "rounds": args.rounds,
            "modes": modes,
            **pooled,
            **ratios,
            "target_goodput_ratio": 0.95,
            "meets_target": all((r["goodput_rps"] or 0.0) >= 0.95 for r in ratios.values()),
            "otlp_spans_exported": spans,
            "otlp_spans_per_request": spans / (len(warm) + args.rounds * args.requests)
            if "on" in modes
            else None,
            "runs": runs,
        }
        if not args.quick:
            search = result["goodput_search"] = _search(clusters, source, slo, args)
            for m in modes[1:]:
                result[f"ratio_{m}_off"]["goodput_rate"] = _ratio(search[m]["rate"], search["off"]["rate"])
        result["wall_s"] = time.monotonic() - t_start
    finally:
        for c in clusters.values():
            c.stop()
        receiver.stop()
        os.unlink(span_file)
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
