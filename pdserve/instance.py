"""What every model-serving instance process shares: its one frozen config, the command-line
flags that build it, the process entry (`run_main`), the serve loop (gRPC server, registry
heartbeat, clean shutdown), and the servicers' plumbing around an engine (`EngineStream` for one
request's events, `stats_proto`, `registry_info`, `observe_load`).

The prefill, decode and colocated packages add only their engine and servicer.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import uuid
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator.registry import Heartbeat, InstanceInfo, Registry
from engine.device import Device, parse_cpus, pin_process
from engine.model_dir import ModelNotFoundError, resolve_model_dir
from engine.runner import ModelRunner
from engine.step_loop import Job, PassCpu, StepEngine
from kv_transfer.codec import CodecContext
from kv_transfer.ranks import RankKVConfig
from pdserve import telemetry
from pdserve.errors import PDServeError
from pdserve.rpc import LIVENESS, new_server
from pdserve.tls import TLSConfigError, TLSFiles, add_port, add_tls_args
from pdserve.v1 import common_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceConfig:
    """Configuration of one prefill, decode or colocated instance process."""

    role: str  # "prefill" | "decode" | "colocated"
    model_dir: str
    redis_url: str
    cluster: str = "default"
    instance_id: str = ""
    host: str = "127.0.0.1"  # gRPC and KV listen host
    # The host peers reach this instance at: what its registry record (gRPC and KV addresses) names.
    # "" = `host`. A pod binds 0.0.0.0 and advertises its pod IP; a compose service its container name.
    advertise_host: str = ""
    port: int = 0  # gRPC port; 0 = a free one
    device: Device = Device(kind="cpu", cuda_index=None, cpus=())
    # tensor x pipeline parallel: tp * pp rank processes (engine.parallel); `device` is split among them
    # (CPU cores into disjoint sets, CUDA: one device per rank from cuda_index on)
    tp: int = 1
    pp: int = 1
    num_kv_blocks: int | None = None  # None = sized by the runner's default memory budget
    block_size: int = 16  # tokens per KV block
    # Prompt tokens per prefill forward pass (the first prompt always goes, whatever its length); None =
    # the device's saturation point (`default_batch_tokens`). Batching past it buys no throughput and
    # makes every prompt in the batch wait for all of them (DistServe, section 4.1).
    max_batch_tokens: int | None = None
    max_running: int = 64  # decode: sequences per step
    max_queue: int = 1024  # requests waiting before RESOURCE_EXHAUSTED
    transport: str = "auto"  # KV transport scheme: auto | ucx | tcp | shm
    codec: str = "raw"  # default KV codec the decode side asks for
    lease_ttl_s: float = 30.0  # prefill: KV held this long for decode to pull
    pull_timeout_s: float = 30.0  # decode: give up a KV pull after this long
    heartbeat_ttl_s: float = 3.0  # registry key TTL; heartbeat every ttl/3
    drain_s: float = 1.0  # SIGTERM: calls in flight may finish this long before they are cancelled (< 2 s)
    # Mutual TLS (pdserve/tls.py): all three files or none. The gRPC server then requires a client
    # certificate signed by the CA, and the registry (a rediss:// URL) gets this process's certificate.
    tls: TLSFiles = field(default_factory=TLSFiles)

    def __post_init__(self) -> None:
        self.tls.require_cluster_identity()
        if self.tls.enabled and not self.tls.mutual:
            raise TLSConfigError("an instance serves TLS only as mutual TLS: give --tls-ca with --tls-cert")

    @property
    def advertised_host(self) -> str:
        """`advertise_host`; else `host`, unless that is a wildcard (0.0.0.0, ::), which no peer can
        connect to: then this machine's address (its host name resolved: a container's or pod's own IP)."""
        if self.advertise_host:
            return self.advertise_host
        if self.host in ("", "0.0.0.0", "::"):
            return own_address()
        return self.host

    @property
    def batch_tokens(self) -> int:
        return self.max_batch_tokens or default_batch_tokens(self.device)

    def with_defaults(self) -> InstanceConfig:
        if self.instance_id:
            return self
        from dataclasses import replace

        return replace(
            self, instance_id=f"{self.role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )


def own_address() -> str:
    """This machine's address as its host name resolves (in a container or pod: its own IP), else the name."""
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        return name


CPU_BATCH_TOKENS = 256
GPU_BATCH_TOKENS = 2048


def default_batch_tokens(device: Device) -> int:
    """Prompt tokens at which one prefill pass saturates the device. Measured on a 2-vCPU EPYC, one core
    (`docs/benchmarks.md`): a 28.8M-parameter Llama costs 1.16, 0.88, 0.80, 0.79, 0.84, 0.90 ms per token
    at 32, 64, 128, 256, 512, 1024 prompt tokens, so CPU prefill saturates at 128-256 tokens; GPUs need
    about 2k tokens for small models."""
    return GPU_BATCH_TOKENS if device.kind == "cuda" else CPU_BATCH_TOKENS


def add_instance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="model directory (HF format; default: the shipped model)")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--cluster", default="default")
    p.add_argument("--instance-id", default="")
    p.add_argument("--host", default="127.0.0.1", help="listen host of gRPC and the KV server")
    p.add_argument(
        "--advertise-host",
        default="",
        help="host peers reach this instance at, written into the registry (default: --host; with a wildcard "
        "--host such as 0.0.0.0, this machine's address, e.g. the container's IP)",
    )
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cpus", default="", help="CPU cores this instance owns, e.g. '0' or '2-3' (CPU device)")
    p.add_argument("--cuda", type=int, default=None, help="CUDA device index this instance owns")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (default 1)")
    p.add_argument(
        "--pp",
        type=int,
        default=1,
        help="pipeline-parallel stages (default 1); tp*pp rank processes split --cpus (or use CUDA devices "
        "--cuda .. --cuda + tp*pp - 1)",
    )
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help=f"prompt tokens per prefill pass (default: {CPU_BATCH_TOKENS} on CPU, {GPU_BATCH_TOKENS} on CUDA)",
    )
    p.add_argument("--max-running", type=int, default=64)
    p.add_argument("--max-queue", type=int, default=1024)
    p.add_argument("--transport", default="auto")
    p.add_argument("--codec", default="raw")
    p.add_argument("--lease-ttl", type=float, default=30.0)
    p.add_argument("--pull-timeout", type=float, default=30.0)
    p.add_argument("--heartbeat-ttl", type=float, default=3.0)
    p.add_argument(
        "--drain",
        type=float,
        default=1.0,
        help="on SIGTERM, seconds the calls in flight may finish after the instance withdrew (default 1; the "
        f"whole stop is bounded by {STOP_BOUND_S:g}s)",
    )
    add_tls_args(p)


def config_from_args(role: str, a: argparse.Namespace) -> InstanceConfig:
    if a.cuda is not None:
        device = Device(kind="cuda", cuda_index=a.cuda, cpus=parse_cpus(a.cpus) if a.cpus else ())
    else:
        cpus = parse_cpus(a.cpus) if a.cpus else tuple(sorted(os.sched_getaffinity(0)))
        device = Device(kind="cpu", cuda_index=None, cpus=cpus)
    return InstanceConfig(
        role=role,
        model_dir=resolve_model_dir(a.model),
        redis_url=a.redis_url,
        cluster=a.cluster,
        instance_id=a.instance_id,
        host=a.host,
        advertise_host=a.advertise_host,
        port=a.port,
        device=device,
        tp=a.tp,
        pp=a.pp,
        num_kv_blocks=a.num_kv_blocks,
        block_size=a.block_size,
        max_batch_tokens=a.max_batch_tokens,
        max_running=a.max_running,
        max_queue=a.max_queue,
        transport=a.transport,
        codec=a.codec,
        lease_ttl_s=a.lease_ttl,
        pull_timeout_s=a.pull_timeout,
        heartbeat_ttl_s=a.heartbeat_ttl,
        drain_s=a.drain,
        tls=TLSFiles.from_args(a),
    ).with_defaults()


def run_main(
    role: str,
    description: str,
    run: Callable[[InstanceConfig, argparse.Namespace], Coroutine[Any, Any, None]],
    argv: list[str] | None,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
    traced: bool = True,
) -> None:
    """The process entry of `python -m {role}_service`: flags, logging, telemetry (if `traced`), `run`."""
    p = argparse.ArgumentParser(prog=f"python -m {role}_service", description=description)
    add_instance_args(p)
    if add_args is not None:
        add_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s")
    try:
        cfg = config_from_args(role, args)
        check_layout(cfg)
    except (TLSConfigError, ModelNotFoundError, ValueError) as exc:
        p.error(str(exc))
    try:
        check_registry(cfg)  # before loading the model: a refused registration fails in a second
    except RegistrationError as exc:
        log.error("%s", exc)
        raise SystemExit(REGISTRATION_FAILED) from None
    pin_process(cfg.device.cpus)  # before telemetry and gRPC start threads that would otherwise float
    if traced:
        telemetry.setup(role, cfg.instance_id)
    try:
        asyncio.run(run(cfg, args))
    except RegistrationError as exc:
        log.error("%s", exc)
        raise SystemExit(REGISTRATION_FAILED) from None
    finally:
        if traced:
            telemetry.shutdown()
    # Stopped cleanly: withdrawn, calls drained, engine and telemetry shut down. The interpreter's own
    # teardown (torch, the KV transports, gRPC core) took 1.5 s more and adds nothing, so skip it: SIGTERM
    # -> exit stays within STOP_BOUND_S.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


REGISTRATION_FAILED = 3  # exit status of an instance the registry refused


class RegistrationError(RuntimeError):
    """The instance cannot write its record into the registry (unreachable, or refused: under mutual TLS,
    without a client certificate signed by the cluster CA). The instance exits; it never serves."""


def _registration_error(cfg: InstanceConfig, exc: Exception) -> RegistrationError:
    hint = (
        " (mutual TLS: the registry accepts only a client certificate signed by the cluster CA; check "
        "--tls-cert/--tls-key against --tls-ca)"
        if cfg.tls.mutual
        else ""
    )
    return RegistrationError(f"cannot register in the registry {cfg.redis_url}: {exc}{hint}")


def check_layout(cfg: InstanceConfig) -> None:
    """Raise ValueError (LayoutError) unless --tp/--pp can shard this model."""
    if cfg.tp * cfg.pp == 1:
        return
    from engine.config import ModelConfig
    from engine.parallel.layout import Layout

    mc = ModelConfig.from_hf_dir(cfg.model_dir)
    Layout(cfg.tp, cfg.pp).check(mc.num_layers, mc.num_heads, mc.num_kv_heads)
    if mc.intermediate_size % cfg.tp:
        raise ValueError(
            f"--tp {cfg.tp} does not divide the model's intermediate size {mc.intermediate_size}"
        )


def check_registry(cfg: InstanceConfig) -> None:
    """Reach the registry as the heartbeat will (TLS and certificate included); raises RegistrationError. A
    TLS server that refuses our certificate may let the handshake finish and close the connection only
    when it reads our first command, so this sends one (PING), not only connects."""
    try:
        registry = Registry(cfg.redis_url, cfg.cluster, tls=cfg.tls)
    except TLSConfigError as exc:
        raise RegistrationError(str(exc)) from None
    try:
        registry.ping()
    except redis.RedisError as exc:
        raise _registration_error(cfg, exc) from None
    finally:
        registry.close()


def load_runner(cfg: InstanceConfig, kv: RankKVConfig | None = None) -> ModelRunner:
    """One device's ModelRunner, or with tp * pp > 1 rank 0 of a ParallelRunner: if a rank dies, the instance
    stops (SIGTERM to itself: it leaves the registry, fails what it runs, and its other ranks end with it).
    `kv`: the KV hand-off each other rank runs on its own shard (prefill, decode)."""
    if cfg.tp * cfg.pp == 1:
        return ModelRunner(
            cfg.model_dir, cfg.device, num_kv_blocks=cfg.num_kv_blocks, block_size=cfg.block_size
        )
    from engine.parallel.layout import Layout
    from engine.parallel.runner import ParallelRunner

    runner = ParallelRunner(
        cfg.model_dir,
        Layout(cfg.tp, cfg.pp),
        cfg.device,
        cfg.num_kv_blocks,
        cfg.block_size,
        kv=kv.to_dict() if kv is not None else None,
    )
    runner.on_rank_lost = lambda why: os.kill(os.getpid(), signal.SIGTERM)
    return runner


def close_runner(runner: ModelRunner) -> None:
    """Stop a ParallelRunner's rank processes (after the engine's step loop is done); nothing for one device."""
    from engine.parallel.runner import ParallelRunner

    if isinstance(runner, ParallelRunner):
        runner.close()


def load_kv_runner(cfg: InstanceConfig, kv: RankKVConfig) -> tuple[ModelRunner, CodecContext]:
    """The runner of an instance that hands KV over (prefill, decode), and its KV codecs' context: the
    model's depth, calibration files and layer-0 function (cachegen_l0 recomputes or checks layer 0)."""
    runner = load_runner(cfg, kv)
    return runner, CodecContext.from_model_dir(cfg.model_dir, runner.model, runner.fingerprint)


def rank_device_labels(runner: ModelRunner) -> tuple[str, ...]:
    """Each rank's device (a ParallelRunner's), () for one device."""
    devices = getattr(runner, "devices", None)
    return tuple(device_label(d) for d in devices) if devices is not None else ()


def device_label(device: Device) -> str:
    if device.kind == "cuda":
        return f"cuda:{device.cuda_index}"
    return "cpu:" + ",".join(str(c) for c in device.cpus)


async def serve(
    cfg: InstanceConfig,
    add_servicers: Callable[[grpc.aio.Server], None],
    info_fn: Callable[[str], InstanceInfo],
    on_stop: Callable[[], Awaitable[None] | None],
    on_drain: Callable[[], None] | None = None,
) -> None:
    """Run the gRPC server until SIGINT/SIGTERM, registered in Redis the whole time it serves.

    `info_fn(grpc_address)` builds the registry record (called at every heartbeat for fresh load) from the
    advertised address. The standard health service (grpc.health.v1, service "") says NOT_SERVING until
    the first heartbeat has written the record, SERVING while registered, NOT_SERVING again once stopping;
    service LIVENESS is SERVING from the start until stopping. `on_drain()` is called when the drain starts
    (before the server stops taking calls): long-lived streams end there once the calls using them are done.
    """
    server = new_server()
    add_servicers(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    # under --tls-ca: mutual TLS, every caller presents a certificate signed by the cluster CA
    port = add_port(server, f"{cfg.host}:{cfg.port}", cfg.tls, client_auth=True)
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC on {cfg.host}:{cfg.port}")
    address = f"{cfg.advertised_host}:{port}"
    await server.start()
    registry = Registry(cfg.redis_url, cfg.cluster, tls=cfg.tls)
    heartbeat = Heartbeat(registry, lambda: info_fn(address), ttl_s=cfg.heartbeat_ttl_s)
    try:
        heartbeat.start()
    except redis.RedisError as exc:  # refused: stop everything started so far, then exit with the reason
        await server.stop(None)
        result = on_stop()
        if asyncio.iscoroutine(result):
            await result
        registry.close()
        raise _registration_error(cfg, exc) from None
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "%s %s serving on %s:%d, advertised as %s (%s, device %s)",
        cfg.role,
        cfg.instance_id,
        cfg.host,
        port,
        address,
        "mutual TLS" if cfg.tls.mutual else "plaintext",
        device_label(cfg.device),
    )
    print(f"SERVING {cfg.role} {cfg.instance_id} {address}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Drain: withdraw first (the router stops sending new work here), let the calls in flight finish for
    # up to `drain_s`, then cancel the rest (the gateway resumes them on another instance). The whole stop
    # is bounded by STOP_BOUND_S whatever hangs (an unreachable Redis, a KV pull): then the process exits.
    log.info("%s %s stopping (draining up to %.1fs)", cfg.role, cfg.instance_id, cfg.drain_s)
    exit_after(STOP_BOUND_S)
    heartbeat.stop()
    await health_servicer.enter_graceful_shutdown()
    if on_drain is not None:
        on_drain()
    await server.stop(grace=cfg.drain_s)
    result = on_stop()
    if asyncio.iscoroutine(result):
        await result
    registry.close()


STOP_BOUND_S = 1.8  # SIGTERM -> process gone, at most (drain included): under the promised 2 s


def exit_after(seconds: float) -> None:
    """End this process if it is still running `seconds` from now, whatever it is doing: a real-time timer
    whose SIGALRM keeps its default action (terminate), so the kernel ends the process even while a
    thread holds the GIL in a call that does not return (a transport's shutdown, a hung socket)."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, seconds)


# ---- the servicers' plumbing around an engine -------------------------------------------------------
class _Mailbox:
    """Hands events from engine threads to one event loop with at most one loop wake-up per batch.

    `call_soon_threadsafe` per event writes the loop's self-pipe once per event: a decode step of a batch
    of 16 woke the loop 16 times. Here the first event posted while the mailbox is empty schedules one
    drain; events posted before the drain runs ride along. Order is kept (one list, FIFO)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[Any, Any]] = []  # (what takes it: has put_nowait(event), event)

    def post(self, queue: Any, event: Any) -> None:
        with self._lock:
            self._items.append((queue, event))
            if len(self._items) > 1:
                return  # a drain is scheduled and has not taken the list yet: it will see this event
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody will read these events; later posts raise too
            with self._lock:
                self._items.clear()
            raise

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, event in items:
            queue.put_nowait(event)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()


def _mailbox_of(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    """The loop's mailbox (made on first use; only the loop's own thread calls this)."""
    box = _mailboxes.get(loop)
    if box is None:
        box = _mailboxes[loop] = _Mailbox(loop)
    return box


@dataclass(frozen=True)
class _Failed:
    """`EngineStream.fail`'s error, told apart from the engine's own."""

    error: PDServeError


class EngineStream:
    """Carries one job's events from the engine's threads to the gRPC handler's event loop.

    In a handler: make one, give `stream.emit` to the job, then
        events = stream.events(engine, job, last)
        async with contextlib.aclosing(events):  # closes it (cancelling the job) if the handler stops early
            async for ev in events: ...

    `divert(event)`, when given, sees each event first, on the loop, in order: True takes it away from
    `events` (e.g. a token sent on a shared stream, `decode_service.token_stream`), False passes it on.
    """

    def __init__(self, divert: Callable[[Any], bool] | None = None) -> None:
        self._mailbox = _mailbox_of(asyncio.get_running_loop())
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._divert = divert

    def emit(self, event: Any) -> None:
        """The job's `emit`: called from engine threads, never blocks."""
        self._mailbox.post(self._queue if self._divert is None else self, event)

    def put_nowait(self, event: Any) -> None:
        """On the loop (the mailbox's drain): `divert` first, then the queue `events` reads."""
        if self._divert is None or not self._divert(event):
            self._queue.put_nowait(event)

    def fail(self, error: PDServeError) -> None:
        """On the loop: end `events` with `error` after the events already queued, cancelling the job (unlike
        an error the engine emits, which means the job is over)."""
        self._queue.put_nowait(_Failed(error))

    async def events(
        self, engine: StepEngine, job: Job, last: Callable[[Any], bool]
    ) -> AsyncGenerator[Any, None]:
        """Submit `job` and yield its events up to the one `last` accepts; an error event is raised.

        Closed before that (the client cancelled or its deadline passed: the handler stops iterating),
        it cancels the job, so the engine frees its blocks now. A finished or failed job is not cancelled.
        """
        engine.submit(job)
        finished = False
        try:
            while not finished:
                event = await self._queue.get()
                if isinstance(event, _Failed):  # `fail`: the finally cancels the job
                    raise event.error
                if isinstance(event, PDServeError):
                    finished = True
                    raise event
                finished = last(event)
                yield event
        finally:
            if not finished:
                engine.cancel(job)


def stats_proto(cfg: InstanceConfig, engine: StepEngine) -> common_pb2.InstanceStats:
    """The `Stats` RPC's answer: load, KV blocks, whether `check_integrity()` holds right now, and the step
    thread's CPU per pass kind (engine.step_loop.PassCpu)."""
    s = engine.stats()
    cpu = engine.pass_cpu()
    bm = engine.block_manager
    try:
        engine.check_integrity()
        ok = True
    except AssertionError:
        ok = False
    passes, tokens, tokens_sq, prompt_cpu_s, prompt_forward_s = cpu.prefill
    return common_pb2.InstanceStats(
        instance_id=cfg.instance_id,
        role=cfg.role,
        queue_len=s["queue_len"],
        running=s.get("running", 0),
        kv_blocks_total=bm.num_blocks,
        kv_blocks_free=bm.num_free,
        leases=s.get("leases", 0),
        integrity_ok=ok,
        kv_unauthorized_pulls=s.get("kv_unauthorized_pulls", 0),
        decode_step_cpu=[
            common_pb2.DecodeStepCpu(batch=b, steps=int(n), ctx_tokens=int(ctx), cpu_s=c, forward_cpu_s=f)
            for b, (n, ctx, c, f) in sorted(cpu.decode.items())
        ],
        prompt_pass_cpu=common_pb2.PromptPassCpu(
            passes=int(passes),
            tokens=int(tokens),
            tokens_sq=int(tokens_sq),
            cpu_s=prompt_cpu_s,
            forward_cpu_s=prompt_forward_s,
        ),
    )


def pass_cpu_from_proto(st: common_pb2.InstanceStats) -> PassCpu:
    """The step thread's CPU per pass kind of a `Stats` answer (the inverse of its part of `stats_proto`)."""
    pp = st.prompt_pass_cpu
    return PassCpu(
        {r.batch: [r.steps, r.ctx_tokens, r.cpu_s, r.forward_cpu_s] for r in st.decode_step_cpu},
        [pp.passes, pp.tokens, pp.tokens_sq, pp.cpu_s, pp.forward_cpu_s],
    )


def registry_info(cfg: InstanceConfig, engine: StepEngine, grpc_address: str, **extra: Any) -> InstanceInfo:
    """The registry record (an `info_fn` for `serve`): identity, model, capacity, fresh load, `extra`."""
    s = engine.stats()
    bm = engine.block_manager
    return InstanceInfo(
        instance_id=cfg.instance_id,
        role=cfg.role,
        grpc_address=grpc_address,
        node=socket.gethostname(),
        devices=device_label(cfg.device),
        tp=cfg.tp,
        pp=cfg.pp,
        rank_devices=rank_device_labels(engine.runner),
        model_fingerprint=engine.runner.fingerprint,
        max_model_len=engine.runner.config.max_position_embeddings,
        kv_blocks_total=bm.num_blocks,
        block_size=bm.block_size,
        queue_len=s["queue_len"],
        running=s.get("running", 0),
        kv_blocks_free=bm.num_free,
        leases=s.get("leases", 0),
        **extra,
    )


def observe_load(cfg: InstanceConfig, engine: StepEngine) -> None:
    """Export the engine's load and KV blocks as OpenTelemetry gauges (no-ops unless metrics are on)."""

    def gauges() -> dict[str, int]:
        bm = engine.block_manager
        return {
            **engine.stats(),
            "kv_blocks_free": bm.num_free,
            "kv_blocks_used": bm.num_blocks - bm.num_free,
        }

    telemetry.instruments().observe_instance(cfg.role, cfg.instance_id, gauges)
