"""An instance process (real redis-server, real prefill_service, real gRPC): bound to every interface, it
registers the address it was told to advertise (gRPC and KV), serves the standard gRPC health service
(SERVING once registered; service "liveness" SERVING while it runs), and `pdserve health` says so with its exit status. A model that does not exist
stops it at once with a message naming the path."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from coordinator.registry import Registry
from pdserve.redis_server import RedisServer, free_port
from pdserve.rpc import LIVENESS
from pdserve.v1 import common_pb2, prefill_pb2_grpc

ADVERTISED = "127.0.0.2"  # a loopback address other than the one clients use by default


def _pdserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pdserve", *args], capture_output=True, text=True, timeout=60
    )


def test_instance_advertises_the_given_host_and_reports_serving(
    tiny_model_dir: Path, redis_server: RedisServer
) -> None:
    port = free_port()
    cluster = "health-test"
    args = [sys.executable, "-m", "prefill_service", "--model", str(tiny_model_dir), "--redis-url"]
    args += [redis_server.url, "--cluster", cluster, "--host", "0.0.0.0", "--advertise-host", ADVERTISED]
    args += ["--port", str(port), "--cpus", "0", "--num-kv-blocks", "32", "--transport", "tcp"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    registry = Registry(redis_server.url, cluster)
    try:
        deadline = time.monotonic() + 120
        while not (found := registry.instances("prefill")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.2)
        (info,) = found
        assert info.grpc_address == f"{ADVERTISED}:{port}"
        assert info.kv_address.startswith(f"tcp://{ADVERTISED}:"), info.kv_address
        # registered, so SERVING, at the advertised address (the process listens on every interface)
        ok = _pdserve("health", info.grpc_address)
        assert ok.returncode == 0 and ok.stdout.strip() == f"{info.grpc_address} SERVING", ok.stderr
        with grpc.insecure_channel(info.grpc_address) as ch:
            stats = prefill_pb2_grpc.PrefillStub(ch).Stats(common_pb2.InstanceStatsRequest(), timeout=10)
        assert stats.instance_id == info.instance_id
        alive = _pdserve("health", info.grpc_address, "--service", LIVENESS)
        assert alive.returncode == 0 and alive.stdout.strip().endswith("SERVING"), alive.stderr
        unknown = _pdserve("health", info.grpc_address, "--service", "no.such.Service")
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"advertised as {ADVERTISED}:{port}" in out
    try:
        assert registry.instances("prefill") == []
    finally:
        registry.close()
    # nothing listens there any more: not healthy
    gone = _pdserve("health", f"127.0.0.1:{port}", "--timeout", "2")
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr


def test_instance_with_a_missing_model_stops_with_the_path(tmp_path: Path, redis_server: RedisServer) -> None:
    missing = tmp_path / "no-model-here"
    args = [sys.executable, "-m", "decode_service", "--model", str(missing), "--redis-url", redis_server.url]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and f"model directory '{missing}' does not exist" in out.stderr, out.stderr
    gen = _pdserve("generate", "--local", "--model", str(missing), "def f(x):")
    assert gen.returncode == 2 and f"'{missing}' does not exist" in gen.stderr, gen.stderr
