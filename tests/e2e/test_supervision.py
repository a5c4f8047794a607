"""End to end supervision: `pdserve up`'s supervisor restarts a killed decode instance and the stream that
ran on it continues there exactly; a killed launcher leaves no process; SIGTERM stops an instance within
2 s with its Redis hung; a Redis restarted empty gets every instance back within one TTL and serving
goes on; a coordinator killed under load is restarted on its port, its streams fail with UNAVAILABLE and a
message, the same client is served again, and no KV block or lease is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from coordinator.registry import Registry
from engine.local import LocalEngine
from engine.params import SamplingParams
from pdserve.client import Client
from pdserve.launcher import LocalCluster, RestartPolicy, Supervisor, instance_stats
from pdserve.v1 import common_pb2
from tests.cluster import assert_no_leaks, assert_no_processes_left, redis_address

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> LocalEngine:
    return LocalEngine.from_model_dir(str(tiny_model_dir))


@pytest.fixture
def supervise() -> Iterator[Callable[[LocalCluster], Supervisor]]:
    """Runs a Supervisor over a cluster in a thread (as `pdserve up` does in its main loop)."""
    stop = threading.Event()
    threads: list[threading.Thread] = []
    lines: list[str] = []

    def start(cluster: LocalCluster) -> Supervisor:
        sup = Supervisor(cluster, RestartPolicy(max_restarts=2, backoff_s=0.1), lines.append)

        def loop() -> None:
            while not stop.wait(0.1):  # the supervisor's own period, as in run_forever
                sup.check()

        t = threading.Thread(target=loop, name="supervisor")
        t.start()
        threads.append(t)
        return sup

    try:
        yield start
    finally:
        stop.set()
        for t in threads:
            t.join(10)


def _expected(reference: LocalEngine, prompt_ids: list[int], kw: dict) -> list[int]:
    return reference.generate([prompt_ids], [SamplingParams(ignore_eos=True, **kw)])[0]


def test_decode_killed_mid_stream_is_restarted_and_the_stream_resumes_exactly(
    tiny_model_dir: Path,
    reference: LocalEngine,
    start_cluster: Callable[..., LocalCluster],
    supervise: Callable[[LocalCluster], Supervisor],
) -> None:
    cluster = start_cluster(tiny_model_dir, prefill=1, decode=1, failover_wait_s=90.0)
    sup = supervise(cluster)
    decode = next(c for c in cluster.children if c.role == "decode")
    first_pid = decode.proc.pid
    prompt_ids = reference.tokenizer.encode(PROMPT)
    kw: dict[str, Any] = {"max_tokens": 300, "temperature": 0.9, "top_p": 0.95, "seed": 5}
    out: list[int] = []
    with Client(cluster.gateway_address) as client:
        for msg in client.stream(prompt_ids, ignore_eos=True, timeout=180, **kw):
            out.extend(msg.token_ids)
            if len(out) >= 20 and decode.proc.pid == first_pid and decode.proc.poll() is None:
                decode.proc.send_signal(signal.SIGKILL)
    assert out == _expected(reference, prompt_ids, kw)
    assert decode.proc.pid != first_pid and decode.restarts == 1 and sup.restarts == 1
    while any(str(first_pid) in i.instance_id for i in Registry(cluster.redis_url).instances()):
        time.sleep(0.1)  # the dead one's key expires (TTL)
    assert_no_leaks(cluster)


def test_a_killed_launcher_leaves_no_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = [sys.executable, "-m", "pdserve", "up", "--model", str(tiny_model_dir), "--port", "0", "--cpu"]
    args += ["--num-kv-blocks", "64", "--log-dir", str(tmp_path / "logs")]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    up = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert up.stdout is not None
        line = ""
        while "serving on" not in line:
            line = up.stdout.readline()
            assert line, f"pdserve up exited with {up.wait()} before serving"
        redis_url = line.split("redis ")[1].split(")")[0].split(",")[0]
        address = redis_address(redis_url)
        assert len(Registry(redis_url).instances()) == 2
    finally:
        up.kill()
        up.wait()
    assert_no_processes_left(address, timeout_s=5.0)


def test_sigterm_stops_an_instance_within_2s_with_redis_hung(
    tiny_model_dir: Path, start_cluster: Callable[..., LocalCluster]
) -> None:
    cluster = start_cluster(tiny_model_dir, prefill=1, decode=1)
    assert cluster.redis is not None
    redis_pid = cluster.redis.pid
    os.kill(redis_pid, signal.SIGSTOP)  # connections hang: no error, no answer
    try:
        for role in ("decode", "prefill"):
            child = next(c for c in cluster.children if c.role == role)
            start = time.monotonic()
            child.proc.send_signal(signal.SIGTERM)
            child.proc.wait(2.0)
            assert time.monotonic() - start < 2.0
    finally:
        os.kill(redis_pid, signal.SIGCONT)


def test_redis_restarted_empty_instances_reregister_within_one_ttl_and_serving_continues(
    tiny_model_dir: Path, reference: LocalEngine, start_cluster: Callable[..., LocalCluster]
) -> None:
    ttl = 3.0
    cluster = start_cluster(tiny_model_dir, prefill=1, decode=1, heartbeat_ttl_s=ttl)
    assert cluster.redis is not None
    prompt_ids = reference.tokenizer.encode(PROMPT)
    kw: dict[str, Any] = {"max_tokens": 16}
    with Client(cluster.gateway_address) as client:
        assert client.generate(prompt_ids, ignore_eos=True, timeout=60, **kw).token_ids == _expected(
            reference, prompt_ids, kw
        )
        cluster.redis.restart()
        back_from = time.monotonic()
        registry = Registry(cluster.redis_url)
        while len(registry.instances()) < 2:
            assert time.monotonic() - back_from < ttl, "instances not re-registered within one TTL"
            time.sleep(0.05)
        out = client.generate(prompt_ids, ignore_eos=True, timeout=60, **kw)
    assert out.token_ids == _expected(reference, prompt_ids, kw)
    assert_no_leaks(cluster)


def test_coordinator_killed_under_load_is_restarted_in_flight_requests_fail_clearly_and_nothing_leaks(
    tiny_model_dir: Path,
    reference: LocalEngine,
    start_cluster: Callable[..., LocalCluster],
    supervise: Callable[[LocalCluster], Supervisor],
) -> None:
    lease_ttl = 3.0  # a lease the dead gateway's request left unpulled expires this soon
    cluster = start_cluster(tiny_model_dir, prefill=1, decode=1, lease_ttl_s=lease_ttl)
    supervise(cluster)
    coordinator = next(c for c in cluster.children if c.role == "coordinator")
    first_pid = coordinator.proc.pid
    prompt_ids = reference.tokenizer.encode(PROMPT)
    streaming = [threading.Event() for _ in range(4)]  # set at each stream's first token

    def stream(client: Client, i: int) -> tuple[str, str, int]:
        got = 0
        kw: dict[str, Any] = {"max_tokens": 1500, "temperature": 0.8, "seed": i}
        try:
            for msg in client.stream(prompt_ids, ignore_eos=True, timeout=120, **kw):
                got += len(msg.token_ids)
                streaming[i].set()
            return "OK", "", got
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or "", got
        finally:
            streaming[i].set()  # (a stream that failed before its first token must not hang the test)

    with Client(cluster.gateway_address) as client, ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream, client, i) for i in range(4)]
        for started in streaming:  # every stream has its first token: all four are mid-stream
            assert started.wait(60)
        coordinator.proc.kill()
        in_flight = [f.result() for f in futures]
        killed_at = time.monotonic()
        while coordinator.restarts < 1:  # the supervisor restarts it (same arguments: the same port)
            assert time.monotonic() - killed_at < 30, "the coordinator was not restarted"
            time.sleep(0.1)
        cluster.wait_serving(120)
        kw: dict[str, Any] = {"max_tokens": 24}
        out = client.generate(prompt_ids, ignore_eos=True, timeout=60, **kw)  # the same client, reconnected
    assert coordinator.proc.pid != first_pid
    for code, details, got in in_flight:  # the gateway died under them: a status with a message, no hang
        assert code == "UNAVAILABLE" and details and got >= 1, (code, details, got)
    assert out.token_ids == _expected(reference, prompt_ids, kw)
    # the dead gateway's calls were cancelled with its connections: decode freed their blocks, and prefill
    # leases nobody will pull expire
    assert_no_leaks(cluster, timeout_s=lease_ttl + 10)


def test_pdserve_up_prefill_killed_mid_prompt_is_restarted_and_the_output_is_exact(
    tiny_model_dir: Path, reference: LocalEngine, tmp_path: Path
) -> None:
    """1P1D under a real `pdserve up`: the only prefill instance dies (SIGKILL) with the prompt on it; the
    launcher restarts it and the gateway prefills the prompt again there: the output is what `pdserve
    generate --local` gives (LocalEngine), and no block or lease is left."""
    args = [sys.executable, "-m", "pdserve", "up", "--model", str(tiny_model_dir), "--port", "0", "--cpu"]
    args += ["--http-port", "-1", "--num-kv-blocks", "256", "--restart-backoff", "0.1"]
    args += ["--failover-wait", "60", "--log-dir", str(tmp_path / "logs")]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    prompt_ids = reference.tokenizer.encode(PROMPT * 100)[:1500]  # a long pass: time to see it on prefill
    kw: dict[str, Any] = {"max_tokens": 24}
    result: list[list[int]] = []
    errors: list[BaseException] = []
    first_token = threading.Event()
    up = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
    assert up.stdout is not None
    lines = [up.stdout.readline()]
    while "serving on" not in lines[-1]:
        if not lines[-1]:
            pytest.fail(f"pdserve up exited with {up.wait()} before serving: {lines}")
        lines.append(up.stdout.readline())
    address = lines[-1].split("serving on ")[1].split()[0]
    redis_url = lines[-1].split("redis ")[1].split(")")[0].split(",")[0]

    def run() -> None:
        try:
            with Client(address) as client:
                out: list[int] = []
                for msg in client.stream(prompt_ids, ignore_eos=True, timeout=120, **kw):
                    out.extend(msg.token_ids)
                    first_token.set()
                result.append(out)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread below
            errors.append(exc)

    try:
        client = threading.Thread(target=run)
        client.start()
        killed = 0
        deadline = time.monotonic() + 60
        while not killed:  # kill the prefill instance while the prompt holds a lease there, before its token
            assert time.monotonic() < deadline and not first_token.is_set(), "never saw the prompt on prefill"
            for inst, stats in _registered_stats(redis_url, "prefill"):
                if stats.leases > 0:
                    killed = int(inst.split("-")[-2])  # instance ids are role-host-PID-suffix
                    os.kill(killed, signal.SIGKILL)
        client.join(120)
        assert not errors, errors
        assert result == [_expected(reference, prompt_ids, kw)]
        while "prefill restarted as pid" not in lines[-1]:  # the launcher's lines (printed before the output)
            lines.append(up.stdout.readline())
            assert lines[-1], "pdserve up exited"
        assert any(f"prefill pid {killed} exited with code -9" in line for line in lines), lines
        (coordinator_log,) = (tmp_path / "logs").glob("coordinator-*.log")
        failovers = [
            line for line in coordinator_log.read_text().splitlines() if "retrying (failover" in line
        ]
        assert failovers and all("prefill instance" in line for line in failovers), failovers
        assert_no_leaks(redis_url, timeout_s=20)
    finally:
        up.send_signal(signal.SIGINT)  # Ctrl-C: stops everything it started
        assert up.wait(30) == 0
    assert_no_processes_left(redis_address(redis_url))


def _registered_stats(redis_url: str, role: str) -> list[tuple[str, common_pb2.InstanceStats]]:
    """(instance id, Stats) of the registered `role` instances that answer (a killed one stays registered
    until its TTL runs out)."""
    return list(instance_stats(redis_url, role, timeout_s=5, skip_unreachable=True).items())
