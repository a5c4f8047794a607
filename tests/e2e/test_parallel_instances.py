"""Prefill and decode instances run as rank processes (`--tp` / `--pp`): each rank hands its own KV shard
over (no rank gathers the whole KV), and greedy output equals the single-process reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.registry import Registry
from engine.local import LocalEngine
from engine.params import SamplingParams
from pdserve.client import Client
from pdserve.launcher import LocalCluster
from tests.cluster import assert_no_leaks

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n" * 3, "x"]


@pytest.mark.parametrize("flags", [("--tp", "2"), ("--pp", "2")], ids=["tp2-tp2", "pp2-pp2"])
def test_sharded_prefill_and_decode_equal_the_reference(
    flags: tuple[str, ...], tiny_model_dir: Path, start_cluster
) -> None:
    cluster: LocalCluster = start_cluster(tiny_model_dir, extra_instance_args=flags)
    reference = LocalEngine.from_model_dir(str(tiny_model_dir))
    tok = reference.tokenizer
    params = [SamplingParams(max_tokens=5 + 3 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    expected = reference.generate([tok.encode(p) for p in PROMPTS], params)
    with Client(cluster.gateway_address) as client:
        for prompt, p, want in zip(PROMPTS, params, expected, strict=True):
            got = client.generate(prompt, max_tokens=p.max_tokens, ignore_eos=True, timeout=60)
            assert got.token_ids == want, f"prompt {prompt!r}: {flags} {got.token_ids} != reference {want}"
    tp, pp = (2, 1) if flags[0] == "--tp" else (1, 2)
    for info in Registry(cluster.redis_url).instances():
        assert (info.tp, info.pp) == (tp, pp) and len(info.rank_devices) == 2, info
    assert_no_leaks(cluster)
