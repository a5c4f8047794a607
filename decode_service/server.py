"""gRPC `pdserve.v1.Decode` servicer and the decode instance's process entry."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket

import grpc

from coordinator.registry import InstanceInfo
from decode_service.engine import DecodeEngine, DecodeJob, Tokens
from engine.runner import ModelRunner
from kv_transfer.client import KVPuller
from kv_transfer.codec.cachegen_tables import install_model
from kv_transfer.transport import available_transports
from pdserve import telemetry
from pdserve.errors import ModelMismatch, PDServeError
from pdserve.instance import InstanceConfig, add_instance_args, config_from_args, device_label, serve
from pdserve.rpc import params_from_proto, stream_errors, unary_errors
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc

log = logging.getLogger(__name__)


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, cfg: InstanceConfig, engine: DecodeEngine, runner: ModelRunner) -> None:
        self.cfg = cfg
        self.engine = engine
        self.runner = runner

    @stream_errors
    @telemetry.server_stream(telemetry.DECODE_REQUEST)
    async def Decode(
        self, request: decode_pb2.DecodeRequest, context: grpc.aio.ServicerContext, span: telemetry.Span
    ):
        span.set_attributes(
            {
                "pdserve.request_id": request.request_id,
                "pdserve.prompt_tokens": len(request.prompt_token_ids),
                "pdserve.max_tokens": request.sampling.max_tokens,
                "pdserve.kv.transfer_id": request.kv.transfer_id,
                "pdserve.instance.id": self.cfg.instance_id,
            }
        )
        if request.kv.model_fingerprint and request.kv.model_fingerprint != self.runner.fingerprint:
            raise ModelMismatch("KV handle comes from a different model than this decode instance serves")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = DecodeJob(
            request_id=request.request_id,
            prompt_ids=list(request.prompt_token_ids),
            params=params_from_proto(request.sampling),
            kv_address=request.kv.address,
            transfer_id=request.kv.transfer_id,
            codec=request.kv.codec or self.cfg.codec,
            first_token_id=request.first_token_id if request.HasField("first_token_id") else None,
            emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
            trace=telemetry.parent_of(span),
        )
        self.engine.submit(job)
        finished = False
        try:
            while True:
                ev = await events.get()
                if isinstance(ev, PDServeError):
                    finished = True
                    raise ev
                assert isinstance(ev, Tokens)
                yield decode_pb2.DecodeEvent(
                    token_ids=ev.token_ids,
                    finish_reason=ev.finish_reason or "",
                    admission_wait_s=ev.admission_wait_s,
                    transfer_s=ev.transfer_s,
                )
                if ev.finish_reason:
                    finished = True
                    return
        finally:
            if not finished:  # client cancelled or its deadline passed: free the blocks now
                self.engine.cancel(job)

    @unary_errors
    async def Stats(self, request: common_pb2.InstanceStatsRequest, context: grpc.aio.ServicerContext):
        s = self.engine.stats()
        bm = self.engine.block_manager
        try:
            self.engine.check_integrity()
            ok = True
        except AssertionError:
            ok = False
        return common_pb2.InstanceStats(
            instance_id=self.cfg.instance_id,
            role=self.cfg.role,
            queue_len=s["queue_len"],
            running=s["running"],
            kv_blocks_total=bm.num_blocks,
            kv_blocks_free=bm.num_free,
            integrity_ok=ok,
        )


async def run(cfg: InstanceConfig) -> None:
    runner = ModelRunner(
        cfg.model_dir, cfg.device, num_kv_blocks=cfg.num_kv_blocks, block_size=cfg.block_size
    )
    install_model(cfg.model_dir)  # codecs learn the model's depth and its shipped cachegen tables
    puller = KVPuller(fingerprint=runner.fingerprint, timeout_s=cfg.pull_timeout_s)
    engine = DecodeEngine(runner, puller, cfg.max_running, cfg.max_queue)
    engine.start()
    servicer = DecodeServicer(cfg, engine, runner)

    def gauges() -> dict[str, int]:
        bm = engine.block_manager
        return {
            **engine.stats(),
            "kv_blocks_free": bm.num_free,
            "kv_blocks_used": bm.num_blocks - bm.num_free,
        }

    telemetry.instruments().observe_instance("decode", cfg.instance_id, gauges)

    def info(address: str) -> InstanceInfo:
        s = engine.stats()
        return InstanceInfo(
            instance_id=cfg.instance_id,
            role="decode",
            grpc_address=address,
            transports=tuple(available_transports()),
            node=socket.gethostname(),
            devices=device_label(cfg.device),
            model_fingerprint=runner.fingerprint,
            max_model_len=runner.config.max_position_embeddings,
            kv_blocks_total=engine.block_manager.num_blocks,
            block_size=engine.block_manager.block_size,
            queue_len=s["queue_len"],
            running=s["running"],
            kv_blocks_free=engine.block_manager.num_free,
            links=dict(engine.links),
        )

    await serve(
        cfg, lambda srv: decode_pb2_grpc.add_DecodeServicer_to_server(servicer, srv), info, engine.stop
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m decode_service", description="pdserve decode instance")
    add_instance_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s decode %(name)s: %(message)s")
    cfg = config_from_args("decode", args)
    telemetry.setup("decode", cfg.instance_id)
    try:
        asyncio.run(run(cfg))
    finally:
        telemetry.shutdown()
