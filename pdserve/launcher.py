"""Local mode: run a whole cluster as processes on this machine (`pdserve up`, and the tests).

Starts a private redis-server (unless given a Redis URL), the coordinator, and N prefill + M decode
instances (or, for the colocated baseline, N colocated instances) on disjoint device sets. A TP x PP instance
(`prefill_tp`/`prefill_pp`, `decode_tp`/`decode_pp`: passed as `--tp/--pp`) has tp * pp rank processes, and
every rank gets its own device: one CUDA device per rank when there are enough GPUs (an instance gets
`--cuda k`, its ranks use k .. k + tp*pp - 1), otherwise a disjoint CPU core set per rank (an instance gets the
union of its ranks' sets as `--cpus`; the service splits it the same way, engine.parallel.runner.rank_devices).
With fewer cores than ranks, cores are shared round-robin and a warning says so. Every child runs in its own session so that Ctrl-C reaches the launcher only,
which then stops the coordinator first, the instances next, Redis last: nothing is left behind.

Supervision (`pdserve up`, `Supervisor`): a child that exits is restarted with the same arguments after a
backoff (doubling per restart of that process, capped), up to a restart budget; each restart is a log line
and a `pdserve.launcher.restarts` metric. With `die_with_launcher` every child gets the parent-death
signal (SIGTERM; prctl PR_SET_PDEATHSIG), so even a launcher killed with SIGKILL leaves no process behind:
instances stop within 2 s of a SIGTERM (pdserve.instance.STOP_BOUND_S).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve import telemetry
from pdserve.redis_server import RedisServer, free_port
from pdserve.tls import TLSFiles, channel_credentials

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterConfig:
    model_dir: str
    host: str = "127.0.0.1"
    port: int = 50051  # gateway port; 0 = a free one
    prefill: int = 1
    decode: int = 1
    # tensor x pipeline parallel layout of each prefill / decode instance (engine/parallel/layout.py)
    prefill_tp: int = 1
    prefill_pp: int = 1
    decode_tp: int = 1
    decode_pp: int = 1
    redis_url: str | None = None  # None = start a private redis-server
    cluster: str = "default"
    cpus: tuple[int, ...] = ()  # cores to divide among instances; () = all this process may use
    use_cuda: bool = True  # one CUDA device per instance when enough are visible
    share_cuda: bool = False  # fewer CUDA devices than instances: share them round-robin (development)
    transport: str = "auto"
    codec: str = "auto"  # the gateway's KV codec choice: a name, or auto (per link)
    max_kl: float = 0.01  # the gateway's quality floor for --codec auto (nats per token)
    num_kv_blocks: int | None = None
    heartbeat_ttl_s: float = 3.0
    lease_ttl_s: float = 30.0
    extra_instance_args: tuple[str, ...] = ()
    log_dir: str | None = None  # children's output goes here (files) instead of this process's stdout
    colocated: int = 0  # > 0: the baseline, this many colocated instances instead of prefill + decode
    chunk_tokens: int | None = None  # colocated: chunked prefill with this token budget per step
    # Cores to pin the coordinator (gateway + router) to; () = not pinned. Pinning it to the prefill cores of
    # a 1P1D cluster (so that its per-token relaying stays off the decode core) made no measurable TPOT or
    # TTFT difference in an A/B on this host (docs/benchmarks.md), so it is not the default.
    coordinator_cpus: tuple[int, ...] = ()
    # Conditional disaggregation (coordinator `--local-prefill`): off | busy | always, and the longest prompt
    # a decode instance may prefill itself.
    local_prefill: str = "busy"
    local_prefill_max_tokens: int = 128
    layerwise: str = "auto"  # coordinator --layerwise: auto (only from CUDA prefill instances) | on | off
    token_stream: bool = True  # coordinator --token-stream on|off (off: one gRPC message per decode token)
    # TLS (pdserve/tls.py): a certificate alone = the gateway serves TLS; with the CA too, everything inside
    # the cluster is mutual TLS (the private Redis is TLS-only and requires client certificates, instances
    # require them on gRPC). Every process presents the same certificate.
    tls: TLSFiles = field(default_factory=TLSFiles)
    http_port: int | None = None  # coordinator --http-port: None = no HTTP API, 0 = a free one
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # coordinator --api-key (never logged)
    api_key_file: str | None = None  # coordinator --api-key-file
    # coordinator failover and overload flags (coordinator/config.py): --failover-wait, --max-queue, --kv-budget
    failover_wait_s: float = 10.0
    max_queue: int = 0
    kv_budget: float = 0.0
    # Children get SIGTERM when the launcher dies, however it dies (`pdserve up` sets it). Off by default:
    # the signal follows the *thread* that spawned a child, and tests start clusters from pool threads; and
    # it runs Python (prctl) in the forked child, which a process with busy gRPC client threads (tests,
    # benchmarks) must not do (gRPC's fork handlers broke such children).
    die_with_launcher: bool = False
    # `pdserve up --plan`: instance i (start order: prefill..., decode...) registers as instance_ids[i] (the
    # plan's names), and the coordinator routes by the plan's kv_links (coordinator --plan plan_path)
    instance_ids: tuple[str, ...] = ()
    plan_path: str | None = None
    # `pdserve up --autoplan` (with plan_path): the coordinator replans on the live workload and this
    # launcher starts and drains instances until the counts match the plan in force (run_forever)
    autoplan: bool = False
    replan_interval_s: float = 10.0  # coordinator --replan-interval (with plan_path)

    @property
    def roles(self) -> list[str]:
        """The instance role of each device set, in start order."""
        if self.colocated:
            return ["colocated"] * self.colocated
        return ["prefill"] * self.prefill + ["decode"] * self.decode

    def layout(self, role: str) -> tuple[int, int]:
        """(tp, pp) of an instance of `role`."""
        if role == "prefill":
            return self.prefill_tp, self.prefill_pp
        if role == "decode":
            return self.decode_tp, self.decode_pp
        return 1, 1

    def layout_args(self, role: str) -> list[str]:
        """The service flags of `role`'s layout: [] for one rank."""
        tp, pp = self.layout(role)
        return [] if tp * pp == 1 else ["--tp", str(tp), "--pp", str(pp)]


def assign_devices(
    n: int,
    cpus: tuple[int, ...],
    use_cuda: bool,
    share_cuda: bool = False,
    ranks: Sequence[int] | None = None,
) -> list[list[str]]:
    """Instance i's device flags: ['--cuda', 'k'] or ['--cpus', 'a,b']; disjoint where possible.

    `ranks[i]`: instance i's rank processes (tp * pp; default 1 each); every rank is given its own device.
    CUDA needs one device per rank (instance i gets the first of its ranks' consecutive devices); with fewer,
    instances go to CPU cores, unless share_cuda puts them round-robin on the devices there are (a one-GPU
    development box: the phases then interfere). CPU: the cores are split into one set per rank, as even as
    possible (earlier sets take the remainder), and an instance gets its ranks' consecutive sets.
    """
    ranks = list(ranks) if ranks is not None else [1] * n
    if len(ranks) != n or min(ranks, default=1) < 1:
        raise ValueError(f"ranks {ranks} for {n} instances")
    total = sum(ranks)
    firsts = [sum(ranks[:i]) for i in range(n)]  # global index of each instance's first rank
    cuda_count = 0
    if use_cuda:
        try:
            import torch

            cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except ImportError:
            cuda_count = 0
    if cuda_count >= total:
        return [["--cuda", str(first)] for first in firsts]
    if share_cuda and cuda_count >= max(ranks):
        # round-robin, each instance's ranks on consecutive devices that exist
        return [["--cuda", str(first % (cuda_count - r + 1))] for first, r in zip(firsts, ranks, strict=True)]
    cores = list(cpus) or sorted(os.sched_getaffinity(0))
    if len(cores) >= total:
        per, extra = divmod(len(cores), total)
        sets, start = [], 0
        for r in range(total):
            size = per + (1 if r < extra else 0)
            sets.append(cores[start : start + size])
            start += size
        return [
            ["--cpus", ",".join(str(c) for s in sets[first : first + r] for c in s)]
            for first, r in zip(firsts, ranks, strict=True)
        ]
    what = "instances" if total == n else "ranks"
    log.warning("%d %s on %d cores: cores are shared round-robin, not disjoint", total, what, len(cores))
    out = []
    for first, r in zip(firsts, ranks, strict=True):
        own = sorted({cores[(first + j) % len(cores)] for j in range(r)})
        out.append(["--cpus", ",".join(str(c) for c in own)])
    return out


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A Popen `preexec_fn`: the child gets `sig` when the process (thread) that spawned it dies. If the
    parent is already gone by then (it died between fork and prctl), the child exits at once."""
    parent = os.getpid()

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() != parent:
            os._exit(0)

    return preexec


@dataclass
class Child:
    role: str
    proc: subprocess.Popen
    args: list[str]
    log_path: str | None = None
    restarts: int = 0  # times the supervisor restarted this process (the same slot)

    @property
    def instance_id(self) -> str:
        """The --instance-id it was started with ("" = the instance made its own)."""
        return self.args[self.args.index("--instance-id") + 1] if "--instance-id" in self.args else ""


def stats_stub(role: str, channel: grpc.Channel) -> Any:
    """The stub of a `role` instance's service (prefill, decode or colocated), for its `Stats` RPC."""
    from pdserve.v1 import colocated_pb2_grpc, decode_pb2_grpc, prefill_pb2_grpc

    if role == "prefill":
        return prefill_pb2_grpc.PrefillStub(channel)
    if role == "decode":
        return decode_pb2_grpc.DecodeStub(channel)
    if role == "colocated":
        return colocated_pb2_grpc.ColocatedStub(channel)
    raise ValueError(f"no instance role {role!r}")


def instance_stats(
    redis_url: str,
    role: str | None = None,
    *,
    cluster: str = "default",
    tls: TLSFiles | None = None,
    channel: Callable[[str], grpc.Channel] | None = None,
    timeout_s: float = 10.0,
    skip_unreachable: bool = False,
) -> dict[str, Any]:
    """Every registered instance's (of `role`, or all) `Stats` answer (common_pb2.InstanceStats), by
    instance id; `channel(address)` opens the channel (default: insecure). With `skip_unreachable`, an
    instance whose call fails is left out (a killed one stays registered until its TTL runs out)."""
    from coordinator.registry import Registry
    from pdserve.v1 import common_pb2

    registry = Registry(redis_url, cluster, tls=tls)
    try:
        instances = registry.instances(role)
    finally:
        registry.close()
    out = {}
    for inst in instances:
        with (channel or grpc.insecure_channel)(inst.grpc_address) as ch:
            try:
                out[inst.instance_id] = stats_stub(inst.role, ch).Stats(
                    common_pb2.InstanceStatsRequest(), timeout=timeout_s
                )
            except grpc.RpcError:
                if not skip_unreachable:
                    raise
    return out


@dataclass
class LocalCluster:
    cfg: ClusterConfig
    redis: RedisServer | None = None
    redis_url: str = ""
    gateway_address: str = ""
    http_address: str = ""  # host:port of the OpenAI-compatible HTTP API ("" without one)
    children: list[Child] = field(default_factory=list)
    retiring: list[Child] = field(default_factory=list)  # drained on purpose, not yet exited
    _next_device: int = 0

    # ---- start ----------------------------------------------------------------------------
    def start(self, timeout_s: float = 180.0) -> LocalCluster:
        cfg = self.cfg
        if cfg.redis_url:
            self.redis_url = cfg.redis_url
        else:
            self.redis = RedisServer(cfg.host, tls=cfg.tls, preexec_fn=self._preexec())
            self.redis_url = self.redis.url
        port = cfg.port or free_port(cfg.host)
        self.gateway_address = f"{cfg.host}:{port}"
        ranks = [cfg.layout(role)[0] * cfg.layout(role)[1] for role in cfg.roles]
        self._devices = assign_devices(len(cfg.roles), cfg.cpus, cfg.use_cuda, cfg.share_cuda, ranks)
        try:
            for role in cfg.roles:
                self.add_instance(role)
            coord = [
                sys.executable,
                "-m",
                "coordinator",
                "--model",
                cfg.model_dir,
                "--redis-url",
                self.redis_url,
            ]
            coord += ["--cluster", cfg.cluster, "--host", cfg.host, "--port", str(port)]
            coord += [
                "--expect-prefill",
                str(1 if cfg.autoplan else cfg.prefill),  # autoplan may drain down to one of each
                "--expect-decode",
                str(1 if cfg.autoplan else cfg.decode),
                "--codec",
                cfg.codec,
                "--max-kl",
                str(cfg.max_kl),
            ]
            if cfg.colocated:
                coord += ["--colocated", "--expect-colocated", str(cfg.colocated)]
            coord += ["--local-prefill", cfg.local_prefill]
            coord += ["--local-prefill-max-tokens", str(cfg.local_prefill_max_tokens)]
            if cfg.layerwise != "auto":
                coord += ["--layerwise", cfg.layerwise]
            if not cfg.token_stream:
                coord += ["--token-stream", "off"]
            if cfg.coordinator_cpus:
                coord += ["--cpus", ",".join(map(str, cfg.coordinator_cpus))]
            coord += cfg.tls.as_args()
            if cfg.http_port is not None:
                http_port = cfg.http_port or free_port(cfg.host)
                self.http_address = f"{cfg.host}:{http_port}"
                coord += ["--http-port", str(http_port)]
            for key in cfg.api_keys:
                coord += ["--api-key", key]
            if cfg.api_key_file:
                coord += ["--api-key-file", cfg.api_key_file]
            coord += ["--failover-wait", str(cfg.failover_wait_s), "--max-queue", str(cfg.max_queue)]
            coord += ["--kv-budget", str(cfg.kv_budget)]
            if cfg.plan_path:
                coord += ["--plan", cfg.plan_path]
                coord += ["--replan-interval", str(cfg.replan_interval_s)]
            if cfg.autoplan:
                coord += ["--autoplan"]
            self._spawn("coordinator", coord)
            self.wait_serving(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def add_instance(
        self,
        role: str,
        device_args: list[str] | None = None,
        layout: tuple[int, int] | None = None,
        instance_id: str | None = None,
    ) -> Child:
        """Start one more prefill/decode/colocated instance (also used to replace a dead one). `layout`:
        its (tp, pp), default the role's (ClusterConfig.prefill_tp, ...); `instance_id`: its registry name
        (default: the plan's next name, or one the instance makes up)."""
        cfg = self.cfg
        name: list[str] = ["--instance-id", instance_id] if instance_id else []
        if device_args is None:
            if self._next_device < len(cfg.instance_ids) and not name:
                name = ["--instance-id", cfg.instance_ids[self._next_device]]
            device_args = self._devices[self._next_device % len(self._devices)]
            self._next_device += 1
        args = [
            sys.executable,
            "-m",
            f"{role}_service",
            "--model",
            cfg.model_dir,
            "--redis-url",
            self.redis_url,
        ]
        args += [
            "--cluster",
            cfg.cluster,
            "--host",
            cfg.host,
            "--transport",
            cfg.transport,
        ]
        args += [
            "--heartbeat-ttl",
            str(cfg.heartbeat_ttl_s),
            "--lease-ttl",
            str(cfg.lease_ttl_s),
            *device_args,
            *name,
        ]
        if layout is None:
            args += cfg.layout_args(role)
        elif layout[0] * layout[1] > 1:
            args += ["--tp", str(layout[0]), "--pp", str(layout[1])]
        if cfg.num_kv_blocks is not None:
            args += ["--num-kv-blocks", str(cfg.num_kv_blocks)]
        if role == "colocated" and cfg.chunk_tokens is not None:
            args += ["--chunk-tokens", str(cfg.chunk_tokens)]
        if cfg.tls.mutual:  # instances serve TLS only as mutual TLS
            args += cfg.tls.as_args()
        args += list(cfg.extra_instance_args)
        return self._spawn(role, args)

    def _preexec(self) -> Callable[[], None] | None:
        return parent_death_signal() if self.cfg.die_with_launcher else None

    def _popen(self, args: list[str], log_path: str | None) -> subprocess.Popen:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - owned by the child process
        try:
            return subprocess.Popen(
                args,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                start_new_session=True,
                preexec_fn=self._preexec(),
            )
        finally:
            if out is not None:
                out.close()

    def _spawn(self, role: str, args: list[str]) -> Child:
        log_path = None
        if self.cfg.log_dir:
            os.makedirs(self.cfg.log_dir, exist_ok=True)
            log_path = os.path.join(self.cfg.log_dir, f"{role}-{len(self.children)}.log")
        child = Child(role, self._popen(args, log_path), args, log_path)
        self.children.append(child)
        log.info("started %s pid %d", role, child.proc.pid)
        return child

    def restart(self, child: Child) -> None:
        """Start an exited child again with the same arguments (and log file), in the same slot."""
        assert child.proc.poll() is not None, "restart of a running process"
        child.proc = self._popen(child.args, child.log_path)
        child.restarts += 1
        log.info("restarted %s as pid %d (restart %d)", child.role, child.proc.pid, child.restarts)

    def gateway_channel(self) -> grpc.Channel:
        """A channel to the gateway as a client makes it: TLS (verified against the CA, or the system's roots
        without one) when the gateway has a certificate."""
        options = [("grpc.enable_http_proxy", 0)]
        if not self.cfg.tls.enabled:
            return grpc.insecure_channel(self.gateway_address, options=options)
        creds = channel_credentials(TLSFiles(ca=self.cfg.tls.ca))
        return grpc.secure_channel(self.gateway_address, creds, options=options)

    def instance_channel(self, address: str) -> grpc.Channel:
        """A channel to an instance's gRPC server, presenting the cluster certificate under mutual TLS."""
        options = [("grpc.enable_http_proxy", 0)]
        if not self.cfg.tls.mutual:
            return grpc.insecure_channel(address, options=options)
        return grpc.secure_channel(address, channel_credentials(self.cfg.tls), options=options)

    def pass_cpu(self, role: str) -> dict[str, Any]:
        """Each registered `role` instance's step-thread CPU per pass kind so far (engine.step_loop.PassCpu,
        from its Stats RPC), by instance id."""
        from pdserve.instance import pass_cpu_from_proto

        stats = instance_stats(
            self.redis_url, role, cluster=self.cfg.cluster, tls=self.cfg.tls, channel=self.instance_channel
        )
        return {iid: pass_cpu_from_proto(st) for iid, st in stats.items()}

    def health(self) -> str:
        """The gateway's overall health status name (SERVING, NOT_SERVING, ...), or UNREACHABLE."""
        with self.gateway_channel() as ch:
            try:
                # types-grpcio-health-checking's HealthStub lacks the Check/Watch callables its __init__ sets
                resp = health_pb2_grpc.HealthStub(ch).Check(  # type: ignore[attr-defined]
                    health_pb2.HealthCheckRequest(service=""), timeout=2.0
                )
            except grpc.RpcError:
                return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_serving(self, timeout_s: float) -> None:
        """Block until the gateway's standard health service says SERVING."""
        deadline = time.monotonic() + timeout_s
        with self.gateway_channel() as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                dead = [c for c in self.children if c.proc.poll() is not None]
                if dead:
                    c = dead[0]
                    raise RuntimeError(
                        f"{c.role} exited with code {c.proc.returncode} during start ({c.log_path or 'see output'})"
                    )
                try:
                    # (the stubs' HealthStub lacks the Check callable its __init__ sets)
                    resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)  # type: ignore[attr-defined]
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"cluster not SERVING on {self.gateway_address} within {timeout_s:.0f}s")

    # ---- scale (pdserve up --autoplan) -------------------------------------------------------
    def scale(self, prefill: int, decode: int) -> list[str]:
        """Run `prefill` prefill and `decode` decode instances named as a plan names them (prefill-0, ...):
        start the missing names (each on the next device set, round-robin), drain the others (SIGTERM: an
        instance finishes what it has, up to its drain bound, and leaves the registry). Returns one line
        per change."""
        changes = []
        for role, want in (("prefill", prefill), ("decode", decode)):
            names = {f"{role}-{k}" for k in range(max(1, want))}
            mine = [c for c in self.children if c.role == role]
            have = {c.instance_id for c in mine}
            for c in mine:
                if c.instance_id not in names:
                    self.retire(c)
                    changes.append(f"draining {role} {c.instance_id or c.proc.pid}")
            for name in sorted(names - have, key=lambda n: int(n.rsplit("-", 1)[1])):
                self.add_instance(role, instance_id=name)
                changes.append(f"started {role} {name}")
        return changes

    def retire(self, child: Child) -> None:
        """Stop `child` for good (not a failure: the supervisor does not restart it): SIGTERM, and reap it
        once it has drained (`reap`; `stop` waits for it)."""
        self.children.remove(child)
        self.retiring.append(child)
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)

    def reap(self) -> None:
        """Forget retired children that have exited."""
        self.retiring = [c for c in self.retiring if c.proc.poll() is None]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.children:
            out[c.role] = out.get(c.role, 0) + 1
        return out

    def pids(self) -> list[int]:
        """Process ids of the running processes this cluster started: its children and its private Redis."""
        return list(self.named_pids().values())

    def named_pids(self) -> dict[str, int]:
        """The running processes this cluster started by name: "<role>-<slot>" per child (retiring ones
        "<role>-<slot>-retiring"), "redis" for its private Redis."""
        out = {f"{c.role}-{i}": c.proc.pid for i, c in enumerate(self.children) if c.proc.poll() is None}
        out |= {
            f"{c.role}-{i}-retiring": c.proc.pid for i, c in enumerate(self.retiring) if c.proc.poll() is None
        }
        return out | ({"redis": self.redis.pid} if self.redis is not None else {})

    # ---- stop -----------------------------------------------------------------------------
    def kill(self, child: Child, sig: int = signal.SIGKILL) -> None:
        """Kill one child on purpose (failure tests); it is no longer part of the cluster."""
        if child.proc.poll() is None:
            child.proc.send_signal(sig)
            child.proc.wait(10)
        self.children.remove(child)

    def stop(self, timeout_s: float = 15.0) -> None:
        order = {"coordinator": 0, "prefill": 1, "decode": 1}
        everyone = [*self.children, *self.retiring]
        for rank in (0, 1):
            group = [c for c in everyone if order.get(c.role, 1) == rank and c.proc.poll() is None]
            for c in group:
                c.proc.send_signal(signal.SIGTERM)
            for c in group:
                try:
                    c.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s pid %d ignored SIGTERM; killing it", c.role, c.proc.pid)
                    c.proc.kill()
                    c.proc.wait()
        self.retiring = []
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5  # restarts per process over the cluster's life; 0 = never restart
    backoff_s: float = 0.5  # wait before a process's first restart; doubles with each of its restarts
    max_backoff_s: float = 8.0


class Supervisor:
    """Restarts the cluster's children (and its private Redis) that exit, per `RestartPolicy`. Call
    `check()` periodically from the thread that started the cluster (with `die_with_launcher`, the parent-
    death signal follows that thread); it never blocks."""

    def __init__(self, cluster: LocalCluster, policy: RestartPolicy, report: Callable[[str], None]) -> None:
        self.cluster = cluster
        self.policy = policy
        self.report = report  # a line for the user per event (pdserve up prints it)
        self._due: dict[int, float] = {}  # id(child) -> when to restart it
        self._given_up: set[int] = set()
        self.restarts = 0

    def check(self) -> None:
        now = time.monotonic()
        redis = self.cluster.redis
        if redis is not None and not redis.alive():
            self.report("redis-server exited; restarting it on the same port (instances re-register)")
            try:
                redis.restart()
                self._count("redis")
            except RuntimeError as exc:  # e.g. the port was taken meanwhile (an outgoing connection): retry
                self.report(f"redis-server restart failed ({exc}); retrying")
        for c in list(self.cluster.children):
            if c.proc.poll() is None or id(c) in self._given_up:
                continue
            due = self._due.get(id(c))
            if due is None:
                if c.restarts >= self.policy.max_restarts:
                    self._given_up.add(id(c))
                    self.report(
                        f"{c.role} pid {c.proc.pid} exited with code {c.proc.returncode}; restart budget "
                        f"({self.policy.max_restarts}) used up, not restarting it"
                    )
                    continue
                delay = min(self.policy.max_backoff_s, self.policy.backoff_s * 2**c.restarts)
                self._due[id(c)] = now + delay
                self.report(
                    f"{c.role} pid {c.proc.pid} exited with code {c.proc.returncode}; restarting in {delay:.1f}s "
                    f"(restart {c.restarts + 1} of {self.policy.max_restarts})"
                )
            elif now >= due:
                del self._due[id(c)]
                self.cluster.restart(c)
                self._count(c.role)
                self.report(f"{c.role} restarted as pid {c.proc.pid}")

    def _count(self, role: str) -> None:
        self.restarts += 1
        telemetry.instruments().restart(role)


class Autoplanner:
    """`pdserve up --autoplan`: every `period_s`, read the coordinator's planner record (the registry) and
    start or drain instances until the running counts are its `in_force` counts (LocalCluster.scale).
    Layouts (TP/PP) and placement of a new plan are not applied: instances keep this cluster's layout and
    new ones take the next device set. Call `check()` from the thread that started the cluster."""

    def __init__(self, cluster: LocalCluster, report: Callable[[str], None], period_s: float = 2.0) -> None:
        self.cluster = cluster
        self.report = report
        self.period_s = period_s
        self._next = 0.0
        self._registry: Any = None

    def check(self) -> None:
        now = time.monotonic()
        self.cluster.reap()
        if now < self._next:
            return
        self._next = now + self.period_s
        from coordinator.registry import Registry

        if self._registry is None:
            self._registry = Registry(
                self.cluster.redis_url, self.cluster.cfg.cluster, tls=self.cluster.cfg.tls
            )
        try:
            status = self._registry.planner()
        except Exception as exc:  # noqa: BLE001 - Redis restarting: try again next period
            log.warning("autoplan: cannot read the planner record: %s", exc)
            return
        want = (status or {}).get("in_force")
        if not want:
            return
        have = self.cluster.counts()
        if (have.get("prefill", 0), have.get("decode", 0)) == (want["prefill"], want["decode"]):
            return
        self.report(
            f"plan in force: {want['prefill']} prefill + {want['decode']} decode instances "
            f"({status.get('reason', '')}); running {have.get('prefill', 0)} + {have.get('decode', 0)}"
        )
        for line in self.cluster.scale(int(want["prefill"]), int(want["decode"])):
            self.report(line)

    def close(self) -> None:
        if self._registry is not None:
            self._registry.close()


def run_forever(cluster: LocalCluster, policy: RestartPolicy | None = None) -> int:
    """`pdserve up`: serve until Ctrl-C / SIGTERM, restarting children that exit (per `policy`)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster.start()
    cfg = cluster.cfg
    shape = f"colocated {cfg.colocated}" if cfg.colocated else f"prefill {cfg.prefill}, decode {cfg.decode}"
    security = ""
    if cfg.tls.enabled:
        security = ", TLS gateway" + (", mutual TLS inside" if cfg.tls.mutual else "")
    print(
        f"pdserve up: serving on {cluster.gateway_address} ({shape}, redis {cluster.redis_url}{security})",
        flush=True,
    )
    if cluster.http_address:
        print(f"pdserve up: OpenAI-compatible HTTP API on http://{cluster.http_address}/v1", flush=True)
    supervisor = Supervisor(
        cluster, policy or RestartPolicy(), lambda line: print(f"pdserve up: {line}", flush=True)
    )
    autoplan = Autoplanner(cluster, lambda line: print(f"pdserve up: autoplan: {line}", flush=True))
    try:
        while not stop.wait(0.2):
            supervisor.check()
            if cfg.autoplan:
                autoplan.check()
    finally:
        autoplan.close()
        print("pdserve up: stopping", flush=True)
        cluster.stop()
    return 0
