"""`LocalEngine`: single-process continuous batching over one `ModelRunner` -- the reference outputs.

Each step either prefills newly admitted requests or decodes one token for every running request.
A request is admitted when its whole budget (prompt + max_tokens) of KV blocks can be allocated, and
its blocks are freed as soon as it finishes (EOS / stop string / length).
"""

from __future__ import annotations

from collections import deque

from engine.block_manager import BlockManager
from engine.device import Device
from engine.params import SamplingParams
from engine.runner import ModelRunner
from engine.sequence import Sequence
from engine.stream import StopChecker
from pdserve.errors import CapacityExceeded


class LocalEngine:
    def __init__(self, runner: ModelRunner, max_batch_tokens: int = 4096) -> None:
        self.runner, self.tokenizer, self.max_batch_tokens = runner, runner.tokenizer, max_batch_tokens
        self.block_manager = BlockManager(runner.kv_cache.num_blocks, runner.block_size)

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
        texts as a client sees them (via `engine.stream.StopChecker`: cut before a matched stop string)."""
        bm = self.block_manager
        for s in seqs:
            s.params.validate(len(s.prompt_ids), self.runner.max_model_len)
            if bm.blocks_needed(self._budget(s)) > bm.num_blocks:
                raise CapacityExceeded(
                    f"request {s.request_id} needs more KV blocks than the cache has ({bm.num_blocks})"
                )
        waiting = deque(seqs)
        running: list[Sequence] = []
        checkers = {id(s): StopChecker(self.tokenizer, s.params) for s in seqs}
        while waiting or running:
            admitted = self._admit(waiting)
            if admitted:
                self._postprocess(admitted, self.runner.prefill(admitted), checkers)
                running += admitted
            else:
                self._postprocess(running, self.runner.decode(running), checkers)
            for s in running:
                if s.is_finished:
                    bm.free(s.blocks)
                    s.blocks = []
            running = [s for s in running if not s.is_finished]
        bm.check_integrity(owners=[])  # everything we allocated came back
        return [checkers[id(s)].text for s in seqs]

    def _budget(self, s: Sequence) -> int:
        return len(s.prompt_ids) + s.params.max_tokens

    def _admit(self, waiting: deque[Sequence]) -> list[Sequence]:
        """FIFO: take waiting seqs while their blocks fit and the prompt tokens stay within the batch budget."""
        admitted: list[Sequence] = []
        tokens = 0
        while waiting and self.block_manager.can_allocate(self._budget(waiting[0])):
            if admitted and tokens + len(waiting[0].prompt_ids) > self.max_batch_tokens:
                break
            s = waiting.popleft()
            s.blocks = self.block_manager.allocate(self._budget(s))
            tokens += len(s.prompt_ids)
            admitted.append(s)
        return admitted

    def _postprocess(
        self,
        seqs: list[Sequence],
        tokens: list[int] | list[int | None],
        checkers: dict[int, StopChecker],
    ) -> None:
        for s, t in zip(seqs, tokens, strict=True):
            assert t is not None, "LocalEngine prefills whole prompts"
            s.output_ids.append(t)
            s.finish_reason = checkers[id(s)].push(t)
