"""TP x PP execution across rank processes: logits of every layout equal the single-device engine's.

Real rank processes (gloo on loopback), real weights: the shipped model (8 query heads, 2 KV heads, 5 layers,
tied head) and a random model with ONE KV head, so that under TP the KV head is replicated on every rank.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine.block_manager import BlockManager
from engine.config import ModelConfig
from engine.device import Device
from engine.loader import load_model
from engine.model import Shard
from engine.parallel.layout import Layout
from engine.parallel.rank import RankSpec, Step, micro_batches
from engine.parallel.runner import ParallelRunner, rank_devices
from engine.params import SamplingParams
from engine.runner import ModelRunner
from engine.sequence import Sequence
from engine.synth import make_random_model

SHIPPED = Path(__file__).resolve().parents[3] / "models" / "pdserve-tiny-py"
PROMPT_LENS = [7, 23, 3]  # three sequences of different lengths in one batch
DECODE_STEPS = 3


@pytest.fixture(scope="module")
def one_kv_head_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """3 layers (pp=2 splits them 2 + 1), 4 query heads, 1 KV head (replicated under TP), untied head."""
    return make_random_model(
        tmp_path_factory.mktemp("one-kv-head"),
        layers=3,
        hidden=64,
        heads=4,
        kv_heads=1,
        intermediate=128,
        vocab_size=512,
        max_pos=256,
        seed=3,
    )


def run_batch(runner: ModelRunner) -> tuple[list[torch.Tensor], list[list[int]], list[int]]:
    """Prefill PROMPT_LENS prompts (the middle one in two chunks: the second reads its KV back from the
    cache), then DECODE_STEPS greedy decode steps. -> the logits [N, V] of each pass, the tokens, and the
    layers the whole-batch prefill reported done (on_layer) on rank 0."""
    bm = BlockManager(runner.kv_cache.num_blocks, runner.block_size)
    vocab = runner.config.vocab_size
    seqs = [
        Sequence(f"s{i}", [(17 * i + 5 * j + 1) % vocab for j in range(n)], SamplingParams(max_tokens=8))
        for i, n in enumerate(PROMPT_LENS)
    ]
    for s in seqs:
        s.blocks = bm.allocate(s.num_tokens + DECODE_STEPS + 1)
    passes: list[torch.Tensor] = []

    layers_done: list[int] = []

    def forward(
        batch: list[Sequence], num_new: list[int], on_layer: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        ids = [
            t for s, n in zip(batch, num_new, strict=True) for t in s.all_ids[s.num_cached : s.num_cached + n]
        ]
        logits = runner._forward(batch, ids, num_new, on_layer)  # the runner's one model call: [N, V] fp32
        for s, n in zip(batch, num_new, strict=True):
            s.num_cached += n
        passes.append(logits)
        return logits

    forward([seqs[1]], [10])  # the first chunk of the middle prompt
    logits = forward(seqs, [s.num_tokens - s.num_cached for s in seqs], layers_done.append)
    for s, row in zip(seqs, logits, strict=True):
        s.output_ids.append(int(row.argmax()))
    for _ in range(DECODE_STEPS):
        logits = forward(seqs, [1] * len(seqs))
        for s, row in zip(seqs, logits, strict=True):
            s.output_ids.append(int(row.argmax()))
    return passes, [s.output_ids for s in seqs], layers_done


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[list[torch.Tensor], list[list[int]]]]:
    return {}


def check_layout(model_dir: str, layout: Layout, cache: dict) -> None:
    if model_dir not in cache:
        cache[model_dir] = run_batch(ModelRunner(model_dir, num_kv_blocks=32))
    ref_logits, ref_tokens, _ = cache[model_dir]
    runner = ParallelRunner(model_dir, layout, num_kv_blocks=32)
    try:
        logits, tokens, layers_done = run_batch(runner)
        assert runner.kv_cache.num_layers == len(range(*layout.layer_range(runner.config.num_layers, 0)))
    finally:
        runner.close()
    assert runner.lost is None
    assert all(p.poll() is not None for p in runner.workers), "every rank process has exited"
    for got, want in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert tokens == ref_tokens
    # each of rank 0's layers is reported once, when every micro-batch has written its KV
    assert layers_done == list(range(*layout.layer_range(runner.config.num_layers, 0)))


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(), reason="shipped model not built")
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_shipped_model_layouts_match_single_device(tp: int, pp: int, reference: dict) -> None:
    check_layout(str(SHIPPED), Layout(tp, pp), reference)


def test_replicated_kv_head_layout_matches_single_device(one_kv_head_model: str, reference: dict) -> None:
    """TP2 x PP2 on 3 layers and 1 KV head: the head replicated on both TP ranks, stages of 2 and 1 layers."""
    check_layout(one_kv_head_model, Layout(2, 2), reference)


def test_tp_shards_are_slices_of_the_checkpoint(one_kv_head_model: str) -> None:
    """q_proj / gate_proj rows and o_proj / down_proj columns split across ranks; the one KV head is whole
    on both (replicated)."""
    cfg = ModelConfig.from_hf_dir(one_kv_head_model)
    shards = [load_model(one_kv_head_model, cfg, shard=Shard(2, r)) for r in range(2)]
    with safe_open(str(Path(one_kv_head_model) / "model.safetensors"), framework="pt") as f:
        full = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    attn = [m.model.layer(1).self_attn for m in shards]
    mlp = [m.model.layer(1).mlp for m in shards]
    p = "model.layers.1."
    assert torch.equal(torch.cat([a.q_proj.weight for a in attn]), full[p + "self_attn.q_proj.weight"])
    assert torch.equal(torch.cat([a.o_proj.weight for a in attn], 1), full[p + "self_attn.o_proj.weight"])
    assert torch.equal(torch.cat([m.gate_proj.weight for m in mlp]), full[p + "mlp.gate_proj.weight"])
    assert torch.equal(torch.cat([m.down_proj.weight for m in mlp], 1), full[p + "mlp.down_proj.weight"])
    for a in attn:
        assert a.num_heads == 2 and a.num_kv_heads == 1
        assert torch.equal(a.k_proj.weight, full[p + "self_attn.k_proj.weight"])


def test_step_encoding_round_trips() -> None:
    step = Step([0, 5, 9], [4, 1, 2], [[3], [0, 7], []], [11, 12, 13, 14, 15, 16, 17])
    assert Step.decode(step.encode()) == step


def test_micro_batches_split_sequences_or_cut_a_long_prompt() -> None:
    # as many sequences as stages or more: runs of whole sequences
    assert [(mb.seqs, mb.counts) for mb in micro_batches([3, 1, 4, 1, 5], 2)] == [
        ([0, 1, 2], [3, 1, 4]),
        ([3, 4], [1, 5]),
    ]
    assert [mb.seqs for mb in micro_batches([1, 1, 1, 1], 1)] == [[0, 1, 2, 3]]
    # one long prompt over 2 stages: two chunks, the second holds its last token
    (a, b) = micro_batches([10], 2)
    assert (a.offsets, a.counts, a.ends) == ([0], [5], [False])
    assert (b.offsets, b.counts, b.ends) == ([5], [5], [True])
    # 2 sequences over 4 stages: 4 chunks of the flat token stream, each token once, one logits row each
    mbs = micro_batches([6, 2], 4)
    assert [(mb.seqs, mb.offsets, mb.counts) for mb in mbs] == [
        ([0], [0], [2]),
        ([0], [2], [2]),
        ([0], [4], [2]),
        ([1], [0], [2]),
    ]
    assert sum(mb.num_logits for mb in mbs) == 2
    # one decode token per sequence, fewer sequences than stages: one micro-batch each
    assert [mb.seqs for mb in micro_batches([1, 1], 4)] == [[0], [1]]


def test_rank_spec_round_trips_json() -> None:
    spec = RankSpec("/m", Layout(2, 2), 3, Device.cpu((4, 5)), 64, 16, torch.bfloat16, 1234, 30.0)
    assert RankSpec.from_json(spec.to_json()) == spec


def test_rank_devices_split_cores_disjointly(caplog: pytest.LogCaptureFixture) -> None:
    devs = rank_devices(Device.cpu((0, 1, 2, 3, 4)), Layout(2, 2))
    assert [d.cpus for d in devs] == [(0, 1), (2,), (3,), (4,)]
    with caplog.at_level(logging.WARNING):
        over = rank_devices(Device.cpu((0, 1)), Layout(2, 2))
    assert [d.cpus for d in over] == [(0,), (1,), (0,), (1,)]
    assert "oversubscribed" in caplog.text
    cuda = rank_devices(Device.cuda(1), Layout(2, 1))
    assert [d.cuda_index for d in cuda] == [1, 2]


def test_bad_rank_start_is_a_clear_error(tmp_path: Path, one_kv_head_model: str) -> None:
    """tp=3 cannot split 4 query heads: refused before any rank process starts."""
    with pytest.raises(ValueError, match="does not divide"):
        ParallelRunner(one_kv_head_model, Layout(3, 1), num_kv_blocks=8)


def test_a_rank_that_cannot_load_is_a_clear_error_and_leaves_no_process(
    tmp_path: Path, one_kv_head_model: str
) -> None:
    """The checkpoint lacks layer 2 (pipeline stage 1's): rank 1 reports why, rank 0 raises it, no rank is left."""
    import shutil

    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    shutil.copytree(one_kv_head_model, broken)
    with safe_open(str(broken / "model.safetensors"), framework="pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("model.layers.2.")}  # noqa: SIM118
    save_file(kept, str(broken / "model.safetensors"))
    before = set(_children())
    with pytest.raises(RuntimeError, match=r"rank 1: ValueError: .*lacks"):
        ParallelRunner(str(broken), Layout(1, 2), num_kv_blocks=8)
    assert set(_children()) <= before


def _children() -> list[int]:
    """Pids of this process's live (not zombie) children."""
    import os

    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                out.append(int(entry))
    return out
