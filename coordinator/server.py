"""The coordinator process: gateway + router + health + reflection on one gRPC port, and (with --http-port)
the OpenAI-compatible HTTP API on its own port, in the same event loop over the same Gateway."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from pathlib import Path
from typing import Any

import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator.auth import ApiKeys, AuthInterceptor, load_api_keys
from coordinator.config import LAYERWISE_POLICIES, LOCAL_PREFILL_POLICIES, CoordinatorConfig
from coordinator.gateway import Gateway
from coordinator.planner.plan import kv_links_of
from coordinator.registry import Registry
from coordinator.replanner import Replanner
from coordinator.router import Router
from engine.checkpoint import model_fingerprint
from engine.config import ModelConfig
from engine.device import parse_cpus, pin_process
from engine.model_dir import ModelNotFoundError, resolve_model_dir
from engine.tokenizer import Tokenizer
from pdserve import telemetry
from pdserve.rpc import LIVENESS, new_server
from pdserve.tls import TLSConfigError, TLSFiles, add_port, add_tls_args, https_files
from pdserve.v1 import generation_pb2, generation_pb2_grpc

log = logging.getLogger(__name__)

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


def _serving(router: Router, cfg: CoordinatorConfig) -> bool:
    """At least the expected number of prefill and decode (or, in colocated mode, colocated) instances are
    registered."""
    if cfg.colocated:
        return router.count("colocated") >= cfg.expect_colocated
    return router.count("prefill") >= cfg.expect_prefill and router.count("decode") >= cfg.expect_decode


async def _watch_health(router: Router, cfg: CoordinatorConfig, servicer: health.aio.HealthServicer) -> None:
    """SERVING while `_serving`."""
    last = None
    while True:
        ok = _serving(router, cfg)
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        if status != last:
            for name in ("", GENERATION_SERVICE):
                await servicer.set(name, status)
            log.info(
                "health %s (prefill %d/%d, decode %d/%d, colocated %d/%d)",
                health_pb2.HealthCheckResponse.ServingStatus.Name(status),
                router.count("prefill"),
                cfg.expect_prefill,
                router.count("decode"),
                cfg.expect_decode,
                router.count("colocated"),
                cfg.expect_colocated if cfg.colocated else 0,
            )
            last = status
        await asyncio.sleep(cfg.refresh_s)


def _replanner(
    cfg: CoordinatorConfig, plan: dict[str, Any] | None, router: Router, registry: Registry
) -> Replanner | None:
    """The replanner of `plan` (None: no plan, replanning off, or a plan without its search inputs)."""
    if plan is None or cfg.replan_interval_s <= 0:
        return None
    try:
        return Replanner(
            plan,
            router,
            registry,
            cfg.replan_interval_s,
            cfg.replan_window_s,
            cfg.replan_min_requests,
            cfg.autoplan,
        )
    except ValueError as exc:
        log.warning("not replanning: %s", exc)
        return None


def _instance_id(cfg: CoordinatorConfig, port: int) -> str:
    """The gateway's identity in metrics and traces: the address clients reach it at."""
    return f"coordinator-{cfg.advertise_host or cfg.host}:{port}"


async def run(cfg: CoordinatorConfig, plan: dict[str, Any] | None = None) -> None:
    model = ModelConfig.from_hf_dir(cfg.model_dir)
    tokenizer = Tokenizer(cfg.model_dir)
    try:
        registry = Registry(cfg.redis_url, cfg.cluster, tls=cfg.tls)
        router = Router(
            registry,
            model_fingerprint(cfg.model_dir),
            cfg.refresh_s,
            cfg.suspect_s,
            tls=cfg.tls,
            kv_links=cfg.kv_links,
        )
        await router.start()
    except (redis.RedisError, TLSConfigError) as exc:  # e.g. the registry refused our certificate
        raise SystemExit(f"coordinator: cannot read the registry {cfg.redis_url}: {exc}") from None

    keys = ApiKeys(cfg.api_keys)
    # the key guards Generation only: health (probes) and reflection (the public schema) stay open
    interceptors = [AuthInterceptor(keys, [GENERATION_SERVICE])] if keys.enabled else []
    server = new_server(interceptors)
    gateway = Gateway(cfg, router, tokenizer, model)
    replanner = _replanner(cfg, plan, router, registry)
    if replanner is not None:
        gateway.on_finished = replanner.record
        replanner.start()
    generation_pb2_grpc.add_GenerationServicer_to_server(gateway, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)  # "" waits for instances
    services = (GENERATION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(services, server)
    port = add_port(server, f"{cfg.host}:{cfg.port}", cfg.tls, client_auth=False)  # clients: API keys
    if port == 0:
        raise RuntimeError(f"cannot bind the gateway on {cfg.host}:{cfg.port} (port in use?)")
    await server.start()
    telemetry.instruments().observe_instance(
        "coordinator", _instance_id(cfg, port), lambda: {"inflight": gateway.inflight}
    )
    watcher = asyncio.create_task(_watch_health(router, cfg, health_servicer))
    print(f"GATEWAY {cfg.host}:{port}", flush=True)
    log.info(
        "gateway on %s:%d (%s), registry %s cluster %s%s",
        cfg.host,
        port,
        "TLS" if cfg.tls.enabled else "plaintext",
        cfg.redis_url,
        cfg.cluster,
        ", mutual TLS inside the cluster" if cfg.tls.mutual else "",
    )
    http = None
    if cfg.http_port is not None:
        from coordinator.http_api import HttpServer, create_app

        app = create_app(gateway, keys, lambda: _serving(router, cfg))
        http = HttpServer(app, cfg.host, cfg.http_port, https_files(cfg.tls))
        http_port = http.start()
        print(f"HTTP {cfg.host}:{http_port}", flush=True)
        scheme = "https" if cfg.tls.enabled else "http"
        log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", scheme, cfg.host, http_port)
    if keys.enabled:
        log.info("API keys: %d configured; Generation and /v1/ require one", len(cfg.api_keys))
    else:
        log.warning("no API key configured: the gateway serves every client (unauthenticated)")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    watcher.cancel()
    if http is not None:
        await http.stop()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=2.0)
    gateway.close()
    if replanner is not None:
        await replanner.stop()
    await router.stop()
    registry.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m coordinator", description="pdserve coordinator (gateway + router)"
    )
    p.add_argument("--model", default="", help="model directory (HF format; default: the shipped model)")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--cluster", default="default")
    p.add_argument("--host", default="127.0.0.1", help="listen host of the gateway (gRPC and HTTP)")
    p.add_argument(
        "--advertise-host",
        default="",
        help="host clients reach the gateway at, its identity in metrics and traces (default: --host)",
    )
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--expect-prefill", type=int, default=1)
    p.add_argument("--expect-decode", type=int, default=1)
    p.add_argument("--codec", default="auto", help="KV codec name, or auto (per link)")
    p.add_argument("--max-kl", type=float, default=0.01, help="quality floor for --codec auto (nats/token)")
    p.add_argument("--max-inflight", type=int, default=4096)
    p.add_argument(
        "--max-queue",
        type=int,
        default=0,
        help="requests waiting for their first token beyond which a new one gets RESOURCE_EXHAUSTED at once "
        "(default 0: no limit but --max-inflight)",
    )
    p.add_argument(
        "--kv-budget",
        type=float,
        default=0.0,
        help="KV budget as a multiple of the registered decode instances' KV capacity: a new request whose "
        "prompt + max_tokens would take the gateway's reserved KV tokens past it gets RESOURCE_EXHAUSTED at "
        "once (default 0: off)",
    )
    p.add_argument(
        "--max-failovers",
        type=int,
        default=5,
        help="calls of one request that may fail (an instance died) and be retried elsewhere (default 5)",
    )
    p.add_argument(
        "--failover-wait",
        type=float,
        default=10.0,
        help="seconds a request waits for an instance of a role to (re)appear in the registry (default 10)",
    )
    p.add_argument(
        "--colocated",
        action="store_true",
        help="baseline mode: proxy every request to a colocated instance (no prefill/decode split)",
    )
    p.add_argument("--expect-colocated", type=int, default=1)
    p.add_argument(
        "--cpus",
        default="",
        help="pin this process to these cores, e.g. '0' or '0-3' (default: not pinned)",
    )
    p.add_argument(
        "--token-stream",
        choices=("on", "off"),
        default="on",
        help="decode tokens on one stream per decode instance, each step's tokens of all requests in one "
        "message (on), or one message per token on each request's own call (off)",
    )
    p.add_argument(
        "--layerwise",
        choices=LAYERWISE_POLICIES,
        default="auto",
        help="layer-wise KV streaming (decode pulls while prefill computes): auto (only from CUDA prefill "
        "instances), on, off (pull after prefill finished)",
    )
    p.add_argument(
        "--local-prefill",
        choices=LOCAL_PREFILL_POLICIES,
        default="busy",
        help="conditional disaggregation: prefill short prompts on the decode instance: off, busy (when "
        "every prefill instance is busy; the default), always",
    )
    p.add_argument(
        "--local-prefill-max-tokens",
        type=int,
        default=128,
        help="longest prompt --local-prefill may prefill on a decode instance (default 128)",
    )
    p.add_argument(
        "--local-prefill-depth",
        type=int,
        default=2,
        help="--local-prefill busy: requests in flight on every prefill instance before a prompt goes local",
    )
    add_tls_args(p)
    p.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="serve the OpenAI-compatible HTTP API on this port (0 = a free one; default: no HTTP server)",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="a key clients must send (authorization: Bearer KEY); repeatable. Also --api-key-file and the "
        "PDSERVE_API_KEY variable. None at all: the gateway is open",
    )
    p.add_argument("--api-key-file", default=None, help="a file of API keys, one per line ('#' comments)")
    p.add_argument(
        "--plan",
        default=None,
        help="a `pdserve plan` JSON: route each prefill instance's KV to the decode instances its kv_links "
        "name, with their codecs (instance ids as the plan names them: pdserve up --plan starts them so)",
    )
    p.add_argument(
        "--replan-interval",
        type=float,
        default=10.0,
        help="with --plan: re-run the search on the live window every this many seconds (0 = never)",
    )
    p.add_argument(
        "--replan-window", type=float, default=60.0, help="seconds of finished requests replanned on"
    )
    p.add_argument(
        "--autoplan",
        action="store_true",
        help="take each recommended plan as the one in force (route by its kv_links); pdserve up --autoplan "
        "starts and stops the instances",
    )
    a = p.parse_args(argv)
    try:
        api_keys = load_api_keys(a.api_key, a.api_key_file)
    except (OSError, ValueError) as exc:
        p.error(str(exc))
    try:
        plan = json.loads(Path(a.plan).read_text()) if a.plan else None
        kv_links = kv_links_of(plan) if plan is not None else ()
    except (OSError, ValueError) as exc:
        p.error(f"--plan {a.plan}: {exc}")
    if a.autoplan and plan is None:
        p.error("--autoplan needs --plan (the plan in force, with its search inputs)")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s coordinator %(name)s: %(message)s"
    )
    pin_process(parse_cpus(a.cpus))  # before gRPC and telemetry start their threads
    try:
        tls = TLSFiles.from_args(a)
        tls.require_cluster_identity()
        model_dir = resolve_model_dir(a.model)
    except (TLSConfigError, ModelNotFoundError) as exc:
        p.error(str(exc))
    cfg = CoordinatorConfig(
        model_dir=model_dir,
        redis_url=a.redis_url,
        cluster=a.cluster,
        host=a.host,
        advertise_host=a.advertise_host,
        port=a.port,
        expect_prefill=a.expect_prefill,
        expect_decode=a.expect_decode,
        codec=a.codec,
        max_kl=a.max_kl,
        max_inflight=a.max_inflight,
        max_queue=a.max_queue,
        kv_budget=a.kv_budget,
        max_failovers=a.max_failovers,
        failover_wait_s=a.failover_wait,
        layerwise=a.layerwise,
        token_stream=a.token_stream == "on",
        local_prefill=a.local_prefill,
        local_prefill_max_tokens=a.local_prefill_max_tokens,
        local_prefill_depth=a.local_prefill_depth,
        colocated=a.colocated,
        expect_colocated=a.expect_colocated,
        tls=tls,
        http_port=a.http_port,
        api_keys=api_keys,
        kv_links=kv_links,
        replan_interval_s=a.replan_interval,
        replan_window_s=a.replan_window,
        autoplan=a.autoplan,
    )
    telemetry.setup("coordinator", _instance_id(cfg, cfg.port))
    try:
        asyncio.run(run(cfg, plan))
    finally:
        telemetry.shutdown()
