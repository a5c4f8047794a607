"""A 1P1D cluster on CUDA (GPU hosts only; skipped on CPU CI, run by infra/device/gpu_check.sh).

Both instances share the visible GPU(s) round-robin (`share_cuda`, so that a one-GPU machine runs it);
the KV goes prefill -> decode over UCX where ucxx imports (else TCP) with the lossless raw codec. Greedy
tokens must equal a single-process run of the same model on the same device. Requests go one at a time,
so every step in both runs is a batch of one and uses the same GPU kernels: a mismatch is a hand-off bug,
not batch-dependent rounding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.registry import Registry
from engine.device import Device
from engine.local import LocalEngine
from engine.params import SamplingParams
from kv_transfer.transport.ucx import ucx_available
from pdserve.client import Client
from pdserve.launcher import LocalCluster
from tests.cluster import Clusters, assert_no_leaks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

TRANSPORT = "ucx" if ucx_available() else "tcp"
PROMPTS = ["def fibonacci(n):", "The quick brown fox", "import os\nimport sys\n" * 3, "x"]


@pytest.fixture(scope="module")
def cuda_cluster(tiny_model_dir: Path, module_clusters: Clusters) -> LocalCluster:
    return module_clusters.start(
        tiny_model_dir, use_cuda=True, share_cuda=True, transport=TRANSPORT, codec="raw"
    )


def test_cuda_cluster_greedy_equals_single_process_cuda_run(
    cuda_cluster: LocalCluster, tiny_model_dir: Path
) -> None:
    instances = Registry(cuda_cluster.redis_url).instances()
    assert sorted(i.role for i in instances) == ["decode", "prefill"]
    assert all(i.devices.startswith("cuda:") for i in instances), [i.devices for i in instances]
    assert all(i.kv_address.startswith(f"{TRANSPORT}://") for i in instances if i.role == "prefill")

    reference = LocalEngine.from_model_dir(str(tiny_model_dir), Device.cuda(0), num_kv_blocks=256)
    with Client(cuda_cluster.gateway_address) as client:
        for i, text in enumerate(PROMPTS):
            prompt = reference.tokenizer.encode(text)
            n = 8 + 8 * i
            (want,) = reference.generate([prompt], [SamplingParams(max_tokens=n, ignore_eos=True)])
            got = client.generate(prompt, max_tokens=n, ignore_eos=True, repetition_penalty=1.0, timeout=120)
            assert got.finish_reason == "length" and len(got.token_ids) == n
            assert list(got.token_ids) == want, f"prompt {text!r}: cluster {list(got.token_ids)} != {want}"
    assert_no_leaks(cuda_cluster)
