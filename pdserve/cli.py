"""The `pdserve` command: `up` (local cluster), `generate` (stream a completion), `bench` (benchmarks),
`calibrate` (a model's KV codec calibration), `trace` (one request's spans as a waterfall), `certs`
(development TLS certificates), `health` (a process's gRPC health status, for probes), `plan` / `topology` /
`profile` / `status` (the planner and the running cluster, pdserve/plan_cli.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import grpc

from coordinator.config import LAYERWISE_POLICIES, LOCAL_PREFILL_POLICIES


def _model(path: str | None) -> str:
    """A --model flag: the named directory (checked) or the shipped model; ModelNotFoundError otherwise
    (`main` prints it and exits 2)."""
    from engine.model_dir import resolve_model_dir

    return resolve_model_dir(path)


def _up_tls(a: argparse.Namespace):  # -> pdserve.tls.TLSFiles
    """--tls-dir DIR is DIR/cert.pem, DIR/key.pem and DIR/ca.pem (what `pdserve certs DIR` writes); the
    single flags override its files."""
    import os

    from pdserve.tls import TLSFiles

    d = a.tls_dir
    return TLSFiles(
        cert=a.tls_cert or (os.path.join(d, "cert.pem") if d else ""),
        key=a.tls_key or (os.path.join(d, "key.pem") if d else ""),
        ca=a.tls_ca or (os.path.join(d, "ca.pem") if d else ""),
    )


def cmd_up(a: argparse.Namespace) -> int:
    from engine.device import parse_cpus
    from pdserve.launcher import ClusterConfig, LocalCluster, RestartPolicy, run_forever
    from pdserve.tls import TLSConfigError

    try:
        tls = _up_tls(a)
        tls.require_cluster_identity()
    except TLSConfigError as exc:
        print(f"pdserve up: {exc}", file=sys.stderr)
        return 2

    if a.plan:
        import json

        from pdserve.plan_cli import LAYOUT_FLAGS, apply_layouts, up_overrides

        try:
            with open(a.plan) as f:
                planned = up_overrides(json.load(f), cpu=a.cpu or not _cuda_visible())
            apply_layouts(a, planned)
        except (OSError, ValueError) as exc:
            print(f"pdserve up: --plan {a.plan}: {exc}", file=sys.stderr)
            return 2
        skip = {"cpus", "instance_ids", *LAYOUT_FLAGS}
        a = argparse.Namespace(**{**vars(a), **{k: v for k, v in planned.items() if k not in skip}})
        a.cpus = ",".join(map(str, planned["cpus"]))
        plan_args: dict[str, Any] = {
            "instance_ids": planned["instance_ids"],
            "plan_path": os.path.abspath(a.plan),
            "autoplan": a.autoplan,
        }
    elif a.autoplan:
        print("pdserve up: --autoplan needs --plan (the plan to start from)", file=sys.stderr)
        return 2
    else:
        plan_args = {}
    model_dir = _model(a.model)
    layout_error = _check_layouts(a, model_dir)
    if layout_error:
        print(f"pdserve up: {layout_error}", file=sys.stderr)
        return 2
    cfg = ClusterConfig(
        model_dir=model_dir,
        host=a.host,
        port=a.port,
        prefill=a.prefill,
        decode=a.decode,
        prefill_tp=a.prefill_tp,
        prefill_pp=a.prefill_pp,
        decode_tp=a.decode_tp,
        decode_pp=a.decode_pp,
        redis_url=a.redis_url,
        cluster=a.cluster,
        cpus=parse_cpus(a.cpus) if a.cpus else (),
        use_cuda=not a.cpu,
        share_cuda=a.share_cuda,
        transport=a.transport,
        codec=a.codec,
        max_kl=a.max_kl,
        num_kv_blocks=a.num_kv_blocks,
        log_dir=a.log_dir,
        colocated=a.replicas if a.colocated else 0,
        chunk_tokens=a.chunk_tokens,
        local_prefill=a.local_prefill,
        local_prefill_max_tokens=a.local_prefill_max_tokens,
        layerwise=a.layerwise,
        token_stream=a.token_stream == "on",
        tls=tls,
        http_port=None if a.http_port < 0 else a.http_port,
        api_keys=tuple(a.api_key),
        api_key_file=a.api_key_file,
        max_queue=a.max_queue,
        kv_budget=a.kv_budget,
        failover_wait_s=a.failover_wait,
        die_with_launcher=True,
        **plan_args,
    )
    policy = RestartPolicy(max_restarts=a.max_restarts, backoff_s=a.restart_backoff)
    return run_forever(LocalCluster(cfg), policy)


def _check_layouts(a: argparse.Namespace, model_dir: str) -> str:
    """Why --prefill-tp/-pp or --decode-tp/-pp cannot shard the model ("" if they can)."""
    from engine.config import ModelConfig
    from engine.parallel.layout import Layout, LayoutError

    layouts = {"prefill": (a.prefill_tp, a.prefill_pp), "decode": (a.decode_tp, a.decode_pp)}
    if all(tp * pp == 1 for tp, pp in layouts.values()):
        return ""
    if a.colocated:
        return "--prefill-tp/--prefill-pp/--decode-tp/--decode-pp do not apply to --colocated"
    try:
        mc = ModelConfig.from_hf_dir(model_dir)
    except (OSError, ValueError) as exc:
        return f"cannot read the model's config: {exc}"
    for role, (tp, pp) in layouts.items():
        try:
            Layout(tp, pp).check(mc.num_layers, mc.num_heads, mc.num_kv_heads)
        except LayoutError as exc:
            return f"--{role}-tp {tp} --{role}-pp {pp}: {exc}"
        if mc.intermediate_size % tp:
            return f"--{role}-tp {tp} does not divide the model's intermediate size {mc.intermediate_size}"
    return ""


def _cuda_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except ImportError:
        return False


def cmd_certs(a: argparse.Namespace) -> int:
    from pdserve.certs import write_dev_certs

    hosts = tuple(dict.fromkeys(["localhost", "127.0.0.1", *a.host]))
    try:
        files = write_dev_certs(a.dir, hosts=hosts, days=a.days, overwrite=a.force)
    except FileExistsError as exc:
        print(f"pdserve certs: {exc} (--force replaces them)", file=sys.stderr)
        return 1
    print(f"pdserve certs: CA {files.ca}, certificate {files.cert} + key {files.key} for {', '.join(hosts)}")
    print(f"  pdserve up --tls-dir {a.dir}")
    print(f"  pdserve generate --tls-ca {files.ca} 'def f(x):'")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    """`pdserve bench NAME ARGS...` runs `bench.NAME.main(ARGS)` (same as `python -m bench.NAME ARGS`)."""
    import importlib
    import re

    if not re.fullmatch(r"[a-z][a-z0-9_]*", a.name):
        print(f"pdserve bench: bad benchmark name {a.name!r}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"bench.{a.name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"bench.{a.name}":
            raise
        print(f"pdserve bench: no benchmark named {a.name!r} (no module bench.{a.name})", file=sys.stderr)
        return 2
    if not hasattr(module, "main"):
        print(f"pdserve bench: bench.{a.name} is not a benchmark (no main)", file=sys.stderr)
        return 2
    return int(module.main(a.args) or 0)


def cmd_calibrate(a: argparse.Namespace) -> int:
    """`pdserve calibrate MODEL_DIR`: the KV codecs' calibration files, written beside the model."""
    from calibration.calibrate import calibrate

    calibrate(a.model_dir, quick=a.quick, profiles=not a.no_profiles)
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    if a.local:
        from engine.local import LocalEngine
        from engine.params import SamplingParams, generation_defaults

        model_dir = _model(a.model)
        engine = LocalEngine.from_model_dir(model_dir)
        rp = a.repetition_penalty
        if rp is None:  # as the cluster does: the model's generation_config default
            rp = generation_defaults(model_dir).get("repetition_penalty", 1.0)
        params = SamplingParams(
            max_tokens=a.max_tokens,
            temperature=a.temperature,
            top_p=a.top_p,
            top_k=a.top_k,
            seed=a.seed,
            stop=tuple(a.stop),
            ignore_eos=a.ignore_eos,
            repetition_penalty=rp,
        )
        sys.stdout.write(engine.generate_text([a.prompt], [params])[0])
        sys.stdout.write("\n")
        return 0

    from pdserve.client import Client
    from pdserve.tls import TLSConfigError

    try:
        client = Client(a.addr, a.api_key, tls_ca=a.tls_ca, tls_cert=a.tls_cert, tls_key=a.tls_key)
    except TLSConfigError as exc:
        print(f"pdserve generate: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            for msg in client.stream(
                a.prompt,
                max_tokens=a.max_tokens,
                temperature=a.temperature,
                top_p=a.top_p,
                top_k=a.top_k,
                seed=a.seed,
                stop=a.stop,
                ignore_eos=a.ignore_eos,
                repetition_penalty=a.repetition_penalty,
                max_kv_kl=a.max_kv_kl,
                request_id=a.request_id,
                timeout=a.timeout,
            ):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
        except grpc.RpcError as exc:
            print(f"\npdserve generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    sys.stdout.write("\n")
    return 0


def cmd_health(a: argparse.Namespace) -> int:
    """Ask ADDR's standard gRPC health service (grpc.health.v1) for `--service` ("" = the whole process);
    print the status; exit 0 only for SERVING (1 otherwise, also when unreachable; 2 for bad TLS files)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from pdserve.tls import TLSConfigError, TLSFiles, client_channel

    try:
        tls = TLSFiles(cert=a.tls_cert or "", key=a.tls_key or "", ca=a.tls_ca or "")
    except TLSConfigError as exc:
        print(f"pdserve health: {exc}", file=sys.stderr)
        return 2
    with client_channel(a.addr, tls, [("grpc.enable_http_proxy", 0)]) as channel:
        try:
            # types-grpcio-health-checking's HealthStub lacks the Check callable its __init__ sets
            resp = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=a.service), timeout=a.timeout
            )
        except grpc.RpcError as exc:
            print(f"pdserve health: {a.addr}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{a.addr} {status}")
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_operator(a: argparse.Namespace) -> int:
    """Run the PDCluster Kubernetes operator (infra/k8s/README.md) until interrupted."""
    try:
        from coordinator.operator.handlers import run_operator
    except ImportError as exc:
        print(
            f"pdserve operator: {exc} (install the operator extra: pip install 'pdserve[operator]')",
            file=sys.stderr,
        )
        return 2
    run_operator(namespaces=a.namespace or None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="run a local cluster: redis, coordinator, prefill and decode instances")
    up.add_argument("--model", default=None, help="HF model dir (default: the shipped model)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=50051, help="gateway gRPC port (0 = a free one)")
    up.add_argument("--prefill", type=int, default=1, help="prefill instances")
    up.add_argument("--decode", type=int, default=1, help="decode instances")
    for role in ("prefill", "decode"):
        up.add_argument(
            f"--{role}-tp",
            type=int,
            default=1,
            help=f"tensor-parallel ranks of each {role} instance (default 1; each rank gets its own core set "
            "or CUDA device)",
        )
        up.add_argument(
            f"--{role}-pp",
            type=int,
            default=1,
            help=f"pipeline-parallel stages of each {role} instance (default 1)",
        )
    up.add_argument("--redis-url", default=None, help="use this Redis instead of starting a private one")
    up.add_argument("--cluster", default="default", help="registry namespace")
    up.add_argument("--cpus", default="", help="CPU cores to divide among instances (default: all)")
    up.add_argument("--cpu", action="store_true", help="never use CUDA devices")
    up.add_argument(
        "--share-cuda",
        action="store_true",
        help="with fewer CUDA devices than instances, share them round-robin (development; phases interfere)",
    )
    up.add_argument("--transport", default="auto", help="KV transport: auto | ucx | tcp | shm")
    up.add_argument("--codec", default="auto", help="KV codec: auto (per link) | raw | int8 | fp8 | cachegen")
    up.add_argument(
        "--max-kl",
        type=float,
        default=0.01,
        help="quality floor of --codec auto: mean per-token KL (nats) a lossy codec may add (default 0.01)",
    )
    up.add_argument("--num-kv-blocks", type=int, default=None)
    up.add_argument("--log-dir", default=None, help="write each process's log here")
    up.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        help="restarts of each process that exits (and of the private Redis) before it stays down (0: never)",
    )
    up.add_argument(
        "--restart-backoff",
        type=float,
        default=0.5,
        help="seconds before a process's first restart; doubles with each of its restarts (capped at 8)",
    )
    up.add_argument(
        "--max-queue",
        type=int,
        default=0,
        help="gateway: requests waiting for their first token beyond which a new one gets RESOURCE_EXHAUSTED "
        "at once (default 0: no limit)",
    )
    up.add_argument(
        "--kv-budget",
        type=float,
        default=0.0,
        help="gateway: KV budget, a multiple of the decode instances' KV capacity; a request that would pass "
        "it (its prompt + max_tokens added to those in flight) gets RESOURCE_EXHAUSTED at once (default 0: off)",
    )
    up.add_argument(
        "--failover-wait",
        type=float,
        default=10.0,
        help="gateway: seconds a request waits for a restarted instance of a role to register (default 10)",
    )
    up.add_argument(
        "--colocated",
        action="store_true",
        help="the baseline: colocated instances (prefill + decode in one engine) instead of prefill/decode",
    )
    up.add_argument("--replicas", type=int, default=1, help="with --colocated: colocated instances")
    up.add_argument(
        "--chunk-tokens",
        type=int,
        default=None,
        help="with --colocated: chunked prefill, this many tokens per step (default: whole prompts)",
    )
    up.add_argument(
        "--local-prefill",
        choices=LOCAL_PREFILL_POLICIES,
        default="busy",
        help="conditional disaggregation: let decode instances prefill short prompts (busy, the default: only "
        "while every prefill instance is busy; off: always on a prefill instance)",
    )
    up.add_argument(
        "--local-prefill-max-tokens",
        type=int,
        default=128,
        help="with --local-prefill: the longest prompt a decode instance may prefill",
    )
    up.add_argument(
        "--layerwise",
        choices=LAYERWISE_POLICIES,
        default="auto",
        help="layer-wise KV streaming, decode pulling while prefill computes (auto: only from CUDA prefill "
        "instances)",
    )
    up.add_argument(
        "--token-stream",
        choices=("on", "off"),
        default="on",
        help="decode tokens back to the gateway on one stream per decode instance, each step's tokens of all "
        "requests in one message (on), or one gRPC message per token per request (off)",
    )
    up.add_argument("--tls-cert", default="", help="PEM certificate every process presents (with --tls-key)")
    up.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    up.add_argument(
        "--tls-ca",
        default="",
        help="PEM cluster CA: mutual TLS inside the cluster (Redis TLS-only, instances require client certs)",
    )
    up.add_argument(
        "--tls-dir", default="", help="DIR/cert.pem, DIR/key.pem, DIR/ca.pem (as `pdserve certs DIR` writes)"
    )
    up.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="OpenAI-compatible HTTP API port (0 = a free one, -1 = no HTTP server)",
    )
    up.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="API key clients must send (repeatable; also --api-key-file, PDSERVE_API_KEY); none = open",
    )
    up.add_argument("--api-key-file", default=None, help="file of API keys, one per line ('#' comments)")
    up.add_argument(
        "--plan",
        default=None,
        help="start what a `pdserve plan` JSON says (instance counts, devices, codec); overrides "
        "--prefill/--decode/--cpus/--codec",
    )
    up.add_argument(
        "--autoplan",
        action="store_true",
        help="with --plan: the coordinator replans on the live workload and pdserve up starts and drains "
        "instances to the counts it recommends (layouts and placement are not changed)",
    )
    up.set_defaults(fn=cmd_up)

    g = sub.add_parser("generate", help="stream a completion (from a cluster, or --local in this process)")
    g.add_argument("prompt")
    g.add_argument("--addr", default="127.0.0.1:50051")
    g.add_argument(
        "--local", action="store_true", help="run the model in this process, no cluster (the reference)"
    )
    g.add_argument("--model", default=None)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[])
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="> 0, 1 = off (default: the model's generation_config.json, else 1)",
    )
    g.add_argument(
        "--max-kv-kl",
        type=float,
        default=None,
        help="quality floor of the KV hand-off: mean per-token KL (nats) its codec may add; 0 = lossless "
        "(default: the cluster's --max-kl / --codec)",
    )
    g.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    g.add_argument("--request-id", default=None, help="the request's id (for `pdserve trace ID`)")
    g.add_argument("--tls-ca", default=None, help="PEM CA that signed the gateway's certificate (TLS)")
    g.add_argument("--tls-cert", default=None, help="PEM client certificate, if the server asks for one")
    g.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    g.add_argument(
        "--api-key",
        default=os.environ.get("PDSERVE_API_KEY") or None,
        help="API key of the gateway (default: the PDSERVE_API_KEY variable)",
    )
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("certs", help="write a development CA and a certificate + key for TLS (DIR/*.pem)")
    c.add_argument("dir")
    c.add_argument(
        "--host",
        action="append",
        default=[],
        help="another name or IP address the certificate is valid for (repeat; localhost and 127.0.0.1 "
        "are always in)",
    )
    c.add_argument("--days", type=int, default=365)
    c.add_argument("--force", action="store_true", help="replace existing files")
    c.set_defaults(fn=cmd_certs)

    b = sub.add_parser(
        "bench", help="run a benchmark: pdserve bench compare --quick (prints one JSON object)"
    )
    b.add_argument("name", help="benchmark module in bench/, e.g. compare")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    b.set_defaults(fn=cmd_bench)

    h = sub.add_parser(
        "health", help="exit 0 if ADDR's gRPC health service says SERVING (probes, HEALTHCHECK)"
    )
    h.add_argument("addr", help="host:port of a coordinator or an instance")
    h.add_argument("--service", default="", help='service name to ask about ("" = the whole process)')
    h.add_argument("--timeout", type=float, default=3.0, help="seconds")
    h.add_argument("--tls-ca", default=None, help="PEM CA that signed the server's certificate (TLS)")
    h.add_argument("--tls-cert", default=None, help="PEM client certificate (instances under mutual TLS)")
    h.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    h.set_defaults(fn=cmd_health)

    op = sub.add_parser("operator", help="run the Kubernetes operator of PDCluster resources (infra/k8s)")
    op.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable; default: all)",
    )
    op.set_defaults(fn=cmd_operator)

    from pdserve import trace_cli

    c = sub.add_parser(
        "calibrate",
        help="calibrate a model's KV codecs (tables, transform, codec profiles), written beside it",
    )
    c.add_argument("model_dir", help="the model directory (config.json, model.safetensors, heldout.txt)")
    c.add_argument("--quick", action="store_true", help="small calibration sets (smoke tests only)")
    c.add_argument("--no-profiles", action="store_true", help="skip the codec profiles (codec_profiles.json)")
    c.set_defaults(fn=cmd_calibrate)

    t = sub.add_parser("trace", help="print a request's trace as a waterfall (from a span file or Jaeger)")
    trace_cli.add_arguments(t)
    t.set_defaults(fn=trace_cli.run)

    from pdserve import plan_cli

    pl = sub.add_parser(
        "plan", help="plan a deployment (layouts, counts, placement, codecs): one JSON object"
    )
    plan_cli.add_plan_arguments(pl)
    pl.set_defaults(fn=plan_cli.cmd_plan)
    to = sub.add_parser(
        "topology",
        help="this machine's topology JSON, or several hosts' measured with --probe (for pdserve plan)",
    )
    plan_cli.add_topology_arguments(to)
    to.set_defaults(fn=plan_cli.cmd_topology)
    pr = sub.add_parser("profile", help="time the engine and fit the planner's latency model (profile JSON)")
    plan_cli.add_profile_arguments(pr)
    pr.set_defaults(fn=plan_cli.cmd_profile)
    st = sub.add_parser("status", help="print the running cluster (instances, roles, devices, load) as JSON")
    plan_cli.add_status_arguments(st)
    st.set_defaults(fn=plan_cli.cmd_status)
    return p


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from engine.model_dir import ModelNotFoundError

    try:
        code = args.fn(args)
    except ModelNotFoundError as exc:
        print(f"pdserve {args.cmd}: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)
