"""The colocated baseline behind the gateway (`pdserve up --colocated`): greedy output equals the
single-process reference with and without chunked prefill, and a cancelled request frees its blocks."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from coordinator.registry import Registry
from engine.local import LocalEngine
from engine.params import SamplingParams
from pdserve.client import Client
from pdserve.launcher import ClusterConfig, LocalCluster
from pdserve.v1 import colocated_pb2_grpc, common_pb2

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "The quick brown fox",
    "for i in range(10):\n    print(i)",
    "# Licensed under the Apache License",
    "return",
    "x",
]


def _requests() -> list[tuple[str, int]]:
    """8 (prompt, max_tokens) pairs: prompts from 1 to ~70 tokens, outputs from 1 to 29 tokens."""
    return [(PROMPTS[i] * (1 + i % 3), 1 + (i * 11) % 30) for i in range(8)]


def _stats(cluster: LocalCluster) -> list[common_pb2.InstanceStats]:
    out = []
    for inst in Registry(cluster.redis_url).instances("colocated"):
        with grpc.insecure_channel(inst.grpc_address) as ch:
            out.append(
                colocated_pb2_grpc.ColocatedStub(ch).Stats(common_pb2.InstanceStatsRequest(), timeout=5)
            )
    return out


def _assert_no_leaks(cluster: LocalCluster, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = _stats(cluster)
        if all(s.kv_blocks_free == s.kv_blocks_total and s.integrity_ok for s in stats):
            break
        assert time.monotonic() < deadline, f"blocks still held: {stats}"
        time.sleep(0.1)
    assert stats, "no colocated instance registered"
    assert all(s.running == 0 and s.queue_len == 0 for s in stats)


@pytest.fixture(scope="module", params=[None, 16], ids=["whole-prompts", "chunked-16"])
def cluster(request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    cfg = ClusterConfig(
        model_dir=str(tiny_model_dir),
        port=0,
        colocated=2 if request.param is None else 1,
        chunk_tokens=request.param,
        use_cuda=False,
        num_kv_blocks=256,
        heartbeat_ttl_s=1.5,
        log_dir=str(tmp_path_factory.mktemp("colocated-logs")),
    )
    c = LocalCluster(cfg).start(timeout_s=120)
    yield c
    c.stop()
    assert all(ch.proc.poll() is not None for ch in c.children), "a process outlived stop()"


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> LocalEngine:
    return LocalEngine.from_model_dir(str(tiny_model_dir))


def test_greedy_output_equals_single_process_reference(cluster: LocalCluster, reference: LocalEngine) -> None:
    reqs = _requests()
    tok = reference.tokenizer
    expected = reference.generate(
        [tok.encode(p) for p, _ in reqs], [SamplingParams(max_tokens=m, ignore_eos=True) for _, m in reqs]
    )
    with Client(cluster.gateway_address) as client, ThreadPoolExecutor(len(reqs)) as pool:
        futures = [
            pool.submit(client.generate, p, max_tokens=m, ignore_eos=True, timeout=60) for p, m in reqs
        ]
        results = [f.result() for f in futures]
    for (prompt, max_tokens), want, got in zip(reqs, expected, results, strict=True):
        assert got.token_ids == want, f"prompt {prompt!r}: colocated {got.token_ids} != reference {want}"
        assert got.finish_reason == "length" and len(got.token_ids) == max_tokens
        assert got.text == tok.decode(want)
        assert got.prompt_tokens == len(tok.encode(prompt)) and got.ttft_s > 0
    _assert_no_leaks(cluster)


def test_cancel_mid_stream_frees_blocks(cluster: LocalCluster) -> None:
    with Client(cluster.gateway_address) as client:
        stream = client.stream("def fibonacci(n):" * 4, max_tokens=400, ignore_eos=True, timeout=60)
        got = 0
        for msg in stream:
            got += len(msg.token_ids)
            if got >= 3:
                stream.cancel()
                break
    assert got >= 3
    _assert_no_leaks(cluster)


def test_bad_input_is_invalid_argument(cluster: LocalCluster) -> None:
    with Client(cluster.gateway_address) as client, pytest.raises(grpc.RpcError) as err:
        client.generate("hi", max_tokens=100_000, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
