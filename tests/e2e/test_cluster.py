"""End to end: a real cluster (redis-server, coordinator, prefill and decode processes on loopback)
against the single-process reference, plus bad input, cancellation and instance replacement."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from bench.probe import Prober
from bench.workload import Uniform, Workload
from coordinator.registry import Registry
from engine.local import LocalEngine
from engine.params import SamplingParams
from pdserve import telemetry, trace_cli
from pdserve.client import Client
from pdserve.launcher import ClusterConfig, LocalCluster
from pdserve.rpc import LIVENESS
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from tests.cluster import PROMPTS, assert_no_leaks


def _requests(n: int) -> list[tuple[str, int]]:
    """n (prompt, max_tokens) pairs with varied prompt and output lengths."""
    out = []
    for i in range(n):
        prompt = PROMPTS[i % len(PROMPTS)] * (1 + i % 3)
        out.append((prompt, 1 + (i * 7) % 24))
    return out


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> LocalEngine:
    return LocalEngine.from_model_dir(str(tiny_model_dir))


@pytest.mark.parametrize(
    "shape, kw",
    [
        # the pure split: every prompt prefilled on a prefill instance
        ((1, 1), {"local_prefill": "off"}),
        ((2, 2), {"local_prefill": "off"}),
        # conditional disaggregation: every prompt prefilled by the decode instance ...
        ((1, 1), {"local_prefill": "always", "local_prefill_max_tokens": 4096}),
        # ... or, with 16 requests at once, whichever prompts find the prefill instance busy (the default
        # policy, with a higher prompt limit so that every prompt qualifies)
        ((1, 1), {"local_prefill_max_tokens": 4096}),
        # decode tokens on each request's own call, one message per token (coordinator --token-stream off;
        # what a decode instance without the token stream gets)
        ((1, 1), {"local_prefill": "off", "token_stream": False}),
    ],
    ids=["1P1D", "2P2D", "1P1D-local-always", "1P1D-local-busy", "1P1D-per-request-streams"],
)
def test_greedy_output_equals_single_process_reference(
    shape: tuple[int, int],
    kw: dict,
    tiny_model_dir: Path,
    reference: LocalEngine,
    tmp_path: Path,
    start_cluster: Callable[..., LocalCluster],
) -> None:
    reqs = _requests(16)
    tok = reference.tokenizer
    prompts = [tok.encode(p) for p, _ in reqs]
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for _, m in reqs]
    expected = reference.generate(prompts, params)

    policy = kw.get("local_prefill", ClusterConfig.local_prefill)
    span_file = tmp_path / "spans.jsonl"  # local-prefill runs are traced: where each prompt was prefilled
    env = {"PDSERVE_TRACE_FILE": str(span_file), "OTEL_BSP_SCHEDULE_DELAY": "100"} if policy != "off" else {}
    cluster = start_cluster(tiny_model_dir, prefill=shape[0], decode=shape[1], env=env, **kw)
    ids = [f"r{i}" for i in range(len(reqs))]
    before = _pass_counts(cluster)
    with Client(cluster.gateway_address) as client, ThreadPoolExecutor(16) as pool:
        futures = [
            pool.submit(client.generate, p, max_tokens=m, ignore_eos=True, request_id=rid, timeout=120)
            for (p, m), rid in zip(reqs, ids, strict=True)
        ]
        results = [f.result() for f in futures]
    for (prompt, max_tokens), want, got in zip(reqs, expected, results, strict=True):
        assert got.token_ids == want, f"prompt {prompt!r}: cluster {got.token_ids} != reference {want}"
        assert got.finish_reason == "length"
        assert len(got.token_ids) == max_tokens
        assert got.text == tok.decode(want)
    assert_no_leaks(cluster)
    if policy == "off":
        # the instances' step-thread counters (Stats: what the planner calibrates to) saw exactly this work:
        # every prompt token prefilled on a prefill instance, every later token in a decode step, each step's
        # context the sequence's tokens so far
        after = _pass_counts(cluster)
        prompt_tokens = sum(len(p) for p in prompts)
        decode_tokens = sum(m - 1 for _, m in reqs)
        context = sum(len(p) + k for p, (_, m) in zip(prompts, reqs, strict=True) for k in range(1, m))
        assert [a - b for a, b in zip(after, before, strict=True)] == [prompt_tokens, decode_tokens, context]
    else:
        local = _prefilled_locally(span_file, ids)
        if policy == "always":
            assert local == set(ids)
        else:  # the first request finds the prefill instance idle; with 16 at once, some find it busy
            assert local and local != set(ids), f"prefilled on the decode instance: {sorted(local)}"


def _pass_counts(cluster: LocalCluster) -> list[int]:
    """[prompt tokens the prefill instances' passes computed, sequences x steps of the decode instances' decode
    steps, their context tokens], summed over the cluster's instances (their Stats: LocalCluster.pass_cpu)."""
    prefill, decode = cluster.pass_cpu("prefill").values(), cluster.pass_cpu("decode").values()
    return [
        sum(int(c.prefill[1]) for c in prefill),
        sum(b * int(row[0]) for c in decode for b, row in c.decode.items()),
        sum(int(row[1]) for c in decode for row in c.decode.values()),
    ]


def _prefilled_locally(span_file: Path, request_ids: list[str], timeout_s: float = 20.0) -> set[str]:
    """The requests whose trace has the decode instance's own prefill span, once every request's trace is
    complete: its gateway span and, where the gateway called a decode instance (not for a one-token request
    prefilled remotely), that instance's request span. Each service exports ended spans in order (batches
    100 ms apart): the gateway's root span ends after its decode call span, and a local prefill span is a
    child of the decode request span, so ends before it."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = trace_cli.load_file(str(span_file)) if span_file.exists() else []
        names = {rid: {s.name for s in trace_cli.find_trace(spans, rid)} for rid in request_ids}
        complete = all(
            telemetry.GATEWAY_GENERATE in n
            and (telemetry.DECODE_REQUEST in n or telemetry.GATEWAY_DECODE not in n)
            for n in names.values()
        )
        if complete:
            return {rid for rid, n in names.items() if telemetry.DECODE_LOCAL_PREFILL in n}
        assert time.monotonic() < deadline, f"spans did not reach {span_file} within {timeout_s:.0f} s"
        time.sleep(0.2)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"prompt": "", "max_tokens": 4}, "empty"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": -3}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 100_000}, "maximum length"),
        ({"prompt": "hi", "max_tokens": 4, "temperature": -0.5}, "temperature"),
        ({"prompt": "hi", "max_tokens": 4, "top_p": 0.0}, "top_p"),
        ({"prompt": "hi", "max_tokens": 4, "top_p": 1.5}, "top_p"),
        ({"prompt": [999_999], "max_tokens": 4}, "range"),
        ({"prompt": "hi", "max_tokens": 4, "max_kv_kl": -0.01}, "max_kv_kl"),
    ],
)
def test_bad_input_is_invalid_argument(cluster: LocalCluster, kwargs: dict, fragment: str) -> None:
    with Client(cluster.gateway_address) as client:
        prompt = kwargs.pop("prompt")
        with pytest.raises(grpc.RpcError) as err:
            client.generate(prompt, timeout=30, **kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in (err.value.details() or "").lower()
    assert_no_leaks(cluster)


def _cancel_mid_stream(client: Client) -> None:
    """Start a long generation and cancel it once 3 tokens have arrived."""
    stream = client.stream("def fibonacci(n):" * 4, max_tokens=200, ignore_eos=True, timeout=60)
    got = 0
    for msg in stream:
        got += len(msg.token_ids)
        if got >= 3:
            stream.cancel()
            break
    assert got >= 3


def test_client_cancel_mid_stream_frees_blocks_everywhere(cluster: LocalCluster) -> None:
    with Client(cluster.gateway_address) as client:
        _cancel_mid_stream(client)
    assert_no_leaks(cluster)


def test_short_deadline_frees_blocks_everywhere(cluster: LocalCluster) -> None:
    # 1500 tokens take >= 0.75 s even at the tiny model's fastest measured step (~0.5 ms/token, 2026-12-03),
    # so the deadline always lands mid-stream (400 tokens once finished inside 0.3 s on a fast host)
    with Client(cluster.gateway_address) as client, pytest.raises(grpc.RpcError) as err:
        client.generate("import os\n" * 20, max_tokens=1500, ignore_eos=True, timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_no_leaks(cluster)


def test_many_cancels_under_load_leave_nothing_behind(cluster: LocalCluster) -> None:
    def one(i: int) -> tuple[grpc.StatusCode, str]:
        """OK with all 64 tokens, or the deadline's status (raised here, any other error fails the test)."""
        with Client(cluster.gateway_address) as client:
            try:
                out = client.generate(
                    "x = 1\n" * (1 + i), max_tokens=64, ignore_eos=True, timeout=0.05 + 0.1 * (i % 5)
                )
            except grpc.RpcError as exc:
                return exc.code(), exc.details() or ""
        assert len(out.token_ids) == 64 and out.finish_reason == "length"
        return grpc.StatusCode.OK, ""

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))  # .map re-raises a worker's exception here
    codes = [code for code, _ in results]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}, results
    # 64 tokens through three processes, 10 requests at once, never fit the 50 ms the shortest two allow
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes, codes
    assert_no_leaks(cluster, timeout_s=15)


def test_local_prefill_cancel_mid_stream_frees_blocks(
    tiny_model_dir: Path, start_cluster: Callable[..., LocalCluster]
) -> None:
    cluster = start_cluster(tiny_model_dir, local_prefill="always", local_prefill_max_tokens=4096)
    with Client(cluster.gateway_address) as client:
        _cancel_mid_stream(client)
        assert_no_leaks(cluster)
        one = client.generate("x", max_tokens=1, ignore_eos=True, timeout=60)  # the first token ends it
        assert len(one.token_ids) == 1 and one.finish_reason == "length"
    assert_no_leaks(cluster)


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"local_prefill": True, "kv": common_pb2.KVHandle(transfer_id="t")}, "no kv handle"),
        ({"local_prefill": True, "first_token_id": 3}, "no kv handle"),
        ({}, "kv handle"),
    ],
    ids=["local-with-handle", "local-with-first-token", "no-handle"],
)
def test_decode_rejects_inconsistent_local_prefill_requests(
    cluster: LocalCluster, fields: dict, fragment: str
) -> None:
    inst = next(i for i in Registry(cluster.redis_url).instances() if i.role == "decode")
    req = decode_pb2.DecodeRequest(
        request_id="bad",
        prompt_token_ids=[1, 2, 3],
        sampling=common_pb2.SamplingParams(max_tokens=4),
        **fields,
    )
    with grpc.insecure_channel(inst.grpc_address) as ch, pytest.raises(grpc.RpcError) as err:
        list(decode_pb2_grpc.DecodeStub(ch).Decode(req, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in (err.value.details() or "").lower()
    assert_no_leaks(cluster)


def test_dead_decode_drops_out_and_replacement_serves(
    tiny_model_dir: Path, start_cluster: Callable[..., LocalCluster]
) -> None:
    cluster = start_cluster(tiny_model_dir, failover_wait_s=1.0)
    registry = Registry(cluster.redis_url)
    decode = next(c for c in cluster.children if c.role == "decode")
    cluster.kill(decode)  # SIGKILL: no withdraw, only the TTL removes it
    killed_at = time.monotonic()
    while registry.instances("decode"):
        assert time.monotonic() - killed_at < cluster.cfg.heartbeat_ttl_s + 1.0, (
            "dead decode still registered"
        )
        time.sleep(0.1)
    with Client(cluster.gateway_address) as client, pytest.raises(grpc.RpcError) as err:
        client.generate("hello", max_tokens=4, timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "waited 1s" in (err.value.details() or ""), err.value.details()
    while cluster.health() != "NOT_SERVING":
        assert time.monotonic() - killed_at < 10, "gateway health still SERVING without a decode instance"
        time.sleep(0.1)
    # not ready, but alive: a liveness probe must not restart a gateway that waits for instances
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(cluster.gateway_address) as ch:
        alive = health_pb2_grpc.HealthStub(ch).Check(  # type: ignore[attr-defined]
            health_pb2.HealthCheckRequest(service=LIVENESS), timeout=5
        )
    assert alive.status == health_pb2.HealthCheckResponse.SERVING
    cluster.add_instance("decode")
    cluster.wait_serving(60)
    with Client(cluster.gateway_address) as client:
        out = client.generate("hello", max_tokens=4, ignore_eos=True, timeout=60)
    assert len(out.token_ids) == 4
    assert_no_leaks(cluster)


def test_gateway_serves_health_and_reflection(cluster: LocalCluster) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(cluster.gateway_address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "pdserve.v1.Generation", LIVENESS):
            # types-grpcio-health-checking's HealthStub lacks the Check callable its __init__ sets
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)  # type: ignore[attr-defined]
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        # types-grpcio-reflection types this callable as binascii.Incomplete (an exception class)
        (resp,) = list(reflect.ServerReflectionInfo(iter([req]), timeout=5))  # type: ignore[operator]
        names = {s.name for s in resp.list_services_response.service}
    assert {"pdserve.v1.Generation", "grpc.health.v1.Health"} <= names


def test_load_run_measures_the_systems_cpu(cluster: LocalCluster) -> None:
    """A benchmark load run over the public API, its CPU split between the cluster's processes (gateway,
    Redis, instances, found by `LocalCluster.pids`) and the load generator."""
    pids = cluster.pids()
    assert len(pids) == len(cluster.children) + 1  # + the private redis-server
    workload = Workload("smoke", n_requests=8, rate=8.0, prompt=Uniform(8, 24), output=Uniform(8, 16), seed=1)
    prober = Prober(
        "1P1D",
        cluster.gateway_address,
        workload,
        list(range(100, 1100)),
        timeout_s=60,
        max_span_s=10,
        min_requests=8,
        pids=cluster.pids,
    )
    run = prober.run(8.0)
    assert len(run.records) == 8 and all(r.ok and len(r.token_times) == r.output_len for r in run.records)
    assert run.cpu is not None
    assert run.cpu.system_cores > 0.05  # 8 prefills and up to 128 decode steps ran in these processes
    assert run.cpu.bench_cores > 0.0
    assert run.cpu.wall_s > 0.5
