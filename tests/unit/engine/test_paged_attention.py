"""The paged KV path against from-scratch recomputation: decode, chunked prefill, batched decode, on_layer."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import small_matmul_available
from engine.model import BatchMeta
from engine.params import SamplingParams
from engine.runner import ModelRunner
from engine.sequence import Sequence

BLOCK = 4


@pytest.fixture(scope="module")
def runner(engine_model_dir: str) -> ModelRunner:
    return ModelRunner(engine_model_dir, num_kv_blocks=96, block_size=BLOCK)


class Blocks:
    """Hands out disjoint, scattered block lists from the runner's cache (no BlockManager needed here)."""

    def __init__(self, num_blocks: int) -> None:
        self.free = list(range(num_blocks - 1, -1, -2)) + list(range(num_blocks - 2, -1, -2))

    def take(self, num_tokens: int) -> list[int]:
        n = -(-num_tokens // BLOCK)
        taken, self.free = self.free[:n], self.free[n:]
        return taken


def logits(
    runner: ModelRunner, tables: list[list[int]], starts: list[int], chunks: list[list[int]]
) -> torch.Tensor:
    """One forward of the runner's model: seq i feeds chunks[i] at positions starts[i]... -> [N, V]."""
    meta = BatchMeta.build(tables, starts, [len(c) for c in chunks], BLOCK)
    with torch.inference_mode():
        return runner.model(torch.tensor([t for c in chunks for t in c]), meta, runner.kv_cache)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(1, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_paged_decode_equals_full_recompute(runner: ModelRunner):
    blocks = Blocks(runner.kv_cache.num_blocks)
    ids = prompt(13, seed=0)
    table = blocks.take(13 + 10)
    out = logits(runner, [table], [0], [ids])[0]
    for step in range(10):
        scratch = blocks.take(len(ids))  # fresh blocks: recompute everything from nothing
        ref = logits(runner, [scratch], [0], [ids])[0]
        # mypy#15459: mypy cannot type a lambda whose default binds a loop variable
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, msg=lambda m, s=step: f"step {s}: {m}")  # type: ignore[misc]
        assert int(out.argmax()) == int(ref.argmax())
        ids.append(int(ref.argmax()))
        out = logits(runner, [table], [len(ids) - 1], [ids[-1:]])[0]


def test_chunked_prefill_equals_one_shot(runner: ModelRunner):
    blocks = Blocks(runner.kv_cache.num_blocks)
    ids = prompt(19, seed=1)
    one, chunked = blocks.take(19), blocks.take(19)
    ref = logits(runner, [one], [0], [ids])[0]
    logits(runner, [chunked], [0], [ids[:7]])  # first chunk ends mid-block
    out = logits(runner, [chunked], [7], [ids[7:]])[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for layer in range(runner.config.num_layers):
        k_ref, v_ref = runner.kv_cache.read(layer, one, 19)
        k, v = runner.kv_cache.read(layer, chunked, 19)
        torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-5)


def test_runner_chunked_prefill_samples_only_when_the_prompt_is_complete(runner: ModelRunner):
    blocks = Blocks(runner.kv_cache.num_blocks)
    ids = prompt(10, seed=2)
    a = Sequence("a", ids, SamplingParams(max_tokens=4), blocks=blocks.take(14))
    b = Sequence("b", ids, SamplingParams(max_tokens=4), blocks=blocks.take(14))
    assert runner.prefill([a], num_new=[6]) == [None] and a.num_cached == 6
    [tok_a] = runner.prefill([a])
    [tok_b] = runner.prefill([b])
    assert tok_a == tok_b and a.num_cached == b.num_cached == 10
    with pytest.raises(ValueError, match="chunk"):
        runner.prefill([a])  # nothing left to prefill


def test_batched_decode_equals_per_sequence_decode(runner: ModelRunner):
    blocks = Blocks(runner.kv_cache.num_blocks)
    prompts = [prompt(n, seed=n) for n in (3, 9, 17)]  # different lengths, crossing block boundaries
    steps = 6
    batch_tables = [blocks.take(len(p) + steps) for p in prompts]
    solo_tables = [blocks.take(len(p) + steps) for p in prompts]
    batch_ids = [list(p) for p in prompts]
    batch_out = logits(runner, batch_tables, [0, 0, 0], batch_ids)  # batched prefill
    solo_ids = [list(p) for p in prompts]
    solo_out = torch.stack(
        [logits(runner, [t], [0], [p])[0] for t, p in zip(solo_tables, solo_ids, strict=True)]
    )
    for step in range(steps):
        # mypy#15459: mypy cannot type a lambda whose default binds a loop variable
        torch.testing.assert_close(
            batch_out,
            solo_out,
            atol=1e-4,
            rtol=1e-4,
            msg=lambda m, s=step: f"step {s}: {m}",  # type: ignore[misc]
        )
        for ids, row in zip(batch_ids, batch_out, strict=True):
            ids.append(int(row.argmax()))
        for ids, row in zip(solo_ids, solo_out, strict=True):
            ids.append(int(row.argmax()))
        assert batch_ids == solo_ids
        starts = [len(ids) - 1 for ids in batch_ids]
        batch_out = logits(
            runner, batch_tables, starts, [ids[-1:] for ids in batch_ids]
        )  # one batched decode
        solo_out = torch.stack(
            [
                logits(runner, [t], [s], [ids[-1:]])[0]
                for t, s, ids in zip(solo_tables, starts, solo_ids, strict=True)
            ]
        )


def test_mixed_batch_of_prefill_chunk_and_decode(runner: ModelRunner):
    blocks = Blocks(runner.kv_cache.num_blocks)
    p1, p2 = prompt(8, seed=3), prompt(12, seed=4)
    t1, t2, r1, r2 = (blocks.take(16) for _ in range(4))
    logits(runner, [t1, t2], [0, 0], [p1, p2[:5]])
    out = logits(runner, [t1, t2], [8, 5], [[7], p2[5:]])  # seq 1 decodes while seq 2 finishes its prompt
    ref1 = logits(runner, [r1], [0], [[*p1, 7]])[0]
    ref2 = logits(runner, [r2], [0], [p2])[0]
    torch.testing.assert_close(out, torch.stack([ref1, ref2]), atol=1e-4, rtol=1e-4)


def test_on_layer_fires_in_order_after_that_layers_kv_is_written(engine_model_dir: str):
    runner = ModelRunner(engine_model_dir, num_kv_blocks=16, block_size=BLOCK)  # fresh, all-zero cache
    seqs = [Sequence("a", prompt(6, 5), blocks=[3, 0]), Sequence("b", prompt(9, 6), blocks=[1, 5, 7])]
    seen: list[int] = []

    def on_layer(layer: int) -> None:
        seen.append(layer)
        for s in seqs:
            k, v = runner.kv_cache.read(layer, s.blocks, len(s.prompt_ids))
            assert k.abs().sum(-1).gt(0).all() and v.abs().sum(-1).gt(0).all(), (
                f"layer {layer} KV not written"
            )
        if layer + 1 < runner.config.num_layers:
            assert runner.kv_cache.k[layer + 1].abs().sum() == 0, "on_layer fired after a later layer ran"

    tokens = runner.prefill(seqs, on_layer=on_layer)
    assert seen == list(range(runner.config.num_layers))
    assert all(isinstance(t, int) for t in tokens)
    assert [s.num_cached for s in seqs] == [6, 9]


@pytest.mark.skipif(
    not small_matmul_available(), reason="no small-matmul kernel (no C compiler, or no AVX2 and FMA)"
)
def test_decode_logits_do_not_depend_on_the_batch(runner: ModelRunner):
    # With the C kernels, every matmul of a decode step (up to `small_matmul_max_rows()` rows) computes each row the same way whatever
    # else is in the batch: a sequence's logits are bitwise equal decoded alone or next to others.
    blocks = Blocks(runner.kv_cache.num_blocks)
    prompts = [prompt(n, seed=100 + n) for n in (5, 12, 20)]
    batch_tables = [blocks.take(len(p) + 1) for p in prompts]
    solo_tables = [blocks.take(len(p) + 1) for p in prompts]
    for table, p in [*zip(batch_tables, prompts, strict=True), *zip(solo_tables, prompts, strict=True)]:
        logits(runner, [table], [0], [p])  # the same prefill, alone, into both tables: identical KV
    starts = [len(p) for p in prompts]
    batched = logits(runner, batch_tables, starts, [[7]] * len(prompts))
    solo = torch.stack([logits(runner, [t], [s], [[7]])[0] for t, s in zip(solo_tables, starts, strict=True)])
    assert torch.equal(batched, solo)
