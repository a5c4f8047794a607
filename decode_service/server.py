"""gRPC `pdserve.v1.Decode` servicer and the decode instance's process entry."""

from __future__ import annotations

import logging
from contextlib import aclosing

import grpc

from coordinator.registry import InstanceInfo
from decode_service.engine import DecodeEngine, DecodeJob, Tokens
from decode_service.parallel import ParallelDecodeEngine
from decode_service.token_stream import TokenSinks
from engine.parallel.runner import ParallelRunner
from engine.runner import ModelRunner
from kv_transfer.client import KVPuller
from kv_transfer.codec import CodecContext
from kv_transfer.ranks import RankKVConfig
from kv_transfer.reshard import handle_layout
from kv_transfer.transport import available_transports
from pdserve import instance, telemetry
from pdserve.errors import InvalidRequest, ModelMismatch
from pdserve.rpc import params_from_proto, stream_errors, unary_errors
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc

log = logging.getLogger(__name__)


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(
        self, cfg: instance.InstanceConfig, engine: DecodeEngine, runner: ModelRunner, codecs: CodecContext
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.runner = runner
        self.codecs = codecs  # the puller's: which codec this instance asks for (`pull_codec`)
        self.token_sinks = TokenSinks()  # the gateways' open `Tokens` streams

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
        if request.local_prefill and (request.HasField("kv") or request.HasField("first_token_id")):
            raise InvalidRequest("local_prefill computes the prompt here: give no KV handle or first token")
        if not request.local_prefill and not request.kv.transfer_id:
            raise InvalidRequest("a KV handle (kv.transfer_id) is required unless local_prefill is set")
        if request.kv.model_fingerprint and request.kv.model_fingerprint != self.runner.fingerprint:
            raise ModelMismatch("KV handle comes from a different model than this decode instance serves")
        kv_layout = None
        if not request.local_prefill:
            hl = handle_layout(request.kv)  # LayoutMismatch if the handle contradicts itself
            if hl.layout.world_size > 1 or isinstance(self.runner, ParallelRunner):
                kv_layout = {
                    "tp": hl.layout.tp,
                    "pp": hl.layout.pp,
                    "num_layers": hl.num_layers or self.runner.config.num_layers,
                    "num_kv_heads": hl.num_kv_heads or self.runner.config.num_kv_heads,
                    "rank_addresses": list(hl.rank_addresses),
                }
        # with a token stream named, the tokens go out on it (`decode_service.token_stream`); this call only
        # ends (OK after its last event, or with the error)
        sink = self.token_sinks.get(request.token_stream) if request.token_stream else None
        stream = instance.EngineStream(None if sink is None else sink.divert(request.token_stream_tag))
        job = DecodeJob(
            request_id=request.request_id,
            prompt_ids=list(request.prompt_token_ids),
            params=params_from_proto(request.sampling),
            kv_address=request.kv.address,
            transfer_id=request.kv.transfer_id,
            kv_token=request.kv.token,
            codec=self.codecs.pull_codec(request.kv.codec or self.cfg.codec),
            first_token_id=request.first_token_id if request.HasField("first_token_id") else None,
            local_prefill=request.local_prefill,
            kv_layout=kv_layout,
            max_kl=request.kv.max_kv_kl if request.kv.HasField("max_kv_kl") else None,
            emit=stream.emit,
            trace=telemetry.parent_of(span),
        )
        if sink is not None:
            sink.use(stream)
        events = stream.events(self.engine, job, last=lambda ev: bool(ev.finish_reason))
        try:
            async with aclosing(events):
                async for ev in events:
                    assert isinstance(ev, Tokens)
                    if sink is None:
                        yield decode_pb2.DecodeEvent(
                            token_ids=ev.token_ids,
                            finish_reason=ev.finish_reason or "",
                            admission_wait_s=ev.admission_wait_s,
                            transfer_s=ev.transfer_s,
                        )
        finally:
            if sink is not None:
                sink.release(stream)

    @stream_errors
    async def Tokens(self, request: decode_pb2.TokenStreamRequest, context: grpc.aio.ServicerContext):
        """A gateway's token stream: every step's events of the Decode calls that name it, one message."""
        batches = self.token_sinks.serve(request.stream_id)
        async with aclosing(batches):
            async for batch in batches:
                yield batch

    @unary_errors
    async def Stats(self, request: common_pb2.InstanceStatsRequest, context: grpc.aio.ServicerContext):
        return instance.stats_proto(self.cfg, self.engine)


async def run(cfg: instance.InstanceConfig) -> None:
    runner, codecs = instance.load_kv_runner(
        cfg,
        RankKVConfig(
            "decode", cfg.transport, cfg.host, cfg.advertise_host, pull_timeout_s=cfg.pull_timeout_s
        ),
    )
    puller = KVPuller(fingerprint=runner.fingerprint, timeout_s=cfg.pull_timeout_s, codecs=codecs)
    args = (puller, cfg.max_running, cfg.max_queue, cfg.batch_tokens)
    engine = (
        ParallelDecodeEngine(runner, *args)
        if isinstance(runner, ParallelRunner)
        else DecodeEngine(runner, *args)
    )
    engine.start()
    servicer = DecodeServicer(cfg, engine, runner, codecs)
    instance.observe_load(cfg, engine)

    def info(address: str) -> InstanceInfo:
        transports = tuple(available_transports())
        return instance.registry_info(cfg, engine, address, transports=transports, links=dict(engine.links))

    def stop() -> None:
        engine.stop()
        instance.close_runner(runner)

    await instance.serve(
        cfg,
        lambda srv: decode_pb2_grpc.add_DecodeServicer_to_server(servicer, srv),
        info,
        stop,
        on_drain=servicer.token_sinks.drain,
    )


def main(argv: list[str] | None = None) -> None:
    instance.run_main("decode", "pdserve decode instance", lambda cfg, args: run(cfg), argv)
