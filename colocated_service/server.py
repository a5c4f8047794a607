"""gRPC `pdserve.v1.Generation` (served by the instance itself) + `Colocated.Stats`, and the process entry."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import time
import uuid

import grpc

from colocated_service.engine import ColocatedEngine, ColocatedJob, Tokens
from coordinator.gateway import sampling_from_request
from coordinator.registry import InstanceInfo
from engine.runner import ModelRunner
from pdserve.errors import InvalidRequest, PDServeError
from pdserve.instance import InstanceConfig, add_instance_args, config_from_args, device_label, serve
from pdserve.rpc import stream_errors, unary_errors
from pdserve.v1 import (
    colocated_pb2_grpc,
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
)

log = logging.getLogger(__name__)


class ColocatedServicer(generation_pb2_grpc.GenerationServicer, colocated_pb2_grpc.ColocatedServicer):
    def __init__(self, cfg: InstanceConfig, engine: ColocatedEngine, runner: ModelRunner) -> None:
        self.cfg = cfg
        self.engine = engine
        self.runner = runner

    def _prompt_ids(self, req: generation_pb2.GenerateRequest) -> list[int]:
        if req.prompt and req.prompt_token_ids:
            raise InvalidRequest("give either prompt or prompt_token_ids, not both")
        ids = list(req.prompt_token_ids) if req.prompt_token_ids else self.runner.tokenizer.encode(req.prompt)
        if not ids:
            raise InvalidRequest("prompt is empty")
        return ids

    @stream_errors
    async def Generate(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        received = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = ColocatedJob(
            request_id=request_id,
            prompt_ids=self._prompt_ids(request),
            params=sampling_from_request(request),
            emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
        )
        self.engine.submit(job)
        finished = False
        ttft = 0.0
        completion = 0
        try:
            while True:
                ev = await events.get()
                if isinstance(ev, PDServeError):
                    finished = True
                    raise ev
                assert isinstance(ev, Tokens)
                if completion == 0:
                    ttft = time.monotonic() - received
                completion += len(ev.token_ids)
                yield generation_pb2.GenerateResponse(
                    request_id=request_id, token_ids=ev.token_ids, text=ev.text
                )
                if ev.finish_reason:
                    finished = True
                    usage = common_pb2.Usage(
                        prompt_tokens=len(job.prompt_ids), completion_tokens=completion, ttft_s=ttft
                    )
                    yield generation_pb2.GenerateResponse(
                        request_id=request_id, finish_reason=ev.finish_reason, usage=usage
                    )
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


async def run(cfg: InstanceConfig, chunk_tokens: int | None) -> None:
    runner = ModelRunner(
        cfg.model_dir, cfg.device, num_kv_blocks=cfg.num_kv_blocks, block_size=cfg.block_size
    )
    engine = ColocatedEngine(runner, cfg.max_running, cfg.max_queue, cfg.max_batch_tokens, chunk_tokens)
    engine.start()
    servicer = ColocatedServicer(cfg, engine, runner)

    def add(server: grpc.aio.Server) -> None:
        generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
        colocated_pb2_grpc.add_ColocatedServicer_to_server(servicer, server)

    def info(address: str) -> InstanceInfo:
        s = engine.stats()
        return InstanceInfo(
            instance_id=cfg.instance_id,
            role="colocated",
            grpc_address=address,
            node=socket.gethostname(),
            devices=device_label(cfg.device),
            model_fingerprint=runner.fingerprint,
            max_model_len=runner.config.max_position_embeddings,
            kv_blocks_total=engine.block_manager.num_blocks,
            block_size=engine.block_manager.block_size,
            queue_len=s["queue_len"],
            running=s["running"],
            kv_blocks_free=engine.block_manager.num_free,
        )

    mode = f"chunked prefill, {chunk_tokens} tokens per step" if chunk_tokens else "whole-prompt prefill"
    log.info("colocated engine: %s, max_running %d", mode, cfg.max_running)
    await serve(cfg, add, info, engine.stop)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m colocated_service",
        description="pdserve colocated instance: prefill and decode in one engine (the baseline)",
    )
    add_instance_args(p)
    p.add_argument(
        "--chunk-tokens",
        type=int,
        default=None,
        help="chunked prefill: tokens per step (decodes + prompt chunks); default: whole prompts",
    )
    args = p.parse_args(argv)
    if args.chunk_tokens is not None and args.chunk_tokens < 1:
        p.error("--chunk-tokens must be >= 1")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s colocated %(name)s: %(message)s"
    )
    asyncio.run(run(config_from_args("colocated", args), args.chunk_tokens))
