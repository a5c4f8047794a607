"""What TLS costs: gRPC over loopback plaintext vs TLS vs mutual TLS, and what encrypting the KV stream
would cost (AES-GCM in `cryptography`, which pdserve does not do; see docs/benchmarks.md).

gRPC: one server process per mode (certificates from pdserve.certs, as `pdserve up --tls-dir` uses),
serving a unary echo and a server stream of small messages (the gateway relays tokens as such messages).
This process measures, rounds interleaved across modes:
- `unary_us`: median round trip of a 64-byte echo on a warm channel;
- `stream_msgs_per_s`: 64-byte messages per second of a 2000-message server stream;
- `connect_ms`: median of a new channel's handshake + first echo.
Cluster (`--cluster`): two 1P1D clusters of the same model on the same cores, one plaintext, one with a TLS
gateway and mutual TLS inside (`pdserve up --tls-dir`'s setup); the same greedy requests, one at a time,
alternating between them: median TTFT and end-to-end latency seen by `pdserve.client`.
KV stream encryption: AES-256-GCM encrypt + decrypt of 1 MiB buffers (one layer of the shipped model's KV at
its full context in fp32) on one core, in GB/s of wall clock and GB per CPU-second.

    python -m bench.tls            # ~30 s; prints one JSON object
    python -m bench.tls --cluster  # + the cluster A/B (~2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from concurrent import futures
from typing import Any

import grpc

from bench.report import emit
from pdserve.certs import write_dev_certs
from pdserve.tls import TLSFiles, add_port, channel_credentials

SERVICE = "pdserve.bench.Echo"
MODES = ("plaintext", "tls", "mtls")
MSG = b"x" * 64


def _serve(mode: str, tls: TLSFiles, conn: Any) -> None:
    os.sched_setaffinity(0, {0})  # the client runs on core 1 (where there is one)

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    def stream(request: bytes, context: grpc.ServicerContext):
        n = int(request)
        for _ in range(n):
            yield MSG

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    files = TLSFiles() if mode == "plaintext" else tls
    port = add_port(server, "127.0.0.1:0", files, client_auth=mode == "mtls")
    server.start()
    conn.send(port)
    conn.recv()  # "stop"
    server.stop(None)


def _channel(mode: str, port: int, tls: TLSFiles) -> grpc.Channel:
    target = f"127.0.0.1:{port}"
    options = [("grpc.enable_http_proxy", 0)]
    if mode == "plaintext":
        return grpc.insecure_channel(target, options=options)
    client = TLSFiles(ca=tls.ca) if mode == "tls" else tls
    return grpc.secure_channel(target, channel_credentials(client), options=options)


def _echo(ch: grpc.Channel) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    return ch.unary_unary(f"/{SERVICE}/Echo")  # bytes both ways: no (de)serializers


def _grpc_round(mode: str, port: int, tls: TLSFiles, unary_n: int, stream_n: int) -> dict[str, float]:
    with _channel(mode, port, tls) as ch:
        echo = _echo(ch)
        stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = ch.unary_stream(f"/{SERVICE}/Stream")
        echo(MSG, timeout=10)  # connected and warm
        times = []
        for _ in range(unary_n):
            t0 = time.perf_counter()
            echo(MSG, timeout=10)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        got = sum(1 for _ in stream(str(stream_n).encode(), timeout=60))
        stream_s = time.perf_counter() - t0
        assert got == stream_n
    connects = []
    for _ in range(10):
        t0 = time.perf_counter()
        with _channel(mode, port, tls) as ch:
            _echo(ch)(MSG, timeout=10)
        connects.append(time.perf_counter() - t0)
    return {
        "unary_us": statistics.median(times) * 1e6,
        "stream_msgs_per_s": stream_n / stream_s,
        "connect_ms": statistics.median(connects) * 1e3,
    }


def measure_grpc(rounds: int, unary_n: int, stream_n: int) -> dict[str, dict[str, float]]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-tls-") as d:
        files = write_dev_certs(d)
        tls = TLSFiles(files.cert, files.key, files.ca)
        procs, conns, ports = [], {}, {}
        for mode in MODES:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(mode, tls, child), daemon=True)
            proc.start()
            procs.append(proc)
            conns[mode], ports[mode] = parent, parent.recv()
        samples: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        try:
            for r in range(rounds):
                order = MODES if r % 2 == 0 else MODES[::-1]
                for mode in order:
                    samples[mode].append(_grpc_round(mode, ports[mode], tls, unary_n, stream_n))
        finally:
            for mode in MODES:
                conns[mode].send("stop")
            for proc in procs:
                proc.join(10)
    out = {}
    for mode in MODES:
        keys = samples[mode][0].keys()
        out[mode] = {k: round(statistics.median(s[k] for s in samples[mode]), 2) for k in keys}
    for mode in ("tls", "mtls"):
        out[mode]["unary_x_plaintext"] = round(out[mode]["unary_us"] / out["plaintext"]["unary_us"], 3)
        out[mode]["stream_x_plaintext"] = round(
            out[mode]["stream_msgs_per_s"] / out["plaintext"]["stream_msgs_per_s"], 3
        )
    return out


def measure_aes_gcm(mib: int = 1, seconds: float = 2.0) -> dict[str, float]:
    """AEAD throughput on this core, GB of plaintext per second of wall clock and per CPU-second (the latter
    is what the cipher costs on a loaded host), on `mib`-MiB buffers: AES-256-GCM and, for a CPU without AES
    instructions, ChaCha20-Poly1305."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    data = os.urandom(mib << 20)
    ciphers: dict[str, AESGCM | ChaCha20Poly1305] = {
        "aes256gcm": AESGCM(AESGCM.generate_key(256)),
        "chacha20poly1305": ChaCha20Poly1305(ChaCha20Poly1305.generate_key()),
    }
    out = {}
    for name, cipher in ciphers.items():
        nonce = os.urandom(12)
        sealed = cipher.encrypt(nonce, data, None)
        for op, args in (("encrypt", data), ("decrypt", sealed)):
            fn = cipher.encrypt if op == "encrypt" else cipher.decrypt
            n, t0, c0 = 0, time.perf_counter(), time.process_time()
            while (elapsed := time.perf_counter() - t0) < seconds:
                fn(nonce, args, None)
                n += 1
            cpu_s = time.process_time() - c0
            out[f"{name}_{op}_GBps"] = round(n * len(data) / elapsed / 1e9, 2)
            out[f"{name}_{op}_GB_per_cpu_s"] = round(n * len(data) / cpu_s / 1e9, 2)
    return out


def measure_cluster(model_dir: str, n: int, max_tokens: int) -> dict[str, dict[str, float]]:
    from pdserve.client import Client
    from pdserve.launcher import ClusterConfig, LocalCluster

    prompts = [
        "def fibonacci(n):",
        "import os\nimport sys\n",
        "class Stack:\n    def __init__(self):\n",
        "for i in",
    ]
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-tls-") as d:
        files = write_dev_certs(d)
        tls = {"plaintext": TLSFiles(), "mtls": TLSFiles(files.cert, files.key, files.ca)}
        clusters = {}
        try:
            for mode, files_ in tls.items():
                cfg = ClusterConfig(
                    model_dir=model_dir, port=0, use_cuda=False, log_dir=f"{d}/{mode}", tls=files_
                )
                clusters[mode] = LocalCluster(cfg).start()
            clients = {
                "plaintext": Client(clusters["plaintext"].gateway_address),
                "mtls": Client(clusters["mtls"].gateway_address, tls_ca=files.ca),
            }
            samples: dict[str, dict[str, list[float]]] = {m: {"ttft_ms": [], "latency_ms": []} for m in tls}
            for i in range(-2, n):  # two warm-up rounds
                order = ("plaintext", "mtls") if i % 2 == 0 else ("mtls", "plaintext")
                for mode in order:
                    t0 = time.perf_counter()
                    ttft = None
                    stream = clients[mode].stream(
                        prompts[i % len(prompts)], max_tokens=max_tokens, ignore_eos=True
                    )
                    for _ in stream:
                        ttft = ttft if ttft is not None else time.perf_counter() - t0
                    if i >= 0 and ttft is not None:
                        samples[mode]["ttft_ms"].append(ttft * 1e3)
                        samples[mode]["latency_ms"].append((time.perf_counter() - t0) * 1e3)
            for client in clients.values():
                client.close()
        finally:
            for cluster in clusters.values():
                cluster.stop()
    out = {m: {k: round(statistics.median(v), 2) for k, v in s.items()} for m, s in samples.items()}
    for k in ("ttft_ms", "latency_ms"):
        out["mtls"][f"{k}_x_plaintext"] = round(out["mtls"][k] / out["plaintext"][k], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    from bench.report import stop_on_sigterm

    stop_on_sigterm()  # stop the clusters it starts on SIGTERM too
    p = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--unary", type=int, default=500, help="echo round trips per round and mode")
    p.add_argument(
        "--stream", type=int, default=2000, help="messages of the server stream per round and mode"
    )
    p.add_argument("--cluster", action="store_true", help="also the 1P1D cluster A/B (plaintext vs mTLS)")
    p.add_argument("--model", default=None, help="model of the cluster A/B (default: the shipped model)")
    p.add_argument("--requests", type=int, default=40, help="cluster A/B: requests per mode")
    p.add_argument("--max-tokens", type=int, default=16, help="cluster A/B: tokens per request")
    a = p.parse_args(argv)
    os.sched_setaffinity(0, {1 if len(os.sched_getaffinity(0)) > 1 else 0})  # the servers run on core 0
    result = {
        "bench": "tls",
        "cpus": os.cpu_count(),
        "grpc": measure_grpc(a.rounds, a.unary, a.stream),
        "kv_stream_encryption": measure_aes_gcm(),
    }
    if a.cluster:
        from engine.synth import default_model_dir

        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))  # the clusters split every core
        model = a.model or str(default_model_dir())
        result["cluster"] = measure_cluster(model, a.requests, a.max_tokens)
    emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
