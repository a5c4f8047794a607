"""gRPC `pdserve.v1.Generation` (served by the instance itself) + `Colocated.Stats`, and the process entry."""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from contextlib import aclosing

import grpc

from colocated_service.engine import ColocatedEngine, ColocatedJob, Tokens
from coordinator.gateway import sampling_from_request
from engine.params import generation_defaults
from engine.runner import ModelRunner
from pdserve import instance
from pdserve.errors import InvalidRequest
from pdserve.rpc import stream_errors, unary_errors
from pdserve.v1 import (
    colocated_pb2_grpc,
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
)

log = logging.getLogger(__name__)


class ColocatedServicer(generation_pb2_grpc.GenerationServicer, colocated_pb2_grpc.ColocatedServicer):
    def __init__(self, cfg: instance.InstanceConfig, engine: ColocatedEngine, runner: ModelRunner) -> None:
        self.cfg = cfg
        self.engine = engine
        self.runner = runner
        self.generation_defaults = generation_defaults(cfg.model_dir)

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
        stream = instance.EngineStream()
        job = ColocatedJob(
            request_id,
            self._prompt_ids(request),
            sampling_from_request(request, self.generation_defaults),
            stream.emit,
        )
        ttft = 0.0
        completion = 0
        events = stream.events(self.engine, job, last=lambda ev: bool(ev.finish_reason))
        async with aclosing(events):
            async for ev in events:
                assert isinstance(ev, Tokens)
                if completion == 0:
                    ttft = time.monotonic() - received
                completion += len(ev.token_ids)
                yield generation_pb2.GenerateResponse(
                    request_id=request_id, token_ids=ev.token_ids, text=ev.text
                )
                if ev.finish_reason:
                    usage = common_pb2.Usage(
                        prompt_tokens=len(job.prompt_ids), completion_tokens=completion, ttft_s=ttft
                    )
                    yield generation_pb2.GenerateResponse(
                        request_id=request_id, finish_reason=ev.finish_reason, usage=usage
                    )

    @unary_errors
    async def Stats(self, request: common_pb2.InstanceStatsRequest, context: grpc.aio.ServicerContext):
        return instance.stats_proto(self.cfg, self.engine)


async def run(cfg: instance.InstanceConfig, chunk_tokens: int | None) -> None:
    runner = instance.load_runner(cfg)
    engine = ColocatedEngine(runner, cfg.max_running, cfg.max_queue, cfg.batch_tokens, chunk_tokens)
    engine.start()
    servicer = ColocatedServicer(cfg, engine, runner)

    def add(server: grpc.aio.Server) -> None:
        generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
        colocated_pb2_grpc.add_ColocatedServicer_to_server(servicer, server)

    mode = f"chunked prefill, {chunk_tokens} tokens per step" if chunk_tokens else "whole-prompt prefill"
    log.info("colocated engine: %s, max_running %d", mode, cfg.max_running)

    def stop() -> None:
        engine.stop()
        instance.close_runner(runner)

    await instance.serve(cfg, add, lambda address: instance.registry_info(cfg, engine, address), stop)


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--chunk-tokens",
        type=_positive_int,
        default=None,
        help="chunked prefill: tokens per step (decodes + prompt chunks); default: whole prompts",
    )


def main(argv: list[str] | None = None) -> None:
    instance.run_main(
        "colocated",
        "pdserve colocated instance: prefill and decode in one engine (the baseline)",
        lambda cfg, args: run(cfg, args.chunk_tokens),
        argv,
        add_args=_add_args,
        traced=False,  # the baseline sets up no telemetry
    )
