"""End to end KV reshard: every pair of prefill and decode layouts in {TP1, TP2, PP2} x {TP1, TP2, PP2}.

One cluster (the tiny random model: 2 layers, 4 heads, 2 KV heads) holds one prefill and one decode instance
of each layout: started as `pdserve up --prefill-tp 2 --decode-pp 2` starts it (ClusterConfig), the other
layouts added. The test drives each pair directly (Prefill on that prefill instance, then Decode on that decode
instance with the KV handle and the first token, as the gateway does), so nine pairs cost one cluster; the
gateway's own concurrent requests, which the router spreads over the instances, must agree too.

Raw KV: each pair's greedy output equals the single-process reference (`pdserve generate --local`'s engine) on
every prompt whose reference top-1/top-2 logit margin stays above NEAR_TIE at every generated step (TP sums
partial products in another order, which may flip a near-tie; excluded prompts are counted and printed).
cachegen: each pair agrees with the reference on as many prompts as the unsharded TP1 -> TP1 hand-off does, give
or take one prompt (a head subset is quantized on its own, so the bits differ; agreement must not drop).
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from coordinator.registry import InstanceInfo, Registry
from engine.kv_probe import KVProbe
from engine.local import LocalEngine
from engine.params import SamplingParams
from pdserve.client import Client
from pdserve.launcher import LocalCluster
from pdserve.rpc import params_to_proto
from pdserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from tests.cluster import Clusters, assert_no_leaks

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
PAIRS = list(itertools.product(LAYOUTS, LAYOUTS))
NUM_PROMPTS = 6
MAX_TOKENS = 6
NEAR_TIE = 1e-3  # logits: a smaller top-1/top-2 margin may flip under another summation order


@dataclass(frozen=True)
class LayoutCluster:
    cluster: LocalCluster
    instances: dict[tuple[str, str], InstanceInfo]  # (role, layout name) -> the registered instance


@pytest.fixture(scope="module")
def layout_cluster(tiny_model_dir: Path, module_clusters: Clusters) -> LayoutCluster:
    """A TP2 prefill + PP2 decode cluster (the launcher's --prefill-tp/--decode-pp) plus an instance of each
    other layout per role (every rank process sharing the host's cores: oversubscribed on a small machine)."""
    cluster = module_clusters.start(tiny_model_dir, codec="raw", num_kv_blocks=64, prefill_tp=2, decode_pp=2)
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    for role, names in (("prefill", ("tp1", "pp2")), ("decode", ("tp1", "tp2"))):
        for name in names:
            cluster.add_instance(role, ["--cpus", cores], layout=LAYOUTS[name])
    registry = Registry(cluster.redis_url)
    deadline = time.monotonic() + 180
    while True:
        found = {
            (i.role, _layout_name(i)): i for i in registry.instances() if i.role in ("prefill", "decode")
        }
        if len(found) == 2 * len(LAYOUTS) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(found) == 2 * len(LAYOUTS), f"registered layouts: {sorted(found)}"
    return LayoutCluster(cluster, found)


def _layout_name(inst: InstanceInfo) -> str:
    layout = (getattr(inst, "tp", 1), getattr(inst, "pp", 1))  # the registry records it (engine.parallel)
    return next((n for n, lo in LAYOUTS.items() if lo == layout), f"tp{layout[0]}pp{layout[1]}")


@pytest.fixture(scope="module")
def prompts(tiny_model_dir: Path) -> list[list[int]]:
    engine = LocalEngine.from_model_dir(str(tiny_model_dir))
    texts = ["def fibonacci(n):", "import os\nimport sys\n", "The quick brown fox", "for i in range(10):",
             "class Stack:\n    def __init__(self):", "# Licensed under the Apache License"]  # fmt: skip
    return [engine.tokenizer.encode(t) for t in texts[:NUM_PROMPTS]]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, prompts: list[list[int]]) -> tuple[list[list[int]], list[bool]]:
    """(the single-process engine's greedy outputs, whether each prompt is clear of near-ties): the margin is
    read from teacher-forced logits along the reference's own output."""
    engine = LocalEngine.from_model_dir(str(tiny_model_dir))
    outs = engine.generate(prompts, [SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)] * len(prompts))
    probe = KVProbe(str(tiny_model_dir), max(len(p) for p in prompts) + MAX_TOKENS)
    clear = []
    for prompt, out in zip(prompts, outs, strict=True):
        probe.prefill(prompt)
        logits = probe.continuation_logits(len(prompt) - 1, [prompt[-1], *out[:-1]])
        top2 = torch.topk(logits, 2, dim=-1).values
        assert logits.argmax(-1).tolist() == out  # the probe reproduces the reference
        clear.append(bool((top2[:, 0] - top2[:, 1]).min() > NEAR_TIE))
    return outs, clear


def _run_pair(prefill: InstanceInfo, decode: InstanceInfo, prompt: list[int], codec: str) -> list[int]:
    """Prefill on `prefill`, then decode on `decode` with its KV handle (codec `codec`): the greedy output."""
    rid = f"layout-{uuid.uuid4().hex[:8]}"
    sampling = params_to_proto(SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    handle, first = None, None
    with grpc.insecure_channel(prefill.grpc_address) as ch:
        req = prefill_pb2.PrefillRequest(
            request_id=rid, prompt_token_ids=prompt, sampling=sampling, codec=codec
        )
        for ev in prefill_pb2_grpc.PrefillStub(ch).Prefill(req, timeout=120):
            if ev.HasField("scheduled"):
                handle = ev.scheduled
            else:
                first = ev.done.first_token_id
    assert handle is not None and first is not None
    handle.codec = codec
    out = [first]
    with grpc.insecure_channel(decode.grpc_address) as ch:
        dreq = decode_pb2.DecodeRequest(
            request_id=rid, prompt_token_ids=prompt, sampling=sampling, kv=handle, first_token_id=first
        )
        for ev in decode_pb2_grpc.DecodeStub(ch).Decode(dreq, timeout=120):
            out.extend(ev.token_ids)
    return out


@pytest.mark.slow
def test_every_layout_pair_equals_the_reference_with_raw_kv_and_keeps_cachegens_agreement(
    layout_cluster: LayoutCluster,
    prompts: list[list[int]],
    reference: tuple[list[list[int]], list[bool]],
    record_property: Callable[[str, object], None],
) -> None:
    want, clear = reference
    excluded = clear.count(False)
    assert excluded < len(prompts) // 2, f"{excluded} of {len(prompts)} prompts are near-ties: pick others"
    agree: dict[tuple[str, str], int] = {}
    for src, dst in PAIRS:
        p, d = layout_cluster.instances[("prefill", src)], layout_cluster.instances[("decode", dst)]
        for i, prompt in enumerate(prompts):
            got = _run_pair(p, d, prompt, "raw")
            if clear[i]:
                assert got == want[i], f"{src} -> {dst}, prompt {i}: {got} != reference {want[i]}"
        agree[(src, dst)] = sum(
            _run_pair(p, d, pr, "cachegen") == w for pr, w in zip(prompts, want, strict=True)
        )
    base = agree[("tp1", "tp1")]
    print(f"near-tie prompts excluded from the raw comparison: {excluded} of {len(prompts)}")
    print(f"cachegen agreement with the reference (of {len(prompts)} prompts): {agree}")
    record_property("near_tie_excluded", excluded)
    record_property("cachegen_agreement", {f"{s}->{d}": n for (s, d), n in agree.items()})
    for pair, n in agree.items():
        assert n >= base - 1, f"cachegen {pair[0]} -> {pair[1]} agreed on {n} prompts, TP1 -> TP1 on {base}"
    assert_no_leaks(layout_cluster.cluster)


@pytest.mark.slow
def test_the_gateway_routes_over_every_layout_and_equals_the_reference(
    layout_cluster: LayoutCluster, prompts: list[list[int]], reference: tuple[list[list[int]], list[bool]]
) -> None:
    """Concurrent requests through the gateway (the router spreads in-flight requests over the instances, so
    over several layout pairs) equal the reference too."""
    want, clear = reference
    with Client(layout_cluster.cluster.gateway_address) as client, ThreadPoolExecutor(len(prompts)) as pool:
        futures = [
            pool.submit(
                client.generate,
                p,
                max_tokens=MAX_TOKENS,
                ignore_eos=True,
                repetition_penalty=1.0,
                timeout=120,
            )
            for p in prompts * 2
        ]
        got = [list(f.result().token_ids) for f in futures]
    for i, out in enumerate(got):
        if clear[i % len(prompts)]:
            assert out == want[i % len(prompts)], f"request {i}: {out} != reference {want[i % len(prompts)]}"
    assert_no_leaks(layout_cluster.cluster)
