from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from engine.checkpoint import model_fingerprint
from engine.device import Device
from engine.local import LocalEngine
from engine.params import SamplingParams
from engine.runner import ModelRunner
from engine.sequence import Sequence
from engine.synth import make_random_model
from pdserve.errors import CapacityExceeded, InvalidRequest

PROMPTS = ["def main():\n", "import os\nimport sys\n", "class Foo(Bar):\n    def __init__(self", "x"]


@pytest.fixture(scope="module")
def engine(engine_model_dir: str) -> LocalEngine:
    return LocalEngine(ModelRunner(engine_model_dir, num_kv_blocks=64, block_size=8))


def _params(n: int) -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=12),
        SamplingParams(max_tokens=7, temperature=0.9, top_p=0.9, seed=3),
        SamplingParams(max_tokens=10, temperature=1.2, top_k=40, seed=11),
        SamplingParams(max_tokens=9),
    ][:n]


def test_batch_equals_one_at_a_time(engine: LocalEngine):
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    params = _params(4)
    batched = engine.generate(prompts, params)
    alone = [engine.generate([p], [sp])[0] for p, sp in zip(prompts, params, strict=True)]
    assert batched == alone
    assert [len(o) for o in batched] == [12, 7, 10, 9], "ignore_eos is off but these must run to length"
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_pass_cpu_counts_every_pass_and_its_shape(engine_model_dir: str):
    # the step thread's CPU per pass kind (what the planner's calibration reads from an instance's Stats):
    # every prompt pass and decode step counted, with the shapes a latency model is a function of
    eng = LocalEngine(ModelRunner(engine_model_dir, num_kv_blocks=64, block_size=8))
    prompts = [eng.tokenizer.encode(p) for p in PROMPTS[:3]]
    new = [6, 4, 4]
    t0 = time.thread_time()
    eng.generate(prompts, [SamplingParams(max_tokens=n, ignore_eos=True) for n in new])
    spent = time.thread_time() - t0
    cpu = eng.pass_cpu()
    passes, tokens, tokens_sq, prompt_s, prompt_forward_s = cpu.prefill
    assert passes == 1  # the three prompts fit one pass
    assert tokens == sum(len(p) for p in prompts)
    assert tokens_sq == sum(len(p) ** 2 for p in prompts)
    # decode: 5 steps; the first 3 of all three sequences, the last 2 of the first alone
    assert {b: row[0] for b, row in cpu.decode.items()} == {3: 3, 1: 2}
    # context of a step: each sequence's tokens so far (prompt + the tokens sampled before this step)
    assert cpu.decode[3][1] == sum(len(p) + k for p in prompts for k in (1, 2, 3))
    assert cpu.decode[1][1] == sum(len(prompts[0]) + k for k in (4, 5))
    charged = prompt_s + sum(row[2] for row in cpu.decode.values())
    # the model call's CPU is part of each pass's, which also holds its bookkeeping
    assert all(0 < f < c for _, _, c, f in cpu.decode.values()) and 0 < prompt_forward_s < prompt_s
    assert charged <= spent
    snap = eng.pass_cpu()
    snap.decode[3][0] += 100  # a snapshot: the engine's counters are not shared
    assert eng.pass_cpu().decode[3][0] == 3
    # snapshots subtract (one engine, two moments) and add (a role's engines)
    eng.generate(prompts[:1], [SamplingParams(max_tokens=3, ignore_eos=True)])
    since = eng.pass_cpu().minus(cpu)
    assert {b: row[0] for b, row in since.decode.items()} == {1: 2} and since.prefill[:3] == [
        1,
        len(prompts[0]),
        len(prompts[0]) ** 2,
    ]
    both = cpu.plus(since)
    assert both.decode[1][:2] == [4, cpu.decode[1][1] + since.decode[1][1]] and both.prefill[0] == 2


def test_queueing_when_the_cache_is_small_gives_the_same_outputs(engine_model_dir: str, engine: LocalEngine):
    small = LocalEngine(ModelRunner(engine_model_dir, num_kv_blocks=6, block_size=8))  # ~2 requests at a time
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    assert small.generate(prompts, _params(4)) == engine.generate(prompts, _params(4))


def test_stop_string_and_eos(engine: LocalEngine):
    [free_run] = engine.generate_text(["def f(x):"], [SamplingParams(max_tokens=12)])
    stop = free_run[3:5]
    [cut] = engine.generate_text(["def f(x):"], [SamplingParams(max_tokens=12, stop=(stop,))])
    assert cut == free_run[: free_run.find(stop)]
    prompt = engine.tokenizer.encode("def f(x):")
    [ids] = engine.generate([prompt], [SamplingParams(max_tokens=12)])
    seq = Sequence("s", prompt, SamplingParams(max_tokens=12, stop=(stop,)))
    assert engine.run([seq]) == [cut]
    assert seq.finish_reason == "stop" and len(seq.output_ids) < len(ids)
    # make the first greedy token an EOS id: generation stops right there (unless ignore_eos)
    eos = engine.tokenizer.eos_token_ids
    engine.tokenizer.eos_token_ids = (ids[0],)
    try:
        [stopped] = engine.generate([prompt], [SamplingParams(max_tokens=12)])
        [ignored] = engine.generate([prompt], [SamplingParams(max_tokens=12, ignore_eos=True)])
    finally:
        engine.tokenizer.eos_token_ids = eos
    assert stopped == ids[:1] and ignored == ids


def test_requests_that_can_never_run_are_rejected(engine_model_dir: str, engine: LocalEngine):
    with pytest.raises(InvalidRequest, match="empty"):
        engine.generate([[]], [SamplingParams()])
    with pytest.raises(InvalidRequest, match="maximum length 512"):
        engine.generate([[1] * 500], [SamplingParams(max_tokens=13)])
    tiny = LocalEngine(ModelRunner(engine_model_dir, num_kv_blocks=4, block_size=8))
    with pytest.raises(CapacityExceeded, match="KV blocks"):
        tiny.generate([[1] * 20], [SamplingParams(max_tokens=13)])  # 33 tokens > 4 blocks * 8
    assert tiny.block_manager.num_free == tiny.block_manager.num_blocks


def test_fingerprint_is_stable_and_tracks_the_weights(engine_model_dir: str, engine: LocalEngine, tmp_path):
    assert engine.runner.fingerprint == model_fingerprint(engine_model_dir)
    assert 0 <= engine.runner.fingerprint < 2**64
    dims = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab_size": 512}
    other = make_random_model(tmp_path, **dims, seed=1, tokenizer_texts=["a b c"])
    assert model_fingerprint(other) != engine.runner.fingerprint


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_runner_matches_cpu(engine_model_dir: str, engine: LocalEngine):
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    params = [SamplingParams(max_tokens=10, ignore_eos=True)] * len(prompts)
    fp32 = ModelRunner(engine_model_dir, Device.cuda(0), num_kv_blocks=64, block_size=8, dtype=torch.float32)
    assert LocalEngine(fp32).generate(prompts, params) == engine.generate(prompts, params)
    bf16 = LocalEngine(ModelRunner(engine_model_dir, Device.cuda(0), num_kv_blocks=64, block_size=8))
    assert bf16.runner.kv_cache.dtype == torch.bfloat16
    assert [len(o) for o in bf16.generate(prompts, params)] == [10] * len(prompts)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=20, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True),
        SamplingParams(
            max_tokens=20, temperature=0.8, top_p=0.9, seed=3, repetition_penalty=1.3, ignore_eos=True
        ),
    ],
    ids=["greedy", "seeded", "seeded-top-p-penalty"],
)
@pytest.mark.parametrize("sent", [1, 7, 19])
def test_resumed_request_continues_exactly(engine: LocalEngine, params: SamplingParams, sent: int):
    """What the gateway does on failover: prompt + the `sent` tokens already streamed, max_tokens reduced
    and step_offset = sent, gives exactly the rest of the undisturbed output (seeded draws included)."""
    prompt = engine.tokenizer.encode(PROMPTS[2])
    whole = engine.generate([prompt], [params])[0]
    assert len(whole) == params.max_tokens
    resumed = replace(params, max_tokens=params.max_tokens - sent, step_offset=sent)
    rest = engine.generate([prompt + whole[:sent]], [resumed])[0]
    assert whole[:sent] + rest == whole
    if params.seed is not None:  # the offset matters: without it the draws restart at step 0
        restarted = engine.generate([prompt + whole[:sent]], [replace(resumed, step_offset=0)])[0]
        assert whole[:sent] + restarted != whole
