"""End to end KV hand-off: a real 1P1D cluster (redis-server, coordinator, prefill and decode processes on
loopback) against the single-process reference.

(a) codec raw over every transport (ucx where ucxx imports, tcp, shm): greedy output equals the reference
    token for token (8 concurrent requests of varied lengths, the tiny random model);
(b) codec cachegen on the shipped model, 20 held-out prompts of 128 tokens (after the 4096 tokens its
    tables and transform are calibrated on). The decode instance holds the model, so it asks for
    `cachegen_l0` (layer 0 sent as the token ids and recomputed exactly; the other layers on the level's
    "+l0" plan). With a request floor of max_kv_kl = 0 the KV is handed off losslessly and every prompt's
    first 32 greedy tokens equal the reference's; at the default level the share that match is printed,
    recorded as the test property `cachegen_match_rate`, and must reach 90% (18 of 20: plain cachegen, which
    codes layer 0, matched 17 of these). Issue 5's target for that share is 95%; `bench.codec` measures it
    on all 280 such prompts with an interval (docs/benchmarks.md): twenty prompts cannot resolve a few
    points, so this test guards the path, and the bench holds the figure.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from coordinator.registry import Registry
from engine.local import LocalEngine
from engine.params import SamplingParams
from kv_transfer.transport import available_transports
from kv_transfer.transport.ucx import ucx_available
from pdserve.client import Client
from pdserve.launcher import LocalCluster
from tests.cluster import PROMPTS, Clusters, assert_no_leaks

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "pdserve-tiny-py"
MATCH_TOKENS = 32
MATCH_PROMPTS = 20
MATCH_PROMPT_TOKENS = 128
MIN_MATCH_RATE = 0.90  # a regression bound (plain cachegen: 85% here, CacheGen's own quantizers ~32%)
TRANSPORTS = available_transports()  # ucx, tcp, shm (ucx only where ucxx imports)
SHIPPED_READY = (SHIPPED_MODEL / "model.safetensors").exists()


@pytest.fixture(scope="module")
def clusters(tiny_model_dir: Path, module_clusters: Clusters) -> dict[str, LocalCluster]:
    """Every cluster this module needs, started side by side (their start-up waits overlap): one per
    transport with codec raw on the tiny model (streaming layer-wise), and one with codec cachegen on the
    shipped model (the default: the KV is pulled once prefill is done)."""
    specs: dict[str, tuple[Path, dict[str, object]]] = {
        t: (tiny_model_dir, {"transport": t, "codec": "raw", "layerwise": "on"}) for t in TRANSPORTS
    }  # layer-wise streaming on: decode pulls each layer while prefill computes (off by default on CPU)
    if SHIPPED_READY:
        specs["cachegen"] = (SHIPPED_MODEL, {"codec": "cachegen"})
    return module_clusters.start_many(specs)


def _generate_all(
    cluster: LocalCluster, prompts: list, max_tokens: list[int], max_kv_kl: float | None = None
) -> list[list[int]]:
    """Plain greedy (repetition penalty 1, whatever the model's generation_config says)."""
    with Client(cluster.gateway_address) as client, ThreadPoolExecutor(len(prompts)) as pool:
        futures = [
            pool.submit(
                client.generate,
                p,
                max_tokens=m,
                ignore_eos=True,
                repetition_penalty=1.0,
                max_kv_kl=max_kv_kl,
                timeout=120,
            )
            for p, m in zip(prompts, max_tokens, strict=True)
        ]
        results = [f.result() for f in futures]
    for r, m in zip(results, max_tokens, strict=True):
        assert r.finish_reason == "length" and len(r.token_ids) == m
    return [list(r.token_ids) for r in results]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> LocalEngine:
    return LocalEngine.from_model_dir(str(tiny_model_dir))


@pytest.mark.parametrize(
    "transport",
    [
        pytest.param(
            "ucx", marks=pytest.mark.skipif(not ucx_available(), reason="ucxx does not import here")
        ),
        "tcp",
        "shm",
    ],
)
def test_raw_over_every_transport_equals_reference(
    transport: str, clusters: dict[str, LocalCluster], reference: LocalEngine
) -> None:
    reqs = [(PROMPTS[i] * (1 + i % 3), 1 + (i * 7) % 24) for i in range(8)]  # varied in and out lengths
    prompts = [reference.tokenizer.encode(p) for p, _ in reqs]
    max_tokens = [m for _, m in reqs]
    expected = reference.generate(
        prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens]
    )

    cluster = clusters[transport]
    (prefill,) = Registry(cluster.redis_url).instances("prefill")
    assert prefill.kv_address.startswith(f"{transport}://"), prefill.kv_address
    got = _generate_all(cluster, prompts, max_tokens)
    for (text, _), want, out in zip(reqs, expected, got, strict=True):
        assert out == want, f"{transport}: prompt {text!r}: cluster {out} != reference {want}"
    assert_no_leaks(cluster)


def _heldout_prompts() -> list[list[int]]:
    """MATCH_PROMPTS prompts spread over the held-out text after the span the codec is calibrated on."""
    from bench.codec import SKIP_TOKENS
    from training.eval import load_heldout_ids

    ids = load_heldout_ids(SHIPPED_MODEL)[SKIP_TOKENS:]
    stride = (len(ids) - MATCH_PROMPT_TOKENS) // MATCH_PROMPTS
    return [ids[i * stride : i * stride + MATCH_PROMPT_TOKENS] for i in range(MATCH_PROMPTS)]


@pytest.fixture(scope="module")
def heldout_expected() -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, the single-process reference's first MATCH_TOKENS greedy tokens for each)."""
    prompts = _heldout_prompts()
    params = [SamplingParams(max_tokens=MATCH_TOKENS, ignore_eos=True)] * len(prompts)
    return prompts, LocalEngine.from_model_dir(str(SHIPPED_MODEL)).generate(prompts, params)


@pytest.mark.skipif(not SHIPPED_READY, reason="the shipped model is not trained yet")
def test_cachegen_cluster_with_a_lossless_request_floor_equals_reference(
    clusters: dict[str, LocalCluster], heldout_expected: tuple[list[list[int]], list[list[int]]]
) -> None:
    prompts, expected = heldout_expected
    cluster = clusters["cachegen"]
    got = _generate_all(cluster, prompts, [MATCH_TOKENS] * len(prompts), max_kv_kl=0.0)
    assert_no_leaks(cluster)
    for i, (g, w) in enumerate(zip(got, expected, strict=True)):
        assert g == w, f"prompt {i}: with max_kv_kl=0 the cluster gave {g}, the reference {w}"


@pytest.mark.skipif(not SHIPPED_READY, reason="the shipped model is not trained yet")
def test_cachegen_first_tokens_match_reference_on_heldout_prompts(
    clusters: dict[str, LocalCluster],
    heldout_expected: tuple[list[list[int]], list[list[int]]],
    record_property: Callable[[str, object], None],
) -> None:
    prompts, expected = heldout_expected
    cluster = clusters["cachegen"]
    got = _generate_all(cluster, prompts, [MATCH_TOKENS] * len(prompts))
    assert_no_leaks(cluster)
    matches = [g == w for g, w in zip(got, expected, strict=True)]
    rate = sum(matches) / len(matches)
    first_diff = [
        next((i for i, (a, b) in enumerate(zip(g, w, strict=True)) if a != b), None)
        for g, w in zip(got, expected, strict=True)
    ]
    record_property("cachegen_match_rate", rate)
    print(
        f"cachegen: first {MATCH_TOKENS} greedy tokens match the reference on {rate:.0%} of {len(matches)} "
        f"held-out prompts; first differing position per prompt: {first_diff}"
    )
    assert rate >= MIN_MATCH_RATE, (
        f"cachegen matched the reference on {rate:.0%} of prompts (< {MIN_MATCH_RATE:.0%}); "
        f"first differing positions {first_diff}"
    )
