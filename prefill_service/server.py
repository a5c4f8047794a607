"""gRPC `pdserve.v1.Prefill` servicer and the prefill instance's process entry."""

from __future__ import annotations

import logging
from contextlib import aclosing

import grpc

from coordinator.registry import InstanceInfo
from engine.parallel.layout import Layout
from engine.parallel.runner import ParallelRunner
from engine.runner import ModelRunner
from kv_transfer.ranks import RankKVConfig
from kv_transfer.server import KVServer
from kv_transfer.transport import available_transports, default_scheme, transport_for
from pdserve import instance, telemetry
from pdserve.rpc import params_from_proto, stream_errors, unary_errors
from pdserve.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc
from prefill_service.engine import Done, PrefillEngine, PrefillJob, Scheduled
from prefill_service.parallel import ParallelPrefillEngine

log = logging.getLogger(__name__)


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(
        self, cfg: instance.InstanceConfig, engine: PrefillEngine, runner: ModelRunner, kv_address: str
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.runner = runner
        self.kv_address = kv_address

    def _handle(self, transfer_id: str, num_tokens: int, codec: str, token: bytes) -> common_pb2.KVHandle:
        """The KV handle: rank 0's KV address, and the layout with every rank's address (TP x PP)."""
        runner = self.runner
        layout = runner.layout if isinstance(runner, ParallelRunner) else Layout()
        ranks = runner.kv_addresses if isinstance(runner, ParallelRunner) else []
        return common_pb2.KVHandle(
            token=token,
            transfer_id=transfer_id,
            address=self.kv_address,
            codec=codec or self.cfg.codec,
            num_layers=self.runner.config.num_layers,
            num_tokens=num_tokens,
            model_fingerprint=self.runner.fingerprint,
            tp=layout.tp,
            pp=layout.pp,
            num_kv_heads=self.runner.config.num_kv_heads,
            rank_addresses=ranks,
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
        stream = instance.EngineStream()
        job = PrefillJob(
            request_id=request.request_id,
            prompt_ids=list(request.prompt_token_ids),
            params=params_from_proto(request.sampling),
            emit=stream.emit,
            trace=telemetry.parent_of(span),
        )
        # closed before Done (client cancel / deadline): the engine drops the job or releases its lease
        events = stream.events(self.engine, job, last=lambda ev: isinstance(ev, Done))
        async with aclosing(events):
            async for ev in events:
                if isinstance(ev, Scheduled):
                    yield prefill_pb2.PrefillEvent(
                        scheduled=self._handle(ev.transfer_id, ev.num_tokens, request.codec, ev.token)
                    )
                elif isinstance(ev, Done):
                    done = prefill_pb2.PrefillDone(
                        first_token_id=ev.first_token_id,
                        kv=self._handle(ev.transfer_id, ev.num_tokens, request.codec, ev.token),
                        queue_s=ev.queue_s,
                        compute_s=ev.compute_s,
                    )
                    yield prefill_pb2.PrefillEvent(done=done)

    @unary_errors
    async def Release(self, request: prefill_pb2.ReleaseRequest, context: grpc.aio.ServicerContext):
        return prefill_pb2.ReleaseResponse(released=self.engine.release(request.transfer_id))

    @unary_errors
    async def Stats(self, request: common_pb2.InstanceStatsRequest, context: grpc.aio.ServicerContext):
        return instance.stats_proto(self.cfg, self.engine)


async def run(cfg: instance.InstanceConfig) -> None:
    cuda = cfg.device.kind == "cuda"
    scheme = default_scheme(cuda) if cfg.transport == "auto" else cfg.transport  # auto logs its choice
    runner, codecs = instance.load_kv_runner(
        cfg, RankKVConfig("prefill", scheme, cfg.host, cfg.advertise_host, cfg.lease_ttl_s)
    )
    transport = transport_for(scheme)
    kv_server = KVServer(
        transport,
        cfg.host,
        fingerprint=runner.fingerprint,
        lease_ttl_s=cfg.lease_ttl_s,
        codecs=codecs,
        advertise_host=cfg.advertised_host,
        check_layer0_early=not cuda,  # a CUDA cache's read_layer copies to the host: the pull checks then
    )
    kv_server.start()
    engine = (
        ParallelPrefillEngine(runner, kv_server, cfg.batch_tokens, cfg.max_queue)
        if isinstance(runner, ParallelRunner)
        else PrefillEngine(runner, kv_server, cfg.batch_tokens, cfg.max_queue)
    )
    engine.start()
    servicer = PrefillServicer(cfg, engine, runner, kv_server.address)
    instance.observe_load(cfg, engine)

    def info(address: str) -> InstanceInfo:
        transports = tuple(available_transports())
        return instance.registry_info(
            cfg, engine, address, kv_address=kv_server.address, transports=transports
        )

    def stop() -> None:
        engine.stop()
        instance.close_runner(runner)
        kv_server.stop()

    await instance.serve(
        cfg, lambda srv: prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, srv), info, stop
    )


def main(argv: list[str] | None = None) -> None:
    instance.run_main("prefill", "pdserve prefill instance", lambda cfg, args: run(cfg), argv)
