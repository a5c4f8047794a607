"""Train pdserve's small model from scratch on the Python standard library, in one command.

    .venv/bin/python -m training.train --out models/pdserve-tiny-py --steps 1800 --minutes 55 --seed 0

Pipeline (all seeded; CPU, fp32): collect the stdlib ``.py`` files and split them by file (training.data) ->
train a byte-level BPE tokenizer on the training split (training.tokenizer) -> train a Llama-architecture
causal LM (``transformers.LlamaForCausalLM``) with AdamW, linear warmup and cosine decay, on shuffled
fixed-length windows of the training token stream -> save it in Hugging Face format with the held-out
split, the unigram baseline's counts, a JSON training log, the model card and the loss curve.

``--steps N`` fixes the schedule (reproducible) and ``--minutes M`` bounds the training loop's wall time: the
cosine schedule follows whichever of step count and elapsed time is further along (see ``progress``), so a
machine too slow or too busy for N steps in M minutes still finishes a complete schedule within the budget,
with fewer steps; the log records which one paced the run. Without ``--steps`` the budget alone paces it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from training import EOT
from training.data import collect_stdlib, join_docs, split_docs, stdlib_root
from training.eval import (
    EVAL_CTX,
    HELDOUT_FILE,
    UNIGRAM_FILE,
    heldout_perplexity,
    hf_logits_fn,
    unigram_perplexity,
)
from training.eval import unigram_counts as count_unigrams
from training.tokenizer import encode, save_hf_tokenizer, train_tokenizer

LOG_FILE = "training_log.json"
SAMPLE_PROMPT = "def fibonacci(n):"
# Shipped in generation_config.json: pdserve (and transformers) apply it to requests that leave it unset.
# A model this small loops under plain greedy decoding; with 1.5 its greedy text stays Python-shaped.
REPETITION_PENALTY = 1.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models/pdserve-tiny-py"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: as --minutes allow)")
    p.add_argument("--minutes", type=float, default=40.0, help="wall-time budget of the training loop")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    # model
    p.add_argument("--vocab-size", type=int, default=6144)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    # optimisation
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--long-seq-len", type=int, default=1024, help="sequence length of the final phase (same tokens/step)"
    )
    p.add_argument("--long-frac", type=float, default=0.1, help="fraction of steps at --long-seq-len")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    # data / logging
    p.add_argument("--heldout-chars", type=int, default=150_000)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out prefix scored during training")
    p.add_argument("--no-card", action="store_true", help="skip the model card / loss-curve PNG")
    return p.parse_args(argv)


def progress(step: int, elapsed: float, t_warm: float | None, a: argparse.Namespace) -> tuple[float, float]:
    """Schedule progress after warmup, by step count and by wall time; the schedule follows the larger.

    With ``--steps`` on a machine fast enough to finish them within ``--minutes`` the step count always
    leads and the run is reproducible step for step; otherwise the wall-time budget paces the cosine so it
    still completes (with fewer steps). Without ``--steps`` the budget alone paces it.
    """
    if step < a.warmup or t_warm is None:
        return 0.0, 0.0
    p_steps = (step - a.warmup) / max(1, a.steps - a.warmup) if a.steps is not None else 0.0
    left = a.minutes * 60.0 - t_warm
    p_time = (elapsed - t_warm) / left if left > 0 else 1.0
    return p_steps, p_time


def lr_at(step: int, p: float, a: argparse.Namespace) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    p = min(1.0, p)
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


class Batches:
    """Shuffled non-overlapping windows of ``seq_len + 1`` tokens; a new random offset every epoch."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, gen: torch.Generator):
        self.stream, self.seq_len, self.batch_size, self.gen = stream, seq_len, batch_size, gen
        self.epoch = -1
        self._order: list[int] = []
        self.tokens_per_epoch = 0

    def _new_epoch(self) -> None:
        self.epoch += 1
        n = self.seq_len + 1
        offset = int(torch.randint(0, self.seq_len, (1,), generator=self.gen))
        count = (self.stream.numel() - offset) // n
        self.offset = offset
        self._order = (torch.randperm(count, generator=self.gen) * n + offset).tolist()
        self.tokens_per_epoch = count * self.seq_len

    def next(self) -> torch.Tensor:
        if len(self._order) < self.batch_size:
            self._new_epoch()
        starts, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return torch.stack([self.stream[s : s + self.seq_len + 1] for s in starts])


def build_model(a: argparse.Namespace, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.hidden // a.heads,
        max_position_embeddings=a.max_positions,
        # transformers 5 types LlamaConfig by its dataclass fields; it still takes rope_theta (into
        # rope_parameters) through **kwargs at run time
        rope_theta=a.rope_theta,  # type: ignore[call-arg]
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        attention_bias=False,
        mlp_bias=False,
    )
    return LlamaForCausalLM(cfg)


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import tokenizers
    import transformers

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


@torch.inference_mode()
def greedy(model, tok, prompt: str, new_tokens: int = 64) -> str:
    ids = torch.tensor([tok.encode(prompt).ids])  # with the BOS, as a prompt
    out = model.generate(
        ids,
        max_new_tokens=new_tokens,
        do_sample=False,
        repetition_penalty=REPETITION_PENALTY,
        eos_token_id=0,
        pad_token_id=0,
    )
    return tok.decode(out[0].tolist(), skip_special_tokens=True)


def save_model(model, out: Path) -> None:
    from transformers import GenerationConfig

    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(
        bos_token_id=0, eos_token_id=0, pad_token_id=0, repetition_penalty=REPETITION_PENALTY
    ).save_pretrained(str(out))
    # Readers that predate transformers' ``rope_parameters`` look for a top-level rope_theta.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(a.threads))
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    # ---- data + tokenizer ---------------------------------------------------------------------------
    docs = collect_stdlib()
    train_docs, held_docs = split_docs(docs, heldout_chars=a.heldout_chars)
    say(
        f"stdlib {stdlib_root()}: {len(docs)} files; train {len(train_docs)} files "
        f"({sum(len(d.text) for d in train_docs)} chars), held-out {len(held_docs)} files "
        f"({sum(len(d.text) for d in held_docs)} chars)"
    )
    tok = train_tokenizer((d.text for d in train_docs), vocab_size=a.vocab_size)
    vocab = tok.get_vocab_size()
    save_hf_tokenizer(tok, out, model_max_length=a.max_positions)
    held_text = join_docs(held_docs)
    (out / HELDOUT_FILE).write_bytes(held_text.encode("utf-8"))
    held_ids = encode(tok, held_text)
    stream: list[int] = []
    for enc in tok.encode_batch([d.text for d in train_docs], add_special_tokens=False):
        stream.append(0)
        stream.extend(enc.ids)
    train_stream = torch.tensor(stream, dtype=torch.long)
    counts = count_unigrams(train_stream, vocab)
    (out / UNIGRAM_FILE).write_text(
        json.dumps(
            {"description": "token counts of the training split (add-one unigram baseline)", "counts": counts}
        )
        + "\n"
    )
    say(f"tokenizer: vocab {vocab}; train tokens {train_stream.numel()}; held-out tokens {len(held_ids)}")

    # ---- model ----------------------------------------------------------------------------------------
    model = build_model(a, vocab)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    say(f"model: {n_params} parameters ({n_params * 4 / 1e6:.1f} MB fp32)")
    gen = torch.Generator().manual_seed(a.seed)
    tokens_per_step = a.batch_size * a.seq_len
    long_bs = max(1, tokens_per_step // a.long_seq_len) if a.long_frac > 0 else a.batch_size
    batches = Batches(train_stream, a.seq_len, a.batch_size, gen)
    held_eval = torch.tensor(held_ids[: a.eval_tokens + 1])

    def eval_loss() -> float:
        model.eval()
        r = heldout_perplexity(hf_logits_fn(model), held_eval, ctx=EVAL_CTX)
        model.train()
        return r.nll

    log: list[dict] = []
    evals: list[dict] = []
    tokens_seen = 0
    step = 0
    time_paced = 0  # steps whose LR the wall-time budget, not the step count, decided
    step_times: list[float] = []
    loss_acc, loss_n = 0.0, 0
    t_warm: float | None = None
    model.train()
    t_train = time.time()
    try:
        while True:
            elapsed = time.time() - t_train
            if step >= a.warmup and t_warm is None:
                t_warm = elapsed
            p_steps, p_time = progress(step, elapsed, t_warm, a)
            p = max(p_steps, p_time)
            if p >= 1.0:
                time_paced += int(p_time > p_steps)
                break
            time_paced += int(p_time > p_steps)
            if a.long_frac > 0 and p >= 1 - a.long_frac and batches.seq_len != a.long_seq_len:
                say(f"step {step}: switching to seq_len {a.long_seq_len} x batch {long_bs}")
                batches = Batches(train_stream, a.long_seq_len, long_bs, gen)
            t0 = time.time()
            lr = lr_at(step, p, a)
            for g in opt.param_groups:
                g["lr"] = lr
            chunk = batches.next()
            inp, tgt = chunk[:, :-1], chunk[:, 1:]
            logits = model(input_ids=inp, use_cache=False).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip).item()
            opt.step()
            step += 1
            tokens_seen += tgt.numel()
            loss_acc += loss.item()
            loss_n += 1
            step_times.append(time.time() - t0)
            last = a.steps is not None and step == a.steps
            if step % a.log_every == 0 or last:
                rec = {
                    "step": step,
                    "tokens": tokens_seen,
                    "loss": loss_acc / loss_n,
                    "lr": lr,
                    "progress": round(p, 4),
                    "grad_norm": gnorm,
                    "elapsed_s": round(time.time() - t_train, 1),
                    "seq_len": batches.seq_len,
                }
                log.append(rec)
                loss_acc, loss_n = 0.0, 0
                say(
                    f"step {step}/{a.steps} progress {p:.3f} loss {rec['loss']:.4f} lr {lr:.2e} "
                    f"gnorm {gnorm:.2f} tok {tokens_seen} {tgt.numel() / step_times[-1]:.0f} tok/s"
                )
            if step % a.eval_every == 0 or last:
                v = eval_loss()
                evals.append({"step": step, "tokens": tokens_seen, "heldout_loss": v})
                say(f"step {step}: held-out loss (first {held_eval.numel() - 1} tokens) {v:.4f}")
    except KeyboardInterrupt:
        say(f"interrupted at step {step}")
        time_paced = -1
    if time_paced < 0:
        schedule = "interrupted"
        stop_reason = f"interrupted at step {step}"
    elif time_paced == 0 and a.steps is not None:
        schedule = "steps"
        stop_reason = f"--steps {a.steps} completed within --minutes {a.minutes:g}"
    else:
        schedule = "time"
        stop_reason = (
            f"cosine schedule paced by the --minutes {a.minutes:g} budget for {time_paced} of {step} steps"
            + (f" (machine too slow or busy for --steps {a.steps})" if a.steps is not None else "")
        )
    say(stop_reason)
    train_s = time.time() - t_train

    # ---- save + final evaluation ----------------------------------------------------------------------
    model.eval()
    save_model(model, out)
    say("saved model; evaluating the held-out split")
    t0 = time.time()
    full = heldout_perplexity(hf_logits_fn(model), held_ids, ctx=EVAL_CTX)
    uni = unigram_perplexity(counts, held_ids)
    eval_s = time.time() - t0
    sample = greedy(model, tok, SAMPLE_PROMPT)
    say(
        f"held-out: loss {full.nll:.4f} ppl {full.ppl:.3f} over {full.n_tokens} tokens; unigram {uni.ppl:.1f}"
    )
    say(f"sample: {sample!r}")
    result = {
        "model_name": out.name,
        "command": "python -m training.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "data": {
            "stdlib_root": str(stdlib_root()),
            "python": platform.python_version(),
            "files_total": len(docs),
            "train_files": len(train_docs),
            "train_chars": sum(len(d.text) for d in train_docs),
            "train_tokens": int(train_stream.numel()),
            "heldout_files": [d.relpath for d in held_docs],
            "heldout_chars": len(held_text),
            "heldout_tokens": len(held_ids),
        },
        "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab_size": vocab, "special_tokens": [EOT]},
        "model": {
            "architecture": "LlamaForCausalLM",
            "parameters": n_params,
            "dtype": "float32",
            "config": json.loads((out / "config.json").read_text()),
        },
        "training": {
            "steps": step,
            "planned_steps": a.steps,
            "schedule": schedule,
            "time_paced_steps": time_paced,
            "stop_reason": stop_reason,
            "tokens_seen": tokens_seen,
            "epochs": tokens_seen / max(1, train_stream.numel()),
            "train_seconds": round(train_s, 1),
            "total_seconds": round(time.time() - t_start, 1),
            "final_train_loss": log[-1]["loss"] if log else None,
        },
        "machine": machine_info(a.threads),
        "eval": {
            "method": (
                f"non-overlapping {EVAL_CTX}-token windows over the whole held-out token stream "
                "(training.eval.heldout_perplexity); unigram: add-one-smoothed token counts of the "
                "training split, same targets"
            ),
            "ctx": EVAL_CTX,
            "heldout_tokens_scored": full.n_tokens,
            "heldout_loss": full.nll,
            "heldout_ppl": full.ppl,
            "unigram_loss": uni.nll,
            "unigram_ppl": uni.ppl,
            "ratio": full.ppl / uni.ppl,
            "eval_seconds": round(eval_s, 1),
        },
        "sample": {
            "prompt": SAMPLE_PROMPT,
            "greedy_64_tokens": sample,
            "repetition_penalty": REPETITION_PENALTY,
        },
        "loss_log": log,
        "heldout_log": evals,
    }
    (out / LOG_FILE).write_text(json.dumps(result, indent=1) + "\n")
    if not a.no_card:
        from training.card import write_card

        write_card(out)
    say(f"done in {time.time() - t_start:.0f}s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
