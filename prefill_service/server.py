"""gRPC `pdserve.v1.Prefill` servicer and the prefill instance's process entry."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket

import grpc

from coordinator.registry import InstanceInfo
from engine.runner import ModelRunner
from kv_transfer.codec.cachegen_tables import install_model
from kv_transfer.server import KVServer
from kv_transfer.transport import available_transports, default_scheme, transport_for
from pdserve import telemetry
from pdserve.errors import PDServeError
from pdserve.instance import InstanceConfig, add_instance_args, config_from_args, device_label, serve
from pdserve.rpc import params_from_proto, stream_errors, unary_errors
from pdserve.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc
from prefill_service.engine import Done, PrefillEngine, PrefillJob, Scheduled

log = logging.getLogger(__name__)


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(
        self, cfg: InstanceConfig, engine: PrefillEngine, runner: ModelRunner, kv_address: str
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.runner = runner
        self.kv_address = kv_address

    def _handle(self, transfer_id: str, num_tokens: int, codec: str) -> common_pb2.KVHandle:
        return common_pb2.KVHandle(
            transfer_id=transfer_id,
            address=self.kv_address,
            codec=codec or self.cfg.codec,
            num_layers=self.runner.config.num_layers,
            num_tokens=num_tokens,
            model_fingerprint=self.runner.fingerprint,
        )

    @stream_errors
    @telemetry.server_stream(telemetry.PREFILL_REQUEST)
    async def Prefill(
        self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext, span: telemetry.Span
    ):
        span.set_attributes(
            {
                "pdserve.request_id": request.request_id,
                "pdserve.prompt_tokens": len(request.prompt_token_ids),
                "pdserve.instance.id": self.cfg.instance_id,
            }
        )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = PrefillJob(
            request_id=request.request_id,
            prompt_ids=list(request.prompt_token_ids),
            params=params_from_proto(request.sampling),
            emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
            trace=telemetry.parent_of(span),
        )
        self.engine.submit(job)
        finished = False
        try:
            while True:
                ev = await events.get()
                if isinstance(ev, PDServeError):
                    raise ev
                if isinstance(ev, Scheduled):
                    yield prefill_pb2.PrefillEvent(
                        scheduled=self._handle(ev.transfer_id, ev.num_tokens, request.codec)
                    )
                elif isinstance(ev, Done):
                    finished = True
                    done = prefill_pb2.PrefillDone(
                        first_token_id=ev.first_token_id,
                        kv=self._handle(ev.transfer_id, ev.num_tokens, request.codec),
                        queue_s=ev.queue_s,
                        compute_s=ev.compute_s,
                    )
                    yield prefill_pb2.PrefillEvent(done=done)
                    return
        finally:
            if not finished:  # client went away (cancel / deadline) before the KV was complete
                self.engine.cancel(job)

    @unary_errors
    async def Release(self, request: prefill_pb2.ReleaseRequest, context: grpc.aio.ServicerContext):
        return prefill_pb2.ReleaseResponse(released=self.engine.release(request.transfer_id))

    @unary_errors
    async def Stats(self, request: common_pb2.InstanceStatsRequest, context: grpc.aio.ServicerContext):
        return stats_proto(self.cfg, self.engine)


def stats_proto(cfg: InstanceConfig, engine: PrefillEngine) -> common_pb2.InstanceStats:
    s = engine.stats()
    bm = engine.block_manager
    try:
        engine.check_integrity()
        ok = True
    except AssertionError:
        ok = False
    return common_pb2.InstanceStats(
        instance_id=cfg.instance_id,
        role=cfg.role,
        queue_len=s["queue_len"],
        running=0,
        kv_blocks_total=bm.num_blocks,
        kv_blocks_free=bm.num_free,
        leases=s["leases"],
        integrity_ok=ok,
    )


async def run(cfg: InstanceConfig) -> None:
    runner = ModelRunner(
        cfg.model_dir, cfg.device, num_kv_blocks=cfg.num_kv_blocks, block_size=cfg.block_size
    )
    install_model(cfg.model_dir)  # codecs learn the model's depth and its shipped cachegen tables
    transport = transport_for(default_scheme() if cfg.transport == "auto" else cfg.transport)
    kv_server = KVServer(transport, cfg.host, fingerprint=runner.fingerprint, lease_ttl_s=cfg.lease_ttl_s)
    kv_server.start()
    engine = PrefillEngine(runner, kv_server, cfg.max_batch_tokens, cfg.max_queue)
    engine.start()
    servicer = PrefillServicer(cfg, engine, runner, kv_server.address)

    def info(address: str) -> InstanceInfo:
        s = engine.stats()
        return InstanceInfo(
            instance_id=cfg.instance_id,
            role="prefill",
            grpc_address=address,
            kv_address=kv_server.address,
            transports=tuple(available_transports()),
            node=socket.gethostname(),
            devices=device_label(cfg.device),
            model_fingerprint=runner.fingerprint,
            max_model_len=runner.config.max_position_embeddings,
            kv_blocks_total=engine.block_manager.num_blocks,
            block_size=engine.block_manager.block_size,
            queue_len=s["queue_len"],
            kv_blocks_free=engine.block_manager.num_free,
            leases=s["leases"],
        )

    def stop() -> None:
        engine.stop()
        kv_server.stop()

    def gauges() -> dict[str, int]:
        bm = engine.block_manager
        return {
            **engine.stats(),
            "kv_blocks_free": bm.num_free,
            "kv_blocks_used": bm.num_blocks - bm.num_free,
        }

    telemetry.instruments().observe_instance("prefill", cfg.instance_id, gauges)

    await serve(cfg, lambda srv: prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, srv), info, stop)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m prefill_service", description="pdserve prefill instance")
    add_instance_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s prefill %(name)s: %(message)s")
    cfg = config_from_args("prefill", args)
    telemetry.setup("prefill", cfg.instance_id)
    try:
        asyncio.run(run(cfg))
    finally:
        telemetry.shutdown()
