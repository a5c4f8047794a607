"""The colocated baseline behind the gateway (`pdserve up --colocated`): greedy output equals the
single-process reference with and without chunked prefill, and a cancelled request frees its blocks."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from engine.local import LocalEngine
from engine.params import SamplingParams
from pdserve.client import Client
from pdserve.launcher import LocalCluster
from tests.cluster import PROMPTS, assert_no_leaks, running_cluster


def _requests() -> list[tuple[str, int]]:
    """8 (prompt, max_tokens) pairs: prompts from 1 to ~70 tokens, outputs from 1 to 29 tokens."""
    return [(PROMPTS[i] * (1 + i % 3), 1 + (i * 11) % 30) for i in range(8)]


@pytest.fixture(scope="module", params=[None, 16], ids=["whole-prompts", "chunked-16"])
def cluster(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    with running_cluster(
        tiny_model_dir,
        tmp_path_factory.mktemp("colocated") / "logs",
        colocated=2 if request.param is None else 1,
        chunk_tokens=request.param,
    ) as c:
        yield c


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
    assert_no_leaks(cluster)


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
    assert_no_leaks(cluster)


def test_bad_input_is_invalid_argument(cluster: LocalCluster) -> None:
    with Client(cluster.gateway_address) as client, pytest.raises(grpc.RpcError) as err:
        client.generate("hi", max_tokens=100_000, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
