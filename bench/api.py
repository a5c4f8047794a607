"""Front-end overhead: the same open-loop Poisson load through the gateway's gRPC API and its OpenAI-compatible
HTTP API (server-sent events), on one cluster.

Each front end is a way to send a `bench.workload.BenchRequest` and record its tokens as they arrive
(`FRONT_ENDS`: `grpc` = `pdserve.v1.Generation/Generate` over one grpc.aio channel; `http` = streamed
`POST /v1/completions` with the prompt's token ids over one httpx connection pool, tokens counted from the
chunks' `token_ids`). Both ask for the same greedy completions with `ignore_eos`, so the cluster does the
same work; the runs alternate front ends (grpc http, http grpc, ...) so drift cancels. Reported per front
end: TTFT p50 / p90, request and output-token throughput (each the median over rounds), failures; and each
front end's ratios to the first.

`grpc+tls` and `http+tls` are the same two front ends against a second cluster with TLS everywhere
(development certificates from `pdserve.certs`: a TLS gateway, gRPC and HTTPS, and mutual TLS inside, with
a TLS-only Redis); it is started only when one of them is asked for, and idles while the other runs.

    python -m bench.api --quick      # ~1 minute on 2 cores; prints one JSON object
    python -m bench.api --fronts grpc,http,grpc+tls,http+tls      # TLS on vs off too
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np

from bench.metrics import SLO, RequestRecord, summarize_records
from bench.report import emit
from bench.serving import Now, Send, grpc_sender, run_open_loop
from bench.workload import BenchRequest, Uniform, Workload, make_requests
from pdserve.certs import write_dev_certs
from pdserve.launcher import ClusterConfig, LocalCluster
from pdserve.tls import TLSFiles
from pdserve.v1 import generation_pb2_grpc

NO_SLO = SLO(ttft_s=math.inf, tpot_s=math.inf)  # only latencies and throughputs are compared here
_COMPARED = ("ttft_p50_s", "ttft_p90_s", "request_throughput", "output_token_throughput")


@contextlib.asynccontextmanager
async def grpc_front(cluster: LocalCluster) -> AsyncIterator[Send]:
    options = [("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", 16 * 2**20)]
    tls = cluster.cfg.tls
    if tls.enabled:  # the client trusts the cluster's CA and presents no certificate (API clients don't)
        creds = grpc.ssl_channel_credentials(root_certificates=Path(tls.ca).read_bytes())
        channel = grpc.aio.secure_channel(cluster.gateway_address, creds, options=options)
    else:
        channel = grpc.aio.insecure_channel(cluster.gateway_address, options=options)
    async with channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=30.0)
        yield grpc_sender(generation_pb2_grpc.GenerationStub(channel))


def http_sender(client: httpx.AsyncClient) -> Send:
    """Streamed /v1/completions with the prompt's ids, greedy, forcing `output_len` tokens (`ignore_eos`)."""

    async def send(req: BenchRequest, rec: RequestRecord, now: Now) -> None:
        body = {
            "prompt": list(req.prompt_ids),
            "max_tokens": req.output_len,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "return_token_ids": True,
        }
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                rec.fail(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec.fail(f"{chunk['error'].get('type')}: {chunk['error'].get('message')}")
                    return
                n = len(chunk["choices"][0].get("token_ids", ())) if chunk["choices"] else 0
                if n:
                    rec.on_tokens(now(), n)

    return send


@contextlib.asynccontextmanager
async def http_front(cluster: LocalCluster) -> AsyncIterator[Send]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    tls = cluster.cfg.tls
    async with httpx.AsyncClient(
        base_url=f"{'https' if tls.enabled else 'http'}://{cluster.http_address}",
        timeout=httpx.Timeout(120.0),
        limits=limits,
        trust_env=False,
        verify=ssl.create_default_context(cafile=tls.ca) if tls.enabled else True,
    ) as client:
        yield http_sender(client)


FrontEnd = Callable[[LocalCluster], AbstractAsyncContextManager[Send]]
# name -> (how to send, whether it runs against the TLS cluster)
FRONT_ENDS: dict[str, tuple[FrontEnd, bool]] = {
    "grpc": (grpc_front, False),
    "http": (http_front, False),
    "grpc+tls": (grpc_front, True),
    "http+tls": (http_front, True),
}
DEFAULT_FRONTS = ("grpc", "http")


def run_front(
    front: FrontEnd, cluster: LocalCluster, requests: list[BenchRequest], timeout_s: float
) -> list[RequestRecord]:
    async def go() -> list[RequestRecord]:
        async with front(cluster) as send:
            return await run_open_loop(requests, send, request_timeout_s=timeout_s, drain_s=timeout_s)

    return asyncio.run(go())


def _figures(records: list[RequestRecord]) -> dict[str, Any]:
    s = summarize_records(records, NO_SLO)
    return {
        "ttft_p50_s": s["ttft_s"].get("p50"),
        "ttft_p90_s": s["ttft_s"].get("p90"),
        "tpot_p50_s": s["tpot_s"].get("p50"),
        "request_throughput": s["request_throughput"],
        "output_token_throughput": s["output_token_throughput"],
        "n_ok": s["n_ok"],
        "n_failed": s["n_failed"],
        "errors": s["errors"],
    }


def _run_rounds(
    args: argparse.Namespace,
    fronts: list[str],
    clusters: dict[bool, LocalCluster],
    requests: list[BenchRequest],
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    """A warm-up per front end, then `args.rounds` runs of each, alternating the order round by round."""
    warm = [BenchRequest(r.index, 0.1 * i, r.prompt_ids, r.output_len) for i, r in enumerate(requests[:8])]
    for f in fronts:
        front, with_tls = FRONT_ENDS[f]
        run_front(front, clusters[with_tls], warm, args.timeout)
    for i in range(args.rounds):
        for f in fronts if i % 2 == 0 else fronts[::-1]:
            front, with_tls = FRONT_ENDS[f]
            r = _figures(run_front(front, clusters[with_tls], requests, args.timeout))
            runs[f].append(r)
            print(
                f"  round {i} {f}: ttft p50 {r['ttft_p50_s']} req/s {r['request_throughput']} "
                f"failed {r['n_failed']}",
                file=sys.stderr,
            )


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    """The median over rounds: a round hit by another process's burst on a shared host does not drag it."""
    vals = [float(r[key]) for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 rounds of 40 requests per front end (~1 min)")
    p.add_argument("--model", default=None, help="HF model dir (default: the shipped model)")
    p.add_argument(
        "--fronts",
        default=",".join(DEFAULT_FRONTS),
        help=f"front ends to compare, of {', '.join(FRONT_ENDS)}; ratios to the first",
    )
    p.add_argument("--rate", type=float, default=5.0, help="offered requests/s (Poisson)")
    p.add_argument("--requests", type=int, default=None, help="requests per run (default 120, quick 40)")
    p.add_argument(
        "--rounds", type=int, default=None, help="runs per front end, alternating (default 4, quick 2)"
    )
    p.add_argument("--prompt-min", type=int, default=16)
    p.add_argument("--prompt-max", type=int, default=128)
    p.add_argument("--output-min", type=int, default=8)
    p.add_argument("--output-max", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s")
    p.add_argument("--log-dir", default=None, help="cluster processes' logs (default: inherit stderr)")
    p.add_argument("--json", default=None, help="write the JSON here instead of stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    from bench.report import stop_on_sigterm

    stop_on_sigterm()  # stop the clusters it starts on SIGTERM too
    p = _parser()
    args = p.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    args.requests = args.requests or (40 if args.quick else 120)
    args.rounds = args.rounds or (2 if args.quick else 4)
    fronts = [f for f in args.fronts.split(",") if f]
    if not fronts or not set(fronts) <= set(FRONT_ENDS):
        p.error(f"--fronts must name some of {', '.join(FRONT_ENDS)}")

    from engine.config import ModelConfig
    from engine.synth import default_model_dir

    model = str(args.model or default_model_dir())
    vocab = ModelConfig.from_hf_dir(model).vocab_size
    source = np.random.default_rng(args.seed).integers(3, vocab, size=1 << 14)
    workload = Workload(
        name="api-overhead",
        n_requests=args.requests,
        rate=args.rate,
        prompt=Uniform(args.prompt_min, args.prompt_max),
        output=Uniform(args.output_min, args.output_max),
        seed=args.seed,
    )
    requests = make_requests(workload, source)
    t_start = time.monotonic()
    clusters: dict[bool, LocalCluster] = {}
    runs: dict[str, list[dict[str, Any]]] = {f: [] for f in fronts}
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-api-") as tmp:
        try:
            for with_tls in sorted({FRONT_ENDS[f][1] for f in fronts}):
                tls = TLSFiles()
                if with_tls:
                    made = write_dev_certs(Path(tmp) / "certs")
                    tls = TLSFiles(made.cert, made.key, made.ca)
                cfg = ClusterConfig(
                    model_dir=model, port=0, http_port=0, use_cuda=False, log_dir=args.log_dir, tls=tls
                )
                clusters[with_tls] = LocalCluster(cfg).start(timeout_s=180)
            _run_rounds(args, fronts, clusters, requests, runs)
        finally:
            for c in clusters.values():
                c.stop()
    pooled = {f: {k: _median(runs[f], k) for k in (*_COMPARED, "tpot_p50_s")} for f in fronts}
    for f in fronts:
        pooled[f]["n_failed"] = sum(r["n_failed"] for r in runs[f])
    base = fronts[0]
    ratios = {
        f"ratio_{f}_{base}": {k: _ratio(pooled[f][k], pooled[base][k]) for k in _COMPARED} for f in fronts[1:]
    }
    result = {
        "benchmark": "api",
        "quick": args.quick,
        "model": model,
        "cluster": "1P1D",
        "workload": workload.to_dict(),
        "rounds": args.rounds,
        "fronts": fronts,
        **pooled,
        **ratios,
        "runs": runs,
        "wall_s": time.monotonic() - t_start,
    }
    lines = [f"bench api: {args.rounds} rounds x {args.requests} requests at {args.rate}/s (Poisson), 1P1D"]
    for f in fronts:
        q = pooled[f]
        lines.append(
            f"  {f:>5}: TTFT p50 {_ms(q['ttft_p50_s'])} p90 {_ms(q['ttft_p90_s'])}, "
            f"{_num(q['request_throughput'])} req/s, {_num(q['output_token_throughput'])} tok/s, "
            f"{q['n_failed']} failed"
        )
    for name, r in ratios.items():
        lines.append(
            f"  {name}: TTFT p50 x{_num(r['ttft_p50_s'])}, p90 x{_num(r['ttft_p90_s'])}, "
            f"req/s x{_num(r['request_throughput'])}, tok/s x{_num(r['output_token_throughput'])}"
        )
    emit(result, args.json, summary="\n".join(lines))
    return 0


def _ms(v: float | None) -> str:
    return f"{v * 1e3:.1f} ms" if v is not None else "n/a"


def _num(v: float | None) -> str:
    return f"{v:.3f}" if v is not None else "n/a"


if __name__ == "__main__":
    sys.exit(main())
