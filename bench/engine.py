"""`pdserve bench engine`: pdserve's decode tokens/s against Hugging Face `generate`, decode MBU, prefill MFU.

One process, one model, one thread count (`--threads`, default 1), side by side:

* Model: a random Llama (`engine.synth.cached_random_model(**BENCH_MODEL)`: 8 layers, hidden 512, 8 heads,
  vocab 32000, 58.5M parameters, fp32) written once to the cache; pdserve's `ModelRunner` and
  `transformers.LlamaForCausalLM.from_pretrained` load the same directory.
* Decode, at batch 1 and 16: equal-length random prompts (so HF needs no padding), greedy, `new_tokens`
  tokens each. pdserve: `runner.prefill` once, then `new_tokens - 1` calls of `runner.decode`, each timed.
  HF: `generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)` with a stopping criterion that
  stamps the clock as each token is chosen; the decode time is last stamp - first stamp, which covers the
  same `new_tokens - 1` forward passes (the prefill, which produces token 1, is excluded from both). Per
  step = that time / (new_tokens - 1); median over `repeats`, the two systems interleaved (order alternating).
  Both systems' tokens are compared (`tokens_match`).
* Clock: with one thread, the main thread's CPU time (`time.thread_time`): on this shared 2-core machine
  other tenants' load stretches wall time by 1-3x at random while CPU time stays what an idle core would
  take (there is no I/O or sleeping in either loop). Wall-clock figures are reported next to them.
  With `--threads` > 1 the wall clock is the measure.
* Peaks, same process and threads, best of several tries before and after the runs: matmul peak = a
  1536^3 fp32 matmul; bandwidth peak = best of a 256 MiB fp32 GEMV's weight read (both weight layouts)
  and a STREAM-style read (sum over 256 MiB).
* Decode MBU = (weight bytes + KV bytes read per step) / step time / bandwidth peak, where weight bytes are
  every matmul and norm weight plus the embedding rows looked up, and KV bytes are each sequence's whole
  K and V over all layers at the mean context of the timed steps. Prefill MFU = FLOPs of one
  `prefill_len`-token prompt (2 per multiply-add: projections and MLP over all tokens, causal attention
  scores and values, the LM head for the last token) / time / matmul peak.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bench.progress import Progress
from bench.report import emit

BENCH_MODEL = {
    "layers": 8,
    "hidden": 512,
    "heads": 8,
    "kv_heads": 8,
    "intermediate": 1408,
    "vocab_size": 32000,
    "max_pos": 2048,
}
TARGETS = {"vs_transformers_batch1": 1.0, "vs_transformers_batch16": 1.5, "decode_mbu_batch1": 0.5}
FP32_BYTES = 4


@dataclass(frozen=True)
class Settings:
    quick: bool
    threads: int
    clock: str  # "cpu" (main thread CPU time) | "wall"
    prompt_len: int  # decode runs: every prompt this long
    new_tokens: int  # per sequence; the last new_tokens - 1 are the timed decode steps
    batches: tuple[int, ...]
    repeats: int
    extra_prompt_lens: tuple[int, ...]  # further decode comparisons at these prompt lengths (full run)
    prefill_len: int
    prefill_repeats: int
    seed: int = 0

    @staticmethod
    def make(quick: bool, threads: int, clock: str) -> Settings:
        if clock == "auto":
            clock = "cpu" if threads == 1 else "wall"
        if quick:
            return Settings(quick, threads, clock, 128, 32, (1, 16), 3, (), 512, 3)
        return Settings(quick, threads, clock, 128, 64, (1, 16), 5, (512,), 512, 5)


# ----------------------------------------------------------------------------------------------------------
# Pure helpers: FLOPs and bytes of the Llama architecture (hand-checked in tests/unit/bench)
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False

    @staticmethod
    def from_config(cfg: Any) -> Arch:  # an engine.config.ModelConfig
        return Arch(
            cfg.num_layers,
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            cfg.vocab_size,
            cfg.tie_word_embeddings,
        )

    @property
    def layer_matmul_params(self) -> int:
        """q, k, v, o projections and the gate, up, down MLP of one layer."""
        qkv = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        return qkv + o + 3 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        """All parameters: embeddings, layers (with their two norms), final norm, untied LM head."""
        embed = self.vocab * self.hidden
        norms = (2 * self.layers + 1) * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.layer_matmul_params + norms


def prefill_flops(a: Arch, prompt_len: int) -> int:
    """FLOPs of prefilling one prompt from scratch: 2 per multiply-add of the projections and MLP over every
    token, of causal attention (q·k and p·v over the T(T+1)/2 visible pairs per head), and of the LM head for
    the last token only (norms, RoPE and softmax are left out)."""
    t = prompt_len
    linear = 2 * t * a.layers * a.layer_matmul_params
    attention = a.layers * 2 * 2 * a.heads * a.head_dim * (t * (t + 1) // 2)
    return linear + attention + 2 * a.hidden * a.vocab


def decode_weight_bytes(a: Arch, batch: int, dtype_bytes: int = FP32_BYTES) -> int:
    """Weight bytes one decode step reads: every matmul weight once (shared by the batch), the norm weights,
    and one embedding row per sequence."""
    matmul = a.layers * a.layer_matmul_params + a.hidden * a.vocab
    norms = (2 * a.layers + 1) * a.hidden
    return dtype_bytes * (matmul + norms + batch * a.hidden)


def decode_kv_bytes(a: Arch, batch: int, context: float, dtype_bytes: int = FP32_BYTES) -> float:
    """KV bytes one decode step reads: each sequence's K and V at `context` positions, every layer."""
    return dtype_bytes * batch * context * a.layers * 2 * a.kv_heads * a.head_dim


def mbu(bytes_per_step: float, step_s: float, bandwidth_bytes_per_s: float) -> float:
    return bytes_per_step / step_s / bandwidth_bytes_per_s


def mfu(flops: float, seconds: float, peak_flops_per_s: float) -> float:
    return flops / seconds / peak_flops_per_s


# ----------------------------------------------------------------------------------------------------------
# Clocks
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stamp:
    wall: float
    cpu: float

    @staticmethod
    def now() -> Stamp:
        return Stamp(time.perf_counter(), time.thread_time())

    def since(self, start: Stamp) -> Stamp:
        return Stamp(self.wall - start.wall, self.cpu - start.cpu)


def best_time(fn: Callable[[], object], tries: int, clock: str) -> Stamp:
    """The fastest of `tries` runs of fn (after one warm-up), on `clock`; both clocks of that run."""
    fn()
    runs = []
    for _ in range(tries):
        t0 = Stamp.now()
        fn()
        runs.append(Stamp.now().since(t0))
    return min(runs, key=lambda s: getattr(s, clock))


# ----------------------------------------------------------------------------------------------------------
# Peaks
# ----------------------------------------------------------------------------------------------------------
def measure_peaks(
    clock: str, tries: int, matmul_n: int = 1536, bw_bytes: int = 256 * 2**20
) -> dict[str, float]:
    """Matmul GFLOP/s and read bandwidth GB/s (best of `tries`) on this thread count."""
    out = {"matmul_gflops": _matmul_gflops(clock, tries, matmul_n), **_read_gbs(clock, tries, bw_bytes)}
    out["bandwidth_gbs"] = max(out["gemv_gbs"], out["gemv_t_gbs"], out["stream_read_gbs"])
    gc.collect()
    return out


def _matmul_gflops(clock: str, tries: int, n: int) -> float:
    a, b = torch.full((n, n), 0.5), torch.full((n, n), 0.25)
    return 2 * n**3 / getattr(best_time(lambda: a @ b, tries, clock), clock) / 1e9


def _read_gbs(clock: str, tries: int, nbytes: int) -> dict[str, float]:
    side = int((nbytes // FP32_BYTES) ** 0.5)
    w = torch.full((side, side), 0.5)  # read once per GEMV
    x = torch.full((side,), 0.25)
    flat = w.view(-1)
    size = w.numel() * FP32_BYTES
    gemv = best_time(lambda: torch.mv(w, x), tries, clock)  # weight as [out, in]
    gemv_t = best_time(lambda: x[None] @ w, tries, clock)  # weight as [in, out] (pdserve's layout)
    read = best_time(lambda: flat.sum(), tries, clock)
    return {
        "gemv_gbs": size / getattr(gemv, clock) / 1e9,
        "gemv_t_gbs": size / getattr(gemv_t, clock) / 1e9,
        "stream_read_gbs": size / getattr(read, clock) / 1e9,
    }


def best_peaks(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: max(r[k] for r in runs) for k in runs[0]}


# ----------------------------------------------------------------------------------------------------------
# The two systems
# ----------------------------------------------------------------------------------------------------------
class PdserveDecode:
    """A batch of prompts prefilled once in a `ModelRunner`; `run` replays the same decode steps."""

    def __init__(self, runner: Any, block_manager: Any, prompts: list[list[int]], new_tokens: int) -> None:
        from engine.params import SamplingParams
        from engine.sequence import Sequence

        self.runner, self.new_tokens = runner, new_tokens
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        self.seqs = [Sequence(f"bench-{i}", list(p), params) for i, p in enumerate(prompts)]
        for s in self.seqs:
            s.blocks = block_manager.allocate(len(s.prompt_ids) + new_tokens)
        self.first = runner.prefill(self.seqs)

    def run(self) -> tuple[Stamp, list[list[int]]]:
        """Decode new_tokens - 1 steps from the post-prefill state -> (time per step, tokens per sequence)."""
        for s, t in zip(self.seqs, self.first, strict=True):
            s.output_ids, s.num_cached = [t], len(s.prompt_ids)
        total = Stamp(0.0, 0.0)
        for _ in range(self.new_tokens - 1):
            t0 = Stamp.now()
            tokens = self.runner.decode(self.seqs)
            dt = Stamp.now().since(t0)
            total = Stamp(total.wall + dt.wall, total.cpu + dt.cpu)
            for s, t in zip(self.seqs, tokens, strict=True):
                s.output_ids.append(t)
        steps = self.new_tokens - 1
        return Stamp(total.wall / steps, total.cpu / steps), [list(s.output_ids) for s in self.seqs]


class HFDecode:
    """transformers `generate` on the same prompts; the decode part timed from per-token stamps."""

    def __init__(self, model: Any, prompts: list[list[int]], new_tokens: int, pad_token_id: int) -> None:
        from transformers import StoppingCriteria

        self.model, self.new_tokens, self.pad = model, new_tokens, pad_token_id
        self.ids = torch.tensor(prompts, dtype=torch.long)  # [B, P], equal lengths: no padding
        stamps: list[Stamp] = []
        self.stamps = stamps

        class StampEachToken(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                stamps.append(Stamp.now())  # called once per step, right after the token is chosen
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        self.criterion = StampEachToken()

    def run(self) -> tuple[Stamp, list[list[int]]]:
        from transformers import StoppingCriteriaList

        self.stamps.clear()
        with torch.inference_mode():
            out = self.model.generate(
                self.ids,
                attention_mask=torch.ones_like(self.ids),
                max_new_tokens=self.new_tokens,
                min_new_tokens=self.new_tokens,
                do_sample=False,
                pad_token_id=self.pad,
                stopping_criteria=StoppingCriteriaList([self.criterion]),
            )
        if len(self.stamps) != self.new_tokens:
            raise RuntimeError(f"generate stamped {len(self.stamps)} tokens, expected {self.new_tokens}")
        steps = self.new_tokens - 1
        span = self.stamps[-1].since(self.stamps[0])
        return Stamp(span.wall / steps, span.cpu / steps), out[:, self.ids.shape[1] :].tolist()


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, length), generator=gen).tolist()


# ----------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------
def _median(stamps: list[Stamp]) -> Stamp:
    return Stamp(statistics.median(s.wall for s in stamps), statistics.median(s.cpu for s in stamps))


def _decode_case(
    name: str,
    pd: PdserveDecode,
    hf: HFDecode,
    arch: Arch,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    clock: str,
    bar: Progress,
) -> dict[str, Any]:
    pd_runs: list[Stamp] = []
    hf_runs: list[Stamp] = []
    pd_out = hf_out = None
    for r in range(repeats):
        order: list[tuple[str, PdserveDecode | HFDecode]] = (
            [("pd", pd), ("hf", hf)] if r % 2 == 0 else [("hf", hf), ("pd", pd)]
        )
        for who, decoder in order:
            step, out = decoder.run()
            (pd_runs if who == "pd" else hf_runs).append(step)
            if who == "pd":
                pd_out = out
            else:
                hf_out = out
            bar.update()
    assert pd_out is not None and hf_out is not None
    pd_step, hf_step = _median(pd_runs), _median(hf_runs)
    context = prompt_len + new_tokens / 2  # mean context (incl. the new token) over the timed steps
    weight_b = decode_weight_bytes(arch, batch)
    kv_b = decode_kv_bytes(arch, batch, context)

    def system(step: Stamp, runs: list[Stamp]) -> dict[str, Any]:
        return {
            "tokens_per_s": batch / getattr(step, clock),
            "step_ms": 1e3 * getattr(step, clock),
            "step_ms_wall": 1e3 * step.wall,
            "step_ms_cpu": 1e3 * step.cpu,
            "runs_step_ms": [1e3 * getattr(s, clock) for s in runs],
        }

    return {
        "case": name,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "pdserve": system(pd_step, pd_runs),
        "transformers": system(hf_step, hf_runs),
        "ratio": getattr(hf_step, clock) / getattr(pd_step, clock),
        "ratio_wall": hf_step.wall / pd_step.wall,
        "ratio_cpu": hf_step.cpu / pd_step.cpu,
        "weight_bytes_per_step": weight_b,
        "kv_bytes_per_step": kv_b,
        "tokens_match": sum(a == b for a, b in zip(pd_out, hf_out, strict=True)) / batch,
        "_pd_step_s": getattr(pd_step, clock),
    }


def run(settings: Settings, quiet: bool = False) -> dict[str, Any]:
    import transformers
    from transformers import LlamaForCausalLM

    from engine.block_manager import BlockManager
    from engine.runner import ModelRunner
    from engine.synth import cached_random_model

    torch.set_num_threads(settings.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    clock = settings.clock
    model_dir = cached_random_model(**BENCH_MODEL)

    prompt_lens = (settings.prompt_len, *settings.extra_prompt_lens)
    block = 16
    blocks_needed = sum(
        b * -(-(p + settings.new_tokens) // block) for p in prompt_lens for b in settings.batches
    ) + -(-settings.prefill_len // block)
    runner = ModelRunner(model_dir, num_kv_blocks=blocks_needed, block_size=block)
    bm = BlockManager(runner.kv_cache.num_blocks, block)
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    arch = Arch.from_config(runner.config)
    hf_params = sum(p.numel() for p in hf.parameters())
    pad = runner.config.eos_token_ids[0] if runner.config.eos_token_ids else 0

    cases = [(p, b) for p in prompt_lens for b in settings.batches]
    total = 2 + 2 * settings.repeats * len(cases) + 2
    peak_runs = []
    with Progress(total=total, desc="bench engine", quiet=quiet) as bar:
        peak_runs.append(measure_peaks(clock, tries=3))
        bar.update()

        # prefill: one prompt from scratch, pdserve and HF (last-token logits only, as in generate)
        from engine.params import SamplingParams
        from engine.sequence import Sequence

        prompt = random_prompts(1, settings.prefill_len, arch.vocab, settings.seed + 1)[0]
        seq = Sequence("bench-prefill", prompt, SamplingParams(max_tokens=1, ignore_eos=True))
        seq.blocks = bm.allocate(settings.prefill_len)

        def pd_prefill() -> None:
            seq.num_cached, seq.output_ids = 0, []
            runner.prefill([seq])

        hf_ids = torch.tensor([prompt])

        def hf_prefill() -> None:
            with torch.inference_mode():
                hf(hf_ids, use_cache=True, logits_to_keep=1)

        pd_pre = best_time(pd_prefill, settings.prefill_repeats, clock)
        bar.update()
        hf_pre = best_time(hf_prefill, settings.prefill_repeats, clock)
        bar.update()

        decode: dict[str, Any] = {}
        for p, b in cases:
            prompts = random_prompts(b, p, arch.vocab, settings.seed + 1000 * b + p)
            pd = PdserveDecode(runner, bm, prompts, settings.new_tokens)
            hfd = HFDecode(hf, prompts, settings.new_tokens, pad)
            key = f"batch{b}" if p == settings.prompt_len else f"batch{b}_prompt{p}"
            decode[key] = _decode_case(
                key, pd, hfd, arch, b, p, settings.new_tokens, settings.repeats, clock, bar
            )
        peak_runs.append(measure_peaks(clock, tries=3))
        bar.update()

    peaks = best_peaks(peak_runs)
    bw = peaks["bandwidth_gbs"] * 1e9
    for case in decode.values():
        step_s = case.pop("_pd_step_s")
        case["pdserve"]["mbu"] = mbu(case["weight_bytes_per_step"] + case["kv_bytes_per_step"], step_s, bw)

    flops = prefill_flops(arch, settings.prefill_len)
    pd_pre_s, hf_pre_s = getattr(pd_pre, clock), getattr(hf_pre, clock)
    prefill = {
        "prompt_len": settings.prefill_len,
        "flops": flops,
        "pdserve": {
            "ms": 1e3 * pd_pre_s,
            "ms_wall": 1e3 * pd_pre.wall,
            "tokens_per_s": settings.prefill_len / pd_pre_s,
            "gflops": flops / pd_pre_s / 1e9,
            "mfu": mfu(flops, pd_pre_s, peaks["matmul_gflops"] * 1e9),
        },
        "transformers": {"ms": 1e3 * hf_pre_s, "ms_wall": 1e3 * hf_pre.wall},
        "ratio": hf_pre_s / pd_pre_s,
    }
    b1, b16 = decode.get("batch1"), decode.get("batch16")
    vs = {k: round(decode[k]["ratio"], 3) for k in ("batch1", "batch16") if k in decode}
    headline = {
        "vs_transformers": vs,
        "decode_mbu_batch1": round(b1["pdserve"]["mbu"], 3) if b1 else None,
        "prefill_mfu": round(prefill["pdserve"]["mfu"], 3),
    }
    met = {
        "vs_transformers_batch1": b1 is not None and b1["ratio"] >= TARGETS["vs_transformers_batch1"],
        "vs_transformers_batch16": b16 is not None and b16["ratio"] >= TARGETS["vs_transformers_batch16"],
        "decode_mbu_batch1": b1 is not None and b1["pdserve"]["mbu"] >= TARGETS["decode_mbu_batch1"],
    }
    return {
        "bench": "engine",
        "mode": "quick" if settings.quick else "full",
        **headline,
        "targets": {**TARGETS, "met": met},
        "clock": clock,
        "settings": asdict(settings),
        "model": {
            "dir": model_dir,
            "synth": BENCH_MODEL,
            "params": arch.params,
            "params_transformers": hf_params,
            "dtype": "float32",
            "weight_bytes_read_per_decode_step_batch1": decode_weight_bytes(arch, 1),
        },
        "peaks": peaks,
        "decode": decode,
        "prefill": prefill,
        "method": (
            "pdserve ModelRunner.decode steps vs transformers generate (decode part, from per-token "
            "stopping-criterion stamps), same weights and prompts, greedy, interleaved, median of repeats; "
            f"clock={clock} ({'main-thread CPU time' if clock == 'cpu' else 'wall time'}); peaks measured "
            "in the same process and thread count, best of tries before and after the runs"
        ),
    }


def summary(result: dict[str, Any]) -> str:
    lines = [
        f"engine bench ({result['mode']}, clock={result['clock']}, threads={result['settings']['threads']}, "
        f"model {result['model']['params'] / 1e6:.1f}M params fp32)",
        f"peaks: matmul {result['peaks']['matmul_gflops']:.1f} GFLOP/s, bandwidth "
        f"{result['peaks']['bandwidth_gbs']:.1f} GB/s (gemv {result['peaks']['gemv_gbs']:.1f}, gemv_t "
        f"{result['peaks']['gemv_t_gbs']:.1f}, read {result['peaks']['stream_read_gbs']:.1f})",
    ]
    for key, c in result["decode"].items():
        pd, hf = c["pdserve"], c["transformers"]
        lines.append(
            f"decode {key}: pdserve {pd['tokens_per_s']:.1f} tok/s ({pd['step_ms']:.1f} ms/step), transformers "
            f"{hf['tokens_per_s']:.1f} tok/s ({hf['step_ms']:.1f} ms/step) -> {c['ratio']:.2f}x "
            f"(wall {c['ratio_wall']:.2f}x); MBU {pd['mbu']:.0%}; tokens match {c['tokens_match']:.0%}"
        )
    pre = result["prefill"]
    lines.append(
        f"prefill {pre['prompt_len']} tokens: pdserve {pre['pdserve']['ms']:.0f} ms "
        f"({pre['pdserve']['gflops']:.1f} GFLOP/s, MFU {pre['pdserve']['mfu']:.0%}), transformers "
        f"{pre['transformers']['ms']:.0f} ms -> {pre['ratio']:.2f}x"
    )
    met = result["targets"]["met"]
    lines.append("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve bench engine", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats (under a minute)")
    ap.add_argument("--json", default=None, help="write the JSON object here instead of stdout")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both systems (default 1)")
    ap.add_argument(
        "--clock",
        choices=("auto", "cpu", "wall"),
        default="auto",
        help="auto: main-thread CPU time with one thread, wall time otherwise",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument(
        "--tp",
        default=None,
        help="tensor-parallel sizes, e.g. 2 or 1,2: time TP x PP layouts (bench.engine_layouts) instead",
    )
    ap.add_argument("--pp", default=None, help="pipeline-parallel sizes, e.g. 2 (with --tp: every pair)")
    ap.add_argument(
        "--model", default=None, help="with --tp/--pp: the model directory (default: see --quick)"
    )
    a = ap.parse_args(argv)
    if a.tp is not None or a.pp is not None:
        from bench import engine_layouts

        try:
            tps = [int(x) for x in (a.tp or "1").split(",")]
            pps = [int(x) for x in (a.pp or "1").split(",")]
        except ValueError:
            ap.error("--tp / --pp take comma-separated integers, e.g. --tp 1,2")
        layouts = engine_layouts.run(tps, pps, a.quick, a.model)
        emit(layouts, a.json, summary=engine_layouts.summary(layouts))
        return 0
    if a.clock == "cpu" and a.threads != 1:
        ap.error("--clock cpu measures one thread; use --threads 1 or --clock wall")
    result = run(Settings.make(a.quick, a.threads, a.clock), quiet=a.quiet)
    emit(result, a.json, summary=summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
