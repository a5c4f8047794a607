"""The colocated step loop in process: outputs equal the reference engine, chunked prefill respects its
token budget and never pauses a decode, and cancelled requests give their blocks back."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from colocated_service.engine import ColocatedEngine, ColocatedJob, Tokens
from engine.local import LocalEngine
from engine.params import SamplingParams
from engine.runner import ModelRunner
from pdserve.errors import Cancelled


class SpyRunner:
    """Wraps a ModelRunner; records every step as [(request_id, new tokens, is_decode)]."""

    def __init__(self, runner: ModelRunner) -> None:
        self._runner = runner
        self.steps: list[list[tuple[str, int, bool]]] = []

    def __getattr__(self, name: str):
        return getattr(self._runner, name)

    def prefill(self, seqs, on_layer=None, num_new=None):
        num_new = num_new or [s.num_tokens - s.num_cached for s in seqs]
        self.steps.append([(s.request_id, n, s.prefill_done) for s, n in zip(seqs, num_new, strict=True)])
        return self._runner.prefill(seqs, on_layer, num_new)

    def decode(self, seqs):
        self.steps.append([(s.request_id, 1, True) for s in seqs])
        return self._runner.decode(seqs)


class Collector:
    """Gathers each job's events; `token_steps[rid]` = the step index at which each token arrived."""

    def __init__(self, spy: SpyRunner) -> None:
        self.spy = spy
        self.tokens: dict[str, list[int]] = {}
        self.token_steps: dict[str, list[int]] = {}
        self.finished: dict[str, str] = {}
        self.errors: dict[str, Exception] = {}
        self.done = threading.Condition()

    def emit_for(self, rid: str):
        def emit(ev) -> None:
            with self.done:
                if isinstance(ev, Tokens):
                    self.tokens.setdefault(rid, []).extend(ev.token_ids)
                    self.token_steps.setdefault(rid, []).append(len(self.spy.steps) - 1)
                    if ev.finish_reason:
                        self.finished[rid] = ev.finish_reason
                else:
                    self.errors[rid] = ev
                self.done.notify_all()

        return emit

    def wait(self, n: int, timeout: float = 60.0) -> None:
        with self.done:
            assert self.done.wait_for(lambda: len(self.finished) + len(self.errors) >= n, timeout)


@pytest.fixture(scope="module")
def runner(tiny_model_dir: Path) -> ModelRunner:
    return ModelRunner(str(tiny_model_dir), num_kv_blocks=128)


def _workload(runner: ModelRunner) -> list[tuple[list[int], int]]:
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 3
    ids = runner.tokenizer.encode(text)
    return [(ids[i : i + 3 + 9 * i], 2 + (5 * i) % 13) for i in range(8)]  # prompts 3..66 tokens


@pytest.mark.parametrize("chunk_tokens", [None, 16, 5])
def test_outputs_equal_reference_and_decodes_never_pause(
    runner: ModelRunner, chunk_tokens: int | None
) -> None:
    work = _workload(runner)
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for _, m in work]
    expected = LocalEngine(runner).generate([p for p, _ in work], params)

    spy = SpyRunner(runner)
    engine = ColocatedEngine(
        spy,  # type: ignore[arg-type]  # SpyRunner stands in for the ModelRunner it wraps (delegating by __getattr__)
        max_running=64,
        max_queue=64,
        max_batch_tokens=64,
        chunk_tokens=chunk_tokens,
    )
    out = Collector(spy)
    engine.start()
    try:
        for i, ((prompt, _), p) in enumerate(zip(work, params, strict=True)):
            engine.submit(ColocatedJob(str(i), list(prompt), p, out.emit_for(str(i))))
        out.wait(len(work))
    finally:
        engine.stop()
    assert not out.errors
    for i, want in enumerate(expected):
        assert out.tokens[str(i)] == want, f"request {i}"
        steps = out.token_steps[str(i)]
        assert steps == list(range(steps[0], steps[0] + len(steps))), f"request {i} paused: {steps}"
    for step in spy.steps:
        decodes = sum(1 for _, _, is_decode in step if is_decode)
        total = sum(n for _, n, _ in step)
        if chunk_tokens is not None:
            assert total <= max(chunk_tokens, decodes), f"step over budget: {step}"
        else:
            prefills = [n for _, n, d in step if not d]
            assert len(prefills) <= 1 or sum(prefills) <= 64, f"step over max_batch_tokens: {step}"
    if chunk_tokens is not None:  # the longest prompt was spread over several steps
        longest = max(range(len(work)), key=lambda i: len(work[i][0]))
        chunks = [n for step in spy.steps for rid, n, d in step if rid == str(longest) and not d]
        assert sum(chunks) == len(work[longest][0]) and len(chunks) >= len(work[longest][0]) // chunk_tokens
    engine.check_integrity()
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_cancel_frees_blocks_in_every_phase(runner: ModelRunner) -> None:
    spy = SpyRunner(runner)
    engine = ColocatedEngine(
        spy,  # type: ignore[arg-type]  # SpyRunner stands in for the ModelRunner it wraps (delegating by __getattr__)
        max_running=2,
        max_queue=64,
        max_batch_tokens=64,
        chunk_tokens=4,
    )
    out = Collector(spy)
    prompt = runner.tokenizer.encode("import os\n" * 8)
    jobs = [
        ColocatedJob(
            str(i), list(prompt), SamplingParams(max_tokens=400, ignore_eos=True), out.emit_for(str(i))
        )
        for i in range(4)
    ]
    engine.start()
    try:
        for job in jobs:
            engine.submit(job)
        with out.done:  # job 0 is decoding, job 1 is prefilling or decoding, jobs 2-3 are waiting
            assert out.done.wait_for(lambda: len(out.tokens.get("0", [])) >= 2, 30)
        for job in jobs:
            engine.cancel(job)
        out.wait(len(jobs))
        assert all(isinstance(e, Cancelled) for e in out.errors.values()) and len(out.errors) == 4
        engine.check_integrity()
        assert engine.block_manager.num_free == engine.block_manager.num_blocks
    finally:
        engine.stop()
