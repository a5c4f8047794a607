"""Mutual TLS inside the cluster, with certificates made here (one CA, a certificate it signed, and one
signed by another CA): a real TLS-only redis-server and real prefill instance processes. An instance
without a certificate signed by the cluster CA exits at once with the reason and never appears in the
registry; one with it registers, and its gRPC server in turn refuses callers without such a certificate."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from coordinator.registry import Registry
from pdserve.certs import CertFiles, write_dev_certs
from pdserve.instance import REGISTRATION_FAILED
from pdserve.redis_server import RedisServer
from pdserve.tls import TLSFiles, channel_credentials
from pdserve.v1 import common_pb2, prefill_pb2_grpc


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertFiles, CertFiles]:
    root = tmp_path_factory.mktemp("certs")
    return write_dev_certs(root / "cluster"), write_dev_certs(root / "other")


@pytest.fixture(scope="module")
def tls_redis(certs: tuple[CertFiles, CertFiles]) -> Iterator[RedisServer]:
    good, _ = certs
    with RedisServer(tls=TLSFiles(good.cert, good.key, good.ca)) as server:
        yield server


def _instance(model_dir: Path, redis_url: str, tls_args: list[str]) -> subprocess.Popen:
    args = [sys.executable, "-m", "prefill_service", "--model", str(model_dir), "--redis-url", redis_url]
    args += [
        "--cpus",
        "0",
        "--num-kv-blocks",
        "32",
        "--transport",
        "tcp",
        "--heartbeat-ttl",
        "1.5",
        *tls_args,
    ]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _refused(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def test_registration_is_refused_without_a_certificate_signed_by_the_ca(
    certs: tuple[CertFiles, CertFiles], tls_redis: RedisServer, tiny_model_dir: Path
) -> None:
    good, other = certs
    assert tls_redis.url.startswith("rediss://")
    # a certificate signed by another CA (the instance itself trusts the cluster CA)
    code, out = _refused(
        _instance(
            tiny_model_dir,
            tls_redis.url,
            ["--tls-cert", other.cert, "--tls-key", other.key, "--tls-ca", good.ca],
        )
    )
    assert code == REGISTRATION_FAILED, out
    # the TLS error itself varies with timing (an "unknown ca" alert, or EOF when writing): the reason is ours
    assert "cannot register in the registry" in out and "signed by the cluster CA" in out, out
    # no certificate at all: TLS without one, and plaintext to the TLS-only port
    code, out = _refused(_instance(tiny_model_dir, tls_redis.url, []))
    assert code == REGISTRATION_FAILED and "cannot register in the registry" in out, out
    plain_url = tls_redis.url.replace("rediss://", "redis://")
    code, out = _refused(_instance(tiny_model_dir, plain_url, []))
    assert code == REGISTRATION_FAILED and "cannot register in the registry" in out, out
    # a CA without this process's own certificate is a flag error, before anything starts
    code, out = _refused(_instance(tiny_model_dir, tls_redis.url, ["--tls-ca", good.ca]))
    assert code == 2 and "needs this process's own --tls-cert" in out, out
    registry = Registry(tls_redis.url, tls=TLSFiles(good.cert, good.key, good.ca))
    try:
        assert registry.instances() == []  # the coordinator never sees any of them
    finally:
        registry.close()


def test_instance_with_the_cluster_certificate_registers_and_requires_client_certificates(
    certs: tuple[CertFiles, CertFiles], tls_redis: RedisServer, tiny_model_dir: Path
) -> None:
    good, other = certs
    cluster_tls = TLSFiles(good.cert, good.key, good.ca)
    proc = _instance(
        tiny_model_dir, tls_redis.url, ["--tls-cert", good.cert, "--tls-key", good.key, "--tls-ca", good.ca]
    )
    registry = Registry(tls_redis.url, tls=cluster_tls)
    try:
        deadline = time.monotonic() + 120
        while not (found := registry.instances("prefill")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.2)
        assert len(found) == 1
        address = found[0].grpc_address
        request = common_pb2.InstanceStatsRequest()
        with grpc.secure_channel(address, channel_credentials(cluster_tls)) as ch:
            stats = prefill_pb2_grpc.PrefillStub(ch).Stats(request, timeout=10)
        assert stats.instance_id == found[0].instance_id and stats.integrity_ok
        for who, tls in (
            ("no client certificate", TLSFiles(ca=good.ca)),
            ("another CA's certificate", TLSFiles(other.cert, other.key, good.ca)),
        ):
            with (
                grpc.secure_channel(address, channel_credentials(tls)) as ch,
                pytest.raises(grpc.RpcError) as err,
            ):
                prefill_pb2_grpc.PrefillStub(ch).Stats(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, who
        with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as err:
            prefill_pb2_grpc.PrefillStub(ch).Stats(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    try:
        assert registry.instances() == []  # withdrawn on the way out
    finally:
        registry.close()
