"""`LocalEngine`: single-process continuous batching over one `ModelRunner` -- the reference outputs.

The shared step skeleton (`engine.step_loop`), driven in the caller's thread. Each step either prefills
newly admitted requests or decodes one token for every running request. A request is admitted when its
whole budget (prompt + max_tokens) of KV blocks can be allocated and its prompt fits `max_batch_tokens`
(the first always goes); its blocks are freed as soon as it finishes (EOS / stop string / length).
"""

from __future__ import annotations

import time

from engine.device import Device
from engine.params import SamplingParams
from engine.runner import ModelRunner
from engine.sequence import Sequence
from engine.step_loop import Batch, Job, StepEngine, prompt_pass
from pdserve.errors import PDServeError


class LocalEngine(StepEngine[Job]):
    def __init__(self, runner: ModelRunner, max_batch_tokens: int = 4096) -> None:
        super().__init__(runner, max_queue=1 << 62, thread_name="local-step")  # the thread is never started
        self.tokenizer, self.max_batch_tokens = runner.tokenizer, max_batch_tokens

    @staticmethod
    def from_model_dir(
        model_dir: str, device: Device | None = None, num_kv_blocks: int | None = None, block_size: int = 16
    ) -> LocalEngine:
        return LocalEngine(ModelRunner(model_dir, device, num_kv_blocks, block_size))

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
        """Output token ids per prompt (including a final EOS token if one was sampled)."""
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        seqs = [Sequence(str(i), list(p), sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
        self.run(seqs)
        return [s.output_ids for s in seqs]

    def generate_text(self, prompts: list[str], params: list[SamplingParams]) -> list[str]:
        """Convenience: text in, text out (special tokens dropped, cut before the first stop string)."""
        ids = [self.tokenizer.encode(p) for p in prompts]
        return self.run([Sequence(str(i), p, sp) for i, (p, sp) in enumerate(zip(ids, params, strict=True))])

    def run(self, seqs: list[Sequence]) -> list[str]:
        """Run fresh sequences to completion, setting their output_ids and finish_reason; returns their
        texts as a client sees them (via `engine.stream.StopChecker`: cut before a matched stop string).
        Raises InvalidRequest / CapacityExceeded before running anything if one can never run."""
        errors: list[PDServeError] = []

        def emit(event: object) -> None:
            if isinstance(event, PDServeError):
                errors.append(event)

        jobs = [Job(s.request_id, list(s.prompt_ids), s.params, emit) for s in seqs]
        for job in jobs:  # all of them before any runs
            self.validate_request(job)
        for job in jobs:
            self.submit(job)
        self._cpu_mark = time.thread_time()  # the step loop runs in this thread (PassCpu)
        while self._waiting or self._owners():
            with self._cond:
                step = self._schedule()
            self._run_step(step)
        if errors:
            raise errors[0]
        self.check_integrity()  # everything we allocated came back
        for s, job in zip(seqs, jobs, strict=True):
            s.output_ids, s.finish_reason = job.seq.output_ids, job.seq.finish_reason
        return [job.stop.text for job in jobs if job.stop is not None]

    def _schedule(self) -> list[Batch[Job]]:
        admitted = self._admit(max_tokens=self.max_batch_tokens)
        if admitted:
            return [prompt_pass(admitted)]
        assert self._running, "with every block free, the head of the queue is admitted"
        return [Batch(list(self._running))]
